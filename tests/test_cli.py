import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from flowdistill.cli import main
from flowdistill.distillers import REGISTRY, VARIANTS


def test_methods_lists_name_then_description(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(REGISTRY) + sorted(VARIANTS)
    for line in lines[: len(REGISTRY)]:
        name, description = line.split(maxsplit=1)
        first_line = REGISTRY[name].__doc__.strip().splitlines()[0]
        assert description.startswith(first_line) and description.endswith(".")  # a sentence


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "flowdistill", "methods"], capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[0] == sorted(REGISTRY)[0]


def test_output_into_a_closed_pipe_ends_quietly():
    """``flowdistill suites | head``: a reader that stops early leaves no traceback."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (buffered)
    child = subprocess.Popen(
        [sys.executable, "-m", "flowdistill", "suites"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    child.stdout.close()  # before the child has written anything (it is still importing)
    err = child.stderr.read().decode()
    assert child.wait() == 1 and err == ""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A model module the project has never seen, importable as ``usernets``."""
    (tmp_path / "usernets.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Net(torch.nn.Module):
                def __init__(self, width, classes=10):
                    super().__init__()
                    flat = torch.nn.Flatten()
                    lin = torch.nn.Linear(64, width)
                    self.body = torch.nn.Sequential(flat, lin, torch.nn.ReLU())
                    self.head = torch.nn.Linear(width, classes)

                def forward(self, x):
                    return self.head(self.body(x))

            def make(width=32):
                return Net(width)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_train_teacher_then_distill_user_models(tmp_path, user_package, capsys):
    teacher_cfg = tmp_path / "teacher.yaml"
    teacher_cfg.write_text(
        f"teacher: {{name: 'usernets:make', kwargs: {{width: 64}}}}\n"
        f"train: {{epochs: 2, progress: false}}\nout_dir: {tmp_path / 't'}\n"
    )
    assert main(["train-teacher", "--config", str(teacher_cfg)]) == 0
    assert (tmp_path / "t" / "best.safetensors").is_file()
    capsys.readouterr()
    distill_cfg = tmp_path / "distill.yaml"
    ckpt = tmp_path / "t" / "best.safetensors"
    distill_cfg.write_text(
        textwrap.dedent(
            f"""
            method: kd
            method_options: {{temperature: 2.0}}
            teacher: {{name: 'usernets:make', kwargs: {{width: 64}}, checkpoint: {ckpt}}}
            student: {{name: 'usernets:make', kwargs: {{width: 8}}}}
            train: {{epochs: 2, progress: false}}
            out_dir: {tmp_path / "s"}
            """
        )
    )
    assert main(["distill", "--config", str(distill_cfg), "optim.lr=0.1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["test_acc_last"] <= 1.0 and report["extra_params"] == 0
    result = json.loads((tmp_path / "s" / "result.json").read_text())
    assert result["config"]["optim"]["lr"] == 0.1
    # resuming with other settings than the run's is refused, naming them
    capsys.readouterr()
    args = ["distill", "--config", str(distill_cfg), "--resume", "train.epochs=3"]
    assert main([*args, "method_options.temperature=4.0"]) == 2
    err = capsys.readouterr().err
    assert "method_options.temperature: 2.0 -> 4.0; optim.lr: 0.1 -> 0.05" in err
    assert len(json.loads((tmp_path / "s" / "metrics.json").read_text())) == 2
    # resume a finished run with its own settings: continues to the new epoch count
    # (overrides on both sides of a flag)
    assert main(["distill", "--config", str(distill_cfg), "train.epochs=3", "--resume",
                 "optim.lr=0.1", "--no-progress"]) == 0  # fmt: skip
    assert len(json.loads((tmp_path / "s" / "metrics.json").read_text())) == 3
    # other teacher weights under the same path: another run, refused
    from flowdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    weights, meta = load_checkpoint(ckpt)
    first = next(iter(weights))
    save_checkpoint(ckpt, {**weights, first: weights[first] + 1.0}, meta)
    capsys.readouterr()
    assert main([*args[:-1], "train.epochs=4", "optim.lr=0.1", "--no-progress"]) == 2
    assert "teacher_weights:" in capsys.readouterr().err


def test_an_override_into_a_value_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim: 0.1\n")
    assert main(["distill", "--config", str(cfg), "--no-progress", "optim.name=sgd"]) == 2
    assert "'optim' must be a mapping, got 0.1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["distill", "--config", "absent.yaml"], "config file not found"),
        (["bench", "--suite", "digits", "--methods", "kd,nope"], "unknown method 'nope'"),
        (["bench", "--suite", "digitz"], "unknown suite 'digitz'"),
        (["bench", "--suite", "digits", "--methods", ","], "names no method"),
    ],
)
def test_bad_input_exits_with_a_message(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowdistill: error:") and message in err


def test_bad_config_and_corrupt_teacher_checkpoint(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: kd\ntrain: {epochs: 1, progres: false}\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "unknown key 'train.progres'" in capsys.readouterr().err
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    cfg.write_text(
        f"method: kd\nteacher: {{name: digits_teacher, checkpoint: {bad}}}\n"
        f"train: {{epochs: 1, progress: false}}\nout_dir: {tmp_path / 'o'}\n"
    )
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "corrupted" in capsys.readouterr().err
    cfg.write_text("method: kd\ntrain: {epochs: 1, progress: false}\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "needs a trained teacher" in capsys.readouterr().err


def test_bench_writes_results_and_reuses_finished_runs(tmp_path, capsys):
    args = [
        "bench",
        "--suite",
        "digits",
        "--methods",
        "kd",
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "b"),
        "--teacher-cache",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| kd |" in out and "| student |" in out
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["suite"] == "digits" and results["metric"] == "test_acc"
    assert results["higher_is_better"] is True
    assert {"name", "params", "metric"} <= set(results["teacher"])
    assert results["teacher"]["params"] == 8254 and results["teacher"]["metric"] > 0.95
    assert results["student"]["params"] == 745
    assert len(results["runs"]) == 4
    row = results["runs"][0]
    assert {"method", "seed", "metric", "best_val_metric", "mean_step_seconds"} <= set(row)
    assert row["inference_seconds"] > 0
    s = results["summary"]
    assert set(s) == {"student", "kd"} and s["student"]["n"] == 2
    assert s["student"]["gap_closed"] == 0.0 and s["student"]["step_time_ratio"] == pytest.approx(
        1.0
    )
    kd = [r["metric"] for r in results["runs"] if r["method"] == "kd"]
    assert s["kd"]["mean"] == pytest.approx(sum(kd) / 2)
    assert s["kd"]["deployed_params"] == 745 and s["kd"]["inference_time_ratio"] > 0
    expected_gap = (s["kd"]["mean"] - s["student"]["mean"]) / (
        results["teacher"]["metric"] - s["student"]["mean"]
    )
    assert s["kd"]["gap_closed"] == pytest.approx(expected_gap)
    prov = results["provenance"]
    assert {"command", "commit", "config", "machine", "torch_version", "date"} <= set(prov)
    assert prov["command"].startswith("flowdistill bench --suite digits")
    for name in ("results.md", "val_curves.png", "summary.png"):
        assert (tmp_path / "b" / name).stat().st_size > 0
    assert main(args) == 0  # a second run reuses the finished runs and the cached teacher
    again = capsys.readouterr().out
    assert "reusing the cached teacher" in again
    assert len(re.findall(r"seed \d: reusing", again)) == 4
    # the compact README table of those results: rows in order, module cost by hand
    assert main(["table", "--compact", str(tmp_path / "b" / "results.json")]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    ranked = sorted(s, key=lambda m: -s[m]["mean"])
    assert [r[0].strip("| ") for r in rows] == ranked
    by_name = {r[0].strip("| "): r for r in rows}
    assert by_name["kd"][1] == f"{100 * s['kd']['mean']:.2f} ± {100 * s['kd']['std']:.2f}"
    assert len(by_name["kd"]) == 5  # no diffkd row: no module-cost column


def test_table_of_a_missing_or_foreign_file(tmp_path, capsys):
    assert main(["table", str(tmp_path / "absent.json")]) == 2
    assert "no benchmark results at" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text('{"x": 1}')
    assert main(["table", "--compact", str(other)]) == 2
    assert "is not a flowdistill bench results.json" in capsys.readouterr().err


def test_demo_runs_the_digits_bench_with_every_method(tmp_path, monkeypatch, capsys):
    """``make demo`` runs ``flowdistill demo``: the digits suite, every method, 3 seeds,
    the suite's own schedules, no tuning (the bench itself is tested above)."""
    import flowdistill.bench

    seen = {}

    def fake_run_bench(suite, **kw):
        seen.update(kw, suite=suite)
        (tmp_path / "demo").mkdir()
        (tmp_path / "demo" / "results.md").write_text("| table |\n")
        return {"ok": True}

    monkeypatch.setattr(flowdistill.bench, "run_bench", fake_run_bench)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert seen["suite"] == "digits" and seen["methods"] is None and seen["seeds"] == 3
    assert seen["epochs"] is None and seen["teacher_epochs"] is None
    assert seen["tune"] is False and seen["budget"] == 1.0
    assert "| table |" in capsys.readouterr().out


def _results(methods, command, epochs=10, student_metric=0.60, tuned=(), tune=None):
    """A bench results.json as ``bench`` writes it (two seeds), built by hand."""
    runs, summary = [], {}
    for i, method in enumerate(methods):
        metric = student_metric if method == "student" else 0.62 + 0.01 * len(method)
        for seed in (0, 1):
            runs.append({"method": method, "seed": seed, "metric": metric + 0.001 * seed,
                         "best_val_metric": metric, "best_val_epoch": epochs,
                         "mean_step_seconds": 0.01, "inference_seconds": 0.001})  # fmt: skip
        summary[method] = {"mean": metric + 0.0005, "std": 0.0007, "n": 2,
                           "best_val_mean": metric, "best_val_std": 0.0, "gap_closed": 0.1 * i,
                           "step_time_ratio": 1.0 + i, "extra_params": 10 * i,
                           "deployed_params": 100, "inference_time_ratio": 1.0}  # fmt: skip
    config = {"suite": "s", "seeds": [0, 1], "epochs": epochs, "teacher_epochs": 15,
              "batch_size": 64, "budget": 1.0, "optim": {"lr": 0.1}}  # fmt: skip
    if tune is not None:
        config["tune"] = tune
    results = {"suite": "s", "metric": "test_acc", "unit": "%", "higher_is_better": True,
               "seeds": 2, "teacher": {"name": "t", "params": 9, "metric": 0.7,
                                       "checkpoint": "c/best.safetensors"},
               "student": {"name": "s", "params": 5, "metric": student_metric}, "runs": runs,
               "summary": summary}  # fmt: skip
    results["provenance"] = {"command": command, "config": config}
    if tuned:
        results["tuning"] = {"seeds": [0], "score": "val", "higher_is_better": True,
                             "methods": {m: {"points": [{"options": {}, "val": [0.6],
                                                         "val_mean": 0.6}], "chosen": {}}
                                         for m in tuned}}  # fmt: skip
    return results


def test_table_merges_benches_of_one_recipe(tmp_path, capsys):
    from flowdistill.bench.report import compact_table

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results(["student", "kd"], "bench A", tuned=["student", "kd"])))
    b.write_text(json.dumps(_results(["student", "fitnet"], "bench B", tuned=["fitnet"])))
    merged_file = tmp_path / "m.json"
    assert main(["table", "--compact", str(a), str(b), "--merged-out", str(merged_file)]) == 0
    table = capsys.readouterr().out
    merged = json.loads(merged_file.read_text())
    assert set(merged["summary"]) == {"student", "kd", "fitnet"}
    assert len(merged["runs"]) == 6  # the student's two runs once
    assert set(merged["tuning"]["methods"]) == {"student", "kd", "fitnet"}
    assert [p["command"] for p in merged["merged_from"]] == ["bench A", "bench B"]
    assert table == compact_table(merged) and "step" not in table  # no times across benches
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    assert rows == ["fitnet", "kd", "student"]  # by accuracy: 0.68, 0.64, 0.60
    assert main(["table", str(a), str(b)]) == 0
    full = capsys.readouterr().out
    assert "Merged from" in full and "`bench B`" in full and "| — |" in full


@pytest.mark.parametrize(
    "change,message",
    [
        ({"student_metric": 0.59}, "method 'student' ran differently"),
        ({"epochs": 20}, "their epochs differ"),
        ({"tune": True}, "their tune differ"),  # tuned rows beside untuned ones
    ],
)
def test_table_refuses_to_merge_different_benches(tmp_path, capsys, change, message):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results(["student", "kd"], "bench A")))
    b.write_text(json.dumps(_results(["student", "fitnet"], "bench B", **change)))
    assert main(["table", str(a), str(b)]) == 2
    assert message in capsys.readouterr().err


def test_bench_set_gives_a_method_its_options(tmp_path, capsys):
    """--set METHOD.OPTION=VALUE reaches training and the record: kd at its default
    temperature set explicitly trains the default run; another temperature trains another."""
    common = ["bench", "--suite", "digits", "--methods", "kd", "--seeds", "1", "--epochs", "1",
              "--teacher-cache", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip

    def bench(name, *extra):
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        capsys.readouterr()
        results = json.loads((tmp_path / name / "results.json").read_text())
        run = json.loads((tmp_path / name / "runs" / "kd" / "seed0" / "result.json").read_text())
        return results, [h["train_loss"] for h in run["history"]]

    default, default_loss = bench("default")
    same, same_loss = bench("same", "--set", "kd.temperature=4.0")
    other, other_loss = bench("other", "--set", "kd.temperature=1", "--set", "kd.kd_weight=0.5")
    assert same_loss == default_loss and other_loss != default_loss
    assert same["summary"]["kd"]["mean"] == default["summary"]["kd"]["mean"]
    options = other["provenance"]["config"]["method_options"]["kd"]
    assert options["temperature"] == 1 and options["kd_weight"] == 0.5
    assert "--set kd.temperature=1" in other["provenance"]["command"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "kd.temperature"], "--set takes METHOD.OPTION=VALUE"),
        (["--set", "kd.temprature=1"], "kd has no option 'temprature'; did you mean 'temperature'"),
        (["--set", "fitnet.hint_weight=1"], "'fitnet', which this bench does not run"),
        (["--set", "kd.temperature=1", "--tune"], "kd.temperature is chosen by --tune"),
        (["--set", "kd.temperature=1", "--set", "kd.temperature=2"], "kd.temperature twice"),
        (["--set", "kd.example_input=1"], "kd.example_input cannot be set"),
    ],
)
def test_bench_set_refuses_what_cannot_apply(extra, message, tmp_path, capsys):
    args = ["bench", "--suite", "digits", "--methods", "kd", "--out", str(tmp_path / "b")]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything trained


def test_bench_set_refuses_an_option_a_variant_fixes(tmp_path, capsys):
    args = ["bench", "--suite", "digits", "--methods", "flowdistill-noinv", "--out", str(tmp_path)]
    assert main([*args, "--set", "flowdistill-noinv.flow=true"]) == 2
    assert "fixes flow=False" in capsys.readouterr().err
    assert main(["bench", "--suite", "nf-digits", "--set", "all_kd.synth=1"]) == 2
    assert "--set is for classification and language-model suites" in capsys.readouterr().err


def test_table_refuses_folders_lists_and_unwritable_outputs(tmp_path, capsys):
    assert main(["table", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    assert main(["table", str(listed)]) == 2
    assert "not a mapping" in capsys.readouterr().err
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(["table", str(binary)]) == 2
    assert "is not a flowdistill bench results.json" in capsys.readouterr().err


def test_zoo_models_get_the_data_arguments_they_take():
    """The CLI and the bench give a zoo model the data's classes, and input channels only
    to the models that take them (the CIFAR zoo reads RGB images alone)."""
    from flowdistill.models import data_kwargs

    assert data_kwargs("resnet8", 10, 3) == {"num_classes": 10}
    assert data_kwargs("small_cnn", 4, 1) == {"num_classes": 4, "in_channels": 1}
    assert data_kwargs("mypkg.nets:make", 4, 1) == {}


def test_models_returning_features_and_logits_name_their_logits(tmp_path, monkeypatch, capsys):
    (tmp_path / "tuplenets.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Net(torch.nn.Module):
                def __init__(self, width):
                    super().__init__()
                    self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width))
                    self.head = torch.nn.Linear(width, 10)

                def forward(self, x):
                    h = torch.relu(self.body(x))
                    return h, self.head(h)  # (features, logits)

            def make(width=32):
                return Net(width)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = "{name: 'tuplenets:make', kwargs: {width: %d}, output: 1%s}"
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"teacher: {model % (64, '')}\ntrain: {{epochs: 1, progress: false}}\n"
                   f"out_dir: {tmp_path / 't'}\n")  # fmt: skip
    assert main(["train-teacher", "--config", str(cfg)]) == 0
    ckpt = tmp_path / "t" / "best.safetensors"
    cfg.write_text(
        f"method: kd\nteacher: {model % (64, f', checkpoint: {ckpt}')}\n"
        f"student: {model % (8, '')}\ntrain: {{epochs: 1, progress: false}}\n"
        f"out_dir: {tmp_path / 's'}\n"
    )
    assert main(["distill", "--config", str(cfg)]) == 0
    # without naming the output, the first tensor (the features) would be taken: refused
    capsys.readouterr()
    assert main(["distill", "--config", str(cfg), "student.output=null",
                 f"out_dir={tmp_path / 'u'}"]) == 2  # fmt: skip
    assert "student_output=" in capsys.readouterr().err


def test_your_own_method_by_import_path_in_the_api_and_the_cli(tmp_path, monkeypatch, capsys):
    """A Distiller subclass of the user's own (options keyword-only), named as
    ``module:Class``: imported, registered under that name, trained from a config."""
    (tmp_path / "mymethods.py").write_text(
        textwrap.dedent(
            '''
            import torch.nn.functional as F
            from flowdistill import Distiller

            class MSELogits(Distiller):
                """Cross-entropy plus the squared error between the logits."""

                def __init__(self, teacher, student, *, mse_weight: float = 1.0, **base):
                    super().__init__(teacher, student, **base)
                    self.mse_weight = mse_weight

                def forward(self, inputs, targets):
                    t = self.teacher_forward(inputs)["logits"]
                    s = self.student_forward(inputs)["logits"]
                    ce = self.cross_entropy(s, targets)
                    return self.total({"ce": ce, "mse": self.mse_weight * F.mse_loss(s, t)})
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("flowdistill.distillers.registry.REGISTRY", dict(REGISTRY))  # (undone)
    import flowdistill

    teacher = flowdistill.models.create_model("digits_teacher")
    student = flowdistill.models.create_model("digits_student")
    d = flowdistill.make_distiller("mymethods:MSELogits", teacher, student, mse_weight=2.0)
    x = torch.randn(4, 1, 8, 8)
    terms = d(x, torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():  # the oracle: the two terms by hand
        mse = F.mse_loss(student(x), teacher.eval()(x))
    torch.testing.assert_close(terms["mse"], 2.0 * mse)
    assert flowdistill.method_options("mymethods:MSELogits")["mse_weight"] == 1.0
    with pytest.raises(flowdistill.errors.UnknownMethodError, match="cannot import 'Nope'"):
        flowdistill.make_distiller("mymethods:Nope", teacher, student)
    ckpt = tmp_path / "t.safetensors"
    from flowdistill.engine.checkpoint import save_checkpoint

    save_checkpoint(ckpt, teacher.state_dict(), {})
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"method: 'mymethods:MSELogits'\nmethod_options: {{mse_weight: 0.5}}\n"
        f"teacher: {{name: digits_teacher, checkpoint: {ckpt}}}\n"
        f"train: {{epochs: 1, progress: false}}\nout_dir: {tmp_path / 'run'}\n"
    )
    assert main(["distill", "--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["config"]["method"] == (
        "mymethods:MSELogits"
    )


def _lm_configs(tmp_path, data: str, method: str) -> None:
    """Configs on ``data`` (its YAML line): a character GPT teacher, trained here
    (``t.yaml``), and a smaller student distilled by ``method`` (YAML lines; ``s.yaml``)."""
    common = data + "optim: {name: adamw, lr: 0.003}\ntrain: {epochs: 2, progress: false}\n"
    gpt = "name: gpt, kwargs: {n_layer: 1, n_head: 2, n_embd: "
    (tmp_path / "t.yaml").write_text(
        common + f"teacher: {{{gpt}32}}}}\nout_dir: {tmp_path / 't'}\n"
    )
    assert main(["train-teacher", "--config", str(tmp_path / "t.yaml")]) == 0
    (tmp_path / "s.yaml").write_text(
        common + method
        + f"teacher: {{{gpt}32}}, checkpoint: {tmp_path / 't' / 'best.safetensors'}}}\n"
        f"student: {{{gpt}16}}}}\nout_dir: {tmp_path / 's'}\n"
    )  # fmt: skip


def test_a_language_model_from_a_text_file_by_config(tmp_path, capsys):
    """``data: {name: text}``: a corpus as next-character windows, the zoo GPT sized from
    it (vocabulary and context), a teacher trained and a student distilled from configs;
    the bits per character printed are the held-out cross-entropy of the saved student,
    recomputed here from its weights."""
    import math

    from flowdistill.data import char_splits
    from flowdistill.engine.checkpoint import load_model_weights
    from flowdistill.models import create_model

    text = "to be, or not to be, that is the question: whether 'tis nobler in the mind. " * 12
    (tmp_path / "corpus.txt").write_text(text)
    data = (f"data: {{name: text, path: {tmp_path / 'corpus.txt'}, block_size: 16, "
            "val_fraction: 0.1, test_fraction: 0.1, batch_size: 16}\n")  # fmt: skip
    _lm_configs(tmp_path, data, "method: kd\nmethod_options: {temperature: 1.0}\n")
    capsys.readouterr()
    assert main(["distill", "--config", str(tmp_path / "s.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out)
    splits, tok = char_splits(text, 16, 0.1, select_fraction=0.1)
    student = create_model("gpt", vocab_size=tok.vocab_size, block_size=16, n_layer=1,
                           n_head=2, n_embd=16)  # fmt: skip
    load_model_weights(student, tmp_path / "s" / "model.safetensors")
    with torch.no_grad():
        logits = student.eval()(splits.test.x)
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), splits.test.y.reshape(-1))
    assert printed["test_bpc_last"] == pytest.approx(float(nats) / math.log(2), rel=1e-4)
    assert printed["test_bpc_last"] < math.log2(tok.vocab_size)  # it learned something
    assert main(["distill", "--config", str(tmp_path / "s.yaml"), "data.block_size=0",
                 f"out_dir={tmp_path / 'x'}"]) == 2  # fmt: skip
    assert "data.block_size must be >= 1" in capsys.readouterr().err
    # the teacher's vocabulary is kept beside its weights, and a corpus whose characters
    # map to other ids (the same count: "z" for "q") is refused
    assert json.loads((tmp_path / "t" / "vocab.json").read_text()) == tok.vocab
    (tmp_path / "other.txt").write_text(text.replace("q", "z"))
    other = [f"data.path={tmp_path / 'other.txt'}", f"out_dir={tmp_path / 'y'}"]
    assert main(["distill", "--config", str(tmp_path / "s.yaml"), *other]) == 2
    assert "the teacher" in (err := capsys.readouterr().err) and "vocabulary of" in err
    assert not (tmp_path / "y").exists()


def test_an_unknown_flag_is_still_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", "--config", "absent.yaml", "a.b=1", "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_an_out_dir_that_cannot_be_created_is_named_before_training(tmp_path):
    import os

    from flowdistill import OptimConfig, TrainConfig, fit, make_distiller
    from flowdistill.data import digits_splits
    from flowdistill.errors import ConfigError
    from flowdistill.models import create_model

    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(locked, os.W_OK):  # (root writes anywhere: use a path no one can create)
        target = "/proc/flowdistill-test/run"
    else:
        target = str(locked / "run")
    d = make_distiller("student", None, create_model("digits_student"))
    with pytest.raises(ConfigError, match="cannot be created"):
        fit(d, digits_splits(), OptimConfig(), TrainConfig(epochs=1, progress=False), target)
    os.chmod(locked, 0o700)
    made = tmp_path / "new" / "deeper"  # a folder that can be made: the check leaves nothing
    from flowdistill.engine.trainer import _check_creatable

    _check_creatable(made)
    assert not (tmp_path / "new").exists()


def test_a_one_seed_table_shows_no_spread():
    from flowdistill.bench.report import compact_table, markdown_table

    results = _results(["student", "kd"], "bench")
    for row in results["summary"].values():
        row.update(n=1, std=0.0, best_val_std=0.0)  # as mean_std gives one seed
    for table in (compact_table(results), markdown_table(results)):
        rows = [line for line in table.splitlines() if line.startswith("| kd ")]
        assert rows and "(1 seed)" in rows[0] and "±" not in rows[0]


def test_a_language_model_from_a_file_of_documents_by_config(tmp_path, capsys):
    """``data: {name: lines}``: one document per line, padded on the left with an attention
    mask; a teacher and a student from configs, the printed bits per character recomputed
    from the saved student over the real tokens of the held-out documents."""
    import math

    from flowdistill.data import line_splits
    from flowdistill.engine.checkpoint import load_model_weights
    from flowdistill.models import create_model

    docs = [
        "to be, or not to be",
        "that is the question",
        "whether 'tis nobler",
        "in the mind to suffer",
        "the slings and arrows",
        "of outrageous fortune",
        "or to take arms",
        "against a sea of troubles",
        "and by opposing end them",
    ] * 4
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n\n")
    data = (
        f"data: {{name: lines, path: {tmp_path / 'docs.txt'}, block_size: 16, "
        "val_fraction: 0.2, test_fraction: 0.2, padding_side: left, batch_size: 8}\n"
    )
    taps = "method_options: {student_taps: [blocks.0], teacher_taps: [blocks.0]}\n"
    _lm_configs(tmp_path, data, "method: flowdistill\n" + taps)
    capsys.readouterr()
    assert main(["distill", "--config", str(tmp_path / "s.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out)
    splits, tok = line_splits("\n".join(docs), 16, 0.2, 0.2, side="left")
    assert json.loads((tmp_path / "s" / "vocab.json").read_text()) == tok.vocab
    student = create_model("gpt", vocab_size=tok.vocab_size, block_size=16, n_layer=1,
                           n_head=2, n_embd=16)  # fmt: skip
    load_model_weights(student, tmp_path / "s" / "model.safetensors")
    with torch.no_grad():
        logits = student.eval()(**splits.test.x)
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), splits.test.y.reshape(-1))
    assert printed["test_bpc_last"] == pytest.approx(float(nats) / math.log(2), rel=1e-4)
    assert main(["distill", "--config", str(tmp_path / "s.yaml"), "data.padding_side=top",
                 f"out_dir={tmp_path / 'x'}"]) == 2  # fmt: skip
    assert "data.padding_side must be 'right' or 'left'" in capsys.readouterr().err
