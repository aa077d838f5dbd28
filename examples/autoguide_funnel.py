"""Fit Neal's funnel with AutoFlowGuide and Pyro's Gaussian autoguides; compare ELBO and k-hat.

The funnel (v ~ N(0, 3²), x_i | v ~ N(0, e^v), 10 dimensions) is normalized, so its ELBO is
-KL(q || p) <= 0. Every guide gets the same SVI budget; the table reports the ELBO from
importance log-weights and Pyro's PSIS k-hat, and a pair plot of (x_1, v) against exact draws
is saved in --output-dir.

    python examples/autoguide_funnel.py --flows iaf,planar,sylvester-orthogonal --num-steps 2000
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal  # noqa: E402
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights  # noqa: E402
from pyro.optim import ClippedAdam  # noqa: E402

from pyroflows import AutoFlowGuide  # noqa: E402
from pyroflows.transforms import FLOWS  # noqa: E402


def funnel(dim: int = 10) -> None:
    """Neal's funnel: v ~ N(0, 3²), x_i | v ~ N(0, e^v) for i < dim."""
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0), 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (dim - 1,))
    pyro.sample("x", dist.Normal(torch.zeros_like(scale), scale).to_event(1))


def exact_draws(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact samples ``(v, x)`` of the funnel, shapes ``(n,)`` and ``(n, dim - 1)``."""
    v = 3.0 * torch.randn(n)
    return v, torch.exp(v / 2).unsqueeze(-1) * torch.randn(n, dim - 1)


def make_guides(args: argparse.Namespace, model: Callable[[], None]) -> dict:
    guides = {"AutoNormal": AutoNormal(model), "AutoMVN": AutoMultivariateNormal(model)}
    for name in args.flows.split(","):
        guides[f"flow:{name}"] = AutoFlowGuide(model, flow=name, num_flows=args.num_flows)
    return guides


def fit(args: argparse.Namespace, model: Callable[[], None], guide: Callable[[], dict]) -> None:
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    optim = ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / max(1, args.num_steps))})
    elbo = Trace_ELBO(args.num_particles, max_plate_nesting=0, vectorize_particles=True)
    svi = SVI(model, guide, optim, elbo)
    for _ in range(args.num_steps):
        svi.step()


@torch.no_grad()
def evaluate(
    args: argparse.Namespace, model: Callable[[], None], guide: Callable[[], dict]
) -> tuple[float, float]:
    """(ELBO from ``--num-samples`` importance log-weights, PSIS k-hat)."""
    log_w = vectorized_importance_weights(
        model, guide, num_samples=args.num_samples, max_plate_nesting=0
    )[0]
    k_hat = psis_diagnostic(model, guide, num_particles=args.num_samples, max_plate_nesting=0)
    return float(log_w.mean()), float(k_hat)


@torch.no_grad()
def guide_draws(guide: Callable[[], dict], num: int = 500) -> dict:
    """``num`` draws of a fitted guide. Take them right after its fit: the guides here share
    a name, so the next fit's ``pyro.clear_param_store()`` and training replace the store
    entries that an earlier guide's ``PyroParam`` scale is read from."""
    with pyro.plate("draws", num, dim=-1):
        return guide()


def pair_plot(args: argparse.Namespace, draws: dict, path: str) -> None:
    """(x_1, v) draws of every guide (``label -> guide_draws(...)``) over exact draws."""
    v_true, x_true = exact_draws(2000, args.dim)
    fig, axes = plt.subplots(1, len(draws), figsize=(3 * len(draws), 3), squeeze=False)
    for ax, (label, d) in zip(axes[0], draws.items(), strict=True):
        v, x1 = d["v"], d["x"][..., 0]
        ax.scatter(x_true[:, 0], v_true, s=2, c="0.75", label="exact")
        ax.scatter(x1, v, s=2, c="C0", label="guide")
        ax.set(title=label, xlabel="x_1", ylabel="v", xlim=(-20, 20), ylim=(-9, 9))
    axes[0, 0].legend(loc="upper left", markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    pyro.set_rng_seed(args.seed)

    def model() -> None:
        funnel(args.dim)

    guides = make_guides(args, model)
    results, draws = {}, {}
    print(f"{'guide':<28} {'ELBO (= -KL)':>12} {'PSIS k-hat':>10}")
    for label, guide in guides.items():
        fit(args, model, guide)
        pyro.set_rng_seed(args.seed + 1)
        results[label] = evaluate(args, model, guide)
        draws[label] = guide_draws(guide)
        print(f"{label:<28} {results[label][0]:>12.3f} {results[label][1]:>10.2f}")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "autoguide_funnel.png")
    pair_plot(args, draws, path)
    print(f"pair plot saved to {path}")
    return {"results": results, "plot": path}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--flows",
        default="iaf,planar,sylvester-orthogonal",
        help=f"comma-separated flow families, from: {', '.join(sorted(FLOWS))}",
    )
    parser.add_argument("--num-flows", type=int, default=2, help="flow layers per guide")
    parser.add_argument("--dim", type=int, default=10, help="dimension of the funnel")
    parser.add_argument("--num-steps", type=int, default=1000, help="SVI steps per guide")
    parser.add_argument("--num-particles", type=int, default=8, help="ELBO particles per step")
    parser.add_argument("--num-samples", type=int, default=2000, help="for ELBO and k-hat")
    parser.add_argument("--lr", type=float, default=0.03, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--output-dir", default="outputs", help="where the figure is written")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
