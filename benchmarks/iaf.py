"""Benchmark pyroflows' IAF against Pyro's ``AffineAutoregressive`` (D = 64, batch 100).

Both flows get the same MADE architecture (one hidden layer of 3D + 1 = 193 ReLU units,
Pyro's default) and the same float32 input. Timed, as the median of repeats after warm-up:

* forward + log-det with autograd recording (the training path of a flow guide),
* inverse of fresh points under ``torch.no_grad()`` (scoring arbitrary points),
* inverse with autograd recording (training on data through the inverse),

each at the initial parameters and at random parameters far from the identity ("random
far": every weight redrawn N(0, 1/fan_in), every bias N(0, 1), as the tests'
``randomize_``). Also records whether each
inverse round-trips and whether it works for a float64 flow.

Run: ``python benchmarks/iaf.py`` (writes ``benchmarks/results/iaf.md``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import pyro
import torch
from pyro.distributions.transforms import affine_autoregressive

from pyroflows.transforms import IAF


def time_ms(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time (ms) of each ``fn()`` after ``warmup`` untimed calls.

    The functions are called in turn within each repeat, so load from other processes on a
    shared machine affects them alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def perturb_(module: torch.nn.Module) -> None:
    """Move every parameter far from initialisation (as ``tests.conftest.randomize_``)."""
    with torch.no_grad():
        for p in module.parameters():
            std = 1 / math.sqrt(p.shape[-1]) if p.dim() >= 2 else 1.0
            p.normal_(0.0, std)


def build(dim: int, far: bool, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    hidden = [3 * dim + 1]
    flows = {"pyro": affine_autoregressive(dim, hidden), "pyroflows": IAF(dim, hidden)}
    for flow in flows.values():
        if far:
            perturb_(flow)
        flow.to(dtype)
    return flows


def forward_ladj(flow, x):
    x = x.clone()  # a fresh tensor: no cache hit from the previous call
    y = flow(x)
    return y, flow.log_abs_det_jacobian(x, y)


def inverse_nograd(flow, y):
    with torch.no_grad():
        return flow.inv(y.clone())


def inverse_autograd(flow, y):
    return flow.inv(y.clone())


OPS = {
    "forward + log-det": forward_ladj,
    "inverse, no_grad": inverse_nograd,
    "inverse, autograd": inverse_autograd,
}


def inverse_checks(flow, x: torch.Tensor) -> str:
    """Round-trip error of the inverse of a fresh tensor, or the exception it raises."""
    try:
        with torch.no_grad():
            y = flow(x).clone()
            err = (flow.inv(y) - x).abs().max().item()
        return f"max err {err:.1e}"
    except Exception as e:  # noqa: BLE001 - we report Pyro's failure mode
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:90]}"


def made_passes(flow: IAF, y: torch.Tensor) -> int:
    """How many MADE passes pyroflows' no-grad inverse of ``y`` takes (at most D)."""
    module = importlib.import_module("pyroflows.transforms.iaf")
    real, count = module.made_forward, []
    module.made_forward = lambda *a: count.append(1) or real(*a)
    try:
        with torch.no_grad():
            flow.inv(y.clone())
    finally:
        module.made_forward = real
    return len(count)


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    rows = []
    notes = []
    for far in (False, True):
        pyro.set_rng_seed(args.seed)
        flows = build(args.dim, far, torch.float32)
        x = torch.randn(args.batch, args.dim)
        params = "random far" if far else "initial"
        ys = {name: flow(x).detach() for name, flow in flows.items()}
        for op, fn in OPS.items():
            arg = {n: x if op.startswith("forward") else ys[n] for n in flows}
            t = time_ms({n: partial(fn, flows[n], arg[n]) for n in flows}, *args.reps)
            p, o = t["pyro"], t["pyroflows"]
            rows.append((params, op, p, o, p / o))
            print(f"{params:13s} {op:18s} pyro {p:8.3f} ms  ours {o:8.3f} ms  ratio {p / o:5.2f}x")
        for name, flow in flows.items():
            notes.append(f"{params} params, {name}, float32 round trip: {inverse_checks(flow, x)}")
        passes = made_passes(flows["pyroflows"], ys["pyroflows"])
        notes.append(f"{params} params, pyroflows no_grad inverse: {passes} of {args.dim} passes")
    pyro.set_rng_seed(args.seed)
    for name, flow in build(args.dim, True, torch.float64).items():
        x64 = torch.randn(args.batch, args.dim, dtype=torch.float64)
        notes.append(f"random far params, {name}, float64 round trip: {inverse_checks(flow, x64)}")
    for n in notes:
        print(n)
    return report(args, rows, notes)


def report(args: argparse.Namespace, rows, notes) -> str:
    lines = [
        "# IAF benchmark: pyroflows `IAF` vs Pyro `AffineAutoregressive`",
        "",
        f"Command: `OMP_NUM_THREADS={args.threads} python {' '.join(sys.argv)}` "
        f"(D = {args.dim}, batch {args.batch}, float32, MADE hidden [{3 * args.dim + 1}], "
        f"median of {args.reps[0]} repeats after {args.reps[1]} warm-up calls).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs), torch {torch.__version__} with {args.threads} thread(s), "
        f"pyro {pyro.__version__}; load average {args.load[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end (Pyro and pyroflows calls are interleaved, so load "
        "affects both alike).",
        "",
        "| parameters | operation | Pyro (ms) | pyroflows (ms) | ratio Pyro / pyroflows |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {p:.3f} | {o:.3f} | {r:.2f}x |" for a, b, p, o, r in rows]
    lines += ["", "Inverse round trips (`flow.inv(flow(x).clone())`, max abs error):", ""]
    lines += [f"- {n}" for n in notes]
    lines += [
        "",
        "Both inverses need D = 64 sequential MADE passes in the worst case. pyroflows applies",
        "the masks once per call rather than once per pass, updates all coordinates per pass",
        "without Python-level stacking, and, when no gradient is recorded, stops at the first",
        "pass that leaves the iterate bitwise unchanged (the same unique answer; with autograd",
        "it always runs D passes so the unrolled solve stays exactly differentiable). Pyro's",
        "inverse builds its iterate with `torch.zeros(..., device=...)` in the default dtype,",
        "so a float64 flow fails.",
        "",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    text = run(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/iaf.md")
    ns = parser.parse_args()
    ns.reps = (ns.repeats, ns.warmup)
    ns.load = os.getloadavg()
    main(ns)
