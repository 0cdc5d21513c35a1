"""Choose a method's options on the validation split of a suite (never the test split).

    python benchmarks/tune.py --suite digits --method flowdistill \\
        --grid steps=1,2,4 kd_weight=0,1 --seeds 3 --out benchmarks/digits/tune_flowdistill.json

Every grid point is trained with the suite's recipe for each seed; the score is the final
validation accuracy (mean over seeds), reported with the best-validation-epoch accuracy; for a
language-model suite it is the final validation bits per token (lower is better), on the
selection split held back from the training text. The JSON written to ``--out`` holds every
point, its scores, the chosen point and provenance; test scores are neither recorded nor
looked at.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from flowdistill.bench.provenance import provenance
from flowdistill.bench.runner import (
    DEFAULT_CACHE,
    _bits,
    _build,
    _check_buildable,
    _teacher,
    _train_config,
    _val_score,
    follow_parent,
    method_config,
)
from flowdistill.bench.suites import get_suite
from flowdistill.distillers import make_distiller
from flowdistill.engine import fit
from flowdistill.errors import NonFiniteLossError


def parse_grid(items: list[str]) -> dict[str, list]:
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"grid entries look like key=v1,v2; got {item!r}")
        if key in grid:
            raise SystemExit(f"--grid names {key!r} twice; give its values once: {key}=v1,v2")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--grid", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--workers", type=int, default=1, help="runs trained at a time, in processes of their own"
    )
    args = parser.parse_args(argv)
    for flag, value in (("--workers", args.workers), ("--seeds", args.seeds),
                        ("--epochs", 1 if args.epochs is None else args.epochs)):  # fmt: skip
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    out = Path(args.out)
    if out.is_dir():
        raise SystemExit(f"--out {out} is a folder; give the JSON file to write")
    try:  # (before anything trains, not after)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"--out {out}: its folder cannot be created ({err})") from None

    suite = get_suite(args.suite)
    lm = suite.task == "lm"
    if lm and not suite.select_split:
        raise SystemExit(f"suite {suite.name} holds no selection split to tune on")
    name, scale = ("val_bpc", 1.0) if lm else ("val_acc", 100.0)
    grid = parse_grid(args.grid)
    data = suite.load_data()
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    # every point is built before the teacher trains: a wrong option stops at once
    _check_buildable(suite, data, [args.method], {args.method: combos}, data.train.x[:8])
    teacher, teacher_info = _teacher(suite, data, DEFAULT_CACHE, False, print)
    epochs = suite.epochs if args.epochs is None else args.epochs
    base = method_config(suite, args.method)
    jobs = [
        {"suite": suite.name, "method": args.method, "options": {**base, **options},
         "seed": seed, "epochs": epochs, "threads": max(1, torch.get_num_threads() // args.workers)}
        for options in combos for seed in range(args.seeds)
    ]  # fmt: skip
    if args.workers == 1:
        scores = [_run(job, suite, data, teacher) for job in jobs]
    else:  # points and seeds trained ``workers`` at a time, each in a process of its own
        context = mp.get_context("spawn")
        with ProcessPoolExecutor(
            args.workers, mp_context=context, initializer=follow_parent, initargs=(os.getpid(),)
        ) as pool:
            scores = list(pool.map(_run, jobs))
    points = []
    for i, options in enumerate(combos):
        runs = scores[i * args.seeds : (i + 1) * args.seeds]
        finals, bests, seconds = ([r[k] for r in runs] for k in range(3))
        point = {
            "options": options,
            f"{name}_last": finals,
            f"{name}_best": bests,
            "seconds": float(np.mean(seconds)),
        }
        diverged = [seed for seed, score in enumerate(finals) if score is None]
        if diverged:  # the worst point, whatever its other seeds scored
            point.update(score=None, score_std=None, diverged=diverged)
            print(f"{options}: diverged (a non-finite loss; seeds {diverged})")
        else:
            point["score"] = float(np.mean(finals))
            point["score_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
            print(f"{options}: {name} {scale * point['score']:.4f} ± "
                  f"{scale * point['score_std']:.4f}")  # fmt: skip
        points.append(point)
    scored = [p for p in points if p["score"] is not None]
    if not scored:
        raise SystemExit("every grid point diverged (a non-finite loss); nothing to choose")
    chosen = (min if lm else max)(scored, key=lambda p: p["score"])
    command = shlex.join(["python", "benchmarks/tune.py", *(argv or sys.argv[1:])])
    config = {"suite": suite.name, "method": args.method, "grid": grid, "epochs": epochs,
              "base_options": base, "teacher": teacher_info["checkpoint"]}  # fmt: skip
    record = {
        "suite": suite.name,
        "method": args.method,
        "metric": f"{name}_last (mean over seeds; {'lower' if lm else 'higher'} is better)",
        "points": points,
        "chosen": chosen["options"],
        "provenance": {**provenance(command, config), "seeds": list(range(args.seeds))},
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"chosen on validation: {chosen['options']} ({scale * chosen['score']:.4f})")
    return 0


def _run(job: dict, suite=None, data=None, teacher=None) -> tuple:
    """One grid point and seed: ``(final validation score, best-validation score, seconds)``,
    the scores ``None`` where the loss became non-finite (the point diverged). In a worker
    process the suite's data and cached teacher are loaded first."""
    if suite is None:
        torch.set_num_threads(job["threads"])
        suite = get_suite(job["suite"])
        data = suite.load_data()
        teacher, _ = _teacher(suite, data, DEFAULT_CACHE, False, lambda *_: None)
    seed = job["seed"]
    torch.manual_seed(seed)
    student = _build(suite.student, data, suite.task)
    distiller = make_distiller(
        job["method"], teacher, student, example_input=data.train.x[:8], **job["options"]
    )
    t0 = time.perf_counter()
    try:
        result = fit(
            distiller,
            data,
            suite.optim,
            _train_config(suite, epochs=job["epochs"], seed=seed, progress=False),
            batch_size=suite.batch_size,
        )
    except NonFiniteLossError:
        return None, None, time.perf_counter() - t0
    best = _bits(result.best_val_loss) if suite.task == "lm" else result.best_val_acc
    return _val_score(suite, result.to_dict()), best, time.perf_counter() - t0


if __name__ == "__main__":
    from flowdistill.cli import reported

    raise SystemExit(reported(main, "tune.py"))
