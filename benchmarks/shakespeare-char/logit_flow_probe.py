"""Why FlowDistill's logit transport hurts on shakespeare-char: a probe on the selection split.

    python benchmarks/shakespeare-char/logit_flow_probe.py --steps 400 \\
        --out benchmarks/shakespeare-char/logit_flow_probe.json

A student distilled by ``kd`` (the bench's seed-0 run, which must exist) is frozen; FlowDistill's
flows (the suite's options, logits transported too) are trained by flow matching alone for
``--steps`` batches of the training split. On batches of the selection split (never the
held-out one) the probe then compares, per token:

- the KL divergence from the teacher of the student's own logits, ``KL(t || a)``, and of the
  transported logits, ``KL(t || Phi(a))``;
- the gradient that the logit transport term sends to the student's logits against the gradient
  of plain KD (cosine and norm ratio);
- for the hidden states, the relative error of the adapter and of the transport.
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

from flowdistill import losses
from flowdistill.bench.provenance import provenance
from flowdistill.bench.runner import DEFAULT_CACHE, _build, _teacher, method_config
from flowdistill.bench.suites import get_suite
from flowdistill.distillers import make_distiller
from flowdistill.distillers.flowdistill import _rel
from flowdistill.engine.checkpoint import load_model_weights
from flowdistill.taps import LOGITS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--runs", default="benchmarks/shakespeare-char/runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batches < 1:
        raise SystemExit(f"--steps and --batches must be >= 1, got {args.steps}, {args.batches}")
    student_file = Path(args.runs) / "kd" / "seed0" / "model.safetensors"
    if not student_file.exists():  # (before the teacher, which may have to be trained)
        raise SystemExit(f"{student_file} is absent: run the shakespeare-char bench with kd first")

    suite = get_suite("shakespeare-char")
    data = suite.load_data()
    teacher, teacher_info = _teacher(suite, data, DEFAULT_CACHE, False, print)
    torch.manual_seed(0)
    student = _build(suite.student, data, suite.task)
    load_model_weights(student, student_file)
    student.requires_grad_(False)
    options = {**method_config(suite, "flowdistill"), "logit_weight": 1.0}
    d = make_distiller("flowdistill", teacher, student, example_input=data.train.x[:8], **options)
    opt = torch.optim.AdamW(d.velocities.parameters(), lr=suite.optim.lr)
    gen = torch.Generator().manual_seed(0)
    d.train()
    fm_curve = []
    for _ in range(args.steps):
        idx = torch.randint(0, len(data.train), (suite.batch_size,), generator=gen)
        x = data.train.x[idx]
        context, pairs = d.endpoints(x)
        fm = sum(d._flow_matching(key, a.detach(), t, context) for key, _, a, t in pairs)
        opt.zero_grad()
        fm.backward()
        opt.step()
        fm_curve.append(float(fm.detach()))

    d.eval()
    rows: dict[str, list[float]] = {}
    bs = suite.batch_size
    for b in range(args.batches):
        x = data.val.x[b * bs : (b + 1) * bs]
        context, pairs = d.endpoints(x)
        for key, s_name, a, t in pairs:
            if s_name != LOGITS:
                with torch.no_grad():
                    moved = d._transport(key, a, 1.0, d.steps, context, True)
                rows.setdefault("hidden_adapter_error", []).append(_rel(a, t))
                rows.setdefault("hidden_transport_error", []).append(_rel(moved, t))
                continue
            a = a.detach().requires_grad_(True)
            kd = losses.kd(a, t, d.temperature)
            (g_kd,) = torch.autograd.grad(kd, a)
            moved = d._transport(key, a, 1.0, d.steps, context, True)
            through = losses.kd(moved, t, d.temperature)
            (g_flow,) = torch.autograd.grad(through, a)
            g_kd, g_flow = g_kd.flatten(0, -2), g_flow.flatten(0, -2)  # one row per token
            rows.setdefault("kl_teacher_student", []).append(float(kd.detach()))
            rows.setdefault("kl_teacher_transported", []).append(float(through.detach()))
            cos = F.cosine_similarity(g_kd, g_flow, dim=1).mean()
            rows.setdefault("grad_cosine", []).append(float(cos))
            ratio = (g_flow.norm(dim=1) / g_kd.norm(dim=1).clamp_min(1e-12)).median()
            rows.setdefault("grad_norm_ratio", []).append(float(ratio))
    summary = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))}
               for k, v in rows.items()}  # fmt: skip
    command = shlex.join(["python", "benchmarks/shakespeare-char/logit_flow_probe.py",
                          *(argv or sys.argv[1:])])  # fmt: skip
    config = {"suite": suite.name, "options": options, "steps": args.steps,
              "batches": args.batches, "student": str(student_file),
              "teacher": teacher_info["checkpoint"]}  # fmt: skip
    record = {
        "summary": summary,
        "fm_loss_first_last": [fm_curve[0], fm_curve[-1]],
        "provenance": {**provenance(command, config), "seeds": [0]},
    }
    out = Path(args.out)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for k, v in summary.items():
        print(f"{k}: {v['mean']:.4f} ± {v['std']:.4f}")
    return 0


if __name__ == "__main__":
    from flowdistill.cli import reported

    raise SystemExit(reported(main, "logit_flow_probe.py"))
