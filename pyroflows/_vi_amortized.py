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
  factor 2 (:meth:`AmortizedTarget.whitening_stale`), and the phase starts over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NoReturn

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

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
        gg = self.guide.global_guide
        z = gg.get_posterior().sample((num_samples,))  # (S, G), unconstrained
        w = torch.linalg.solve_triangular(
            gg.precond_scale_tril, (z - gg.precond_loc).T, upper=False
        )
        eig = torch.linalg.eigvalsh(torch.atleast_2d(torch.cov(w)))
        return bool(eig.max() > REWHITEN_SD**2 or eig.min() < REWHITEN_SD**-2)

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


def _devices() -> list[int]:
    return list(range(torch.cuda.device_count()))


def _outside(model_trace: poutine.Trace, guide_trace: poutine.Trace, plate: str) -> Tensor:
    """``(k,)`` or ``(1,)``: each draw's log p - log q of the sites outside ``plate``."""
    total: Tensor | float = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            if sign < 0 and site["is_observed"]:
                continue
            if any(f.name == plate for f in site["cond_indep_stack"]):
                continue
            lp = torch.as_tensor(site["log_prob"])
            total = total + sign * lp.reshape(lp.shape[0] if lp.dim() else 1, -1).sum(-1)
    return torch.as_tensor(total).reshape(-1)


def is_amortized(guide: object) -> bool:
    return isinstance(guide, AutoAmortizedFlowGuide)


__all__ = ["AmortizedTarget", "is_amortized"]
