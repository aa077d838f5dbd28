"""Per-layer costs at batch 1: the two slow rows of the density speed grid, attributed.

Times our actnorm ``train`` (K = 8, D = 64) and linear-lu ``sample`` (K = 8, D = 2) against
zuko's equivalents with the models and operations of ``density_speed.py``, counts the aten
calls of one call with ``torch.profiler``, and times a variant of ours that removes the
suspected cost (actnorm: the plain ``(y - loc) / s`` inverse instead of the fused one;
linear-lu: forming W = (I + L) U also for D <= 16), each at a few sizes:

    OMP_NUM_THREADS=1 python benchmarks/density_opcounts.py   # ~2 min; zuko needed

Prints a table and writes ``benchmarks/results/density_opcounts.md``. Times are medians of
interleaved rounds (``_timing.time_interleaved``, as in ``density_speed.py``; us per call),
so each ratio compares calls made side by side.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import density_speed as ds  # noqa: E402
from _timing import time_interleaved  # noqa: E402

ACTNORM = importlib.import_module("pyroflows.transforms.actnorm")
LINEAR_LU = importlib.import_module("pyroflows.transforms.linear_lu")


def _plain_actnorm_inverse(y, loc, raw):
    """The unfused inverse: x = (y - loc) / s."""
    scale = ACTNORM.actnorm_scale(raw)
    x = (y - loc) / scale
    return x, scale.log().sum(-1).expand(x.shape[:-1])


def _w_for_small_d(x):
    d = x.shape[-1]
    return d > 0 and (x.numel() // d > d or d <= 16)


@contextmanager
def _variant(family: str) -> Iterator[None]:
    """Ours with the variant of the module docstring in place."""
    if family == "actnorm":
        saved = ACTNORM.ActNorm.inverse_fn
        ACTNORM.ActNorm.inverse_fn = staticmethod(_plain_actnorm_inverse)
        try:
            yield
        finally:
            ACTNORM.ActNorm.inverse_fn = saved
    else:
        saved = LINEAR_LU._more_points_than_dims
        LINEAR_LU._more_points_than_dims = _w_for_small_d
        try:
            yield
        finally:
            LINEAR_LU._more_points_than_dims = saved


def aten_calls(fn: Callable[[], object]) -> int:
    for _ in range(20):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def row(family: str, op: str, k: int, d: int, b: int, repeats: int) -> dict:
    x = torch.randn(b, d)
    ours = ds.ops(ds.ours(family, k, d, 64), x)[op]
    zuko = ds.ops(ds.zuko_peer(family, k, d, 64), x)[op]

    def variant() -> None:
        with _variant(family):
            ours()

    fns = {"ours": ours, "variant": variant, "zuko": zuko}
    counts = {n: aten_calls(f) for n, f in fns.items()} if b == 1 else {}
    ms = time_interleaved(list(fns.values()), torch.device("cpu"), repeats=repeats)
    return dict(family=family, op=op, k=k, d=d, b=b, counts=counts,
                **{n: 1e3 * t for n, t in zip(fns, ms, strict=True)})  # fmt: skip


def fmt(r: dict) -> str:
    c = r["counts"]
    counts = f"{c['ours']} / {c['variant']} / {c['zuko']}" if c else ""
    return (
        f"| {r['family']} `{r['op']}` | {r['k']} | {r['d']} | {r['b']} | {counts} "
        f"| {r['ours']:,.0f} | {r['variant']:,.0f} | {r['zuko']:,.0f} "
        f"| {r['zuko'] / r['ours']:.2f} | {r['zuko'] / r['variant']:.2f} |"
    )


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if ds.zuko is None:
        raise SystemExit("zuko is needed: pip install zuko")
    configs = [
        ("actnorm", "train", 8, 64, 1),
        ("actnorm", "train", 8, 64, 256),
        ("actnorm", "train", 8, 512, 8192),
        ("linear-lu", "sample", 8, 2, 1),
        ("linear-lu", "sample", 1, 2, 1),
        ("linear-lu", "sample", 8, 64, 1),
    ]
    if args.quick:
        configs = [c for c in configs if c[4] == 1]
    lines = [
        "# Per-layer costs at batch 1 (issue 14): the last two slow rows, attributed",
        "",
        f"`python benchmarks/density_opcounts.py`; torch {torch.__version__}, zuko "
        f"{ds.zuko.__version__}, one thread. Times: us per call, medians of at least "
        f"{args.rounds} interleaved rounds (`_timing.time_interleaved`); aten calls of one call (B = 1 rows). Variant: actnorm with the "
        "plain `(y - loc) / s` inverse; linear-lu forming W = (I + L) U also for D <= 16. "
        "Ratio: zuko / ours (> 1: ours faster).",
        "",
        "| row | K | D | B | aten calls ours / variant / zuko | ours | variant | zuko "
        "| ratio | ratio, variant |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    for family, op, k, d, b in configs:
        lines.append(fmt(row(family, op, k, d, b, args.rounds)))
        print(lines[-1], flush=True)
    if not args.quick:
        out = Path(__file__).parent / "results" / "density_opcounts.md"
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--quick", action="store_true", help="B = 1 rows, 2 rounds; writes nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 2
    return args


if __name__ == "__main__":
    main(parse_args())
