"""Speed of the new flow families against Pyro's and zuko's equivalents.

Each row times the same operation on the same inputs, K layers on D dimensions with batch B
and the same conditioner widths (two hidden layers of ``--hidden`` units):

- ``log_prob``: the log-density of external points (data), without autograd: one
  conditioner pass per layer for coupling flows and MAF;
- ``train``: the same ``log_prob`` plus its backward pass (one maximum-likelihood step
  without the optimizer update);
- ``sample``: B draws without autograd (the forward, generative direction): one pass per
  layer for coupling flows, D sequential passes per layer for every MAF (ours, Pyro's and
  zuko's alike).

Families and peers: ``nice`` (additive coupling with NICE's scaling) has no equivalent in
Pyro or zuko: its columns are their affine coupling flows, the nearest (which also compute a
scale); ``realnvp`` vs Pyro's ``affine_coupling`` and zuko's ``RealNVP``;
``spline`` vs Pyro's ``spline_coupling`` (8 bins, bound 3) and zuko's ``NSF`` (8 bins,
``passes=2``: coupling); ``maf`` vs the inverse of Pyro's ``affine_autoregressive`` and
zuko's ``MAF``; ``actnorm`` vs Pyro's ``BatchNorm`` in eval mode (a fixed elementwise affine
map) and zuko's learned ``MonotonicAffineTransform``; ``linear-lu`` vs Pyro's
``GeneralizedChannelPermute`` on a (D, 1, 1) image (no column where its (B, D, D) product
exceeds 2^28 floats) and zuko's ``LULinearTransform``. Pyro's MADE needs hidden units >= D,
so its MAF column is empty at D = 512 (hidden 64). Pyro's coupling layers get a
reversal between layers as ours do. zuko is optional (``pip install zuko``, a
benchmark-only dependency); without it its column is empty. The ratio is best peer time /
ours (> 1: ours is faster). Timings are interleaved medians (``_timing.time_interleaved``,
at least ``--repeats`` rounds after a warm-up round, more while under 1 s; 3 rounds when
the warm-up round took over 2 s, the warm-up round alone when it took over 60 s); rows whose
rough multiply-add count (``work``) exceeds ``--max-work`` are skipped: with the default
the D-pass sampling of MAF at K = 8 and of spline-ar at K = 1 and 8, D = 512, B = 8192
(3.3e12 to 2.7e13, minutes per call for each model).
A model whose estimated peak memory for a ``train`` row (``TRAIN_BYTES``, measured) exceeds
``--max-memory-gb`` is left out of that row (its column reads ``-``, the row says why): Pyro's
and zuko's spline couplings at K = 8, D = 512, B = 8192 would need about 20 GB each (and every
autoregressive spline there, ours included).

Run: ``OMP_NUM_THREADS=1 python benchmarks/density_speed.py`` (the full grid: K in {1, 8},
D in {2, 64, 512}, B in {1, 256, 8192}, every family and op; see the results file for its
runtime) or ``--quick`` (D in {2, 64}, B in {1, 256}); writes
``benchmarks/results/density_speed.md`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

COUPLING = ("nice", "realnvp", "spline", "spline-ar", "maf")
DENSITY_AUTOREGRESSIVE = ("maf", "spline-ar")
"""MADE in the density direction: D sequential passes to sample (ours, Pyro's, zuko's), and
Pyro's versions are inverted autoregressive transforms, whose MADE needs hidden >= D."""
ELEMENTWISE_OR_LINEAR = ("actnorm", "linear-lu")
SLOW_ROUND_S = 2.0
"""A row whose first (warm-up) round takes longer is timed over 3 rounds only."""
ONE_ROUND_S = 60.0
"""A row whose warm-up round takes longer is timed by that round alone (marked ``1 round``):
spline at K = 8, D = 512, B = 8192 and zuko's LU sampling there, several minutes a round."""
GCP_MAX_ELEMENTS = 2**28
"""Pyro's ``GeneralizedChannelPermute`` materialises a (B, D, D) product in both directions;
rows where that exceeds 2^28 floats (1 GiB) have no Pyro column."""
TRAIN_BYTES = {
    "spline": {"ours": 200, "pyro": 650, "zuko": 700},
    "spline-ar": {"ours": 600, "pyro": 950, "zuko": 700},
}
"""Bytes per layer and per element of the batch (B x D) that a ``train`` call's autograd graph
holds, by family and model: the peak-RSS increase of ``log_prob(x).sum().backward()`` from
K = 1 to K = 2 (D = 512, B = 2048; Pyro's spline-ar at D = 64, B = 8192), rounded up; other
families hold a few floats per element. The autoregressive spline transforms every
coordinate (the coupling half of them), hence its larger graph."""


def _dist(layers: list, d: int) -> dist.TransformedDistribution:
    base = dist.Normal(torch.zeros(d), 1.0).to_event(1)
    return dist.TransformedDistribution(base, layers)


def ours(family: str, k: int, d: int, h: int) -> dist.Distribution:
    if family in ELEMENTWISE_OR_LINEAR:  # a stack of K layers, no conditioner
        return _dist([FLOWS[family](d) for _ in range(k)], d)
    return _dist(interleave_permutations([FLOWS[family](d, [h, h]) for _ in range(k)]), d)


def _pyro_gcp(d: int) -> list:
    """Pyro's learned 1x1 convolution on D channels of a 1x1 image (reshaped in and out)."""
    image = (d, 1, 1)
    return [
        torch.distributions.ReshapeTransform((d,), image),
        T.GeneralizedChannelPermute(channels=d),
        torch.distributions.ReshapeTransform(image, (d,)),
    ]


def pyro_peer(family: str, k: int, d: int, h: int, b: int) -> dist.Distribution | None:
    if family == "actnorm":  # BatchNorm in eval mode: a fixed elementwise affine map
        return _dist([T.BatchNorm(d).eval() for _ in range(k)], d)
    if family == "linear-lu":
        if b * d * d > GCP_MAX_ELEMENTS:
            return None
        return _dist([t for _ in range(k) for t in _pyro_gcp(d)], d)
    if family in DENSITY_AUTOREGRESSIVE and h < d:  # AutoRegressiveNN: "Hidden dimension
        # must not be less than the input dimension"
        return None
    make = {
        "nice": lambda: T.affine_coupling(d, hidden_dims=[h, h]),  # nearest: affine
        "realnvp": lambda: T.affine_coupling(d, hidden_dims=[h, h]),
        "spline": lambda: T.spline_coupling(d, hidden_dims=[h, h], count_bins=8, bound=3.0),
        "maf": lambda: T.affine_autoregressive(d, hidden_dims=[h, h]).inv,
        "spline-ar": lambda: (
            T.spline_autoregressive(d, hidden_dims=[h, h], count_bins=8, bound=3.0).inv
        ),
    }[family]
    layers: list = []
    for i in range(k):
        layers += [Reverse()] if i else []
        layers.append(make())
    return _dist(layers, d)


class _Zuko:
    """A zuko ``Flow`` with the ``log_prob``/``sample`` of its distribution."""

    def __init__(self, flow: torch.nn.Module) -> None:
        self.flow = flow

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(x)

    def sample(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.flow().sample(shape)


def zuko_peer(family: str, k: int, d: int, h: int) -> _Zuko | None:
    if zuko is None:
        return None
    if family in ELEMENTWISE_OR_LINEAR:
        if family == "actnorm":  # a learned elementwise affine map
            args = (zuko.transforms.MonotonicAffineTransform, torch.zeros(d), torch.zeros(d))
        else:  # a learned LU-parameterised linear map
            args = (zuko.transforms.LULinearTransform, torch.eye(d))
        layers = [zuko.flows.UnconditionalTransform(*args) for _ in range(k)]
        base = zuko.flows.UnconditionalDistribution(
            zuko.distributions.DiagNormal, torch.zeros(d), torch.ones(d), buffer=True
        )
        return _Zuko(zuko.flows.Flow(layers, base))
    cls = {
        "nice": zuko.flows.RealNVP,
        "realnvp": zuko.flows.RealNVP,
        "spline": zuko.flows.NSF,
        "spline-ar": zuko.flows.NSF,
        "maf": zuko.flows.MAF,
    }
    # NSF with passes=2 is a coupling flow, as ours and Pyro's spline_coupling
    opts = {"bins": 8, "passes": 2} if family == "spline" else {}
    opts = {"bins": 8} if family == "spline-ar" else opts  # zuko's default NSF: autoregressive
    return _Zuko(cls[family](d, transforms=k, hidden_features=(h, h), **opts))


def ops(model: dist.Distribution | _Zuko, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each call scores a fresh copy of ``x`` (external points: no transform cache hit)."""

    def score() -> None:
        with torch.no_grad():
            model.log_prob(x.clone())

    def train() -> None:
        model.log_prob(x.clone()).sum().backward()

    def sample() -> None:
        with torch.no_grad():
            model.sample(x.shape[:1])

    return {"log_prob": score, "train": train, "sample": sample}


AUTOREGRESSIVE_MODULES = ("pyroflows.transforms.maf", "pyroflows.transforms.spline_autoregressive")


@contextmanager
def all_passes() -> Iterator[None]:
    """Our autoregressive sampling without its early exit at a bitwise fixed point: D passes
    per layer, as the peers always take. Near the identity (these freshly built flows) the
    exit comes after a few passes, which a trained flow need not allow; so the sample rows of
    ``maf`` and ``spline-ar`` also time ours this way (``ours, D passes``) and the ratio uses
    it: the conservative comparison."""

    def no_exit(step: Callable, y: torch.Tensor) -> tuple[torch.Tensor, object]:
        x, aux = y, None
        for _ in range(y.shape[-1]):
            x, aux = step(x)
        return x, aux

    modules = [importlib.import_module(m) for m in AUTOREGRESSIVE_MODULES]
    saved = [m.solve_autoregressive_aux for m in modules]
    for m in modules:
        m.solve_autoregressive_aux = no_exit
    try:
        yield
    finally:
        for m, fn in zip(modules, saved, strict=True):
            m.solve_autoregressive_aux = fn


def with_all_passes(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        with all_passes():
            fn()

    return call


def passes(family: str, op: str, d: int) -> int:
    """Sequential conditioner passes per layer: D for sampling MAF and spline-ar, else 1."""
    return d if family in DENSITY_AUTOREGRESSIVE and op == "sample" else 1


def work(family: str, op: str, k: int, d: int, b: int, h: int) -> float:
    """A rough multiply-add count of one call (the skip rule; see ``--max-work``)."""
    if family in ELEMENTWISE_OR_LINEAR:
        return k * b * (d * d if family == "linear-lu" else d)
    out = d * (23 if family.startswith("spline") else 2)
    return passes(family, op, d) * k * b * (d * h + h * h + h * out)


def train_gb(family: str, name: str, k: int, d: int, b: int) -> float:
    """Estimated peak memory (GB) of one ``train`` call: :data:`TRAIN_BYTES` x (K + 1) x B x D
    (the K = 1 measurement holds about two layers' worth)."""
    per = TRAIN_BYTES.get(family, {}).get(name, 16)
    return per * (k + 1) * b * d / 1e9


def rows(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu")
    out = []
    for family in args.families:
        for k in args.num_flows:
            for d in args.dims:
                for b in args.batches:
                    out += config_rows(args, device, family, k, d, b)
    return out


def config_rows(
    args: argparse.Namespace, device: torch.device, family: str, k: int, d: int, b: int
) -> list[dict]:
    """The rows of one (family, K, D, B): every op, ours and the peers, interleaved."""
    pyro.set_rng_seed(0)
    x = torch.randn(b, d)
    models = {
        "ours": ours(family, k, d, args.hidden),
        "pyro": pyro_peer(family, k, d, args.hidden, b),
        "zuko": zuko_peer(family, k, d, args.hidden),
    }
    names = [n for n, m in models.items() if m is not None]
    out = []
    for op in args.ops:
        row = {"family": family, "K": k, "D": d, "B": b, "op": op}
        if work(family, op, k, d, b, args.hidden) > args.max_work:
            out.append(row | {"skipped": True})
            print(fmt(out[-1]), flush=True)
            continue
        names_op = names
        if op == "train":
            gb = {n: train_gb(family, n, k, d, b) for n in names}
            big = [n for n in names if gb[n] > args.max_memory_gb]
            names_op = [n for n in names if n not in big]
            if big:
                est = ", ".join(f"{n} ~{gb[n]:.2g} GB" for n in big)
                row["memory_note"] = f"not run: {est} > --max-memory-gb {args.max_memory_gb:g}"
        if not names_op:
            out.append(row | {"skipped": True})
            print(fmt(out[-1]), flush=True)
            continue
        fns = [ops(models[n], x)[op] for n in names_op]
        if passes(family, op, d) > 1:  # ours again, without the early exit
            names_op = [*names_op, "ours_all_passes"]
            fns.append(with_all_passes(ops(models["ours"], x)[op]))
        start = time.perf_counter()
        warm = []  # one warm-up round, timed: slow rows get fewer rounds
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            warm.append(1e3 * (time.perf_counter() - t0))
        if sum(warm) > 1e3 * ONE_ROUND_S:  # minutes per round: the warm-up round is the time
            ms, row["rounds"] = warm, 1
        else:
            slow = sum(warm) > 1e3 * SLOW_ROUND_S
            repeats = 3 if slow else args.repeats
            ms = time_interleaved(fns, device, repeats, warmup=0 if slow else 1, budget_s=1.0)
        row["seconds"] = time.perf_counter() - start
        row |= dict(zip(names_op, ms, strict=True))
        peers = [row[n] for n in names_op if not n.startswith("ours")]
        ours_time = max(row["ours"], row.get("ours_all_passes", 0.0))  # the conservative one
        row["ratio"] = min(peers) / ours_time if peers else float("nan")
        out.append(row)
        print(fmt(row), flush=True)
    return out


def fmt(r: dict) -> str:
    head = f"| {r['family']} | {r['K']} | {r['D']} | {r['B']} | {r['op']} |"
    if r.get("skipped"):
        why = r.get("memory_note", "--max-work")
        return f"{head} skipped ({why}) | | | |"
    p = f"{r['pyro']:.3f}" if "pyro" in r else "-"
    z = f"{r['zuko']:.3f}" if "zuko" in r else "-"
    note = " (1 round)" if r.get("rounds") == 1 else ""
    note += f" (peers {r['memory_note']})" if "memory_note" in r else ""
    ours = r["ours"]
    if "ours_all_passes" in r:  # the D-pass time in the column, the early exit's in a note
        ours = max(ours, r["ours_all_passes"])
        note += f" (ours with the early exit: {r['ours']:.3f})"
    ratio = "-" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}"
    return f"{head} {ours:.3f} | {p} | {z} | {ratio}{note} |"


def write(args: argparse.Namespace, res: list[dict]) -> Path:
    path = Path(args.output or Path(__file__).parent / "results" / "density_speed.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    zv = zuko.__version__ if zuko is not None else "not installed"
    lines = [
        "# New flow families: speed against Pyro and zuko",
        "",
        f"{device_name(torch.device('cpu'))}, {platform.python_version()}, torch "
        f"{torch.__version__}, pyro {pyro.__version__}, zuko {zv}, "
        f"{torch.get_num_threads()} thread(s), hidden {args.hidden}.",
        f"`python benchmarks/density_speed.py {' '.join(sys.argv[1:])}`: "
        f"{len(res)} rows in {sum(r.get('seconds', 0.0) for r in res) / 60:.1f} min of timing.",
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
    p.add_argument("--families", nargs="+", default=[*COUPLING, *ELEMENTWISE_OR_LINEAR])
    p.add_argument("--ops", nargs="+", default=["log_prob", "train", "sample"])
    p.add_argument("--num-flows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256, 8192])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-work", type=float, default=1e12, help="skip rows above (work())")
    p.add_argument("--max-memory-gb", type=float, default=12.0, help="see TRAIN_BYTES")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="D in {2, 64}, B in {1, 256}")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    known = (*COUPLING, *ELEMENTWISE_OR_LINEAR)
    unknown = [f for f in args.families if f not in known]
    if unknown:
        p.error(f"--families: {unknown} not timed here; choose from {list(known)}")
    if args.quick:
        args.dims, args.batches = [2, 64], [1, 256]
    return args


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    path = write(args, rows(args))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(parse_args())
