"""The standard-recipe CIFAR suites: registration, schedules rescaled by --epochs, the
user's data folder, and one end-to-end bench on tiny files in the official layout."""

import json
import pickle

import numpy as np
import pytest
import torch

from flowdistill import get_method, list_methods, make_distiller
from flowdistill.bench import method_config, run_bench
from flowdistill.bench.runner import _rescaled, _train_config, with_epochs
from flowdistill.bench.suites import STANDARD_PAIRS, get_suite
from flowdistill.config import OptimConfig
from flowdistill.errors import ConfigError, DataError
from flowdistill.models import create_model


def test_step_milestones_move_with_the_number_of_epochs():
    recipe = OptimConfig(lr=0.05, schedule="step", milestones=[150, 180, 210], warmup_epochs=20)
    short = _rescaled(recipe, 24, 240)
    assert short.milestones == [15, 18, 21] and short.warmup_epochs == 2
    assert short.lr == 0.05 and short.schedule == "step"
    assert _rescaled(recipe, 240, 240) is recipe
    assert _rescaled(recipe, 1, 240).milestones == [1]  # never before the first epoch
    cosine = OptimConfig(schedule="cosine")
    assert _rescaled(cosine, 3, 10).milestones == []


def test_with_epochs_replaces_student_and_teacher_schedules():
    suite = get_suite("cifar100")
    short = with_epochs(suite, 24, 12)
    assert (short.epochs, short.teacher_epochs) == (24, 12)
    assert short.optim.milestones == [15, 18, 21]
    assert short.teacher_optim.milestones == [8, 9, 10]  # 7.5 rounds to even 8, 10.5 to 10
    assert with_epochs(suite, None, None) == suite
    with pytest.raises(ConfigError, match="--teacher-epochs must be >= 1"):
        with_epochs(suite, 3, 0)


@pytest.mark.parametrize("classes", [100, 10])
@pytest.mark.parametrize("pair", list(STANDARD_PAIRS))
def test_standard_suites_use_the_standard_recipe(classes, pair):
    name = f"cifar{classes}" + ("" if pair == "resnet32x4-resnet8x4" else f"-{pair}")
    suite = get_suite(name)
    teacher, student, stages, pooled = STANDARD_PAIRS[pair]
    assert (suite.teacher.name, suite.student.name) == (teacher, student)
    for optim, epochs in ((suite.optim, suite.epochs), (suite.teacher_optim, suite.teacher_epochs)):
        assert epochs == 240 and optim.name == "sgd" and optim.lr == 0.05
        assert optim.momentum == 0.9 and optim.weight_decay == 5e-4
        assert optim.schedule == "step" and optim.milestones == [150, 180, 210]
        assert optim.gamma == 0.1
    assert suite.batch_size == 64 and suite.augment_padding == 4
    assert _train_config(suite, epochs=1).augment_padding == 4
    # the stages are those the models declare, shallow to deep; the last one is the
    # default feature tap, and the methods take theirs as the authors' code does
    for name in (teacher, student):
        assert tuple(f["name"] for f in create_model(name).feature_info()) == stages
    assert method_config(suite, "kd") == {}
    for method, expected in [("flowdistill", [stages[-1]]), ("sp", [stages[-1]]),
                             ("fitnet", [stages[1]]), ("at", list(stages)),
                             ("vid", list(stages)), ("rkd", [pooled]),
                             ("crd", [pooled])]:  # fmt: skip
        options = method_config(suite, method)
        assert options["student_taps"] == options["teacher_taps"] == expected, method
    # ReviewKD: the teacher's stages before their last ReLU (the reference code's
    # preact=True features), the student's as they are, and the pooled feature
    options = method_config(suite, "reviewkd")
    assert options["student_taps"] == [*stages, pooled]
    preact = create_model(teacher).preact_taps()
    assert options["teacher_taps"] == [*(preact[s] for s in stages), pooled]
    weights = {"resnet56-resnet20": 0.6}.get(pair, 5.0)  # ReviewKD's published weights
    assert method_config(suite, "reviewkd")["review_weight"] == weights


@pytest.mark.parametrize("pair", list(STANDARD_PAIRS))
def test_every_feature_method_builds_on_a_standard_pair_with_its_taps(pair):
    """The taps exist and fit each method: the pooled feature is a 1×1 map of the last
    stage's width."""
    suite = get_suite(f"cifar100-{pair}" if pair != "resnet32x4-resnet8x4" else "cifar100")
    teacher, student, stages, pooled = STANDARD_PAIRS[pair]
    t, s = create_model(teacher, num_classes=100), create_model(student, num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    width = create_model(student).feature_info()[-1]["channels"]
    for method in [m for m in list_methods() if get_method(m).uses_feature_taps]:
        d = make_distiller(method, t, s, example_input=x, **method_config(suite, method))
        if pooled in method_config(suite, method)["student_taps"]:
            assert d.student_shapes[pooled] == (width, 1, 1), method


def test_a_missing_cifar_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWDISTILL_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cifar-100-python"):
        get_suite("cifar100").load_data()
    with pytest.raises(DataError, match=r"cifar-10-batches-py \(or .*cifar10.npz\)"):
        get_suite("cifar10").load_data()


def _write_cifar100(folder, n_train, n_test, classes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = (np.arange(n) % classes).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"fine_labels": labels, b"data": data}, f, protocol=2)


def test_a_shortened_standard_bench_runs_on_the_users_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWDISTILL_DATA", str(tmp_path / "data"))
    _write_cifar100(tmp_path / "data" / "cifar-100-python", n_train=40, n_test=12, classes=4)
    out = tmp_path / "bench"
    results = run_bench(
        "cifar100-resnet56-resnet20", methods=["kd"], seeds=1, epochs=4, teacher_epochs=2,
        out=out, progress=False, cache=tmp_path / "cache", log=lambda *_: None,
    )  # fmt: skip
    config = results["provenance"]["config"]
    assert config["epochs"] == 4 and config["teacher_epochs"] == 2
    assert config["optim"]["milestones"] == [2, 3, 4]  # 150/60 = 2.5 → 2, 3, 3.5 → 4
    assert results["teacher"]["params"] == sum(
        p.numel() for p in create_model("resnet56", num_classes=4).parameters()
    )
    run = json.loads((out / "runs" / "kd" / "seed0" / "result.json").read_text())
    lrs = [row["lr"] for row in run["history"]]  # the last step's rate in each epoch
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    assert run["key"]["optim"]["milestones"] == [2, 3, 4]
    teacher_run = json.loads(
        (
            tmp_path / "cache" / results["teacher"]["checkpoint"].split("/")[-2] / "result.json"
        ).read_text()
    )
    assert len(teacher_run["history"]) == 2
    assert [row["lr"] for row in teacher_run["history"]] == pytest.approx([0.05, 0.005])
