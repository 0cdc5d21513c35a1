"""Flow-core benchmark: velocity evaluations per second, and round-trip error against steps.

    python benchmarks/flows/bench_flows.py [--out benchmarks/flows] [--device cpu|cuda]

Writes ``results.json`` (numbers and provenance) and ``results.md`` (tables) into ``--out``.

* Throughput: a velocity network (vector MLP and convolutional) is evaluated repeatedly on
  one batch; reported as velocity evaluations per second (network calls x batch size), and
  each solver's time per solve relative to Euler at the same number of steps.
* Accuracy: for a fixed randomly perturbed field, ``||Phi^-1(Phi(x)) - x|| / ||x||`` for each
  fixed-step solver and number of steps (float64), the observed convergence order, and
  dopri5's error and function-evaluation count at several tolerances.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from flowdistill.bench.provenance import provenance
from flowdistill.flows import ConvVelocity, FlowMap, MLPVelocity

FIXED = ("euler", "midpoint", "heun", "rk4")
CALLS = 50  # network calls per throughput measurement
STEPS = (1, 2, 4, 8, 16, 32)


def _perturbed(net: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p))
    return net


class _Counted(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, **cond):
        self.calls += 1
        return self.net(x, t, **cond)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    cases = {
        "mlp d=64 h=256 B=256": (MLPVelocity(64, hidden=256, depth=3), (256, 64)),
        "conv C=16 8x8 h=64 B=64": (ConvVelocity(16, hidden=64, depth=2), (64, 16, 8, 8)),
    }
    for name, (net, shape) in cases.items():
        net = _perturbed(net, 0.05, 0).to(device).eval()
        x = torch.randn(shape, device=device)
        with torch.no_grad():
            sec = _time(lambda n=net, z=x: [n(z, 0.5) for _ in range(CALLS)], device, repeats)
            row = {"net": name, "evals_per_second": CALLS * shape[0] / sec, "solve_cost": {}}
            for method in FIXED:
                flow = FlowMap(net, steps=8, method=method)
                row["solve_cost"][method] = _time(lambda f=flow, z=x: f(z), device, repeats)
            euler = row["solve_cost"]["euler"]
            row["solve_cost_vs_euler"] = {m: s / euler for m, s in row["solve_cost"].items()}
        rows.append(row)
    return rows


def accuracy() -> dict:
    net = _Counted(_perturbed(MLPVelocity(8, hidden=64, depth=2).double(), 0.2, 1))
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out: dict = {"fixed": {}, "order": {}, "dopri5": []}
    with torch.no_grad():
        moved = FlowMap(net, steps=64, method="rk4")(x)
        out["displacement"] = float((moved - x).norm() / x.norm())
        for method in FIXED:
            errs = []
            for steps in STEPS:
                flow = FlowMap(net, steps=steps, method=method)
                errs.append(float((flow.inverse(flow(x)) - x).norm() / x.norm()))
            out["fixed"][method] = dict(zip(map(str, STEPS), errs, strict=True))
            # observed order from the last two step counts: log2(e(n/2) / e(n))
            out["order"][method] = math.log2(errs[-2] / errs[-1]) if errs[-1] > 0 else None
        for rtol in (1e-3, 1e-5, 1e-7, 1e-9):
            net.calls = 0
            flow = FlowMap(net, steps=1, method="dopri5", rtol=rtol, atol=rtol * 1e-2)
            err = float((flow.inverse(flow(x)) - x).norm() / x.norm())
            out["dopri5"].append({"rtol": rtol, "roundtrip_error": err, "nfe": net.calls})
    return out


def markdown(results: dict) -> str:
    lines = ["## Round-trip error ||Φ⁻¹(Φ(x)) − x|| / ||x|| (float64)", ""]
    acc = results["accuracy"]
    lines.append(f"Field displacement ||Φ(x) − x|| / ||x|| = {acc['displacement']:.3f}.")
    lines.append("")
    lines.append(
        "| solver | " + " | ".join(f"{s} steps" for s in STEPS) + " | observed order (16→32) |"
    )
    lines.append("| --- " * (len(STEPS) + 2) + "|")
    for method, errs in acc["fixed"].items():
        order = acc["order"][method]
        cells = " | ".join(f"{e:.1e}" for e in errs.values())
        lines.append(f"| {method} | {cells} | {order:.2f} |")
    lines += ["", "| dopri5 rtol | round-trip error | velocity evaluations (both ways) |"]
    lines.append("| --- | --- | --- |")
    for row in acc["dopri5"]:
        lines.append(f"| {row['rtol']:.0e} | {row['roundtrip_error']:.1e} | {row['nfe']} |")
    lines += ["", "## Throughput", ""]
    lines.append("Solve time of each solver (8 steps) ÷ Euler's, same network and batch.")
    lines.append("")
    lines.append("| network | velocity evals/s | " + " | ".join(FIXED) + " |")
    lines.append("| --- " * (len(FIXED) + 2) + "|")
    for row in results["throughput"]:
        ratios = " | ".join(f"{row['solve_cost_vs_euler'][m]:.2f}" for m in FIXED)
        lines.append(f"| {row['net']} | {row['evals_per_second']:,.0f} | {ratios} |")
    device = results["provenance"]["config"]["device"]
    note = "absolute rates are indicative only on a shared CPU; compare the ratios"
    lines += ["", f"Device: {device} ({note if device == 'cpu' else 'GPU timings'})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = {"device": args.device, "repeats": args.repeats, "steps": list(STEPS)}
    command = shlex.join(["python", "benchmarks/flows/bench_flows.py", *(argv or sys.argv[1:])])
    results = {
        "accuracy": accuracy(),
        "throughput": throughput(device, args.repeats),
        "provenance": {**provenance(command, config), "seeds": [0, 1, 2]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
