r"""Variational objectives, in one place: ELBO, sticking the landing, IWAE and DReG.

Every estimator is computed from the same per-particle, per-datum log-densities, which
:func:`trace_log_weights` obtains for any Pyro ``model``/``guide`` pair (and
:class:`pyroflows.VI` for its packed guide) without host syncs:

* ``log_p``: :math:`\log p(x, z_k)` and ``log_q``: :math:`\log q_\phi(z_k \mid x)` at the
  reparameterised draws :math:`z_k = T_\phi(\epsilon_k)`, shape ``(K, *batch)``;
* ``log_q_fixed``: :math:`\log q_\phi(\bar z_k \mid x)` at the *detached* draws
  :math:`\bar z_k` with live parameters, whose gradient is exactly the score term
  :math:`\nabla_\phi \log q_\phi(z)|_{z = z_k}` (STL and DReG subtract it);
* ``log_p_fixed``: :math:`\log p_\theta(x, \bar z_k)`, the model at the detached draws
  (DReG weights model-parameter gradients by :math:`\tilde w_k`, encoder gradients by
  :math:`\tilde w_k^2`).

``*batch`` are the *local* plate dimensions: plates that hold every sample site of model and
guide (the data plate of a VAE). Log-weights then factorise over data points and the
importance-weighted bounds are taken per datum and summed; a model with a global latent has
no local plate and ``*batch`` is empty.

Each objective is a :class:`pyro.infer.ELBO`, so it drops into ``SVI(..., loss=...)`` and
:class:`~pyroflows.Trainer` (``loss=``); :class:`pyroflows.VI` takes the same names
(``loss="stl"``).

Cost of the score term (``log_q_fixed``): the guide is replayed at the detached draws, which
scores each draw through the flow's inverse. Free-ish for Gaussian guides and coupling flows
(NICE, RealNVP, spline: one pass), ``D`` sequential MADE passes for IAF, an iterative solve
for planar, radial and Sylvester; MAF is the reverse of IAF (cheap inverse, ``D``-pass
sampling). The ELBO and IWAE need no extra pass.

References:
    | Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
      Inference (Roeder, Wu & Duvenaud, 2017) https://arxiv.org/abs/1703.09194
    | Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2016)
      https://arxiv.org/abs/1509.00519
    | Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker, Lawson,
      Gu & Maddison, 2019) https://arxiv.org/abs/1810.04152
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO as _PyroELBO
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyroflows._utils import check_positive_int

__all__ = [
    "DReG",
    "ELBO",
    "IWAE",
    "STL",
    "LogWeights",
    "Objective",
    "elbo",
    "get_objective",
    "log_likelihood",
    "log_weights",
    "trace_log_weights",
]

_PARTICLES = "_particles"


# ----------------------------------------------------------------------------- tracing
def site_log_probs(trace: poutine.Trace) -> list[tuple[dict, Tensor]]:
    """``(site, scaled and masked log-density)`` of each sample site of ``trace``."""
    out = []
    for site in prune_subsample_sites(trace).nodes.values():
        if site["type"] != "sample":
            continue
        lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        if site["mask"] is not None:
            lp = lp * site["mask"]
        out.append((site, lp * site["scale"]))
    return out


def _traces(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> tuple[poutine.Trace, poutine.Trace]:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    for name, site in prune_subsample_sites(guide_trace).nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
            raise ValueError(
                f"guide site {name!r} is not reparameterizable ({type(site['fn']).__name__}); "
                "these estimators need rsample: use pyro.infer.Trace_ELBO for score-function "
                "gradients"
            )
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    return model_trace, guide_trace


def _detached(trace: poutine.Trace) -> poutine.Trace:
    """A copy of ``trace`` whose sample values are detached (for replay)."""
    out = trace.copy()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and torch.is_tensor(site["value"]):
            out.nodes[name] = {**site, "value": site["value"].detach()}
    return out


def _vectorized_dims(trace: poutine.Trace) -> dict[int, int]:
    """``{plate dim: size}`` of the vectorised plates of every sample site, for sites that
    have them; used to find the local plates."""
    sizes: dict[int, int] = {}
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for f in site["cond_indep_stack"]:
                if f.vectorized and f.name != _PARTICLES:
                    sizes[f.dim] = f.size
    return sizes


def local_dims(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> dict[int, int]:
    """Plate dims (negative) holding every sample site of both traces, with their sizes.

    Over such a plate the log-weights factorise: each datum has its own latents.
    """
    sizes = {**_vectorized_dims(model_trace), **_vectorized_dims(guide_trace)}
    sites = [
        s
        for tr in (model_trace, guide_trace)
        for s in prune_subsample_sites(tr).nodes.values()
        if s["type"] == "sample"
    ]
    keep = {}
    for dim, size in sizes.items():
        if all(any(f.vectorized and f.dim == dim for f in s["cond_indep_stack"]) for s in sites):
            keep[dim] = size
    return keep


def reduce_to_particles(lp: Tensor, nesting: int, local: dict[int, int]) -> Tensor:
    """Sum a site log-density over every non-local plate dim: ``(K or 1, *local sizes)``.

    ``lp`` has at most ``nesting + 1`` dims (the particle dim at ``-(nesting + 1)``);
    missing leading dims broadcast.
    """
    if lp.dim() > nesting + 1:
        raise ValueError(
            f"a log-density of shape {tuple(lp.shape)} has more batch dims than "
            f"max_plate_nesting = {nesting} allows; pass a larger max_plate_nesting"
        )
    lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + lp.shape)
    other = [i for i in range(1, nesting + 1) if i - nesting - 1 not in local]
    if other:
        lp = lp.sum(other, keepdim=True)
    shape = [lp.shape[0]] + [local.get(i - nesting - 1, 1) for i in range(1, nesting + 1)]
    lp = lp.expand(shape)
    return lp.reshape(lp.shape[0], *(local[d] for d in sorted(local)))


def sum_log_probs(
    trace: poutine.Trace,
    nesting: int,
    local: dict[int, int],
    k: int,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Every site's scaled, masked log-density summed down to ``(k, *local sizes)``
    (the particle plate at dim ``-(nesting + 1)``), accumulated in ``dtype`` if given."""
    total = None
    for _, lp in site_log_probs(trace):
        lp = reduce_to_particles(torch.as_tensor(lp, dtype=dtype), nesting, local)
        total = lp if total is None else total + lp
    if total is None:
        raise ValueError("the trace has no sample sites to score")
    return total.expand(k, *total.shape[1:])


def _has_params(trace: poutine.Trace) -> bool:
    return any(
        site["type"] == "param" and getattr(site["value"], "requires_grad", False)
        for site in trace.nodes.values()
    )


@dataclass(frozen=True)
class LogWeights:
    r"""Per-particle, per-datum log-densities, shape ``(K, *batch)`` each (see module doc)."""

    log_p: Tensor
    log_q: Tensor
    log_q_fixed: Tensor | None = None
    log_p_fixed: Tensor | None = None

    @property
    def log_w(self) -> Tensor:
        """Log importance ratios :math:`\\log p(x, z_k) - \\log q(z_k|x)`."""
        return self.log_p - self.log_q


def _one_pass(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    nesting: int,
    needs: tuple[bool, bool],
) -> LogWeights:
    """Trace ``num_particles`` draws under one particle plate and score them
    (``num_particles=0``: one draw without the plate, for callers that loop)."""
    if num_particles > 0:
        plate = pyro.plate(_PARTICLES, num_particles, dim=-nesting - 1)
        model, guide = plate(model), plate(guide)
    model_trace, guide_trace = _traces(model, guide, args, kwargs)
    local = local_dims(model_trace, guide_trace)
    k = max(num_particles, 1)
    log_p = sum_log_probs(model_trace, nesting, local, k)
    fixed_q, fixed_p = needs
    if not any(site["type"] == "sample" for site in guide_trace.nodes.values()):
        # no latent variables (e.g. a FlowDensity): log q = 0, every weight is log p(x)
        zero = torch.zeros_like(log_p)
        return LogWeights(log_p, zero, zero if fixed_q else None, log_p if fixed_p else None)
    out = {"log_p": log_p, "log_q": sum_log_probs(guide_trace, nesting, local, k)}
    if fixed_q or fixed_p:
        detached = _detached(guide_trace)
    if fixed_q:
        replayed = poutine.trace(poutine.replay(guide, trace=detached)).get_trace(*args, **kwargs)
        out["log_q_fixed"] = sum_log_probs(replayed, nesting, local, k)
    if fixed_p and _has_params(model_trace):
        replayed = poutine.trace(poutine.replay(model, trace=detached)).get_trace(*args, **kwargs)
        out["log_p_fixed"] = sum_log_probs(replayed, nesting, local, k)
    return LogWeights(**out)


def trace_log_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    vectorize_particles: bool = True,
    log_q_fixed: bool = False,
    log_p_fixed: bool = False,
    **kwargs: Any,
) -> LogWeights:
    r"""Score ``num_particles`` draws of ``guide`` under ``model`` and ``guide``.

    Draws are taken in one pass under a particle plate at dim ``-(max_plate_nesting + 1)``
    (``vectorize_particles=True``) or one at a time. ``log_q_fixed`` / ``log_p_fixed`` also
    replay guide / model at the detached draws (``log_p_fixed`` only where the model has
    parameters of its own; otherwise it stays ``None``). Site scales and masks are applied.

    Returns:
        A :class:`LogWeights` of ``(K, *local plate sizes)`` tensors.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(x):
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     pyro.sample("z", dist.Normal(0.5, 1.0))
        >>> trace_log_weights(model, guide, torch.zeros(3), num_particles=4).log_p.shape
        torch.Size([4])
    """
    k = check_positive_int("num_particles", num_particles)
    nesting = _check_nesting(max_plate_nesting)
    needs = (bool(log_q_fixed), bool(log_p_fixed))
    if vectorize_particles:
        return _one_pass(model, guide, args, kwargs, k, nesting, needs)
    parts = [_one_pass(model, guide, args, kwargs, 0, nesting, needs) for _ in range(k)]
    fields = ("log_p", "log_q", "log_q_fixed", "log_p_fixed")
    return LogWeights(
        **{
            f: None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
            for f in fields
        }
    )


def _check_nesting(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_plate_nesting must be a non-negative int; got {value!r}")
    return value


# ---------------------------------------------------------------------------- objectives
class Objective(_PyroELBO):
    r"""Base of the estimators: a :class:`pyro.infer.ELBO` computed from :class:`LogWeights`.

    Subclasses implement :meth:`estimate`, returning the objective's value (a lower bound
    on :math:`\log p(x)`, summed over data points) and a surrogate with the same value whose
    gradient is the estimator's.

    Args:
        num_particles: Draws :math:`K` per estimate.
        max_plate_nesting: Number of the model's vectorised plate dims (the particle plate
            goes to their left). ``None`` guesses it from one trace of model and guide.
        vectorize_particles: Draw the particles in one vectorised pass (the model and guide
            must broadcast over a leading batch dim) instead of one at a time.
    """

    name = "objective"
    needs_log_q_fixed = False
    needs_log_p_fixed = False

    def __init__(
        self,
        num_particles: int = 1,
        *,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = False,
    ) -> None:
        super().__init__(num_particles=check_positive_int("num_particles", num_particles))
        self.max_plate_nesting = (
            None if max_plate_nesting is None else _check_nesting(max_plate_nesting)
        )
        if not isinstance(vectorize_particles, bool):
            raise TypeError(f"vectorize_particles must be a bool; got {vectorize_particles!r}")
        self.vectorize_particles = vectorize_particles

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"

    def estimate(self, w: LogWeights) -> tuple[Tensor, Tensor]:
        """``(value, surrogate)`` from the log-weights; both scalars."""
        raise NotImplementedError

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[poutine.Trace, poutine.Trace]:
        """One ``(model_trace, guide_trace)`` pair (Pyro's ``ELBO`` interface)."""
        return _traces(model, guide, args, kwargs)

    def log_weights(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> LogWeights:
        """The :class:`LogWeights` this objective needs, for ``model``/``guide``."""
        if self.max_plate_nesting is None:
            self.max_plate_nesting = _guess_nesting(model, guide, args, kwargs)
        return trace_log_weights(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            max_plate_nesting=self.max_plate_nesting,
            vectorize_particles=self.vectorize_particles,
            log_q_fixed=self.needs_log_q_fixed,
            log_p_fixed=self.needs_log_p_fixed,
            **kwargs,
        )

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tensor:
        """Negative surrogate: its value is ``-objective``, its gradient the estimator's."""
        return -self.estimate(self.log_weights(model, guide, args, kwargs))[1]

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Negative objective as a float (no gradients)."""
        with torch.no_grad():
            return -float(self.estimate(self.log_weights(model, guide, args, kwargs))[0])

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Backpropagate the negative surrogate (for :class:`pyro.infer.SVI`); return the loss."""
        surrogate = self.differentiable_loss(model, guide, *args, **kwargs)
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return float(surrogate.detach())


def max_plate_nesting(*traces: poutine.Trace) -> int:
    """Number of vectorised plate dims the sample sites of ``traces`` use."""
    return max((-d for tr in traces for d in _vectorized_dims(tr)), default=0)


def _guess_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Deepest vectorised plate of one model/guide trace (without consuming random numbers)."""
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices), poutine.block(), torch.no_grad():
        model_trace, guide_trace = _traces(model, guide, args, kwargs)
    return max_plate_nesting(model_trace, guide_trace)


def _iw_weights(log_w: Tensor) -> Tensor:
    """Self-normalised importance weights over particles (dim 0), detached."""
    return torch.softmax(log_w.detach(), dim=0)


def _iw_bound(log_w: Tensor) -> Tensor:
    return (torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])).sum()


class ELBO(Objective):
    r"""The evidence lower bound :math:`\frac1K \sum_k \log p(x, z_k) - \log q(z_k|x)`.

    The standard reparameterised estimator (Pyro's ``Trace_ELBO`` for reparameterised
    guides); unbiased for the ELBO and its gradient.

    Example:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> ELBO(num_particles=4).loss(model, guide) == 0.0  # q is the posterior
        True
    """

    name = "elbo"

    def estimate(self, w: LogWeights) -> tuple[Tensor, Tensor]:
        value = w.log_w.mean(0).sum()
        return value, value


class STL(Objective):
    r"""Sticking the landing (Roeder et al. 2017): the ELBO with the score term dropped.

    Same value as :class:`ELBO`; the gradient keeps only the path derivative
    :math:`\nabla_z[\log p(x, z) - \log q_\phi(z)]\, \partial z / \partial \phi`, which has
    zero variance when :math:`q` is the posterior. Unbiased (the score term has expectation
    zero); the variance is lower near the optimum, sometimes higher far from it. Costs a
    replay of the guide at the detached draws (see the module doc for the per-flow cost).
    """

    name = "stl"
    needs_log_q_fixed = True

    def estimate(self, w: LogWeights) -> tuple[Tensor, Tensor]:
        value = w.log_w.mean(0).sum()
        score = w.log_q_fixed - w.log_q_fixed.detach()
        return value, value + score.mean(0).sum()


class IWAE(Objective):
    r"""Importance-weighted bound :math:`\log \frac1K \sum_k p(x, z_k) / q(z_k|x)`
    (Burda et al. 2016), per datum of the local plate, summed.

    Tighter than the ELBO for :math:`K > 1` and equal to it for :math:`K = 1`; its
    reparameterised gradient is unbiased for the bound but the encoder's signal-to-noise
    ratio falls as :math:`K` grows (Rainforth et al. 2018): prefer :class:`DReG`. A global
    latent (no local plate) gives one bound for the whole data set.
    """

    name = "iwae"

    def estimate(self, w: LogWeights) -> tuple[Tensor, Tensor]:
        value = _iw_bound(w.log_w)
        return value, value


class DReG(Objective):
    r"""Doubly-reparameterised gradient of the IWAE bound (Tucker et al. 2019).

    Value: the :class:`IWAE` bound. Gradient: :math:`\sum_k \tilde w_k^2 \nabla_\phi^{\rm
    path} \log w_k` for the guide and :math:`\sum_k \tilde w_k \nabla_\theta \log p(x, z_k)`
    for the model's own parameters, :math:`\tilde w` the self-normalised weights. Unbiased
    for the IWAE gradient, with a guide signal-to-noise ratio that grows with :math:`K`.
    Costs a guide replay at the detached draws and, if the model has parameters, a model
    replay.
    """

    name = "dreg"
    needs_log_q_fixed = True
    needs_log_p_fixed = True

    def estimate(self, w: LogWeights) -> tuple[Tensor, Tensor]:
        value = _iw_bound(w.log_w)
        weights = _iw_weights(w.log_w)
        path = w.log_w + w.log_q_fixed  # the score parts of -log q and +log q_fixed cancel
        surrogate = (weights**2 * path).sum()
        if w.log_p_fixed is not None:
            surrogate = surrogate + ((weights - weights**2) * w.log_p_fixed).sum()
        return value, value.detach() + (surrogate - surrogate.detach())


OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (ELBO, STL, IWAE, DReG)}


def get_objective(loss: str | Objective | None, **kwargs: Any) -> Objective:
    """An :class:`Objective` from a name in :data:`OBJECTIVES`, an instance, or ``None``
    (the ELBO); ``kwargs`` go to the constructor of a named one."""
    if loss is None:
        return ELBO(**kwargs)
    if isinstance(loss, Objective):
        return loss
    if isinstance(loss, str) and loss.lower() in OBJECTIVES:
        return OBJECTIVES[loss.lower()](**kwargs)
    names = ", ".join(repr(n) for n in OBJECTIVES)
    raise ValueError(f"loss must be one of {names} or a pyroflows Objective; got {loss!r}")


# ------------------------------------------------------------------------ functions
def elbo(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
    r"""One-sample ELBO :math:`\log p(x, z) - \log q(z|x)`, :math:`z \sim q`, as a tensor.

    Equals ``-pyro.infer.Trace_ELBO().loss(model, guide, ...)`` for a reparameterized guide,
    but returns a differentiable tensor without a host sync, so it can be called every step
    on a GPU. Site scales (``poutine.scale``) and masks are applied.

    Example:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> float(elbo(model, guide))
        0.0
    """
    model_trace, guide_trace = _traces(model, guide, args, kwargs)
    log_p = sum(lp.sum() for _, lp in site_log_probs(model_trace))
    log_q = sum(lp.sum() for _, lp in site_log_probs(guide_trace))
    return torch.as_tensor(log_p - log_q)


def log_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    r"""Log importance weights :math:`\log p(x, z_s) - \log q(z_s|x)`, shape ``(S, *batch)``.

    The ``S`` samples are drawn in one vectorized pass under a particle plate to the left of
    the model's ``max_plate_nesting`` plates; ``*batch`` are the local plates (those holding
    every site, so that the weights factorise per datum; empty for a model with a global
    latent, whose weights are for the whole data set).
    """
    w = trace_log_weights(
        model,
        guide,
        *args,
        num_particles=num_samples,
        max_plate_nesting=max_plate_nesting,
        **kwargs,
    )
    return w.log_w


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    batch_samples: int = 500,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    r"""Importance-sampled :math:`\log p(x) \approx \mathrm{logmeanexp}_s\, \log w_s` per datum.

    :math:`w_s = p(x, z_s) / q(z_s|x)` with :math:`z_s \sim q(z|x)`; ``S = num_samples`` (5000
    in Burda et al. 2016 and van den Berg et al. 2018) drawn in chunks of ``batch_samples`` so
    memory stays bounded. The estimate is a stochastic lower bound that tightens as S grows:
    the :class:`IWAE` bound with ``K = S``.

    Returns:
        Tensor of shape ``*batch`` (the model's local data plate), one estimate per datum;
        a scalar for a model with global latents.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # the exact posterior N(x/2, 1/2)
        ...     with pyro.plate("data", x.shape[0]):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))
        >>> x = torch.tensor([0.0, 1.0])
        >>> lp = log_likelihood(model, guide, x, num_samples=10)
        >>> torch.allclose(lp, dist.Normal(0.0, 2**0.5).log_prob(x))
        True
    """
    num_samples = check_positive_int("num_samples", num_samples)
    batch_samples = check_positive_int("batch_samples", batch_samples)
    total: Tensor | None = None
    for start in range(0, num_samples, batch_samples):
        s = min(batch_samples, num_samples - start)
        lw = log_weights(
            model, guide, *args, num_samples=s, max_plate_nesting=max_plate_nesting, **kwargs
        )
        chunk = torch.logsumexp(lw, dim=0)
        total = chunk if total is None else torch.logaddexp(total, chunk)
    return total - math.log(num_samples)
