"""What FlowDistill's feature term still teaches a trained student: a probe on mnist-cpu.

    python benchmarks/mnist-cpu/feature_flow_probe.py --seeds 3 \\
        --out benchmarks/mnist-cpu/feature_flow_probe.json

The flow is fitted by flow matching on *paired* endpoints (adapter output ``a``, teacher
feature ``t``). At that fit's optimum it would transport ``a`` to an estimate of
``E[t | a]``, and a student trained through the frozen flow on ``||Phi(a) - t||²`` would
receive a gradient ``J^T (Phi(a) - t)`` whose mean over the teachers sharing an ``a`` is
zero. Whether the trained flows come near that is the question asked here. This probe
loads the last-epoch distiller of each seed of the bench (``--runs``, weights kept by the
bench beside each run) and, on the validation split (never the test split), compares per
batch for the feature pair:

- the matching error of the adapter output, ``mse(a, t)``, and of its transport,
  ``mse(Phi(a), t)``;
- the gradient the student's feature gets through the flow, ``d mse(Phi(a), t) / d a``,
  against the direct one, ``d mse(a, t) / d a`` (what the no-flow ablation trains on): the
  ratio of their norms and their cosine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowdistill.bench.provenance import provenance
from flowdistill.bench.runner import DEFAULT_CACHE, _build, _teacher, method_config
from flowdistill.bench.suites import get_suite
from flowdistill.distillers import make_distiller
from flowdistill.engine.checkpoint import load_checkpoint
from flowdistill.taps import LOGITS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="flowdistill")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--runs", default="benchmarks/mnist-cpu/runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    suite = get_suite("mnist-cpu")
    for seed in range(args.seeds):  # the runs' weights, before the teacher is trained
        weights = Path(args.runs) / args.method / f"seed{seed}" / "last.safetensors"
        if not weights.exists():
            raise SystemExit(
                f"{weights} is absent: the probe reads the last weights of the mnist-cpu "
                "bench's runs, which the bench keeps beside each run but which are not "
                "committed; run the bench first (with --out benchmarks/mnist-cpu)"
            )
    data = suite.load_data()
    teacher, teacher_info = _teacher(suite, data, DEFAULT_CACHE, False, print)
    options = method_config(suite, args.method)
    rows: dict[str, list[float]] = {}
    per_seed = {}
    for seed in range(args.seeds):
        weights = Path(args.runs) / args.method / f"seed{seed}" / "last.safetensors"
        if not weights.exists():
            raise SystemExit(f"{weights} is absent: run the mnist-cpu bench first")
        torch.manual_seed(seed)
        student = _build(suite.student, data, suite.task)
        d = make_distiller(args.method, teacher, student, example_input=data.train.x[:8], **options)
        tensors, _ = load_checkpoint(weights)  # the run's student and method modules
        state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        result = d.load_state_dict(state, strict=False)
        if result.unexpected_keys or any(not k.startswith("teacher.") for k in result.missing_keys):
            raise SystemExit(f"{weights} does not fit {args.method}: {result}")
        d.eval()
        seed_rows: dict[str, list[float]] = {}
        bs = suite.batch_size
        for b in range(args.batches):
            x = data.val.x[b * bs : (b + 1) * bs]
            context, pairs = d.endpoints(x)
            for key, s_name, a, t in pairs:
                if s_name == LOGITS:
                    continue
                a = a.detach().requires_grad_(True)
                direct = F.mse_loss(a, t)
                (g_direct,) = torch.autograd.grad(direct, a)
                moved = d._transport(key, a, 1.0, d.steps, context, True)
                through = F.mse_loss(moved, t)
                (g_flow,) = torch.autograd.grad(through, a)
                g_flow, g_direct = g_flow.flatten(), g_direct.flatten()
                found = {
                    "mse_adapter": float(direct.detach()),
                    "mse_transported": float(through.detach()),
                    "grad_norm_ratio": float(g_flow.norm() / g_direct.norm().clamp_min(1e-12)),
                    "grad_cosine": float(F.cosine_similarity(g_flow, g_direct, 0)),
                }
                for k, v in found.items():
                    seed_rows.setdefault(k, []).append(v)
                    rows.setdefault(k, []).append(v)
        per_seed[seed] = {k: float(np.mean(v)) for k, v in seed_rows.items()}
    summary = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1
                   else 0.0}
               for k, v in rows.items()}  # fmt: skip
    command = shlex.join(["python", "benchmarks/mnist-cpu/feature_flow_probe.py",
                          *(argv or sys.argv[1:])])  # fmt: skip
    config = {"suite": suite.name, "method": args.method, "options": options,
              "batches": args.batches, "runs": args.runs,
              "teacher": teacher_info["checkpoint"]}  # fmt: skip
    record = {
        "summary": summary,
        "per_seed": per_seed,
        "provenance": {**provenance(command, config), "seeds": list(range(args.seeds))},
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    for k, v in summary.items():
        print(f"{k}: {v['mean']:.4f} ± {v['std']:.4f}")
    return 0


if __name__ == "__main__":
    from flowdistill.cli import reported

    raise SystemExit(reported(main, "feature_flow_probe.py"))
