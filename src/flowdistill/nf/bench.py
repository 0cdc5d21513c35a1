"""Benchmark suites for flow distillation: a cached deep teacher flow, then the small student
flow trained alone and with each distillation term, over seeds, side by side."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bench.provenance import provenance
from ..bench.report import gap_cell, gap_closed, gap_scale
from ..bench.runner import (
    DEFAULT_CACHE,
    _hash,
    _other_configuration,
    _params,
    _read_record,
    mean_std,
    runs_failed,
    same_run,
)
from ..bench.suites import data_dir, register_suite
from ..engine import distributed
from ..engine.checkpoint import atomic_write_text, digest, load_checkpoint
from ..errors import ConfigError, DataError
from .data import ImageData, digits_images, mnist_test_images
from .model import MultiScaleFlow
from .train import FlowDistiller, FlowKDConfig, FlowTrainConfig, fit_flow

__all__ = [
    "NF_METHODS",
    "NFSuite",
    "compact_nf_table",
    "markdown_nf_table",
    "run_nf_bench",
]

#: the methods of a flow-distillation suite: the loss weights each adds to the student's NLL
#: (bits/dim); chosen on the validation split of nf-digits (benchmarks/nf-digits/tune_*.json),
#: ``all_kd`` combining the three choices
NF_METHODS: dict[str, dict[str, Any]] = {
    "student": {},
    "intermediate_kd": {"intermediate": 0.003, "anneal": "linear"},
    "final_kd": {"final": 0.01},
    "synth_kd": {"synth": 0.1, "anneal": "linear"},
    "all_kd": {"intermediate": 0.003, "final": 0.01, "synth": 0.1, "anneal": "linear"},
}


@dataclass
class NFSuite:
    """A flow-distillation comparison: one teacher flow, one student flow, one recipe.

    ``teacher``/``student`` are :class:`MultiScaleFlow` keyword arguments (``levels``,
    ``steps``, ``hidden``, ...); ``method_options`` overrides :data:`NF_METHODS` weights."""

    name: str
    description: str
    load_data: Callable[[], ImageData]
    teacher: dict[str, Any]
    student: dict[str, Any]
    teacher_train: FlowTrainConfig
    train: FlowTrainConfig
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    sample_temperature: float = 0.7
    kind: str = "nf"
    metric: str = "test_bpd"
    higher_is_better: bool = False


def _build(spec: dict[str, Any], data: ImageData) -> MultiScaleFlow:
    return MultiScaleFlow(data.image_shape, **spec)


def _load(model: MultiScaleFlow, path: Path) -> MultiScaleFlow:
    tensors, _ = load_checkpoint(path)
    model.load_state_dict(tensors)
    return model.eval()


def nf_method_config(suite: NFSuite, method: str) -> dict[str, Any]:
    """The :class:`FlowKDConfig` fields ``method`` runs with in ``suite``."""
    if method not in NF_METHODS:
        close = difflib.get_close_matches(method, NF_METHODS, n=2)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(
            f"unknown method {method!r} for the flow suite {suite.name!r}{hint}; methods: "
            f"{', '.join(NF_METHODS)}"
        )
    return {**NF_METHODS[method], **suite.method_options.get(method, {})}


def _teacher(
    suite: NFSuite, data: ImageData, cache: Path, progress: bool, log, budget: float = 1.0
):
    key = {
        "suite": suite.name,
        "model": suite.teacher,
        "train": dataclasses.asdict(suite.teacher_train),
        "seed": 0,
    }
    if budget < 1.0:
        key["budget"] = budget
    folder = cache / f"{suite.name}-{_hash(key)}"
    result_file = folder / "result.json"
    if result_file.exists():
        log(f"teacher: reusing the cached teacher in {folder}")
        result = _read_record(result_file)
    else:
        log(f"teacher: training {suite.teacher} for {suite.teacher_train.epochs} epochs → {folder}")
        torch.manual_seed(0)
        train = dataclasses.replace(suite.teacher_train, seed=0, progress=progress)
        model = _build(suite.teacher, data)
        result = fit_flow(
            FlowDistiller(model, n_bins=data.n_bins), data, train, folder, resume=True,
            meta={"teacher_key": key},
        ).to_dict()  # fmt: skip
    teacher = _load(_build(suite.teacher, data), folder / "best.safetensors")
    teacher.requires_grad_(False)
    return teacher, {
        "config": suite.teacher,
        "params": _params(teacher),
        "metric": result["test_bpd_best_val"],
        "metric_last_epoch": result["test_bpd_last"],
        "best_val_epoch": result["best_val_epoch"],
        "checkpoint": str(folder / "best.safetensors"),
        "weights": digest(teacher.state_dict())[:16],
    }


@torch.no_grad()
def _sampling_speeds(
    models: dict[str, MultiScaleFlow], n: int, rounds: int = 7, temperature: float = 0.7
) -> dict[str, float]:
    """Samples per second of each model: rounds interleaved across the models (so machine
    load falls on all alike), median over rounds, after one warm-up call each."""
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.sample(n, temperature, generator)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: n / float(np.median(t)) for name, t in times.items()}


def _sample_grid(
    models: dict[str, MultiScaleFlow],
    temperature: float,
    out: Path,
    data: torch.Tensor | None = None,
    n_side: int = 6,
) -> str:
    """``samples.png``: an ``n_side x n_side`` grid of samples per model, from the same base
    noise (the flows share latent shapes), at ``temperature``; first, when given, a grid of
    ``data`` (images in ``[0, 1]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(models.values()))
    noise = first.sample_noise(n_side * n_side, temperature, torch.Generator().manual_seed(0))
    panels = {name: model.decode for name, model in models.items()}
    if data is not None:
        panels = {"data (test split)": lambda _noise: data[: n_side * n_side], **panels}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.3), squeeze=False)
    for ax, (name, decode) in zip(axes[0], panels.items(), strict=True):
        with torch.no_grad():
            y = decode(noise).clamp(0, 1)  # (n, C, H, W)
        y = torch.nn.functional.pad(y, (0, 1, 0, 1), value=1.0)  # a white line between images
        c, h, w = y.shape[1:]
        grid = y.reshape(n_side, n_side, c, h, w).permute(0, 3, 1, 4, 2)
        grid = grid.reshape(n_side * h, n_side * w, c).squeeze(-1).numpy()
        ax.imshow(grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"samples at temperature {temperature} (same base noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)
    return "samples.png"


def _plot_curves(results: dict[str, Any], curves: dict[str, list[list[float]]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in sorted(curves.items()):
        length = min(len(r) for r in runs)
        arr = np.array([r[:length] for r in runs])
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, arr.mean(0), label=method, marker="o" if len(epochs) < 3 else None)
        ax.fill_between(epochs, arr.mean(0) - arr.std(0), arr.mean(0) + arr.std(0), alpha=0.15)
    ax.axhline(results["teacher"]["metric"], color="k", ls="--", label="teacher (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation bits/dim")
    ax.set_title(f"{results['suite']}: validation bits/dim (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "val_curves.png", dpi=110)
    plt.close(fig)
    return "val_curves.png"


def run_nf_bench(
    suite: NFSuite,
    methods: list[str] | None = None,
    seeds: int = 3,
    epochs: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    cache: str | Path | None = None,
    command: str | None = None,
    log=print,
    budget: float = 1.0,
    teacher_epochs: int | None = None,
) -> dict[str, Any]:
    """Run a flow-distillation suite; write ``results.json``, ``results.md``,
    ``val_curves.png`` and ``samples.png`` into ``out``. Finished runs are reused and
    interrupted ones resume from their checkpoint; a run that fails does not stop the
    others (the failures are named once they have trained, and no table is written).
    ``teacher_epochs`` shortens the teacher's schedule (that teacher is cached apart)."""
    if distributed.world_size() > 1:
        raise ConfigError(f"the flow suite {suite.name!r} runs in one process (no torchrun)")
    if teacher_epochs is not None:
        if teacher_epochs < 1:
            raise ConfigError(f"--teacher-epochs must be >= 1, got {teacher_epochs}")
        teacher_train = dataclasses.replace(suite.teacher_train, epochs=teacher_epochs)
        suite = dataclasses.replace(suite, teacher_train=teacher_train)
    methods = list(methods) if methods else list(NF_METHODS)
    methods = [m for m in methods if m != "teacher"]  # the teacher row is always there
    options = {m: nf_method_config(suite, m) for m in methods}
    if "student" in methods:
        methods.remove("student")
    methods.insert(0, "student")
    options["student"] = nf_method_config(suite, "student")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    train_cfg = suite.train if epochs is None else dataclasses.replace(suite.train, epochs=epochs)
    train_cfg.validate()
    for m in methods:
        FlowKDConfig(**options[m]).validate()
    out = Path(out or Path("runs") / "bench" / suite.name)
    cache = Path(cache) if cache else DEFAULT_CACHE
    data = suite.load_data()
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"--budget must lie in (0, 1], got {budget}")
    if budget < 1.0:  # quick runs: the first fraction of the training images
        n = max(1, int(round(budget * len(data.train))))
        data = ImageData(data.train[:n], data.val, data.test, data.n_bins)
    teacher, teacher_info = _teacher(suite, data, cache, progress, log, budget)

    rows, curves, params = [], {}, {}
    failed: list[str] = []
    for method in methods:
        kd = FlowKDConfig(**options[method])
        for seed in range(seeds):
            key = {
                "suite": suite.name,
                "method": method,
                "kd": dataclasses.asdict(kd),
                "seed": seed,
                "train": dataclasses.asdict(train_cfg),
                "student": suite.student,
                "teacher": teacher_info["checkpoint"],
            }
            if budget < 1.0:
                key["budget"] = budget
            key["teacher_weights"] = teacher_info["weights"]  # not only the teacher's path
            run_dir = out / "runs" / method / f"seed{seed}"
            result_file = run_dir / "result.json"
            cached = _read_record(result_file) if result_file.exists() else None
            if cached is not None and same_run(cached, key):
                log(f"{method} seed {seed}: reusing {run_dir}")
                result = cached
            else:
                if cached is not None:
                    raise _other_configuration(run_dir, cached, key)
                torch.manual_seed(seed)
                student = _build(suite.student, data)
                distiller = FlowDistiller(student, teacher, kd, n_bins=data.n_bins)
                train = dataclasses.replace(train_cfg, seed=seed, progress=progress)
                try:
                    result = fit_flow(
                        distiller, data, train, run_dir, resume=True,
                        meta={"key_hash": _hash(key), "key": key},
                    ).to_dict()  # fmt: skip
                except Exception as err:  # the other runs go on
                    log(f"{method} seed {seed}: failed: {err}")
                    failed.append(f"{method} seed {seed} ({run_dir}): {err}")
                    continue
                log(
                    f"{method} seed {seed}: test bits/dim {result['test_bpd_last']:.4f} "
                    f"(at best val {result['test_bpd_best_val']:.4f})"
                )
            params[method] = result["params"]
            curves.setdefault(method, []).append([r["val_bpd"] for r in result["history"]])
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "metric": result["test_bpd_last"],
                    "best_val_metric": result["test_bpd_best_val"],
                    "best_val_epoch": result["best_val_epoch"],
                    "mean_step_seconds": result["mean_step_seconds"],
                }
            )
    if failed:
        raise runs_failed(failed, len(methods) * seeds)

    # sampling speed and samples of the seed-0 models, measured side by side
    models = {"teacher": teacher}
    for method in methods:
        path = out / "runs" / method / "seed0" / "model.safetensors"
        models[method] = _load(_build(suite.student, data), path)
    # every student row shares one architecture, hence one sampling speed: the teacher and
    # the student alone are timed against each other
    pair = {"teacher": teacher, "student": models["student"]}
    measured = _sampling_speeds(pair, n=1024, rounds=15, temperature=suite.sample_temperature)
    speeds = {m: measured["teacher" if m == "teacher" else "student"] for m in models}

    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    student_mean, _ = mean_std([r["metric"] for r in by_method["student"]])
    student_step = float(np.mean([r["mean_step_seconds"] for r in by_method["student"]]))
    gap = gap_scale(teacher_info["metric"], student_mean, False, log)  # (bits/dim: lower)
    summary = {
        "teacher": {
            "mean": teacher_info["metric_last_epoch"],
            "std": 0.0,
            "n": 1,
            "best_val_mean": teacher_info["metric"],
            "best_val_std": 0.0,
            "gap_closed": None if gap is None else 1.0,
            "paired_delta": float("nan"),
            "paired_delta_std": float("nan"),
            "params": teacher_info["params"],
            "samples_per_second": speeds["teacher"],
            "sampling_speed_vs_teacher": 1.0,
            "step_time_ratio": float("nan"),
        }
    }
    student_by_seed = {r["seed"]: r["metric"] for r in by_method["student"]}
    for m, rs in by_method.items():
        mean, std = mean_std([r["metric"] for r in rs])
        delta, delta_std = mean_std([r["metric"] - student_by_seed[r["seed"]] for r in rs])
        bmean, bstd = mean_std([r["best_val_metric"] for r in rs])
        summary[m] = {
            "mean": mean,
            "std": std,
            "n": len(rs),
            "best_val_mean": bmean,
            "best_val_std": bstd,
            "gap_closed": gap_closed(mean, student_mean, gap),
            "paired_delta": delta,
            "paired_delta_std": delta_std,
            "params": params[m],
            "samples_per_second": speeds[m],
            "sampling_speed_vs_teacher": speeds[m] / speeds["teacher"],
            "step_time_ratio": float(np.mean([r["mean_step_seconds"] for r in rs])) / student_step,
        }
    config = {
        "suite": suite.name,
        "description": suite.description,
        "methods": methods,
        "seeds": list(range(seeds)),
        "teacher": suite.teacher,
        "student": suite.student,
        "teacher_train": dataclasses.asdict(suite.teacher_train),
        "train": dataclasses.asdict(train_cfg),
        "method_options": options,
        "sample_temperature": suite.sample_temperature,
        "budget": budget,
    }
    results = {
        "suite": suite.name,
        "kind": "nf",
        "metric": suite.metric,
        "higher_is_better": suite.higher_is_better,
        "seeds": seeds,
        "teacher": teacher_info,
        "student": {"config": suite.student, "params": params["student"], "metric": student_mean},
        "runs": rows,
        "summary": summary,
        "provenance": provenance(command or shlex.join(["flowdistill", *sys.argv[1:]]), config),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", markdown_nf_table(results))
    _plot_curves(results, curves, out)
    real = data.test[:36].float() / (data.n_bins - 1)
    _sample_grid(models, suite.sample_temperature, out, real)
    return results


def _order(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The summary's rows, best first; the teacher's row gives its last epoch under "last
    epoch" (records written before the summary did so held its best-validation number
    there too; the teacher distilled is the best-validation one)."""
    summary = dict(results["summary"])
    last = results.get("teacher", {}).get("metric_last_epoch")
    if "teacher" in summary and last is not None:
        summary["teacher"] = {**summary["teacher"], "mean": last}
    return sorted(summary.items(), key=lambda kv: kv[1]["mean"],
                  reverse=results["higher_is_better"])  # fmt: skip


def _delta(row: dict[str, Any]) -> str:
    if "paired_delta" not in row or math.isnan(row["paired_delta"]):
        return "—"
    return f"{row['paired_delta']:+.4f} ± {row['paired_delta_std']:.4f}"


def compact_nf_table(results: dict[str, Any]) -> str:
    """The README's table: test bits/dim (mean ± std over seeds) at the last and at the
    best-validation epoch, the paired difference to the student alone (same seed), gap
    closed, parameters and sampling speed over the teacher's."""
    lines = [
        "| method | bits/dim, last epoch | at best-val epoch | − student (paired) | gap closed "
        "| params | sampling speed ÷ teacher |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, row in _order(results):
        lines.append(
            f"| {method} | {row['mean']:.4f} ± {row['std']:.4f} | "
            f"{row['best_val_mean']:.4f} ± {row['best_val_std']:.4f} | {_delta(row)} | "
            f"{gap_cell(row)} | {row['params']:,} | "
            f"{row['sampling_speed_vs_teacher']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_nf_table(results: dict[str, Any]) -> str:
    """``results.md``: the full table with absolute sampling throughput."""
    t, s = results["teacher"], results["student"]
    lines = [
        f"## {results['suite']}: test bits/dim (lower is better), mean ± std over "
        f"{results['seeds']} seed(s)",
        "",
        f"Teacher flow {t['config']} ({t['params']:,} params, trained once, seed 0): "
        f"{t['metric']:.4f} at its best-validation epoch (the weights distilled)"
        + (f", {t['metric_last_epoch']:.4f} at its last" if "metric_last_epoch" in t else "")
        + f". Student flow {s['config']} ({s['params']:,} params).",
        "",
        "| method | last epoch | at best-val epoch | − student (paired) | gap closed | params | "
        "samples/s | sampling speed ÷ teacher | training step ÷ student |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, row in _order(results):
        lines.append(
            f"| {method} | {row['mean']:.4f} ± {row['std']:.4f} | "
            f"{row['best_val_mean']:.4f} ± {row['best_val_std']:.4f} | {_delta(row)} | "
            f"{gap_cell(row)} | {row['params']:,} | {row['samples_per_second']:,.0f} | "
            f"{row['sampling_speed_vs_teacher']:.1f} | "
            + ("—" if math.isnan(row["step_time_ratio"]) else f"{row['step_time_ratio']:.2f}")
            + " |"
        )
    lines += [
        "",
        "*− student (paired)* = mean ± std over seeds of (method − student alone of the same "
        "seed), last epoch; *gap closed* = (student − method) / (student − teacher) in bits/dim "
        "on the last-epoch mean; *samples/s*: 256 samples per call at the suite's "
        "temperature, median over 15 rounds alternating teacher and student (seed 0; every "
        "student row shares the student's architecture, hence its speed; absolute values "
        "depend on the machine, the ratio much less).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- suites
def _mnist() -> ImageData:
    folder = os.path.join(data_dir(), "mnist")
    if not os.path.isfile(os.path.join(folder, "t10k-images-idx3-ubyte.gz")):
        raise DataError(
            f"the nf-mnist suite reads {folder}/t10k-images-idx3-ubyte.gz (and its labels), "
            "which is absent; set FLOWDISTILL_DATA to the folder holding mnist/"
        )
    return mnist_test_images(folder, seed=0)


register_suite(
    NFSuite(
        name="nf-digits",
        description="scikit-learn 8×8 digits (embedded, 17 levels), 60/20/20 seeded split: "
        "a 3-level flow with 8 steps per level (width 64) → 3 levels of 2 steps (width 16)",
        load_data=digits_images,
        teacher={"levels": 3, "steps": 8, "hidden": 64},
        student={"levels": 3, "steps": 2, "hidden": 16},
        teacher_train=FlowTrainConfig(epochs=40, lr=1e-3, batch_size=64),
        train=FlowTrainConfig(epochs=40, lr=1e-3, batch_size=64),
    )
)

register_suite(
    NFSuite(
        name="nf-mnist",
        description="MNIST 28×28 (256 levels): the 10,000 official test images split "
        "80/10/10 (the training images are not at hand); a 2-level flow with 6 steps per level "
        "(width 64) → 2 levels of 2 steps (width 16)",
        load_data=_mnist,
        teacher={"levels": 2, "steps": 6, "hidden": 64},
        student={"levels": 2, "steps": 2, "hidden": 16},
        teacher_train=FlowTrainConfig(epochs=20, lr=1e-3, batch_size=64),
        train=FlowTrainConfig(epochs=10, lr=1e-3, batch_size=64),
        sample_temperature=0.6,
    )
)
