"""Reproduce Table 1 of van den Berg et al. (2018) on statically binarized MNIST.

Trains the six posteriors (no flow, planar, IAF, O-SNF, H-SNF, T-SNF) with the same budget,
then reports the test −ELBO (full test set, one sample per image) and the importance-sampled
NLL (S = 5000) beside the paper's numbers, plus the cost of a training step of our amortized
planar VAE (K = 16) against the same VAE built from Pyro's ``ConditionalPlanar``.

CPU budget (default; about 40 minutes with OMP_NUM_THREADS=1)::

    python benchmarks/mnist_table.py --data-dir ../shared/data

Paper settings (GPU; gated-conv nets, 2000 epochs max, 100 warm-up, patience 100,
NLL on the full test set)::

    python benchmarks/mnist_table.py --data-dir ../shared/data --full --device cuda

Each variant writes ``<output-dir>/<variant>.json``; the table is rebuilt from every JSON
present, so variants can be run separately (``--variants none planar``) and ``--table-only``
just rewrites ``benchmarks/results/mnist_table.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.distributions.transforms import ConditionalPlanar as PyroConditionalPlanar
from torch import nn

from pyroflows.datasets import load_dataset
from pyroflows.infer import Trainer, elbo, evaluate
from pyroflows.transforms import CONDITIONAL_FLOWS
from pyroflows.vae import VAE

# name -> (label, registry key, K, extra constructor kwargs); paper: van den Berg et al. 2018
VARIANTS = {
    "none": ("VAE (no flow)", "none", 0, {}),
    "planar": ("Planar", "planar", 16, {}),
    "iaf": ("IAF", "iaf", 4, {}),
    "o-snf": ("O-SNF (M=32)", "sylvester-orthogonal", 16, {"num_ortho_vecs": 32}),
    "h-snf": ("H-SNF (H=8)", "sylvester-householder", 16, {"num_householder": 8}),
    "t-snf": ("T-SNF", "sylvester-triangular", 16, {}),
}
# Table 1 of van den Berg et al. (2018), static MNIST, mean ± std over 3 runs.
PAPER = {
    "none": ("86.55 ± 0.06", "82.14 ± 0.07"),
    "planar": ("86.06 ± 0.31", "81.91 ± 0.22"),
    "iaf": ("84.20 ± 0.17", "80.79 ± 0.12"),
    "o-snf": ("83.32 ± 0.06", "80.22 ± 0.03"),
    "h-snf": ("83.40 ± 0.01", "80.29 ± 0.02"),
    "t-snf": ("83.40 ± 0.10", "80.28 ± 0.06"),
}
TABLE = Path(__file__).parent / "results" / "mnist_table.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def flow_kwargs(key: str, extra: dict) -> dict:
    """Keep only the extras the registered constructor accepts (hidden_dims=[] is default)."""
    if key == "none":
        return {}
    params = inspect.signature(CONDITIONAL_FLOWS[key]).parameters
    return {k: v for k, v in extra.items() if k in params}


def num_flows(args: argparse.Namespace, variant: str) -> int:
    """K: the paper's per-variant K in --full mode, else --num-flows for every flow."""
    k = VARIANTS[variant][2]
    return 0 if k == 0 else (args.num_flows or k)


def build(args: argparse.Namespace, variant: str) -> VAE:
    _, key, _, extra = VARIANTS[variant]
    k = num_flows(args, variant)
    if key != "none" and key not in CONDITIONAL_FLOWS:
        raise SystemExit(f"flow {key!r} is not registered yet; have {sorted(CONDITIONAL_FLOWS)}")
    return VAE(
        (28, 28),
        latent_dim=64,
        flow=key,
        num_flows=max(k, 1),
        architecture=args.architecture,
        hidden_dim=300,
        flow_kwargs=flow_kwargs(key, extra),
    )


def nll_subset(test: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` test images drawn at random (seed 0); the test file is sorted by digit."""
    if not n:
        return test
    return test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]]


def run_variant(args: argparse.Namespace, variant: str, data) -> dict:
    pyro.set_rng_seed(args.seed)
    vae = build(args, variant)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"{variant}: {n_params} parameters, training {args.epochs} epochs")
    trainer = Trainer(
        vae,
        data.train,
        data.valid,
        batch_size=100,
        lr=args.lr,
        optimizer=args.optimizer,
        warmup_epochs=args.warmup,
        early_stopping_epochs=args.patience,
        device=args.device,
        progress=args.progress,
        checkpoint_path=Path(args.output_dir) / f"{variant}.pt",
        seed=args.seed,
    )
    ckpt = Path(args.output_dir) / f"{variant}.pt"
    if args.resume and ckpt.exists():
        trainer.load(ckpt)
        log(f"{variant}: resumed at epoch {trainer.epoch}")

    def on_epoch(h: dict) -> None:
        tr, va = h["train_elbo"], h["valid_elbo"]
        log(f"{variant} epoch {h['epoch']}: train {tr:.2f} valid {va:.2f}")

    trainer.fit(args.epochs, on_epoch=on_epoch)
    train_s = sum(h["seconds"] for h in trainer.history)
    test = data.test
    start = time.perf_counter()
    pyro.set_rng_seed(args.seed)
    elbo_test = evaluate(vae, test, batch_size=500, device=args.device)["elbo"]
    sub = nll_subset(test, args.nll_subset)
    ll = evaluate(
        vae,
        sub,
        num_samples=args.num_samples,
        batch_size=args.nll_batch,
        batch_samples=args.batch_samples,
        device=args.device,
    )
    eval_s = time.perf_counter() - start
    result = {
        "variant": variant,
        "flow": VARIANTS[variant][1],
        "num_flows": num_flows(args, variant),
        "flow_kwargs": flow_kwargs(VARIANTS[variant][1], VARIANTS[variant][3]),
        "parameters": n_params,
        "epochs_run": trainer.epoch,
        "best_valid_elbo": trainer.best_elbo,
        "test_neg_elbo": -elbo_test,
        "test_nll": -ll["log_likelihood"],
        "test_neg_elbo_on_nll_subset": -ll["elbo"],
        "nll_subset": len(sub),
        "num_samples": args.num_samples,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "config": {k: v for k, v in vars(args).items() if k not in ("variants",)},
    }
    log(f"{variant}: -ELBO {-elbo_test:.2f}, NLL {-ll['log_likelihood']:.2f} ({eval_s:.0f}s eval)")
    return result


@torch.no_grad()
def diagnose(vae: VAE, x: torch.Tensor, num_samples: int = 100) -> dict:
    """Is the flow used, and how loose is the bound? On the images ``x``:

    * ``flow_logdet``: E_q[Σ_k log|det J_k|] (0 for an unused, identity flow);
    * ``neg_elbo_100``: −ELBO averaged over ``num_samples`` draws per image (low noise).
    """
    vae.eval()
    q = vae.encoder(x)
    z = q.rsample((num_samples,))  # (S, N, D)
    z0 = z
    for t in reversed(q.transforms):
        z0 = t.inv(z0)
    logdet = q.base_dist.log_prob(z0) - q.log_prob(z)  # (S, N)
    log_w = vae.prior().log_prob(z) + vae.likelihood(z).log_prob(x) - q.log_prob(z)
    return {"flow_logdet": logdet.mean().item(), "neg_elbo_100": -log_w.mean().item()}


def add_diagnostics(args: argparse.Namespace, variant: str, data, result: dict) -> dict:
    """Add :func:`diagnose` on the NLL subset, from the variant's final checkpoint."""
    vae = build(args, variant)
    state = torch.load(Path(args.output_dir) / f"{variant}.pt", weights_only=True)
    vae.load_state_dict(state["best_state"] or state["module"])
    sub = nll_subset(data.test, result["nll_subset"] if result["nll_subset"] < 10000 else 0)
    pyro.set_rng_seed(args.seed)
    result.update(diagnose(vae, sub))
    log(f"{variant}: {diagnose.__name__} {result['flow_logdet']:.2f} {result['neg_elbo_100']:.2f}")
    return result


def finetune_encoder(args: argparse.Namespace, variant: str, data, result: dict) -> dict:
    """Amortization check: freeze the trained decoder, train only q(z|x) for more steps.

    With p(x, z) fixed, the ELBO can only rise by a better posterior, so the drop of the
    −ELBO (100 draws, NLL subset) measures how much the posterior family still had to give.
    """
    vae = build(args, variant)
    state = torch.load(Path(args.output_dir) / f"{variant}.pt", weights_only=True)
    vae.load_state_dict(state["best_state"] or state["module"])
    vae.decoder.requires_grad_(False)
    opt = torch.optim.Adam(vae.encoder.parameters(), lr=args.lr, eps=1e-7)
    g = torch.Generator().manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    sub = nll_subset(data.test, result["nll_subset"] if result["nll_subset"] < 10000 else 0)
    before = diagnose(vae, sub)["neg_elbo_100"]
    vae.train()
    start = time.perf_counter()
    for _ in range(args.finetune_encoder):
        idx = torch.randint(len(data.train), (100,), generator=g)
        opt.zero_grad()
        (-elbo(vae.model, vae.guide, data.train[idx]) / 100).backward()
        opt.step()
    after = diagnose(vae, sub)
    result["finetune"] = {
        "steps": args.finetune_encoder,
        "neg_elbo_100_before": before,
        "neg_elbo_100_after": after["neg_elbo_100"],
        "flow_logdet_after": after["flow_logdet"],
        "seconds": time.perf_counter() - start,
    }
    log(f"{variant}: encoder fine-tune {before:.2f} -> {after['neg_elbo_100']:.2f}")
    return result


class _LinearPlanarHead(nn.Module):
    """One linear map h -> (b, u, w), the parameter head Pyro's ConditionalPlanar expects."""

    def __init__(self, context_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(context_dim, 2 * dim + 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, u, w = torch.split(self.linear(h), [1, self.dim, self.dim], dim=-1)
        return b, u, w


def step_ms(vae: VAE, x: torch.Tensor, steps: int, warmup: int = 5) -> float:
    """Median wall time of one Adamax training step (forward, backward, update) in ms."""
    opt = torch.optim.Adamax(vae.parameters(), lr=5e-4, eps=1e-7)
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        opt.zero_grad()
        (-elbo(vae.model, vae.guide, x) / len(x)).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def step_costs(args: argparse.Namespace, data) -> dict:
    """ms per training step (batch 100) of every variant as configured for this run."""
    x = data.train[:100].to(args.device)
    costs = {}
    for v in VARIANTS:
        pyro.set_rng_seed(args.seed)
        costs[v] = step_ms(build(args, v).to(args.device), x, steps=3, warmup=1)
        log(f"step cost {v}: {costs[v]:.0f} ms")
    return costs


def throughput(args: argparse.Namespace, data) -> dict:
    """ms per step: our amortized planar VAE (K=16) vs the same with Pyro's ConditionalPlanar."""
    x = data.train[:100].to(args.device)
    pyro.set_rng_seed(args.seed)
    ours = VAE(flow="planar", num_flows=16, architecture=args.architecture).to(args.device)
    theirs = VAE(flow="planar", num_flows=16, architecture=args.architecture)
    h_dim = theirs.encoder.hidden_dim
    theirs.encoder.flows = nn.ModuleList(
        PyroConditionalPlanar(_LinearPlanarHead(h_dim, 64)) for _ in range(16)
    )
    theirs = theirs.to(args.device)
    plain = VAE(flow="none", architecture=args.architecture).to(args.device)
    res = {}
    for _ in range(2):  # interleave to share any machine-load drift
        for name, vae in (("pyroflows_planar16", ours), ("pyro_planar16", theirs)):
            res.setdefault(name, []).append(step_ms(vae, x, args.throughput_steps))
        res.setdefault("no_flow", []).append(step_ms(plain, x, args.throughput_steps))
    out = {k: min(v) for k, v in res.items()}
    out["ratio_pyro_over_ours"] = out["pyro_planar16"] / out["pyroflows_planar16"]
    out["step_costs"] = step_costs(args, data)
    out["threads"] = torch.get_num_threads()
    out["device"] = str(args.device)
    log(f"throughput: {out}")
    return out


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def write_table(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    rows = {
        v: json.loads((out / f"{v}.json").read_text())
        for v in VARIANTS
        if (out / f"{v}.json").exists()
    }
    tp_path = out / "throughput.json"
    tp = json.loads(tp_path.read_text()) if tp_path.exists() else None
    any_row = next(iter(rows.values()), None)
    cfg = any_row["config"] if any_row else vars(args)
    lines = [
        "# Static binarized MNIST: flow posteriors at equal budget",
        "",
        "Generated by `benchmarks/mnist_table.py`"
        + (" `--full`" if cfg.get("full") else "")
        + f" (`--architecture {cfg['architecture']} --epochs {cfg['epochs']} "
        f"--warmup {cfg['warmup']} --seed {cfg['seed']}`). Test −ELBO on all 10,000 test "
        "images (one sample each); NLL by importance sampling with "
        f"S = {cfg['num_samples']} on "
        + (
            f"{cfg['nll_subset']} test images drawn at random (seed 0; the test file is "
            "sorted by digit)"
            if cfg["nll_subset"]
            else "the full test set"
        )
        + " (the −ELBO in parentheses is on that subset; gap = −ELBO − NLL on that subset with "
        "the −ELBO averaged over 100 draws per image, the part of the bound lost to the "
        "posterior approximation; Σ log-det = E_q Σ_k log|det J_k| there, 0 for an unused "
        "flow). Every variant: latent dim "
        f"64, batch 100, {cfg['optimizer'].capitalize()} (lr {cfg['lr']:g}, eps 1e-7), "
        f"β warm-up over {cfg['warmup']} epochs, the same seed and the same epoch budget; "
        "the paper used Adamax (lr 5e-4). Lower is better.",
        "",
        "| Model | K | −ELBO (ours) | NLL (ours) | gap | Σ log-det | −ELBO (paper) "
        "| NLL (paper) | epochs | train min | ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, (label, _, k, _) in VARIANTS.items():
        r = rows.get(v)
        k = r["num_flows"] if r else (k and (cfg.get("num_flows") or k))
        paper = PAPER[v]
        cost = (tp or {}).get("step_costs", {}).get(v)
        ms = "" if cost is None else f"{cost:.0f}"
        if r is None:
            why = "not run"
            if cost is not None:
                hours = cost / 1e3 * 500 * cfg["epochs"] / 3600
                why = f"not run: {hours:.1f} h for the budget"
            row = f"| {label} | {k or '—'} | {why} | | | | {paper[0]} | {paper[1]} | | | {ms} |"
            lines.append(row)
            continue
        gap = r.get("neg_elbo_100", r["test_neg_elbo_on_nll_subset"]) - r["test_nll"]
        lines.append(
            f"| {label} | {k or '—'} | {fmt(r['test_neg_elbo'])} "
            f"({fmt(r['test_neg_elbo_on_nll_subset'])}) | {fmt(r['test_nll'])} | {fmt(gap)} | "
            f"{fmt(r.get('flow_logdet'))} | "
            f"{paper[0]} | {paper[1]} | {r['epochs_run']} | {r['train_seconds'] / 60:.1f} | {ms} |"
        )
    lines += [
        "",
        "Paper: van den Berg, Hasenclever, Tomczak & Welling (2018), *Sylvester Normalizing "
        "Flows for Variational Inference*, Table 1 (gated-conv encoder/decoder, up to 2000 "
        "epochs with early stopping, mean ± std of 3 runs). Our CPU numbers come from a far "
        "smaller budget and the MLP architecture, so compare the ordering, not the values. "
        "One seed per row (see the seed check below, if run). `train min` is wall "
        "time and `ms/step` one pass of 3 steps per variant, both on a shared 2-core machine "
        "(load 3–6 from other jobs), so they rank the costs rather than time them. Variants "
        "marked not run would need the stated time at that step cost; run them with "
        "`--variants o-snf --resume` (checkpoints per epoch) or `--full` on a GPU.",
    ]
    for extra in args.seed_check or []:
        other = {
            v: json.loads(p.read_text())
            for v in VARIANTS
            if (p := Path(extra) / f"{v}.json").exists()
        }
        if not other:
            continue
        seed = next(iter(other.values()))["config"]["seed"]
        lines += [
            "",
            f"## Seed check: the same budget with `--seed {seed}`",
            "",
            f"From `{extra}` (NLL with S = {next(iter(other.values()))['num_samples']}).",
            "",
            "| Model | −ELBO (seed above) | −ELBO (this seed) | NLL (seed above) "
            "| NLL (this seed) |",
            "|---|---|---|---|---|",
        ]
        for v, o in other.items():
            r = rows.get(v, {})
            lines.append(
                f"| {VARIANTS[v][0]} | {fmt(r.get('test_neg_elbo'))} | {fmt(o['test_neg_elbo'])} "
                f"| {fmt(r.get('test_nll'))} | {fmt(o['test_nll'])} |"
            )
    tuned = {v: r["finetune"] for v, r in rows.items() if "finetune" in r}
    if tuned:
        steps = next(iter(tuned.values()))["steps"]
        lines += [
            "",
            "## Why do (or don't) flows help here? Encoder-only fine-tuning",
            "",
            f"Each trained VAE's decoder is frozen and only q(z|x) is trained for {steps} more "
            "steps (batch 100, same optimizer). With p(x, z) fixed the ELBO can only rise "
            "through a better posterior, so the drop of the −ELBO (100 draws per image, the "
            "NLL subset) shows what the posterior family still had to give.",
            "",
            "| Model | −ELBO before | −ELBO after | drop | Σ log-det after |",
            "|---|---|---|---|---|",
        ]
        for v, f in tuned.items():
            b, a = f["neg_elbo_100_before"], f["neg_elbo_100_after"]
            lines.append(
                f"| {VARIANTS[v][0]} | {b:.2f} | {a:.2f} | {b - a:.2f} | "
                f"{f['flow_logdet_after']:.2f} |"
            )
    if tp is not None:
        lines += [
            "",
            "## Training-step cost: amortized planar VAE, K = 16",
            "",
            f"Batch 100, {cfg['architecture']} VAE, Adamax step (forward + backward + update), "
            f"best of 2 interleaved medians, device `{tp['device']}`, {tp['threads']} thread(s).",
            "",
            "| VAE | ms / step |",
            "|---|---|",
            f"| pyroflows `planar` (K=16) | {tp['pyroflows_planar16']:.2f} |",
            f"| Pyro `ConditionalPlanar` (K=16, same linear heads) | {tp['pyro_planar16']:.2f} |",
            f"| no flow | {tp['no_flow']:.2f} |",
            "",
            f"Ratio Pyro / pyroflows: **{tp['ratio_pyro_over_ours']:.2f}×**.",
        ]
    lines += [
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}, Python {sys.version.split()[0]}.",
    ]
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text("\n".join(lines) + "\n")
    log(f"wrote {args.table}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=None, help="directory with binarized_mnist.npz")
    p.add_argument("--full", action="store_true", help="the paper's settings (GPU)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--architecture", default=None, choices=["mlp", "conv"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--num-flows", type=int, default=None, help="K for every flow")
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--optimizer", default=None, choices=["adamax", "adam"])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--batch-samples", type=int, default=500)
    p.add_argument("--nll-subset", type=int, default=None, help="0 = the full test set")
    p.add_argument("--nll-batch", type=int, default=20)
    p.add_argument("--throughput-steps", type=int, default=30)
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--seed-check", nargs="*", help="output dirs of runs with other seeds")
    p.add_argument(
        "--finetune-encoder", type=int, default=0, help="steps of encoder-only training"
    )
    p.add_argument("--resume", action="store_true", help="continue from saved checkpoints")
    p.add_argument("--diagnose-only", action="store_true", help="re-diagnose saved variants")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--output-dir", default="outputs/mnist_table")
    p.add_argument("--table", default=str(TABLE))
    args = p.parse_args(argv)
    full = {
        "architecture": "conv",
        "epochs": 2000,
        "warmup": 100,
        "patience": 100,
        "nll_subset": 0,
    }
    full |= {"num_flows": 0, "optimizer": "adamax", "lr": 5e-4}  # 0: the paper's K per variant
    cpu = {"architecture": "mlp", "epochs": 4, "warmup": 2, "patience": 0, "nll_subset": 200}
    cpu |= {"num_flows": 8, "optimizer": "adam", "lr": 1e-3}
    for k, v in (full if args.full else cpu).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        omp = os.environ.get("OMP_NUM_THREADS")
        log(f"threads={torch.get_num_threads()} OMP_NUM_THREADS={omp}")
        data = load_dataset("mnist", args.data_dir)
        log(f"data: train {tuple(data.train.shape)}, test {tuple(data.test.shape)}")
        if not args.no_throughput:
            (out / "throughput.json").write_text(json.dumps(throughput(args, data), indent=1))
        for v in args.variants:
            path = out / f"{v}.json"
            if args.diagnose_only or args.finetune_encoder:
                result = json.loads(path.read_text())
            else:
                result = run_variant(args, v, data)
            if args.finetune_encoder:
                result = finetune_encoder(args, v, data, result)
            else:
                result = add_diagnostics(args, v, data, result)
            path.write_text(json.dumps(result, indent=1))
            write_table(args)
    write_table(args)


if __name__ == "__main__":
    main()
