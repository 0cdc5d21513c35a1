"""Padded token batches as a dict of inputs (``input_ids``, ``attention_mask``): the models
take them as keyword arguments, no token attends to padding, and every loss, context and
metric leaves the padding out, on either side."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowdistill import OptimConfig, TrainConfig, fit, make_distiller
from flowdistill.data import Split, Splits, padded_sequences
from flowdistill.data.inputs import check_inputs, input_mask, num_rows, take
from flowdistill.distillers.registry import REGISTRY, VARIANTS, get_method
from flowdistill.engine import evaluate
from flowdistill.errors import ConfigError, DataError, ShapeMismatchError
from flowdistill.models.gpt import GPT, GPTConfig
from flowdistill.taps import FeatureTaps

ALL_METHODS = sorted(REGISTRY) + sorted(VARIANTS)
VOCAB = 13
#: methods defined on whole samples only (one logit vector per sample)
SAMPLE_LEVEL = {"nd", "ofa"}


def _sequences(n: int = 6, seed: int = 0, low: int = 4, high: int = 12) -> list[torch.Tensor]:
    """Progressions ``1 + (a + k b) mod 12`` of random lengths (a model can learn them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    lengths[0] = high  # the longest one sets the width
    starts = torch.randint(0, 12, (n,), generator=g).tolist()
    steps = torch.randint(1, 4, (n,), generator=g).tolist()
    return [
        1 + (a + b * torch.arange(k)) % 12 for k, a, b in zip(lengths, starts, steps, strict=True)
    ]


def _gpt(width: int, layers: int, dtype=torch.float32) -> GPT:
    return GPT(GPTConfig(VOCAB, 16, n_layer=layers, n_head=2, n_embd=width)).to(dtype)


def _pair() -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    return _gpt(32, 2), _gpt(16, 1)


# ---------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_sequences_hold_each_sequence_shifted_on_its_side(side):
    seqs = _sequences()
    split = padded_sequences(seqs, side=side, pad_id=0, length=12, position_ids=True)
    ids, mask, pos = (split.x[k] for k in ("input_ids", "attention_mask", "position_ids"))
    assert ids.shape == mask.shape == pos.shape == split.y.shape == (6, 12)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        real = list(range(n)) if side == "right" else list(range(12 - n, 12))
        pads = [j for j in range(12) if j not in real]
        assert ids[i, real].tolist() == s[:-1].tolist()
        assert split.y[i, real].tolist() == s[1:].tolist()
        assert pos[i, real].tolist() == list(range(n))
        assert mask[i, real].tolist() == [1] * n and mask[i, pads].tolist() == [0] * len(pads)
        assert ids[i, pads].tolist() == [0] * len(pads)
        assert split.y[i, pads].tolist() == [-100] * len(pads)


def test_padded_sequences_refuse_what_they_cannot_lay_out():
    with pytest.raises(DataError, match="sequence 1 has 1 token"):
        padded_sequences([[1, 2, 3], [4]])
    with pytest.raises(DataError, match="length 2 is shorter than the longest sequence's 3"):
        padded_sequences([[1, 2, 3, 4]], length=2)
    with pytest.raises(ConfigError, match="side is 'right' or 'left'"):
        padded_sequences([[1, 2, 3]], side="middle")
    with pytest.raises(DataError, match="no sequences"):
        padded_sequences([])


def test_a_dict_of_inputs_is_checked_and_cut_row_by_row():
    x = {"input_ids": torch.arange(8).view(4, 2), "attention_mask": torch.ones(4, 2)}
    assert num_rows(x) == 4
    assert take(x, torch.tensor([3, 0]))["input_ids"].tolist() == [[6, 7], [0, 1]]
    assert input_mask(x).dtype == torch.bool and input_mask(torch.ones(4, 2)) is None
    with pytest.raises(DataError, match=r"lengths differ: \{'a': 4, 'b': 3\}"):
        check_inputs({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)}, "x")
    with pytest.raises(DataError, match="entry 'a' is a list"):
        check_inputs({"a": [1, 2]}, "x")
    with pytest.raises(DataError, match="empty dict"):
        check_inputs({}, "x")
    with pytest.raises(DataError, match="tensor or a dict of tensors"):
        check_inputs([torch.zeros(2)], "x")


def test_taps_pass_a_dict_as_keyword_arguments():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.inner(a) - b

    model = Two()
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    out, feats = FeatureTaps(model, ["inner", "logits"])({"b": b, "a": a})
    assert torch.equal(feats["logits"], model.inner(a) - b)
    assert torch.equal(feats["inner"], model.inner(a))


# ---------------------------------------------------------------------------- the model
@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt_logits_at_real_tokens_are_those_of_the_unpadded_sequence(side):
    """The oracle: each sequence run alone, unpadded."""
    torch.manual_seed(0)
    model = _gpt(32, 2, torch.float64).eval()
    seqs = _sequences()
    split = padded_sequences(seqs, side=side)
    with torch.no_grad():
        logits = model(**split.x)  # (N, L, V)
        assert torch.isfinite(logits).all()  # padded positions too
        real = input_mask(split.x)
        for i, s in enumerate(seqs):
            alone = model(s[None, :-1])[0]  # (n, V)
            torch.testing.assert_close(logits[i][real[i]], alone)
        # the mask matters: without it, left padding shifts and shows the pads
        if side == "left":
            assert not torch.allclose(model(split.x["input_ids"])[real], logits[real])


def test_gpt_refuses_a_mask_or_positions_of_another_shape():
    model = _gpt(16, 1)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ShapeMismatchError, match=r"attention_mask has shape \(2, 4\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ShapeMismatchError, match=r"position_ids have shape \(2, 4\)"):
        model(ids, position_ids=torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------- every method
def _options(name: str) -> dict:
    if name == "fmkt":
        return {"tap": "blocks.0", "teacher_tap": "blocks.1"}
    if get_method(name).uses_feature_taps:
        return {"student_taps": ["blocks.0"], "teacher_taps": ["blocks.1"]}
    return {}


def _batch(side: str, n: int = 4) -> tuple[Any, Any, torch.Tensor]:
    """``(inputs, the same inputs with other tokens at the pads, targets)``: a left-padded
    dict batch with its attention mask, or right-padded token ids (no mask)."""
    split = padded_sequences(_sequences(n), side=side)
    ids, y = split.x["input_ids"], split.y
    moved = torch.where(split.x["attention_mask"] == 0, (ids + 5) % VOCAB, ids)
    if side == "right":
        return ids, moved, y
    return split.x, dict(split.x, input_ids=moved), y


def _jolt(d: nn.Module) -> None:
    """Move every parameter a little: zero-initialised output layers would hide what their
    inputs see."""
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _same_terms(d: nn.Module, x: Any, other: Any, y: torch.Tensor) -> dict:
    """The terms on ``x`` and on ``other`` (the same random draws) are equal; those on
    ``x`` are returned."""
    torch.manual_seed(0)
    a = d(x, y)
    torch.manual_seed(0)
    b = d(other, y)
    for term in a:
        torch.testing.assert_close(a[term], b[term], msg=f"{term} (training={d.training})")
    return a


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_sees_the_real_tokens_only(name, side):
    """Padded token batches, left-padded with an attention mask or right-padded ids: a
    method that says it masks padding gives terms that no token at a padded position can
    change (on the left the pads come before every real token, so anything that let them
    through would move the terms: attention, a running context, a pooled statistic, an
    unmasked loss); any other refuses the padded targets with a ConfigError naming the
    methods that take them, and methods defined on whole samples refuse token logits."""
    teacher, student = _pair()
    x, other, y = _batch(side)
    if name in SAMPLE_LEVEL:
        with pytest.raises(ShapeMismatchError, match="per-sample"):
            make_distiller(name, teacher, student, example_input=x, **_options(name))
        return
    d = make_distiller(name, teacher, student, example_input=x, **_options(name))
    d.on_fit_start(4)
    d.on_epoch_start(2, 4)  # mid-schedule: ramps are partial
    d.batch_index = torch.arange(4)
    if not d.masks_padding:
        with pytest.raises(ConfigError, match=rf"method '{name}' would count padded positions"):
            d(x, y)
        return
    _jolt(d)
    state = copy.deepcopy(d.state_dict())
    for training in (False, True):  # running statistics, then the batch's
        d.load_state_dict(state)  # the running statistics a training call updated, undone
        d.train(training)
        a = _same_terms(d, x, other, y)
        # the oracle that the test can fail: the pads seen (no mask) or counted (no -100)
        d.load_state_dict(state)
        torch.manual_seed(0)
        seen = d(other["input_ids"], y) if side == "left" else d(other, torch.where(
            y == -100, other.roll(-1, 1), y))  # fmt: skip
        assert not torch.allclose(seen["loss"], a["loss"])


@pytest.mark.parametrize("name", ["fmkt", "fmkt_theta", "ofmkt"])
def test_fm_kt_with_a_learned_head_on_hidden_states_sees_the_real_tokens_only(name):
    """head_tap: the flow (a causal transformer) on the hidden states, a head per token."""
    teacher, student = _pair()
    x, other, y = _batch("left")
    d = make_distiller(name, None if name == "ofmkt" else teacher, student, example_input=x,
                       head_tap="blocks.0", encoder="transformer")  # fmt: skip
    _jolt(d)
    d.eval()
    _same_terms(d, x, other, y)
    real = input_mask(x)
    torch.testing.assert_close(d.predict(x)[real], d.predict(other)[real])
    assert d.predict(x).shape == (4, 11, VOCAB)


@pytest.mark.parametrize("name", ["student", "kd", "reverse_kl", "skew_kl", "taid"])
def test_token_losses_are_the_same_whichever_side_is_padded(name):
    """The per-token losses on the real tokens do not depend on where the padding is; the
    cross-entropy term is the mean over every real token of each sequence run alone."""
    teacher, student = _pair()
    seqs = _sequences(5)
    left, right = (padded_sequences(seqs, side=s) for s in ("left", "right"))
    d = make_distiller(name, teacher, student).eval()
    a, b = d(left.x, left.y), d(right.x, right.y)
    assert a.keys() == b.keys()
    for term in a:
        torch.testing.assert_close(a[term], b[term], msg=term)
    if not d.ce_weight:  # (a method with no cross-entropy term by default)
        return
    with torch.no_grad():
        nll = torch.cat([F.cross_entropy(student(s[None, :-1])[0], s[1:], reduction="none")
                         for s in seqs])  # fmt: skip
    torch.testing.assert_close(a["ce"] / d.ce_weight, nll.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_flowdistill_pooled_context_leaves_padding_out(side):
    """The pooled context averages the real tokens only: on a padded batch every real token
    of a sequence holds the context of that sequence cut to its real tokens."""
    teacher, student = _pair()
    seqs = _sequences(3)
    split = padded_sequences(seqs, side=side)
    d = make_distiller(
        "flowdistill", teacher, student, example_input=split.x, context="pooled",
        student_taps=["blocks.0"], teacher_taps=["blocks.1"],
    ).eval()  # fmt: skip
    real = input_mask(split.x)
    tokens, row = d._context(d.student_forward(split.x), real, documents=True)
    for i, s in enumerate(seqs):
        alone = d._context(d.student_forward(s[None, :-1]))  # (1, cond): one per sequence
        got = tokens[i][real[i] > 0]
        assert len(got) == len(s) - 1
        torch.testing.assert_close(got, alone.expand_as(got), rtol=1e-5, atol=1e-6)
        assert not tokens[i][real[i] == 0].any()  # the pads' own: zero, never read
        torch.testing.assert_close(row[i], alone[0], rtol=1e-5, atol=1e-6)
    # right-padded ids, the padding known from the targets only: one context per row
    if side == "right":
        ids = split.x["input_ids"]
        pooled = d._context(d.student_forward(ids), d.real_tokens(ids, split.y))
        torch.testing.assert_close(pooled, row, rtol=1e-5, atol=1e-6)


def test_flowdistill_pooled_context_keeps_the_documents_of_a_packed_row_apart():
    """Rows packing two documents: each token's pooled context is that of its own document
    alone (its real tokens, earlier and later), never the mean over the row."""
    from flowdistill.data import packed_sequences

    teacher, student = _pair()
    g = torch.Generator().manual_seed(5)
    docs = [1 + torch.randint(0, 12, (n,), generator=g) for n in (5, 7, 6, 6)]
    split = packed_sequences(docs, length=10)
    assert [_spans(split.x, row) for row in range(2)] == [[(0, 4), (4, 10)], [(0, 5), (5, 10)]]
    d = make_distiller(
        "flowdistill", teacher, student, example_input=split.x, context="pooled",
        student_taps=["blocks.0"], teacher_taps=["blocks.1"],
    ).eval()  # fmt: skip
    s_out = d.student_forward(split.x)
    context, _ = d._context(s_out, d.real_tokens(split.x, split.y), documents=True)
    for row in range(2):
        for (a, b), doc in zip(_spans(split.x, row), docs[2 * row : 2 * row + 2], strict=True):
            alone = d._context(d.student_forward(doc[None, :-1]))
            torch.testing.assert_close(
                context[row, a:b], alone.expand(b - a, -1), rtol=1e-5, atol=1e-6
            )
    # the oracle that the test can fail: pooled over the whole row, the documents mix
    row_mean = d._context(s_out)
    assert not torch.allclose(row_mean[0], context[0, 0], atol=1e-4)


# ---------------------------------------------------------------------------- the engine
def _splits(side: str) -> Splits:
    parts = [padded_sequences(_sequences(n, seed), side=side, length=12)
             for n, seed in ((24, 1), (8, 2), (8, 3))]  # fmt: skip
    return Splits(*parts, num_classes=VOCAB)


def test_evaluate_counts_the_real_tokens_of_each_sequence():
    torch.manual_seed(0)
    model = _gpt(16, 1).eval()
    d = make_distiller("student", None, model)
    seqs = _sequences(7, seed=4)
    acc, loss = evaluate(d, padded_sequences(seqs, side="left"), batch_size=3)
    with torch.no_grad():
        logits = [model(s[None, :-1])[0] for s in seqs]
    hits = sum(int((z.argmax(-1) == s[1:]).sum()) for z, s in zip(logits, seqs, strict=True))
    nll = sum(float(F.cross_entropy(z, s[1:], reduction="sum"))
              for z, s in zip(logits, seqs, strict=True))  # fmt: skip
    tokens = sum(len(s) - 1 for s in seqs)
    assert acc == pytest.approx(hits / tokens)
    assert loss == pytest.approx(nll / tokens, rel=1e-5)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", ["kd", "flowdistill"])
def test_fit_trains_on_left_padded_sequences_and_resumes_exactly(method, tmp_path):
    """An interrupted run resumed from its checkpoint ends where the whole run ends."""
    data = _splits("left")
    optim, options = OptimConfig("adamw", lr=3e-3), {}
    if method == "flowdistill":
        options = {"student_taps": ["blocks.0"], "teacher_taps": ["blocks.1"]}
    train = TrainConfig(epochs=3, progress=False, amp=False, seed=3)

    def run(out, resume=False, stop_at=None):
        teacher, student = _pair()
        d = make_distiller(method, teacher, student, example_input=take(data.train.x,
                           slice(0, 4)), **options)  # fmt: skip
        if stop_at is not None:
            start = d.on_epoch_start

            def stop(epoch, epochs):
                if epoch == stop_at:
                    raise _Interrupted
                start(epoch, epochs)

            d.on_epoch_start = stop
        result = fit(d, data, optim, train, out_dir=out, resume=resume, batch_size=8)
        return d, result

    whole, result = run(tmp_path / "whole")
    assert result.epochs == 3 and all(
        torch.isfinite(torch.tensor(v)) for r in result.history for v in r.values()
    )
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    with pytest.raises(_Interrupted):
        run(tmp_path / "cut", stop_at=2)
    resumed, again = run(tmp_path / "cut", resume=True)
    assert [r["val_loss"] for r in again.history] == [r["val_loss"] for r in result.history]
    for (k, v), w in zip(whole.trainable_state_dict().items(),
                         resumed.trainable_state_dict().values(), strict=True):  # fmt: skip
        torch.testing.assert_close(v, w, msg=k)


def test_fit_names_a_dict_of_inputs_it_cannot_take(tmp_path):
    data = _splits("left")
    teacher, student = _pair()
    train = TrainConfig(epochs=1, progress=False, amp=False)

    class IdsOnly(nn.Module):  # takes no attention mask
        def __init__(self) -> None:
            super().__init__()
            self.inner = _gpt(16, 1)

        def forward(self, input_ids):
            return self.inner(input_ids)

    with pytest.raises(
        DataError,
        match=r"student cannot run on data.train's inputs "
        r"\(input_ids: torch.int64, per-sample shape \(12,\), attention_mask",
    ):
        fit(make_distiller("kd", teacher, IdsOnly()), data, train=train)  # fmt: skip
    bad = Split({**data.val.x, "attention_mask": data.val.x["attention_mask"][:3]}, data.val.y)
    with pytest.raises(DataError, match=r"data.val.x: .* lengths differ"):
        fit(make_distiller("kd", teacher, student), Splits(data.train, bad, data.test, VOCAB),
            train=train)  # fmt: skip
    floats = {**data.train.x, "scale": torch.full((24, 1), float("nan"))}
    with pytest.raises(DataError, match=r"data.train inputs\['scale'\] hold 24 non-finite"):
        fit(
            make_distiller("kd", teacher, student),
            Splits(Split(floats, data.train.y), data.val, data.test, VOCAB),
            train=train,
        )
    with pytest.raises(ConfigError, match="augment_padding crops and flips images"):
        fit(
            make_distiller("kd", teacher, student),
            data,
            train=TrainConfig(epochs=1, progress=False, amp=False, augment_padding=2),
        )
    wide = {**data.train.x, "input_ids": data.train.x["input_ids"] + VOCAB}
    with pytest.raises(DataError, match=r"data.train inputs hold token ids from \d+ to \d+"):
        fit(
            make_distiller("kd", teacher, student),
            Splits(Split(wide, data.train.y), data.val, data.test, VOCAB),
            train=train,
        )


def test_a_top_k_cache_of_a_dict_of_inputs_is_tied_to_its_mask(tmp_path):
    from flowdistill.distillers.cached import TopKCache, build_topk_cache

    teacher, _ = _pair()
    split = padded_sequences(_sequences(5), side="left")
    path = tmp_path / "cache"
    cache = build_topk_cache(teacher.eval(), split.x, k=3, batch_size=2, dtype="float32",
                             path=path)  # fmt: skip
    with torch.no_grad():
        top = teacher(**split.x).topk(3, dim=-1)
    assert torch.equal(cache.indices.long(), top.indices)
    torch.testing.assert_close(cache.values, top.values)
    assert TopKCache.load(path, teacher=teacher, inputs=split.x).k == 3
    other = dict(split.x, attention_mask=torch.ones_like(split.x["attention_mask"]))
    with pytest.raises(DataError, match="other inputs"):
        TopKCache.load(path, inputs=other)


# ---------------------------------------------------------------------------- more paths
def test_a_student_with_fm_kt_inserted_leaves_padding_out_when_called_directly():
    """FM-KT's serial flow is part of the deployed student: called on its own with a padded
    batch (not through the distiller), its attention still skips the pads."""
    teacher, student = _pair()
    x, other, _ = _batch("left")
    d = make_distiller("fmkt", teacher, student, example_input=x, tap="blocks.0",
                       teacher_tap="blocks.1", encoder="transformer")  # fmt: skip
    _jolt(d.flow)
    d.eval()
    real = input_mask(x)
    with torch.no_grad():
        direct, moved = student(**x), student(**other)
        torch.testing.assert_close(direct[real], moved[real])
        torch.testing.assert_close(direct[real], d.predict(x)[real])
        assert not torch.allclose(student(x["input_ids"])[real], direct[real])


class _SequenceClassifier(nn.Module):
    """A GPT body, its logits pooled over the real tokens, a linear layer to 3 classes."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.lm = _gpt(width, layers)
        self.fc = nn.Linear(VOCAB, 3)

    def forward(self, input_ids, attention_mask):
        z = self.lm(input_ids, attention_mask=attention_mask)  # (B, T, V)
        m = attention_mask[..., None].to(z.dtype)
        return self.fc((z * m).sum(1) / m.sum(1))  # (B, 3)


@pytest.mark.parametrize("name", ["fitnet", "pkd", "flowdistill", "fmkt"])
def test_class_labels_on_padded_sequences_leave_the_pads_out_of_token_features(name):
    """A sequence classifier (class labels, padded dict inputs): the per-token feature
    terms count the real tokens only."""
    torch.manual_seed(0)
    teacher, student = _SequenceClassifier(32, 2), _SequenceClassifier(16, 1)
    x, other, _ = _batch("left")
    options = {"student_taps": ["lm.blocks.0"], "teacher_taps": ["lm.blocks.1"]}
    if name == "fmkt":
        options = {"tap": "lm.blocks.0", "teacher_tap": "lm.blocks.1", "encoder": "transformer"}
    d = make_distiller(name, teacher, student, example_input=x, **options)
    _jolt(d)
    d.eval()
    _same_terms(d, x, other, torch.tensor([0, 1, 2, 1]))


@pytest.mark.parametrize("name", ["fmkt", "fmkt_theta", "ofmkt"])
def test_a_non_causal_fm_kt_flow_on_right_padded_ids_skips_the_padded_targets(name):
    """Tensor ids carry no attention mask: a flow that attends both ways (causal=False)
    takes the padding from the targets (-100)."""
    teacher, student = _pair()
    x, other, y = _batch("right")
    d = make_distiller(name, None if name == "ofmkt" else teacher, student, example_input=x,
                       causal=False, encoder="transformer", head_tap="blocks.0")  # fmt: skip
    _jolt(d)
    d.eval()
    _same_terms(d, x, other, y)


def test_a_failed_build_names_each_input_s_shape():
    teacher = _gpt(32, 2)
    small = GPT(GPTConfig(5, 16, n_layer=1, n_head=2, n_embd=16))  # ids beyond its vocabulary
    x, _, _ = _batch("left")
    with pytest.raises(ConfigError, match=r"example_input of shape \{'input_ids': \(4, 11\), "
                       r"'attention_mask': \(4, 11\)\}"):  # fmt: skip
        make_distiller("fitnet", teacher, small, example_input=x,
                       student_taps=["blocks.0"], teacher_taps=["blocks.1"])  # fmt: skip


def test_line_splits_keep_each_document_whole_in_one_split():
    """One document per line: blank lines skipped, a long line cut into pieces of
    block_size + 1 characters overlapping by one (every character after a line's first is a
    target once), every piece of a document in the same split, and every character of every
    piece found again among the real tokens."""
    from flowdistill.data import line_splits

    docs = [f"{i:02d} doc " + "abcdefghij"[: i % 7 + 1] * (1 + i % 3) for i in range(20)]
    text = "\r\n\n".join(docs[:10]) + "\n" + "\n".join(docs[10:])  # (line ends of all kinds)
    data, tok = line_splits(text, block_size=8, val_fraction=0.2, test_fraction=0.2, seed=3)
    seen = {}
    for name in ("train", "val", "test"):
        part = getattr(data, name)
        ids, mask, y = part.x["input_ids"], part.x["attention_mask"].bool(), part.y
        assert ids.shape[1] == 8 and ((y == -100) == ~mask).all()
        for row in range(len(y)):  # each piece: its inputs then its last target
            chars = tok.decode(ids[row][mask[row]]) + tok.decode(y[row][mask[row]][-1:])
            seen.setdefault(name, []).append(chars)
    pieces = {d: [d[i : i + 9] for i in range(0, len(d) - 1, 8)] for d in docs}
    for d, own in pieces.items():  # the targets: every character but the first, once each
        assert "".join(p[1:] for p in own) == d[1:]
    for doc, own in pieces.items():  # its first piece (unique: it holds its number) says
        (home,) = [n for n, found in seen.items() if own[0] in found]  # where it went
        assert all(p in seen[home] for p in own), doc
    assert sorted(sum(seen.values(), [])) == sorted(sum(pieces.values(), []))
    assert [len(seen[n]) > 0 for n in ("train", "val", "test")] == [True] * 3
    with pytest.raises(DataError, match="each split needs one"):
        line_splits("one line\nanother", 8)
    # a one-character line predicts nothing: it is left out before the documents are split
    data, _ = line_splits("abcdef\nghijk\nlmnop\nx\nqrstu\nvwxyz", 8, 0.2, 0.2, seed=0)
    assert [len(p.y) for p in (data.train, data.val, data.test)] == [3, 1, 1]
    # only line ends end a document (a form feed or a line separator inside one does not)
    data, _ = line_splits("one\u2028two\x0cthree\nfour\nfive six\nseven", 32, 0.25, 0.25)
    real = sum(int(p.x["attention_mask"].sum()) for p in (data.train, data.val, data.test))
    assert real == sum(len(d) - 1 for d in ["one\u2028two\x0cthree", "four", "five six", "seven"])


def test_without_a_mask_only_trailing_padding_is_padding():
    """Token ids and targets alone: the run of -100 at the end of a row is padding; a -100
    before a counted target (a prompt left out of the loss) is a real token."""
    from flowdistill.distillers.base import Distiller

    y = torch.tensor([[-100, -100, 3, 4, -100, -100], [5, -100, 6, 7, 8, 9]])
    real = Distiller.real_tokens(torch.zeros(2, 6, dtype=torch.long), y)
    assert real.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    x, _, _ = _batch("left")
    assert torch.equal(Distiller.real_tokens(x, y), x["attention_mask"].bool())
    assert Distiller.real_tokens(torch.zeros(2, 6), torch.tensor([1, 2])) is None


# ---------------------------------------------------------------------------- packed rows
def _spans(x: dict, row: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each document of a packed row: its positions restart at 0."""
    real = int(x["attention_mask"][row].sum())
    starts = [i for i in range(real) if x["position_ids"][row, i] == 0] + [real]
    return list(zip(starts[:-1], starts[1:], strict=True))


def test_packed_rows_hold_each_document_with_positions_restarting():
    from flowdistill.data import packed_sequences

    seqs = _sequences(7, seed=5, low=3, high=6)
    split = packed_sequences(seqs, length=10)
    x, y = split.x, split.y
    found = []
    for row in range(len(y)):
        for a, b in _spans(x, row):  # inputs s[:-1], then the last target: s again
            found.append(x["input_ids"][row, a:b].tolist() + [int(y[row, b - 1])])
            assert y[row, a : b - 1].tolist() == x["input_ids"][row, a + 1 : b].tolist()
        assert (y[row][x["attention_mask"][row] == 0] == -100).all()
    assert found == [s.tolist() for s in seqs]
    with pytest.raises(DataError, match="sequence 0 has 12 tokens"):
        packed_sequences([torch.arange(12)], length=10)


def test_gpt_on_packed_rows_gives_each_document_its_own_logits():
    """The oracle: each document run alone."""
    from flowdistill.data import packed_sequences

    torch.manual_seed(0)
    model = _gpt(32, 2, torch.float64).eval()
    seqs = _sequences(6, seed=2, low=3, high=7)
    split = packed_sequences(seqs, length=14)
    with torch.no_grad():
        logits = model(**split.x)
        got = [logits[row, a:b] for row in range(len(split.y)) for a, b in _spans(split.x, row)]
        for z, s in zip(got, seqs, strict=True):
            torch.testing.assert_close(z, model(s[None, :-1])[0])


def _packed_pair_batch():
    """Four rows, each packing a document of 4 inputs and one of 6; the first's targets
    -100 (not counted); and the same rows with other tokens in the first document."""
    from flowdistill.data import packed_sequences

    g = torch.Generator().manual_seed(4)
    starts = torch.randint(0, 12, (4, 2), generator=g).tolist()
    docs = [1 + (torch.tensor(a) + k * torch.arange(n)) % 12
            for a, b in starts for a, k, n in ((a, 1, 5), (b, 2, 7))]  # fmt: skip
    split = packed_sequences(docs, length=10)
    x, y = split.x, split.y.clone()
    assert [_spans(x, row) for row in range(4)] == [[(0, 4), (4, 10)]] * 4
    y[:, :4] = -100
    moved = x["input_ids"].clone()
    moved[:, :4] = (moved[:, :4] + 5) % VOCAB
    return x, dict(x, input_ids=moved), y


@pytest.mark.parametrize("name", [n for n in ALL_METHODS if n not in SAMPLE_LEVEL
                                  and get_method(n).masks_padding])  # fmt: skip
def test_every_method_keeps_the_documents_of_a_packed_row_apart(name):
    """A row packs two documents; the first is not counted (targets -100). No term may
    move when the first document's tokens change: the second document sees nothing of it
    (the model's attention, FlowDistill's running context, the attention fields)."""
    teacher, student = _pair()
    x, other, y = _packed_pair_batch()
    d = make_distiller(name, teacher, student, example_input=x, **_options(name))
    d.batch_index = torch.arange(4)
    _keeps_documents_apart(d, x, other, y)


def _keeps_documents_apart(d: nn.Module, x: dict, other: dict, y: torch.Tensor) -> None:
    """``d``'s terms on packed rows ``x`` equal those on ``other`` (the first documents
    changed), in either mode, mid-schedule; read as one document per row, they move."""
    d.on_fit_start(4)
    d.on_epoch_start(2, 4)
    _jolt(d)
    state = copy.deepcopy(d.state_dict())
    for training in (False, True):
        d.load_state_dict(state)
        d.train(training)
        a = _same_terms(d, x, other, y)
        # the oracle that the test can fail: as one document per row, the second sees the first
        d.load_state_dict(state)
        torch.manual_seed(0)
        mixed = {k: v for k, v in other.items() if k != "position_ids"}
        assert not torch.allclose(d(mixed, y)["loss"], a["loss"])


@pytest.mark.parametrize("field", ["pointwise", "spatial"])
def test_flowdistill_with_a_pooled_context_keeps_packed_documents_apart(field):
    """``context="pooled"`` on packed rows: no term moves when the first, uncounted document
    of each row changes (the pooled context and the attention field stay in each document)."""
    teacher, student = _pair()
    x, other, y = _packed_pair_batch()
    d = make_distiller(
        "flowdistill", teacher, student, example_input=x, context="pooled", field=field,
        student_taps=["blocks.0"], teacher_taps=["blocks.1"],
    )  # fmt: skip
    _keeps_documents_apart(d, x, other, y)
