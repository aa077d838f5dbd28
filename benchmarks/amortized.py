"""AutoAmortizedFlowGuide on the conjugate varying-intercept regression of
examples/amortized_hierarchical.py (issue 17 acceptance), against its exact posterior.

1. N = 20 groups, full batch: worst mean and sd error over all 22 latents, in exact-posterior
   sd units, of the amortized guide, a full AutoFlowGuide over all latents and AutoNormal.
2. Per-step time at N = 1,000 vs N = 100,000 with subsample_size = 256 (alternating blocks of
   steps in the same process) and the peak resident memory.
3. Posterior of the globals (mu, beta) after subsampled training, against the exact one:
   3.1 the sd of the subsampled gradient of the globals at N = 100,000 vs the full-batch one;
   3.2 at N = 2,000, subsample 256 vs a full-batch fit of the same guide vs exact;
   3.3 at N = 100,000, subsample 256; 3.4 (--curve) the error against the step budget T
   and with subsample 4096, and the extrapolated T for Monte-Carlo-level agreement.

    python benchmarks/amortized.py --curve    # writes benchmarks/results/amortized.md (~25 min)
    python benchmarks/amortized.py            # the same without 3.4 (~15 min)
    python benchmarks/amortized.py --quick    # smaller budgets, to check the script

4. (--vi) pyroflows.VI with the amortized guide at N = 20 (full batch), 2,000 and 100,000
   (subsample 256), three seeds each, writes benchmarks/results/amortized_vi.md (~20 min on
   one core). ``--vi-sizes 20 2000:256 --out a.md`` and ``--vi-sizes 100000:256 --out b.md``
   split it over two processes (the results file of 2026-12-03 was merged from such a pair).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import resource
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyroflows import SAGA_ELBO, AutoAmortizedFlowGuide, AutoFlowGuide

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    path = ROOT / "examples" / "amortized_hierarchical.py"
    spec = importlib.util.spec_from_file_location("amortized_hierarchical", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = load_example()


def worst_errors(draws, mean, sd):
    q = torch.cat(
        [draws[n].reshape(len(draws[n]), -1).double() for n in ("mu", "beta", "alpha")], 1
    )
    return float(((q.mean(0) - mean) / sd).abs().max()), float((q.std(0) / sd - 1).abs().max())


def accuracy_small(args, lines):
    lines += [
        "## 1. N = 20 groups, all latents (full batch)",
        "",
        f"Model: examples/amortized_hierarchical.py (mu, beta ~ N(0, 5²), alpha_i ~ N(mu, 1), "
        f"y_ij ~ N(alpha_i + beta x_j, 2²), {args.obs} observations per group, data seed = fit seed). "
        f"Every guide: {args.steps_small} SVI steps of Adam (lr 0.01 for 40%, then a fresh Adam decaying 100x; "
        "AutoAmortizedFlowGuide.precondition_globals() between the phases), "
        f"one particle; errors from {args.draws} guide draws against the exact Gaussian posterior, "
        "worst over the 22 latents, in units of the exact posterior sd "
        "(Monte-Carlo se of one mean error ≈ 1/sqrt(draws) = "
        f"{1 / args.draws**0.5:.3f}).",
        "",
        "| seed | guide | worst mean error | worst sd error | fit seconds |",
        "|---|---|---|---|---|",
    ]
    rows = {}
    for seed in args.seeds:
        y = ex.simulate(20, args.obs, seed=seed).double()
        mean, sd = ex.exact_posterior(y)
        for label, make in [
            ("AutoAmortizedFlowGuide", lambda: AutoAmortizedFlowGuide(ex.model)),
            ("AutoFlowGuide (iaf, 4 layers)", lambda: AutoFlowGuide(ex.model)),
            ("AutoNormal", lambda: AutoNormal(ex.model)),
        ]:
            pyro.set_rng_seed(seed)
            pyro.clear_param_store()
            guide = make()
            seconds = ex.fit(guide, y, args.steps_small, None, 0.01)
            with torch.no_grad():
                if isinstance(guide, AutoNormal):
                    draws = Predictive(ex.model, guide=guide, num_samples=args.draws)(y)
                else:
                    draws = guide.sample_posterior(y, num_samples=args.draws)
            m, s = worst_errors(draws, mean, sd)
            rows[(seed, label)] = (m, s)
            lines.append(f"| {seed} | {label} | {m:.3f} | {s:.3f} | {seconds:.1f} |")
            print(lines[-1], flush=True)
    lines.append("")
    return rows


def timing(args, lines):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    setups = {}
    for n in (1_000, 100_000):
        y = ex.simulate(n, args.obs, seed=0)
        guide = AutoAmortizedFlowGuide(ex.model)
        svi = SVI(ex.model, guide, pyro.optim.Adam({"lr": 0.001}), Trace_ELBO())
        for _ in range(20):  # set up and warm up
            svi.step(y, 256)
        setups[n] = (svi, y)
    times = {n: [] for n in setups}
    for _ in range(args.rounds):  # alternate blocks, so both see the same machine load
        for n, (svi, y) in setups.items():
            start = time.perf_counter()
            for _ in range(args.block):
                svi.step(y, 256)
            times[n].append(1000 * (time.perf_counter() - start) / args.block)
    small, large = statistics.median(times[1_000]), statistics.median(times[100_000])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += [
        "## 2. Per-step time, subsample_size = 256",
        "",
        f"{args.rounds} alternating blocks of {args.block} SVI steps per N after 20 warm-up steps, "
        "one process, torch threads = 1; median over blocks (all blocks in brackets).",
        "",
        "| N | ms / step | blocks |",
        "|---|---|---|",
        f"| 1,000 | {small:.2f} | {', '.join(f'{t:.2f}' for t in times[1_000])} |",
        f"| 100,000 | {large:.2f} | {', '.join(f'{t:.2f}' for t in times[100_000])} |",
        "",
        f"Ratio N = 100,000 / N = 1,000: **{large / small:.2f}**. Peak resident memory of the "
        f"benchmark process so far: {rss:.0f} MiB (the data y of N = 100,000 is "
        f"{100_000 * args.obs * 4 / 2**20:.1f} MiB; the guide's parameters do not grow with N).",
        "",
    ]
    print("\n".join(lines[-9:]), flush=True)
    return large / small


def global_errors(guide, y, subsample_size, draws):
    """Mean error (exact-posterior sd units) and sd ratio of mu and beta under the global guide."""
    d = guide.global_guide.sample_posterior(y, subsample_size, num_samples=draws)
    mean, cov = ex.exact_globals(y)
    sd = cov.diagonal().sqrt()
    out = {}
    for i, name in enumerate(("mu", "beta")):
        q = d[name].double()
        out[name] = (float((q.mean() - mean[i]) / sd[i]), float(q.std() / sd[i]))
    return out


def globals_fit(n, subsample_size, steps, seed, args, num_particles=1, saga=False):
    """One seeded fit of the example's recipe; errors of the globals against the exact ones."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    y = ex.simulate(n, args.obs, seed=seed)
    guide = AutoAmortizedFlowGuide(ex.model)
    seconds = ex.fit(guide, y, steps, subsample_size, 0.01, num_particles, saga)
    return guide, y, global_errors(guide, y, subsample_size, args.draws), seconds


def exact_guide(args, n, batch):
    """A guide trained for ``args.noise_warm`` subsampled steps, then its global guide set to
    the exact marginal posterior of (mu, beta) in whitened coordinates."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    y = ex.simulate(n, args.obs, seed=0)
    guide = AutoAmortizedFlowGuide(ex.model)
    svi = SVI(ex.model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(args.noise_warm):
        svi.step(y, batch)
    gg = guide.global_guide
    mean, cov = ex.exact_globals(y)
    with torch.no_grad():
        for layer in gg.flows:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    gg.precondition(mean.float(), torch.linalg.cholesky(cov).float())  # q = exact marginal
    return guide, y


def gradient_noise(args, lines):
    """The sd of the subsampled and of the full-batch gradient of the loss with respect to the
    global guide's location and log-scale, in whitened coordinates of the exact posterior."""
    n, batch = 100_000, 256
    guide, y = exact_guide(args, n, batch)
    gg = guide.global_guide
    elbo = Trace_ELBO()
    grads = {}
    for label, b, reps in [("subsample 256", batch, args.noise_reps), ("full batch", None, 40)]:
        out = []
        for _ in range(reps):
            loss = elbo.differentiable_loss(ex.model, guide, y, b)
            out.append(torch.cat(torch.autograd.grad(loss, [gg.loc, gg.scale_unconstrained])))
        grads[label] = torch.stack(out)
    names = ["location mu", "location beta", "log-scale mu", "log-scale beta"]
    sub, full = grads["subsample 256"].std(0), grads["full batch"].std(0)
    lines += [
        "### 3.1 Gradient noise of the globals at N = 100,000",
        "",
        f"Guide after {args.noise_warm} steps (subsample 256, Adam lr 0.01), then its global guide "
        "set to the exact marginal posterior of (mu, beta) in whitened coordinates "
        "(`AutoFlowGuide.precondition(exact mean, chol(exact cov))`, flows reset to the identity), so "
        "a unit of its location is one exact-posterior sd and the loss's curvature there is about 1. "
        f"sd over {args.noise_reps} subsampled / 40 full-batch evaluations of the gradient of the "
        "negative ELBO (one particle), at that fixed guide. sqrt(N / B) = "
        f"{(n / batch) ** 0.5:.1f}.",
        "",
        "| parameter | sd, subsample 256 | sd, full batch | ratio |",
        "|---|---|---|---|",
    ]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {sub[i]:.2f} | {full[i]:.2f} | {sub[i] / full[i]:.1f} |")
    lines.append("")
    print("\n".join(lines[-6:]), flush=True)
    return sub, full


VR_CONFIGS = [("plain", 1), ("plain", 16), ("SAGA", 1), ("SAGA", 16)]


def vr_elbo(kind, k):
    if kind == "SAGA":
        return SAGA_ELBO("groups", k, max_plate_nesting=1)
    return Trace_ELBO(k, vectorize_particles=k > 1, max_plate_nesting=1)


def variance_reduction(args, lines):
    """Section 3.5: the gradient noise and the globals' error with vectorized particles and
    with SAGA control variates (pyroflows.SAGA_ELBO), N = 100,000, subsample 256."""
    n, batch = 100_000, 256
    guide, y = exact_guide(args, n, batch)
    gg = guide.global_guide
    params = [gg.loc, gg.scale_unconstrained]
    warm = int(args.saga_epochs * n / batch)
    lines += [
        "### 3.5 Variance reduction: particles and SAGA control variates (N = 100,000, B = 256)",
        "",
        "Gradient noise at the fixed guide of 3.1 (global guide = the exact posterior, whitened): "
        f"sd over {args.noise_reps} steps of the gradient of the loss with respect to the global "
        "guide's location and log-scale. `plain` is Trace_ELBO (K vectorized particles); `SAGA` "
        f"is `pyroflows.SAGA_ELBO` after {warm} steps ({args.saga_epochs} epochs of the groups) "
        "that fill its table at the same fixed guide. Step times on the shared machine.",
        "",
        "| estimator | particles K | location mu | location beta | log-scale mu | log-scale beta "
        "| ms per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, k in VR_CONFIGS:
        elbo = vr_elbo(kind, k)
        if kind == "SAGA":
            for _ in range(warm):
                elbo.loss_and_grads(ex.model, guide, y, batch)
        out = []
        start = time.perf_counter()
        for _ in range(args.noise_reps):
            for p in params:
                p.grad = None
            elbo.loss_and_grads(ex.model, guide, y, batch)
            out.append(torch.cat([p.grad for p in params]))
        ms = (time.perf_counter() - start) / args.noise_reps * 1e3
        sd = torch.stack(out).std(0)
        cells = " | ".join(f"{float(v):.2f}" for v in sd)
        lines.append(f"| {kind} | {k} | {cells} | {ms:.0f} |")
        print(lines[-1], flush=True)
    for p in guide.parameters():
        p.grad = None
    lines += [
        "",
        f"Fits: the recipe of 3.3 ({args.steps_large} steps) with K = {args.vr_particles} "
        "particles, without and with SAGA.",
        "",
        *TABLE,
    ]
    res = {}
    for kind in ("plain", "SAGA"):
        for seed in args.seeds_large:
            label = f"{kind}, {args.vr_particles} particles"
            _, _, errs, seconds = globals_fit(
                n, batch, args.steps_large, seed, args, args.vr_particles, kind == "SAGA"
            )
            res.setdefault(kind, []).append(errs)
            lines += error_rows(label, seed, errs, seconds)
            print("\n".join(lines[-2:]), flush=True)
    lines += ["", "| fit | RMS mean error (sd) | RMS log sd ratio |", "|---|---|---|"]
    for kind, fits in res.items():
        m, s = rms(fits)
        lines.append(f"| {kind}, {args.vr_particles} particles | {m:.3f} | {s:.3f} |")
    lines.append("")


def variance_reduction_small(args, lines):
    """Section 3.6: at N = args.n_small, SAGA with subsample 256 against the long full-batch
    fit of the same guide (both with args.vr_particles particles), and both against exact."""
    n, k = args.n_small, args.vr_particles
    lines += [
        f"### 3.6 N = {n:,}: SAGA with subsample 256 against the full-batch fit",
        "",
        f"{args.steps_large} steps of the recipe of 3.2, {k} vectorized particles in both fits: "
        "`SAGA_ELBO` on 256 groups per step, and Trace_ELBO on all groups (the long "
        "non-subsampled fit); same seed, so the same data and initial guide.",
        "",
        *TABLE,
    ]
    labels = (f"SAGA, subsample 256, {k} particles", f"full batch, {k} particles")
    res, mean_diffs, sd_diffs = paired_fits(args, n, labels, lines, k, saga=True)
    (sub_m, sub_s), (full_m, full_s) = rms(res["sub"]), rms(res["full"])
    diff_m, diff_s = _rms_of(mean_diffs), _rms_of(sd_diffs)
    lines += [
        "",
        f"Over {len(args.seeds_large)} seeds x 2 sites, against the exact posterior: RMS mean error "
        f"{sub_m:.3f} (SAGA, subsample) and {full_m:.3f} (full batch) sd, RMS log sd ratio "
        f"{sub_s:.3f} and {full_s:.3f}. SAGA's subsampled fit against the full-batch fit: RMS "
        f"difference of the means {diff_m:.3f} sd, of the log sds {diff_s:.3f}. Monte-Carlo se "
        f"of a difference of two means {2**0.5 / args.draws**0.5:.3f}, of two log sds "
        f"{1 / args.draws**0.5:.3f}.",
        "",
    ]


def error_rows(label, seed, errs, seconds):
    return [
        f"| {label} | {seed} | {name} | {e:+.3f} | {r:.3f} | {seconds:.0f} |"
        for name, (e, r) in errs.items()
    ]


def rms(results):
    """RMS over fits and sites of the mean error, and of log(sd ratio)."""
    errs = [e for r in results for e, _ in r.values()]
    logs = [math.log(s) for r in results for _, s in r.values()]
    return (sum(e * e for e in errs) / len(errs)) ** 0.5, (
        sum(v * v for v in logs) / len(logs)
    ) ** 0.5


TABLE = [
    "| fit | seed | site | mean error (sd) | sd ratio | fit seconds |",
    "|---|---|---|---|---|---|",
]


def paired_fits(args, n, labels, lines, num_particles=1, saga=False):
    """For each seed, a fit on 256 groups per step (SAGA_ELBO if ``saga``) and the full-batch
    fit of the same guide (same seed: same data and initial guide), rows appended to
    ``lines``; returns their errors and the subsampled-minus-full differences of the means
    and of the log sds."""
    res, mean_diffs, sd_diffs = {"sub": [], "full": []}, [], []
    for seed in args.seeds_large:
        fits = {}
        for key, batch, label in [("sub", 256, labels[0]), ("full", None, labels[1])]:
            sub_saga = saga and key == "sub"
            _, _, errs, seconds = globals_fit(
                n, batch, args.steps_large, seed, args, num_particles, sub_saga
            )
            fits[key] = errs
            res[key].append(errs)
            lines += error_rows(label, seed, errs, seconds)
            print("\n".join(lines[-2:]), flush=True)
        for site, (err, ratio) in fits["sub"].items():
            mean_diffs.append(err - fits["full"][site][0])
            sd_diffs.append(math.log(ratio / fits["full"][site][1]))
    return res, mean_diffs, sd_diffs


def _rms_of(values):
    return (sum(v * v for v in values) / len(values)) ** 0.5


def small_n(args, lines):
    """Subsampled vs full-batch fits of the same guide at N = args.n_small, against exact."""
    n = args.n_small
    lines += [
        f"### 3.2 N = {n:,}: subsample 256 vs full batch vs exact",
        "",
        f"{args.steps_large} steps of the recipe above for both fits (same seed, so the same data "
        "and initial guide); errors against the exact posterior.",
        "",
        *TABLE,
    ]
    labels = ("subsample 256", "full batch")
    res, mean_diffs, _ = paired_fits(args, n, labels, lines)
    lines.append("")
    (sub_m, sub_s), (full_m, full_s) = rms(res["sub"]), rms(res["full"])
    diff = _rms_of(mean_diffs)
    lines += [
        f"Over {len(args.seeds_large)} seeds x 2 sites: RMS mean error {sub_m:.3f} (subsample 256) "
        f"and {full_m:.3f} (full batch) sd; RMS log sd ratio {sub_s:.3f} and {full_s:.3f}; RMS of "
        f"the subsampled minus full-batch mean {diff:.3f} sd. Monte-Carlo se of one mean error "
        f"{1 / args.draws**0.5:.3f}, of a difference of two {2**0.5 / args.draws**0.5:.3f}; of a "
        f"log sd ratio {1 / (2 * args.draws) ** 0.5:.3f}.",
        "",
    ]
    return res


def large_n(args, lines, steps_list, batch=256):
    """Subsampled fits at N = 100,000 with each step budget, against the exact posterior."""
    out = {}
    for steps in steps_list:
        for seed in args.seeds_large:
            label = f"subsample {batch}, {steps} steps"
            try:
                _, _, errs, seconds = globals_fit(100_000, batch, steps, seed, args)
            except ValueError as err:  # a NaN the distributions' validation caught
                lines.append(f"| {label} | {seed} | - | diverged: {str(err)[:60]}... | | |")
                print(lines[-1], flush=True)
                continue
            out.setdefault(steps, []).append(errs)
            lines += error_rows(label, seed, errs, seconds)
            print("\n".join(lines[-2:]), flush=True)
    return out


def accuracy_globals(args, lines):
    lines += [
        "## 3. Globals (mu, beta) after subsampled training",
        "",
        f"Recipe (examples/amortized_hierarchical.py `fit`): Adam lr 0.01 for 40% of the steps, "
        "precondition_globals(), then a fresh Adam decaying 100x; errors from "
        f"{args.draws} draws of the global guide against that data set's exact posterior of "
        "(mu, beta) (alpha integrated out), in exact-posterior sd units.",
        "",
    ]
    gradient_noise(args, lines)
    small = small_n(args, lines)
    lines += [
        f"### 3.3 N = 100,000, subsample 256, {args.steps_large} steps",
        "",
        *TABLE,
    ]
    large = large_n(args, lines, [args.steps_large])
    m, s = rms(large[args.steps_large])
    lines += [
        "",
        f"RMS mean error {m:.3f} sd, RMS log sd ratio {s:.3f} (3.2 at N = {args.n_small:,}: "
        f"{rms(small['sub'])[0]:.3f} and {rms(small['sub'])[1]:.3f}).",
        "",
    ]
    if args.curve:
        curve(args, lines, large)


def curve(args, lines, large):
    """Error against the step budget T at N = 100,000 (B = 256), and B = 4096 at a matching N/(B T)."""
    lines += [
        "### 3.4 Error against the step budget (N = 100,000)",
        "",
        "The same recipe with other step budgets T; the last rows use subsample_size = 4096 with "
        f"{args.steps_big_batch} steps (N / (B T) as for B = 256 with "
        f"{args.steps_big_batch * 16} steps).",
        "",
        *TABLE,
    ]
    more = large_n(args, lines, args.steps_curve)
    large.update(more)
    big = large_n(args, lines, [args.steps_big_batch], batch=4096)
    lines += [
        "",
        "| subsample | steps T | N / (B T) | RMS mean error (sd) | RMS log sd ratio | c = RMS x sqrt(B T / N) |",
        "|---|---|---|---|---|---|",
    ]
    points = []
    for steps in sorted(large):
        m, s = rms(large[steps])
        points.append((steps, m))
        x = 100_000 / (256 * steps)
        lines.append(f"| 256 | {steps} | {x:.4f} | {m:.3f} | {s:.3f} | {m / x**0.5:.2f} |")
    m, s = rms(big[args.steps_big_batch])
    x = 100_000 / (4096 * args.steps_big_batch)
    lines.append(
        f"| 4096 | {args.steps_big_batch} | {x:.4f} | {m:.3f} | {s:.3f} | {m / x**0.5:.2f} |"
    )
    logt = [math.log(t) for t, _ in points]
    loge = [math.log(e) for _, e in points]
    mt, me = sum(logt) / len(logt), sum(loge) / len(loge)
    slope = sum((a - mt) * (b - me) for a, b in zip(logt, loge, strict=True)) / sum(
        (a - mt) ** 2 for a in logt
    )
    c = math.exp(me + 0.5 * mt)  # RMS = c / sqrt(T), fitted with the slope fixed at -1/2
    target = 0.03
    lines += [
        "",
        f"Least-squares slope of log RMS mean error on log T (B = 256): {slope:.2f} (noise-limited "
        f"SGD: -0.5). With the slope fixed at -1/2, RMS ≈ {c:.0f} / sqrt(T), so an RMS mean error "
        f"of {target} sd (about 3 Monte-Carlo se of {args.draws} draws) needs T ≈ "
        f"{(c / target) ** 2:,.0f} steps at B = 256, about {(c / target) ** 2 * 0.011 / 3600:.1f} h "
        "at 11 ms per step.",
        "",
    ]


def vi_fits(args, lines):
    """Section 4: pyroflows.VI with the amortized guide's defaults, no tuning, against exact."""
    lines += [
        "## 4. pyroflows.VI(model, AutoAmortizedFlowGuide(model)).run(y, B)",
        "",
        "Defaults throughout (8 vectorized particles; when B < N, `SAGA_ELBO` steps after the "
        "first plateau and the paired stopping rule; max_steps 10,000). Errors of the globals "
        "(and, up to N = 2,000, the "
        "worst over all alpha_i) in exact-posterior sd; k-hat is VI's own report (joint "
        "importance weights over all N groups), and KL its ELBO's gap to the exact log p(y) "
        "(KL(q || posterior) over all N groups' latents, nats, +- the ELBO's se). check: VI's "
        "check of the globals after the fit (`diagnostics()['globals_check']`): how far the "
        "fitted global guide was from its first estimate (posterior sd), and if it moved the "
        "guide, the last estimate's offset +- se (estimates made).",
        "",
        "| N | B | seed | steps | converged | k-hat (draws) | KL | mu: mean err, sd ratio "
        "| beta: mean err, sd ratio | alpha: worst mean err, sd ratio range | check | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    from pyroflows import VI

    for n, batch in args.vi_sizes:
        for seed in args.vi_seeds:
            pyro.set_rng_seed(seed)
            pyro.clear_param_store()
            y = ex.simulate(n, args.obs, seed=seed)
            vi = VI(ex.model, AutoAmortizedFlowGuide(ex.model), seed=seed, progress_bar=False,
                    max_steps=args.vi_max_steps)  # fmt: skip
            vi.run(y, batch)
            d = vi.diagnostics()
            errs = global_errors(vi.guide, y, batch, args.draws)
            cells = [f"{errs[name][0]:+.3f}, {errs[name][1]:.3f}" for name in ("mu", "beta")]
            local = "-"
            if n <= 2000:
                m, s = ex.exact_posterior(y)
                a = vi.get_samples(args.draws)["alpha"].double()
                err = float(((a.mean(0) - m[2:]) / s[2:]).abs().max())
                ratio = a.std(0) / s[2:]
                local = f"{err:.3f}, {float(ratio.min()):.3f}-{float(ratio.max()):.3f}"
            lines.append(
                f"| {n:,} | {batch or n} | {seed} | {d['steps']} | {d['converged']} "
                f"| {d['khat']:.2f} ({d['num_draws']}) "
                f"| {ex.exact_log_evidence(y) - d['elbo']:.2f} +- {d['elbo_se']:.2f} "
                f"| {cells[0]} | {cells[1]} | {local} | {check_cell(d['globals_check'])} "
                f"| {d['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    lines.append("")


def scale_model(y, subsample_size=None):
    """Section 5's model: a global scale, tau ~ LogNormal(0, 0.5), theta_i ~ N(0, tau²),
    y_i ~ N(theta_i, 1)."""
    tau = pyro.sample("tau", dist.LogNormal(torch.zeros((), dtype=y.dtype), 0.5))
    with pyro.plate("groups", len(y), subsample_size=subsample_size) as i:
        theta = pyro.sample("theta", dist.Normal(torch.zeros_like(tau), tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y[i])


def scale_posterior(y):
    """Exact posterior mean and sd of tau (y_i ~ N(0, tau² + 1)) and the skewness of log
    tau, by quadrature on a grid of log tau."""
    u = torch.linspace(-4.0, 2.0, 20001, dtype=torch.float64)
    tau = u.exp()
    lp = dist.LogNormal(0.0, 0.5).log_prob(tau) + u  # the density of u = log tau
    lp = lp + dist.Normal(0.0, (tau[:, None] ** 2 + 1).sqrt()).log_prob(y.double()).sum(-1)
    w = torch.softmax(lp, 0)
    mean = float((w * tau).sum())
    sd = float((w * (tau - mean) ** 2).sum().sqrt())
    mu_u = (w * u).sum()
    skew = float((w * (u - mu_u) ** 3).sum() / (w * (u - mu_u) ** 2).sum() ** 1.5)
    return mean, sd, skew


def vi_scale_fits(args, lines):
    """Section 5: VI on a model whose global is a constrained, skewed scale, against
    quadrature (the check of the globals where its Gaussian assumption is only approximate)."""
    lines += [
        "## 5. A global scale: pyroflows.VI(scale_model, AutoAmortizedFlowGuide(scale_model))",
        "",
        "tau ~ LogNormal(0, 0.5), theta_i ~ N(0, tau²), y_i ~ N(theta_i, 1) (data: tau = 0.7). "
        "VI's defaults; tau's mean error (exact-posterior sd) and sd ratio from 8,000 draws "
        "against quadrature of p(log tau | y); skew: the skewness of log tau's posterior; "
        "check as in section 4.",
        "",
        "| N | B | seed | skew | steps | k-hat (draws) | tau: mean err, sd ratio | check | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    from pyroflows import VI

    for n, batch in args.vi_scale_sizes:
        for seed in args.vi_seeds:
            g = torch.Generator().manual_seed(seed)
            y = 0.7 * torch.randn(n, generator=g) + torch.randn(n, generator=g)
            mean, sd, skew = scale_posterior(y)
            pyro.set_rng_seed(seed)
            pyro.clear_param_store()
            guide = AutoAmortizedFlowGuide(scale_model)
            vi = VI(scale_model, guide, seed=seed, progress_bar=False).run(y, batch)
            d = vi.diagnostics()
            tau = vi.get_samples(args.draws)["tau"].double()
            err, ratio = (float(tau.mean()) - mean) / sd, float(tau.std()) / sd
            lines.append(
                f"| {n:,} | {batch or n} | {seed} | {skew:+.2f} | {d['steps']} "
                f"| {d['khat']:.2f} ({d['num_draws']}) | {err:+.3f}, {ratio:.3f} "
                f"| {check_cell(d['globals_check'])} | {d['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    lines.append("")


def check_cell(check):
    """The globals' check in a table cell."""
    if check is None or "offset" not in check:
        return "-" if check is None else f"none ({check['reason']})"
    if not check["moved"]:
        return f"{check['offset']:.2f}, kept"
    if check["remaining"] is None:
        return f"{check['offset']:.2f}, moved, not settled ({check['rounds']})"
    return f"{check['offset']:.2f}, moved: {check['remaining']:.2f} +- {check['se']:.2f} ({check['rounds']})"


def main(args):
    torch.set_num_threads(1)
    start = time.perf_counter()
    lines = [
        "# AutoAmortizedFlowGuide: accuracy and scaling (issue 17)",
        "",
        f"`python benchmarks/amortized.py{' --curve' if args.curve else ''}`; seeds {list(args.seeds)} "
        f"(N = 100,000 default fit: {list(args.seeds_large)}); "
        f"torch {torch.__version__}, pyro {pyro.__version__}, CPU, 1 thread, on a 2-core machine "
        "shared with other jobs (times are indicative).",
        "",
    ]
    if args.vi:
        lines[0] = "# AutoAmortizedFlowGuide fitted by pyroflows.VI (issue 17)"
        lines[2] = (
            f"`python benchmarks/amortized.py --vi`; seeds {list(args.vi_seeds)}; torch "
            f"{torch.__version__}, pyro {pyro.__version__}, CPU, 1 thread, on a 2-core machine "
            "shared with other jobs (times are indicative)."
        )
        vi_fits(args, lines)
    elif args.vi_scale:
        lines[0] = "# AutoAmortizedFlowGuide fitted by pyroflows.VI: a global scale (issue 17)"
        lines[2] = (
            f"`python benchmarks/amortized.py --vi-scale`; seeds {list(args.vi_seeds)}; torch "
            f"{torch.__version__}, pyro {pyro.__version__}, CPU, 1 thread, on a 2-core machine "
            "shared with other jobs (times are indicative)."
        )
        vi_scale_fits(args, lines)
    elif args.variance_reduction or args.variance_reduction_small:
        flag = "--variance-reduction" + ("-small" if args.variance_reduction_small else "")
        lines[0] = "# AutoAmortizedFlowGuide: variance reduction for the globals (issue 17)"
        lines[2] = lines[2].replace("amortized.py", f"amortized.py {flag}")
        if args.variance_reduction_small:
            variance_reduction_small(args, lines)
        else:
            variance_reduction(args, lines)
    else:
        accuracy_small(args, lines)
        timing(args, lines)
        accuracy_globals(args, lines)
    lines.append(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")
    if not args.quick:
        name = "amortized_vi.md" if args.vi else "amortized.md"
        name = "amortized_vi_scale.md" if args.vi_scale else name
        if args.variance_reduction or args.variance_reduction_small:
            name = "amortized_variance_small.md" if args.variance_reduction_small else ""
            name = name or "amortized_variance.md"
        out = ROOT / "benchmarks" / "results" / (args.out or name)
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")


def _size(text):
    """``"N"`` or ``"N:B"`` as ``(N, B or None)``."""
    n, _, b = text.partition(":")
    return int(n), int(b) if b else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets; writes nothing")
    parser.add_argument("--obs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds-large", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps-small", type=int, default=3000)
    parser.add_argument("--steps-large", type=int, default=6000)
    parser.add_argument("--draws", type=int, default=8000)
    parser.add_argument("--n-small", type=int, default=2000)
    parser.add_argument("--noise-warm", type=int, default=1500)
    parser.add_argument("--noise-reps", type=int, default=400)
    parser.add_argument("--curve", action="store_true", help="section 3.4: error vs steps (long)")
    parser.add_argument("--steps-curve", type=int, nargs="+", default=[1500, 3000])
    parser.add_argument("--steps-big-batch", type=int, default=1500)
    parser.add_argument(
        "--variance-reduction",
        action="store_true",
        help="only section 3.5 (particles, SAGA), to results/amortized_variance.md (long)",
    )
    parser.add_argument(
        "--variance-reduction-small",
        action="store_true",
        help="only section 3.6 (SAGA vs full batch at --n-small), to amortized_variance_small.md",
    )
    parser.add_argument("--vr-particles", type=int, default=16)
    parser.add_argument(
        "--vi", action="store_true", help="only section 4 (pyroflows.VI), to amortized_vi.md"
    )
    parser.add_argument("--vi-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--vi-max-steps", type=int, default=10_000)
    parser.add_argument(
        "--vi-sizes",
        nargs="+",
        default=["20", "2000:256", "100000:256"],
        help="section 4's N[:B] (B omitted: the whole plate per step)",
    )
    parser.add_argument(
        "--vi-scale",
        action="store_true",
        help="only section 5 (pyroflows.VI on a global scale), to amortized_vi_scale.md",
    )
    parser.add_argument(
        "--vi-scale-sizes",
        nargs="+",
        default=["60", "2000:100", "20000:256"],
        help="section 5's N[:B]",
    )
    parser.add_argument("--out", help="results file name (default: the section's)")
    parser.add_argument("--saga-epochs", type=float, default=2.5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args(argv)
    args.vi_sizes = [_size(text) for text in args.vi_sizes]
    args.vi_scale_sizes = [_size(text) for text in args.vi_scale_sizes]
    if args.quick:
        args.vi_sizes, args.vi_seeds, args.vi_max_steps = [(20, None), (300, 32)], [0], 300
        args.vi_scale_sizes = [(30, None)]
        args.steps_small, args.steps_large, args.draws, args.rounds, args.block = 30, 30, 500, 2, 5
        args.noise_warm, args.noise_reps, args.steps_curve, args.steps_big_batch = 5, 5, [20], 10
        args.saga_epochs = 0.01
    return args


if __name__ == "__main__":
    main(parse_args())
