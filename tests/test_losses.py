import math

import numpy as np
import pytest
import torch

from flowdistill import losses


def _kd_numpy(s, t, temperature):
    """Independent oracle: softmax and KL written out in NumPy."""

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    return float((p_t * np.log(p_t / p_s)).sum(-1).mean() * temperature**2)


def test_kd_pinned_value():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    value = losses.kd(s, t, temperature=4.0).item()
    assert value == pytest.approx(_kd_numpy(s.numpy(), t.numpy(), 4.0), abs=1e-10)
    assert value == pytest.approx(0.7832142086, abs=1e-6)


def test_kd_two_class_closed_form():
    # two classes: KL of Bernoulli(sigmoid(a)) from Bernoulli(sigmoid(b))
    a, b = 1.3, -0.4
    s = torch.tensor([[b, 0.0]], dtype=torch.float64)
    t = torch.tensor([[a, 0.0]], dtype=torch.float64)
    pa, pb = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
    expected = pa * math.log(pa / pb) + (1 - pa) * math.log((1 - pa) / (1 - pb))
    assert losses.kd(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-12)


def test_kd_zero_for_equal_logits_and_sequence_shapes():
    z = torch.randn(2, 3, 11)
    assert losses.kd(z, z).item() == pytest.approx(0.0, abs=1e-6)
    flat = losses.kd(z.reshape(6, 11), z.flip(0).reshape(6, 11))
    torch.testing.assert_close(losses.kd(z, z.flip(0)), flat)


def test_kd_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        losses.kd(torch.zeros(2, 3), torch.zeros(2, 4))
