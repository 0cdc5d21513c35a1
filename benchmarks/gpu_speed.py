"""Training-step time of each method against the compute floor, through the project's own
training loop, and the wall time a full schedule would take at that speed.

    python benchmarks/gpu_speed.py --suite cifar100 --methods kd,flowdistill,diffkd,fmkt \\
        --channels-last --compile --out benchmarks/gpu/speed.json

For each method the suite's pair (randomly initialised: speed does not depend on the
weights) distils on GPU-resident CIFAR-sized tensors with ``flowdistill.engine.fit``: one
epoch of ``--steps`` steps to warm up (compilation, autotuning), then a second epoch whose
mean step time (CUDA events) is the result. Reported per method: step seconds, FLOPs of the
step and of the compute floor (teacher forward + student forward/backward, counted by
``flowdistill.bench.speed.step_flops``), step ÷ floor time at the GPU's bf16 peak, and the
wall time of the suite's whole schedule at that step time (an estimate: steps × step time,
evaluation left out). The teacher trained alone (``teacher-alone``) is timed the same way.
On a CPU the script runs too (for its tests), but only a GPU's times mean anything.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from flowdistill.bench.provenance import provenance
from flowdistill.bench.runner import _build, method_config
from flowdistill.bench.speed import peak_flops, step_flops
from flowdistill.bench.suites import get_suite
from flowdistill.config import TrainConfig
from flowdistill.data.datasets import Split, Splits
from flowdistill.distillers import make_distiller
from flowdistill.engine import fit

#: training images of the standard suites (45,000 of the official 50,000; 5,000 validate)
TRAIN_IMAGES = 45_000


def _synthetic(n: int, classes: int, generator: torch.Generator) -> Split:
    x = torch.randn(n, 3, 32, 32, generator=generator)
    return Split(x, torch.randint(0, classes, (n,), generator=generator))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cifar100")
    parser.add_argument("--methods", default="kd,flowdistill,diffkd,fmkt")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed epoch")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the suite's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    suite = get_suite(args.suite)
    batch = args.batch_size or suite.batch_size
    classes = 100 if args.suite.startswith("cifar100") else 10
    g = torch.Generator().manual_seed(0)
    data = Splits(
        _synthetic(args.steps * batch, classes, g), _synthetic(batch, classes, g),
        _synthetic(batch, classes, g), classes,
    )  # fmt: skip
    train = TrainConfig(
        epochs=2, device=args.device, progress=False, augment_padding=suite.augment_padding,
        channels_last=args.channels_last, compile=args.compile,
    )  # fmt: skip
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = {}
    device_name = None
    for method in ["teacher-alone", "student", *[m for m in methods if m != "student"]]:
        torch.manual_seed(0)
        if method == "teacher-alone":
            d = make_distiller("student", None, _build(suite.teacher, data))
        else:
            d = make_distiller(
                method, _build(suite.teacher, data), _build(suite.student, data),
                example_input=data.train.x[:8], **method_config(suite, method),
            )  # fmt: skip
        d.on_epoch_start(1, 2)  # counted as in the timed epoch, the last (full schedule)
        flops = step_flops(d, data.train.x[:batch], data.train.y[:batch])
        result = fit(d, data, suite.optim, train, batch_size=batch)
        device = next(d.student.parameters()).device
        if device.type == "cuda":
            device_name = torch.cuda.get_device_name(device)
        seconds = result.history[-1]["step_seconds"]
        steps_per_epoch = math.ceil(TRAIN_IMAGES / batch)
        epochs = suite.teacher_epochs if method == "teacher-alone" else suite.epochs
        row = {
            "step_seconds": seconds,
            "step_flops": flops["step"],
            "floor_flops": flops["floor"],
            "schedule_seconds_estimate": seconds * steps_per_epoch * epochs,
        }
        peak = peak_flops(device_name) if device_name else None
        if peak:
            row["step_over_floor"] = seconds / (flops["floor"] / peak)
        rows[method] = row
        minutes = row["schedule_seconds_estimate"] / 60
        print(f"{method}: {1000 * seconds:.2f} ms/step, {flops['step'] / 1e9:.2f} GFLOP "
              f"(floor {flops['floor'] / 1e9:.2f}), {epochs} epochs ≈ {minutes:.1f} min",
              flush=True)  # fmt: skip
    student = rows["student"]["step_seconds"]
    for row in rows.values():
        row["step_time_ratio"] = row["step_seconds"] / student
    command = shlex.join(["python", "benchmarks/gpu_speed.py", *(argv or sys.argv[1:])])
    config = {"suite": suite.name, "methods": list(rows), "steps": args.steps,
              "batch_size": batch, "channels_last": args.channels_last,
              "compile": args.compile, "amp": train.amp, "device": device_name or "cpu",
              "peak_bf16_flops": peak_flops(device_name) if device_name else None}  # fmt: skip
    record = {"suite": suite.name, "methods": rows,
              "provenance": {**provenance(command, config), "seeds": [0]}}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from flowdistill.cli import reported

    raise SystemExit(reported(main, "gpu_speed.py"))
