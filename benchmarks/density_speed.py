"""Speed of the coupling and MAF families against Pyro's and zuko's equivalents.

Each row times the same operation on the same inputs, K layers on D dimensions with batch B
and the same conditioner widths (two hidden layers of ``--hidden`` units):

- ``log_prob``: the log-density of external points (data), without autograd: one
  conditioner pass per layer for coupling flows and MAF;
- ``train``: the same ``log_prob`` plus its backward pass (one maximum-likelihood step
  without the optimizer update).

Families and peers: ``realnvp`` vs Pyro's ``affine_coupling`` and zuko's ``RealNVP``;
``spline`` vs Pyro's ``spline_coupling`` (8 bins, bound 3) and zuko's ``NSF`` (8 bins);
``maf`` vs the inverse of Pyro's ``affine_autoregressive`` and zuko's ``MAF``. Pyro's
coupling layers get a reversal between layers as ours do. zuko is optional
(``pip install zuko``, a benchmark-only dependency); without it its columns are empty.
The ratio is best peer time / ours (> 1: ours is faster). Timings are interleaved medians
(``_timing.time_interleaved``); configurations above ``--max-work`` are skipped on the CPU.

Run: ``python benchmarks/density_speed.py [--quick]``; writes
``benchmarks/results/density_speed.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import device_name, time_interleaved  # noqa: E402

from pyroflows.transforms import FLOWS  # noqa: E402
from pyroflows.transforms._base import Reverse, interleave_permutations  # noqa: E402

try:
    import zuko
except ImportError:  # optional, benchmark-only
    zuko = None

LogProb = Callable[[torch.Tensor], torch.Tensor]


def _transformed(layers: list, d: int) -> LogProb:
    base = dist.Normal(torch.zeros(d), 1.0).to_event(1)
    return dist.TransformedDistribution(base, layers).log_prob


def ours(family: str, k: int, d: int, h: int) -> LogProb:
    layers = interleave_permutations([FLOWS[family](d, [h, h]) for _ in range(k)])
    return _transformed(layers, d)


def pyro_peer(family: str, k: int, d: int, h: int) -> LogProb:
    make = {
        "realnvp": lambda: T.affine_coupling(d, hidden_dims=[h, h]),
        "spline": lambda: T.spline_coupling(d, hidden_dims=[h, h], count_bins=8, bound=3.0),
        "maf": lambda: T.affine_autoregressive(d, hidden_dims=[h, h]).inv,
    }[family]
    layers: list = []
    for i in range(k):
        layers += [Reverse()] if i else []
        layers.append(make())
    return _transformed(layers, d)


def zuko_peer(family: str, k: int, d: int, h: int) -> LogProb | None:
    if zuko is None:
        return None
    cls = {"realnvp": zuko.flows.RealNVP, "spline": zuko.flows.NSF, "maf": zuko.flows.MAF}
    opts = {"bins": 8} if family == "spline" else {}
    flow = cls[family](d, transforms=k, hidden_features=(h, h), **opts)
    return lambda x: flow().log_prob(x)


def ops(log_prob: LogProb, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each call scores a fresh copy of ``x`` (external points: no transform cache hit)."""

    def score() -> None:
        with torch.no_grad():
            log_prob(x.clone())

    def train() -> None:
        log_prob(x.clone()).sum().backward()

    return {"log_prob": score, "train": train}


def rows(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu")
    out = []
    for family in args.families:
        for k in args.num_flows:
            for d in args.dims:
                for b in args.batches:
                    work = k * b * (d * args.hidden + args.hidden**2 + args.hidden * d * 8)
                    if work > args.max_work:
                        out.append({"family": family, "K": k, "D": d, "B": b, "skipped": True})
                        continue
                    pyro.set_rng_seed(0)
                    x = torch.randn(b, d)
                    models = {
                        "ours": ours(family, k, d, args.hidden),
                        "pyro": pyro_peer(family, k, d, args.hidden),
                        "zuko": zuko_peer(family, k, d, args.hidden),
                    }
                    names = [n for n, m in models.items() if m is not None]
                    for op in ("log_prob", "train"):
                        fns = [ops(models[n], x)[op] for n in names]
                        ms = time_interleaved(fns, device, repeats=args.repeats, budget_s=1.0)
                        row = {"family": family, "K": k, "D": d, "B": b, "op": op}
                        row |= dict(zip(names, ms, strict=True))
                        row["ratio"] = min(row[n] for n in names if n != "ours") / row["ours"]
                        out.append(row)
                        print(fmt(row), flush=True)
    return out


def fmt(r: dict) -> str:
    if r.get("skipped"):
        return f"| {r['family']} | {r['K']} | {r['D']} | {r['B']} | skipped | | | | |"
    z = f"{r['zuko']:.3f}" if "zuko" in r else "-"
    return (
        f"| {r['family']} | {r['K']} | {r['D']} | {r['B']} | {r['op']} | {r['ours']:.3f} | "
        f"{r['pyro']:.3f} | {z} | {r['ratio']:.2f} |"
    )


def write(args: argparse.Namespace, res: list[dict]) -> Path:
    path = Path(args.output or Path(__file__).parent / "results" / "density_speed.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    zv = zuko.__version__ if zuko is not None else "not installed"
    lines = [
        "# Coupling and MAF flows: speed against Pyro and zuko",
        "",
        f"{device_name(torch.device('cpu'))}, {platform.python_version()}, torch "
        f"{torch.__version__}, pyro {pyro.__version__}, zuko {zv}, "
        f"{torch.get_num_threads()} thread(s), hidden {args.hidden}.",
        "Times in ms (interleaved medians); ratio = best peer / ours (> 1: ours faster).",
        "",
        "| family | K | D | B | op | ours | Pyro | zuko | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[fmt(r) for r in res],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=["realnvp", "spline", "maf"])
    p.add_argument("--num-flows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256, 8192])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-work", type=float, default=3e9, help="CPU skip threshold")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="D in {2, 64}, B in {1, 256}")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.batches = [2, 64], [1, 256]
    return args


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    path = write(args, rows(args))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(parse_args())
