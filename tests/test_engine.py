import json
import math
import warnings

import pytest
import torch

import flowdistill
from flowdistill.config import OptimConfig, TrainConfig
from flowdistill.data.datasets import Split, Splits
from flowdistill.distillers.base import Distiller
from flowdistill.engine import fit, lr_factor
from flowdistill.engine.checkpoint import load_checkpoint
from flowdistill.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    ShapeMismatchError,
)
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
    """Cross-entropy, then NaN from epoch ``nan_epoch`` on (the second; for the test only)."""

    uses_teacher = False
    nan_epoch = 1

    def on_epoch_start(self, epoch, epochs):
        self.epoch = epoch

    def forward(self, inputs, targets):
        ce = self.cross_entropy(self.student_forward(inputs)["logits"], targets)
        return self.total({"ce": ce * (math.nan if self.epoch >= self.nan_epoch else 1.0)})


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data):
    d = _NaNAtEpoch(None, _student())
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1.*last good checkpoint.*"
                       "Lower the learning rate"):  # fmt: skip
        fit(d, tiny_data, train=TrainConfig(epochs=3, **QUIET), out_dir=tmp_path, batch_size=16)
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["epoch"] == 0
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model/"))
    assert not (tmp_path / "result.json").exists()


class _NaNGradientAtEpoch(_NaNAtEpoch):
    """A finite loss whose gradient is NaN at the last step of epoch ``nan_epoch`` (6 steps
    of 16 samples): ``0 * sqrt(|w - w|)`` is 0, its derivative at 0 is ``0 * inf``."""

    def on_epoch_start(self, epoch, epochs):
        self.epoch, self.step = epoch, 0

    def forward(self, inputs, targets):
        ce = self.cross_entropy(self.student_forward(inputs)["logits"], targets)
        self.step += 1
        if self.epoch == self.nan_epoch and self.step == 6:
            w = next(self.student.parameters())
            ce = ce + 0.0 * (w - w.detach()).abs().sqrt().sum()
        return self.total({"ce": ce})


def test_weights_made_non_finite_by_a_finite_loss_are_never_saved(tmp_path, tiny_data):
    d = _NaNGradientAtEpoch(None, _student())
    with pytest.raises(NonFiniteLossError, match=r"weights became non-finite during epoch 2 "
                       r".*last good checkpoint \(epoch 1\)"):  # fmt: skip
        fit(d, tiny_data, train=TrainConfig(epochs=3, **QUIET), out_dir=tmp_path, batch_size=16)
    assert not all(torch.isfinite(p).all() for p in d.student.parameters())  # (it happened)
    for name in ("last.safetensors", "best.safetensors"):
        tensors, _ = load_checkpoint(tmp_path / name)
        assert all(torch.isfinite(v).all() for k, v in tensors.items() if "model" in k or
                   name == "best.safetensors"), name  # fmt: skip
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 1


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


def test_non_finite_loss_at_the_first_epoch_says_there_is_no_checkpoint(tmp_path, tiny_data):
    d = _NaNAtEpoch(None, _student())
    d.nan_epoch = 0
    with pytest.raises(NonFiniteLossError, match="no epoch had finished, so there is no") as info:
        fit(d, tiny_data, train=TrainConfig(epochs=2, **QUIET), out_dir=tmp_path, batch_size=16)
    # at the very first step no weight had moved: the message does not blame the rate
    assert "the learning rate is not the cause" in str(info.value)


# ---------------------------------------------------------------------------- fit's inputs
def _labels(data, y_train):
    return Splits(Split(data.train.x, y_train), data.val, data.test, data.num_classes)


def test_fit_refuses_what_it_cannot_train_on_with_a_named_error(pair, tiny_data):
    d = flowdistill.make_distiller("kd", pair[0], _student())
    loader = torch.utils.data.TensorDataset(tiny_data.train.x, tiny_data.train.y)
    with pytest.raises(DataError, match="data must be a flowdistill.data.Splits.*TensorDataset"):
        fit(d, loader, train=TrainConfig(epochs=1, **QUIET))
    with pytest.raises(ConfigError, match="expected a distiller.*SmallCNN"):
        fit(_student(), tiny_data, train=TrainConfig(epochs=1, **QUIET))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        fit(d, tiny_data, train=TrainConfig(epochs=1, **QUIET), batch_size=0)
    y = tiny_data.train.y.clone()
    with pytest.raises(DataError, match="data.train labels must be integer.*float32"):
        fit(d, _labels(tiny_data, y.float()), train=TrainConfig(epochs=1, **QUIET))
    y[5] = 4  # 4 classes: 0..3
    with pytest.raises(DataError, match=r"data.train labels run from 0 to 4.*\[0, 4\)"):
        fit(d, _labels(tiny_data, y), train=TrainConfig(epochs=1, **QUIET))
    with pytest.raises(DataError, match="data.train has 96 inputs but 95 labels"):
        fit(d, _labels(tiny_data, tiny_data.train.y[:95]), train=TrainConfig(epochs=1, **QUIET))
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'.*'train.epochs'"):
        fit(d, tiny_data, train={"epoch": 1})
    wide = flowdistill.make_distiller("kd", SmallCNN(1, 5, (8, 8, 16)), SmallCNN(1, 5, (4, 4, 8)),
                                      example_input=tiny_data.train.x[:2])  # fmt: skip
    with pytest.raises(ShapeMismatchError, match="predicts 5 classes .* data.num_classes is 4"):
        fit(wide, tiny_data, train=TrainConfig(epochs=1, **QUIET))
    # without example_input the class counts are read from one forward pass, for either model
    with pytest.raises(DataError, match=r"the student cannot run on data.train's inputs "
                       r"\(torch.float32"):  # fmt: skip
        fit(flowdistill.make_distiller("kd", pair[0], _student().double()), tiny_data,
            train=TrainConfig(epochs=1, **QUIET))  # fmt: skip
    cases = [(pair[0], SmallCNN(1, 3, (4, 4, 8)), "student"),
             (SmallCNN(1, 5, (8, 8, 16)), _student(), "teacher")]  # fmt: skip
    for teacher, student, side in cases:
        unprobed = flowdistill.make_distiller("kd", teacher, student)
        with pytest.raises(ShapeMismatchError, match=f"the {side} predicts (3|5) classes"):
            fit(unprobed, tiny_data, train=TrainConfig(epochs=1, **QUIET))


def test_fit_takes_int32_labels_and_config_dicts(pair, tiny_data):
    d = flowdistill.make_distiller("kd", pair[0], _student())
    data = _labels(tiny_data, tiny_data.train.y.to(torch.int32))
    result = fit(d, data, optim={"lr": 0.05}, train={"epochs": 1, "progress": False})
    assert result.epochs == 1 and math.isfinite(result.test_acc_last)


def test_a_nan_validation_loss_never_loses_the_run(tmp_path, pair, tiny_data):
    """select_by='val_loss' with a validation loss that is NaN at every epoch: the first
    epoch stands as the best-validation one, and the run's files are written."""

    class NaNInEvaluation(torch.nn.Module):  # finite inputs: the model's output is NaN
        def __init__(self):
            super().__init__()
            self.net = _student()

        def forward(self, x):
            out = self.net(x)
            return out if self.training else torch.full_like(out, float("nan"))

    d = flowdistill.make_distiller("kd", pair[0], NaNInEvaluation())
    train = TrainConfig(epochs=2, select_by="val_loss", **QUIET)
    result = fit(d, tiny_data, train=train, out_dir=tmp_path, batch_size=32)
    assert result.best_val_epoch == 1 and math.isnan(result.best_val_loss)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "result.json").exists()


def test_resume_refuses_another_method_architecture_or_fewer_epochs(tmp_path, pair, tiny_data):
    teacher = pair[0]
    fit(flowdistill.make_distiller("kd", teacher, _student()), tiny_data,
        train=TrainConfig(epochs=2, **QUIET), out_dir=tmp_path, batch_size=32)  # fmt: skip
    again = dict(out_dir=tmp_path, resume=True, batch_size=32)
    with pytest.raises(CheckpointError, match="a run of method 'kd'.*as 'dkd'"):
        fit(flowdistill.make_distiller("dkd", teacher, _student()), tiny_data,
            train=TrainConfig(epochs=3, **QUIET), **again)  # fmt: skip
    with pytest.raises(ConfigError, match="has 2 epochs done; train.epochs=1"):
        fit(flowdistill.make_distiller("kd", teacher, _student()), tiny_data,
            train=TrainConfig(epochs=1, **QUIET), **again)  # fmt: skip
    wider = SmallCNN(1, 4, (4, 4, 16))
    with pytest.raises(CheckpointError, match="does not fit this distiller"):
        fit(flowdistill.make_distiller("kd", teacher, wider), tiny_data,
            train=TrainConfig(epochs=3, **QUIET), **again)  # fmt: skip


def test_more_epochs_under_a_cosine_schedule_are_recorded_as_spliced(tmp_path, pair, tiny_data):
    """Resumed with more epochs, a cosine schedule is spliced (its rate had fallen toward
    0 for the planned length): a warning says so and result.json records where; a step
    schedule, whose milestones do not move, extends exactly and records nothing."""
    teacher = pair[0]
    for schedule, spliced in (("cosine", True), ("step", False)):
        out = tmp_path / schedule
        optim = OptimConfig(schedule=schedule, milestones=[1] if schedule == "step" else [])
        kw = dict(out_dir=out, batch_size=32)
        fit(flowdistill.make_distiller("kd", teacher, _student()), tiny_data, optim,
            TrainConfig(epochs=2, **QUIET), **kw)  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(flowdistill.make_distiller("kd", teacher, _student()), tiny_data, optim,
                TrainConfig(epochs=3, **QUIET), resume=True, **kw)  # fmt: skip
        said = [str(w.message) for w in caught if "spliced" in str(w.message)]
        record = json.loads((out / "result.json").read_text())
        if spliced:
            assert len(said) == 1 and "planned for 2 epochs" in said[0]
            assert record["schedule_extended"] == [
                {
                    "at_epoch": 2,
                    "from_epochs": 2,
                    "to_epochs": 3,
                    "spliced": ["the cosine learning rate"],
                }  # fmt: skip
            ]
        else:
            assert not said and "schedule_extended" not in record


def test_a_resume_inside_the_warm_up_is_not_called_spliced(tmp_path, pair, tiny_data):
    """Every step done still in the learning-rate warm-up, which both plans share: the
    resumed run is the longer run from the start (same weights) and nothing is said."""
    optim = OptimConfig(schedule="cosine", warmup_epochs=2)
    quiet = {**QUIET, "deterministic": True}
    out = tmp_path / "cut"
    with pytest.raises(_Interrupted):
        fit(_kd(pair, stop_at=1), tiny_data, optim, TrainConfig(epochs=3, **quiet), out,
            batch_size=32)  # fmt: skip
    resumed = _kd(pair)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(resumed, tiny_data, optim, TrainConfig(epochs=4, **quiet), out, resume=True,
            batch_size=32)  # fmt: skip
    assert not [w for w in caught if "spliced" in str(w.message)]
    assert "schedule_extended" not in json.loads((out / "result.json").read_text())
    fresh = _kd(pair)
    fit(fresh, tiny_data, optim, TrainConfig(epochs=4, **quiet), batch_size=32)
    for (k, v), w in zip(fresh.trainable_state_dict().items(),
                         resumed.trainable_state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(v, w), k


def test_resume_refuses_other_settings_and_names_them(tmp_path, pair, tiny_data):
    """Through the Python API too, a checkpoint resumes only under the optimizer, batch
    size, seed and method options it was trained with (each change named); the number of
    epochs and how the run executes (amp, progress) may change."""
    teacher = pair[0]
    first = dict(optim=OptimConfig(lr=0.05), train=TrainConfig(epochs=2, **QUIET),
                 batch_size=32, options={})  # fmt: skip
    changes = [
        ({"optim": OptimConfig(lr=0.05, momentum=0.0)}, r"optim\.momentum: 0\.9 -> 0\.0"),
        ({"optim": OptimConfig(lr=0.1)}, r"optim\.lr: 0\.05 -> 0\.1"),
        ({"optim": OptimConfig(name="adamw", lr=0.05)}, r"optim\.name: 'sgd' -> 'adamw'"),
        ({"train": TrainConfig(epochs=3, seed=4, **QUIET)}, r"train\.seed: 0 -> 4"),
        ({"batch_size": 16}, r"batch_size: 32 -> 16"),
        ({"options": {"temperature": 2.0}}, r"options\.temperature: 4\.0 -> 2\.0"),
    ]

    def run(resume, **kw):
        kw = {**first, **kw}
        distiller = flowdistill.make_distiller("kd", teacher, _student(), **kw["options"])
        return fit(distiller, tiny_data, kw["optim"], kw["train"], out_dir=tmp_path,
                   batch_size=kw["batch_size"], resume=resume)  # fmt: skip

    run(False)
    for change, named in changes:
        if "train" not in change:
            change = {**change, "train": TrainConfig(epochs=3, **QUIET)}
        with pytest.raises(CheckpointError, match=r"trained with other settings \(" + named):
            run(True, **change)
    # the same settings, the default temperature given by name, more epochs, another
    # execution: resumed
    result = run(True, options={"temperature": 4.0},
                 train=TrainConfig(epochs=3, amp=False, **QUIET))  # fmt: skip
    assert len(result.history) == 3


def test_a_bench_run_resumes_only_its_own_checkpoint(tmp_path, pair, tiny_data):
    """fit's meta identifies a bench run: an unfinished checkpoint of another key is
    refused, and so is a finished record without its checkpoint (it would be overwritten)."""
    teacher = pair[0]
    with pytest.raises(_Interrupted):
        fit(_kd(pair, stop_at=1), tiny_data, train=TrainConfig(epochs=3, **QUIET),
            out_dir=tmp_path / "a", batch_size=32, meta={"key_hash": "one"})  # fmt: skip
    with pytest.raises(CheckpointError, match="another configuration \\(key_hash differs\\)"):
        fit(_kd(pair), tiny_data, train=TrainConfig(epochs=3, **QUIET), out_dir=tmp_path / "a",
            resume=True, batch_size=32, meta={"key_hash": "two"})  # fmt: skip
    # with the keys themselves saved, the entries that differ are named
    with pytest.raises(_Interrupted):
        fit(_kd(pair, stop_at=1), tiny_data, train=TrainConfig(epochs=3, **QUIET),
            out_dir=tmp_path / "k", batch_size=32,
            meta={"key_hash": "one", "key": {"seed": 0, "teacher": "t.safetensors"}})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"configuration \(seed: 0 -> 1\)"):
        fit(_kd(pair), tiny_data, train=TrainConfig(epochs=3, **QUIET), out_dir=tmp_path / "k",
            resume=True, batch_size=32,
            meta={"key_hash": "two", "key": {"seed": 1, "teacher": "t.safetensors"}})  # fmt: skip
    fit(flowdistill.make_distiller("kd", teacher, _student()), tiny_data,
        train=TrainConfig(epochs=1, **QUIET), out_dir=tmp_path / "b", batch_size=32)  # fmt: skip
    (tmp_path / "b" / "last.safetensors").unlink()
    with pytest.raises(CheckpointError, match="finished run \\(result.json\\) without its"):
        fit(flowdistill.make_distiller("kd", teacher, _student()), tiny_data,
            train=TrainConfig(epochs=1, **QUIET), out_dir=tmp_path / "b", resume=True)  # fmt: skip


def test_an_out_dir_under_a_file_is_refused_before_training(tmp_path, pair, tiny_data):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        fit(flowdistill.make_distiller("kd", pair[0], _student()), tiny_data,
            train=TrainConfig(epochs=1, **QUIET), out_dir=tmp_path / "file" / "run")  # fmt: skip


def test_fit_gives_the_distiller_back_in_its_mode_and_the_teacher_stays_frozen(pair, tiny_data):
    teacher = pair[0]
    d = flowdistill.make_distiller("kd", teacher, _student()).eval()
    fit(d, tiny_data, train=TrainConfig(epochs=1, **QUIET), batch_size=32)
    assert not d.training and not d.student.training
    stats = teacher.stage1[1].running_mean.clone()
    d.train()
    teacher.train()  # a caller's slip in their own loop: the BatchNorm statistics stay
    d(tiny_data.train.x[:8], tiny_data.train.y[:8])["loss"].backward()
    torch.testing.assert_close(teacher.stage1[1].running_mean, stats)


def test_empty_splits_and_resume_without_a_folder_are_refused(pair, tiny_data):
    d = flowdistill.make_distiller("kd", pair[0], _student())
    empty = Split(tiny_data.val.x[:0], tiny_data.val.y[:0])
    data = Splits(tiny_data.train, empty, tiny_data.test, 4)
    with pytest.raises(DataError, match=r"data.val is empty \(no epoch could be chosen\)"):
        fit(d, data, train=TrainConfig(epochs=1, **QUIET))
    with pytest.raises(ConfigError, match="resume=True continues the run in out_dir"):
        fit(d, tiny_data, train=TrainConfig(epochs=1, **QUIET), resume=True)


def test_deterministic_holds_for_the_run_only(pair, tiny_data):
    assert not torch.are_deterministic_algorithms_enabled()
    fit(flowdistill.make_distiller("kd", pair[0], _student()), tiny_data,
        train=TrainConfig(epochs=1, deterministic=True, **QUIET))  # fmt: skip
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting, back


def test_a_frozen_student_and_non_finite_inputs_are_named(pair, tiny_data):
    frozen = _student().requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train.*unfreeze the student"):
        fit(flowdistill.make_distiller("kd", pair[0], frozen), tiny_data,
            train=TrainConfig(epochs=1, **QUIET))  # fmt: skip
    x = tiny_data.val.x.clone()
    x[3, 0, 1, 1] = float("nan")
    x[5, 0, 2, 2] = float("inf")
    data = Splits(tiny_data.train, Split(x, tiny_data.val.y), tiny_data.test, 4)
    with pytest.raises(DataError, match=r"data.val inputs hold 2 non-finite values"):
        fit(flowdistill.make_distiller("kd", pair[0], _student()), data,
            train=TrainConfig(epochs=1, **QUIET))  # fmt: skip


def test_a_last_batch_of_one_sample_is_left_out_where_batch_norm_trains(tiny_data):
    """97 samples in batches of 16 leave one: a BatchNorm that trains cannot take it, so the
    epoch has six batches (without BatchNorm, seven); a batch size of one is refused."""
    torch.manual_seed(0)
    extra = Split(tiny_data.train.x[:1], tiny_data.train.y[:1])
    train = Split(torch.cat([tiny_data.train.x, extra.x]), torch.cat([tiny_data.train.y, extra.y]))
    data = Splits(train, tiny_data.val, tiny_data.test, 4)
    norm = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 4),
    )
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    for model, batches in ((norm, 6), (plain, 7)):
        steps = []
        model.register_forward_hook(
            lambda m, i, o, steps=steps: steps.append(len(o)) if m.training else None
        )
        fit(flowdistill.make_distiller("student", None, model), data,
            train=TrainConfig(epochs=1, **QUIET), batch_size=16)  # fmt: skip
        assert len(steps) == batches and min(steps) >= (2 if model is norm else 1)
    with pytest.raises(ConfigError, match="batch_size=1 .* BatchNorm"):
        fit(flowdistill.make_distiller("student", None, norm), data,
            train=TrainConfig(epochs=1, **QUIET), batch_size=1)  # fmt: skip


@pytest.mark.parametrize(
    "optim,message",
    [
        (OptimConfig(warmup_epochs=2), r"warmup_epochs \(2\) is not shorter than train.epochs"),
    ],
)
def test_a_warm_up_as_long_as_the_run_is_refused(optim, message, tiny_data, tmp_path):
    d = flowdistill.make_distiller("student", None, _student())
    with pytest.raises(ConfigError, match=message):
        fit(d, tiny_data, optim, TrainConfig(epochs=2, **QUIET), tmp_path, batch_size=16)
    assert not any(tmp_path.iterdir())
