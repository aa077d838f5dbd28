"""Memory and SVI step time of the default guides at D = 1,000, 5,000 and 20,000 latents.

Guides (float32, a model ``z ~ N(0, I_D)`` whose own cost is negligible):

* ``flow`` — ``AutoFlowGuide(model)`` with its defaults (four IAF layers, diagonal base);
* ``flow-full`` — :func:`pyroflows.vi.default_guide` with its full-rank base
  (``AutoFlowGuide(model, flow="iaf", num_flows=4, base="full")``), the guide ``VI`` fits
  up to ``max_hessian_dim`` (2,000) latents; above that ``VI`` fits the same guide with a
  diagonal base, i.e. the ``flow`` row;
* ``pyro-mvn`` — Pyro's ``AutoMultivariateNormal``;
* ``pyro-iaf`` — Pyro's ``AutoIAFNormal`` (one ``affine_autoregressive`` layer, hidden
  ``[3D + 1]``).

Each (guide, D) runs in a fresh worker process so that its memory is its own:

* **memory** is the peak resident-set-size (RSS) increase of the worker, sampled every
  0.2 ms by a thread (``benchmarks/_timing.peak_memory_mb``), over building the guide and
  its first two SVI steps (so it includes the parameters, MADE masks, gradients, Adam's two
  moment buffers and the activations of a step); the table also gives the bytes of the
  parameters and buffers alone;
* **step** (with ``--threads`` torch threads) is the median wall time of one ``SVI(model, guide, Adam, Trace_ELBO()).step()``
  (one particle, Pyro's default) over the timed steps after those two, with the CPU time
  of the process (both threads) and the 1-minute load average when the worker ended: on a
  shared machine the wall time grows with the load, the CPU time much less.

The workers are run round by round, alternating the configurations, and each cell reports
the median over rounds with the range of the per-round values (the machine is shared).
A configuration whose estimated footprint exceeds ``--max-gb`` is not run, and a worker
whose RSS passes it is killed; the table says which.

Run: ``python benchmarks/large_d.py`` (writes ``benchmarks/results/large_d.md``);
``--dims 1000 --rounds 1`` for a quick look.

Two single measurements behind docstring notes (printed, not written):

* ``--score D``: scoring one new point (``get_posterior().log_prob`` without autograd) with
  VI's default guide at D, fresh and with its MADE weights perturbed, the number of MADE
  passes the inverse took, and the time of one pass (so of the worst case, D per layer);
* ``--sylvester D``: one Sylvester-triangular layer, forward + log-det + backward of one
  point, with Q as a dense D x D matrix (the code before issue 18, still reached by passing
  the matrix) and as the permutation index.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_name, peak_memory_mb  # noqa: E402

GUIDES = ("flow", "flow-full", "pyro-mvn", "pyro-iaf")
_GB = 2**30


def _make_guide(name: str, model: object) -> torch.nn.Module:
    from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal

    from pyroflows import AutoFlowGuide
    from pyroflows.vi import default_guide

    if name == "flow":
        return AutoFlowGuide(model)
    if name == "flow-full":
        return default_guide(model)
    if name == "pyro-mvn":
        return AutoMultivariateNormal(model)
    return AutoIAFNormal(model)


def worker(name: str, dim: int, steps: int, threads: int) -> dict:
    """Build guide ``name`` at ``dim``, measure memory over setup + 2 steps, time ``steps``."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    torch.set_num_threads(threads)
    pyro.set_rng_seed(0)

    def model() -> None:
        pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

    holder: dict = {}

    def setup_and_two_steps() -> None:
        guide = _make_guide(name, model)
        svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
        svi.step()
        svi.step()
        holder.update(guide=guide, svi=svi)

    mem = peak_memory_mb(setup_and_two_steps, torch.device("cpu"))
    guide, svi = holder["guide"], holder["svi"]
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        svi.step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    param_bytes = sum(p.numel() * p.element_size() for p in guide.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in guide.buffers())
    return {
        "peak_rss_mb": mem,
        "step_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "load": os.getloadavg()[0],
        "params": sum(p.numel() for p in guide.parameters()),
        "param_mb": param_bytes / 2**20,
        "buffer_mb": buffer_bytes / 2**20,
    }


def score_new_point(dim: int) -> None:
    """Time ``log_prob`` of a point the guide did not sample (the IAF inverse), see module doc."""
    import pyro
    import pyro.distributions as dist

    from pyroflows.transforms import IAF
    from pyroflows.transforms import made as made_module
    from pyroflows.vi import default_guide

    iaf_module = sys.modules["pyroflows.transforms.iaf"]
    torch.manual_seed(0)

    def model() -> None:
        pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

    guide = default_guide(model)
    guide()
    layers = [m for m in guide.flows.modules() if isinstance(m, IAF)]
    passes = [0]

    def counting(x: torch.Tensor, weights: tuple) -> torch.Tensor:
        passes[0] += 1
        return made_module.made_forward(x, weights)

    iaf_module.made_forward = counting
    for tag, noise in (("fresh", 0.0), ("MADE weights + 0.05 N(0, 1/fan_in)", 0.05)):
        with torch.no_grad():
            for p in (p for m in layers for p in m.parameters()):
                p.add_(noise * torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 1))
            z = guide.loc + 0.1 * torch.randn(dim)
            passes[0] = 0
            t0 = time.perf_counter()
            guide.get_posterior().log_prob(z)
            took = time.perf_counter() - t0
        print(f"D={dim} {tag}: log_prob of a new point {took:.2f} s, {passes[0]} MADE passes")
    iaf_module.made_forward = made_module.made_forward
    with torch.no_grad():
        x, weights = torch.randn(1, dim), layers[0].made.weights()
        t0 = time.perf_counter()
        for _ in range(20):
            made_module.made_forward(x, weights)
        per = (time.perf_counter() - t0) / 20
    print(
        f"one MADE pass {per * 1e3:.1f} ms: D passes x {len(layers)} layers = {per * dim * 4:.0f} s"
    )


def sylvester_dense_vs_index(dim: int) -> None:
    """One T-SNF layer, forward + log-det + backward of one point, dense Q vs index Q."""
    from pyroflows.transforms import Sylvester
    from pyroflows.transforms._sylvester_q import dense_q
    from pyroflows.transforms.sylvester import _sylvester

    torch.manual_seed(0)
    params = Sylvester(dim, "triangular", permute=True).params()
    x = torch.randn(1, dim)
    for tag, q in (("index", params[0]), ("dense", dense_q(params[0], params[1]))):
        ps = [q] + [t.detach().requires_grad_() for t in params[1:]]
        t0 = time.perf_counter()
        y, ladj = _sylvester(x, *ps)
        (y.sum() + ladj.sum()).backward()
        print(f"D={dim} T-SNF layer, Q {tag}: {time.perf_counter() - t0:.3f} s")


def estimated_gb(name: str, dim: int) -> float:
    """Rough peak: parameters x 5 (value, gradient, Adam's two moments, a temporary) plus
    the MADE masks, in float32, from the documented default sizes."""
    from pyroflows.transforms.made import default_hidden_dim

    d = dim
    if name in ("flow", "flow-full"):
        h = default_hidden_dim(d)
        weights = 4 * 3 * d * h
        params = weights + (d * d if name == "flow-full" else 0)
    elif name == "pyro-mvn":
        weights, params = 0, d * d
    else:
        weights = 3 * d * (3 * d + 1)
        params = weights
    return 4 * (5 * params + weights) / _GB


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run_worker(name: str, dim: int, threads: int, args: argparse.Namespace) -> dict:
    """Run one worker in a subprocess, killing it past ``--max-gb`` of RSS or the timeout."""
    cmd = [sys.executable, __file__, "--worker", name, str(dim), "--steps", str(args.steps)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, peak = time.time(), 0
    while proc.poll() is None:
        peak = max(peak, _rss_of(proc.pid))
        if peak > args.max_gb * _GB or time.time() - start > args.timeout:
            proc.kill()
            proc.wait()
            why = "memory" if peak > args.max_gb * _GB else "time"
            return {"error": f"killed ({why}: RSS {peak / _GB:.1f} GB)"}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"error": f"failed: {err.strip().splitlines()[-1] if err.strip() else '?'}"}
    return json.loads(out.strip().splitlines()[-1])


def collect(args: argparse.Namespace) -> dict:
    """Results per (guide, D): a list of per-round dicts, alternating configurations."""
    configs = [(g, d, t) for t in args.threads for d in args.dims for g in args.guides]
    results: dict = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for name, dim, threads in order:
            key = (name, dim, threads)
            est = estimated_gb(name, dim)
            if est > args.max_gb:
                results[key] = [{"error": f"not run: estimated {est:.0f} GB"}]
                continue
            if results[key] and "error" in results[key][-1]:
                continue
            res = run_worker(name, dim, threads, args)
            print(f"round {r}: {name} D={dim} threads={threads}: {res}", flush=True)
            results[key].append(res)
    return results


def _cell(runs: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in runs if key in r]
    if not values:
        return runs[0]["error"] if runs else "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def report(args: argparse.Namespace, results: dict) -> str:
    lines = [
        "# Large-D memory and SVI step time (`benchmarks/large_d.py`)",
        "",
        f"Machine: {device_name(torch.device('cpu'))}, {platform.machine()}, "
        f"torch {torch.__version__}, float32. Rounds: {args.rounds} (alternating "
        f"configurations), {args.steps} timed steps per round after 2 untimed ones. "
        "Cells: median over rounds [min-max of the rounds].",
        "",
        "Memory = peak RSS increase of a fresh process over building the guide and its first "
        "two SVI steps (parameters, masks, gradients, Adam state, activations), sampled every "
        "0.2 ms; params = bytes of the parameters and buffers (MADE masks) alone. Step = one "
        "`SVI.step()` with `Trace_ELBO()` (1 particle) and `Adam`.",
        "",
        "| guide | D | threads | parameters | params+buffers (MB) | peak RSS increase (MB) "
        "| step (s) | step CPU (s) | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, dim, threads), runs in results.items():
        ok = [r for r in runs if "params" in r]
        nparams = f"{ok[0]['params']:,}" if ok else "-"
        pb = f"{ok[0]['param_mb'] + ok[0]['buffer_mb']:.0f}" if ok else "-"
        mem = _cell(runs, "peak_rss_mb", "{:.0f}")
        step = _cell(runs, "step_s", "{:.3f}")
        cpu = _cell(runs, "cpu_s", "{:.3f}") if ok else "-"
        load = _cell(runs, "load", "{:.1f}") if ok else "-"
        row = [name, f"{dim:,}", str(threads), nparams, pb, mem, step, cpu, load]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    if args.score or args.sylvester:
        torch.set_num_threads(args.threads[0])
        if args.score:
            score_new_point(args.score)
        if args.sylvester:
            sylvester_dense_vs_index(args.sylvester)
        return
    if args.worker:
        name, dim = args.worker
        print(json.dumps(worker(name, int(dim), args.steps, args.threads[0])))
        return
    results = collect(args)
    text = report(args, results)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    if args.raw:
        raw = [
            {"guide": g, "dim": d, "threads": t, "runs": runs}
            for (g, d, t), runs in results.items()
        ]
        Path(args.raw).write_text(json.dumps(raw, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--guides", nargs="+", choices=GUIDES, default=list(GUIDES))
    parser.add_argument("--rounds", type=int, default=3, help="alternating repeats")
    parser.add_argument("--steps", type=int, default=5, help="timed SVI steps per round")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[torch.get_num_threads()], help="torch threads"
    )
    parser.add_argument("--max-gb", type=float, default=8.0, help="RSS limit per worker")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker")
    parser.add_argument("--output", default="benchmarks/results/large_d.md")
    parser.add_argument("--raw", help="also write every worker's result as JSON here")
    parser.add_argument("--score", type=int, metavar="D", help="time scoring a new point")
    parser.add_argument("--sylvester", type=int, metavar="D", help="T-SNF dense vs index Q")
    parser.add_argument("--worker", nargs=2, metavar=("GUIDE", "D"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
