import pytest
import torch

from flowdistill.adapters import feature_kind, make_adapter
from flowdistill.errors import ShapeMismatchError


@pytest.mark.parametrize(
    "src,dst",
    [
        ((8,), (16,)),
        ((4, 8, 8), (16, 4, 4)),
        ((4, 4, 4), (8, 8, 8)),
        ((10, 12), (20, 16)),
        ((8, 4, 4), (16, 24)),  # map -> 16 tokens
        ((8, 4, 4), (17, 24)),  # map -> class token + 16 tokens
        ((17, 24), (8, 2, 2)),  # tokens (with class token) -> map
    ],
)
def test_adapter_output_shape(src, dst):
    adapter = make_adapter(src, dst)
    y = adapter(torch.randn(3, *src))
    assert tuple(y.shape) == (3, *dst)
    y.sum().backward()  # trainable end to end


def test_identity_when_shapes_match():
    x = torch.randn(2, 5)
    assert make_adapter((5,), (5,))(x) is x


def test_linear_adapter_is_the_linear_map():
    adapter = make_adapter((3,), (2,))
    x = torch.randn(4, 3)
    torch.testing.assert_close(adapter(x), x @ adapter.proj.weight.T + adapter.proj.bias)


def test_orthogonal_init():
    adapter = make_adapter((8, 4, 4), (4, 4, 4), init="orthogonal")
    w = adapter.proj.weight.view(4, 8)
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "src,dst",
    [((8,), (4, 2, 2)), ((4, 2, 2), (10,)), ((15, 8), (4, 2, 2)), ((8, 4, 4), (15, 8))],
)
def test_unbridgeable_shapes_name_both(src, dst):
    with pytest.raises(ShapeMismatchError) as err:
        make_adapter(src, dst)
    assert str(src) in str(err.value) or str(src[0]) in str(err.value)


def test_feature_kind_rejects_5d():
    with pytest.raises(ShapeMismatchError):
        feature_kind((1, 2, 3, 4))
