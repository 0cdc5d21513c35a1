import json
import math

import pytest
import torch

import flowdistill
from flowdistill.config import OptimConfig, TrainConfig
from flowdistill.distillers.base import Distiller
from flowdistill.engine import fit, lr_factor
from flowdistill.engine.checkpoint import load_checkpoint
from flowdistill.errors import CheckpointError, NonFiniteLossError
from flowdistill.models.small import SmallCNN

QUIET = {"progress": False}


def _student(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, 4, (4, 4, 8))


class _Interrupted(Exception):
    pass


class _KDStoppingAt(flowdistill.get_method("kd")):
    """KD that is interrupted (like a killed job) when an epoch given in the test begins."""

    stop_at: int | None = None

    def on_epoch_start(self, epoch, epochs):
        if epoch == self.stop_at:
            raise _Interrupted


def _kd(pair, stop_at=None):
    teacher, _, _ = pair
    student = _student()
    student.stage2.append(torch.nn.Dropout(0.2))  # exercises the RNG state on resume
    d = _KDStoppingAt(teacher, student)
    d.stop_at = stop_at
    return d


def test_resume_continues_exactly(tmp_path, pair, tiny_data):
    optim = OptimConfig(lr=0.05, warmup_epochs=1)
    full = fit(
        _kd(pair),
        tiny_data,
        optim,
        TrainConfig(epochs=3, **QUIET),
        tmp_path / "full",
        batch_size=16,
    )
    part = tmp_path / "part"
    with pytest.raises(_Interrupted):
        fit(
            _kd(pair, stop_at=2),
            tiny_data,
            optim,
            TrainConfig(epochs=3, **QUIET),
            part,
            batch_size=16,
        )
    assert load_checkpoint(part / "last.safetensors")[1]["epoch"] == 1
    resumed = fit(
        _kd(pair),
        tiny_data,
        optim,
        TrainConfig(epochs=3, **QUIET),
        part,
        resume=True,
        batch_size=16,
    )
    a, _ = load_checkpoint(tmp_path / "full" / "model.safetensors")
    b, _ = load_checkpoint(part / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["val_acc"] for r in full.history] == [r["val_acc"] for r in resumed.history]
    assert full.test_acc_last == resumed.test_acc_last


def test_run_reports_and_files(tmp_path, pair, tiny_data):
    result = fit(
        _kd(pair),
        tiny_data,
        OptimConfig(lr=0.05),
        TrainConfig(epochs=4, **QUIET),
        tmp_path,
        batch_size=16,
    )
    vals = [r["val_acc"] for r in result.history]
    assert result.best_val_acc == max(vals)
    assert result.best_val_epoch == vals.index(max(vals)) + 1  # first epoch reaching the best
    for name in (
        "last.safetensors",
        "best.safetensors",
        "model.safetensors",
        "metrics.csv",
        "metrics.json",
        "result.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "result.json").read_text())["epochs"] == 4
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "train_kd", "train_ce", "val_acc", "samples_per_second"} <= set(
        header
    )
    # the test accuracy at the best-validation epoch is that of the saved best weights
    best, _ = load_checkpoint(tmp_path / "best.safetensors")
    d = _kd(pair)
    d.load_state_dict(best, strict=False)
    acc, _ = flowdistill.evaluate(d, tiny_data.test)
    assert acc == pytest.approx(result.test_acc_best_val)


def test_student_alone_learns(tiny_data):
    d = flowdistill.make_distiller("student", None, _student())
    result = fit(d, tiny_data, OptimConfig(lr=0.05), TrainConfig(epochs=6, **QUIET), batch_size=16)
    assert result.test_acc_last > 0.8  # the problem is separable; chance is 0.25


def test_existing_run_is_never_overwritten(tmp_path, pair, tiny_data):
    fit(_kd(pair), tiny_data, train=TrainConfig(epochs=1, **QUIET), out_dir=tmp_path, batch_size=16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match="already holds a run"):
        fit(
            _kd(pair),
            tiny_data,
            train=TrainConfig(epochs=1, **QUIET),
            out_dir=tmp_path,
            batch_size=16,
        )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


class _NaNAtEpoch(Distiller):
    """Cross-entropy, then NaN from the second epoch on (for the test only)."""

    uses_teacher = False

    def on_epoch_start(self, epoch, epochs):
        self.epoch = epoch

    def forward(self, inputs, targets):
        ce = self.cross_entropy(self.student_forward(inputs)["logits"], targets)
        return self.total({"ce": ce * (math.nan if self.epoch >= 1 else 1.0)})


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data):
    d = _NaNAtEpoch(None, _student())
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1.*last good checkpoint"):
        fit(d, tiny_data, train=TrainConfig(epochs=3, **QUIET), out_dir=tmp_path, batch_size=16)
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["epoch"] == 0
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model/"))
    assert not (tmp_path / "result.json").exists()


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, schedule="cosine", warmup_epochs=1)
    assert lr_factor(cos, 0, 10, 5) == pytest.approx(0.1)
    assert lr_factor(cos, 9, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cos, 30, 10, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    step = OptimConfig(schedule="step", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(step, s * 10, 10, 5) for s in range(5)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    assert lr_factor(OptimConfig(schedule="constant"), 33, 10, 5) == 1.0


def test_adamw_and_deterministic_mode(tiny_data):
    runs = []
    for _ in range(2):
        d = flowdistill.make_distiller("student", None, _student())
        optim = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.01)
        runs.append(
            fit(
                d,
                tiny_data,
                optim,
                TrainConfig(epochs=2, deterministic=True, **QUIET),
                batch_size=16,
            )
        )
    torch.use_deterministic_algorithms(False)
    assert runs[0].history == [
        {
            **r,
            "step_seconds": runs[0].history[i]["step_seconds"],
            "samples_per_second": runs[0].history[i]["samples_per_second"],
        }
        for i, r in enumerate(runs[1].history)
    ]


def test_augmentation_crops_and_flips_training_batches_only(tiny_data):
    from flowdistill.data import Batches
    from flowdistill.errors import ConfigError

    seen = []
    student = _student()
    student.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None
    )
    d = flowdistill.make_distiller("student", None, student)
    train = TrainConfig(epochs=1, augment_padding=2, **QUIET)
    fit(d, tiny_data, OptimConfig(lr=0.01), train, batch_size=32)
    batches = list(Batches(tiny_data.train, 32, shuffle=True, seed=0))
    assert len(seen) == len(batches)
    changed = 0
    for got, (x, _) in zip(seen, batches, strict=True):
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
        for n in range(len(x)):  # each image is a 8×8 window of its padded self, maybe flipped
            windows = [padded[n, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
            assert any(torch.equal(got[n], w) or torch.equal(got[n], w.flip(-1)) for w in windows)
            changed += not torch.equal(got[n], x[n])
    assert changed > len(tiny_data.train) // 2
    with pytest.raises(ConfigError, match="augment_padding must be >= 0"):
        TrainConfig(augment_padding=-1).validate()
    flat = flowdistill.make_distiller(
        "student", None, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    )
    flat_data = type(tiny_data)(
        *(type(s)(s.x.flatten(1), s.y) for s in (tiny_data.train, tiny_data.val, tiny_data.test)),
        num_classes=4,
    )
    with pytest.raises(ConfigError, match="crops and flips images"):
        fit(flat, flat_data, OptimConfig(lr=0.01), train, batch_size=32)
