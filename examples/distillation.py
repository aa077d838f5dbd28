"""Probability density distillation (van den Oord et al. 2018): a MAF teacher, an IAF student.

1. A MAF teacher is fitted to data by maximum likelihood (MAF scores data in one pass).
2. An IAF student is fitted by minimising KL(student || teacher) on its own samples:
   the student samples in one pass and scores its own samples from the cache, and the
   teacher scores them in one pass, so every step is parallel in the dimension.

Pure reverse KL from the student's identity start does much worse here: off the data
manifold the teacher's log-density is very low (its density step multiplies by up to 1000 in
every layer), so the first gradients are huge and the student's tails recover slowly
(measured with the defaults: KL 2.16 nats without a warm start against 0.35 with it; with the
earlier softplus-scale teacher it failed outright, 9.6 ± 5.2 nats at D = 2). A short warm
start, maximum likelihood of the student on teacher samples (``--warm-start`` steps; the IAF
scores them in D passes), fixes it.

Full run (the defaults: D = 8, K = 4 layers of two hidden layers of 64, 3000 teacher steps,
300 warm-start + 3000 KL student steps; one seed, 1 thread on a shared 2-core CPU):
KL(student || teacher) = 0.347 ± 0.008 nats; the teacher's log-likelihood is -8.22 per point
for student samples, -8.05 for its own samples and -8.52 for test data (so the student's
samples are about as plausible to the teacher as real data); drawing 10000 samples takes
0.011 s from the student and 0.071 s from the teacher (6.2x). Also in
``benchmarks/results/distillation.md``.

Prints the KL estimate, the teacher's log-likelihood of student samples (against its
log-likelihood of its own samples and of test data) and the time to draw samples from
the student (one pass) and from the teacher (D sequential passes); writes
``distillation.json`` and a figure of data, teacher and student samples.

    python examples/distillation.py --num-steps 3000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pyroflows.transforms import FLOWS  # noqa: E402
from pyroflows.transforms._base import interleave_permutations  # noqa: E402


def data(n: int, dim: int) -> Tensor:
    """Two moons in the first two coordinates, an AR(1)-style chain driven by them in the
    rest (so every dimension is dependent), standardised: ``(n, dim)``."""
    theta = math.pi * torch.rand(n)
    upper = torch.rand(n) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    cols = [x + 0.1 * torch.randn(n), y + 0.1 * torch.randn(n)]
    for _ in range(dim - 2):
        cols.append(torch.tanh(2 * cols[-1]) * cols[-2] + 0.5 * torch.randn(n))
    out = torch.stack(cols, -1)[:, :dim]
    return (out - out.mean(0)) / out.std(0)


def stack(name: str, dim: int, num_flows: int, hidden: int) -> list:
    return interleave_permutations([FLOWS[name](dim, [hidden, hidden]) for _ in range(num_flows)])


def model_of(layers: list, dim: int) -> dist.TransformedDistribution:
    zero = torch.zeros(dim)
    return dist.TransformedDistribution(dist.Normal(zero, 1.0).to_event(1), layers)


def params_of(layers: list) -> list[nn.Parameter]:
    return [p for t in layers if isinstance(t, nn.Module) for p in t.parameters()]


def fit_teacher(teacher: list, train: Tensor, args: argparse.Namespace) -> None:
    """Maximum likelihood on mini-batches: one MADE pass per layer per batch."""
    opt = torch.optim.Adam(params_of(teacher), lr=args.lr)
    for _ in range(args.num_steps):
        batch = train[torch.randint(len(train), (args.batch_size,))]
        loss = -model_of(teacher, train.shape[-1]).log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def fit_student(student: list, teacher: list, dim: int, args: argparse.Namespace) -> None:
    """Minimise KL(q_s || p_t) = E_{z ~ q_s}[log q_s(z) − log p_t(z)], reparameterised,
    after ``--warm-start`` steps of maximum likelihood on teacher samples (see the module
    docstring for why)."""
    for p in params_of(teacher):
        p.requires_grad_(False)
    opt = torch.optim.Adam(params_of(student), lr=args.lr)
    for _ in range(min(args.warm_start, args.num_steps)):
        with torch.no_grad():
            s = model_of(teacher, dim).sample((args.batch_size,))
        loss = -model_of(student, dim).log_prob(s).mean()  # IAF inverse: D passes
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(args.num_steps):
        q = model_of(student, dim)
        z = q.rsample((args.batch_size,))
        loss = (q.log_prob(z) - model_of(teacher, dim).log_prob(z)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def sampling_seconds(layers: list, dim: int, n: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` wall time to draw ``n`` samples without autograd."""
    best = math.inf
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model_of(layers, dim).sample((n,))
            best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def report(student: list, teacher: list, test: Tensor, n: int) -> dict[str, float]:
    dim = test.shape[-1]
    q, p = model_of(student, dim), model_of(teacher, dim)
    z = q.sample((n,))
    kl = q.log_prob(z) - p.log_prob(z)
    return {
        "kl_student_teacher": float(kl.mean()),
        "kl_standard_error": float(kl.std() / math.sqrt(n)),
        "teacher_loglik_of_student_samples": float(p.log_prob(z).mean()),
        "teacher_loglik_of_teacher_samples": float(p.log_prob(p.sample((n,))).mean()),
        "teacher_loglik_of_test_data": float(p.log_prob(test).mean()),
        "student_sampling_seconds": sampling_seconds(student, dim, n),
        "teacher_sampling_seconds": sampling_seconds(teacher, dim, n),
    }


def figure(train: Tensor, student: list, teacher: list, path: str) -> None:
    dim = train.shape[-1]
    with torch.no_grad():
        panels = {
            "data": train[:1000],
            "MAF teacher": model_of(teacher, dim).sample((1000,)),
            "IAF student": model_of(student, dim).sample((1000,)),
        }
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6), sharex=True, sharey=True)
    for ax, (title, s) in zip(axes, panels.items(), strict=True):
        ax.scatter(s[:, 0], s[:, 1], s=1, alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict[str, float]:
    os.makedirs(args.output_dir, exist_ok=True)
    pyro.set_rng_seed(args.seed)
    x = data(6000, args.dim)
    train, test = x[:5000], x[5000:]
    teacher = stack("maf", args.dim, args.num_flows, args.hidden)
    student = stack("iaf", args.dim, args.num_flows, args.hidden)
    fit_teacher(teacher, train, args)
    fit_student(student, teacher, args.dim, args)
    out = report(student, teacher, test, args.num_samples)
    out["speedup"] = out["teacher_sampling_seconds"] / out["student_sampling_seconds"]
    for key, value in out.items():
        print(f"{key:36s} {value:.4f}")
    with open(os.path.join(args.output_dir, "distillation.json"), "w") as f:
        json.dump({"args": vars(args), **out}, f, indent=2)
    figure(train, student, teacher, os.path.join(args.output_dir, "distillation.png"))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--num-steps", type=int, default=3000, help="steps for teacher and student")
    p.add_argument(
        "--warm-start",
        type=int,
        default=300,
        help="student steps of maximum likelihood on teacher samples before the KL",
    )
    p.add_argument("--dim", type=int, default=8, help="data dimension (>= 2)")
    p.add_argument(
        "--num-flows", type=int, default=4, help="layers of the teacher and of the student"
    )
    p.add_argument("--hidden", type=int, default=64, help="width of the two MADE hidden layers")
    p.add_argument("--batch-size", type=int, default=256, help="mini-batch / sample size per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--num-samples", type=int, default=10000, help="for KL and timing")
    p.add_argument("--seed", type=int, default=0, help="random seed (pyro.set_rng_seed)")
    p.add_argument(
        "--output-dir", default=".", help="where distillation.json and the figure are written"
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
