"""The causal-LM path: character data, token targets in the engine, masked distillers,
flow methods on hidden states."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from flowdistill import OptimConfig, TrainConfig, fit, losses, make_distiller
from flowdistill.data import CharTokenizer, Split, char_splits, read_chars, token_windows
from flowdistill.distillers.ofmkt import smoothed_cross_entropy
from flowdistill.distillers.registry import REGISTRY, VARIANTS, get_method
from flowdistill.engine import evaluate
from flowdistill.errors import ConfigError, DataError, ShapeMismatchError
from flowdistill.losses import forward_kl, reverse_kl, skew_reverse_kl
from flowdistill.models.gpt import GPT, GPTConfig

ALL_METHODS = sorted(REGISTRY) + sorted(VARIANTS)
TEXT = ("the quick brown fox jumps over the lazy dog. " * 40).strip()


def _gpt(width: int, layers: int = 2, vocab: int = 29, block: int = 16) -> GPT:
    return GPT(GPTConfig(vocab, block, n_layer=layers, n_head=2, n_embd=width))


@pytest.fixture
def lm():
    data, tok = char_splits(TEXT, block_size=16)
    torch.manual_seed(0)
    return data, tok, _gpt(32, vocab=tok.vocab_size), _gpt(16, 1, vocab=tok.vocab_size)


@pytest.fixture(scope="module")
def trained_teacher():
    """A teacher fitted to the text for a few epochs (it must know something to teach)."""
    data, tok = char_splits(TEXT, block_size=16)
    torch.manual_seed(0)
    teacher = _gpt(32, vocab=tok.vocab_size)
    train = TrainConfig(epochs=4, progress=False, amp=False)
    fit(make_distiller("student", None, teacher), data, OptimConfig("adamw", lr=3e-3), train,
        batch_size=8)  # fmt: skip
    return teacher.eval()


def test_char_tokenizer_round_trip_and_errors(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path / "vocab.json")
    assert CharTokenizer.load(tmp_path / "vocab.json").vocab == tok.vocab
    with pytest.raises(DataError, match="'Z' is not in the vocabulary"):
        tok.encode("Zebra")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not a saved CharTokenizer"):
        CharTokenizer.load(tmp_path / "bad.json")


def test_token_windows_are_shifted_pairs():
    ids = torch.arange(50)
    split = token_windows(ids, 8)
    assert split.x.shape == split.y.shape == (6, 8)  # (50 - 1) // 8 windows
    assert torch.equal(split.y, split.x + 1)
    assert torch.equal(split.x[1], torch.arange(8, 16))
    with pytest.raises(DataError, match="too few"):
        token_windows(torch.arange(5), 8)


def test_char_splits_hold_out_the_last_tenth(lm):
    data, tok, _, _ = lm
    cut = int(len(TEXT) * 0.9)
    assert tok.decode(data.train.x[0]) == TEXT[:16]
    assert tok.decode(data.val.x[0]) == TEXT[cut : cut + 16]
    assert data.test is data.val and data.num_classes == tok.vocab_size


def test_char_splits_hold_back_a_selection_split():
    data, tok = char_splits(TEXT, block_size=16, select_fraction=0.2)
    cut = int(len(TEXT) * 0.9)
    fit_end = int(cut * 0.8)
    assert tok.decode(data.train.x[0]) == TEXT[:16]
    assert tok.decode(data.val.x[0]) == TEXT[fit_end : fit_end + 16]  # end of the training text
    assert tok.decode(data.test.x[0]) == TEXT[cut : cut + 16]  # the held-out tenth
    assert len(data.train) == (fit_end - 1) // 16  # every training window ends before it
    with pytest.raises(DataError, match="select_fraction"):
        char_splits(TEXT, block_size=16, select_fraction=1.0)
    # a split too short for one window is named, with what to change
    n = len(TEXT)
    with pytest.raises(DataError, match=rf"the selection split .* of a {n:,}-character text: "
                       r"\d+ tokens are too few for one window of .*lower block_size"):  # fmt: skip
        char_splits(TEXT, block_size=int(len(TEXT) * 0.9 * 0.01) + 8, select_fraction=0.01)
    with pytest.raises(DataError, match=r"the held-out split \(the last 0.1\)"):
        char_splits(TEXT, block_size=int(len(TEXT) * 0.1) + 1)


def test_tiny_shakespeare(shared_file):
    ids, vocab = read_chars(shared_file("tinyshakespeare", "input.txt"))
    text = "".join(vocab[i] for i in ids[:2000])
    data, tok = char_splits(text, block_size=64, tokenizer=CharTokenizer(vocab))
    assert tok.vocab_size == 65 and data.train.x.shape[1] == 64


def test_evaluate_counts_tokens_and_skips_padding(lm):
    data, _, _, student = lm
    y = data.val.y.clone()
    y[:, :5] = -100  # padding
    split = Split(data.val.x, y)
    distiller = make_distiller("student", None, student)
    acc, loss = evaluate(distiller, split)
    with torch.no_grad():
        logits = student(data.val.x).double()
    keep = y != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    assert loss == pytest.approx(nll[keep].mean().item(), rel=1e-5)
    hits = (logits.argmax(-1) == y) & keep
    assert acc == pytest.approx(hits.sum().item() / keep.sum().item())


@pytest.mark.parametrize("method", ["student", "kd", "reverse_kl", "skew_kl", "taid"])
def test_lm_methods_train_and_select_by_validation_loss(method, lm, trained_teacher, tmp_path):
    data, _, _, student = lm
    teacher = trained_teacher if method != "student" else None
    distiller = make_distiller(method, teacher, student)
    train = TrainConfig(epochs=3, progress=False, select_by="val_loss", amp=False)
    optim = OptimConfig(name="adamw", lr=3e-3)
    result = fit(distiller, data, optim, train, tmp_path, batch_size=8)
    losses = [r["val_loss"] for r in result.history]
    assert result.best_val_epoch == 1 + losses.index(min(losses))
    assert result.best_val_loss == min(losses)
    assert losses[-1] < math.log(data.num_classes)  # better than uniform
    assert math.isfinite(result.test_loss_last) and math.isfinite(result.test_loss_best_val)


@pytest.mark.parametrize(
    "method,loss", [("kd", forward_kl), ("reverse_kl", reverse_kl), ("skew_kl", skew_reverse_kl)]
)
def test_masked_distillers_leave_padding_out(method, loss, lm):
    data, _, teacher, student = lm
    x, y = data.train.x[:4], data.train.y[:4].clone()
    y[:, 10:] = -100
    options = {"ce_weight": 0.0, "kd_weight": 1.0}
    if method == "kd":
        options["temperature"] = 2.0
    distiller = make_distiller(method, teacher, student, **options)
    got = distiller(x, y)[method]
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    temperature = options.get("temperature", 1.0)
    expected = loss(s[:, :10], t[:, :10], temperature=temperature)  # the counted tokens alone
    assert torch.allclose(got, expected, atol=1e-6)


def test_taid_leaves_padding_out(lm):
    data, _, teacher, student = lm
    x, y = data.train.x[:4], data.train.y[:4].clone()
    y[:, 12:] = -100
    distiller = make_distiller("taid", teacher, student).eval()  # eval: t is not updated
    from flowdistill.losses import taid

    got = distiller(x, y)["taid"]
    with torch.no_grad():
        t = teacher(x)
    expected = taid(student(x)[:, :12], t[:, :12], 0.4)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["flowdistill", "fmkt", "fitnet"])
def test_feature_methods_on_hidden_states(method, lm):
    data, _, teacher, student = lm  # widths 32 (teacher) and 16 (student)
    x, y = data.train.x[:4], data.train.y[:4]
    taps = (
        {"tap": "blocks.0", "teacher_tap": "blocks.1"}  # FM-KT takes one feature pair
        if method == "fmkt"
        else {"student_taps": ["blocks.0"], "teacher_taps": ["blocks.1"]}
    )
    distiller = make_distiller(method, teacher, student, example_input=x, **taps)
    assert distiller.student_shapes["blocks.0"] == (16, 16)
    assert distiller.teacher_shapes["blocks.1"] == (16, 32)
    terms = distiller(x, y)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert distiller.predict(x).shape == (4, 16, data.num_classes)


def _transported(distiller, x):
    """Every pair's transport of ``x`` through a perturbed flow, and the context."""
    with torch.no_grad():
        t_out, s_out = distiller.teacher_forward(x), distiller.student_forward(x)
        context = distiller._context(s_out)
        moved = [distiller._transport(key, a, 1.0, 2, context, True)
                 for key, _, a, _ in distiller._endpoints(s_out, t_out)]  # fmt: skip
    return moved, context, s_out


@pytest.mark.parametrize("context", ["auto", "pooled"])
def test_flowdistill_context_is_causal_on_token_logits(context, lm):
    data, _, teacher, student = lm
    x = data.train.x[:3]
    d = make_distiller(
        "flowdistill", teacher, student, example_input=x, context=context,
        student_taps=["blocks.0"], teacher_taps=["blocks.1"],
    )  # fmt: skip
    d.eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking flow: every parameter moved
        for p in d.velocities.parameters():
            p.add_(0.3 * torch.randn_like(p))
    later = x.clone()
    later[:, 10:] = (later[:, 10:] + 1) % data.num_classes  # change tokens 10..15 only
    (m1, c1, s1), (m2, _, _) = _transported(d, x), _transported(d, later)
    probs = torch.softmax(s1["logits"].double() / d.temperature, dim=-1)
    if context == "auto":  # causal: position i holds the mean over positions <= i
        tokens, row = c1  # (and the row's mean, for pairs that are not tokens)
        assert tokens.shape == (3, 16, row.shape[-1]) and row.shape == (3, row.shape[-1])
        for i in (0, 7, 15):
            expected = probs[:, : i + 1].mean(dim=1)
            assert torch.allclose(tokens[:, i, -data.num_classes :].double(), expected, atol=1e-6)
        assert torch.allclose(row[:, -data.num_classes :].double(), probs.mean(1), atol=1e-6)
        for a, b in zip(m1, m2, strict=True):
            assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # no later token leaks
            assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4
    else:  # pooled over the whole sequence: earlier positions see the later tokens
        assert c1.shape == (3, c1.shape[-1])
        assert torch.allclose(c1[:, -data.num_classes :].double(), probs.mean(dim=1), atol=1e-6)
        assert all((a[:, :10] - b[:, :10]).abs().max() > 1e-4 for a, b in zip(m1, m2, strict=True))


def test_flowdistill_causal_context_needs_token_logits():
    from flowdistill.errors import ConfigError

    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="context='causal' needs per-token logits"):
        make_distiller("flowdistill", teacher, student, example_input=torch.randn(2, 4),
                       context="causal")  # fmt: skip
    with pytest.raises(ConfigError, match="context must be"):
        make_distiller("flowdistill", teacher, student, example_input=torch.randn(2, 4),
                       context="future")  # fmt: skip


def test_cross_entropy_ignores_padding(lm):
    data, _, _, student = lm
    y = data.train.y[:2].clone()
    y[0] = -100
    d = make_distiller("student", None, student)
    logits = student(data.train.x[:2])
    assert torch.allclose(d.cross_entropy(logits, y), F.cross_entropy(logits[1], y[1]))


def test_tied_weights_checkpoint_round_trip(tmp_path):
    from flowdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = _gpt(16)
    save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), {})
    tensors, _ = load_checkpoint(tmp_path / "m.safetensors")
    fresh = _gpt(16)
    fresh.load_state_dict(tensors)
    assert fresh.head.weight is fresh.tok_emb.weight  # still tied after loading
    x = torch.randint(0, 29, (2, 8))
    assert torch.equal(model(x), fresh(x))


def test_shakespeare_char_bench_on_a_small_corpus(tmp_path, monkeypatch, small_corpus):
    from flowdistill.bench import compact_table, get_suite, run_bench

    small_corpus(60)
    suite = get_suite("shakespeare-char")
    monkeypatch.setattr(suite, "teacher_epochs", 1)
    results = run_bench(
        "shakespeare-char", ["kd", "reverse_kl"], seeds=1, epochs=1, out=tmp_path / "out",
        progress=False, cache=tmp_path / "cache", log=lambda *_: None,
    )  # fmt: skip
    assert results["unit"] == "bits/char" and results["higher_is_better"] is False
    summary = results["summary"]
    assert set(summary) == {"student", "kd", "reverse_kl"}
    for row in summary.values():
        assert 0 < row["mean"] < math.log2(20) and 0 < row["best_val_mean"] < math.log2(20)
    # the metric is the held-out cross-entropy in bits, at the last epoch and at the epoch
    # chosen on the selection split (held back from the training text)
    run = tmp_path / "out" / "runs" / "kd" / "seed0"
    result = __import__("json").loads((run / "result.json").read_text())
    assert summary["kd"]["mean"] == pytest.approx(result["test_loss_last"] / math.log(2))
    assert summary["kd"]["best_val_mean"] == pytest.approx(
        result["test_loss_best_val"] / math.log(2)
    )
    data = suite.load_data()
    assert data.val is not data.test and len(data.val) > 0
    assert set(results["samples"]) == {"teacher", "student", "kd", "reverse_kl"}
    assert all(text.startswith("To be, or not to be") for text in results["samples"].values())
    table = compact_table(results)
    assert f"{summary['kd']['best_val_mean']:.4f}" in table
    assert "**teacher**" in (tmp_path / "out" / "results.md").read_text()


# ---------------------------------------------------------------------------- teacher cache
def test_topk_cache_round_trip_and_checks(lm, trained_teacher, tmp_path):
    from flowdistill.distillers.cached import TopKCache, build_topk_cache
    from flowdistill.errors import CheckpointError

    data = lm[0]
    x = data.train.x
    cache = build_topk_cache(trained_teacher, x, k=5, dtype="float16", path=tmp_path / "c")
    with torch.no_grad():
        top = trained_teacher(x).topk(5, dim=-1)
    assert torch.equal(cache.indices.long(), top.indices)
    assert torch.allclose(cache.values.float(), top.values, atol=1e-2)  # float16 storage
    loaded = TopKCache.load(tmp_path / "c", teacher=trained_teacher, inputs=x)
    assert torch.equal(loaded.values, cache.values) and loaded.k == 5
    other = _gpt(32, vocab=data.num_classes)
    with pytest.raises(CheckpointError, match="another teacher"):
        TopKCache.load(tmp_path / "c", teacher=other)
    with pytest.raises(DataError, match="other inputs"):
        TopKCache.load(tmp_path / "c", inputs=x.flip(0))


def test_sparse_kd_with_the_whole_vocabulary_is_the_forward_kl(lm):
    from flowdistill.distillers.cached import sparse_kd

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g)
    top = t.topk(9, dim=-1)
    mask = torch.rand(3, 4, generator=g) > 0.3
    got = sparse_kd(s, top.values, top.indices, temperature=2.0, mask=mask)
    assert torch.allclose(got, forward_kl(s, t, mask, temperature=2.0), atol=1e-6)


def test_cached_kd_trains_without_the_teacher(lm, trained_teacher, tmp_path):
    from flowdistill.distillers.cached import CachedKD, build_topk_cache

    data, _, _, student = lm
    cache = build_topk_cache(trained_teacher, data.train.x, k=8)
    distiller = CachedKD(cache, student)
    assert distiller.teacher is None
    train = TrainConfig(epochs=2, progress=False, select_by="val_loss", amp=False)
    result = fit(distiller, data, OptimConfig("adamw", lr=3e-3), train, batch_size=8)
    assert result.history[-1]["val_loss"] < math.log(data.num_classes)
    wrong = Split(data.train.x[:10], data.train.y[:10])
    from flowdistill.data import Splits

    with pytest.raises(DataError, match="made for other data"):
        fit(CachedKD(cache, student), Splits(wrong, data.val, data.test, data.num_classes),
            OptimConfig("adamw"), train)  # fmt: skip
    shuffled = Split(data.train.x.flip(0), data.train.y.flip(0))  # as many rows, other order
    with pytest.raises(DataError, match="made from other training inputs"):
        fit(CachedKD(cache, student), Splits(shuffled, data.val, data.test, data.num_classes),
            OptimConfig("adamw"), train)  # fmt: skip


@pytest.mark.parametrize("method", ["student", "kd", "taid", "reverse_kl"])
def test_a_batch_of_padding_alone_gives_a_finite_loss(method, lm):
    """Every target of the batch is padding: nothing counts, and the loss is 0, not NaN."""
    data, _, teacher, student = lm
    x = data.train.x[:2]
    d = make_distiller(method, teacher, student, example_input=x).train()
    terms = d(x, torch.full_like(data.train.y[:2], -100))
    loss = terms["loss"].detach()
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_budget_trains_on_a_fraction_and_keeps_runs_apart(tmp_path):
    from flowdistill.bench import run_bench
    from flowdistill.bench.runner import budgeted
    from flowdistill.errors import ConfigError

    data, _ = char_splits(TEXT, block_size=16)
    small = budgeted(data, 0.25)
    assert len(small.train) == round(0.25 * len(data.train))
    assert torch.equal(small.train.x, data.train.x[: len(small.train)])
    assert small.val is data.val and small.test is data.test
    with pytest.raises(ConfigError, match="budget"):
        budgeted(data, 1.5)
    kw = dict(seeds=1, epochs=1, progress=False, cache=tmp_path / "cache", log=lambda *_: None)
    quick = run_bench("digits", ["kd"], out=tmp_path / "quick", budget=0.3, **kw)
    assert quick["provenance"]["config"]["budget"] == 0.3
    teachers = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(teachers) == 1  # a teacher of its own, cached apart from full-budget ones


SPATIAL = {"field": "spatial", "inference": "flow", "student_taps": ["blocks.0"],
           "teacher_taps": ["blocks.1"]}  # fmt: skip


@pytest.mark.parametrize(
    "method,options,causal",
    [
        ("fmkt", {}, True),  # the default encoder on per-token logits: causal attention
        ("fmkt", {"encoder": "mlp"}, True),
        ("fmkt", {"encoder": "transformer"}, True),
        ("fmkt", {"tap": "blocks.0", "teacher_tap": "blocks.1"}, True),  # inserted flow
        ("ofmkt", {}, True),
        ("flowdistill", SPATIAL, True),  # attention over tokens, causal with the context
        ("fmkt", {"encoder": "transformer", "causal": False}, False),  # asked for
        ("flowdistill", {**SPATIAL, "context": "pooled"}, False),
    ],
)
def test_deployed_flow_modules_and_causality(method, options, causal, lm):
    """Modules that run at inference keep a causal language model causal: changing later
    tokens never changes earlier predictions, unless a non-causal flow is asked for (the
    oracle that the check can fail)."""
    data, _, teacher, student = lm
    x = data.train.x[:2]
    distiller = make_distiller(method, teacher, student, example_input=x, **options).eval()
    with torch.no_grad():
        for net in distiller.parameters():  # zero-initialised last layers: move them
            net.add_(0.05 * torch.randn_like(net))
        y = x.clone()
        y[:, 10:] = (y[:, 10:] + 1) % data.num_classes
        a, b = distiller.predict(x), distiller.predict(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5) == causal


def test_a_convolution_over_a_causal_sequence_is_refused(lm):
    data, _, teacher, student = lm
    with pytest.raises(ConfigError, match="encoder 'conv' mixes each token with the next"):
        make_distiller("fmkt", teacher, student, example_input=data.train.x[:2], encoder="conv")
    with pytest.raises(ConfigError, match="causal must be 'auto', true or false"):
        make_distiller("fmkt", teacher, student, example_input=data.train.x[:2], causal="yes")


def test_shakespeare_suite_uses_per_position_flow_fields():
    from flowdistill.bench import get_suite, method_config

    suite = get_suite("shakespeare-char")
    assert method_config(suite, "fmkt")["encoder"] == "mlp"
    assert method_config(suite, "flowdistill")["field"] == "pointwise"


@pytest.mark.parametrize("method", ["kd", "flowdistill"])
def test_shakespeare_suite_options_are_the_ones_chosen_on_validation(method):
    import json
    from pathlib import Path

    from flowdistill.bench import get_suite, method_config
    from flowdistill.distillers import method_options

    record = Path(__file__).parent.parent / "benchmarks" / "shakespeare-char"
    tuned = json.loads((record / f"tune_{method}.json").read_text())
    assert tuned["suite"] == "shakespeare-char" and "val_bpc" in tuned["metric"]
    best = min(tuned["points"], key=lambda p: p["score"])  # bits: lower is better
    assert tuned["chosen"] == best["options"]
    options = {**method_options(method), **method_config(get_suite("shakespeare-char"), method)}
    assert all(options[k] == v for k, v in tuned["chosen"].items())


def test_flowdistill_variants_take_the_suite_options_their_preset_leaves():
    from flowdistill.bench import get_suite, method_config

    suite = get_suite("shakespeare-char")
    nocond = method_config(suite, "flowdistill-nocond")
    assert nocond["logit_weight"] == 0.0 and nocond["field"] == "pointwise"
    spatial = method_config(suite, "flowdistill-spatial")
    assert "field" not in spatial and "hidden" not in spatial  # the preset's own choice
    assert spatial["temperature"] == 1.0 and spatial["student_taps"] == ["blocks.1"]
    assert "logit_weight" not in method_config(get_suite("digits"), "flowdistill-nocond")


def test_gpu_suite_pairs_the_usual_character_gpt_with_a_tenth_of_it():
    from flowdistill.bench import get_suite
    from flowdistill.models import build_model

    suite = get_suite("shakespeare-char-gpu")
    teacher = build_model("gpt", vocab_size=65, **suite.teacher.kwargs)
    student = build_model("gpt", vocab_size=65, **suite.student.kwargs)
    t = sum(p.numel() for p in teacher.parameters())
    s = sum(p.numel() for p in student.parameters())
    assert (teacher.config.n_layer, teacher.config.n_embd) == (6, 384)
    assert 8 < t / s < 14


def test_samples_come_from_each_method_s_deployed_model(lm, tmp_path):
    """FM-KT keeps its flow at inference: its sample is drawn through it, not from the
    student alone; a method that deploys the student alone samples the student."""
    import dataclasses

    from flowdistill.bench import get_suite
    from flowdistill.bench.runner import _lm_samples
    from flowdistill.config import ModelConfig
    from flowdistill.engine.checkpoint import save_checkpoint

    data, tok, teacher, student = lm
    spec = ModelConfig("gpt", kwargs={"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16})
    suite = dataclasses.replace(get_suite("shakespeare-char"), student=spec, decode=tok.decode)
    options = {"fmkt": {"encoder": "mlp"}, "kd": {}}
    trained = {}
    for method in options:
        torch.manual_seed(1)
        d = make_distiller(method, teacher, GPT(student.config), example_input=data.train.x[:2],
                           **options[method])  # fmt: skip
        with torch.no_grad():
            for p in d.trainable_parameters():  # move every weight, zero-initialised ones too
                p.add_(0.3 * torch.randn_like(p))
        save_checkpoint(tmp_path / "runs" / method / "seed0" / "model.safetensors",
                        d.trainable_state_dict(), {})  # fmt: skip
        trained[method] = d.eval()
    texts = _lm_samples(suite, data, teacher, ["kd", "fmkt"], tmp_path, options, 8, 12)

    def sample(predict):  # the oracle: the same stream, drawn by hand
        g, idx = torch.Generator().manual_seed(0), data.test.x[:1, :8].clone()
        for _ in range(12):
            probs = torch.softmax(predict(idx[:, -16:])[:, -1].float() / 0.8, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
        return tok.decode(idx[0].tolist())

    with torch.no_grad():
        assert texts["fmkt"] == sample(trained["fmkt"].predict)
        assert texts["fmkt"] != sample(trained["fmkt"].student)  # (the flow changes it)
        assert texts["kd"] == sample(trained["kd"].student)


@pytest.mark.parametrize(
    "options", [{}, {"anchor_weight": 1.0, "logit_weight": 1.0, "logit_loss": "dist"}]
)
def test_flowdistill_leaves_padding_out_of_every_term(options, lm):
    """Tokens at padded positions (target -100) change no term: the causal student and
    teacher see them only at those positions, which the terms leave out (evaluation mode:
    the standardisation's running statistics, not the batch's)."""
    data, _, teacher, student = lm
    x, y = data.train.x[:2].clone(), data.train.y[:2].clone()
    y[:, 10:] = -100
    d = make_distiller("flowdistill", teacher, student, example_input=x, context="causal",
                       student_taps=["blocks.0"], teacher_taps=["blocks.1"], **options)  # fmt: skip
    d.eval()
    other = x.clone()
    other[:, 10:] = (other[:, 10:] + 3) % data.num_classes
    torch.manual_seed(0)
    a = d(x, y)
    torch.manual_seed(0)
    b = d(other, y)
    assert set(a) == set(b) and {"kd", "fm", "feature"} <= set(a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    torch.manual_seed(0)
    unmasked = d(other, data.train.y[:2])  # oracle of the test: counted, they would differ
    assert not torch.allclose(unmasked["feature"], a["feature"])


# ---------------------------------------------------------------------------- padding
def _padded(shape=(3, 7), cut=4):
    keep = torch.ones(shape, dtype=torch.bool)
    keep[0, cut:] = False
    keep[2, :2] = False  # left padding too
    return keep


@pytest.mark.parametrize(
    "name,loss",
    [
        ("kd", lambda s, t, y, m: losses.kd(s, t, 2.0, m)),
        ("ls", lambda s, t, y, m: losses.ls(s, t, 2.0, m)),
        ("dist", lambda s, t, y, m: losses.dist(s, t, temperature=2.0, mask=m)),
        ("dkd", lambda s, t, y, m: losses.dkd(s, t, y, 1.0, 8.0, 4.0, m)),
        ("smoothed_ce", lambda s, t, y, m: smoothed_cross_entropy(s, y, 0.1, m)),
    ],
)
def test_masked_logit_losses_equal_the_loss_on_the_counted_positions(name, loss):
    """The oracle: the same function on the counted rows alone, as a plain (N, V) batch."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 11, dtype=torch.float64), torch.randn(3, 7, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (3, 7))
    keep = _padded()
    y_padded = torch.where(keep, y, -100)  # padded targets are -100: they must not be read
    got = loss(s, t, y_padded, keep)
    expected = loss(s[keep], t[keep], y[keep], None)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(loss(s, t, y, None), expected)  # counted, they would differ


@pytest.mark.parametrize("name", ["hint", "pkd"])
def test_masked_feature_losses_equal_the_loss_on_the_counted_positions(name):
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    keep = _padded()
    fn = getattr(losses, name)
    got = fn(s, t, mask=keep)
    expected = fn(s[keep], t[keep])  # (N, 5) vectors: pkd standardises over the batch
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(fn(s, t), expected)


def test_smoothed_cross_entropy_is_the_authors_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    soft = torch.full((6, 5), 0.1 / 4, dtype=torch.float64)
    soft[torch.arange(6), y] = 0.9
    expected = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(smoothed_cross_entropy(logits, y, 0.1), expected)


def test_a_mask_of_another_shape_is_refused():
    s = torch.randn(2, 4, 6)
    with pytest.raises(ShapeMismatchError, match=r"mask \(2, 3\)"):
        losses.kd(s, s, 1.0, torch.ones(2, 3, dtype=torch.bool))


#: methods defined on whole samples only (one logit vector per sample)
SAMPLE_LEVEL = {"nd", "ofa"}


@pytest.mark.parametrize("name", [n for n in ALL_METHODS if not get_method(n).masks_padding
                                  and n not in SAMPLE_LEVEL])  # fmt: skip
def test_fit_refuses_padded_targets_a_method_would_count(name, lm, tmp_path):
    data, _, teacher, student = lm
    y = data.train.y.clone()
    y[0, 12:] = -100
    train = Split(data.train.x, y)
    splits = type(data)(train, data.val, data.test, data.num_classes)
    options = {"student_taps": ["blocks.0"], "teacher_taps": ["blocks.1"]}
    d = make_distiller(name, teacher, student, example_input=data.train.x[:2], **options)
    with pytest.raises(ConfigError, match="would count padded positions") as info:
        fit(d, splits, OptimConfig("adamw"), TrainConfig(epochs=1, progress=False), tmp_path)
    assert "fitnet" in str(info.value)  # names the methods that take padding
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_flowdistill_standardises_teacher_tokens_over_the_counted_positions(lm):
    """In training, the teacher features' batch statistics (and the running ones) come from
    the counted positions alone: tokens at padded positions change no term and no statistic,
    and the running mean is the momentum update toward the counted positions' mean."""

    data, _, teacher, student = lm
    x, y = data.train.x[:3].clone(), data.train.y[:3].clone()
    y[:, 10:] = -100
    y[2, :4] = -100
    d = make_distiller("flowdistill", teacher, student, example_input=x, context="causal",
                       student_taps=["blocks.0"], teacher_taps=["blocks.1"])  # fmt: skip
    d.train()
    e = copy.deepcopy(d)
    other = x.clone()
    other[:, 10:] = (other[:, 10:] + 3) % data.num_classes
    torch.manual_seed(0)
    a = d(x, y)
    torch.manual_seed(0)
    b = e(other, y)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    norm_d, norm_e = d.norms["p0"].norm, e.norms["p0"].norm
    torch.testing.assert_close(norm_d.running_mean, norm_e.running_mean)
    torch.testing.assert_close(norm_d.running_var, norm_e.running_var)
    with torch.no_grad():  # the oracle: BatchNorm's update from the counted tokens alone
        t = d.teacher_forward(x)["blocks.1"][y != -100]  # (N, D)
    torch.testing.assert_close(norm_d.running_mean, 0.1 * t.mean(0))
    torch.testing.assert_close(norm_d.running_var, 0.9 + 0.1 * t.var(0), rtol=1e-4, atol=1e-5)


def _with(data, name, part):
    parts = {n: getattr(data, n) for n in ("train", "val", "test")}
    return type(data)(**{**parts, name: part}, num_classes=data.num_classes)


@pytest.mark.parametrize("name", ["val", "test"])
def test_targets_that_do_not_fit_a_held_out_split_are_refused_before_training(name, lm, tmp_path):
    """A held-out split whose targets are not one per token of its inputs is named before
    the first epoch, not after it in evaluation."""
    data, _, _, student = lm
    part = getattr(data, name)
    bad = _with(data, name, Split(part.x, part.y[:, :8]))
    d = make_distiller("student", None, student)
    with pytest.raises(ShapeMismatchError, match=rf"data.{name} has targets of per-sample "
                       r"shape \(8,\).*logits on its inputs .* shape \(16, "):  # fmt: skip
        fit(d, bad, OptimConfig("adamw"), TrainConfig(epochs=1, progress=False), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name,value", [("train", 5), ("test", -1)])
def test_token_ids_outside_the_vocabulary_are_named_before_training(name, value, lm, tmp_path):
    """Ids beyond the input embedding, anywhere in a split (here its last row, which the
    probe on the first inputs never reads): a DataError naming the split and the range, not
    an index error inside the embedding."""
    data, tok, teacher, student = lm
    part = getattr(data, name)
    x = part.x.clone()
    x[-1, 3] = tok.vocab_size + value if value > 0 else value
    d = make_distiller("kd", teacher, student)
    with pytest.raises(DataError, match=rf"data.{name} inputs hold token ids from "
                       rf"{min(0, value)} to .*vocabulary \[0, {tok.vocab_size}\)"):  # fmt: skip
        fit(d, _with(data, name, Split(x, part.y)), OptimConfig("adamw"),
            TrainConfig(epochs=1, progress=False), tmp_path)  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_a_teacher_with_non_finite_weights_is_named_before_training(lm, tmp_path):
    from flowdistill.errors import CheckpointError

    data, _, teacher, student = lm
    with torch.no_grad():
        teacher.blocks[1].mlp.fc.weight[0, 0] = float("nan")
    d = make_distiller("kd", teacher, student)
    with pytest.raises(CheckpointError, match=r"teacher's weights hold NaN.*blocks\.1\.mlp"):
        fit(d, data, OptimConfig("adamw"), TrainConfig(epochs=1, progress=False), tmp_path)


def test_the_top_k_cache_refuses_empty_inputs_and_non_finite_options(lm):
    from flowdistill.distillers.cached import CachedKD, build_topk_cache

    data, _, teacher, student = lm
    with pytest.raises(DataError, match="inputs are empty"):
        build_topk_cache(teacher, data.train.x[:0], k=4)
    for bad in ({"k": 2.5}, {"k": 0}, {"k": True}, {"k": 4, "batch_size": 0}):
        with pytest.raises(ConfigError, match=r"must be an integer >= 1, got"):
            build_topk_cache(teacher, data.train.x[:8], **bad)
    cache = build_topk_cache(teacher, data.train.x[:8], k=4)
    with pytest.raises(ConfigError, match="temperature must be positive, got nan"):
        CachedKD(cache, student, temperature=float("nan"))
    with torch.no_grad():
        teacher.head.weight[0, 0] = float("inf")
    with pytest.raises(DataError, match="teacher's logits for inputs 0 to 7 are not finite"):
        build_topk_cache(teacher, data.train.x[:8], k=4)


def test_flowdistill_gives_a_pair_that_is_not_tokens_the_row_context():
    """A per-token context is ``(per-token, per-row)``: token features of its length take
    the first, any other pair (a pooled vector, a map) the second, never a token's own."""
    from flowdistill.distillers.flowdistill import FlowDistill

    tokens, row = torch.randn(2, 5, 3), torch.randn(2, 3)
    assert FlowDistill._context_for(torch.zeros(2, 5, 7), (tokens, row)) is tokens
    assert FlowDistill._context_for(torch.zeros(2, 7), (tokens, row)) is row
    assert FlowDistill._context_for(torch.zeros(2, 4, 7), (tokens, row)) is row
    assert FlowDistill._context_for(torch.zeros(2, 7), row) is row
