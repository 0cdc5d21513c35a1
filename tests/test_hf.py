"""Hugging Face causal LMs as teacher or student, through the same taps (tiny random
configurations built here; nothing is downloaded)."""

from __future__ import annotations

import math

import pytest
import torch

from flowdistill import OptimConfig, TrainConfig, fit, make_distiller
from flowdistill.data import Splits, char_splits, padded_sequences
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


def _documents(n: int, seed: int) -> list[torch.Tensor]:
    """Windows of the text of different lengths (3 to 16 tokens)."""
    splits, _ = char_splits(TEXT, block_size=16)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(splits.train), (n,), generator=g).tolist()
    lengths = torch.randint(3, 17, (n,), generator=g).tolist()
    return [torch.cat([splits.train.x[r], splits.train.y[r, -1:]])[:k]
            for r, k in zip(rows, lengths, strict=True)]  # fmt: skip


def test_left_padded_batches_reach_a_hugging_face_model_by_keyword(data, tmp_path):
    """A left-padded dict batch (input_ids, attention_mask, position_ids) gives GPT-2 each
    sequence's own logits at its real tokens, the project's GPT the same (it takes the same
    keywords), and fit distils one into the other on such batches."""
    splits, vocab = data
    teacher = _hf(vocab).eval()
    seqs = _documents(6, seed=0)
    batch = padded_sequences(seqs, side="left", position_ids=True)
    real = batch.x["attention_mask"].bool()
    with torch.no_grad():
        logits = teacher(**batch.x).logits
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i][real[i]], teacher(s[None, :-1]).logits[0],
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    student = GPT(GPTConfig(vocab, 16, n_layer=1, n_head=2, n_embd=16))
    parts = [
        padded_sequences(_documents(n, seed), side="left", length=16, position_ids=True)
        for n, seed in ((48, 1), (16, 2), (16, 3))
    ]
    distiller = make_distiller("kd", teacher, student, temperature=1.0)
    train = TrainConfig(epochs=2, progress=False, select_by="val_loss", amp=False)
    result = fit(distiller, Splits(*parts, num_classes=vocab), OptimConfig("adamw", lr=3e-3),
                 train, tmp_path, batch_size=8)  # fmt: skip
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] < math.log(vocab) + 1
