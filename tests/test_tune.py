"""``flowdistill bench --tune``: the same grid budget for every method, chosen on validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flowdistill.bench import SUITES, get_suite, run_bench
from flowdistill.bench.runner import _hash
from flowdistill.distillers import (
    list_methods,
    list_variants,
    make_distiller,
    method_options,
    resolve,
    tune_points,
)
from flowdistill.distillers.registry import REGISTRY
from flowdistill.errors import ConfigError
from flowdistill.models import build_model

ALL = list_methods() + list_variants()


@pytest.mark.parametrize("name", ALL)
def test_every_method_gets_the_same_grid_budget_of_buildable_points(name):
    points = tune_points(name)
    if name == "student":  # nothing to choose: its defaults alone
        assert points == [{}]
        return
    assert len(points) == 4
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 4  # distinct points
    _, preset = resolve(name)
    for point in points:
        assert set(point) <= set(method_options(name)) and not set(point) & set(preset)
    torch.manual_seed(0)
    teacher = build_model("digits_teacher", num_classes=10, in_channels=1)
    student = build_model("digits_student", num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 8, 8)
    taps = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}
    for point in points:
        options = {**(taps if REGISTRY[resolve(name)[0]].uses_feature_taps else {}), **point}
        distiller = make_distiller(name, teacher, student, example_input=x, **options)
        for key, value in point.items():  # the option reached the method
            held = getattr(distiller, key, None)
            if isinstance(held, (int, float)) and not isinstance(held, bool):
                assert held == pytest.approx(value)


def _fingerprint(name: str, point: dict) -> torch.Tensor:
    """The training loss (at the last epoch of a 20-epoch schedule) and the predictions of
    ``name`` at ``point`` on a fixed batch, from fixed weights (the method's own modules
    moved off their initial values) and a fixed random stream."""
    torch.manual_seed(0)
    teacher = build_model("digits_teacher", num_classes=10, in_channels=1)
    student = build_model("digits_student", num_classes=10, in_channels=1)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    taps = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}
    options = {**(taps if REGISTRY[resolve(name)[0]].uses_feature_taps else {}), **point}
    distiller = make_distiller(name, teacher, student, example_input=x[:4], **options)
    distiller.on_fit_start(8)
    distiller.on_fit_targets(y)
    distiller.batch_index = torch.arange(8)
    distiller.train()
    distiller.on_epoch_start(19, 20)
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: zero-initialised output layers would hide options
        for p in distiller.extra_parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss = distiller(x, y)["loss"].detach().reshape(1)
    return torch.cat([loss, distiller.predict(x).flatten()])


@pytest.mark.parametrize("name", [n for n in ALL if n != "student"])
def test_every_grid_point_changes_what_the_method_computes(name):
    """No axis of a grid is idle: each point gives another loss or other predictions
    than every other point (an option the method's configuration ignores would spend the
    grid budget on copies)."""
    points = tune_points(name)
    prints = [_fingerprint(name, p) for p in points]
    for i in range(len(points)):
        for j in range(i):
            assert not torch.allclose(prints[i], prints[j], rtol=1e-6, atol=1e-7), (
                f"{name}: points {points[j]} and {points[i]} compute the same"
            )


def test_a_grid_naming_an_unknown_option_is_refused(monkeypatch):
    monkeypatch.setattr(REGISTRY["kd"], "tune_grid", {"temprature": [1.0, 4.0]})
    with pytest.raises(ConfigError, match="temprature"):
        tune_points("kd")


def test_tune_chooses_each_method_on_validation_and_runs_the_table_there(tmp_path):
    lines: list[str] = []
    kw = dict(seeds=2, epochs=1, budget=0.3, progress=False, cache=tmp_path / "cache", tune=True)
    results = run_bench("digits", ["kd"], out=tmp_path / "b", log=lines.append, **kw)
    tuning = results["tuning"]
    assert tuning["seeds"] == [0] and tuning["higher_is_better"] is True
    kd = tuning["methods"]["kd"]
    assert [p["options"] for p in kd["points"]] == tune_points("kd")
    for point in kd["points"]:  # the scores are the runs' own last-epoch validation accuracy
        run = tmp_path / "b" / "tune" / "kd" / _hash(point["options"]) / "seed0"
        history = json.loads((run / "metrics.json").read_text())
        assert point["val"] == [history[-1]["val_acc"]]
        assert "test_acc" not in point and point["val_mean"] == history[-1]["val_acc"]
    best = max(kd["points"], key=lambda p: p["val_mean"])  # (the first of any tie)
    assert kd["chosen"] == best["options"]
    assert tuning["methods"]["student"]["points"][0]["options"] == {}
    # the table's runs use the chosen point; seed 0 is the tuning run itself
    options = results["provenance"]["config"]["method_options"]["kd"]
    assert {k: options[k] for k in kd["chosen"]} == kd["chosen"]
    for seed in (0, 1):
        run = tmp_path / "b" / "runs" / "kd" / f"seed{seed}"
        assert json.loads((run / "result.json").read_text())["key"]["options"] == options
    assert any("the tuning run" in line and "kd seed 0" in line for line in lines)
    assert not any("the tuning run" in line and "seed 1" in line for line in lines)
    md = (tmp_path / "b" / "results.md").read_text()
    assert "Options chosen on the validation split" in md and md.count("| kd |") == 5
    # a second call trains nothing and gives the same table
    again = run_bench("digits", ["kd"], out=tmp_path / "b", log=lines.append, **kw)
    assert again["summary"] == results["summary"] and again["tuning"] == tuning


def test_tune_refuses_a_language_model_suite_without_a_selection_split(monkeypatch, tmp_path):
    def no_data():
        raise AssertionError("the check comes before any data is read")

    suite = dataclasses.replace(
        get_suite("shakespeare-char"), name="lm-noselect", select_split=False, load_data=no_data
    )
    monkeypatch.setitem(SUITES, suite.name, suite)
    with pytest.raises(ConfigError, match="validation split"):
        run_bench("lm-noselect", ["kd"], out=tmp_path, tune=True, progress=False)
    with pytest.raises(ConfigError, match="normalizing flow"):
        run_bench("nf-digits", out=tmp_path, tune=True, progress=False)
    with pytest.raises(ConfigError, match="tune-seeds"):
        run_bench("digits", ["kd"], out=tmp_path, tune=True, tune_seeds=0, progress=False)


def _script(name: str):
    """A script of benchmarks/ as a module."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:  # importable by name, also in spawned worker processes
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def _tune_script():
    return _script("tune")


def test_cost_script_times_every_method_as_the_engine_prepares_it(tmp_path, monkeypatch):
    """benchmarks/cost.py on digits, a few rounds: every method is built and prepared as
    fit prepares it (CRD's negatives need the training labels), each row holds its ratios,
    and the module cost is 0 for kd and 1 for diffkd by its definition."""
    cost = _script("cost")
    monkeypatch.chdir(tmp_path)  # the teacher is cached under ./runs
    out = tmp_path / "cost.json"
    methods = ["student", "kd", "crd", "diffkd", "fmkt-head"]
    assert cost.main(["--suite", "digits", "--methods", ",".join(methods), "--rounds", "2",
                      "--out", str(out)]) in (0, None)  # fmt: skip
    rows = json.loads(out.read_text())["methods"]
    assert list(rows) == methods
    assert rows["student"]["step_time_ratio"] == 1.0
    assert rows["kd"]["module_cost_vs_diffkd"] == 0.0
    assert rows["diffkd"]["module_cost_vs_diffkd"] == pytest.approx(1.0)
    assert rows["crd"]["extra_params"] > 0 and rows["fmkt-head"]["deployed_params"] > 745
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        cost.main(["--suite", "digits", "--methods", "kd", "--rounds", "0", "--out", str(out)])


def test_tune_script_workers_score_as_one_after_another(tmp_path, monkeypatch):
    """benchmarks/tune.py: each grid point over seeds on validation only; with --workers the
    runs train in processes of their own and score exactly as when trained in turn."""
    tune = _tune_script()
    monkeypatch.chdir(tmp_path)  # the teacher is cached under ./runs
    threads = torch.get_num_threads()
    argv = ["--suite", "digits", "--method", "kd", "--grid", "temperature=1,4", "--seeds", "2",
            "--epochs", "1"]  # fmt: skip
    try:
        torch.set_num_threads(1)
        assert tune.main([*argv, "--out", "serial.json"]) == 0
        torch.set_num_threads(2)  # two workers of one thread each
        assert tune.main([*argv, "--workers", "2", "--out", "parallel.json"]) == 0
    finally:
        torch.set_num_threads(threads)
    serial = json.loads((tmp_path / "serial.json").read_text())
    parallel = json.loads((tmp_path / "parallel.json").read_text())
    assert [p["options"] for p in serial["points"]] == [{"temperature": 1}, {"temperature": 4}]
    for a, b in zip(serial["points"], parallel["points"], strict=True):
        assert a["val_acc_last"] == b["val_acc_last"] and a["val_acc_best"] == b["val_acc_best"]
        assert len(a["val_acc_last"]) == 2 and a["val_acc_last"][0] != a["val_acc_last"][1]
    assert serial["points"][0]["val_acc_last"] != serial["points"][1]["val_acc_last"]
    assert "test" not in json.dumps(serial).replace("benchmarks/tune.py", "")
    with pytest.raises(SystemExit, match="--workers"):
        tune.main([*argv, "--workers", "0", "--out", "bad.json"])
    twice = ["--grid", "temperature=1", "temperature=4"]
    for bad, message in ((["--seeds", "0"], "--seeds must be >= 1"),
                         (["--epochs", "0"], "--epochs must be >= 1"),
                         (["--out", str(tmp_path)], "is a folder"),
                         (twice, "names 'temperature' twice")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            tune.main([*argv, "--out", "bad.json", *bad])
    assert not (tmp_path / "bad.json").exists()
    # a point whose loss diverges is the worst point; the others are kept and chosen from
    diverging = ["--suite", "digits", "--method", "kd", "--grid", "kd_weight=0.9,1e39",
                 "--seeds", "1", "--epochs", "1", "--out", "diverging.json"]  # fmt: skip
    assert tune.main(diverging) == 0
    record = json.loads((tmp_path / "diverging.json").read_text())
    worst = record["points"][1]
    assert worst["diverged"] == [0] and worst["score"] is None
    assert record["chosen"] == {"kd_weight": 0.9}
