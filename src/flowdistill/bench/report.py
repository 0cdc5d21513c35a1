"""Tables and plots of a benchmark's ``results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "compact_table",
    "markdown_table",
    "merge_results",
    "plot_diagnostics",
    "plot_results",
    "tuning_table",
]

#: what two benches must share for their rows to stand in one table
_SAME_RECIPE = (
    "suite", "seeds", "epochs", "teacher_epochs", "batch_size", "budget", "optim", "tune",
)  # fmt: skip


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _formatter(results: dict[str, Any]):
    """Number formatting by unit: accuracy in %, bits per token with 4 decimals."""
    if results.get("unit", "%") == "%":
        return _pct
    return lambda x: f"{x:.4f}"


def _ratio(row: dict[str, Any], key: str) -> str:
    """A time ratio, or a dash where a merged table has none."""
    return f"{row[key]:.2f}" if key in row else "—"


def gap_scale(teacher: float, student: float, higher_is_better: bool, log=None) -> float | None:
    """The teacher's lead over the student alone, ``teacher − student``, by which *gap
    closed* = (method − student) ÷ it; ``None`` where the teacher scores no better than
    the student (or either is not finite): there is no gap to close, which ``log`` is told."""
    gap = teacher - student
    better = gap > 0 if higher_is_better else gap < 0  # (False for NaN)
    if better and math.isfinite(gap):
        return gap
    if log is not None:
        log(
            f"the teacher ({teacher:.4g}) scores no better than the student alone "
            f"({student:.4g}): gap closed is not defined (n/a in the tables)"
        )
    return None


def gap_closed(method: float, student: float, gap: float | None) -> float | None:
    """(method − student) ÷ ``gap`` (from :func:`gap_scale`): 0 for the student alone, 1
    for a method level with the teacher, whichever way the metric points."""
    return None if gap is None else (method - student) / gap + 0.0  # (+0.0: no "-0.00")


def gap_cell(row: dict[str, Any]) -> str:
    """Gap closed, or ``n/a`` where it is not defined (a teacher no better than the
    student alone)."""
    value = row["gap_closed"]
    return "n/a" if value is None or math.isnan(value) else f"{value + 0.0:+.2f}"


def _cell(fmt, mean, std, n: int | None = None) -> str:
    """``mean ± std``; a single seed has no spread to show (``mean (1 seed)``)."""
    if mean is None:
        return "—"
    if n == 1:
        return f"{fmt(mean)} (1 seed)"
    return f"{fmt(mean)} ± {fmt(std)}"


def merge_results(parts: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """One ``results.json`` from benches of the same suite, recipe, seeds and teacher run
    separately (methods added later, say). A method that two of them ran must have run
    identically (the same metric for every seed: the student of each, for one); otherwise,
    or when the recipes differ, :class:`~flowdistill.errors.ConfigError` names the
    difference. Step and inference times of different benches were measured under different
    loads, so the merged summary leaves them out; ``merged_from`` keeps every part's
    provenance."""
    from ..errors import ConfigError

    if not parts:
        raise ConfigError("nothing to merge")
    names = names or [f"part {i + 1}" for i in range(len(parts))]
    first, base = parts[0], parts[0]["provenance"]["config"]
    for name, part in zip(names[1:], parts[1:], strict=True):
        config = part["provenance"]["config"]
        for key in _SAME_RECIPE:
            if config.get(key) != base.get(key):
                raise ConfigError(
                    f"cannot merge {names[0]} and {name}: their {key} differ "
                    f"({base.get(key)!r} vs {config.get(key)!r})"
                )
        if part["teacher"] != first["teacher"]:
            raise ConfigError(f"cannot merge {names[0]} and {name}: their teachers differ")
    rows: dict[str, list[dict]] = {}
    summary: dict[str, dict] = {}
    tuning: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name, part in zip(names, parts, strict=True):
        for method, row in part["summary"].items():
            mine = [(r["seed"], r["metric"], r["best_val_metric"])
                    for r in part["runs"] if r["method"] == method]  # fmt: skip
            if method in rows:
                theirs = [(r["seed"], r["metric"], r["best_val_metric"]) for r in rows[method]]
                if mine != theirs:
                    raise ConfigError(
                        f"cannot merge {where[method]} and {name}: method {method!r} ran "
                        "differently in them"
                    )
                continue
            where[method] = name
            rows[method] = [r for r in part["runs"] if r["method"] == method]
            summary[method] = {k: v for k, v in row.items()
                               if k not in ("step_time_ratio", "inference_time_ratio")}  # fmt: skip
        for method, record in part.get("tuning", {}).get("methods", {}).items():
            tuning.setdefault(method, record)
    merged = {k: v for k, v in first.items() if k not in ("runs", "summary", "tuning")}
    merged.update(
        runs=[r for rs in rows.values() for r in rs],
        summary=summary,
        merged_from=[{"results": n, **p["provenance"]} for n, p in zip(names, parts, strict=True)],
    )
    if tuning:
        merged["tuning"] = {**first.get("tuning", parts[-1].get("tuning", {})), "methods": tuning}
    return merged


def compact_table(results: dict[str, Any], timing: bool = True) -> str:
    """The summary as a short Markdown table for a README: accuracy (%, mean ± std over
    seeds) at the last and at the best-validation epoch, gap closed, training-step time over
    the student's and, when ``kd`` and ``diffkd`` ran, the *module cost* (method − kd) ÷
    (diffkd − kd) in step time. ``timing=False`` leaves the two timing columns out (for runs
    timed under uneven machine load, whose step times do not compare)."""
    if results.get("kind") == "nf":
        from ..nf.bench import compact_nf_table

        return compact_nf_table(results)
    timing = timing and "merged_from" not in results  # (times of separate benches)
    summary = results["summary"]
    kd, diff = summary.get("kd"), summary.get("diffkd")
    cost = timing and kd is not None and diff is not None
    cost = cost and diff["step_time_ratio"] > kd["step_time_ratio"]
    head = "| method | last epoch | at best-val epoch | gap closed |"
    head += " step ÷ student |" if timing else ""
    lines = [head + (" module cost ÷ DiffKD |" if cost else ""),
             "| --- " * (3 + timing + cost + 1) + "|"]  # fmt: skip
    order = sorted(summary.items(), key=lambda kv: kv[1]["mean"],
                   reverse=results["higher_is_better"])  # fmt: skip
    fmt = _formatter(results)
    for method, row in order:
        line = (
            f"| {method} | {_cell(fmt, row['mean'], row['std'], row.get('n'))} | "
            f"{_cell(fmt, row['best_val_mean'], row['best_val_std'], row.get('n'))} | "
            f"{gap_cell(row)} |"
        )
        if timing:
            line += f" {row['step_time_ratio']:.2f} |"
        if cost:
            base, span = kd["step_time_ratio"], diff["step_time_ratio"] - kd["step_time_ratio"]
            line += f" {(row['step_time_ratio'] - base) / span:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def markdown_table(results: dict[str, Any]) -> str:
    """The summary as a Markdown table (accuracy in %, mean ± std over seeds)."""
    if results.get("kind") == "nf":
        from ..nf.bench import markdown_nf_table

        return markdown_nf_table(results)
    t, s = results["teacher"], results["student"]
    fmt, unit = _formatter(results), results.get("unit", "%")
    lines = [
        f"## {results['suite']}: {results['metric']} ({unit}), mean ± std over "
        f"{results['seeds']} seed(s)",
        "",
        f"Teacher `{t['name']}` ({t['params']:,} params): {fmt(t['metric'])}. "
        f"Student `{s['name']}` ({s['params']:,} params).",
        "",
        "| method | last epoch | at best-val epoch | gap closed | step time ÷ student | "
        "extra params | deployed params | inference ÷ student |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = sorted(
        results["summary"].items(),
        key=lambda kv: kv[1]["mean"],
        reverse=results["higher_is_better"],
    )
    for method, row in order:
        lines.append(
            f"| {method} | {_cell(fmt, row['mean'], row['std'], row.get('n'))} | "
            f"{_cell(fmt, row['best_val_mean'], row['best_val_std'], row.get('n'))} | "
            f"{gap_cell(row)} | {_ratio(row, 'step_time_ratio')} | "
            f"{row['extra_params']:,} | {row['deployed_params']:,} | "
            f"{_ratio(row, 'inference_time_ratio')} |"
        )
    lines += [
        "",
        "*gap closed* = (method − student) / (teacher − student) on the last-epoch mean; "
        "*step time ÷ student* = mean training-step time over the student-alone step time "
        "of the same run; *deployed params* and *inference ÷ student* describe the model "
        "that predicts after training (one test batch, median time).",
    ]
    if "merged_from" in results:
        lines += ["", "Merged from separate benches of the same recipe, seeds and teacher "
                  "(no time ratios across them):", ""]  # fmt: skip
        lines += [f"- `{part['results']}`: `{part['command']}`" for part in results["merged_from"]]
    if "tuning" in results:
        lines += ["", tuning_table(results)]
    return "\n".join(lines) + "\n"


def tuning_table(results: dict[str, Any]) -> str:
    """Every grid point ``--tune`` tried, with its validation score; the chosen point of
    each method is in bold."""
    tuning = results["tuning"]
    fmt = _formatter(results)
    lines = [
        f"### Options chosen on the validation split ({tuning['score']}; seeds "
        f"{', '.join(map(str, tuning['seeds']))})",
        "",
        "| method | options | validation |",
        "| --- | --- | --- |",
    ]
    for method, record in tuning["methods"].items():
        for point in record["points"]:
            opts = ", ".join(f"{k}={v}" for k, v in point["options"].items()) or "(defaults)"
            score = "diverged" if point["val_mean"] is None else fmt(point["val_mean"])
            if point["options"] == record["chosen"]:
                opts, score = f"**{opts}**", f"**{score}**"
            lines.append(f"| {method} | {opts} | {score} |")
    return "\n".join(lines) + "\n"


def plot_results(
    results: dict[str, Any], curves: dict[str, list[list[float]]], out: Path
) -> list[str]:
    """``val_curves.png`` (mean validation accuracy per epoch) and ``summary.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    percent = results.get("unit", "%") == "%"
    scale = 100 if percent else 1
    what = "accuracy (%)" if percent else f"{results['unit']}"
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in sorted(curves.items()):
        length = min(len(r) for r in runs)
        arr = np.array([r[:length] for r in runs]) * scale
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, arr.mean(0), label=method, marker="o" if len(epochs) < 3 else None)
        ax.fill_between(epochs, arr.mean(0) - arr.std(0), arr.mean(0) + arr.std(0), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (whole epochs only)
    ax.set_ylabel(f"validation {what}")
    ax.set_title(f"{results['suite']}: validation {what.split(' ')[0]} (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "val_curves.png", dpi=110)
    plt.close(fig)
    written.append("val_curves.png")

    summary = results["summary"]
    methods = sorted(summary, key=lambda m: summary[m]["mean"])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(methods) + 1.5))
    means = [scale * summary[m]["mean"] for m in methods]
    stds = [scale * summary[m]["std"] for m in methods]
    ax.barh(methods, means, xerr=stds, color="tab:blue", alpha=0.8)
    teacher = scale * results["teacher"]["metric"]
    ax.axvline(teacher, color="k", ls="--", label="teacher")
    if percent:
        lo = min(means) - max(stds + [0.0]) - 1
        ax.set_xlim(max(lo, 0), min(100, teacher + 1))
    else:
        span = max(means + [teacher]) - min(means + [teacher])
        ax.set_xlim(min(means + [teacher]) - 0.1 * span, max(means) + 0.1 * span)
    ax.set_xlabel(f"test {what}, last epoch" if percent else f"held-out {what}, last epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    written.append("summary.png")
    return written


def plot_diagnostics(diags: dict[str, dict[str, list[float]]], out: Path) -> str:
    """``diagnostics.png``: per-epoch flow diagnostics (mean over seeds), one panel per kind
    (``transport_error``, ``roundtrip_error``, ...), one line per method and tap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({name.rsplit("/", 1)[1] for d in diags.values() for name in d})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for method, d in sorted(diags.items()):
            for name, values in sorted(d.items()):
                if name.endswith("/" + kind):
                    tap = name.rsplit("/", 1)[0]
                    ax.plot(range(1, len(values) + 1), values, label=f"{method} {tap}",
                            marker="o" if len(values) < 3 else None)  # fmt: skip
        ax.set_title(kind.replace("_", " "))
        ax.set_xlabel("epoch")
        if kind.endswith("roundtrip_error"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=110)
    plt.close(fig)
    return "diagnostics.png"
