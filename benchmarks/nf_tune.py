"""Choose a flow-distillation method's loss weights on the validation split (never the test).

    python benchmarks/nf_tune.py --suite nf-digits --method final_kd \\
        --grid final=0.01,0.03,0.1,0.3 --seeds 2 --out benchmarks/nf-digits/tune_final_kd.json

Every grid point trains the suite's student with the suite's recipe for each seed; the score
is the last-epoch validation bits/dim (mean over seeds; lower is better), reported with the
best validation bits/dim. The JSON written to ``--out`` holds every point, its scores, the
chosen point and provenance; test bits/dim are neither recorded nor looked at.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from tune import parse_grid  # benchmarks/tune.py, beside this script

from flowdistill.bench.provenance import provenance
from flowdistill.bench.suites import get_suite
from flowdistill.nf.bench import DEFAULT_CACHE, _build, _teacher, nf_method_config
from flowdistill.nf.train import FlowDistiller, FlowKDConfig, fit_flow


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--grid", nargs="+", required=True, help="key=v1,v2 ... (FlowKDConfig fields)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    suite = get_suite(args.suite)
    if getattr(suite, "kind", None) != "nf":
        raise SystemExit(f"{args.suite} is not a flow-distillation suite")
    grid = parse_grid(args.grid)
    base = nf_method_config(suite, args.method)
    train = suite.train
    if args.epochs:
        train = dataclasses.replace(train, epochs=args.epochs)
    for values in itertools.product(*grid.values()):  # every point checked before training
        FlowKDConfig(**{**base, **dict(zip(grid, values, strict=True))}).validate()
    data = suite.load_data()
    teacher, teacher_info = _teacher(suite, data, DEFAULT_CACHE, False, print)
    points = []
    for values in itertools.product(*grid.values()):
        options = {**base, **dict(zip(grid, values, strict=True))}
        kd = FlowKDConfig(**options).validate()
        last, best = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            student = _build(suite.student, data)
            result = fit_flow(
                FlowDistiller(student, teacher, kd, n_bins=data.n_bins),
                data,
                dataclasses.replace(train, seed=seed, progress=False),
            )
            last.append(result.history[-1]["val_bpd"])
            best.append(result.best_val_bpd)
        point = {
            "options": options,
            "val_bpd_last": float(np.mean(last)),
            "val_bpd_last_std": float(np.std(last, ddof=1)) if len(last) > 1 else 0.0,
            "val_bpd_best": float(np.mean(best)),
        }
        print(json.dumps(point), flush=True)
        points.append(point)
    chosen = min(points, key=lambda q: q["val_bpd_last"])
    record = {
        "suite": args.suite,
        "method": args.method,
        "score": "last-epoch validation bits/dim, mean over seeds (lower is better)",
        "points": points,
        "chosen": chosen,
        "teacher": teacher_info,
        "provenance": provenance(
            shlex.join(["python", "benchmarks/nf_tune.py", *sys.argv[1:]]),
            {"grid": grid, "seeds": args.seeds, "train": dataclasses.asdict(train)},
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"chosen: {chosen['options']} (val bits/dim {chosen['val_bpd_last']:.4f})")
    return 0


if __name__ == "__main__":
    from flowdistill.cli import reported

    raise SystemExit(reported(main, "nf_tune.py"))
