"""Training-step and inference cost of methods, measured side by side on one suite's pair.

    python benchmarks/cost.py --suite cifar10-cpu --methods student,kd,diffkd,flowdistill \\
        --out benchmarks/cifar10-cpu/cost.json

Every method wraps the suite's teacher and a fresh student; their training steps (forward,
backward, optimizer step on one fixed batch) are timed round-robin -- one step of each method
in turn, many rounds -- so that a change in machine load hits every method alike. Reported
per method: the median step time and its ratio to the student-alone step, the *module cost*
(method − kd) / (diffkd − kd) when both are listed, parameters added for training, deployed
parameters and the median ``predict`` time ratio. On a shared CPU only the ratios mean much.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowdistill.bench.provenance import provenance
from flowdistill.bench.runner import (
    DEFAULT_CACHE,
    _build,
    _check_buildable,
    _teacher,
    method_config,
)
from flowdistill.bench.suites import get_suite
from flowdistill.distillers import make_distiller


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--methods", required=True, help="comma-separated")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    out = Path(args.out)
    if out.is_dir():
        raise SystemExit(f"--out {out} is a folder; give the JSON file to write")
    try:  # (before anything is timed, not after)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"--out {out}: its folder cannot be created ({err})") from None

    suite = get_suite(args.suite)
    data = suite.load_data()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "student" not in methods:
        methods.insert(0, "student")
    _check_buildable(suite, data, methods, {}, data.train.x[:8])  # before the teacher trains
    teacher, teacher_info = _teacher(suite, data, DEFAULT_CACHE, False, print)
    x, y = data.train.x[: suite.batch_size], data.train.y[: suite.batch_size]
    steps, opts = {}, {}
    for method in methods:
        torch.manual_seed(0)
        d = make_distiller(
            method, teacher, _build(suite.student, data), example_input=data.train.x[:8],
            **method_config(suite, method),
        )  # fmt: skip
        d.on_fit_start(len(data.train))
        d.on_fit_targets(data.train.y)  # (as fit calls them: CRD draws negatives by class)
        d.batch_index = torch.arange(len(y))
        d.train()
        d.on_epoch_start(suite.epochs - 1, suite.epochs)  # the full (final) configuration
        steps[method] = d
        opts[method] = torch.optim.SGD(d.trainable_parameters(), lr=1e-3, momentum=0.9)

    def step(method: str) -> float:
        t0 = time.perf_counter()
        loss = steps[method](x, y)["loss"]
        opts[method].zero_grad(set_to_none=True)
        loss.backward()
        opts[method].step()
        return time.perf_counter() - t0

    for m in methods:  # warm-up
        step(m)
        step(m)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            times[m].append(step(m))
    infer: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad():
        for d in steps.values():
            d.eval()
        for _ in range(args.rounds):
            for m in methods:
                t0 = time.perf_counter()
                steps[m].predict(x)
                infer[m].append(time.perf_counter() - t0)

    med = {m: float(np.median(v)) for m, v in times.items()}
    imed = {m: float(np.median(v)) for m, v in infer.items()}
    rows = {}
    for m in methods:
        row = {
            "step_seconds_median": med[m],
            "step_time_ratio": med[m] / med["student"],
            "extra_params": steps[m].num_extra_params(),
            "deployed_params": steps[m].num_deployed_params(),
            "inference_time_ratio": imed[m] / imed["student"],
        }
        if "kd" in med and "diffkd" in med and med["diffkd"] > med["kd"]:
            row["module_cost_vs_diffkd"] = (med[m] - med["kd"]) / (med["diffkd"] - med["kd"])
        rows[m] = row
    command = shlex.join(["python", "benchmarks/cost.py", *(argv or sys.argv[1:])])
    config = {"suite": suite.name, "methods": methods, "rounds": args.rounds,
              "batch_size": suite.batch_size, "teacher": teacher_info["checkpoint"]}  # fmt: skip
    record = {"suite": suite.name, "methods": rows,
              "provenance": {**provenance(command, config), "seeds": [0]}}  # fmt: skip
    out.write_text(json.dumps(record, indent=1) + "\n")
    print("| method | step ÷ student | module cost ÷ DiffKD's | extra params | deployed params |")
    print("| --- | --- | --- | --- | --- |")
    for m, r in rows.items():
        mc = r.get("module_cost_vs_diffkd")
        mc_s = f"{mc:.2f}" if mc is not None else "–"
        print(f"| {m} | {r['step_time_ratio']:.2f} | {mc_s} | {r['extra_params']:,} | "
              f"{r['deployed_params']:,} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    from flowdistill.cli import reported

    raise SystemExit(reported(main, "cost.py"))
