"""ELBO vs sticking the landing vs IWAE vs DReG: quality and cost, in one run.

Two parts, each a table in ``benchmarks/results/objectives.md``:

* **posteriordb**: ``pyroflows.VI(model, loss=...)`` with its default guide (IAF x 4, full
  base) on every posterior of ``../shared/posteriordb``; worst mean and sd error in
  reference-sd units, PSIS k-hat (median over draw sets), steps and time per step (the
  VI driver's whole fit time / its steps, so mode search and pilots are included).
* **VAE**: the planar flow VAE (K flows, MLP) on a subset of static binarized MNIST,
  trained by :class:`pyroflows.Trainer` with each ``loss=`` for the same number of steps;
  test -ELBO (one draw per image) and NLL by importance sampling, ms per step.

    OMP_NUM_THREADS=1 python benchmarks/objectives.py                 # both parts
    python benchmarks/objectives.py --part vae --vae-epochs 1 --output /tmp/obj.md
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import posteriordb as pdb_bench  # noqa: E402
from _timing import time_interleaved  # noqa: E402

from pyroflows import VAE, VI, Trainer, evaluate  # noqa: E402
from pyroflows.datasets import load_dataset  # noqa: E402
from pyroflows.objectives import get_objective  # noqa: E402
from pyroflows.train import module_elbo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("elbo", "stl", "iwae", "dreg")
OVERHEAD_HEADING = "## Default loss: the step is no slower"


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------ posteriordb
def vi_fit(name: str, loss: str, pdb, args: argparse.Namespace) -> dict:
    model, load = pdb.POSTERIORS[name]
    data = load()
    reference = {k: v.numpy() for k, v in pdb.load_reference(name).items()}
    names = list(pdb.REFERENCE_SITES[name])
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vi = VI(model, loss=loss, num_particles=args.particles, seed=args.seed, progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vi.run(**data)
    d = vi.diagnostics()
    row = dict(
        posterior=name,
        loss=loss,
        steps=d["steps"],
        seconds=d["seconds"],
        converged=d["converged"],
        warnings=len(caught),
    )
    row.update(pdb_bench.score_guide(vi.guide, model, data, reference, names, args))
    return row


def run_posteriordb(args: argparse.Namespace) -> list[dict]:
    torch.set_default_dtype(torch.float64)
    pdb = pdb_bench.load_posteriordb(args.posteriordb.resolve())
    rows = []
    for name in args.posteriors or list(pdb.POSTERIORS):
        for loss in args.objectives:
            try:
                row = vi_fit(name, loss, pdb, args)
            except Exception as err:  # one failure must not sink the run
                row = dict(posterior=name, loss=loss, error=f"{type(err).__name__}: {err}"[:120])
            log(f"  {row}")
            rows.append(row)
    torch.set_default_dtype(torch.float32)
    return rows


# -------------------------------------------------------------------------------- VAE
def run_vae(args: argparse.Namespace) -> list[dict]:
    data = load_dataset("mnist", args.data_dir)
    train = data.train[: args.vae_train]
    test = data.test[torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))]
    rows = []
    for loss in args.objectives:
        pyro.set_rng_seed(args.seed)
        vae = VAE((28, 28), latent_dim=args.latent_dim, flow="planar", num_flows=args.num_flows)
        k = 1 if loss in ("elbo", "stl") else args.particles
        obj = get_objective(loss, num_particles=k, vectorize_particles=True)
        trainer = Trainer(
            vae,
            train,
            batch_size=100,
            lr=1e-3,
            optimizer="adam",
            warmup_epochs=0,
            early_stopping_epochs=0,
            progress=False,
            seed=args.seed,
            loss=obj,
        )
        start = time.perf_counter()
        trainer.fit(args.vae_epochs)
        seconds = time.perf_counter() - start
        steps = args.vae_epochs * math.ceil(len(train) / 100)
        test_elbo = evaluate(vae, test[: args.elbo_images], batch_size=500)["elbo"]
        nll = -evaluate(vae, test[: args.nll_images], num_samples=args.nll_samples, batch_size=20)[
            "log_likelihood"
        ]
        row = dict(
            loss=f"{loss} (K={k})",
            steps=steps,
            ms_per_step=1000 * seconds / steps,
            neg_elbo=-test_elbo,
            nll=nll,
            minutes=seconds / 60,
        )
        log(f"  VAE {row}")
        rows.append(row)
    return rows


# ------------------------------------------------------------------- default-loss cost
def step_overhead(args: argparse.Namespace) -> list[dict]:
    """``Trainer.step`` (loss through ``ObjectiveModule.forward``) against the step it
    replaced (``module_elbo`` called directly), interleaved, same VAE and optimizer."""
    rows = []
    for k in (16,):
        pyro.set_rng_seed(0)
        vae = VAE(flow="planar", num_flows=k)
        x = torch.bernoulli(torch.full((100, 784), 0.3))
        trainer = Trainer(vae, x, optimizer="adam", lr=5e-4, progress=False)

        def old_step(trainer: Trainer = trainer, x: torch.Tensor = x) -> None:  # the old body
            trainer.optimizer.zero_grad(set_to_none=True)
            value = module_elbo(trainer.module, x, 1.0)
            (-value / x.shape[0]).backward()
            trainer.optimizer.step()

        for r in range(args.overhead_rounds):
            new_ms, old_ms = time_interleaved(
                [functools.partial(trainer.step, x, 1.0), old_step],
                torch.device("cpu"),
                budget_s=5.0,
            )
            rows.append(dict(k=k, round=r + 1, new=new_ms, old=old_ms, ratio=new_ms / old_ms))
            log(f"  step {rows[-1]}")
    return rows


def overhead_table(rows: list[dict]) -> list[str]:
    out = [
        "| planar K | round | Trainer.step ms | previous step ms | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['k']} | {r['round']} | {fmt(r['new'])} | {fmt(r['old'])} | "
            f"{fmt(r['ratio'], 3)} |"
        )
    return out


# ------------------------------------------------------------------------------ table
def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pdb_table(rows: list[dict]) -> list[str]:
    out = [
        "| posterior | loss | worst mean err | worst sd err | k-hat (range) | NUTS-grade | "
        "steps | ms/step | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['posterior']} | {r['loss']} | error: {r['error']} ||||||| ")
            continue
        grade = r["mean"] < 0.2 and r["sd"] < 0.2 and r["khat"] < 0.7
        lo, hi = r["khat_range"]
        out.append(
            f"| {r['posterior']} | {r['loss']} | {fmt(r['mean'])} | {fmt(r['sd'])} | "
            f"{fmt(r['khat'])} ({fmt(lo)}–{fmt(hi)}) | {'yes' if grade else 'no'} | "
            f"{r['steps']} | {fmt(1000 * r['seconds'] / max(r['steps'], 1), 1)} | "
            f"{fmt(r['seconds'], 0)} |"
        )
    counts = {
        loss: sum(
            1
            for r in rows
            if r["loss"] == loss
            and "error" not in r
            and r["mean"] < 0.2
            and r["sd"] < 0.2
            and r["khat"] < 0.7
        )
        for loss in dict.fromkeys(r["loss"] for r in rows)
    }
    total = len({r["posterior"] for r in rows})
    out += ["", "NUTS-grade count: " + ", ".join(f"{k} {v}/{total}" for k, v in counts.items())]
    return out


def vae_table(rows: list[dict]) -> list[str]:
    out = [
        "| loss | steps | ms/step | test −ELBO | test NLL | train min |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['loss']} | {r['steps']} | {fmt(r['ms_per_step'], 1)} | {fmt(r['neg_elbo'])} | "
            f"{fmt(r['nll'])} | {fmt(r['minutes'], 1)} |"
        )
    return out


def markdown(
    args: argparse.Namespace,
    pdb_rows: list[dict],
    vae_rows: list[dict],
    overhead_rows: list[dict] | None = None,
) -> str:
    lines = [
        "# Objectives: ELBO vs STL vs IWAE vs DReG",
        "",
        f"Generated by `benchmarks/objectives.py {' '.join(sys.argv[1:])}` on "
        f"{platform.node()} ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, seed {args.seed}. Times are wall times on a shared 2-core "
        "machine: they rank costs, they do not time them precisely.",
    ]
    if pdb_rows:
        lines += [
            "",
            "## posteriordb: `VI(model, loss=...)`, default guide",
            "",
            f"{args.particles} particles per step for every loss (IWAE and DReG: the bound "
            f"with K = {args.particles}); errors in reference sds; k-hat median over "
            f"{args.khat_seeds} sets of {args.num_draws} draws.",
            "",
            *pdb_table(pdb_rows),
        ]
    if vae_rows:
        lines += [
            "",
            "## Flow VAE on binarized MNIST: `Trainer(vae, loss=...)`",
            "",
            f"Planar flow VAE (K = {args.num_flows} flows, latent {args.latent_dim}, MLP "
            f"300), first {args.vae_train} training images, {args.vae_epochs} epochs of "
            "batch 100, Adam lr 1e-3, no warm-up, the same seed and the same steps for "
            f"every loss. Test −ELBO on {args.elbo_images} test images (one draw each), "
            f"NLL by importance sampling (S = {args.nll_samples}) on {args.nll_images}.",
            "",
            *vae_table(vae_rows),
        ]
    if overhead_rows:
        lines += [
            "",
            OVERHEAD_HEADING,
            "",
            "The MNIST VAE step (planar flows, batch 100, Adam) as `Trainer.step` computes it "
            "now (the default one-sample ELBO through `ObjectiveModule.forward`, which "
            "distributed wrappers see) against the step body it replaced (`module_elbo` called "
            "directly), timed interleaved in one process (median ms); several rounds.",
            "",
            *overhead_table(overhead_rows),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["both", "posteriordb", "vae", "overhead"], default="both")
    p.add_argument("--overhead-rounds", type=int, default=5)
    p.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--posteriordb", type=Path, default=REPO / ".." / "shared" / "posteriordb")
    p.add_argument("--posteriors", nargs="*", default=None, help="default: all")
    p.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "data")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks/results/objectives.md")
    p.add_argument("--particles", type=int, default=8, help="K for VI, and IWAE/DReG's K")
    p.add_argument("--num-draws", type=int, default=4000)
    p.add_argument("--khat-seeds", type=int, default=3)
    p.add_argument("--vae-train", type=int, default=10_000)
    p.add_argument("--vae-epochs", type=int, default=10)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--num-flows", type=int, default=8)
    p.add_argument("--elbo-images", type=int, default=2000)
    p.add_argument("--nll-images", type=int, default=200)
    p.add_argument("--nll-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.part == "overhead":  # replaces that section of an existing results file
        rows = step_overhead(args)
        print("\n".join(overhead_table(rows)))
        text = args.output.read_text() if args.output.exists() else ""
        head = text.split(OVERHEAD_HEADING)[0].rstrip()
        section = markdown(args, [], [], rows).split(OVERHEAD_HEADING)[1]
        args.output.write_text(f"{head}\n\n{OVERHEAD_HEADING}{section}")
        return
    pdb_rows = run_posteriordb(args) if args.part in ("both", "posteriordb") else []
    args.output.write_text(markdown(args, pdb_rows, []))
    vae_rows = run_vae(args) if args.part in ("both", "vae") else []
    args.output.write_text(markdown(args, pdb_rows, vae_rows))
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main(parse_args())
