"""Flow distillation end to end: data, training, resume, failures, the bench suites."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from flowdistill.bench import compact_table, get_suite, markdown_table, run_bench
from flowdistill.bench.runner import _hash
from flowdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from flowdistill.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
)
from flowdistill.flows.layers import ActNorm
from flowdistill.nf import (
    FlowDistiller,
    FlowKDConfig,
    FlowTrainConfig,
    ImageData,
    MultiScaleFlow,
    digits_images,
    evaluate_bpd,
    fit_flow,
    mnist_test_images,
)
from flowdistill.nf.bench import NF_METHODS, NFSuite, nf_method_config, run_nf_bench
from flowdistill.nf.model import dequantize


@pytest.fixture
def tiny_images() -> ImageData:
    """Stripes on 1x4x4 images with 5 levels: a learnable, clearly non-uniform density."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> torch.Tensor:
        rows = torch.randint(0, 4, (n,), generator=g)
        x = torch.randint(0, 2, (n, 1, 4, 4), generator=g)
        x[torch.arange(n), 0, rows] = 4
        return x.to(torch.uint8)

    return ImageData(make(128), make(64), make(64), n_bins=5)


def _flow(data: ImageData, steps: int = 2, hidden: int = 8) -> MultiScaleFlow:
    return MultiScaleFlow(data.image_shape, levels=2, steps=steps, hidden=hidden)


FAST = FlowTrainConfig(epochs=2, lr=3e-3, batch_size=32, warmup_steps=2, progress=False)


def test_training_lowers_validation_bits_per_dim(tiny_images):
    torch.manual_seed(0)
    model = _flow(tiny_images)
    model.encode(torch.rand(64, 1, 4, 4))  # initialise ActNorm as training would
    before = evaluate_bpd(model, tiny_images.val, 5)
    torch.manual_seed(0)
    model = _flow(tiny_images)
    train = FlowTrainConfig(**{**FAST.__dict__, "epochs": 4})
    result = fit_flow(FlowDistiller(model, n_bins=5), tiny_images, train)
    assert result.history[-1]["val_bpd"] < before - 0.1
    assert result.best_val_bpd == min(r["val_bpd"] for r in result.history)
    assert 1 <= result.best_val_epoch <= 4
    # uniform over the 5 levels is log2(5) bits/dim: a fitted model does better
    assert result.test_bpd_last < math.log2(5)


@pytest.mark.parametrize("method", sorted(NF_METHODS))
def test_every_method_trains_one_epoch(method, tiny_images, tmp_path):
    torch.manual_seed(0)
    teacher = _flow(tiny_images, steps=3, hidden=12)
    teacher.encode(torch.rand(64, 1, 4, 4))
    kd = FlowKDConfig(**NF_METHODS[method], synth_batch=8)
    student = _flow(tiny_images, steps=1, hidden=4)
    before = copy.deepcopy(student.state_dict())
    distiller = FlowDistiller(student, teacher, kd, n_bins=5)
    teacher_before = copy.deepcopy(teacher.state_dict())
    train = FlowTrainConfig(**{**FAST.__dict__, "epochs": 1})
    result = fit_flow(distiller, tiny_images, train, tmp_path / method)
    assert math.isfinite(result.test_bpd_last)
    terms = set(result.history[0]) - {"epoch", "lr", "val_bpd", "step_seconds"}
    weights = ("intermediate", "final", "synth")
    used = {f"train_{k}" for k in weights if NF_METHODS[method].get(k, 0) > 0}
    expected = {"train_nll", "train_loss"} | used
    assert terms == expected
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


class _Interrupted(Exception):
    pass


def test_resume_continues_exactly(tiny_images, tmp_path):
    class StopsInEpoch2(FlowDistiller):
        calls = 0

        def forward(self, y):
            StopsInEpoch2.calls += 1
            if StopsInEpoch2.calls == 6:  # 4 steps per epoch: mid epoch 2
                raise _Interrupted
            return super().forward(y)

    def run(out, cls=FlowDistiller, resume: bool = False) -> MultiScaleFlow:
        torch.manual_seed(0)
        model = _flow(tiny_images)
        train = FlowTrainConfig(**{**FAST.__dict__, "epochs": 3})
        fit_flow(cls(model, n_bins=5), tiny_images, train, out, resume=resume)
        return model

    straight = run(tmp_path / "straight")
    with pytest.raises(_Interrupted):
        run(tmp_path / "split", StopsInEpoch2)
    resumed = run(tmp_path / "split", resume=True)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    history = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="already holds a run"):
        run(tmp_path / "split")


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tiny_images, tmp_path):
    class Poisoned(FlowDistiller):
        calls = 0

        def forward(self, y):
            Poisoned.calls += 1
            terms = super().forward(y)
            if Poisoned.calls > 4:  # during epoch 2 (4 steps per epoch)
                terms["loss"] = terms["loss"] * float("nan")
            return terms

    train = FlowTrainConfig(**{**FAST.__dict__, "epochs": 3})
    with pytest.raises(NonFiniteLossError, match="epoch 2.*last good checkpoint"):
        fit_flow(Poisoned(_flow(tiny_images), n_bins=5), tiny_images, train, tmp_path)
    _, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["epoch"] == 0  # epoch 1 finished and saved


def test_bad_configurations_are_refused(tiny_images):
    with pytest.raises(ConfigError, match="kd.final"):
        FlowKDConfig(final=-1.0).validate()
    with pytest.raises(ConfigError, match="synth_target"):
        FlowKDConfig(synth_target="pixels").validate()
    with pytest.raises(ConfigError, match="need a teacher"):
        FlowDistiller(_flow(tiny_images), None, FlowKDConfig(final=1.0))
    with pytest.raises(ConfigError, match="epochs"):
        FlowTrainConfig(epochs=0).validate()
    with pytest.raises(ConfigError, match="intensity levels"):
        fit_flow(FlowDistiller(_flow(tiny_images), n_bins=256), tiny_images, FAST)
    with pytest.raises(DataError, match="not below n_bins"):
        ImageData(*(torch.full((2, 1, 4, 4), 9, dtype=torch.uint8),) * 3, n_bins=5)
    with pytest.raises(DataError, match="uint8"):
        ImageData(*(torch.zeros(2, 1, 4, 4),) * 3, n_bins=5)


def test_bad_images_are_refused_before_they_spoil_the_flow(tiny_images):
    """Integer pixels (not dequantised) and values outside [0, 1] are named; ActNorm does
    not initialise from a non-finite batch, so the flow still works on valid data after."""
    flow = _flow(tiny_images)
    raw = tiny_images.train[:4]
    with pytest.raises(DataError, match="dequantised images.*uint8"):
        flow.bits_per_dim(raw, n_bins=5)
    with pytest.raises(DataError, match=r"in \[0, 1\], got values from 0 to 4"):
        flow.log_prob(raw.float())
    bad = dequantize(raw, 5)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="in \\[0, 1\\]"):
        flow.log_prob(bad)
    assert not any(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))
    with pytest.raises(ValueError, match="non-finite"):
        ActNorm(3)(torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]]))
    assert torch.isfinite(flow.log_prob(dequantize(tiny_images.train[:16], 5))).all()
    empty = tiny_images.val[:0]
    with pytest.raises(DataError, match=r"ImageData.val is empty \(no epoch could be chosen\)"):
        ImageData(tiny_images.train, empty, tiny_images.test, n_bins=5)
    with pytest.raises(DataError, match="n_bins must be an integer >= 2"):
        ImageData(tiny_images.train, tiny_images.val, tiny_images.test, n_bins=0)
    with pytest.raises(DataError, match="no images"):
        evaluate_bpd(flow, empty, 5)


def test_digits_images_are_integer_levels():
    data = digits_images()
    assert data.n_bins == 17 and data.image_shape == (1, 8, 8)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert int(data.train.max()) == 16


def test_mnist_test_images(shared_file):
    folder = shared_file("mnist", "t10k-images-idx3-ubyte.gz").parent
    data = mnist_test_images(folder, pad_to=32)
    assert data.n_bins == 256 and data.image_shape == (1, 32, 32)
    sizes = (len(data.train), len(data.val), len(data.test))
    assert sum(sizes) == 10000
    assert all(abs(a - b) <= 5 for a, b in zip(sizes, (8000, 1000, 1000), strict=True))
    assert int(data.train[:, :, :2].max()) == 0  # the padding


def test_mnist_reader_names_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        mnist_test_images(tmp_path)


def test_unknown_method_is_named():
    suite = get_suite("nf-digits")
    with pytest.raises(ConfigError, match="did you mean 'final_kd'"):
        nf_method_config(suite, "finl_kd")


def test_bench_runs_a_tiny_suite_and_reuses_runs(tiny_images, tmp_path):
    suite = NFSuite(
        name="nf-tiny",
        description="stripes",
        load_data=lambda: tiny_images,
        teacher={"levels": 2, "steps": 3, "hidden": 12},
        student={"levels": 2, "steps": 1, "hidden": 4},
        teacher_train=FlowTrainConfig(**{**FAST.__dict__, "epochs": 3}),
        train=FAST,
        method_options={"synth_kd": {"synth_batch": 8}},
    )
    logs: list[str] = []
    kw = dict(seeds=2, out=tmp_path / "out", progress=False, cache=tmp_path / "cache")
    results = run_nf_bench(suite, ["final_kd", "synth_kd"], log=logs.append, **kw)
    assert results["kind"] == "nf" and results["higher_is_better"] is False
    summary = results["summary"]
    assert list(summary) == ["teacher", "student", "final_kd", "synth_kd"]
    assert summary["student"]["n"] == 2 and summary["teacher"]["n"] == 1
    for row in summary.values():
        assert math.isfinite(row["mean"]) and row["samples_per_second"] > 0
    assert summary["teacher"]["params"] > summary["student"]["params"]
    runs = [r["metric"] for r in results["runs"] if r["method"] == "final_kd"]
    alone = [r["metric"] for r in results["runs"] if r["method"] == "student"]
    assert summary["final_kd"]["mean"] == pytest.approx(sum(runs) / 2)
    diffs = [a - b for a, b in zip(runs, alone, strict=True)]
    assert summary["final_kd"]["paired_delta"] == pytest.approx(sum(diffs) / 2)
    assert summary["final_kd"]["paired_delta_std"] == pytest.approx(
        abs(diffs[0] - diffs[1]) / 2**0.5
    )
    assert summary["student"]["paired_delta"] == 0
    for name in ("results.json", "results.md", "val_curves.png", "samples.png"):
        assert (tmp_path / "out" / name).is_file(), name
    table = compact_table(results)
    assert table.splitlines()[0].startswith("| method | bits/dim")
    assert len(table.splitlines()) == 2 + 4
    assert "samples/s" in markdown_table(results)
    assert results["provenance"]["config"]["method_options"]["synth_kd"]["synth_batch"] == 8
    logs.clear()
    again = run_nf_bench(suite, ["final_kd", "synth_kd"], log=logs.append, **kw)
    assert sum("reusing" in line for line in logs) == 1 + 3 * 2  # teacher + every run
    assert again["runs"] == results["runs"]
    # a run saved before keys held the teacher's weights is the same run
    record_file = tmp_path / "out" / "runs" / "final_kd" / "seed0" / "result.json"
    record = json.loads(record_file.read_text())
    del record["key"]["teacher_weights"]
    record["key_hash"] = _hash(record["key"])
    record_file.write_text(json.dumps(record))
    assert run_nf_bench(suite, ["final_kd"], log=logs.append, **kw)["runs"] == [
        r for r in results["runs"] if r["method"] in ("student", "final_kd")
    ]
    # other teacher weights at the teacher's path: its runs are not reused as this one's
    path = Path(results["teacher"]["checkpoint"])
    tensors, meta = load_checkpoint(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    save_checkpoint(path, {**tensors, name: tensors[name] + 0.01}, meta)
    with pytest.raises(ConfigError, match=r"another configuration \(teacher_weights differ\)"):
        run_nf_bench(suite, ["final_kd"], log=logs.append, **kw)


def test_bench_cli_dispatches_flow_suites(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWDISTILL_DATA", str(tmp_path))  # no MNIST there
    with pytest.raises(DataError, match="nf-mnist suite reads"):
        run_bench("nf-mnist", out=tmp_path / "x", progress=False)


def test_linear_anneal_scales_the_distillation_terms(tiny_images):
    torch.manual_seed(0)
    teacher = _flow(tiny_images, steps=3, hidden=12)
    kd = FlowKDConfig(intermediate=0.5, final=0.25, anneal="linear")
    distiller = FlowDistiller(_flow(tiny_images), teacher, kd, n_bins=5)
    y = torch.rand(8, 1, 4, 4)
    for progress in (0.0, 0.25, 1.0):
        distiller.progress = progress
        terms = distiller(y)
        weighted = 0.5 * terms["intermediate"] + 0.25 * terms["final"]
        expected = terms["nll"] + (1 - progress) * weighted
        assert torch.allclose(terms["loss"], expected)
    with pytest.raises(ConfigError, match="anneal"):
        FlowKDConfig(anneal="cosine").validate()


def test_resume_continues_only_the_run_that_wrote_the_checkpoint(tiny_images, tmp_path):
    def run(kd=None, epochs=2, steps=2, resume=False):
        torch.manual_seed(0)
        teacher = _flow(tiny_images)
        distiller = FlowDistiller(_flow(tiny_images, steps=steps), teacher, kd=kd, n_bins=5)
        train = FlowTrainConfig(**{**FAST.__dict__, "epochs": epochs})
        return fit_flow(distiller, tiny_images, train, tmp_path / "r", resume=resume)

    run(FlowKDConfig(final=1.0))
    with pytest.raises(CheckpointError, match="distillation terms .* cannot resume as"):
        run(FlowKDConfig(synth=1.0, synth_batch=8), epochs=3, resume=True)
    with pytest.raises(ConfigError, match="2 epochs done; epochs=1"):
        run(FlowKDConfig(final=1.0), epochs=1, resume=True)
    with pytest.raises(CheckpointError, match="does not fit this student flow"):
        run(FlowKDConfig(final=1.0), epochs=3, steps=3, resume=True)
    (tmp_path / "r" / "last.safetensors").unlink()
    with pytest.raises(CheckpointError, match="finished run \\(result.json\\) without its"):
        run(FlowKDConfig(final=1.0), epochs=3, resume=True)


def _tiny_suite(tiny_images):
    return NFSuite(
        name="nf-tiny", description="stripes", load_data=lambda: tiny_images,
        teacher={"levels": 2, "steps": 2, "hidden": 8},
        student={"levels": 2, "steps": 1, "hidden": 4},
        teacher_train=FlowTrainConfig(**{**FAST.__dict__, "epochs": 3}), train=FAST,
    )  # fmt: skip


def test_bench_teacher_epochs_shorten_the_teacher_cached_apart(tiny_images, tmp_path):
    suite = _tiny_suite(tiny_images)
    kw = dict(seeds=1, progress=False, cache=tmp_path / "cache", log=lambda *_: None)
    short = run_nf_bench(suite, ["final_kd"], out=tmp_path / "a", teacher_epochs=1, **kw)
    assert short["provenance"]["config"]["teacher_train"]["epochs"] == 1
    assert len(list((tmp_path / "cache").iterdir())) == 1
    full = run_nf_bench(suite, ["final_kd"], out=tmp_path / "b", **kw)
    assert full["provenance"]["config"]["teacher_train"]["epochs"] == 3
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the shortened one kept apart
    with pytest.raises(ConfigError, match="--teacher-epochs must be >= 1"):
        run_nf_bench(suite, ["final_kd"], out=tmp_path / "c", teacher_epochs=0, **kw)


def test_bench_gap_closed_needs_a_teacher_below_the_student(tiny_images, tmp_path, teacher_scoring):
    """In bits/dim (lower is better): a teacher reported above the student alone leaves
    gap closed undefined for every row, the teacher's too; one at 0 bits/dim gives
    (method − student) ÷ (0 − student)."""
    from flowdistill.nf import bench

    reported = teacher_scoring(bench)
    suite, logs = _tiny_suite(tiny_images), []
    kw = dict(seeds=1, progress=False, cache=tmp_path / "cache", log=logs.append)
    reported["metric"] = 1e6
    results = run_nf_bench(suite, ["final_kd"], out=tmp_path / "a", **kw)
    assert [row["gap_closed"] for row in results["summary"].values()] == [None] * 3
    assert any("gap closed is not defined" in line for line in logs)
    assert compact_table(results).count("| n/a |") == 3
    reported["metric"] = 0.0
    s = run_nf_bench(suite, ["final_kd"], out=tmp_path / "b", **kw)["summary"]
    assert s["teacher"]["gap_closed"] == 1.0 and s["student"]["gap_closed"] == 0.0
    student, method = s["student"]["mean"], s["final_kd"]["mean"]
    assert s["final_kd"]["gap_closed"] == pytest.approx((method - student) / (0.0 - student))


def test_bench_a_failing_run_does_not_stop_the_others(tiny_images, tmp_path, monkeypatch):
    from flowdistill.errors import FlowdistillError, NonFiniteLossError
    from flowdistill.nf import bench

    real = bench.fit_flow

    def diverging(distiller, data, train, out, **kw):
        if "final_kd" in str(out):
            raise NonFiniteLossError("the loss became non-finite")
        return real(distiller, data, train, out, **kw)

    monkeypatch.setattr(bench, "fit_flow", diverging)
    with pytest.raises(FlowdistillError, match=r"1 of 3 runs failed .*final_kd seed 0"):
        run_nf_bench(_tiny_suite(tiny_images), ["final_kd", "synth_kd"], seeds=1,
                     out=tmp_path / "o", progress=False, cache=tmp_path / "cache",
                     log=lambda *_: None)  # fmt: skip
    assert (tmp_path / "o" / "runs" / "synth_kd" / "seed0" / "result.json").exists()
    assert not (tmp_path / "o" / "results.json").exists()
