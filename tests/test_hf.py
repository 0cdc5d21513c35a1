"""Hugging Face causal LMs as teacher or student, through the same taps (tiny random
configurations built here; nothing is downloaded)."""

from __future__ import annotations

import math

import pytest
import torch

from flowdistill import OptimConfig, TrainConfig, fit, make_distiller
from flowdistill.data import char_splits
from flowdistill.errors import ShapeMismatchError
from flowdistill.models.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

TEXT = ("all the world's a stage, and all the men and women merely players. " * 30).strip()


def _hf(vocab: int, width: int = 32, layers: int = 2):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture
def data():
    splits, tok = char_splits(TEXT, block_size=16)
    return splits, tok.vocab_size


@pytest.mark.parametrize("method", ["kd", "reverse_kl", "taid", "flowdistill", "fitnet"])
def test_hf_teacher_and_project_student(method, data):
    splits, vocab = data
    teacher = _hf(vocab)
    student = GPT(GPTConfig(vocab, 16, n_layer=1, n_head=2, n_embd=16))
    x, y = splits.train.x[:4], splits.train.y[:4]
    options = {}
    if method in ("flowdistill", "fitnet"):
        options = {"student_taps": ["blocks.0"], "teacher_taps": ["transformer.h.1"]}
    distiller = make_distiller(method, teacher, student, example_input=x, **options)
    if options:
        assert distiller.teacher_shapes["transformer.h.1"] == (16, 32)
    assert distiller.teacher_shapes["logits"] == (16, vocab)
    terms = distiller(x, y)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    assert all(p.grad is None for p in teacher.parameters())


def test_hf_student_trains_in_the_engine(data, tmp_path):
    splits, vocab = data
    teacher = GPT(GPTConfig(vocab, 16, n_layer=2, n_head=2, n_embd=32))
    student = _hf(vocab, width=16, layers=1)
    distiller = make_distiller("kd", teacher, student, temperature=1.0)
    train = TrainConfig(epochs=2, progress=False, select_by="val_loss", amp=False)
    result = fit(distiller, splits, OptimConfig("adamw", lr=3e-3), train, tmp_path, batch_size=8)
    assert result.history[-1]["val_loss"] < math.log(vocab)
    assert distiller.predict(splits.val.x[:2]).shape == (2, 16, vocab)


def test_different_vocabularies_are_refused_clearly(data):
    splits, vocab = data
    teacher = _hf(vocab + 3)
    student = GPT(GPTConfig(vocab, 16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ShapeMismatchError, match="vocabular"):
        make_distiller("kd", teacher, student, example_input=splits.train.x[:2])


def test_a_hugging_face_teacher_fills_a_top_k_cache(data):
    """Its output is a ModelOutput, read for its logits like any teacher's."""
    from flowdistill.distillers.cached import build_topk_cache

    splits, vocab = data
    teacher = _hf(vocab).eval()
    x = splits.train.x[:6]
    cache = build_topk_cache(teacher, x, k=4)
    with torch.no_grad():
        top = teacher(x).logits.float().topk(4, dim=-1)
    torch.testing.assert_close(cache.values.float(), top.values, atol=1e-2, rtol=1e-2)
    assert torch.equal(cache.indices.long(), top.indices)
