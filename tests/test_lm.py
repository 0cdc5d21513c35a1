"""Language-model pieces: per-token losses against direct float64 formulas, the GPT model."""

from __future__ import annotations

import math

import pytest
import torch

from flowdistill.errors import ConfigError, ShapeMismatchError
from flowdistill.losses import (
    forward_kl,
    jensen_shannon,
    masked_mean,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_cross_entropy,
)
from flowdistill.models import create_model
from flowdistill.models.gpt import GPT, GPTConfig

F64 = torch.float64


def _probs(z: torch.Tensor, temperature: float) -> list[list[float]]:
    """Softmax rows written out from exp and sums (float64), as nested lists."""
    rows = []
    for row in z.reshape(-1, z.shape[-1]).double().tolist():
        e = [math.exp(v / temperature - max(row) / temperature) for v in row]
        rows.append([v / sum(e) for v in e])
    return rows


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _oracle(kind: str, s, t, mask, temperature=1.0, alpha=0.1, beta=0.5) -> float:
    ps, pt = _probs(s, temperature), _probs(t, temperature)
    keep = [True] * len(ps) if mask is None else mask.reshape(-1).bool().tolist()
    values = []
    for q, p, k in zip(ps, pt, keep, strict=True):
        if not k:
            continue
        if kind == "forward":
            v = temperature**2 * _kl(p, q)
        elif kind == "reverse":
            v = temperature**2 * _kl(q, p)
        elif kind == "skew_forward":
            v = temperature**2 * _kl(
                p, [alpha * a + (1 - alpha) * b for a, b in zip(p, q, strict=True)]
            )
        elif kind == "skew_reverse":
            v = temperature**2 * _kl(
                q, [alpha * b + (1 - alpha) * a for a, b in zip(p, q, strict=True)]
            )
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
            v = temperature**2 * (beta * _kl(p, m) + (1 - beta) * _kl(q, m))
        values.append(v)
    return sum(values) / len(values)


LOSSES = {
    "forward": forward_kl,
    "reverse": reverse_kl,
    "skew_forward": skew_forward_kl,
    "skew_reverse": skew_reverse_kl,
    "jsd": jensen_shannon,
}


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 7, generator=g, dtype=F64) * 2
    t = torch.randn(3, 5, 7, generator=g, dtype=F64) * 2
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[0, 0] = True
    return s, t, mask


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_losses_against_a_direct_float64_computation(kind, temperature, logits):
    s, t, mask = logits
    for m in (None, mask):
        got = LOSSES[kind](s, t, m, temperature=temperature)
        assert got.dtype == F64
        assert got.item() == pytest.approx(_oracle(kind, s, t, m, temperature), rel=1e-9)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_masked_loss_equals_the_loss_on_the_unmasked_tokens(kind, logits):
    s, t, mask = logits
    keep = mask.bool()
    # the unmasked tokens alone, as a (1, N, V) batch, must give the same value and gradient
    s1 = s.clone().requires_grad_()
    masked = LOSSES[kind](s1, t, mask)
    masked.backward()
    s2 = s[keep].clone().unsqueeze(0).requires_grad_()
    alone = LOSSES[kind](s2, t[keep].unsqueeze(0))
    alone.backward()
    assert torch.allclose(masked, alone)
    assert torch.allclose(s1.grad[keep], s2.grad[0])
    assert not s1.grad[~keep].any()  # masked tokens get no gradient
    # whatever the masked positions hold (NaN, inf), value and gradient are the same
    s3, t3 = s.clone(), t.clone()
    s3[~keep], t3[~keep] = float("nan"), float("inf")
    s3.requires_grad_()
    spoiled = LOSSES[kind](s3, t3, mask)
    spoiled.backward()
    assert torch.allclose(spoiled, alone)
    assert torch.allclose(s3.grad[keep], s2.grad[0]) and not s3.grad[~keep].any()


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_zero_when_student_equals_teacher(kind, logits):
    s, _, mask = logits
    assert LOSSES[kind](s, s.clone(), mask).abs() < 1e-12


def test_skew_zero_alpha_is_the_plain_kl(logits):
    s, t, mask = logits
    assert torch.allclose(skew_forward_kl(s, t, mask, alpha=0.0), forward_kl(s, t, mask))
    assert torch.allclose(skew_reverse_kl(s, t, mask, alpha=0.0), reverse_kl(s, t, mask))


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_chunked_rows_give_the_same_value_and_gradient(kind, logits):
    s, t, mask = logits
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    whole = LOSSES[kind](a, t, mask)
    chunked = LOSSES[kind](b, t, mask, chunk_size=2)
    whole.backward()
    chunked.backward()
    assert torch.allclose(whole, chunked)
    assert torch.allclose(a.grad, b.grad)


def test_low_precision_logits_are_computed_in_float32(logits):
    s, t, mask = logits
    value = forward_kl(s.bfloat16(), t.bfloat16(), mask)
    assert value.dtype == torch.float32
    expected = forward_kl(s.bfloat16().double(), t.bfloat16().double(), mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_token_cross_entropy_and_masked_mean(logits):
    s, _, mask = logits
    targets = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    probs = _probs(s, 1.0)
    nll = [-math.log(p[y]) for p, y in zip(probs, targets.reshape(-1).tolist(), strict=True)]
    keep = mask.reshape(-1).tolist()
    expected = sum(v for v, k in zip(nll, keep, strict=True) if k) / sum(keep)
    assert token_cross_entropy(s, targets, mask).item() == pytest.approx(expected, rel=1e-9)
    assert masked_mean(torch.tensor([1.0, 3.0]), torch.tensor([False, False])) == 0


def test_shape_errors_name_the_problem(logits):
    s, t, mask = logits
    with pytest.raises(ShapeMismatchError, match="vocabularies differ"):
        forward_kl(s, t[..., :5], mask)
    with pytest.raises(ShapeMismatchError, match="leading shape"):
        reverse_kl(s, t, mask[:, :3])
    with pytest.raises(ValueError, match="alpha"):
        skew_forward_kl(s, t, alpha=1.5)


# ---------------------------------------------------------------------------- GPT
def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16) | kw
    return GPT(GPTConfig(**cfg)).eval()


def test_gpt_is_causal():
    model = _gpt()
    x = torch.randint(0, 11, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 11, (2, 5))  # change the later tokens only
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 12, 11)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_ties_embedding_and_head_and_is_registered():
    model = create_model("gpt", vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)
    assert model.head.weight is model.tok_emb.weight
    n_unique = sum(p.numel() for p in model.parameters())  # tied weight counted once
    c, v, t, layers = 16, 11, 16, 2
    per_block = (
        2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    )
    assert n_unique == v * c + t * c + layers * per_block + 2 * c


def test_gpt_generate_and_errors():
    model = _gpt()
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, temperature=0.0)
    assert out.shape == (2, 21)  # longer than block_size: the context is cropped
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    start = torch.zeros(1, 3, dtype=torch.long)
    assert torch.equal(
        model.generate(start, 5, generator=g1), model.generate(start, 5, generator=g2)
    )
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ConfigError, match="divisible by n_head"):
        GPTConfig(n_embd=10, n_head=4).validate()
