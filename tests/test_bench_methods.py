"""Which methods a bench runs: the suite's own comparison by default, ``all`` for every
registered method the suite admits (the others left out with their reason), and the timing
record of the command."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from flowdistill.bench import get_suite, run_bench
from flowdistill.bench.runner import _build, _with_options, applicable_methods, method_config
from flowdistill.bench.suites import SUITES, _lm_method_options, _shakespeare
from flowdistill.cli import main
from flowdistill.config import ModelConfig, OptimConfig, TrainConfig
from flowdistill.distillers import list_methods, make_distiller
from flowdistill.engine.trainer import fit
from flowdistill.errors import ConfigError, FlowdistillError

QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture
def tiny_lm_suite(small_corpus, monkeypatch):
    """shakespeare-char's recipe and options on a small corpus, with small models."""
    small_corpus(30)
    lm = get_suite("shakespeare-char")
    suite = dataclasses.replace(
        lm,
        name="tiny-lm",
        load_data=lambda: _shakespeare(16, select_fraction=0.1),
        teacher=ModelConfig("gpt", kwargs={"block_size": 16, "n_layer": 2, "n_embd": 32}),
        student=ModelConfig("gpt", kwargs={"block_size": 16, "n_layer": 1, "n_embd": 16}),
        teacher_epochs=1,
        method_options=_lm_method_options("blocks.0", "blocks.1"),
    )
    monkeypatch.setitem(SUITES, suite.name, suite)
    return suite


def test_every_image_method_is_admitted_by_the_digits_suite():
    suite = get_suite("digits")
    data = suite.load_data()
    able, skipped = applicable_methods(suite, data, data.train.x[:8])
    assert skipped == {} and able == list_methods()


def test_all_runs_what_the_suite_admits_and_names_what_it_leaves_out(tmp_path, tiny_lm_suite):
    """On a language-model suite, ``all`` trains every method whose construction and
    pre-training checks accept per-token logits and targets; each method left out is one
    that ``fit`` itself refuses (the independent check), and its reason is logged and
    recorded."""
    lines: list[str] = []
    results = run_bench(
        "tiny-lm", "all", seeds=1, epochs=1, out=tmp_path / "out",
        cache=tmp_path / "cache", progress=False, log=lines.append,
    )  # fmt: skip
    skipped = results["provenance"]["config"]["skipped"]
    ran = set(results["summary"])
    assert ran | set(skipped) == set(list_methods()) and not ran & set(skipped)
    # the methods defined on one vector per sample, or on class labels, cannot run here
    assert {"nd", "ofa", "crd"} <= set(skipped)
    assert {"student", "kd", "reverse_kl", "taid", "fmkt", "flowdistill"} <= ran
    assert "(16, 16)" in skipped["nd"] and "class label" in skipped["crd"]
    for method, why in skipped.items():
        assert any(line.startswith(f"{method}: left out") and why in line for line in lines)

    suite = tiny_lm_suite
    data = suite.load_data()
    teacher = _build(suite.teacher, data, suite.task)
    for method in skipped:  # the bench's reason is fit's own refusal
        with pytest.raises(FlowdistillError):
            student = _build(suite.student, data, suite.task)
            built = make_distiller(
                method, teacher, student, example_input=data.train.x[:8],
                **method_config(suite, method),
            )  # fmt: skip
            fit(built, data, OptimConfig(), TrainConfig(epochs=1, progress=False))


def test_a_suite_runs_its_own_methods_by_default_and_records_its_time(tmp_path, monkeypatch):
    suite = dataclasses.replace(get_suite("digits"), name="digits-pair", methods=("kd",))
    monkeypatch.setitem(SUITES, suite.name, suite)
    kw = {"seeds": 2, "epochs": 1, "budget": 0.2, "out": tmp_path / "out", **QUIET}
    first = run_bench("digits-pair", cache=tmp_path / "cache", **kw)
    assert list(first["summary"]) == ["student", "kd"]
    assert first["provenance"]["config"]["methods"] == ["student", "kd"]
    assert "skipped" not in first["provenance"]["config"]
    timing = first["timing"]
    assert timing["runs"] == 4 and timing["runs_reused"] == 0
    assert timing["teacher_cached"] is False and timing["workers"] == 1
    assert 0 < timing["teacher_seconds"] < timing["wall_seconds"]
    again = run_bench("digits-pair", cache=tmp_path / "cache", **kw)
    assert again["summary"] == first["summary"]
    assert again["timing"]["runs_reused"] == 4 and again["timing"]["teacher_cached"] is True
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["timing"] == again["timing"]


def test_all_admits_each_method_at_the_options_it_would_run_with(tiny_lm_suite, tmp_path):
    """``--set`` options count in what ``all`` admits (CRD without class labels), and an
    option set for a method that is still left out is refused with the reason, before any
    teacher trains."""
    data = tiny_lm_suite.load_data()
    example = data.train.x[:8]
    _, skipped = applicable_methods(tiny_lm_suite, data, example)
    given = _with_options(tiny_lm_suite, list_methods(), {"crd": {"negatives": "uniform"}}, {})
    able, still = applicable_methods(given, data, example)
    assert "crd" in skipped and "crd" in able and set(still) == set(skipped) - {"crd"}
    with pytest.raises(ConfigError, match=r"options are set for nd, which tiny-lm leaves out"):
        run_bench(
            "tiny-lm", "all", options={"nd": {"temperature": 2.0}}, out=tmp_path / "o",
            cache=tmp_path / "cache", **QUIET,
        )  # fmt: skip
    assert not (tmp_path / "cache").exists()


def test_all_with_tune_admits_a_method_only_at_every_point_of_its_grid(monkeypatch):
    from flowdistill.distillers.kd import KD

    suite = get_suite("digits")
    data = suite.load_data()
    able, skipped = applicable_methods(suite, data, data.train.x[:8], tune=True)
    assert skipped == {} and able == list_methods()
    monkeypatch.setattr(KD, "tune_grid", [{"temperature": 1.0}, {"temperature": -1.0}])
    able, skipped = applicable_methods(suite, data, data.train.x[:8], tune=True)
    assert "kd" not in able and "temperature must be positive" in skipped["kd"]
    assert skipped["kd"].endswith("(at {'temperature': -1.0})")


def test_all_goes_alone(tmp_path):
    with pytest.raises(ConfigError, match="name no other method beside it"):
        run_bench("digits", ["all", "kd"], out=tmp_path, **QUIET)
    with pytest.raises(ConfigError, match="names no method"):
        run_bench("digits", [], out=tmp_path, **QUIET)


def test_suites_command_lists_each_suite_with_its_methods(capsys, monkeypatch):
    suite = dataclasses.replace(get_suite("digits"), name="digits-pair", methods=("kd", "dkd"))
    monkeypatch.setitem(SUITES, suite.name, suite)
    assert main(["suites"]) == 0
    out = capsys.readouterr().out
    for name in SUITES:
        assert f"\n{name}\n" in f"\n{out}"
    block = out.split("\ndigits-pair\n")[1].split("\n")
    assert block[1] == "  methods: kd, dkd"
    assert "methods: student, intermediate_kd, final_kd, synth_kd, all_kd" in out


def test_suites_command_lists_the_options_each_method_runs_with(capsys, monkeypatch):
    options = {
        "_features": {"student_taps": ["a", "b"], "teacher_taps": ["c", "d"]},
        "kd": {"temperature": 1.0, "ce_weight": 0},
        "dkd": {},
    }
    suite = dataclasses.replace(
        get_suite("digits"), name="digits-opts", methods=("kd", "dkd"), method_options=options
    )
    monkeypatch.setitem(SUITES, suite.name, suite)
    assert main(["suites"]) == 0
    block = capsys.readouterr().out.split("\ndigits-opts\n")[1].split("\n")
    assert block[2].startswith("  options")
    shown = {}
    for line in block[3:]:
        if not line.startswith("    "):
            break
        label, _, text = line.strip().partition(": ")
        pairs = (item.split("=") for item in text.split(" "))
        shown[label] = {k: [yaml.safe_load(x) for x in v.split(",")] for k, v in pairs}
    assert shown == {
        "every feature method": options["_features"],
        "kd": {"temperature": [1.0], "ce_weight": [0]},
    }  # (a method with no options of its own is not listed)


def test_cli_passes_all_through(fake_bench):
    argv = fake_bench["argv"]
    assert main([*argv, "--methods", "all"]) == 0 and fake_bench["methods"] == ["all"]
    assert main(argv) == 0 and fake_bench["methods"] is None


def test_every_suite_s_own_comparison_names_registered_methods():
    from flowdistill.distillers import get_method

    for suite in SUITES.values():
        for method in getattr(suite, "methods", ()):
            get_method(method)  # raises for an unknown name
    assert get_suite("cifar10-cpu").methods[0] == "student"
    assert set(get_suite("shakespeare-char").methods) == {
        "student", "kd", "reverse_kl", "taid", "fmkt", "flowdistill"
    }  # fmt: skip


@pytest.mark.parametrize("methods", ["all", ["all"], None])
def test_all_on_a_flow_suite_runs_its_own_methods(methods, monkeypatch, tmp_path):
    import flowdistill.nf.bench

    seen = []
    monkeypatch.setattr(
        flowdistill.nf.bench, "run_nf_bench", lambda suite, methods, *a: seen.append(methods)
    )
    run_bench("nf-digits", methods, out=tmp_path, **QUIET)
    assert seen == [None]  # run_nf_bench's own: every flow-distillation method


def test_gap_closed_is_not_defined_for_a_teacher_no_better_than_the_student(
    tmp_path, teacher_scoring
):
    """A teacher that scores below the student alone (an untrained one, a quick run's) has
    no gap to close: the summary holds None and the tables n/a, not a ratio of the wrong
    sign; a teacher above the student keeps the ratio."""
    from flowdistill.bench import compact_table, markdown_table, runner

    reported = teacher_scoring(runner)
    said = []
    common = dict(seeds=1, epochs=1, cache=tmp_path / "cache", progress=False)
    reported["metric"] = 0.0
    results = run_bench("digits", ["kd"], out=tmp_path / "low", log=said.append, **common)
    assert all(row["gap_closed"] is None for row in results["summary"].values())
    assert any("gap closed is not defined" in line for line in said)
    for table in (compact_table(results), markdown_table(results)):
        rows = [line for line in table.splitlines() if line.startswith("| kd ")]
        assert rows and "| n/a |" in rows[0]
    on_disk = json.loads((tmp_path / "low" / "results.json").read_text())
    assert on_disk["summary"]["kd"]["gap_closed"] is None

    reported["metric"] = 1.0  # (a perfect teacher: the ratio is back)
    results = run_bench("digits", ["kd"], out=tmp_path / "high", log=said.append, **common)
    s = results["summary"]
    assert s["kd"]["gap_closed"] == pytest.approx(
        (s["kd"]["mean"] - s["student"]["mean"]) / (1.0 - s["student"]["mean"])
    )
    assert "n/a" not in compact_table(results)


@pytest.mark.parametrize(
    "teacher,student,method,higher,expected",
    [
        (0.9, 0.6, 0.75, True, 0.5),  # accuracy: half way from the student to the teacher
        (0.9, 0.6, 0.6, True, 0.0),
        (0.9, 0.6, 0.5, True, -1 / 3),  # below the student alone
        (2.7, 3.0, 2.85, False, 0.5),  # bits/char: lower is better
        (2.7, 3.0, 3.0, False, 0.0),  # (0, not -0: the student row reads +0.00)
        (2.7, 3.0, 2.6, False, 4 / 3),  # past the teacher
        (0.5, 0.6, 0.7, True, None),  # a teacher below the student: no gap to close
        (0.6, 0.6, 0.7, True, None),
        (3.1, 3.0, 2.9, False, None),
        (float("nan"), 3.0, 2.9, False, None),
    ],
)
def test_gap_closed_against_hand_computed_values(teacher, student, method, higher, expected):
    from flowdistill.bench.report import gap_cell, gap_closed, gap_scale

    value = gap_closed(method, student, gap_scale(teacher, student, higher))
    if expected is None:
        assert value is None and gap_cell({"gap_closed": value}) == "n/a"
    else:
        assert value == pytest.approx(expected)
        if expected == 0:
            assert math.copysign(1.0, value) == 1.0
        assert gap_cell({"gap_closed": value}) == f"{expected:+.2f}".replace("-0.00", "+0.00")


def test_flow_tables_show_an_undefined_gap_as_n_a():
    from pathlib import Path

    from flowdistill.bench import compact_table, markdown_table

    path = Path(__file__).parents[1] / "benchmarks" / "nf-digits" / "results.json"
    results = json.loads(path.read_text())
    assert results["kind"] == "nf"
    assert "n/a" not in compact_table(results)
    for row in results["summary"].values():
        row["gap_closed"] = None
    for table in (compact_table(results), markdown_table(results)):
        heads = ("| student ", "| teacher ")
        rows = [line for line in table.splitlines() if line.startswith(heads)]
        assert len(rows) == 2 and all("| n/a |" in row for row in rows)


def test_options_set_on_a_method_leave_its_variants_at_the_suite_s_options():
    """`--set flowdistill.X` changes flowdistill alone: flowdistill-anchored run beside it
    keeps the suite's flowdistill options (which it inherits), unless set by its own name."""
    suite = get_suite("shakespeare-char")
    methods = ["flowdistill", "flowdistill-anchored", "flowdistill-nocond"]
    before = {m: method_config(suite, m) for m in methods}
    assert before["flowdistill-anchored"]["logit_weight"] == 0.0  # (inherited from the suite)
    given = _with_options(suite, methods, {"flowdistill": {"distill_logits": False}}, {})
    after = {m: method_config(given, m) for m in methods}
    assert after["flowdistill"] == {**before["flowdistill"], "distill_logits": False}
    assert after["flowdistill-anchored"] == before["flowdistill-anchored"]
    assert after["flowdistill-nocond"] == before["flowdistill-nocond"]
    both = {"flowdistill": {"steps": 4}, "flowdistill-nocond": {"steps": 3}}
    given = _with_options(suite, methods, both, {})
    assert method_config(given, "flowdistill")["steps"] == 4
    assert method_config(given, "flowdistill-nocond")["steps"] == 3
    assert "steps" not in method_config(given, "flowdistill-anchored")
