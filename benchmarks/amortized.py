"""AutoAmortizedFlowGuide on the conjugate varying-intercept regression of
examples/amortized_hierarchical.py (issue 17 acceptance), against its exact posterior.

1. N = 20 groups, full batch: worst mean and sd error over all 22 latents, in exact-posterior
   sd units, of the amortized guide, a full AutoFlowGuide over all latents and AutoNormal.
2. Per-step time at N = 1,000 vs N = 100,000 with subsample_size = 256 (alternating blocks of
   steps in the same process) and the peak resident memory.
3. Posterior of the globals (mu, beta) after a subsampled fit at N = 100,000, and after a
   long full-batch fit at N = 1,000, each against its own exact posterior.

    python benchmarks/amortized.py            # writes benchmarks/results/amortized.md
    python benchmarks/amortized.py --quick    # smaller budgets, to check the script
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyroflows import AutoAmortizedFlowGuide, AutoFlowGuide

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    path = ROOT / "examples" / "amortized_hierarchical.py"
    spec = importlib.util.spec_from_file_location("amortized_hierarchical", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = load_example()


def worst_errors(draws, mean, sd):
    q = torch.cat(
        [draws[n].reshape(len(draws[n]), -1).double() for n in ("mu", "beta", "alpha")], 1
    )
    return float(((q.mean(0) - mean) / sd).abs().max()), float((q.std(0) / sd - 1).abs().max())


def accuracy_small(args, lines):
    lines += [
        "## 1. N = 20 groups, all latents (full batch)",
        "",
        f"Model: examples/amortized_hierarchical.py (mu, beta ~ N(0, 5²), alpha_i ~ N(mu, 1), "
        f"y_ij ~ N(alpha_i + beta x_j, 2²), {args.obs} observations per group, data seed = fit seed). "
        f"Every guide: {args.steps_small} SVI steps of Adam (lr 0.01 for 40%, then a fresh Adam decaying 100x; "
        "AutoAmortizedFlowGuide.precondition_globals() between the phases), "
        f"one particle; errors from {args.draws} guide draws against the exact Gaussian posterior, "
        "worst over the 22 latents, in units of the exact posterior sd "
        "(Monte-Carlo se of one mean error ≈ 1/sqrt(draws) = "
        f"{1 / args.draws**0.5:.3f}).",
        "",
        "| seed | guide | worst mean error | worst sd error | fit seconds |",
        "|---|---|---|---|---|",
    ]
    rows = {}
    for seed in args.seeds:
        y = ex.simulate(20, args.obs, seed=seed).double()
        mean, sd = ex.exact_posterior(y)
        for label, make in [
            ("AutoAmortizedFlowGuide", lambda: AutoAmortizedFlowGuide(ex.model)),
            ("AutoFlowGuide (iaf, 4 layers)", lambda: AutoFlowGuide(ex.model)),
            ("AutoNormal", lambda: AutoNormal(ex.model)),
        ]:
            pyro.set_rng_seed(seed)
            pyro.clear_param_store()
            guide = make()
            seconds = ex.fit(guide, y, args.steps_small, None, 0.01)
            with torch.no_grad():
                if isinstance(guide, AutoNormal):
                    draws = Predictive(ex.model, guide=guide, num_samples=args.draws)(y)
                else:
                    draws = guide.sample_posterior(y, num_samples=args.draws)
            m, s = worst_errors(draws, mean, sd)
            rows[(seed, label)] = (m, s)
            lines.append(f"| {seed} | {label} | {m:.3f} | {s:.3f} | {seconds:.1f} |")
            print(lines[-1], flush=True)
    lines.append("")
    return rows


def timing(args, lines):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    setups = {}
    for n in (1_000, 100_000):
        y = ex.simulate(n, args.obs, seed=0)
        guide = AutoAmortizedFlowGuide(ex.model)
        svi = SVI(ex.model, guide, pyro.optim.Adam({"lr": 0.001}), Trace_ELBO())
        for _ in range(20):  # set up and warm up
            svi.step(y, 256)
        setups[n] = (svi, y)
    times = {n: [] for n in setups}
    for _ in range(args.rounds):  # alternate blocks, so both see the same machine load
        for n, (svi, y) in setups.items():
            start = time.perf_counter()
            for _ in range(args.block):
                svi.step(y, 256)
            times[n].append(1000 * (time.perf_counter() - start) / args.block)
    small, large = statistics.median(times[1_000]), statistics.median(times[100_000])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += [
        "## 2. Per-step time, subsample_size = 256",
        "",
        f"{args.rounds} alternating blocks of {args.block} SVI steps per N after 20 warm-up steps, "
        "one process, torch threads = 1; median over blocks (all blocks in brackets).",
        "",
        "| N | ms / step | blocks |",
        "|---|---|---|",
        f"| 1,000 | {small:.2f} | {', '.join(f'{t:.2f}' for t in times[1_000])} |",
        f"| 100,000 | {large:.2f} | {', '.join(f'{t:.2f}' for t in times[100_000])} |",
        "",
        f"Ratio N = 100,000 / N = 1,000: **{large / small:.2f}**. Peak resident memory of the "
        f"benchmark process so far: {rss:.0f} MiB (the data y of N = 100,000 is "
        f"{100_000 * args.obs * 4 / 2**20:.1f} MiB; the guide's parameters do not grow with N).",
        "",
    ]
    print("\n".join(lines[-9:]), flush=True)
    return large / small


def globals_fit(n, subsample_size, steps, seed, args):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    y = ex.simulate(n, args.obs, seed=seed)
    guide = AutoAmortizedFlowGuide(ex.model)
    seconds = ex.fit(guide, y, steps, subsample_size, 0.01)
    draws = guide.global_guide.sample_posterior(y, subsample_size, num_samples=args.draws)
    mean, cov = ex.exact_globals(y)
    sd = cov.diagonal().sqrt()
    out = []
    for i, name in enumerate(("mu", "beta")):
        m, s = draws[name].double().mean(), draws[name].double().std()
        out.append(
            (name, float(mean[i]), float(sd[i]), float((m - mean[i]) / sd[i]), float(s / sd[i]))
        )
    return out, seconds


def accuracy_globals(args, lines):
    lines += [
        "## 3. Globals after subsampled training vs a full-batch fit",
        "",
        f"Each fit: {args.steps_large} SVI steps, Adam lr 0.01 for 40%, precondition_globals(), then a fresh "
        "Adam decaying 100x; "
        f"{args.draws} draws of the global guide; errors against that N's exact posterior of "
        "(mu, beta) (alpha integrated out). Monte-Carlo se of the mean error "
        f"≈ {1 / args.draws**0.5:.3f} sd, of the sd ratio ≈ {1 / (2 * args.draws) ** 0.5:.3f}.",
        "",
        "| fit | seed | site | exact mean | exact sd | mean error (sd) | sd ratio | fit seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    configs = [
        ("N = 100,000, subsample 256", 100_000, 256, args.seeds_large),
        ("N = 1,000, full batch", 1_000, None, args.seeds[:1]),
    ]
    for label, n, batch, seeds in configs:
        for seed in seeds:
            rows, seconds = globals_fit(n, batch, args.steps_large, seed, args)
            results[(label, seed)] = rows
            for name, m, s, err, ratio in rows:
                lines.append(
                    f"| {label} | {seed} | {name} | {m:.4f} | {s:.4f} | {err:+.3f} | {ratio:.3f} "
                    f"| {seconds:.0f} |"
                )
                print(lines[-1], flush=True)
    lines.append("")
    return results


def main(args):
    torch.set_num_threads(1)
    start = time.perf_counter()
    lines = [
        "# AutoAmortizedFlowGuide: accuracy and scaling (issue 17)",
        "",
        f"`python benchmarks/amortized.py{' --quick' if args.quick else ''}`; seeds {list(args.seeds)} "
        f"(N = 100,000 default fit: {list(args.seeds_large)}); "
        f"torch {torch.__version__}, pyro {pyro.__version__}, CPU, 1 thread, on a 2-core machine "
        "shared with other jobs (times are indicative).",
        "",
    ]
    accuracy_small(args, lines)
    timing(args, lines)
    accuracy_globals(args, lines)
    lines.append(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")
    if not args.quick:
        out = ROOT / "benchmarks" / "results" / "amortized.md"
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets; writes nothing")
    parser.add_argument("--obs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds-large", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps-small", type=int, default=3000)
    parser.add_argument("--steps-large", type=int, default=6000)
    parser.add_argument("--draws", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps_small, args.steps_large, args.draws, args.rounds, args.block = 30, 30, 500, 2, 5
    return args


if __name__ == "__main__":
    main(parse_args())
