"""Posterior quality of Pyro's autoguides and AutoFlowGuide on the posteriordb posteriors.

Every posterior in the posteriordb folder (Pyro models and 10,000 reference draws from long
Stan runs; see its README) is fitted by every guide with the same number of Adam steps, then
judged by PSIS k-hat (``pyroflows.diagnostics.psis``) and by the worst error of a marginal
mean and sd in reference-sd units (``pyroflows.diagnostics.compare``). NUTS runs once per
posterior; its time to reach each guide's accuracy is read off prefixes of its chain.

Training: Adam on a K-particle reparameterised ELBO. The guide draws K particles under a
batch plate and the model's log-density is ``torch.func.vmap``-ed over them (the posteriordb
models are written for one draw); the learning rate decays 10x over the steps.

    OMP_NUM_THREADS=1 python benchmarks/posteriordb.py             # full run, ~1 h
    python benchmarks/posteriordb.py --posteriors eight_schools-eight_schools_centered \\
        --guides AutoNormal flow-iaf --num-steps 200 --output /tmp/pdb.md
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.messenger import Messenger

from pyroflows.diagnostics import compare, psis, to_inference_data
from pyroflows.guides import AutoFlowGuide
from pyroflows.objectives import max_plate_nesting, sum_log_probs
from pyroflows.transforms import FLOWS
from pyroflows.vi import VI

REPO = Path(__file__).resolve().parents[1]
FLOW_LAYERS = {"planar": 8, "radial": 8}
# rows of a run without --guides (any name from guide_factories / vi_factories is valid)
DEFAULT_ROWS = (
    "AutoNormal",
    "AutoMultivariateNormal",
    "flow-iaf",
    "flow-realnvp",
    "flow-spline",
    "VI(default)",
    "VI(AutoMultivariateNormal)",
    "VI(flow-realnvp)",
)


def guide_factories(num_flows: int) -> dict[str, Callable]:
    """``name -> (model, init_loc_fn) -> guide``; AutoIAFNormal has no use for init_loc_fn."""
    guides: dict[str, Callable] = {
        "AutoNormal": lambda m, init: AutoNormal(m, init_loc_fn=init, init_scale=0.1),
        "AutoMultivariateNormal": lambda m, init: AutoMultivariateNormal(
            m, init_loc_fn=init, init_scale=0.1
        ),
        "AutoIAFNormal": lambda m, init: AutoIAFNormal(m, num_transforms=2),
    }
    for flow in FLOWS:
        k = FLOW_LAYERS.get(flow, num_flows)
        guides[f"flow-{flow}"] = lambda m, init, f=flow, k=k: AutoFlowGuide(
            m, flow=f, num_flows=k, init_loc_fn=init
        )
    return guides


def vi_factories() -> dict[str, Callable]:
    """``"VI(...)" -> model -> guide`` for the automatic driver (``None``: VI's default guide).

    The driver finds its own start (mode and Laplace approximation), so these guides are
    built with their default ``init_loc_fn``.
    """
    vis: dict[str, Callable] = {"VI(default)": lambda m: None}
    for flow in FLOWS:
        vis[f"VI(flow-{flow})"] = lambda m, f=flow: AutoFlowGuide(
            m, flow=f, num_flows=FLOW_LAYERS.get(f, 2), base="full"
        )
    vis["VI(AutoMultivariateNormal)"] = lambda m: AutoMultivariateNormal(m)
    return vis


def map_init(model: Callable, data: dict) -> tuple[dict | None, str]:
    """``init_to_value`` at the posterior mode (L-BFGS in unconstrained space), if it exists.

    Hierarchical models such as centred eight schools have no mode (the density grows
    without bound as tau -> 0): a second L-BFGS round still lowers the potential, or it
    fails, and the prior median is used instead.
    """
    pyro.set_rng_seed(0)
    params, potential_fn, transforms, _ = initialize_model(model, model_kwargs=data)
    z = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.LBFGS(list(z.values()), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        u = potential_fn(z)
        u.backward()
        return u

    try:
        opt.step(closure)
        first = float(potential_fn(z).detach())
        opt.step(closure)
        last = float(potential_fn(z).detach())
    except (ValueError, RuntimeError):  # NaN parameters on the way to a degenerate mode
        return None, "prior median (L-BFGS failed: no finite mode)"
    if not math.isfinite(last) or last < first - 1.0:
        return None, "prior median (no finite mode)"
    values = {k: transforms[k].inv(v.detach()) for k, v in z.items()}
    return values, "posterior mode (L-BFGS)"


def init_fn(values: dict | None) -> Callable:
    """A fresh ``init_to_value`` on private copies of ``values``, or the prior median.

    Each guide gets its own copies: an autoguide may keep the init tensor as its parameter,
    and training it in place would move the start of every later guide.
    """
    if values is None:
        return init_to_median
    return init_to_value(values={k: v.clone() for k, v in values.items()}, fallback=init_to_median)


def load_posteriordb(path: Path):
    spec = importlib.util.spec_from_file_location("posteriordb_models", path / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- training
def elbo_loss(model: Callable, guide: Callable, data: dict, particles: int) -> Callable:
    """Negative K-particle ELBO: guide under a batch plate, model log p vmap-ed over draws.

    The guide's per-particle log q uses the library's helper
    (:func:`pyroflows.objectives.sum_log_probs`); the model is ``vmap``-ed because the
    posteriordb models are written for one draw and do not broadcast over a particle plate.
    """
    guide_tr = poutine.trace(guide).get_trace(**data)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(**data)
    latents = {
        name: site["value"].shape
        for name, site in model_tr.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    nesting = max_plate_nesting(guide_tr, model_tr)

    def log_p(z: dict) -> torch.Tensor:
        return poutine.trace(poutine.condition(model, data=z)).get_trace(**data).log_prob_sum()

    def loss() -> torch.Tensor:
        with pyro.plate("_particles", particles, dim=-nesting - 1):
            tr = poutine.trace(guide).get_trace(**data)
        log_q = sum_log_probs(tr, nesting, {}, particles, dtype=torch.float64)
        z = {n: tr.nodes[n]["value"].reshape(particles, *shape) for n, shape in latents.items()}
        with pyro.validation_enabled(False):
            lp = torch.func.vmap(log_p)(z)
        return (log_q - lp).mean()

    return loss


def fit(guide, loss: Callable, steps: int, lr: float) -> float:
    """Adam for ``steps`` steps, lr decaying 10x; returns the wall time in seconds."""
    loss()  # creates the parameters of lazy autoguides
    opt = torch.optim.Adam(guide.parameters(), lr=lr)
    start, skipped = time.perf_counter(), 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.1 ** (step / steps)
        opt.zero_grad()
        value = loss()
        if torch.isfinite(value):
            value.backward()
            opt.step()
        else:
            skipped += 1
    if skipped:
        print(f"    skipped {skipped} non-finite steps", flush=True)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- NUTS
class Budget(Exception):
    pass


def run_nuts(model, data, warmup: int, samples: int, seconds: float, seed: int) -> dict:
    """One NUTS chain, stopped after ``seconds``; per-draw constrained values and times."""
    pyro.set_rng_seed(seed)
    draws: dict[str, list] = {}
    times: list[float] = []
    start = time.perf_counter()
    state = {"warmup_end": None}

    def hook(kernel, params, stage, i):
        now = time.perf_counter() - start
        if stage.startswith("Sample"):
            state["warmup_end"] = state["warmup_end"] or now
            for name, z in params.items():
                t = kernel.transforms.get(name)
                draws.setdefault(name, []).append((t.inv(z) if t is not None else z).detach())
            times.append(now)
        if now > seconds:
            raise Budget

    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(
        kernel, num_samples=samples, warmup_steps=warmup, hook_fn=hook, disable_progbar=True
    )
    try:
        mcmc.run(**data)
    except Budget:
        pass
    values = {k: torch.stack(v).numpy() for k, v in draws.items()}
    divergences = sum(1 for i in getattr(kernel, "_divergences", []) if i >= 0)
    return {
        "draws": values,
        "times": np.array(times),
        "warmup_end": state["warmup_end"],
        "elapsed": time.perf_counter() - start,
        "divergences": divergences,
    }


def nuts_prefix_errors(nuts: dict, model, data, reference: dict, names: list) -> list:
    """(draws, seconds, worst mean error, worst sd error) for growing prefixes of the chain."""
    full = with_deterministic(model, data, nuts["draws"])
    n, k, out = len(nuts["times"]), 25, []
    while k <= n:
        c = compare({s: v[:k] for s, v in full.items()}, reference, var_names=names)
        out.append((k, nuts["times"][k - 1], c.worst_mean_error, c.worst_sd_error))
        k = n if k < n < 2 * k else 2 * k
    return out


def with_deterministic(model, data, draws: dict) -> dict:
    """Add the model's ``pyro.deterministic`` sites to latent draws (vmap over the draws)."""

    def replay(z: dict) -> dict:
        tr = poutine.trace(poutine.condition(model, data=z)).get_trace(**data)
        return {
            name: site["value"]
            for name, site in tr.nodes.items()
            if site["type"] == "sample" and site["infer"].get("_deterministic")
        }

    with torch.no_grad(), pyro.validation_enabled(False):
        extra = torch.func.vmap(replay)({k: torch.as_tensor(v) for k, v in draws.items()})
    return {**draws, **{k: v.numpy() for k, v in extra.items()}}


def nuts_time_to_match(prefixes: list, mean_err: float, sd_err: float) -> str:
    """First prefix from which NUTS stays at least as accurate as the guide on both errors."""
    ok = [m <= mean_err and s <= sd_err for _, _, m, s in prefixes]
    for i in range(len(ok)):
        if all(ok[i:]):
            return f"{prefixes[i][1]:.1f} s ({prefixes[i][0]} draws)"
    last = prefixes[-1] if prefixes else None
    return f"not within {last[1]:.0f} s" if last else "no draws"


# ----------------------------------------------------------------------------- main
class MarkDeterministic(Messenger):
    """Mark sites that a reparameterisation turned into deterministic ones as such.

    Pyro's ``LocScaleReparam`` keeps the original site (``theta``) as a Delta without the
    ``_deterministic`` flag, so ``to_inference_data`` would not report it.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = set(names)

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"] in self.names:
            msg["infer"]["_deterministic"] = True


def reparam_model(model: Callable, sites: list[str]) -> Callable:
    """``model`` with ``sites`` non-centred by ``LocScaleReparam(centered=0.0)``."""
    config = {site: LocScaleReparam(centered=0.0) for site in sites}
    return MarkDeterministic(sites)(poutine.reparam(model, config=config))


def score_guide(guide, model, data: dict, reference: dict, names: list, args) -> dict:
    """k-hat (median and range over ``--khat-seeds`` draw sets) and errors vs the reference."""
    khats, c = [], None
    for k in range(args.khat_seeds):
        pyro.set_rng_seed(10_000 + k)
        idata = to_inference_data(guide, model, num_samples=args.num_draws, **data)
        khats.append(psis(idata).khat)
        c = c or compare(idata, reference, var_names=names)
    return dict(
        khat=float(np.median(khats)),
        khat_range=(min(khats), max(khats)),
        mean=c.worst_mean_error,
        sd=c.worst_sd_error,
        w1=c.worst_wasserstein,
    )


def fixed_row(label: str, make, model, data, init_values, args, name: str) -> dict:
    """Today's protocol: a fixed number of Adam steps from the L-BFGS mode."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = make(model, init_fn(init_values))
    steps = args.steps_override.get(name, args.num_steps)
    seconds = fit(guide, elbo_loss(model, guide, data, args.particles), steps, args.lr)
    return dict(
        guide=label,
        guide_obj=guide,
        steps=steps,
        grad_evals=steps * args.particles,
        seconds=seconds,
        note="",
    )


def vi_row(label: str, make, model, data, args) -> dict:
    """The automatic driver with its defaults (the guide is built for ``model``)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vi = VI(model, make(model), seed=args.seed, progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vi.run(**data)
    d = vi.diagnostics()
    note = ("converged" if d["converged"] else "NOT converged") + f", lr {d['step_size']:g}"
    note += ", Laplace start" if "Laplace" in d["init"] else ", no mode"
    if len(d["tails"]) > 1:  # the tails step tried Student-t bases: k-hat of each
        tried = "/".join(f"{t['khat']:.2f}" for t in d["tails"])
        dfs = "/".join(
            "normal" if t["base_df"] is None else f"{t['base_df']:g}" for t in d["tails"]
        )
        note += f", tails k-hat {tried} (base {dfs})"
    if d["base_df"] is not None:
        note += f", Student-t base df {d['base_df']:g}"
    note += f", k-hat(VI) {d['khat']:.2f}"
    if caught:
        note += f", {len(caught)} warning(s)"
    return dict(
        guide=label,
        guide_obj=vi.guide,
        steps=d["steps"],
        grad_evals=d["gradient_evaluations"],
        seconds=d["seconds"],
        note=note,
    )


def evaluate(name: str, pdb, args, guides: dict, vis: dict) -> dict:
    model, load = pdb.POSTERIORS[name]
    data = load()
    reference = {k: v.numpy() for k, v in pdb.load_reference(name).items()}
    names = list(pdb.REFERENCE_SITES[name])
    rows = []
    init_values, init_note = map_init(model, data) if args.map_init else (None, "median")
    print(f"  init: {init_note}", flush=True)
    jobs = [
        (label, lambda m, mk=mk, lb=label: fixed_row(lb, mk, m, data, init_values, args, name))
        for label, mk in guides.items()
    ]
    jobs += [
        (label, lambda m, mk=mk, lb=label: vi_row(lb, mk, m, data, args))
        for label, mk in vis.items()
    ]
    for sites in args.reparam.get(name, []) and [args.reparam[name]]:
        for label, mk in vis.items():
            if label == "VI(default)":
                lb = f"{label} + LocScaleReparam({', '.join(sites)})"
                jobs.append(
                    (
                        lb,
                        lambda m, mk=mk, lb=lb, s=sites: vi_row(
                            lb, mk, reparam_model(m, s), data, args
                        ),
                    )
                )
    for label, job in jobs:
        try:
            row = job(model)
            scored_model = (
                reparam_model(model, args.reparam[name]) if "Reparam" in label else model
            )
            row.update(
                score_guide(row.pop("guide_obj"), scored_model, data, reference, names, args)
            )
        except Exception as err:  # report and go on: one broken fit must not sink the run
            row = dict(guide=label, error=f"{type(err).__name__}: {str(err)[:80]}")
        rows.append(row)
        print(f"  {name} {row}", flush=True)
    nuts = None
    if args.nuts_seconds > 0 and name not in args.nuts_skip:
        run = run_nuts(
            model, data, args.nuts_warmup, args.nuts_samples, args.nuts_seconds, args.seed
        )
        prefixes = (
            nuts_prefix_errors(run, model, data, reference, names) if len(run["times"]) else []
        )
        nuts = dict(run=run, prefixes=prefixes)
        print(f"  {name} NUTS {prefixes[-1] if prefixes else 'no draws'}", flush=True)
    return dict(name=name, rows=rows, nuts=nuts, init=init_note)


def fmt(x: float, digits: int = 2) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def nuts_grade(r: dict) -> bool:
    return "error" not in r and r["mean"] < 0.2 and r["sd"] < 0.2 and r["khat"] < 0.7


def markdown(results: list, args, total: float) -> str:
    lines = [
        "# posteriordb: guide quality versus reference draws",
        "",
        "Generated by `benchmarks/posteriordb.py`; do not edit by hand. Command:",
        "",
        "    OMP_NUM_THREADS=1 python benchmarks/posteriordb.py " + " ".join(sys.argv[1:]),
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} thread(s); "
        f"total wall time {total / 60:.1f} min.",
        "",
        "Two protocols. **Fixed budget** (rows named after the guide): Adam, "
        f"{args.particles}-particle ELBO, lr {args.lr} decaying 10x over {args.num_steps} steps "
        f"(overrides: {args.steps_override or 'none'}), every guide started at its own copy of "
        "the same location (the posterior mode found by L-BFGS where it exists, else the prior "
        "median; Pyro's AutoIAFNormal ignores it); AutoFlowGuide with "
        f"{args.num_flows} layers (planar and radial {FLOW_LAYERS['planar']}); AutoIAFNormal "
        "with 2. **VI(...)** rows: `pyroflows.VI(model, guide).run(**data)` with every "
        "default (mode + Laplace start in whitened coordinates, step-size pilots, stopping "
        "rule, iterate averaging, STL fallback fit and Student-t base tails when k-hat >= "
        "0.7); `VI(flow-X)` is `AutoFlowGuide(model, flow=X, "
        "num_flows=2, base='full')` (planar and radial 8 layers), `VI(default)` is VI's "
        "default guide. *grad evals* counts log-density gradient evaluations (steps x "
        "particles, plus the mode search and Hessians for VI).",
        "",
        f"k-hat: median [min-max] of `psis` over {args.khat_seeds} independent sets of "
        f"{args.num_draws} guide draws (k-hat is noisy); errors from the first set against "
        "the 10,000 reference draws over the posteriordb parameters (`compare`): worst |mean "
        "error| and worst |sd error| in reference-sd units, worst 1-D Wasserstein distance / "
        "sd. **NUTS-grade**: both errors < 0.2 and k-hat < 0.7.",
        "",
        f"NUTS: one Pyro NUTS chain (JIT-compiled, {args.nuts_warmup} warmup + up to "
        f"{args.nuts_samples} draws, stopped after {args.nuts_seconds:g} s). "
        "*NUTS to match* is the wall time "
        "(warmup included) after which NUTS's worst mean and sd errors stay at or below the "
        "guide's, checked at 25, 50, 100, ... draws. "
        f"NUTS skipped for: {', '.join(args.nuts_skip) or 'none'}.",
        "",
        "Timings come from a shared 2-core machine and are noisy; compare within a table.",
        "",
        "## Overview: NUTS-grade guides per posterior",
        "",
        "| posterior | NUTS-grade rows | VI(default): mean / sd err, k-hat |",
        "|---|---|---|",
    ]
    for res in results:
        grade = [r["guide"] for r in res["rows"] if nuts_grade(r)]
        vi = next((r for r in res["rows"] if r["guide"] == "VI(default)"), None)
        vi_txt = (
            "-"
            if vi is None or "error" in vi
            else (
                f"{fmt(vi['mean'])} / {fmt(vi['sd'])}, {fmt(vi['khat'])}"
                + (" (NUTS-grade)" if nuts_grade(vi) else " (not NUTS-grade)")
            )
        )
        lines.append(f"| {res['name']} | {', '.join(grade) or '**none**'} | {vi_txt} |")
    lines.append("")
    for res in results:
        lines += [
            f"## {res['name']}",
            "",
            "| guide | steps | grad evals | wall s | k-hat | worst mean err | worst sd err "
            "| worst W1 | NUTS to match | notes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        prefixes = res["nuts"]["prefixes"] if res["nuts"] else []
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['guide']} | failed: {r['error']} |||||||||")
                continue
            match = nuts_time_to_match(prefixes, r["mean"], r["sd"]) if prefixes else "-"
            lo, hi = r["khat_range"]
            lines.append(
                f"| {r['guide']} | {r['steps']} | {r['grad_evals']} | {r['seconds']:.1f} | "
                f"{fmt(r['khat'])} [{fmt(lo)}-{fmt(hi)}] | {fmt(r['mean'])} | {fmt(r['sd'])} | "
                f"{fmt(r['w1'])} | {match} | {r['note']} |"
            )
        if res["nuts"] and not prefixes:
            lines.append(
                f"| NUTS | no draws: warmup unfinished after {args.nuts_seconds:g} s |||||||||"
            )
        if res["nuts"] and prefixes:
            run = res["nuts"]["run"]
            k, t, m, s = prefixes[-1]
            lines.append(
                f"| NUTS ({k} draws) | - | - | {t:.1f} | - | {fmt(m)} | {fmt(s)} | - | "
                f"warmup {fmt(run['warmup_end'], 1)} s | {run['divergences']} divergences |"
            )
        lines += ["", summary_line(res), ""]
    return "\n".join(lines) + "\n"


def summary_line(res: dict) -> str:
    ok = [r for r in res["rows"] if "error" not in r]
    if not ok:
        return "Summary: every fit failed."
    grade = [r["guide"] for r in ok if nuts_grade(r)]
    if not grade:
        best = min(ok, key=lambda r: max(r["mean"], r["sd"]))
        return (
            "Summary: **no guide is NUTS-grade here** (closest by worst error: "
            f"{best['guide']}, mean {fmt(best['mean'])}, sd {fmt(best['sd'])}, "
            f"k-hat {fmt(best['khat'])})."
        )
    return f"Summary: NUTS-grade: {', '.join(grade)}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posteriordb", type=Path, default=REPO / ".." / "shared" / "posteriordb")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks/results/posteriordb.md")
    p.add_argument("--posteriors", nargs="*", default=None, help="default: all")
    p.add_argument("--guides", nargs="*", default=None, help="default: all")
    p.add_argument("--num-steps", type=int, default=800, help="Adam steps per guide")
    p.add_argument(
        "--steps-override",
        nargs="*",
        default=["garch-garch11=300"],
        help="NAME=STEPS for posteriors whose model is slow (garch: a 200-step Python loop)",
    )
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--num-flows", type=int, default=4)
    p.add_argument("--num-draws", type=int, default=4000)
    p.add_argument("--nuts-warmup", type=int, default=200)
    p.add_argument("--nuts-samples", type=int, default=800)
    p.add_argument("--nuts-seconds", type=float, default=45.0, help="0 skips NUTS")
    p.add_argument(
        "--nuts-skip",
        nargs="*",
        default=["garch-garch11"],
        help="posteriors without NUTS (garch: ~0.7 s per NUTS iteration in Pyro here)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--khat-seeds", type=int, default=3, help="draw sets behind each k-hat")
    p.add_argument(
        "--reparam",
        nargs="*",
        default=["eight_schools-eight_schools_centered=theta"],
        help="NAME=SITE[,SITE]: also fit VI(default) with these sites non-centred",
    )
    p.add_argument(
        "--no-map-init",
        dest="map_init",
        action="store_false",
        help="start every guide at the prior median instead of the posterior mode",
    )
    args = p.parse_args(argv)
    args.steps_override = {k: int(v) for k, v in (x.split("=") for x in args.steps_override)}
    args.reparam = {k: v.split(",") for k, v in (x.split("=") for x in args.reparam)}
    return args


def main(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    pdb = load_posteriordb(args.posteriordb.resolve())
    guides, vis = guide_factories(args.num_flows), vi_factories()
    known = {**guides, **vis}
    args.guides = args.guides or [g for g in known if g in DEFAULT_ROWS]
    unknown = set(args.guides) - set(known)
    if unknown:
        raise SystemExit(f"unknown guides {sorted(unknown)}; choose from {list(known)}")
    guides = {k: v for k, v in guides.items() if k in args.guides}
    vis = {k: v for k, v in vis.items() if k in args.guides}
    names = args.posteriors or list(pdb.POSTERIORS)
    start, results = time.perf_counter(), []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"{name}", flush=True)
        results.append(evaluate(name, pdb, args, guides, vis))
        args.output.write_text(markdown(results, args, time.perf_counter() - start))
    print(f"wrote {args.output} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main(parse_args())
