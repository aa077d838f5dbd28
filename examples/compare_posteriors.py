"""Which guide gets eight schools right? Autoguides and flow guides against NUTS.

Fits AutoNormal, AutoMultivariateNormal, Pyro's AutoIAFNormal and pyroflows' AutoFlowGuide
with every registered flow to the centred (a funnel) and the non-centred eight-schools
model, then judges each guide by PSIS k-hat and by its errors against a NUTS run:

    python examples/compare_posteriors.py --quick           # 2 min 41 s (see below)
    python examples/compare_posteriors.py                   # 8 min and more (see below)
    python examples/compare_posteriors.py --num-steps 2     # smoke test, 17 s

Measured with OMP_NUM_THREADS=1 on a 2-core CPU shared with other jobs: --quick (AutoNormal,
AutoMultivariateNormal, AutoIAFNormal and two flow guides, 300 steps, 150 NUTS draws) took
2 min 41 s. The full run took 7 min 43 s on an idle machine when 7 flows were registered; it
fits every registered flow, so it grows with the registry (about 25 s per guide and model;
--flows picks a subset). A progress bar shows the guide being fitted, and each finished guide
prints one line.

Prints one summary table (k-hat, worst mean and sd error in NUTS-sd units, worst 1-D
Wasserstein distance) and the per-parameter comparison of the best flow guide; saves pair
plots of AutoNormal and the best flow guide over NUTS in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from tqdm.auto import tqdm

from pyroflows.diagnostics import compare, psis, to_inference_data
from pyroflows.guides import AutoFlowGuide
from pyroflows.transforms import FLOWS

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def centered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


MODELS = {"centered": centered, "noncentered": noncentered}
SITES = ["mu", "tau", "theta"]  # the same posterior in both parameterisations


def guides(num_flows: int, flows: Sequence[str]) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "AutoNormal": AutoNormal,
        "AutoMultivariateNormal": AutoMultivariateNormal,
        "AutoIAFNormal": lambda m: AutoIAFNormal(m, num_transforms=2),
    }
    for flow in flows:
        out[f"AutoFlowGuide({flow})"] = lambda m, f=flow: AutoFlowGuide(
            m, flow=f, num_flows=num_flows
        )
    return out


def run_nuts(model: Callable, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """NUTS draws of mu, tau and theta (scaled down with --num-steps for smoke tests)."""
    num_samples = min(args.num_samples, max(10, args.num_steps // 2))
    warmup = min(args.warmup_steps, max(10, args.num_steps // 4))
    mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(SIGMA, Y)
    samples = mcmc.get_samples()
    theta = Predictive(model, posterior_samples=samples, return_sites=["theta"])(SIGMA, Y)
    return {**samples, "theta": theta["theta"].reshape(num_samples, -1)}


def fit(model: Callable, guide: Callable, args: argparse.Namespace) -> float:
    elbo = Trace_ELBO(num_particles=args.num_particles, vectorize_particles=True)
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / max(args.num_steps, 1))})
    svi = SVI(model, guide, optim, elbo)
    start = time.perf_counter()
    for _ in range(args.num_steps):
        svi.step(SIGMA, Y)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    flows = args.flows.split(",") if args.flows else sorted(FLOWS)
    unknown = sorted(set(flows) - set(FLOWS))
    if unknown:
        raise SystemExit(f"--flows: unknown {unknown}; choose from {', '.join(sorted(FLOWS))}")
    rows = []
    total = time.perf_counter()
    for model_name, model in MODELS.items():
        pyro.set_rng_seed(args.seed)
        start = time.perf_counter()
        nuts = run_nuts(model, args)
        print(f"{model_name}: NUTS {len(nuts['mu'])} draws in {time.perf_counter() - start:.1f} s")
        results = {}
        todo = guides(args.num_flows, flows)
        bar = tqdm(todo.items(), desc=model_name, unit="guide", file=sys.stderr, leave=False)
        for guide_name, make in bar:
            bar.set_postfix_str(guide_name)
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            guide = make(model)
            seconds = fit(model, guide, args)
            num_draws = min(args.num_draws, max(200, 2 * args.num_steps))  # smoke tests: fewer
            data = to_inference_data(guide, model, SIGMA, Y, num_samples=num_draws)
            k = psis(data)
            c = compare(data, nuts, var_names=SITES, labels=(guide_name, "NUTS"))
            results[guide_name] = c
            rows.append((model_name, guide_name, seconds, k.khat, c))
            tqdm.write(f"{model_name} {guide_name}: fit {seconds:.1f} s, k-hat {k.khat:.2f}")
        best = min((g for g in results if g.startswith("AutoFlowGuide")), key=_sd_error(results))
        print(results[best])
        for name in ("AutoNormal", best):
            path = out / f"pairs_{model_name}_{name.replace('(', '_').replace(')', '')}.png"
            results[name].plot(params=["mu", "tau", "theta[0]"]).savefig(path, dpi=80)
            print(f"saved {path}")
    print(_table(rows))
    print(f"total {time.perf_counter() - total:.0f} s")


def _sd_error(results: dict) -> Callable[[str], float]:
    return lambda name: results[name].worst_sd_error


def _table(rows: list) -> str:
    head = f"{'model':<12} {'guide':<36} {'fit s':>6} {'k-hat':>6} {'mean err':>9} {'sd err':>7}"
    lines = [head + f" {'W1':>6}", "-" * (len(head) + 7)]
    for model, guide, seconds, khat, c in rows:
        lines.append(
            f"{model:<12} {guide:<36} {seconds:>6.1f} {khat:>6.2f} {c.worst_mean_error:>9.2f} "
            f"{c.worst_sd_error:>7.2f} {c.worst_wasserstein:>6.2f}"
        )
    return "\n".join(lines)


QUICK = {  # --quick: fewer steps, particles and draws, two flow families
    "num_steps": 300,
    "num_particles": 4,
    "num_draws": 500,
    "num_samples": 300,
    "warmup_steps": 200,
    "flows": "iaf,planar",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smaller settings for a first look: {QUICK}"
    )
    parser.add_argument("--num-steps", type=int, default=2000, help="SVI steps per guide")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate")
    parser.add_argument("--num-particles", type=int, default=8, help="ELBO particles per step")
    parser.add_argument("--num-flows", type=int, default=4, help="flow layers per guide")
    parser.add_argument(
        "--flows",
        default="",
        help=f"comma-separated flow families (empty: all of {', '.join(sorted(FLOWS))})",
    )
    parser.add_argument("--num-draws", type=int, default=4000, help="guide draws to evaluate")
    parser.add_argument("--num-samples", type=int, default=1000, help="NUTS draws")
    parser.add_argument("--warmup-steps", type=int, default=500, help="NUTS warmup")
    parser.add_argument("--output-dir", default="outputs/", help="where the plots are written")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)  # explicit flags still win
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
