"""Density estimation by maximum likelihood with every density-capable flow family.

Fits ``TransformedDistribution(N(0, I), flows)`` by minimising ``-log p(x)`` over
mini-batches, with early stopping on a validation split (the best validation state is
kept), then prints the test log-likelihood per family and saves a figure:

(a) ``toy``: two moons in 2-D (standardised); Pyro's ``affine_coupling``,
    ``spline_coupling`` and ``affine_autoregressive`` (MAF) are fitted with the same
    budget for comparison. The figure shows each fitted density and its samples.
(b) ``digits``: dequantised digits from static binarized MNIST, each 2x2 block summed
    (14x14 images of 5 grey levels k), dequantised as v = (k + u) / 5 with u ~ U(0, 1) and
    mapped to logit space. The log-likelihood is reported in nats per dimension of v on
    [0, 1]^196 (logit Jacobian included); the data are the embedded 1000-image sample unless
    ``--data-dir`` holds ``binarized_mnist.npz``.

    python examples/density_estimation.py --task toy --num-steps 3000
    python examples/density_estimation.py --task digits --data-dir DIR
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyroflows.datasets import load_dataset  # noqa: E402
from pyroflows.transforms import FLOWS, initialize_actnorm  # noqa: E402
from pyroflows.transforms._base import Reverse, interleave_permutations  # noqa: E402

ALPHA = 0.05  # logit(ALPHA + (1 - 2 ALPHA) v) keeps the logit finite at v = 0, 1
TOY_FAMILIES = ["nice", "realnvp", "spline", "maf", "iaf", "glow"]
PYRO_FAMILIES = ["pyro-affine-coupling", "pyro-spline-coupling", "pyro-maf"]
DIGIT_FAMILIES = ["nice", "realnvp", "spline", "maf", "glow"]


def two_moons(n: int) -> Tensor:
    """``n`` points of the two-moons toy with noise 0.1, shape ``(n, 2)``."""
    theta = math.pi * torch.rand(n)
    upper = torch.rand(n) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    return torch.stack([x, y], -1) + 0.1 * torch.randn(n, 2)


def toy_data(n: int = 6000) -> tuple[Tensor, Tensor, Tensor]:
    x = two_moons(n)
    x = (x - x.mean(0)) / x.std(0)
    return x[: 4 * n // 6], x[4 * n // 6 : 5 * n // 6], x[5 * n // 6 :]


def digits_data(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """Dequantised 14x14 digits in logit space, plus nothing else: see the module doc."""
    data = load_dataset("mnist", data_dir)

    def prep(x: Tensor) -> Tensor:
        k = F.avg_pool2d(x.view(-1, 1, 28, 28), 2).mul(4).round().flatten(1)  # 0..4
        v = (k + torch.rand_like(k)) / 5
        return torch.logit(ALPHA + (1 - 2 * ALPHA) * v)

    return prep(data.train), prep(data.valid), prep(data.test)


def logit_ladj(y: Tensor) -> Tensor:
    """log |dy/dv| of y = logit(α + (1 − 2α) v), summed over the event."""
    p = torch.sigmoid(y)
    return (math.log(1 - 2 * ALPHA) - torch.log(p) - torch.log1p(-p)).sum(-1)


def build(family: str, dim: int, num_flows: int, hidden: int) -> list:
    """The transforms of one model (base side first); parameters via ``nn.ModuleList``."""
    h2 = [hidden, hidden]
    if family.startswith("pyro-"):
        make = {
            "pyro-affine-coupling": lambda: T.affine_coupling(dim, hidden_dims=h2),
            "pyro-spline-coupling": lambda: T.spline_coupling(dim, hidden_dims=h2),
            # Pyro's autoregressive transform is IAF-direction: its inverse is the MAF
            "pyro-maf": lambda: T.affine_autoregressive(dim, hidden_dims=h2).inv,
        }[family]
        layers: list = []
        for k in range(num_flows):
            layers += [Reverse()] if k else []
            layers.append(make())
        return layers
    if family == "glow":  # actnorm, invertible linear map, affine coupling
        layers = []
        for _ in range(num_flows):
            layers += [FLOWS["actnorm"](dim), FLOWS["linear-lu"](dim)]
            layers.append(FLOWS["realnvp"](dim, hidden_dims=h2))
        return layers
    return interleave_permutations([FLOWS[family](dim, h2) for _ in range(num_flows)])


def model_of(layers: list, dim: int) -> dist.TransformedDistribution:
    zero = torch.zeros(dim)
    return dist.TransformedDistribution(dist.Normal(zero, 1.0).to_event(1), layers)


def fit(layers: list, train: Tensor, valid: Tensor, args: argparse.Namespace) -> dict:
    """Adam on mini-batches; early stopping on the validation log-likelihood."""
    dim = train.shape[-1]
    # (an inverted Pyro transform holds its module in ``_inv``)
    owners = [t if isinstance(t, nn.Module) else getattr(t, "_inv", None) for t in layers]
    modules = nn.ModuleList(m for m in owners if isinstance(m, nn.Module))
    initialize_actnorm(layers, train[:1024])
    opt = torch.optim.Adam(modules.parameters(), lr=args.lr)
    best, best_state, bad, step = -math.inf, copy.deepcopy(modules.state_dict()), 0, 0
    start = time.perf_counter()
    for step in range(1, args.num_steps + 1):
        batch = train[torch.randint(len(train), (args.batch_size,))]
        loss = -model_of(layers, dim).log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(modules.parameters(), 100.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.num_steps:
            with torch.no_grad():
                val = float(model_of(layers, dim).log_prob(valid).mean())
            if val > best:
                best, best_state, bad = val, copy.deepcopy(modules.state_dict()), 0
            else:
                bad += 1
                if bad >= args.patience:
                    break
    modules.load_state_dict(best_state)
    return {"steps": step, "valid": best, "seconds": time.perf_counter() - start}


def run(task: str, args: argparse.Namespace) -> dict[str, dict]:
    if task == "toy":
        train, valid, test = toy_data()
        families = TOY_FAMILIES + PYRO_FAMILIES
    else:
        train, valid, test = digits_data(args.data_dir)
        families = DIGIT_FAMILIES
    dim = train.shape[-1]
    results = {}
    for family in families:
        pyro.set_rng_seed(args.seed)
        layers = build(family, dim, args.num_flows, args.hidden)
        info = fit(layers, train, valid, args)
        with torch.no_grad():
            lp = model_of(layers, dim).log_prob(test)
            if task == "digits":  # density of v on [0, 1]^D, per dimension
                lp = (lp + logit_ladj(test)) / dim
        info["test"], info["layers"] = float(lp.mean()), layers
        results[family] = info
        unit = "nats/dim" if task == "digits" else "nats"
        print(
            f"{task:6s} {family:22s} test log-lik {info['test']:9.4f} {unit}  "
            f"(valid {info['valid']:.4f}, {info['steps']} steps, {info['seconds']:.1f} s)",
            flush=True,
        )
    return results


def figure(task: str, results: dict[str, dict], path: str) -> None:
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    for ax, (family, info) in zip(axes[0], results.items(), strict=True):
        model = model_of(info["layers"], 2 if task == "toy" else 196)
        with torch.no_grad():
            if task == "toy":
                g = torch.linspace(-3, 3, 150)
                grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)
                ax.contourf(g, g, model.log_prob(grid).exp(), levels=20, cmap="viridis")
                s = model.sample((300,))
                ax.scatter(s[:, 0], s[:, 1], s=1, c="w", alpha=0.5)
            else:
                s = torch.sigmoid(model.sample((16,))).view(4, 4, 14, 14)
                ax.imshow(s.permute(0, 2, 1, 3).reshape(56, 56), cmap="gray")
        ax.set_title(f"{family}\n{info['test']:.3f}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    os.makedirs(args.output_dir, exist_ok=True)
    tasks = ["toy", "digits"] if args.task == "both" else [args.task]
    out = {}
    for task in tasks:
        pyro.set_rng_seed(args.seed)
        out[task] = run(task, args)
        path = os.path.join(args.output_dir, f"density_{task}.png")
        figure(task, out[task], path)
        table = write_table(task, out[task], args)
        print(f"wrote {path} and {table}")
    return out


def write_table(task: str, results: dict[str, dict], args: argparse.Namespace) -> str:
    """A markdown table of the test log-likelihoods (the command line in its header)."""
    unit = "nats per dimension of v" if task == "digits" else "nats"
    opts = {k: v for k, v in vars(args).items() if k not in ("output_dir", "data_dir")}
    lines = [
        f"# Density estimation, {task}: test log-likelihood ({unit})",
        "",
        f"`examples/density_estimation.py` with {opts}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}, {torch.get_num_threads()} thread(s).",
        "",
        "| family | test log-lik | best valid | steps | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for family, r in results.items():
        lines.append(
            f"| {family} | {r['test']:.4f} | {r['valid']:.4f} | {r['steps']} | "
            f"{r['seconds']:.1f} |"
        )
    path = os.path.join(args.output_dir, f"density_{task}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--task",
        choices=["toy", "digits", "both"],
        default="both",
        help="toy data, digits, or both",
    )
    p.add_argument("--num-steps", type=int, default=3000, help="maximum optimizer steps")
    p.add_argument(
        "--num-flows",
        type=int,
        default=4,
        help="layers per model (a glow block is actnorm + linear-lu + realnvp)",
    )
    p.add_argument("--hidden", type=int, default=64, help="width of the conditioner layers")
    p.add_argument("--batch-size", type=int, default=256, help="mini-batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--eval-every", type=int, default=100, help="steps between validation evaluations"
    )
    p.add_argument("--patience", type=int, default=5, help="evaluations without improvement")
    p.add_argument("--data-dir", default=None, help="directory with binarized_mnist.npz")
    p.add_argument("--seed", type=int, default=0, help="random seed (pyro.set_rng_seed)")
    p.add_argument("--output-dir", default=".", help="where the figures and tables are written")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
