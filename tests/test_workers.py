"""bench --workers: runs trained several at a time, in processes of their own, give the
results of the same runs trained one after another."""

import json
from pathlib import Path

import pytest
import torch

from flowdistill.bench import run_bench
from flowdistill.errors import ConfigError, DataError, FlowdistillError


def _accuracies(results):
    return {(r["method"], r["seed"]): (r["metric"], r["best_val_metric"]) for r in results["runs"]}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two workers of one thread each, like the one-thread reference
    yield
    torch.set_num_threads(threads)


def test_workers_give_the_results_of_one_run_after_another(tmp_path, one_thread):
    common = {"methods": ["kd", "fitnet"], "seeds": 2, "epochs": 2, "progress": False,
              "cache": tmp_path / "cache", "log": lambda *_: None}  # fmt: skip
    torch.set_num_threads(1)
    serial = run_bench("digits", out=tmp_path / "serial", **common)
    torch.set_num_threads(2)
    lines = []
    common["log"] = lines.append
    parallel = run_bench("digits", out=tmp_path / "parallel", workers=2, **common)
    assert _accuracies(parallel) == _accuracies(serial)
    assert "training 6 runs, 2 at a time" in lines  # student, kd, fitnet × 2 seeds
    for method in ("student", "kd", "fitnet"):
        run = tmp_path / "parallel" / "runs" / method / "seed1"
        assert (run / "inference.json").exists()
        history = json.loads((run / "result.json").read_text())["history"]
        reference = json.loads(
            (tmp_path / "serial" / "runs" / method / "seed1" / "result.json").read_text()
        )["history"]
        assert [h["train_loss"] for h in history] == pytest.approx(
            [h["train_loss"] for h in reference], rel=1e-6
        )
    # a second call finds every run finished: nothing is trained again
    lines.clear()
    again = run_bench("digits", out=tmp_path / "parallel", workers=2, **common)
    assert _accuracies(again) == _accuracies(serial)
    assert not any(line.startswith("training") for line in lines)


def test_workers_tune_too(tmp_path, one_thread):
    lines = []
    results = run_bench(
        "digits", methods=["kd"], seeds=1, epochs=1, progress=False, tune=True, workers=2,
        out=tmp_path / "tuned", cache=tmp_path / "cache", log=lines.append,
    )  # fmt: skip
    assert "training 5 runs, 2 at a time" in lines  # student's one point, kd's four
    chosen = results["tuning"]["methods"]["kd"]["chosen"]
    assert any("is this run" in line for line in lines)  # the table's seed 0 is a tuning run
    assert results["provenance"]["config"]["method_options"]["kd"].items() >= chosen.items()


@pytest.fixture
def kd_here_only(monkeypatch):
    """A method registered in this process only: a spawned worker does not know it (as a
    method registered in a notebook cell would not be known), so its runs fail there."""
    from flowdistill.distillers import registry

    monkeypatch.setitem(registry.REGISTRY, "kd_here_only", registry.REGISTRY["kd"])
    return "kd_here_only"


def test_a_failing_run_names_itself_and_the_others_are_kept(tmp_path, one_thread, kd_here_only):
    with pytest.raises(FlowdistillError, match=r"1 of 2 runs failed .*kd_here_only seed 0.*"
                       r"unknown method"):  # fmt: skip
        run_bench(
            "digits", methods=[kd_here_only], seeds=1, epochs=1, progress=False, workers=2,
            out=tmp_path / "b", cache=tmp_path / "cache", log=lambda *_: None,
        )  # fmt: skip
    assert (tmp_path / "b" / "runs" / "student" / "seed0" / "result.json").exists()


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        run_bench("digits", methods=["kd"], seeds=1, workers=0, out=tmp_path)


def test_workers_refuse_a_folder_of_another_configuration(tmp_path, one_thread):
    """A finished run of other settings is never resumed as this one (its records kept)."""
    kw = dict(seeds=1, progress=False, out=tmp_path / "b", cache=tmp_path / "cache",
              log=lambda *_: None, teacher_epochs=1)  # fmt: skip
    run_bench("digits", methods=["student"], epochs=1, **kw)
    record = (tmp_path / "b" / "runs" / "student" / "seed0" / "result.json").read_text()
    with pytest.raises(ConfigError, match=r"another configuration \(epochs differ\)"):
        run_bench("digits", methods=["student"], epochs=2, workers=2, **kw)
    assert (tmp_path / "b" / "runs" / "student" / "seed0" / "result.json").read_text() == record


def test_a_damaged_run_record_is_named(tmp_path):
    kw = dict(seeds=1, progress=False, out=tmp_path / "b", cache=tmp_path / "cache",
              log=lambda *_: None, teacher_epochs=1, epochs=1)  # fmt: skip
    run_bench("digits", methods=["student"], **kw)
    record = tmp_path / "b" / "runs" / "student" / "seed0" / "result.json"
    record.write_text("<<<<<<< HEAD\n")
    with pytest.raises(DataError, match=r"result.json is damaged.*remove its run folder"):
        run_bench("digits", methods=["student"], **kw)


def test_a_method_named_twice_runs_once(tmp_path):
    results = run_bench(
        "digits", methods=["kd", "kd"], seeds=1, epochs=1, teacher_epochs=1, progress=False,
        out=tmp_path / "b", cache=tmp_path / "cache", log=lambda *_: None,
    )  # fmt: skip
    assert [r["method"] for r in results["runs"]] == ["student", "kd"]


def test_an_option_a_method_refuses_stops_the_bench_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError, match="direction must be 'forward' or 'reverse'"):
        run_bench(
            "digits", methods=["kd", "skew_kl"], seeds=1, epochs=1, progress=False,
            out=tmp_path / "b", cache=tmp_path / "cache", log=lambda *_: None,
            options={"skew_kl": {"direction": "sideways"}},
        )  # fmt: skip
    assert not (tmp_path / "b").exists() and not (tmp_path / "cache").exists()


DIVERGING = '''
import torch
from flowdistill.distillers.kd import KD

class Diverging(KD):
    """KD whose loss is NaN when ``diverge`` is set."""

    tune_grid = [{"diverge": False}, {"diverge": True}]

    def __init__(self, teacher, student, *, diverge: bool = False, **base):
        super().__init__(teacher, student, **base)
        self.diverge = diverge

    def forward(self, inputs, targets):
        terms = super().forward(inputs, targets)
        if self.diverge:
            terms["loss"] = terms["loss"] * torch.tensor(float("nan"))
        return terms
'''


@pytest.fixture
def diverging(tmp_path, monkeypatch):
    """A method (by import path, so that spawned workers import it too) whose grid has a
    point that diverges."""
    from flowdistill.distillers import registry

    (tmp_path / "divmethods.py").write_text(DIVERGING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    return "divmethods:Diverging"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_diverging_grid_point_is_the_worst_point_not_the_end_of_the_bench(
    tmp_path, one_thread, diverging, workers, monkeypatch
):
    kw = dict(methods=[diverging], seeds=1, epochs=1, teacher_epochs=1, progress=False, tune=True,
              workers=workers, out=tmp_path / "b", cache=tmp_path / "cache",
              log=lambda *_: None)  # fmt: skip
    results = run_bench("digits", **kw)
    record = results["tuning"]["methods"][diverging]
    assert record["chosen"] == {"diverge": False}
    bad = next(p for p in record["points"] if p["options"] == {"diverge": True})
    assert bad["val_mean"] is None and bad["val"] == [None] and bad["diverged"] == [0]
    good = next(p for p in record["points"] if p["options"] == {"diverge": False})
    assert 0.0 < good["val_mean"] <= 1.0
    assert "| divmethods:Diverging | diverge=True | diverged |" in (
        (tmp_path / "b" / "results.md").read_text()
    )
    assert list((tmp_path / "b" / "tune" / diverging).glob("*/seed0/diverged.json"))

    # the same command trains nothing again: the diverged point is known to have diverged
    def no_training(*_a, **_k):
        raise AssertionError("a run was trained again")

    monkeypatch.setattr("flowdistill.bench.runner._train_run", no_training)
    again = run_bench("digits", **{**kw, "workers": 1})
    assert again["tuning"]["methods"][diverging] == record


def test_a_diverging_run_does_not_stop_the_runs_after_it(tmp_path, diverging):
    """One after another: the run after the failing one is trained, then the failure named."""
    with pytest.raises(FlowdistillError, match=r"1 of 3 runs failed .*Diverging seed 0 .*"
                       r"non-finite"):  # fmt: skip
        run_bench(
            "digits", methods=[diverging, "kd"], seeds=1, epochs=1, teacher_epochs=1,
            progress=False, options={diverging: {"diverge": True}}, out=tmp_path / "b",
            cache=tmp_path / "cache", log=lambda *_: None,
        )  # fmt: skip
    assert (tmp_path / "b" / "runs" / "kd" / "seed0" / "result.json").exists()
    assert not (tmp_path / "b" / "results.json").exists()  # no table with a run missing


def test_a_saved_run_with_taps_its_method_ignored_is_the_same_run():
    """Suites once passed every method the feature taps; a method that takes none ignored
    them, so its saved runs are the runs of today's keys. A method that takes taps is
    another run when they differ."""
    from flowdistill.bench.runner import _hash, same_run

    taps = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}
    for method, same in (("fmkt", True), ("nd", True), ("fitnet", False)):
        key = {"method": method, "options": {"temperature": 1.0}, "seed": 0}
        saved = {**key, "options": {**key["options"], **taps}}
        record = {"key": saved, "key_hash": _hash(saved)}
        assert same_run(record, key) is same, method
        assert same_run({"key": key, "key_hash": _hash(key)}, key)
        other = {**key, "seed": 1}  # anything else that differs: another run
        assert not same_run(record, other)


def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    """follow_parent: a worker whose parent process is gone stops (its run resumes in the
    next bench) instead of training on with nobody to collect its result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = (  # the parent's pid comes from the parent, as the pool's initializer gets it
        "import pathlib, sys, time; from flowdistill.bench.runner import follow_parent; "
        "follow_parent(int(sys.argv[1]), every=0.05); "
        f"pathlib.Path({str(tmp_path / 'up')!r}).touch(); time.sleep(60)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); "
        "print(p.pid, flush=True); time.sleep(60)"
    )

    def alive(p):
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    deadline = time.time() + 60
    while not (tmp_path / "up").exists():  # the child is up and watching
        assert time.time() < deadline and alive(pid), "the child did not start"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_sigterm_stops_a_command_as_ctrl_c_does(capsys):
    import os
    import signal

    from flowdistill.cli import reported

    def run():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not interrupted")

    assert reported(run, "flowdistill") == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back afterwards


def test_a_teacher_that_scores_otherwise_than_the_tables_is_refused(tmp_path):
    """Runs are keyed by their teacher's path: a teacher of the same key trained again with
    another result would mix its runs with the table's; refused, naming both scores."""
    kw = dict(methods=["student"], seeds=1, epochs=1, teacher_epochs=1, progress=False,
              out=tmp_path / "b", cache=tmp_path / "cache", log=lambda *_: None)  # fmt: skip
    first = run_bench("digits", **kw)
    table = tmp_path / "b" / "results.json"
    record = json.loads(table.read_text())
    assert run_bench("digits", **kw)["runs"] == first["runs"]  # the same teacher: reused
    record["teacher"]["metric"] = first["teacher"]["metric"] - 0.01
    table.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"scores .* but the runs in .* scored"):
        run_bench("digits", **kw)


def test_a_run_of_a_teacher_with_other_weights_at_the_same_path_is_refused(tmp_path):
    """A run's key holds its teacher's weights, not only the teacher's cache path: where the
    cached teacher is replaced by other weights and no table is left to compare with, the
    finished run is not reused as if distilled from it (it is named, with what differs)."""
    from flowdistill.bench.runner import BEST
    from flowdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    kw = dict(methods=["student"], seeds=1, epochs=1, teacher_epochs=1, progress=False,
              out=tmp_path / "b", cache=tmp_path / "cache", log=lambda *_: None)  # fmt: skip
    first = run_bench("digits", **kw)
    assert first["teacher"]["weights"]
    (tmp_path / "b" / "results.json").unlink()  # no table left to compare teachers with
    assert run_bench("digits", **kw)["runs"] == first["runs"]  # the same teacher: reused
    path = Path(first["teacher"]["checkpoint"])
    assert path.name == BEST
    tensors, meta = load_checkpoint(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 0.01  # other weights at the same path
    save_checkpoint(path, tensors, meta)
    (tmp_path / "b" / "results.json").unlink()
    with pytest.raises(ConfigError, match=r"another configuration \(teacher_weights differ\)"):
        run_bench("digits", **kw)


def test_an_interrupted_run_keyed_before_teacher_weights_resumes(tmp_path):
    """A run checkpointed before run keys held the teacher's weights is resumed under the
    key it was saved with (same_run), not refused as another configuration."""
    from flowdistill.bench.runner import _hash
    from flowdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    kw = dict(methods=["student"], seeds=1, epochs=1, teacher_epochs=1, progress=False,
              out=tmp_path / "b", cache=tmp_path / "cache", log=lambda *_: None)  # fmt: skip
    first = run_bench("digits", **kw)
    run = tmp_path / "b" / "runs" / "student" / "seed0"
    tensors, state = load_checkpoint(run / "last.safetensors")
    old = {k: v for k, v in state["meta"]["key"].items() if k != "teacher_weights"}
    state["meta"] = {"key_hash": _hash(old), "key": old}  # as an earlier version saved it
    save_checkpoint(run / "last.safetensors", tensors, state)
    for name in ("result.json", "inference.json"):  # interrupted before it finished
        (run / name).unlink()
    (tmp_path / "b" / "results.json").unlink()
    again = run_bench("digits", **kw)
    assert [r["metric"] for r in again["runs"]] == [r["metric"] for r in first["runs"]]
    assert json.loads((run / "result.json").read_text())["key"] == old
