"""Fit a stack of flows to one of Rezende & Mohamed's (2015) 2-D energy densities U1-U4.

Minimises KL(q || p) with p ∝ exp(-U) by reparameterized samples of q = flows(N(0, I)),
prints the final KL (log Z by quadrature) and saves a density plot of target and fit.

    python examples/energy_2d.py --energy U1 --flow planar --num-flows 16 --num-steps 5000
"""

from __future__ import annotations

import argparse
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.distributions.transforms import ComposeTransformModule  # noqa: E402

from pyroflows.transforms import FLOWS  # noqa: E402


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z: torch.Tensor) -> torch.Tensor:
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z: torch.Tensor) -> torch.Tensor:
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def _wall(z: torch.Tensor) -> torch.Tensor:
    """U2-U4 are flat in z1; confine z1 to [-4, 4] with a soft wall, as in the paper's plots."""
    return 0.5 * (torch.relu(z[..., 0].abs() - 4) / 0.2) ** 2


def energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """The unnormalised negative log-density U(z) of Rezende & Mohamed (2015), Table 1."""
    z1, z2 = z[..., 0], z[..., 1]
    if name == "U1":
        ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
        modes = torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
        return ring - modes
    if name == "U2":
        return 0.5 * ((z2 - _w1(z)) / 0.4) ** 2 + _wall(z)
    if name == "U3":
        a = -0.5 * ((z2 - _w1(z)) / 0.35) ** 2
        b = -0.5 * ((z2 - _w1(z) + _w2(z)) / 0.35) ** 2
        return -torch.logaddexp(a, b) + _wall(z)
    if name == "U4":
        a = -0.5 * ((z2 - _w1(z)) / 0.4) ** 2
        b = -0.5 * ((z2 - _w1(z) + _w3(z)) / 0.35) ** 2
        return -torch.logaddexp(a, b) + _wall(z)
    raise ValueError(f"energy must be one of U1, U2, U3, U4; got {name!r}")


def log_normalizer(name: str, half_width: float = 8.0, n: int = 801) -> float:
    """log Z = log ∫ exp(-U) by the trapezoid rule on a grid (exact enough for a 2-D target)."""
    g = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    dens = torch.exp(-energy(name, grid))
    return torch.trapezoid(torch.trapezoid(dens, g, dim=1), g, dim=0).log().item()


def build_flow(flow: str, num_flows: int) -> dist.TransformedDistribution:
    """q = num_flows layers of ``flow`` on a standard normal base in 2-D."""
    if flow not in FLOWS:
        raise ValueError(f"flow must be one of {sorted(FLOWS)}; got {flow!r}")
    layers = ComposeTransformModule([FLOWS[flow](2) for _ in range(num_flows)])
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    return layers, dist.TransformedDistribution(base, [layers])


def plot(args: argparse.Namespace, q: dist.TransformedDistribution, path: str) -> None:
    """Target density exp(-U) beside the fitted density on [-4, 4]²."""
    g = torch.linspace(-4, 4, 200)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)
    with torch.no_grad():
        target = torch.exp(-energy(args.energy, grid))
        fitted = q.log_prob(grid).exp()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, img, title in zip(axes, (target, fitted), ("target exp(-U)", "fit"), strict=True):
        ax.imshow(img.numpy(), extent=(-4, 4, -4, 4), origin="lower", cmap="viridis")
        ax.set_title(f"{args.energy}: {title}")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    pyro.set_rng_seed(args.seed)
    layers, q = build_flow(args.flow, args.num_flows)
    optim = torch.optim.Adam(layers.parameters(), lr=args.lr)
    for step in range(args.num_steps):
        z = q.rsample((args.batch_size,))
        loss = (q.log_prob(z) + energy(args.energy, z)).mean()  # KL(q || p) - log Z
        optim.zero_grad()
        loss.backward()
        optim.step()
        if args.num_steps >= 10 and step % max(1, args.num_steps // 10) == 0:
            print(f"step {step:6d}  KL + log Z = {loss.item():.4f}")
    with torch.no_grad():
        z = q.sample((10000,))
        kl = (q.log_prob(z) + energy(args.energy, z)).mean().item() + log_normalizer(args.energy)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"energy_{args.energy}_{args.flow}.png")
    plot(args, q, path)
    print(f"final KL(q || p) = {kl:.4f} nats (10000 samples, log Z by quadrature)")
    print(f"plot saved to {path}")
    return {"kl": kl, "plot": path}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--energy", default="U1", choices=["U1", "U2", "U3", "U4"], help="target density"
    )
    flows = ", ".join(sorted(FLOWS))
    parser.add_argument("--flow", default="planar", help=f"flow family, one of: {flows}")
    parser.add_argument("--num-flows", type=int, default=16, help="number of flow layers")
    parser.add_argument("--num-steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per step")
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--output-dir", default="outputs", help="where the figure is written")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
