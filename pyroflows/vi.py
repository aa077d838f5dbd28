r"""``pyroflows.VI``: fit an autoguide without tuning, MCMC-style.

:class:`VI` runs, in order (each step a small function of this module or of
:mod:`pyroflows._mode`):

1. **Mode and Laplace start** (:func:`~pyroflows._mode.find_mode`,
   :func:`~pyroflows._mode.laplace_factor`): MAP in unconstrained space from several starts,
   polished by Newton steps on the exact Hessian; the guide then starts *at* the Laplace
   approximation, expressed in whitened coordinates :math:`z = c + L_0(m + T f(\epsilon))`.
2. **Step size** (:func:`choose_step_size`): short Adam pilots over a grid, judged by the
   ELBO on fresh draws (common random numbers), not by the training loss.
3. **Stopping rule** (:class:`ConvergenceMonitor`; :class:`PairedMonitor` for subsampled
   fits of an :class:`~pyroflows.AutoAmortizedFlowGuide`) with learning-rate decay on plateaus,
   **iterate averaging** (:class:`IterateAverage`) over the final phase, and non-finite steps
   skipped and counted.
4. **Restarts** (:func:`select_fit`), and an **honest report** (:func:`importance_report`):
   PSIS k-hat, importance-sampling ESS, log-evidence with its standard error.
5. **Tails** (:func:`choose_tails`): if the kept :class:`~pyroflows.AutoFlowGuide`'s k-hat
   is not clearly under 0.7 (under 0.6 on fresh draws), heavier-tailed (Student-t) bases
   are tried and the lightest that brings it under 0.6 is kept; the report is then
   re-estimated on fresh draws.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import biject_to

from pyroflows._arviz import smooth_log_weights
from pyroflows._mode import Mode, find_mode, laplace_factor
from pyroflows._potential import LogDensity, prototype_trace
from pyroflows._utils import check_positive_int
from pyroflows._vi_amortized import CHECK_OFFSET, AmortizedTarget, is_amortized
from pyroflows._vi_targets import Target, make_target
from pyroflows.guides import AutoFlowGuide
from pyroflows.objectives import LogWeights, Objective, get_objective

__all__ = [
    "VI",
    "ConvergenceMonitor",
    "FitResult",
    "IterateAverage",
    "PairedMonitor",
    "choose_step_size",
    "choose_tails",
    "importance_report",
    "select_fit",
]

KHAT_USABLE = 0.7
KHAT_GOOD = 0.5
# the tails step keeps a base whose k-hat from 2 x num_draws draws is under this: k-hat from
# 8000 draws of one garch fit spread over 0.56-0.77 (and 1.15 vs 0.64 for a heavy-tailed
# target), so a base passed at 0.7 often read >= 0.7 again on fresh draws
KHAT_TAILS = 0.6
DRAW_CHUNK = 1024  # guide draws scored at a time in reports (bounds their memory)
SUMMARY_MEMBERS = 100  # summary() shows an amortized guide's local sites up to this plate size


# ---------------------------------------------------------------- stopping rule
class ConvergenceMonitor:
    r"""Detects when a noisy loss trace has stopped improving.

    A variant of the rule of Stan's ADVI (Kucukelbir et al. 2017, Sec. 3.3), which compares
    running means of the ELBO: here the means of two consecutive windows of ``window``
    per-step losses are compared in *nats* (so the rule does not depend on the model's
    additive constant, as ADVI's relative change does) and against their Monte-Carlo
    standard error. The trace has plateaued when the improvement of the last window over
    the one before is below ``z`` standard errors plus ``tol`` nats; a run that is still
    improving by more than its noise is never stopped.

    Args:
        window: Steps per window.
        tol: Absolute tolerance in nats per window.
        z: Number of standard errors an improvement must exceed to count.
    """

    def __init__(self, window: int = 100, tol: float = 0.01, z: float = 2.0) -> None:
        self.window = check_positive_int("window", window)
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite float >= 0; got {tol!r}")
        self.tol, self.z = float(tol), float(z)
        self.reset()

    def reset(self) -> None:
        """Forget the trace (after a learning-rate change)."""
        self._values: list[float] = []
        self.last_improvement = float("nan")

    def update(self, loss: float) -> bool:
        """Record one finite loss; ``True`` when the trace has plateaued."""
        self._values.append(float(loss))
        n = len(self._values)
        if n < 2 * self.window or n % self.window:
            return False
        prev = np.asarray(self._values[-2 * self.window : -self.window])
        last = np.asarray(self._values[-self.window :])
        improvement = prev.mean() - last.mean()
        se = math.sqrt((prev.var(ddof=1) + last.var(ddof=1)) / self.window)
        self.last_improvement = float(improvement)
        return bool(improvement < self.z * se + self.tol)

    def restore_best(self) -> bool:
        """Nothing to restore (see :meth:`PairedMonitor.restore_best`); returns ``False``."""
        return False


class PairedMonitor(ConvergenceMonitor):
    r"""The stopping rule on window-averaged iterates scored with common random numbers, for
    subsampled fits.

    With a subsampled plate both the per-step loss and the current iterate carry the noise
    of the subsample (``N / B`` times the members' terms), which hides any improvement that
    matters. Instead, the parameters are averaged over each window of ``window`` steps
    (:class:`IterateAverage`), and at the end of the window ``score()`` gives the
    log-weights of the *same* guide draws (same random numbers, same members) at that
    average. The trace has plateaued when the mean paired improvement of one window's
    average over the previous one's is below ``z`` standard errors (of the paired
    differences) plus ``tol`` nats (Dhaka et al. 2020 also judge averaged iterates);
    :meth:`restore_best` then puts back the best of the state at the last :meth:`reset`
    and the window averages since (the reset state counts: at N = 100,000 the pilots'
    step size made both window averages of the first phase worse than the state it
    started from, by 0.6 and 1.7 million nats).

    At large N the ELBO cannot see what matters most, the global latents: a global guide
    one posterior sd off costs about half a nat, below the noise of any affordable score.
    ``gradient`` (optional) returns, after each step, a gradient whose mean is about the
    globals' error in posterior sds (:meth:`~pyroflows._vi_amortized.AmortizedTarget.
    global_gradient`: the whitened global guide's location and log-scale), or ``None``
    where there is none; a window then counts as a plateau only if also every coordinate
    of its window-mean gradient is below ``z`` standard errors (of the window mean) plus
    ``gradient_tol``.

    A ``score`` with a ``refresh()`` method gets new draws (and members) at each
    :meth:`reset`: the state a phase starts from was chosen as the best on the last
    phase's draws and members (or by the pilots), and judged on them again it looks better
    than it is, so every later window seems worse (traced at N = 100,000, where the score
    sees 1,024 of the members: each phase's second window scored 5-44 nats below its first,
    and every phase ended after two windows).

    Args:
        window: Steps per window.
        tol: Absolute tolerance in nats per window.
        score: Returns ``(S,)`` log-weights with common random numbers.
        params: The optimised tensors.
        z: Number of standard errors an improvement must exceed to count.
        gradient: Returns the gradient to be stationary, or ``None``.
        gradient_tol: Tolerance of its window mean.
    """

    def __init__(
        self,
        window: int,
        tol: float,
        score: Callable[[], Tensor],
        params: Sequence[Tensor],
        z: float = 2.0,
        gradient: Callable[[], Tensor | None] | None = None,
        gradient_tol: float = 0.1,
    ) -> None:
        self.score, self.params = score, list(params)
        self.gradient, self.gradient_tol = gradient, float(gradient_tol)
        super().__init__(window, tol, z)

    def reset(self) -> None:
        super().reset()
        if hasattr(self.score, "refresh"):
            self.score.refresh()
        self._previous: Tensor | None = None
        self._start = [p.detach().clone() for p in self.params]
        self._average = IterateAverage(self.params)
        self._best: tuple[float, list[Tensor]] | None = None
        self._grads: list[Tensor] = []
        self.last_gradient = float("nan")

    def update(self, loss: float) -> bool:
        """Count one step; ``True`` when the score has plateaued (checked every window)."""
        self._average.update()
        g = self.gradient() if self.gradient is not None else None
        if g is not None:
            self._grads.append(g.detach().double().reshape(-1).cpu())
        if self._average.count <= self.window:
            return False
        if self._best is None:  # the state at reset, scored once: a candidate for the best
            self._score(self._start)
        current = self._score(self._average.mean)
        self._average = IterateAverage(self.params)
        stationary = self._stationary()  # also ends the window's gradient record
        previous, self._previous = self._previous, current
        if previous is None:
            return False
        diff = current - previous
        diff = diff[torch.isfinite(diff)]
        if len(diff) < 2:
            return False
        self.last_improvement = float(diff.mean())
        se = float(diff.std()) / math.sqrt(len(diff))
        return self.last_improvement < self.z * se + self.tol and stationary

    def _score(self, values: list[Tensor]) -> Tensor:
        """The score of the parameters set to ``values`` (the parameters are put back), kept
        as the best if it is."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                p.copy_(v)
            current = self.score().double()
            for p, v in zip(self.params, saved, strict=True):
                p.copy_(v)
        finite = current[torch.isfinite(current)]
        value = float(finite.mean()) if finite.numel() else -math.inf
        if math.isfinite(value) and (self._best is None or value > self._best[0]):
            self._best = (value, [v.detach().clone() for v in values])
        return current

    def _stationary(self) -> bool:
        """Whether the window's mean gradient is within ``z`` se plus ``gradient_tol`` of
        zero in every coordinate (``True`` without a gradient); starts the next window."""
        grads, self._grads = self._grads, []
        if len(grads) < 2:
            return True
        g = torch.stack(grads)
        mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
        self.last_gradient = float(mean.abs().max())
        return bool((mean.abs() < self.z * se + self.gradient_tol).all())

    @torch.no_grad()
    def restore_best(self) -> bool:
        """Put the best-scoring state since the last :meth:`reset` (the reset state or a
        window average) into the parameters (at a plateau: a step size too large for the
        later steps, or a run of bad subsamples, leaves the last iterate worse than an
        earlier average). Returns whether the parameters changed: an optimiser's moments
        then belong to another point, and in a traced fit at N = 100,000 continuing Adam
        from the restored state lost 51,000 nats over the next window (a fresh Adam: none)."""
        if self._best is None:
            return False
        for p, value in zip(self.params, self._best[1], strict=True):
            p.copy_(value)
        return True


# ---------------------------------------------------------------- iterate averaging
class IterateAverage:
    """Running mean of a list of tensors (Polyak-Ruppert averaging of the iterates)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.mean = [p.detach().clone() for p in self.params]
        self.count = 1

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for m, p in zip(self.mean, self.params, strict=True):
            m.add_(p.detach() - m, alpha=1.0 / self.count)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parameters' values with the averages (call twice to undo)."""
        for m, p in zip(self.mean, self.params, strict=True):
            tmp = p.detach().clone()
            p.copy_(m)
            m.copy_(tmp)


# ---------------------------------------------------------------- ELBO and PSIS
@dataclass
class ImportanceReport:
    """Importance-sampling summary of ``q`` against the model (see :func:`importance_report`)."""

    elbo: float
    elbo_se: float
    khat: float
    ess: float
    log_evidence: float
    log_evidence_se: float
    num_draws: int  # draws with a finite log ratio (the ones everything above uses)
    num_nonfinite: int = 0  # draws whose log-density (or log q) was NaN or infinite

    @property
    def threshold(self) -> float:
        """The k-hat above which the fit is not usable: 0.7, or less from few draws, where
        k-hat is itself reliable only below 1 - 1 / log10(S) (Vehtari et al. 2024): 0.57 at
        the 200 draws of an amortized guide's report at N = 100,000."""
        return min(KHAT_USABLE, 1.0 - 1.0 / math.log10(max(self.num_draws, 11)))

    @property
    def band(self) -> str:
        if math.isnan(self.khat):
            return "unavailable"
        if self.khat >= self.threshold:  # the warning's condition (below 0.5 from < 100 draws)
            return "unreliable"
        return "good" if self.khat < KHAT_GOOD else "usable"


def importance_report(log_w: Tensor) -> ImportanceReport:
    r"""ELBO, PSIS k-hat, IS-ESS and :math:`\log \hat p(x)` from raw log ratios ``(S,)``.

    Non-finite ratios (a model that returns NaN somewhere, a guide outside the support) are
    left out and counted in ``num_nonfinite``; with fewer than 25 finite ones every
    estimate is NaN and k-hat is infinite. The log-evidence estimate is
    :math:`\log \frac1S \sum_i w_i` with the delta-method standard error
    :math:`\mathrm{sd}(w) / (\sqrt{S}\, \bar w)`; it is trustworthy only when k-hat < 0.7
    (Yao et al. 2018).
    """
    lw = log_w.detach().double().cpu().numpy()
    finite = np.isfinite(lw)
    nonfinite = int((~finite).sum())
    lw = lw[finite]
    s = lw.size
    if s < 25:
        nan = float("nan")
        return ImportanceReport(nan, nan, float("inf"), 0.0, nan, nan, s, nonfinite)
    elbo, elbo_se = float(lw.mean()), float(lw.std(ddof=1) / math.sqrt(s))
    w = np.exp(lw - lw.max())
    log_z = float(np.log(w.mean()) + lw.max())
    log_z_se = float(w.std(ddof=1) / (math.sqrt(s) * w.mean()))
    smoothed, khat, _ = smooth_log_weights(lw, 1e-9 * (1.0 + abs(elbo)))
    ess = float(1.0 / np.sum(np.exp(2 * smoothed)))
    return ImportanceReport(elbo, elbo_se, khat, ess, log_z, log_z_se, s, nonfinite)


@torch.no_grad()
def _draw_log_weights(
    target: Target, log_density: LogDensity, n: int, seed: int | None, chunk: int = DRAW_CHUNK
) -> tuple[Tensor, Tensor]:
    """``n`` packed draws of the guide and their log ratios ``log p - log q``.

    Drawn and scored ``chunk`` at a time, so the memory of a large report stays that of one
    chunk (at D = 5,000 one block of 8000 draws through the default IAF peaked at 1.9 GB).
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        q = target.posterior()
        draws, log_w = [], []
        for start in range(0, n, chunk):
            z = q.sample((min(chunk, n - start),))
            log_q = q.log_prob(z)
            draws.append(z)
            log_w.append(log_density(z) - log_q)
    return torch.cat(draws), torch.cat(log_w)


# ---------------------------------------------------------------- optimisation
def _loss_fn(
    target: Target, log_density: LogDensity, particles: int, objective: Objective
) -> Callable[[], Tensor]:
    """The negative ``particles``-sample surrogate of ``objective`` for ``target``."""

    def loss() -> Tensor:
        q = target.posterior()
        z = q.rsample((particles,))
        fixed = q.log_prob(z.detach()) if objective.needs_log_q_fixed else None
        return -objective.estimate(LogWeights(log_density(z), q.log_prob(z), fixed))[1]

    return loss


def _step(opt: torch.optim.Optimizer, params: list[Tensor], loss_fn: Callable) -> float | None:
    """One Adam step; ``None`` (and no update) when the loss or a gradient is not finite.

    ``loss_fn`` returns a tensor to backpropagate, or a float when it has accumulated the
    gradients itself (:class:`~pyroflows.SAGA_ELBO`)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    if isinstance(loss, Tensor):
        if not bool(torch.isfinite(loss)):
            return None
        loss.backward()
        loss = float(loss.detach())
    if not math.isfinite(loss):
        return None
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return None
    opt.step()
    return loss


@dataclass
class _Run:
    """Bookkeeping shared by the pilots and the main phase of one fit."""

    steps: int = 0
    skipped: int = 0
    trace: list[float] = field(default_factory=list)


def _adam_steps(
    target: Target,
    loss_fn: Callable,
    lr: float,
    steps: int,
    run: _Run,
    on_step: Callable[[], None] | None = None,
) -> None:
    """``steps`` Adam steps (non-finite ones skipped and counted)."""
    params = target.params()
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = _step(opt, params, loss_fn)
        run.steps += 1
        if loss is None:
            run.skipped += 1
        else:
            run.trace.append(loss)
        if on_step is not None:
            on_step()


def choose_step_size(
    target: Target,
    loss_fn: Callable,
    score: Callable[[], float],
    step_sizes: Sequence[float],
    pilot_steps: int,
    run: _Run,
    on_step: Callable[[], None] | None = None,
) -> tuple[float, list[tuple[float, float]]]:
    """Run a short Adam pilot per step size from the same start; keep the best.

    Each pilot is judged by ``score()`` (an ELBO on fresh draws with common random numbers,
    higher is better), not by its own noisy training loss. The target is left in the best
    pilot's final state.

    Returns:
        ``(best step size, [(step size, score), ...])``.
    """
    start = target.state()
    results, best = [], (-math.inf, None, None)
    for lr in step_sizes:
        target.load(start)
        _adam_steps(target, loss_fn, lr, pilot_steps, run, on_step)
        value = score()
        results.append((lr, value))
        if math.isfinite(value) and value > best[0]:
            best = (value, lr, target.state())
    if best[1] is None:  # every pilot ended non-finite: the smallest step from the start
        target.load(start)
        return min(step_sizes), results
    target.load(best[2])
    return best[1], results


@dataclass
class FitResult:
    """One restart of :class:`VI`: how it started, ran and scored."""

    restart: int
    init: str
    whitened: bool
    lr: float
    pilots: list[tuple[float, float]]
    steps: int
    skipped: int
    converged: bool
    averaged: bool
    report: ImportanceReport
    seconds: float
    state: dict[str, Tensor] = field(repr=False)
    trace: list[float] = field(repr=False)
    objective: str = "elbo"
    globals_check: dict[str, Any] | None = None


def select_fit(fits: Sequence[FitResult]) -> int:
    """Index of the fit to keep: highest ELBO on fresh draws among fits with k-hat < 0.7.

    If no fit reaches k-hat < 0.7, the highest ELBO among all fits. Fits whose ELBO is not
    finite are never chosen while another is finite.
    """
    if not fits:
        raise ValueError("select_fit needs at least one fit")

    def key(i: int) -> tuple[bool, bool, float]:
        r = fits[i].report
        finite = math.isfinite(r.elbo)
        return finite, r.khat < KHAT_USABLE, r.elbo if finite else -math.inf

    return max(range(len(fits)), key=key)


def choose_tails(
    guide: AutoFlowGuide,
    dfs: Sequence[float],
    report: Callable[[], ImportanceReport],
    threshold: float = KHAT_USABLE,
) -> tuple[bool, list[tuple[float | None, ImportanceReport]]]:
    """Keep ``guide``'s base if its PSIS k-hat is < ``threshold``, else give it the lightest
    Student-t base of ``dfs`` that brings k-hat under it.

    The usual cause of k-hat >= 0.7 on a well-fitted guide is the tails, not the body: a flow
    whose layers are affine in the far tails (IAF, coupling, Sylvester) keeps its base's
    Gaussian tails (Jaini et al. 2020), while a log-density with exponential or polynomial
    tails -- a positive or bounded parameter in unconstrained space whose posterior reaches
    its boundary, a hierarchical scale -- makes ``p / q`` unbounded there, so importance
    weights are heavy-tailed however well the body fits. A unit-variance Student-t base
    (:attr:`~pyroflows.AutoFlowGuide.base_df`) keeps the fitted body's scale and gives the
    guide polynomial tails. The guide's own base is scored first, then those of ``dfs`` with
    heavier tails than it (all of them for a normal base) in the given order (lightest tails,
    i.e. largest df, first, so the fitted body changes least); the first with k-hat under
    ``threshold`` is kept. If none reaches it, the guide's base is left as it was.

    Args:
        guide: The fitted guide (its ``base_df`` is changed in place).
        dfs: Degrees of freedom to try, each > 2.
        report: Scores the guide as it now is.
        threshold: The k-hat to get under (0.7 by default; :class:`VI` uses 0.6 on twice
            ``num_draws`` draws, a margin for the noise of k-hat).

    Returns:
        Whether a base with k-hat under ``threshold`` was found, and every
        ``(base_df, report)`` scored
        (``None``: the normal base).
    """
    original = guide.base_df
    candidates = [original] + [df for df in dfs if original is None or df < original]
    tried: list[tuple[float | None, ImportanceReport]] = []
    for df in candidates:
        guide.base_df = df
        r = report()
        tried.append((df, r))
        if r.khat < threshold:
            return True, tried
    guide.base_df = original
    return False, tried


def _float_sequence(
    name: str, value: object, minimum: float, description: str, *, nonempty: bool
) -> tuple[float, ...]:
    """``value`` as a tuple of finite floats above ``minimum``, or a ValueError naming
    ``name`` (``description`` says what is expected)."""
    ok = isinstance(value, Sequence) and not isinstance(value, str)
    values = tuple(value) if ok else ()
    real = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values
    )
    if not ok or (nonempty and not values) or not real or not all(v > minimum for v in values):
        raise ValueError(f"{name} must be {description}; got {value!r}")
    return tuple(float(v) for v in values)


def _check_tail_dfs(tail_dfs: object) -> tuple[float, ...]:
    if tail_dfs is None:
        return ()
    what = (
        "a sequence of finite floats > 2 (Student-t degrees of freedom with a finite "
        "variance) or None"
    )
    return _float_sequence("tail_dfs", tail_dfs, 2.0, what, nonempty=False)


# ---------------------------------------------------------------- the driver
def _check_step_sizes(step_sizes: object) -> tuple[float, ...]:
    what = "a non-empty sequence of positive finite floats"
    return _float_sequence("step_sizes", step_sizes, 0.0, what, nonempty=True)


def _check_fraction(name: str, value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value < 1:
        raise ValueError(f"{name} must be a float in (0, 1); got {value!r}")
    return float(value)


def _check_nonneg_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    return value


def default_guide(model: Callable, base: str = "full") -> AutoFlowGuide:
    """The guide :class:`VI` fits when none is given: four IAF layers and a full-rank base
    (``base="diagonal"`` above ``max_hessian_dim`` latents, where no Laplace factor is
    computed and a ``D x D`` base would dominate the memory and time of every step)."""
    return AutoFlowGuide(model, flow="iaf", num_flows=4, base=base)


def unconstrained_dim(model: Callable, args: tuple, kwargs: dict) -> int:
    """Number of unconstrained latent coordinates of one trace of ``model`` (no guide built)."""
    with torch.no_grad(), poutine.block():
        trace = prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))
    return sum(
        biject_to(site["fn"].support).inv(site["value"]).numel()
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary", False)
    )


class VI:
    r"""Fit an autoguide automatically: an MCMC-shaped driver for variational inference.

    Swap ``MCMC(NUTS(model))`` for ``VI(model)``: :meth:`run` finds the posterior mode and
    starts the guide at the Laplace approximation in whitened coordinates, chooses Adam's
    step size by short pilot runs, optimises the reparameterised ELBO until a stopping rule
    says the ELBO no longer improves (decaying the step size on each plateau and averaging
    the iterates of the last phase), optionally restarts, and reports how good the fitted
    posterior is (PSIS k-hat, importance-sampling ESS, log-evidence). Steps whose loss or
    gradient is not finite are skipped and counted. See the module docstring of
    :mod:`pyroflows.vi` for the pieces.

    Works with models written for a single draw (the log-density is vectorised over
    particles with ``torch.func.vmap``, else looped) and with any ``AutoContinuous`` guide,
    ``AutoNormal`` and :class:`~pyroflows.AutoFlowGuide` (the default). Afterwards
    ``vi.guide`` is an ordinary fitted guide: ``Predictive``, ``state_dict``, ``median``,
    ``NeuTraReparam``.

    An :class:`~pyroflows.AutoAmortizedFlowGuide` (local latent variables, possibly under a
    subsampled plate) is fitted by the same pilots, decays, averaging, restarts and report,
    with these differences (:mod:`pyroflows._vi_amortized`): no mode search; the global
    guide is whitened by its own moments at the first plateau (and the optimiser restarted),
    and again at a later plateau if its sd in those coordinates has moved off 1 by more than
    a factor 2 (the phase then starts over at the same step size, at most three times: at
    N = 100,000 the first whitening was 11x too wide in mu, which made SAGA's gradient noise
    20x what it is in the posterior's own coordinates);
    steps use :class:`~pyroflows.SAGA_ELBO` after that when the plate is subsampled, with
    :class:`PairedMonitor` as the stopping rule (windows of at least one epoch, N / B
    steps; at each plateau the best of the phase's start and its window averages is put
    back, with a fresh optimiser; after the whitening a plateau also needs the global
    guide's window-mean gradient near zero); ELBO scores use a seeded subset of about 1,024
    members (new draws and members for each phase); the report's importance weights are
    joint over all N members (draws capped at ``max(100, 2e7 / N)``, with the k-hat
    warning threshold lowered to what that many draws can show, ``1 - 1/log10 S``), so
    ``get_samples`` returns every member's locals. After the fit the globals are checked
    (:meth:`~pyroflows.AutoAmortizedFlowGuide.check_globals`, reported as
    ``diagnostics()["globals_check"]``): they end at the ELBO's optimum *given the local
    guide*, and at large N a common error of the local guide far below what any ELBO score
    resolves moves that optimum by posterior sds (at N = 100,000, 0.15-1.2 sd in the
    benchmark's fits); the check estimates the globals' marginal score by importance
    sampling each member's locals with the local guide (jackknifed over the draws), fits
    it to a Gaussian over draws of the global guide, and moves the global guide onto it
    when it is off (by more than 0.1 posterior sd and 3 standard errors, or 10% in sd),
    warning if its estimates do not settle. It assumes the globals' marginal is close to
    Gaussian over the guide's draws.
    ``loss`` must be ``"elbo"`` and the model must broadcast over a leading dim of draws.
    Measured (``benchmarks/results/amortized_vi.md``, three seeds each): good fits at
    N = 20 (globals within 0.03 posterior sd) and at N = 2,000 with B = 256 (within 0.03
    sd, sds 0.95-1.02, k-hat 0.00-0.40), the check keeping every fit; at N = 100,000 it
    moved the globals of all three fits, from 0.15-1.2 posterior sd off to within 0.05
    (RMS 0.025), sds 0.96-1.04 of the exact, about what the SVI recipe of
    ``examples/amortized_hierarchical.py`` gets (what is left is the check's own noise; two
    estimates of about 45 s each at that N). On a model whose global is a skewed scale
    (``benchmarks/results/amortized_vi_scale.md``) it kept the fits at N = 60 and brought
    those at N = 2,000 and 20,000 (two of them 0.65 and 1.28 sd off) within 0.051 sd.

    Args:
        model: A Pyro model with continuous latent sites.
        guide: An autoguide for ``model``; default :func:`default_guide`
            (``AutoFlowGuide(model, flow="iaf", num_flows=4, base="full")``, with
            ``base="diagonal"`` when the model has more than ``max_hessian_dim``
            unconstrained latent coordinates).
        num_particles: Draws per gradient estimate.
        loss: The objective: ``"elbo"`` (the default), ``"stl"`` (sticking the landing),
            ``"iwae"`` or ``"dreg"`` (the importance-weighted bound with ``num_particles``
            draws), or an :class:`~pyroflows.objectives.Objective` (its class is used;
            the draws are ``num_particles``). See :mod:`pyroflows.objectives` for what
            each costs. The pilots, stopping rule and report are the same for every
            objective; the pilots and the choice of final state compare ELBO estimates.
        fallback_loss: If no restart reaches PSIS k-hat < 0.7, one more fit from the best
            mode with this objective (``None``: never; nor above ``max_hessian_dim``
            latents, where scoring detached draws through an IAF inverse costs D
            sequential passes); :func:`select_fit` then keeps the best. The default,
            sticking the landing, has the ELBO's optimum but gradient noise that vanishes
            as q approaches the posterior. Run alone on the posteriordb set it reached
            k-hat < 0.7 on both posteriors where the ELBO did not
            (``benchmarks/results/objectives.md``); as this fallback it improved centred
            eight schools (k-hat 0.81 to 0.73) but not garch
            (``benchmarks/results/posteriordb.md``).
        max_steps: Adam step budget per restart, pilots included.
        num_restarts: Independent fits (different seeds; the r-th uses the r-th best
            distinct mode found); the best by :func:`select_fit` is kept.
        step_sizes: Adam step sizes tried by the pilots.
        pilot_steps: Steps of each pilot run (fewer if the pilots would take more than half
            of ``max_steps``).
        window: Steps per window of the stopping rule (:class:`ConvergenceMonitor`).
        tol: Absolute tolerance of the stopping rule, nats per window.
        num_decays: Step-size decays (one per plateau) before the final, averaged phase.
        decay: Factor of each decay.
        num_starts: Starting points of the mode search (the guide's ``init_loc_fn``
            location, then uniform jitter in (-2, 2) around it, in unconstrained space).
        max_hessian_dim: Largest latent dimension for which the exact Hessian is computed
            (Newton polish and Laplace start); above it the search ends with L-BFGS and the
            guide starts at the mode without whitening.
        num_draws: Guide draws behind the final PSIS report (which decides the fallback fit
            and the k-hat warning) and :meth:`summary`. PSIS k-hat from S draws is itself
            reliable only below about 1 - 1/log10(S) (Vehtari et al. 2024): 0.70 at
            S = 2000, 0.74 at the default 8000. With 2000 draws the driver's k-hat for the
            same garch fit ranged 0.52-0.85 over draw sets and read 0.55 where the
            benchmark's median over 3 x 4000 draws was 0.79.
        num_score_draws: Draws of the ELBO estimates that compare the pilots (the final
            choices, averaged or last iterate and fitted or start, use ``num_draws``).
        tail_dfs: For an :class:`~pyroflows.AutoFlowGuide` whose kept fit has k-hat >= 0.5:
            if its k-hat from ``2 num_draws`` fresh draws is not under 0.6 (a margin: k-hat
            is noisy near 0.7, and restarts pick the draw set that read low), these
            Student-t degrees of freedom are tried for its base, largest first, and the
            first under 0.6 on the same draws is kept (:func:`choose_tails`); the report
            is then re-estimated on another ``num_draws`` fresh draws. ``None`` or ``()``:
            never. In ``benchmarks/posteriordb.py`` it took garch's default guide from
            k-hat 0.70 [0.56-0.77] over three draw sets to 0.51 [0.43-0.53] (df 10), with
            mean / sd errors 0.03 / 0.09 reference sd.
        seed: Seed for everything random in :meth:`run` (``None``: the global RNG state).
        progress_bar: Show a tqdm progress bar.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> vi = VI(model, progress_bar=False, seed=0).run(torch.tensor([0.5, 1.5]))
        >>> vi.get_samples(100)["mu"].shape
        torch.Size([100])
        >>> vi.diagnostics()["khat"] < 0.5
        True

    References:
        | Automatic Differentiation Variational Inference (Kucukelbir et al., 2017)
        | https://arxiv.org/abs/1603.00788
        | Robust, Accurate Stochastic Optimization for VI (Dhaka et al., 2020)
        | https://arxiv.org/abs/2009.00666
        | Advances in Black-Box VI: Normalizing Flows, Importance Weighting, and Optimization
        | (Agrawal, Sheldon & Domke, 2020) https://arxiv.org/abs/2006.10343
        | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
        | https://arxiv.org/abs/1802.02538
    """

    def __init__(
        self,
        model: Callable,
        guide: Any = None,
        *,
        num_particles: int = 8,
        loss: str | Objective = "elbo",
        fallback_loss: str | Objective | None = "stl",
        max_steps: int = 10_000,
        num_restarts: int = 1,
        step_sizes: Sequence[float] = (0.1, 0.03, 0.01, 0.003),
        pilot_steps: int = 100,
        window: int = 100,
        tol: float = 0.01,
        num_decays: int = 2,
        decay: float = 0.3,
        num_starts: int = 4,
        max_hessian_dim: int = 2000,
        num_draws: int = 8000,
        num_score_draws: int = 512,
        tail_dfs: Sequence[float] | None = (30.0, 10.0, 5.0),
        seed: int | None = None,
        progress_bar: bool = True,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model; got {type(model).__name__}")
        self._default_guide = guide is None
        guide = default_guide(model) if guide is None else guide
        if not isinstance(guide, AutoGuide):
            raise TypeError(
                f"guide must be a Pyro autoguide (AutoFlowGuide, AutoNormal or an "
                f"AutoContinuous guide); got {type(guide).__name__}"
            )
        self.model, self.guide = model, guide
        self.num_particles = check_positive_int("num_particles", num_particles)
        self.objective = get_objective(loss)
        self.fallback = None if fallback_loss is None else get_objective(fallback_loss)
        self.max_steps = check_positive_int("max_steps", max_steps)
        self.num_restarts = check_positive_int("num_restarts", num_restarts)
        self.step_sizes = _check_step_sizes(step_sizes)
        self.pilot_steps = _check_nonneg_int("pilot_steps", pilot_steps)
        self.monitor = ConvergenceMonitor(window, tol)
        self.num_decays = _check_nonneg_int("num_decays", num_decays)
        self.decay = _check_fraction("decay", decay)
        self.num_starts = check_positive_int("num_starts", num_starts)
        self.max_hessian_dim = _check_nonneg_int("max_hessian_dim", max_hessian_dim)
        self.num_draws = check_positive_int("num_draws", num_draws)
        if self.num_draws < 25:
            raise ValueError(f"num_draws must be >= 25 for PSIS; got {num_draws!r}")
        self.num_score_draws = check_positive_int("num_score_draws", num_score_draws)
        self.tail_dfs = _check_tail_dfs(tail_dfs)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None; got {seed!r}")
        self.seed = seed
        self.progress_bar = bool(progress_bar)
        self.fits: list[FitResult] = []
        self._result: dict[str, Any] | None = None

    # ------------------------------------------------------------ run
    def run(self, *args: Any, **kwargs: Any) -> VI:
        """Fit the guide to the posterior of ``model(*args, **kwargs)``; returns ``self``."""
        start = time.perf_counter()
        if self.seed is not None:
            pyro.set_rng_seed(self.seed)
        self._args, self._kwargs = args, kwargs
        if self._default_guide and self.guide.prototype_trace is None:
            if unconstrained_dim(self.model, args, kwargs) > self.max_hessian_dim:
                self.guide = default_guide(self.model, base="diagonal")
        trace = prototype_trace(self.model, self.guide, args, kwargs)
        if is_amortized(self.guide):  # no packed latent vector, no mode search
            self.log_density = None
            self._target = AmortizedTarget(self.model, self.guide, args, kwargs)
            self._target.loss_fn(self.num_particles, self.objective)  # checks the objective
            self._target.check_vectorized()
            modes, searches = [], []
        else:
            self.log_density = LogDensity(self.model, trace, args, kwargs)
            self._target = make_target(self.guide, args, kwargs)
            modes, searches = self._find_modes(trace)
        initial = self._target.state()
        self.fits = []
        for r in range(self.num_restarts):
            if self.seed is not None:
                pyro.set_rng_seed(self.seed + 1 + r)
            self._target.load(initial)
            mode = modes[r % len(modes)] if modes else None
            self.fits.append(self._fit(r, mode, searches, self.objective))
        if self._run_fallback():
            if self.seed is not None:
                pyro.set_rng_seed(self.seed + 1 + self.num_restarts)
            self._target.load(initial)
            mode = modes[0] if modes else None
            self.fits.append(self._fit(self.num_restarts, mode, searches, self.fallback))
        best = select_fit(self.fits)
        self._target.load(self.fits[best].state)
        self._target.finish()
        report, base_df, tails = self._tails(self.fits[best].report)
        mode_evals = sum(m.evaluations for m in searches)
        self._result = dict(
            best=best,
            report=report,
            base_df=base_df,
            tails=tails,
            searches=searches,
            gradient_evaluations=mode_evals + sum(f.steps for f in self.fits) * self.num_particles,
            seconds=time.perf_counter() - start,
        )
        self._warn()
        return self

    def _tails(
        self, report: ImportanceReport
    ) -> tuple[ImportanceReport, float | None, list[dict[str, Any]]]:
        """The tail step (:func:`choose_tails`): the final report, the kept ``base_df`` and
        every base scored."""
        flow = isinstance(self.guide, AutoFlowGuide)
        if not (self.tail_dfs and flow and report.khat >= KHAT_GOOD):
            # k-hat < 0.5 from num_draws draws: a true k-hat >= 0.7 is unlikely, no re-check
            return report, self.guide.base_df if flow else None, []

        def score(seed: int) -> ImportanceReport:
            log_w = _draw_log_weights(self._target, self.log_density, self.num_draws, seed)[1]
            return importance_report(log_w)

        def pooled() -> ImportanceReport:
            # the same two seeds for every base
            log_w = [_draw_log_weights(self._target, self.log_density, self.num_draws, seed)[1]
                     for seed in crn_seeds]  # fmt: skip
            return importance_report(torch.cat(log_w))

        crn_seeds = [int(s) for s in torch.randint(2**31 - 1, (2,))]
        fresh_seed = int(torch.randint(2**31 - 1, ()))
        _, tried = choose_tails(self.guide, self.tail_dfs, pooled, KHAT_TAILS)
        tails = [dict(base_df=d, khat=r.khat, elbo=r.elbo, ess=r.ess) for d, r in tried]
        # every k-hat above passed or failed a threshold, or won select_fit: the report
        # is re-estimated on fresh draws
        return score(fresh_seed), self.guide.base_df, tails

    def _run_fallback(self) -> bool:
        """Whether to fit once more with ``fallback_loss``: no restart reached k-hat < 0.7,
        and the problem is small (at most ``max_hessian_dim`` latents: STL and DReG score
        every draw through the flow's inverse, which for IAF is D sequential MADE passes kept
        for autograd; at D = 5,000 that exhausted 24 GB)."""
        if self.fallback is None or self.log_density is None:  # None: an amortized guide
            return False
        if self.log_density.dim > self.max_hessian_dim:
            return False
        return not any(f.report.khat < KHAT_USABLE for f in self.fits)

    def _find_modes(self, trace: Any) -> tuple[list[Mode], list[Mode]]:
        """Mode search from ``num_starts`` points; the distinct modes found, best first."""
        ld = self.log_density
        z0 = ld.pack({s.name: trace.nodes[s.name]["value"] for s in ld.sites}).detach()
        starts = [z0] + [z0 + 4 * torch.rand_like(z0) - 2 for _ in range(self.num_starts - 1)]
        hessian = ld.dim <= self.max_hessian_dim
        searches = [find_mode(ld, z, hessian=hessian) for z in starts]
        found = sorted((m for m in searches if m.found), key=lambda m: -m.log_density)
        distinct: list[Mode] = []
        for m in found:
            if not any(_same_mode(m, d) for d in distinct):
                distinct.append(m)
        return distinct, searches

    def _fit(
        self, restart: int, mode: Mode | None, searches: list[Mode], objective: Objective
    ) -> FitResult:
        """One restart: start, choose the step size, optimise, average, report."""
        start = time.perf_counter()
        target = self._target
        init, whitened = self._start(mode, searches)
        crn_seed = int(torch.randint(2**31 - 1, ()))
        members = target.score_members(crn_seed) if self.log_density is None else None

        def score(num: int = self.num_score_draws) -> float:
            log_w = self._log_weights(num, crn_seed, members)[1]
            finite = torch.isfinite(log_w)
            if float(finite.double().mean()) < 0.9:  # mostly off the model's support
                return -math.inf
            return float(log_w[finite].mean())

        if self.log_density is None:
            loss_fn = target.loss_fn(self.num_particles, objective)
        else:
            loss_fn = _loss_fn(target, self.log_density, self.num_particles, objective)
        run, initial = _Run(), target.state()
        with _progress(self, restart) as bar:
            # the pilots take at most half of the step budget
            pilot_steps = min(self.pilot_steps, self.max_steps // (2 * len(self.step_sizes)))
            lr, pilots = choose_step_size(
                target, loss_fn, score, self.step_sizes, pilot_steps, run, bar
            )
            monitor = self.monitor
            if members is not None and target.subsampled:
                monitor = PairedMonitor(
                    max(self.monitor.window, math.ceil(target.size / target.batch)),  # an epoch
                    self.monitor.tol,
                    _PhaseScore(self, crn_seed + 1),
                    target.params(),
                    self.monitor.z,
                    gradient=target.global_gradient,
                )
            converged, averaged = self._optimise(loss_fn, lr, run, bar, score, monitor)
        check = target.check_globals(crn_seed + 2)
        final_score = functools.partial(score, max(self.num_draws, self.num_score_draws))
        if whitened and _better_start(target, initial, final_score):
            init += "; kept as is: it scored higher than every optimised state"
        report = importance_report(self._log_weights(self._report_draws(), None)[1])
        return FitResult(
            restart,
            init,
            whitened,
            lr,
            pilots,
            run.steps,
            run.skipped,
            converged,
            averaged,
            report,
            time.perf_counter() - start,
            target.state(),
            run.trace,
            objective.name,
            check,
        )

    def _start(self, mode: Mode | None, searches: list[Mode]) -> tuple[str, bool]:
        """Put the guide at the Laplace approximation (or say why not)."""
        if self.log_density is None:
            return (
                "init_loc_fn location (amortized guide: no mode search; the globals are "
                "whitened by their own moments at the first plateau)",
                False,
            )
        if mode is None:
            reasons = sorted({m.message for m in searches})
            self._target.start(None, None, None)
            return "init_loc_fn (no mode: " + "; ".join(reasons) + ")", False
        factor = laplace_factor(mode.hessian) if mode.hessian is not None else mode.lowrank
        if self._target.start(mode.z, factor, mode.hessian):
            if mode.hessian is None:
                rank = factor.basis.shape[-1]
                return f"low-rank (rank {rank}) + diagonal Laplace approximation at the mode", True
            return "Laplace approximation at the mode", True
        if factor is None:
            why = "the Hessian was not computed" if mode.hessian is None else "not PD"
            return f"mode (no Laplace factor: {why})", False
        kind = type(self.guide).__name__
        return f"mode ({kind} is optimised in its own parameterisation, not whitened)", False

    def _optimise(
        self,
        loss_fn: Callable,
        lr: float,
        run: _Run,
        bar: Any,
        score: Callable[[], float],
        monitor: ConvergenceMonitor,
    ) -> tuple[bool, bool]:
        """Adam until the stopping rule fires in the last phase; returns (converged, averaged)."""
        params = self._target.params()
        opt = torch.optim.Adam(params, lr=lr)
        phase, converged = 0, False
        monitor.reset()
        average = IterateAverage(params) if self.num_decays == 0 else None
        bad_in_a_row = 0
        while run.steps < self.max_steps and bad_in_a_row < 10 * monitor.window:
            loss = _step(opt, params, loss_fn)
            run.steps += 1
            bar()
            if loss is None:
                run.skipped, bad_in_a_row = run.skipped + 1, bad_in_a_row + 1
                continue
            bad_in_a_row = 0
            run.trace.append(loss)
            if average is not None:
                average.update()
            if monitor.update(loss):
                restored = monitor.restore_best()
                if self._target.rewhiten():  # new coordinates: the phase starts again
                    opt = torch.optim.Adam(params, lr=opt.param_groups[0]["lr"])
                    monitor.reset()
                    if average is not None:
                        average = IterateAverage(params)
                    continue
                if phase == self.num_decays:
                    converged = True
                    break
                phase += 1
                lr = opt.param_groups[0]["lr"] * self.decay
                # new coordinates, or parameters put back: a fresh optimiser
                if self._target.on_plateau() or restored:
                    opt = torch.optim.Adam(params, lr=lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                monitor.reset()
                if phase == self.num_decays:
                    average = IterateAverage(params)
        final_score = functools.partial(score, max(self.num_draws, self.num_score_draws))
        return converged, average is not None and _keep_average(average, final_score)

    def _log_weights(
        self, n: int, seed: int | None, members: Tensor | None = None
    ) -> tuple[Any, Tensor]:
        """``n`` guide draws and their log-weights ``log p - log q``: packed latents, or for
        an amortized guide the site values (joint over ``members``, default all)."""
        if self.log_density is None:
            return self._target.log_weights(n, seed, members)
        return _draw_log_weights(self._target, self.log_density, n, seed)

    def _report_draws(self) -> int:
        """Draws behind a report: ``num_draws`` (capped at large N for an amortized guide)."""
        if self.log_density is None:
            return self._target.report_draws(self.num_draws)
        return self.num_draws

    def _warn(self) -> None:
        fit, report = self.fits[self._result["best"]], self._result["report"]
        if report.khat >= report.threshold:
            few = report.threshold < KHAT_USABLE
            warnings.warn(
                f"VI: PSIS k-hat = {report.khat:.2f} >= {report.threshold:.2f}"
                + (f" (the limit for {report.num_draws} draws)" if few else "")
                + ": the fitted guide misses posterior mass; do not trust its tails or "
                "uncertainties (try another flow, more flow layers, or MCMC).",
                UserWarning,
                stacklevel=3,
            )
        check = fit.globals_check
        if check is None and self._report_draws() < self.num_draws and self._has_globals():
            size = self._target.size
            warnings.warn(
                f"VI: the report's importance weights are joint over all {size:,} members, so "
                f"only {report.num_draws} draws were affordable (of num_draws="
                f"{self.num_draws}): its k-hat cannot certify the global sites at this size, "
                "and they were not checked (the fit never reached the plateau where the "
                "global guide is whitened). At large N the globals stand at the ELBO's "
                "optimum given the local guide, which a small error of the local guide moves "
                "by posterior sds: raise max_steps, or train longer with SAGA_ELBO and 16 "
                "particles (examples/amortized_hierarchical.py).",
                UserWarning,
                stacklevel=3,
            )
        elif check is not None and ("reason" in check or check["remaining"] is None):
            why = (
                f"stopped ({check['reason']})"
                if "reason" in check
                else f"moved the global guide ({check['offset']:.2f} posterior sd off at "
                f"first) and its {check['rounds']} estimates did not settle within "
                f"{CHECK_OFFSET} posterior sd (the globals' marginal may be far from Gaussian, "
                f"or the local guide a poor proposal: ESS / K {check['local_ess']:.2f})"
            )
            warnings.warn(
                f"VI: the check of the global sites {why}; they may be posterior sds off "
                "(compare fits from two seeds, or train longer with SAGA_ELBO and 16 "
                "particles, examples/amortized_hierarchical.py).",
                UserWarning,
                stacklevel=3,
            )
        if report.num_nonfinite:
            warnings.warn(
                f"VI: {report.num_nonfinite} of "
                f"{report.num_nonfinite + report.num_draws} guide draws have a "
                "non-finite log-density (the model returns NaN or inf there); the diagnostics "
                "use the finite ones.",
                UserWarning,
                stacklevel=3,
            )
        if not fit.converged:
            warnings.warn(
                f"VI: the ELBO had not converged after {fit.steps} steps "
                f"({fit.skipped} skipped as non-finite); raise max_steps or check the model.",
                UserWarning,
                stacklevel=3,
            )

    def _has_globals(self) -> bool:
        return getattr(self.guide, "global_guide", None) is not None

    # ------------------------------------------------------------ results
    def _check_ran(self) -> None:
        if self._result is None:
            raise RuntimeError("call VI.run(*model_args, **model_kwargs) first")

    @torch.no_grad()
    def get_samples(self, num_samples: int = 1000, *, resample: bool = False) -> dict[str, Tensor]:
        """Posterior draws of every latent site in constrained space, like ``MCMC.get_samples``.

        Args:
            num_samples: Number of draws.
            resample: Draw ``max(num_draws, 4 num_samples)`` guide samples and resample
                ``num_samples`` of them (with replacement) by their PSIS-smoothed importance
                weights, which corrects a guide that is close to, but not at, the posterior.

        Returns:
            A dict mapping each latent site to a tensor ``(num_samples, *site_shape)``.
        """
        self._check_ran()
        check_positive_int("num_samples", num_samples)
        amortized = self.log_density is None
        if not resample:
            if amortized:
                return self._target.sample(num_samples)
            return self.log_density.unpack(self._target.posterior().sample((num_samples,)))
        n = max(self.num_draws, 4 * num_samples)
        z, log_w = self._log_weights(n, None)
        if not bool(torch.isfinite(log_w).all()):
            raise ValueError("resample=True needs finite importance weights; some are not")
        lw = log_w.double().cpu().numpy()
        smoothed, _, _ = smooth_log_weights(lw, 1e-9 * (1.0 + float(np.abs(lw).mean())))
        probs = torch.as_tensor(np.exp(smoothed - smoothed.max()))
        index = torch.multinomial(probs, num_samples, replacement=True)
        if amortized:
            return {name: v[index.to(v.device)] for name, v in z.items()}
        return self.log_density.unpack(z[index.to(z.device)])

    @property
    def args(self) -> tuple:
        """Positional model arguments of the last :meth:`run`."""
        self._check_ran()
        return self._args

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword model arguments of the last :meth:`run`."""
        self._check_ran()
        return self._kwargs

    def attrs(self) -> dict[str, str | float | int]:
        """The scalar :meth:`diagnostics` as ``vi_*`` entries (ArviZ/netCDF attributes)."""
        out: dict[str, str | float | int] = {}
        for key, value in self.diagnostics().items():
            if isinstance(value, bool):
                out[f"vi_{key}"] = str(value)
            elif isinstance(value, (int, float, str)):
                out[f"vi_{key}"] = value
        return out

    def diagnostics(self) -> dict[str, Any]:
        """How the fit went: convergence, cost, k-hat, ESS, log-evidence, every restart."""
        self._check_ran()
        res, fit = self._result, self.fits[self._result["best"]]
        r, ld = res["report"], self.log_density
        return dict(
            converged=fit.converged,
            objective=fit.objective,
            khat=r.khat,
            khat_band=r.band,
            ess=r.ess,
            num_draws=r.num_draws,
            nonfinite_draws=r.num_nonfinite,
            elbo=r.elbo,
            elbo_se=r.elbo_se,
            log_evidence=r.log_evidence,
            log_evidence_se=r.log_evidence_se,
            steps=sum(f.steps for f in self.fits),
            skipped_steps=sum(f.skipped for f in self.fits),
            gradient_evaluations=res["gradient_evaluations"],
            log_density_evaluations=0 if ld is None else ld.evaluations,
            seconds=res["seconds"],
            init=fit.init,
            whitened=fit.whitened,
            step_size=fit.lr,
            averaged=fit.averaged,
            base_df=res["base_df"],
            tails=res["tails"],
            vectorized="particles" if ld is None else ld.method,
            mode_search=[m.message for m in res["searches"]],
            best_restart=res["best"],
            restarts=[_fit_summary(f) for f in self.fits],
            globals_check=fit.globals_check,
        )

    def summary(self, prob: float = 0.9) -> None:
        """Print a per-site table (mean, sd, median, ``prob`` interval) and the diagnostics."""
        self._check_ran()
        prob = _check_fraction("prob", prob)
        samples = self.get_samples(self._report_draws())
        if self.log_density is None and self._target.size > SUMMARY_MEMBERS:
            local = {site.name for site in self.guide._locals}
            samples = {k: v for k, v in samples.items() if k not in local}
            print(f"(local sites {sorted(local)} of {self._target.size} members not shown: "
                  "see get_samples)")  # fmt: skip
        print(_summary_table(samples, prob))
        print(_diagnostics_text(self.diagnostics()))


class _PhaseScore:
    """:class:`PairedMonitor`'s score for an amortized guide: ``num_score_draws``
    log-weights over a fixed subset of members, with new draws and members after each
    ``refresh()`` (each phase of the stopping rule)."""

    def __init__(self, vi: VI, seed: int) -> None:
        self.vi, self.seed, self.phase = vi, seed, -1
        self.members: Tensor | None = None

    def refresh(self) -> None:
        self.phase += 1
        self.members = self.vi._target.score_members(self.seed + self.phase)

    def __call__(self) -> Tensor:
        if self.members is None:
            self.refresh()
        seed = self.seed + self.phase
        return self.vi._log_weights(self.vi.num_score_draws, seed, self.members)[1]


def _same_mode(a: Mode, b: Mode) -> bool:
    diff = a.z - b.z
    if b.hessian is not None:
        return float(diff @ b.hessian @ diff) < 1e-2
    return bool((diff.abs() <= 1e-4 * (1 + b.z.abs())).all())


def _better_start(target: Target, initial: dict[str, Tensor], score: Callable) -> bool:
    """Return to the (Laplace) start if it scores higher than the fitted state."""
    fitted = target.state()
    fitted_score = score()
    target.load(initial)
    if score() > fitted_score:
        return True
    target.load(fitted)
    return False


def _keep_average(average: IterateAverage, score: Callable[[], float]) -> bool:
    """Swap in the averaged iterates if they score at least as well as the last iterate."""
    last = score()
    average.swap()
    if score() >= last:
        return True
    average.swap()
    return False


class _progress:
    """A tqdm bar for one restart, used as ``bar()`` once per step."""

    def __init__(self, vi: VI, restart: int) -> None:
        from tqdm.auto import tqdm

        desc = "VI" if vi.num_restarts == 1 else f"VI restart {restart + 1}/{vi.num_restarts}"
        self.bar = tqdm(total=vi.max_steps, desc=desc, disable=not vi.progress_bar, leave=False)

    def __enter__(self) -> Callable[[], None]:
        return lambda: self.bar.update()

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _fit_summary(f: FitResult) -> dict[str, Any]:
    r = f.report
    return dict(
        restart=f.restart,
        objective=f.objective,
        init=f.init,
        step_size=f.lr,
        steps=f.steps,
        skipped=f.skipped,
        converged=f.converged,
        elbo=r.elbo,
        khat=r.khat,
        ess=r.ess,
        seconds=f.seconds,
        pilots=f.pilots,
    )


def _summary_table(samples: dict[str, Tensor], prob: float) -> str:
    lo, hi = (1 - prob) / 2, (1 + prob) / 2
    head = f"{'':>16} {'mean':>10} {'std':>10} {'median':>10} {100 * lo:>9.1f}% {100 * hi:>9.1f}%"
    lines = [head]
    for name, v in samples.items():
        flat = v.reshape(v.shape[0], -1).double()
        q = torch.quantile(flat, torch.tensor([0.5, lo, hi], dtype=flat.dtype), dim=0)
        for j in range(flat.shape[1]):
            label = name if flat.shape[1] == 1 else f"{name}[{j}]"
            col = flat[:, j]
            lines.append(
                f"{label:>16} {float(col.mean()):>10.3g} {float(col.std()):>10.3g} "
                f"{float(q[0, j]):>10.3g} {float(q[1, j]):>10.3g} {float(q[2, j]):>10.3g}"
            )
    return "\n".join(lines)


def _diagnostics_text(d: dict[str, Any]) -> str:
    return "\n".join(
        [
            "",
            f"converged: {d['converged']} after {d['steps']} steps "
            f"({d['skipped_steps']} skipped), {d['gradient_evaluations']} gradient "
            f"evaluations, {d['seconds']:.1f} s; step size {d['step_size']:g}",
            f"start: {d['init']}",
            f"PSIS k-hat = {d['khat']:.2f} [{d['khat_band']}], importance-sampling ESS = "
            f"{d['ess']:.0f} of {d['num_draws']}",
            f"ELBO = {d['elbo']:.3f} ± {d['elbo_se']:.3f}, log p(x) ≈ {d['log_evidence']:.3f} "
            f"± {d['log_evidence_se']:.3f}",
        ]
        + _tails_text(d)
        + _globals_text(d.get("globals_check"))
    )


def _globals_text(check: dict[str, Any] | None) -> list[str]:
    if check is None:
        return []
    if "offset" not in check:
        return [f"globals: not checked ({check['reason']})"]
    first = (
        f"globals: checked by importance sampling each member's locals ({check['local_draws']} "
        f"draws, ESS / K {check['local_ess']:.2f}); the fit was {check['offset']:.2f} "
        f"posterior sd off, sd ratios {check['sd_ratio'][0]:.2f}-{check['sd_ratio'][1]:.2f}"
    )
    if not check["moved"]:
        return [first + f" (se {check['se']:.2f}): kept"]
    if check["remaining"] is None:
        return [first + f"; moved, not settled after {check['rounds']} estimates"]
    return [
        first + f"; moved onto the estimates ({check['rounds']}; the last found it "
        f"{check['remaining']:.2f} ± {check['se']:.2f} sd off)"
    ]


def _tails_text(d: dict[str, Any]) -> list[str]:
    if len(d["tails"]) < 2:
        return []

    def name(df: float | None) -> str:
        return "normal" if df is None else f"Student-t df {df:g}"

    tried = ", ".join(f"{name(t['base_df'])}: k-hat {t['khat']:.2f}" for t in d["tails"])
    return [f"tails: bases tried ({tried}, 2 x num_draws draws); kept {name(d['base_df'])}"]
