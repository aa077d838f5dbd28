r"""What :class:`pyroflows.VI` optimises for an :class:`~pyroflows.AutoAmortizedFlowGuide`.

The amortized guide has no packed latent vector of a fixed size (its local part is one
conditional flow shared by the plate's N members), so :class:`AmortizedTarget` gives VI the
same pieces as the other targets through the model and guide traces instead:

* the gradient step: ``Trace_ELBO`` with ``num_particles`` vectorized particles, and once
  the globals are whitened (below) and the plate is subsampled, :class:`pyroflows.SAGA_ELBO`
  (control variates over the plate's members);
* joint importance log-weights :math:`\log p(x, \theta, z_{1:N}) - \log q(\theta) -
  \sum_i \log q(z_i \mid x_i, \theta)` of guide draws, over all N members (the report) or
  over a seeded subset of them with the scale N / M (the ELBO scores that compare pilots
  and states, with common random numbers; a new subset for each phase of the stopping
  rule);
* the whitened restart: at the first plateau the global guide is restarted at its own
  moments in whitened coordinates (:meth:`~pyroflows.AutoAmortizedFlowGuide.
  precondition_globals`), the analogue of VI's Laplace start for these guides (a joint mode
  of a hierarchical model is degenerate, so there is no mode search); at a later plateau
  it is whitened again if its sd in those coordinates has moved off 1 by more than a
  factor 2 (:meth:`AmortizedTarget.whitening_stale`), and the phase starts over;
* the check of the globals after the fit (:meth:`AmortizedTarget.check_globals`): the
  ELBO's optimum for the global guide is the posterior only if the local guide is exact,
  and at large N a common error of the local guide far below what any ELBO score resolves
  moves it by posterior sds. The globals' marginal score :math:`\nabla_\theta \log
  p(\theta \mid x)` is estimated by importance sampling each member's local latents with
  the local guide (Fisher's identity, as in the locally enhanced bounds of Geffner & Domke
  2022), regressed on the global guide's draws to a Gaussian, and the global guide is moved
  onto it (an affine map of its whitened coordinates, its shape kept) when it is off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from pyroflows._potential import latent_sites
from pyroflows._vi_targets import Target
from pyroflows.amortized import AutoAmortizedFlowGuide
from pyroflows.guides import _PRECOND_BUFFERS
from pyroflows.objectives import Objective, _guess_nesting
from pyroflows.saga import SAGA_ELBO, _Pin

# members scored per vectorized pass (draws x members) in reports and scores
MEMBER_CHUNK = 2**16
# the report's draws are capped so that draws x N stays under this (at N = 100,000: 200)
REPORT_MEMBER_BUDGET = 2 * 10**7
MIN_REPORT_DRAWS = 100
# members in the subset behind an ELBO score (all of them up to this size)
SCORE_MEMBERS = 1024
# the global guide is whitened again at a plateau when its sd in the whitened coordinates
# is off 1 by more than this factor along some direction, at most MAX_REWHITENINGS times
REWHITEN_SD = 2.0
MAX_REWHITENINGS = 3
# the check of the globals: draws of the global guide, and for each of them draws of every
# member's locals (between the bounds, as many as CHECK_MEMBER_BUDGET allows); the guide is
# moved when its mean is off by more than CHECK_OFFSET posterior sd and by more than 3
# standard errors of the estimate, or its sd by more than the fraction CHECK_SD; at most
# CHECK_ROUNDS estimates
CHECK_GLOBAL_DRAWS = 16
CHECK_LOCAL_DRAWS = (16, 64)
CHECK_MEMBER_BUDGET = 2 * 10**7
CHECK_ROUNDS = 3
CHECK_CHUNK = 2**18  # draws x members per vectorized pass of the check
CHECK_OFFSET = 0.1
CHECK_SD = 0.1


@dataclass
class GlobalsEstimate:
    """A Gaussian estimate of the globals' marginal posterior and the global guide's own
    moments, both in the guide's whitened coordinates (:meth:`AmortizedTarget.
    estimate_globals`)."""

    mean: Tensor  # (G,)
    cov: Tensor  # (G, G)
    q_mean: Tensor
    q_cov: Tensor
    mean_se: float  # the estimate's mean, posterior sds, worst direction
    local_ess: float  # the members' mean importance-sampling ESS / K
    sd_se: float = 0.0  # relative standard error of the estimate's sds (worst coordinate)

    def offset(self) -> float:
        """The guide's mean from the estimate's, in posterior sds (Mahalanobis)."""
        diff = torch.linalg.solve_triangular(
            torch.linalg.cholesky(self.cov), (self.q_mean - self.mean)[:, None], upper=False
        )
        return float(diff.norm())

    def sd_ratios(self) -> tuple[float, float]:
        """The smallest and largest ratio of the guide's sd to the estimate's, over
        directions."""
        chol = torch.linalg.cholesky(self.cov)
        inner = torch.linalg.solve_triangular(chol, self.q_cov, upper=False)
        inner = torch.linalg.solve_triangular(chol, inner.T, upper=False)
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt()
        return float(eig.min()), float(eig.max())

    def is_off(self) -> bool:
        """Whether the guide's mean is more than ``CHECK_OFFSET`` posterior sd and 3 standard
        errors off the estimate's, or its sd off by more than the fraction ``CHECK_SD`` and
        3 relative standard errors along some direction."""
        low, high = self.sd_ratios()
        sd_off = max(1 - low, high - 1) > max(CHECK_SD, 3 * self.sd_se)
        return (self.offset() > CHECK_OFFSET and self.offset() > 3 * self.mean_se) or sd_off


class AmortizedTarget(Target):
    """:class:`~pyroflows.AutoAmortizedFlowGuide` as VI's target (see the module docstring);
    not a distribution over a packed vector (:meth:`posterior` is not defined)."""

    def __init__(
        self, model: Callable, guide: AutoAmortizedFlowGuide, args: tuple, kwargs: dict
    ) -> None:
        super().__init__(guide, args, kwargs)
        self.model = model
        frame = guide._frame
        self.plate = guide.local_plate
        self.size = frame.full_size or frame.size  # N
        self.batch = frame.size  # B, members per run of the model
        self.subsampled = self.size > frame.size
        self.nesting = _guess_nesting(model, guide, args, kwargs)
        self.preconditioned = False
        self.rewhitenings = 0
        # the check's draws of the globals and of each member's locals (None: the defaults)
        self.check_draws: tuple[int | None, int | None] = (None, None)

    def check_vectorized(self) -> None:
        """Draw two particles in one vectorized pass, or raise a ``ValueError`` saying how
        the model must be written for that."""
        try:
            self.log_weights(2, seed=0, members=self._runs(torch.arange(self.size))[0][0])
        except Exception as err:
            raise ValueError(
                "VI draws an AutoAmortizedFlowGuide's particles in one vectorized pass (a "
                f"plate of draws left of the model's {self.nesting} plate dim(s)), and the "
                f"model failed there: {type(err).__name__}: {err}. Write the model so that "
                "its sites broadcast over leading batch dims (e.g. alpha[..., None] rather "
                "than alpha[:, None]), as for Trace_ELBO(vectorize_particles=True)"
            ) from err

    # ------------------------------------------------------------ state
    def load(self, state: dict[str, Tensor]) -> None:
        gg = self.guide.global_guide
        if gg is not None:  # a state from before precondition_globals()
            for name in _PRECOND_BUFFERS:
                if f"global_guide.{name}" not in state:
                    gg._buffers.pop(name, None)
        self.guide.load_state_dict(state)
        self.preconditioned = gg is not None and gg.preconditioned
        if not self.preconditioned:  # a fit starts (or restarts): no re-whitening yet
            self.rewhitenings = 0

    # ------------------------------------------------------------ optimisation
    def loss_fn(self, particles: int, objective: Objective) -> Callable[[], Tensor | float]:
        """One step's loss: Trace_ELBO's differentiable loss (a tensor), or once the globals
        are whitened and the plate is subsampled, SAGA's (gradients already accumulated, a
        float). SAGA's table only pays near the optimum: filled while the parameters still
        move fast, its stale rows add variance (VI's first phase at N = 100,000 diverged
        with SAGA from the start)."""
        if objective.name != "elbo":
            raise ValueError(
                f"VI fits an AutoAmortizedFlowGuide with loss='elbo' only; got {objective.name!r} "
                "(sticking the landing, IWAE and DReG score the joint log-weights of all the "
                "plate's members, which a subsampled step does not have)"
            )
        plain = Trace_ELBO(particles, vectorize_particles=particles > 1,
                           max_plate_nesting=self.nesting)  # fmt: skip
        saga = SAGA_ELBO(self.plate, particles, max_plate_nesting=self.nesting)
        model, guide, args, kwargs = self.model, self.guide, self.args, self.kwargs

        def loss() -> Tensor | float:
            if self.subsampled and self.preconditioned:
                return saga.loss_and_grads(model, guide, *args, **kwargs)
            return plain.differentiable_loss(model, guide, *args, **kwargs)

        return loss

    def global_gradient(self) -> Tensor | None:
        r"""After the whitening, the last step's gradient of the loss (the negated ELBO) with
        respect to the global guide's whitened location :math:`\mu` and the logarithm of its
        base scale :math:`s` (``(2G,)``); ``None`` before it or without a gradient.

        The gradient of the ELBO in :math:`\mu` is :math:`L_0^\top E_q[\nabla \log p]`: for
        a Gaussian posterior and :math:`L_0 L_0^\top` its covariance, minus the offset of
        q's mean from the posterior's in posterior sds; in :math:`\log s_j`, about
        :math:`1 - s_j^2` (sd ratio 0.9: 0.19). So a window mean of these under 0.1 says the
        globals' moments are within about a tenth of a posterior sd (5% in sd) of the
        ELBO's optimum, which an ELBO score at large N cannot resolve (:class:`~pyroflows.vi.
        PairedMonitor`)."""
        gg = self.guide.global_guide
        if not self.preconditioned or gg is None or gg.loc.grad is None:
            return None
        raw = gg.scale_unconstrained
        if raw.grad is None:
            return None
        s = gg.scale.detach()  # softplus: ds / draw = 1 - exp(-s)
        log_scale = raw.grad * s / -torch.expm1(-s)
        return torch.cat([gg.loc.grad.reshape(-1), log_scale.reshape(-1)])

    def posterior(self) -> NoReturn:
        raise NotImplementedError("an amortized guide has no packed posterior; see log_weights")

    def on_plateau(self) -> bool:
        """At the first plateau, restart the globals in whitened coordinates; returns whether
        the optimiser must start afresh (its moments refer to the old coordinates)."""
        if self.preconditioned or self.guide.global_guide is None:
            return False
        self.guide.precondition_globals()
        self.preconditioned = True
        return True

    def rewhiten(self) -> bool:
        """At a plateau after the whitening: whiten the globals again if those coordinates
        have gone stale (:meth:`whitening_stale`), at most ``MAX_REWHITENINGS`` times a fit;
        VI then restarts the phase (same step size, fresh optimiser)."""
        if not self.preconditioned or self.rewhitenings >= MAX_REWHITENINGS:
            return False
        if not self.whitening_stale():
            return False
        self.guide.precondition_globals()
        self.rewhitenings += 1
        return True

    @torch.no_grad()
    def whitening_stale(self, num_samples: int = 4000) -> bool:
        """Whether the global guide's covariance in its whitened coordinates is off the
        identity by more than a factor ``REWHITEN_SD`` in sd along some direction.

        The first whitening takes the global guide's moments at the first plateau, and at
        large N that guide is still far wider than the posterior: traced at N = 100,000,
        B = 256, its factor was 11x the exact posterior sd in mu and 5x in beta with a
        spurious correlation of 0.88, so in those coordinates the loss's curvature was
        about 100 and SAGA's gradient noise 20x what it is in the posterior's own (per-step
        sd 140 for mu's location, against 6.5 with the exact posterior's). Whitening again
        by the moments the next phase reached puts the coordinates back in scale."""
        eig = torch.linalg.eigvalsh(self._guide_moments(num_samples)[1])
        return bool(eig.max() > REWHITEN_SD**2 or eig.min() < REWHITEN_SD**-2)

    # ------------------------------------------------------------ the globals' check
    def check_globals(self, seed: int) -> dict[str, Any] | None:
        r"""After a fit: estimate the globals' marginal posterior (:meth:`estimate_globals`)
        and, while the global guide is off it (:meth:`GlobalsEstimate.is_off`), move the
        guide onto it (:meth:`move_globals`) and estimate again there, at most
        ``CHECK_ROUNDS`` estimates in all. An estimate made after a move that finds the
        guide on it still moves it onto itself (a small move): it was made nearer the
        posterior than the one before, whose Gaussian was extrapolated from farther away.
        ``None`` when there are no globals or they were never whitened; otherwise what
        :meth:`pyroflows.VI.diagnostics` reports as ``globals_check``:

        * ``offset``: how far the fitted guide's mean was from the first estimate, in
          posterior sds (Mahalanobis), and ``sd_ratio`` its sds over the estimate's
          (smallest, largest over directions);
        * ``moved``: whether the guide was moved; ``rounds``: estimates made;
        * ``remaining``: the last estimate's offset of the guide before that estimate's
          small final move, if any (``None`` when an estimate that found the guide off
          was the last); ``se``: the last estimate's standard error (posterior sds);
        * ``local_draws``: the K draws per member of the importance sampling, and
          ``local_ess`` their mean effective sample size over K (near 1: the local guide is
          a good proposal);
        * ``reason``: why no estimate was made, if none was (the guide is left as it is).
        """
        gg = self.guide.global_guide
        if gg is None or "precond_scale_tril" not in gg._buffers:
            return None
        out: dict[str, Any] = dict(moved=False, rounds=0, local_draws=self.check_local_draws())
        for r in range(CHECK_ROUNDS):
            try:
                if not self._check_round(out, seed + r):
                    break
            except torch.linalg.LinAlgError as err:  # e.g. a degenerate guide covariance
                out["reason"] = f"linear algebra failed: {err}"
                break
        return out

    def _check_round(self, out: dict[str, Any], seed: int) -> bool:
        """One estimate of :meth:`check_globals` (and a move), recorded in ``out``;
        returns whether to go on."""
        estimate = self.estimate_globals(seed)
        if estimate is None:
            out["reason"] = "the estimated curvature was not negative definite"
            return False
        if out["rounds"] == 0:
            out.update(offset=estimate.offset(), sd_ratio=estimate.sd_ratios())
        out.update(rounds=out["rounds"] + 1, se=estimate.mean_se, local_ess=estimate.local_ess,
                   remaining=estimate.offset())  # fmt: skip
        if not estimate.is_off():
            if out["moved"]:  # made nearer the posterior than the last move's
                self.move_globals(estimate.mean, estimate.cov)
            return False
        self.move_globals(estimate.mean, estimate.cov)
        out.update(moved=True, remaining=None)
        return True

    @torch.no_grad()
    def move_globals(self, mean: Tensor, cov: Tensor) -> None:
        """Move the global guide so that its mean and covariance in its whitened coordinates
        become ``mean`` and ``cov``: the affine map ``w -> mean + A (w - m)``, A a ratio of
        Cholesky factors, folded into the preconditioner (the flows and the learnable map
        are untouched, so the guide keeps its shape)."""
        gg = self.guide.global_guide
        q = self._guide_moments()
        a = torch.linalg.cholesky(cov) @ torch.linalg.inv(torch.linalg.cholesky(q[1]))
        loc, tril = gg.precond_loc, gg.precond_scale_tril
        gg.precond_loc.copy_(loc + tril @ (mean - a @ q[0]))
        gg.precond_scale_tril.copy_((tril @ a).tril())

    @torch.no_grad()
    def _guide_moments(self, num_samples: int = 20_000) -> tuple[Tensor, Tensor]:
        """The global guide's mean and covariance in its whitened coordinates (draws)."""
        gg = self.guide.global_guide
        w = self._whiten(gg.get_posterior().sample((num_samples,)))
        return w.mean(0), torch.atleast_2d(torch.cov(w.T))

    def _whiten(self, z: Tensor) -> Tensor:
        gg = self.guide.global_guide
        return torch.linalg.solve_triangular(
            gg.precond_scale_tril, (z - gg.precond_loc).T, upper=False
        ).T

    def check_global_draws(self) -> int:
        """Draws of the global guide per estimate: enough for the regression's G + 1
        coefficients per coordinate (at least ``CHECK_GLOBAL_DRAWS``), or as set."""
        if self.check_draws[0] is not None:
            return self.check_draws[0]
        return max(CHECK_GLOBAL_DRAWS, 4 * (self.guide.global_guide.latent_dim + 1))

    def check_local_draws(self) -> int:
        """Local draws per member and global draw of the check (more at small N), or as
        set."""
        if self.check_draws[1] is not None:
            return self.check_draws[1]
        low, high = CHECK_LOCAL_DRAWS
        budget = CHECK_MEMBER_BUDGET // (self.size * self.check_global_draws())
        return max(low, min(high, budget))

    def estimate_globals(self, seed: int) -> GlobalsEstimate | None:
        r"""A Gaussian estimate of the globals' marginal posterior, in the global guide's
        whitened coordinates :math:`w`.

        At :meth:`check_global_draws` draws :math:`w_s` of the global guide, the marginal score
        :math:`g_s = \nabla_w \log p(\theta(w_s) \mid x)` is estimated
        (:meth:`marginal_score`, jackknifed) and regressed on :math:`w_s`: a Gaussian
        posterior has the score :math:`-\Sigma^{-1}(w - m)`, so the slope gives
        :math:`\Sigma` and the intercept at the guide's mean :math:`\bar w` gives :math:`m
        = \bar w + \Sigma \bar g`. The intercept's standard error (from the residuals: the
        importance sampling's noise plus any departure from a Gaussian) gives ``mean_se``,
        the slope's ``sd_se``. ``None`` when the fitted slope is not negative definite."""
        gg = self.guide.global_guide
        with torch.random.fork_rng(devices=_devices()):
            torch.manual_seed(seed)
            q_mean, q_cov = self._guide_moments()
            with torch.no_grad():
                theta = gg.get_posterior().sample((self.check_global_draws(),))
            score, local_ess = self.marginal_score(theta, self.check_local_draws())
        score = score @ gg.precond_scale_tril
        w = self._whiten(theta)
        x = torch.cat([torch.ones(len(w), 1).to(w), w - q_mean], dim=1)
        xtx_inv = torch.linalg.inv(x.T @ x)
        coef = xtx_inv @ x.T @ score  # (1 + G, G)
        resid = score - x @ coef
        precision = -(coef[1:] + coef[1:].T).double() / 2
        if not bool(torch.linalg.eigvalsh(precision).min() > 0):
            return None
        cov = torch.linalg.inv(precision).to(w)
        mean = q_mean + cov @ coef[0]
        mean_se, sd_se = _standard_errors(resid, xtx_inv, cov, precision.to(w))
        return GlobalsEstimate(mean, cov, q_mean, q_cov, mean_se, local_ess, sd_se)

    def marginal_score(self, theta: Tensor, num_locals: int) -> tuple[Tensor, float]:
        r"""At each unconstrained draw of the globals ``theta`` ``(S, G)``, the gradient of
        :math:`\log p(\theta) + \log|J| + \sum_i \log \frac1K \sum_k w_{ik}(\theta)`, where
        :math:`w_{ik} = p(x_i, z_{ik} \mid \theta) / q(z_{ik} \mid x_i, \theta)` and
        :math:`z_{ik}` is drawn from the local guide (``num_locals`` = K per member and
        draw): the importance-sampled :math:`\sum_i \log p(x_i \mid \theta)`, whose
        gradient tends to the marginal score :math:`\nabla \log p(\theta \mid x)` (Fisher's
        identity) as K grows, for any local guide that covers the posterior. Its bias falls
        like 1 / K but is summed over N members, while the posterior's sd falls like
        :math:`N^{-1/2}` (at N = 100,000 with K = 8 it moved the estimate by 0.25 posterior
        sd, with K = 32 by 0.05), so what is returned ``(S, G)`` is the jackknife
        :math:`2 g_K - g_{K/2}` (the second from the first K / 2 draws; Nowozin 2018), which
        removes the 1 / K term; and the members' mean importance-sampling ESS over K. Passes
        over the plate's members in runs of B (one backward pass each), as many draws of
        ``theta`` at a time as keep draws x K x B under ``CHECK_CHUNK``."""
        per = max(1, CHECK_CHUNK // (num_locals * self.batch))  # draws of theta per pass
        grads, ess, count = [], 0.0, 0
        for start in range(0, len(theta), per):
            grad, more, members = self._score_chunk(theta[start : start + per], num_locals)
            grads.append(grad)
            ess, count = ess + more, count + members
        return torch.cat(grads), ess / count

    def _score_chunk(self, theta: Tensor, k: int) -> tuple[Tensor, float, int]:
        """:meth:`marginal_score` for a few draws ``theta``; with the sum of the members'
        ESS / K and their count."""
        gg = self.guide.global_guide
        s = theta.shape[0]
        leaf = theta.detach().clone().requires_grad_()
        saga = SAGA_ELBO(self.plate, s * k, max_plate_nesting=self.nesting)
        grad, ess, count = torch.zeros_like(leaf), 0.0, 0
        shapes: dict[str, torch.Size] = {}
        for j, (indices, new) in enumerate(self._runs(torch.arange(self.size))):
            values = gg._constrain(leaf)
            with self.guide._use_members(indices):
                if not shapes:  # the pinned values' shapes in a vectorized trace
                    with torch.no_grad():
                        gt = saga._run(self.model, self.guide, self.args, self.kwargs, _Pin())[1]
                    shapes = {n: gt.nodes[n]["value"].shape for n in values}
                pin = _Pin({n: v.repeat_interleave(k, 0).reshape(shapes[n])
                            for n, v in values.items()})  # fmt: skip
                mt, gt = saga._run(self.model, self.guide, self.args, self.kwargs, pin)
            members = saga._members(mt, gt).reshape(s, k, -1)[:, :, new.to(leaf.device)]
            # the jackknife's log-weights' cotangents in one backward pass: 2 x all K - first K / 2
            full = torch.logsumexp(members, 1) - math.log(k)
            half = torch.logsumexp(members[:, : k // 2], 1) - math.log(k // 2)
            total = (2 * full - half).sum()
            if j == 0:  # the globals' prior and the Jacobian of their constraints, once
                total = total + self._prior(mt, values, leaf, s, k)
            grad += torch.autograd.grad(total, leaf)[0]
            with torch.no_grad():  # each member's importance-sampling ESS / K
                w = torch.softmax(members, 1)
                ess += float((1 / (w**2).sum(1)).sum()) / k
                count += members.shape[0] * members.shape[2]
        return grad, ess, count

    def _prior(
        self, trace: poutine.Trace, values: dict[str, Tensor], leaf: Tensor, s: int, k: int
    ) -> Tensor:
        """Sum over the ``s`` draws of the globals of the model's terms outside the plate
        (each draw's value repeated ``k`` times in ``trace``) and of the constraints'
        log-Jacobians at the unconstrained draws ``leaf``: the log prior density (and any
        global likelihood) in unconstrained coordinates."""
        total = leaf.new_zeros(())
        trace.compute_log_prob()
        for site in _outside_sites(trace, self.plate):
            lp = torch.as_tensor(site["log_prob"])
            if lp.numel() % (s * k) == 0:  # else it does not depend on the draws
                total = total + lp.reshape(s, k, -1).sum(-1).mean(1).sum()
        for site in latent_sites(self.guide.global_guide.prototype_trace):
            u = leaf[:, site.start : site.start + site.size].reshape((s, *site.shape))
            total = total + site.transform.log_abs_det_jacobian(u, values[site.name]).sum()
        return total

    # ------------------------------------------------------------ importance weights
    def score_members(self, seed: int) -> Tensor:
        """The members behind an ELBO score: all N, or a seeded random subset of about
        ``SCORE_MEMBERS`` (a whole number of the plate's subsamples)."""
        size = self.batch * math.ceil(SCORE_MEMBERS / self.batch)
        if self.size <= size:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(self.size, generator=g)[:size].sort().values

    def report_draws(self, num_draws: int) -> int:
        """Draws of the report: ``num_draws``, capped so draws x N stays affordable."""
        return min(num_draws, max(MIN_REPORT_DRAWS, REPORT_MEMBER_BUDGET // self.size))

    def _runs(self, members: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``members`` in runs of the plate's subsample size B, as ``(indices (B,), new
        (B,))``: the last run is the last B members, ``new`` marking those not in an earlier
        run (a plate with a fixed ``subsample_size`` takes exactly B members)."""
        b, m = self.batch, len(members)
        if m <= b:
            return [(members, torch.ones(m, dtype=torch.bool))]
        runs = []
        for start in range(0, m, b):
            if start + b <= m:
                runs.append((members[start : start + b], torch.ones(b, dtype=torch.bool)))
            else:
                runs.append((members[-b:], torch.arange(b) >= start + b - m))
        return runs

    @torch.no_grad()
    def log_weights(
        self, n: int, seed: int | None, members: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``n`` guide draws (constrained values ``(n, *site_shape)``, local sites over
        ``members``) and their joint log-weights ``(n,)``: the global sites' terms plus
        N / len(members) times the sum of the members' terms (with all N members, the exact
        joint ``log p - log q``). Each draw's globals are pinned across the runs of B
        members."""
        members = torch.arange(self.size) if members is None else members
        runs = self._runs(members)
        chunk = max(1, MEMBER_CHUNK // len(runs[0][0]))
        draws, log_w = [], []
        with torch.random.fork_rng(devices=_devices()):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, n, chunk):
                values, lw = self._draws(min(chunk, n - start), runs)
                draws.append(values)
                log_w.append(lw)
        values = {name: torch.cat([d[name] for d in draws]) for name in draws[0]}
        return values, torch.cat(log_w)

    def _draws(self, k: int, runs: list[tuple[Tensor, Tensor]]) -> tuple[dict, Tensor]:
        """``k`` vectorized draws over the runs of members: values and log-weights."""
        saga = SAGA_ELBO(self.plate, k, max_plate_nesting=self.nesting)
        pin, values = _Pin(), {}
        local: dict[str, list[Tensor]] = {s.name: [] for s in self.guide._locals}
        outside, inside, count = None, 0.0, 0
        for indices, new in runs:
            with self.guide._use_members(indices):
                mt, gt = saga._run(self.model, self.guide, self.args, self.kwargs, pin)
            if outside is None:  # the first run draws the globals; later runs pin them
                outside = _outside(mt, gt, self.plate)
                names = saga._globals(mt, gt)
                pin = _Pin({name: gt.nodes[name]["value"] for name in names})
                values = {name: self._value(mt, name, k) for name in names}
            members = saga._members(mt, gt)  # (k, B)
            inside = inside + members[:, new.to(members.device)].sum(-1)
            count += int(new.sum())
            keep = new.nonzero().squeeze(-1)
            for name, parts in local.items():
                value = self._value(mt, name, k)
                parts.append(value.index_select(self._plate_dim(name), keep.to(value.device)))
        for name, parts in local.items():
            values[name] = torch.cat(parts, self._plate_dim(name))
        return values, (outside + self.size / count * inside).expand(k)

    def _value(self, trace: poutine.Trace, name: str, k: int) -> Tensor:
        """Site ``name``'s value in a vectorized trace as ``(k, *site_shape)``."""
        value = trace.nodes[name]["value"]
        proto = self.guide.prototype_trace.nodes[name]["value"]
        shape = value.shape[value.dim() - proto.dim() :]
        return value.reshape((-1, *shape)).expand((k, *shape))

    def _plate_dim(self, name: str) -> int:
        """The plate's dim in a local site's (constrained) value (negative)."""
        return self.guide._frame.dim - self.guide.prototype_trace.nodes[name]["fn"].event_dim

    @torch.no_grad()
    def sample(self, n: int) -> dict[str, Tensor]:
        """``n`` draws of every latent site, the local ones for all N members (like MCMC's)."""
        guide = self.guide
        out: dict[str, Tensor] = {}
        theta = None
        if guide.global_guide is not None:
            theta = guide.global_guide.get_posterior().sample((n,))  # (n, G)
            out.update(guide.global_guide._constrain(theta))
        parts: dict[str, list[Tensor]] = {s.name: [] for s in guide._locals}
        for indices, new in self._runs(torch.arange(self.size)):
            features = guide._discover(indices, self.args, self.kwargs)[1]
            keep = new.nonzero().squeeze(-1)
            for name, value in guide._draw_locals(features, theta, n).items():
                dim = self._plate_dim(name)
                parts[name].append(value.index_select(dim, keep.to(value.device)))
        out.update({name: torch.cat(p, self._plate_dim(name)) for name, p in parts.items()})
        return out


def _standard_errors(
    resid: Tensor, xtx_inv: Tensor, cov: Tensor, precision: Tensor
) -> tuple[float, float]:
    """Of :meth:`AmortizedTarget.estimate_globals`' regression (residuals ``(S, G)``, the
    inverse Gram matrix ``(1 + G, 1 + G)``): the standard error of the estimated mean in
    posterior sds along the worst direction (var(mean) = cov var(intercept) cov, whitened by
    cov's Cholesky factor), and the relative standard error of the estimated sds (half the
    precision's, diagonal, worst coordinate)."""
    res_cov = resid.T @ resid / max(1, len(resid) - xtx_inv.shape[0])  # (G, G)
    chol = torch.linalg.cholesky(cov)
    m = chol.T @ (res_cov * xtx_inv[0, 0]) @ chol
    mean_se = float(torch.linalg.eigvalsh((m + m.T) / 2).max().clamp_min(0).sqrt())
    slope_se = (res_cov.diagonal() * xtx_inv.diagonal()[1:]).sqrt()  # (G,)
    return mean_se, float((0.5 * slope_se / precision.diagonal()).max())


def _devices() -> list[int]:
    return list(range(torch.cuda.device_count()))


def _outside(model_trace: poutine.Trace, guide_trace: poutine.Trace, plate: str) -> Tensor:
    """``(k,)`` or ``(1,)``: each draw's log p - log q of the sites outside ``plate``."""
    total: Tensor | float = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in _outside_sites(trace, plate):
            if sign < 0 and site["is_observed"]:
                continue
            lp = torch.as_tensor(site["log_prob"])
            total = total + sign * lp.reshape(lp.shape[0] if lp.dim() else 1, -1).sum(-1)
    return torch.as_tensor(total).reshape(-1)


def _outside_sites(trace: poutine.Trace, plate: str) -> Iterator[dict[str, Any]]:
    """The sample sites of ``trace`` outside ``plate`` (not the subsample sites)."""
    for site in trace.nodes.values():
        if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
            continue
        if not any(f.name == plate for f in site["cond_indep_stack"]):
            yield site


def is_amortized(guide: object) -> bool:
    return isinstance(guide, AutoAmortizedFlowGuide)


__all__ = ["AmortizedTarget", "is_amortized"]
