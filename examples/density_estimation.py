"""Density estimation by maximum likelihood with every density-capable flow family.

Fits ``TransformedDistribution(N(0, I), flows)`` by maximum likelihood with
``pyroflows.Trainer`` (a ``pyroflows.FlowDensity`` is a Pyro model of the data without
latent variables, so its ELBO is the exact log-likelihood): Adam on shuffled mini-batches,
validation every epoch, early stopping after ``--patience`` epochs without improvement (the
best validation state is kept). Prints the test log-likelihood per family and saves a figure:

(a) ``toy``: two moons in 2-D (standardised); each family's equivalents in Pyro and, if
    installed, zuko (a benchmark-only dependency) are fitted with the same budget for
    comparison (``EQUIVALENTS``). The figure shows each fitted density and its samples.
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
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
import torch  # noqa: E402
from pyro.nn import DenseNN  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyroflows import FlowDensity, Trainer  # noqa: E402
from pyroflows.datasets import load_dataset  # noqa: E402
from pyroflows.transforms import FLOWS, LinearLU  # noqa: E402
from pyroflows.transforms._base import Reverse, interleave_permutations  # noqa: E402

try:  # optional, benchmark-only: its rows are skipped without it
    import zuko
except ImportError:
    zuko = None

ALPHA = 0.05  # logit(ALPHA + (1 - 2 ALPHA) v) keeps the logit finite at v = 0, 1
TOY_FAMILIES = ["nice", "realnvp", "spline", "spline-ar", "maf", "iaf", "glow"]
# ours -> its equivalents in Pyro and zuko (same widths, K and budget; see ``build``)
EQUIVALENTS = {
    "nice": ["pyro-additive-coupling", "zuko-nice"],
    "realnvp": ["pyro-affine-coupling", "zuko-realnvp"],
    "spline": ["pyro-spline-coupling", "zuko-nsf"],
    "spline-ar": ["pyro-spline-ar", "zuko-nsf-ar"],
    "maf": ["pyro-maf", "zuko-maf"],
    "glow": ["pyro-glow", "zuko-glow"],
}
PYRO_FAMILIES = [
    "pyro-additive-coupling",
    "pyro-affine-coupling",
    "pyro-spline-coupling",
    "pyro-spline-ar",
    "pyro-maf",
    "pyro-glow",
]
ZUKO_FAMILIES = ["zuko-nice", "zuko-realnvp", "zuko-nsf", "zuko-nsf-ar", "zuko-maf", "zuko-glow"]
DIGIT_FAMILIES = ["nice", "realnvp", "spline", "spline-ar", "maf", "glow"]


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


def _pyro_glow_block(dim: int, h2: list[int]) -> list:
    """Pyro's Glow-like block: ``BatchNorm``, ``GeneralizedChannelPermute`` (a learned 1x1
    convolution on D channels of a 1x1 image, reshaped in and out), ``affine_coupling``."""
    image = (dim, 1, 1)
    return [
        T.BatchNorm(dim),
        torch.distributions.ReshapeTransform((dim,), image),
        T.GeneralizedChannelPermute(channels=dim),
        torch.distributions.ReshapeTransform(image, (dim,)),
        T.affine_coupling(dim, hidden_dims=h2),
    ]


class _ShiftOnly(nn.Module):
    """Pyro's coupling MLP (``DenseNN``) for the shift, and a log-scale of exactly 0: with
    it ``AffineCoupling`` is NICE's additive coupling. (Clipping the log-scale to [0, 0]
    is not: Pyro's clamp passes the gradient through, so the unused log-scale outputs
    would still train the shared hidden layers.)"""

    def __init__(self, dim: int, h2: list[int]) -> None:
        super().__init__()
        self.net = DenseNN(dim // 2, h2, param_dims=[dim - dim // 2])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shift = self.net(x)
        return shift, torch.zeros_like(shift)


def _pyro(family: str, dim: int, num_flows: int, h2: list[int]) -> list:
    if family == "pyro-glow":
        return [t for _ in range(num_flows) for t in _pyro_glow_block(dim, h2)]
    make = {
        "pyro-additive-coupling": lambda: T.AffineCoupling(dim // 2, _ShiftOnly(dim, h2)),
        "pyro-affine-coupling": lambda: T.affine_coupling(dim, hidden_dims=h2),
        "pyro-spline-coupling": lambda: T.spline_coupling(dim, hidden_dims=h2),
        # IAF-direction like its affine_autoregressive: the inverse scores data in one pass
        "pyro-spline-ar": lambda: T.spline_autoregressive(dim, hidden_dims=h2).inv,
        # Pyro's autoregressive transform is IAF-direction: its inverse is the MAF
        "pyro-maf": lambda: T.affine_autoregressive(dim, hidden_dims=h2).inv,
    }[family]
    layers: list = []
    for k in range(num_flows):
        layers += [Reverse()] if k else []
        layers.append(make())
    return layers


def _zuko(family: str, dim: int, num_flows: int, h2: list[int]) -> list:
    """One zuko ``Flow`` (its own standard normal base), as a one-element list."""
    opts = {"transforms": num_flows, "hidden_features": h2}
    flow = {
        # NICE with additive couplings (zuko's default is affine, i.e. RealNVP)
        "zuko-nice": lambda: zuko.flows.NICE(
            dim, univariate=zuko.transforms.AdditiveTransform, shapes=[()], **opts
        ),
        "zuko-realnvp": lambda: zuko.flows.RealNVP(dim, **opts),
        # passes=2: coupling, as ours (at D = 2 it is also the autoregressive NSF)
        "zuko-nsf": lambda: zuko.flows.NSF(dim, bins=8, passes=2, **opts),
        "zuko-nsf-ar": lambda: zuko.flows.NSF(dim, bins=8, **opts),  # autoregressive
        "zuko-maf": lambda: zuko.flows.MAF(dim, **opts),
        "zuko-glow": lambda: _zuko_glow(dim, num_flows, h2),
    }[family]()
    return [flow]


def _zuko_glow(dim: int, num_flows: int, h2: list[int]) -> nn.Module:
    """zuko has no Glow flow; its parts: per block (data side first) a learned elementwise
    affine map (actnorm without the data initialisation), an LU linear map (identity start)
    and an affine coupling whose halves alternate between blocks (as in zuko's RealNVP)."""
    flows = zuko.flows
    layers = []
    for k in range(num_flows):
        zero = torch.zeros(dim)
        layers += [
            flows.UnconditionalTransform(zuko.transforms.MonotonicAffineTransform, zero, zero),
            flows.UnconditionalTransform(zuko.transforms.LULinearTransform, torch.eye(dim)),
            flows.GeneralCouplingTransform(
                dim, mask=torch.arange(dim) % 2 == k % 2, hidden_features=h2
            ),
        ]
    base = flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True
    )
    return flows.Flow(layers, base)


def build(family: str, dim: int, num_flows: int, hidden: int) -> list:
    """The transforms of one model (base side first); parameters via ``nn.ModuleList``."""
    h2 = [hidden, hidden]
    if family.startswith("pyro-"):
        return _pyro(family, dim, num_flows, h2)
    if family.startswith("zuko-"):
        return _zuko(family, dim, num_flows, h2)
    if family == "glow":  # actnorm, invertible linear map, affine coupling
        # P reverses the coordinates, so consecutive couplings transform alternate halves
        # from the start (with P = I every coupling would update the same half until L U
        # learned to mix; Glow starts its 1x1 convolution at a random rotation)
        reverse = list(range(dim))[::-1]
        layers = []
        for _ in range(num_flows):
            layers += [FLOWS["actnorm"](dim), LinearLU(dim, permutation=reverse)]
            layers.append(FLOWS["realnvp"](dim, hidden_dims=h2))
        return layers
    return interleave_permutations([FLOWS[family](dim, h2) for _ in range(num_flows)])


class ZukoDensity(FlowDensity):
    """A zuko ``Flow`` as a :class:`~pyroflows.FlowDensity` (its distribution is the flow's
    own), so every model is fitted by the same Trainer loop."""

    def __init__(self, flow: nn.Module, dim: int) -> None:
        super().__init__([], dim)
        self.flow = flow

    def distribution(self) -> torch.distributions.Distribution:
        return self.flow()

    def model(self, x: Tensor, beta: float = 1.0) -> None:
        """zuko's distribution is not a Pyro one: the data enter as a factor."""
        pyro.module("zuko_density", self)
        pyro.factor("log_lik", self.log_prob(x).sum())


def density_of(family: str, dim: int, num_flows: int, hidden: int) -> FlowDensity:
    """The model of one family: a FlowDensity over ``build``'s layers, or a zuko flow's."""
    layers = build(family, dim, num_flows, hidden)
    if family.startswith("zuko-"):
        return ZukoDensity(layers[0], dim)
    return FlowDensity(layers, dim)


def fit(density: FlowDensity, train: Tensor, valid: Tensor, args: argparse.Namespace) -> dict:
    """Maximum likelihood with the Trainer: Adam, up to ``--num-steps`` steps (whole
    epochs), validation every epoch, early stopping after ``--patience`` epochs."""
    density.initialize_actnorm(train[:1024])  # (none in zuko's flows)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    trainer = Trainer(
        density,
        train,
        valid,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        warmup_epochs=0,
        early_stopping_epochs=args.patience,
        progress=False,
        seed=args.seed,
    )
    start = time.perf_counter()
    trainer.fit(max(1, math.ceil(args.num_steps / steps_per_epoch)))
    density.eval()
    steps = trainer.epoch * steps_per_epoch
    return {"steps": steps, "valid": trainer.best_elbo, "seconds": time.perf_counter() - start}


def run(task: str, args: argparse.Namespace) -> dict[str, dict]:
    if task == "toy":
        train, valid, test = toy_data()
        families = TOY_FAMILIES + PYRO_FAMILIES + ZUKO_FAMILIES
    else:
        train, valid, test = digits_data(args.data_dir)
        families = DIGIT_FAMILIES
    if args.families:
        families = [f for f in families if f in args.families]
    if zuko is None and any(f.startswith("zuko-") for f in families):
        print("zuko is not installed (pip install zuko): its rows are skipped", flush=True)
        families = [f for f in families if not f.startswith("zuko-")]
    dim = train.shape[-1]
    results = {}
    for family in families:
        pyro.set_rng_seed(args.seed)
        density = density_of(family, dim, args.num_flows, args.hidden)
        info = fit(density, train, valid, args)
        with torch.no_grad():
            lp = density.log_prob(test)
            if task == "digits":  # density of v on [0, 1]^D, per dimension
                lp = (lp + logit_ladj(test)) / dim
        info["test"], info["density"] = float(lp.mean()), density
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
        model = info["density"]
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
    p.add_argument(
        "--num-steps",
        type=int,
        default=3000,
        help="maximum optimizer steps (rounded up to whole epochs)",
    )
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
        "--patience", type=int, default=30, help="epochs without a better validation score"
    )
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="only these families (e.g. realnvp pyro-affine-coupling zuko-realnvp); "
        "None fits every family of the task",
    )
    p.add_argument("--data-dir", default=None, help="directory with binarized_mnist.npz")
    p.add_argument("--seed", type=int, default=0, help="random seed (pyro.set_rng_seed)")
    p.add_argument("--output-dir", default=".", help="where the figures and tables are written")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
