"""Command line: ``pyroflows vae`` trains and evaluates a flow VAE.

With no arguments it trains a planar-flow VAE on the embedded static-MNIST sample in well
under a minute on a CPU and writes ``outputs/vae/results.json`` and ``outputs/vae/vae.png``.
User errors (a missing data directory, a bad flag value, an unwritable output directory, a
failed download) print one line naming the flag and exit with status 2.

Data-parallel: ``torchrun --nproc_per_node=N -m pyroflows vae ...`` trains on N processes
(gloo on CPUs, NCCL with ``--device cuda``, one GPU per process): ``--batch-size`` is the
global mini-batch, rank 0 logs and writes the outputs, and the test set is scored sharded
across the ranks. See :class:`pyroflows.train.Trainer` and README "Scaling out".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from pyroflows import __version__
from pyroflows import distributed as _dist
from pyroflows.datasets import DATASETS, Dataset, load_dataset
from pyroflows.train import Trainer, evaluate
from pyroflows.transforms import CONDITIONAL_FLOWS
from pyroflows.vae import ARCHITECTURES, VAE

__all__ = ["main"]

_DESCRIPTION = (
    "pyroflows: normalizing-flow variational inference for Pyro. 'pyroflows vae' (also the "
    "default when only options are given) trains and evaluates a flow VAE; with no options it "
    "trains a planar-flow VAE on the embedded static-MNIST sample in about a minute on a CPU "
    "and writes outputs/vae/results.json and outputs/vae/vae.png."
)


class UsageError(Exception):
    """A user error: printed as one line naming the flag, exit status 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, and lines wrapped at spaces only: flow names such as
    ``sylvester-orthogonal`` stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _add_vae_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vae",
        help="train and evaluate a flow VAE",
        description="Train a Bernoulli VAE whose posterior is a Gaussian followed by K "
        "amortized flows, evaluate the test ELBO and importance-sampled log-likelihood, and "
        "write results.json, vae.png (data, reconstructions, samples) and a checkpoint. The "
        "paper's settings (van den Berg et al. 2018) are --architecture conv --epochs 2000 "
        "--warmup 100 --patience 100 --optimizer adamax --lr 5e-4 --num-samples 5000.",
        formatter_class=_HelpFormatter,
    )
    flows = ", ".join(["none", *sorted(CONDITIONAL_FLOWS)])
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="benchmark dataset")
    p.add_argument(
        "--data-dir", default=None, help="directory with the data; default: embedded sample"
    )
    p.add_argument("--download", action="store_true", help="download missing original files")
    p.add_argument("--flow", default="planar", help=f"flow family, one of: {flows}")
    p.add_argument("--num-flows", type=int, default=4, help="number of flow layers K")
    p.add_argument("--architecture", default="mlp", choices=ARCHITECTURES, help="encoder/decoder")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the latent z")
    p.add_argument("--hidden-dim", type=int, default=300, help="MLP width")
    p.add_argument("--epochs", type=int, default=30, help="maximum number of epochs")
    p.add_argument("--batch-size", type=int, default=100, help="mini-batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (paper: 5e-4)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamax"], help="paper: adamax")
    p.add_argument("--warmup", type=int, default=10, help="KL warm-up epochs")
    p.add_argument("--patience", type=int, default=100, help="early-stopping epochs; 0: off")
    p.add_argument("--num-samples", type=int, default=1000, help="importance samples (0: off)")
    p.add_argument("--test-subset", type=int, default=0, help="score the first N test rows")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--output-dir", default="outputs/vae", help="where results are written")
    p.add_argument("--resume", action="store_true", help="resume from output-dir/checkpoint.pt")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress bars (default: only on a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="hide them")
    p.set_defaults(func=run_vae)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyroflows`` argument parser (one subcommand, ``vae``)."""
    parser = argparse.ArgumentParser(prog="pyroflows", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pyroflows {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_vae_parser(sub)
    return parser


def _check(args: argparse.Namespace) -> None:
    """Validate flag values; raise :class:`UsageError` naming the flag."""
    if args.flow != "none" and args.flow not in CONDITIONAL_FLOWS:
        names = ", ".join(["none", *sorted(CONDITIONAL_FLOWS)])
        raise UsageError(f"--flow must be one of {names}; got {args.flow!r}")
    positive = ("num_flows", "latent_dim", "hidden_dim", "epochs", "batch_size")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}"
            )
    for name in ("warmup", "patience", "num_samples", "test_subset"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(args, name)}")
    if not (0 < args.lr < math.inf):
        raise UsageError(f"--lr must be a positive, finite number; got {args.lr}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} requested but CUDA is not available")
    if args.data_dir is not None and not Path(args.data_dir).is_dir() and not args.download:
        raise UsageError(
            f"--data-dir {args.data_dir}: no such directory (add --download to create it and "
            "fetch the original files)"
        )
    if args.data_dir is None and args.dataset != "mnist":
        raise UsageError(
            f"--dataset {args.dataset} has no embedded sample: pass --data-dir DIR with its "
            "files, and --download to fetch the originals"
        )
    _check_output_dir(Path(args.output_dir))


def _check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        raise UsageError(f"--output-dir {out}: not writable ({err.strerror or err})") from err


def _load_data(args: argparse.Namespace) -> Dataset:
    """``load_dataset`` with its errors as one-line messages naming the flags."""
    try:
        return load_dataset(args.dataset, args.data_dir, download_missing=args.download)
    except (ValueError, OSError) as err:
        msg = str(err).replace("pass download_missing=True", "add --download")
        msg = msg.replace("data_dir=", "--data-dir ")
        raise UsageError(f"--dataset {args.dataset}: {msg}") from err


def save_figure(vae: VAE, data: Dataset, path: Path, n: int = 10) -> None:
    """Write a PNG: test images, their reconstructions and samples from the prior."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    device = next(vae.parameters()).device
    idx = torch.linspace(0, len(data.test) - 1, n).long()  # spread out: files sort by class
    x = data.test[idx].to(device)
    rows = [x, vae.reconstruct(x), vae.sample(n)]
    titles = ["test data", "reconstructions", "samples"]
    fig, axes = plt.subplots(3, n, figsize=(n * 0.9, 3 * 1.0))
    for r, (imgs, title) in enumerate(zip(rows, titles, strict=True)):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(imgs[c].reshape(data.shape).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_RANK = 0  # this process's rank under torchrun: only rank 0 logs and writes outputs


def _log(msg: str) -> None:
    if _RANK == 0:
        print(msg, file=sys.stderr, flush=True)


def _load_data_in_turn(args: argparse.Namespace, ctx: _dist.Context | None) -> Dataset:
    """Rank 0 loads (and downloads) first, then the others: no concurrent download."""
    if ctx is not None and ctx.rank != 0:
        ctx.barrier()
    data = _load_data(args)
    if ctx is not None and ctx.rank == 0:
        ctx.barrier()
    return data


def run_vae(args: argparse.Namespace) -> dict:
    """Train, evaluate and write the outputs of ``pyroflows vae``; returns the results."""
    global _RANK
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _dist.resolve(None, args.device)  # initializes the group under torchrun
    _RANK = 0 if ctx is None else ctx.rank
    if ctx is not None:
        _log(f"data-parallel: {ctx.world_size} processes ({torch.distributed.get_backend()})")
    pyro.set_rng_seed(args.seed)
    data = _load_data_in_turn(args, ctx)
    source = args.data_dir or "embedded sample"
    _log(
        f"{args.dataset} ({source}): train {len(data.train)}, valid {len(data.valid)}, "
        f"test {len(data.test)}"
    )
    if not data.binary:
        _log(
            "note: grey levels scored with a Bernoulli likelihood (cross-entropy); the papers "
            "use a 256-way categorical for Frey faces, so numbers are not comparable"
        )
    vae = VAE(
        data.shape, args.latent_dim, args.flow, args.num_flows, args.architecture, args.hidden_dim
    )
    trainer = Trainer(
        vae, data.train, data.valid, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, warmup_epochs=args.warmup, early_stopping_epochs=args.patience,
        device=args.device, checkpoint_path=out / "checkpoint.pt", checkpoint_every=10,
        progress=args.progress, seed=args.seed, distributed=ctx or False,
    )  # fmt: skip
    if args.resume and (out / "checkpoint.pt").exists():
        trainer.load(out / "checkpoint.pt")
        _log(f"resumed from {out / 'checkpoint.pt'} at epoch {trainer.epoch}")

    def on_epoch(h: dict) -> None:
        _log(
            f"epoch {h['epoch']:4d}  beta {h['beta']:.2f}  train ELBO {h['train_elbo']:9.3f}  "
            f"valid ELBO {h['valid_elbo']:9.3f}  ({h['seconds']:.1f}s)"
        )

    start = time.perf_counter()
    history = trainer.fit(args.epochs, on_epoch=on_epoch)
    train_seconds = time.perf_counter() - start
    test = data.test[: args.test_subset] if args.test_subset else data.test
    start = time.perf_counter()
    scores = evaluate(
        vae, test, num_samples=args.num_samples, progress=args.progress,
        distributed=ctx or False,
    )  # fmt: skip
    results = {
        "test_elbo": scores["elbo"],
        "test_log_likelihood": scores.get("log_likelihood", math.nan),
        "num_test": len(test),
        "best_valid_elbo": trainer.best_elbo,
        "epochs_run": trainer.epoch,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "world_size": trainer.world_size,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "history": history,
        "versions": {"pyroflows": __version__, "torch": torch.__version__,
                     "pyro": pyro.__version__, "python": platform.python_version()},
    }  # fmt: skip
    if _RANK != 0:
        return results
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    save_figure(vae, data, out / "vae.png")
    _log(
        f"test ELBO {results['test_elbo']:.3f}, IS log-likelihood "
        f"{results['test_log_likelihood']:.3f} (S={args.num_samples}) nats per image; "
        f"wrote {out / 'results.json'} and {out / 'vae.png'}"
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyroflows`` console script; ``pyroflows`` alone runs ``vae``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["vae", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        args.func(args)
    except UsageError as err:
        print(f"pyroflows {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
