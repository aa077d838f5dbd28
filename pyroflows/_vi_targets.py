r"""What :class:`pyroflows.VI` optimises for each kind of guide.

A *target* exposes one guide as a distribution over the packed unconstrained latent vector
(the layout of :class:`~pyroflows._potential.LogDensity`), the tensors to optimise, a way to
start it at a Laplace approximation in whitened coordinates, and snapshots of its state:

* :class:`FlowTarget` -- :class:`~pyroflows.AutoFlowGuide`: natively preconditioned
  (:meth:`~pyroflows.AutoFlowGuide.precondition`), so the guide keeps the whitening.
* :class:`GaussianTarget` -- ``AutoNormal``, ``AutoDiagonalNormal``,
  ``AutoMultivariateNormal``: optimised as :math:`\mu = c + L_0 m`, :math:`L = L_0 T` and
  written back into the guide's own parameters, so the guide stays a plain Pyro guide.
* :class:`NativeTarget` -- any other ``AutoContinuous`` guide, optimised as it is.
"""

from __future__ import annotations

import copy
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch import Tensor, nn

from pyroflows._mode import LowRankFactor
from pyroflows.guides import _PRECOND_BUFFERS, AutoFlowGuide, _set_constrained


class Target:
    """Base: a guide seen as a distribution over packed unconstrained latents."""

    whitened = False

    def __init__(self, guide: Any, args: tuple, kwargs: dict) -> None:
        self.guide, self.args, self.kwargs = guide, args, kwargs

    def posterior(self) -> dist.Distribution:
        return self.guide.get_posterior(*self.args, **self.kwargs)

    def module(self) -> nn.Module:
        return self.guide

    def params(self) -> list[Tensor]:
        return [p for p in self.module().parameters() if p.requires_grad]

    def state(self) -> dict[str, Any]:
        """A copy of the module's ``state_dict`` (tensors cloned, any non-tensor extra state
        deep-copied)."""
        return {
            k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in self.module().state_dict().items()
        }

    def load(self, state: dict[str, Tensor]) -> None:
        self.module().load_state_dict(state)

    def start(self, center: Tensor | None, factor: Tensor | None, hessian: Tensor | None) -> bool:
        """Start at ``N(center, factor factorᵀ)`` in whitened coordinates, if supported.

        ``factor`` is lower triangular ``(D, D)`` (the Laplace factor), a diagonal ``(D,)`` or
        a :class:`~pyroflows._mode.LowRankFactor` (from the L-BFGS history);
        ``hessian`` is the potential's Hessian at ``center`` where known. Returns whether
        the guide now works in whitened coordinates.
        """
        return False

    def finish(self) -> None:
        """Leave the fitted state in the user's guide."""

    def on_plateau(self) -> bool:
        """Called at each plateau of the stopping rule; returns whether the target changed
        coordinates (the optimiser must then start afresh)."""
        return False

    def rewhiten(self) -> bool:
        """Called at each plateau before :meth:`on_plateau`: whether the target moved to new
        coordinates that restart the phase (same step size, a fresh optimiser, the
        stopping rule and any iterate average started again)."""
        return False

    def check_globals(self, seed: int) -> dict[str, Any] | None:
        """After the fit: check (and where needed correct) what the ELBO's optimum cannot
        get right, returning what :meth:`pyroflows.VI.diagnostics` reports as
        ``globals_check``; ``None``: nothing to check (see
        :meth:`pyroflows._vi_amortized.AmortizedTarget.check_globals`)."""
        return None


class NativeTarget(Target):
    """Any ``AutoContinuous`` guide: optimised in its own parameterisation."""

    def start(self, center: Tensor | None, factor: Tensor | None, hessian: Tensor | None) -> bool:
        loc = getattr(self.guide, "loc", None)
        if center is not None and isinstance(loc, Tensor) and loc.shape == center.shape:
            with torch.no_grad():
                loc.copy_(center)
        return False


class FlowTarget(Target):
    """:class:`~pyroflows.AutoFlowGuide`, preconditioned natively."""

    whitened = True

    def posterior(self) -> dist.Distribution:
        return self.guide.get_posterior()

    def load(self, state: dict[str, Tensor]) -> None:
        for name in _PRECOND_BUFFERS:  # a state from before precondition (or another kind)
            if name not in state:
                self.guide._buffers.pop(name, None)
        self.guide.load_state_dict(state)

    def start(self, center: Tensor | None, factor: Tensor | None, hessian: Tensor | None) -> bool:
        if center is None:
            return False
        if factor is None:  # a mode without a Laplace factor: centre the guide there
            with torch.no_grad():
                self.guide.loc.copy_(center)
            return False
        if isinstance(factor, Tensor) and factor.dim() == 1:
            factor = torch.diag(factor)
        self.guide.precondition(center, factor)
        _cancel_flow_init(self.guide)
        return True


@torch.no_grad()
def _cancel_flow_init(guide: AutoFlowGuide, num_samples: int = 4096) -> None:
    """Rescale the learnable affine map so that it undoes a flow stack's initial map.

    Flows that do not start exactly at the identity (e.g. the gated IAF, a contraction at
    initialisation) would otherwise make the untrained guide narrower than the Laplace
    approximation; matching the first two moments of ``flows(ε)`` restores it.
    """
    eps = guide.get_base_dist().sample((num_samples,))
    y = guide.flows(eps)
    if float((y - eps).abs().max()) < 1e-6:
        return
    mean, sd = y.mean(0), y.std(0).clamp_min(1e-6)
    guide.loc.copy_(-mean / sd)
    _set_constrained(guide, "scale", 1.0 / sd)


class GaussianTarget(Target, nn.Module):
    r"""A Gaussian guide optimised in whitened coordinates, then written back.

    :math:`z = c + L_0 (m + T \epsilon)`, where :math:`T` is diagonal for mean-field guides
    (whose :math:`L_0` is diagonal too) and lower triangular for ``AutoMultivariateNormal``.
    """

    whitened = True

    def __init__(self, guide: Any, args: tuple, kwargs: dict) -> None:
        nn.Module.__init__(self)
        Target.__init__(self, guide, args, kwargs)
        self.full = isinstance(guide, AutoMultivariateNormal)
        loc, scale = _gaussian_params(guide)
        scale = scale.detach()
        self.register_buffer("center", loc.detach().clone())
        self.register_buffer("factor", torch.diag(scale) if self.full else scale.clone())
        self.m = nn.Parameter(torch.zeros_like(loc))
        self.t_raw = nn.Parameter(_softplus_inv(torch.ones_like(loc)))
        if self.full:
            self.tril_raw = nn.Parameter(torch.zeros(len(loc), len(loc)).to(loc))

    def module(self) -> nn.Module:
        return self

    def start(self, center: Tensor | None, factor: Tensor | None, hessian: Tensor | None) -> bool:
        if center is None or factor is None:
            return False
        if isinstance(factor, LowRankFactor):  # dense for a full guide (it is D x D anyway)
            full = torch.linalg.cholesky(factor.covariance()) if self.full else None
            factor = full if self.full else factor.precision_diagonal().rsqrt()
        with torch.no_grad():
            self.center.copy_(center)
            if self.full:
                self.factor.copy_(factor if factor.dim() == 2 else torch.diag(factor))
            elif hessian is not None:  # the KL-optimal mean-field scales of N(c, H^-1)
                self.factor.copy_(hessian.diagonal().rsqrt())
            else:
                self.factor.copy_(factor if factor.dim() == 1 else factor.diagonal())
            self.m.zero_()
            self.t_raw.copy_(_softplus_inv(torch.ones_like(self.m)))
            if self.full:
                self.tril_raw.zero_()
        return True

    def _loc_tril(self) -> tuple[Tensor, Tensor]:
        t = nn.functional.softplus(self.t_raw)
        if not self.full:
            return self.center + self.factor * self.m, self.factor * t
        inner = torch.tril(self.tril_raw, -1) + torch.diag(t)
        return self.center + self.factor @ self.m, self.factor @ inner

    def posterior(self) -> dist.Distribution:
        loc, scale = self._loc_tril()
        if self.full:
            return dist.MultivariateNormal(loc, scale_tril=scale)
        return dist.Normal(loc, scale).to_event(1)

    @torch.no_grad()
    def finish(self) -> None:
        loc, scale = self._loc_tril()
        _set_gaussian_params(self.guide, loc, scale)


def _softplus_inv(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def _gaussian_params(guide: Any) -> tuple[Tensor, Tensor]:
    """Packed ``(loc, scale)`` of a Gaussian autoguide (``scale`` diagonal)."""
    if isinstance(guide, AutoNormal):
        pairs = [guide._get_loc_and_scale(name) for name in _site_names(guide)]
        return torch.cat([p[0].reshape(-1) for p in pairs]), torch.cat(
            [p[1].reshape(-1) for p in pairs]
        )
    return guide.loc, guide.scale


def _site_names(guide: Any) -> list[str]:
    return [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]


def _set_gaussian_params(guide: Any, loc: Tensor, scale: Tensor) -> None:
    """Write a packed loc and (diagonal or lower-Cholesky) scale into the guide, in place."""
    if isinstance(guide, AutoNormal):
        pos = 0
        for name in _site_names(guide):
            old_loc, old_scale = guide._get_loc_and_scale(name)
            n = old_loc.numel()
            _set_deep(guide.locs, name, loc[pos : pos + n].reshape(old_loc.shape))
            _set_deep(guide.scales, name, scale[pos : pos + n].reshape(old_scale.shape))
            pos += n
        return
    guide.loc.data.copy_(loc)
    if isinstance(guide, AutoMultivariateNormal):
        diag = scale.diagonal()
        _set_constrained(guide, "scale", diag)
        _set_constrained(guide, "scale_tril", scale / diag[:, None])
    else:
        _set_constrained(guide, "scale", scale)


def _set_deep(module: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    if leaf in getattr(module, "_pyro_params", {}):
        _set_constrained(module, leaf, value)
    else:
        getattr(module, leaf).data.copy_(value)


def make_target(guide: Any, args: tuple, kwargs: dict) -> Target:
    """The :class:`Target` for ``guide``; ``TypeError`` for guides VI cannot fit."""
    if isinstance(guide, AutoFlowGuide):
        return FlowTarget(guide, args, kwargs)
    if isinstance(guide, (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal)):
        return GaussianTarget(guide, args, kwargs)
    if isinstance(guide, AutoContinuous):
        return NativeTarget(guide, args, kwargs)
    raise TypeError(
        "VI fits AutoFlowGuide, AutoNormal and any pyro AutoContinuous guide "
        f"(AutoMultivariateNormal, AutoDiagonalNormal, AutoIAFNormal, ...); got "
        f"{type(guide).__name__}. For other guides use pyro.infer.SVI."
    )


__all__ = ["FlowTarget", "GaussianTarget", "NativeTarget", "Target", "make_target"]
