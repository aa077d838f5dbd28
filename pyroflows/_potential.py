"""The model's log-density of a packed unconstrained latent vector, vectorised over draws.

:class:`LogDensity` is what :mod:`pyroflows.vi` optimises and differentiates: for
:math:`z \\in \\mathbb{R}^D` (every latent site mapped to unconstrained space with
``biject_to`` and concatenated, in the guide's site order) it returns
:math:`\\log p(x, T(z)) + \\log |\\det J_T(z)|`, the negative of the potential that NUTS uses.
Models written for a single draw are vectorised over a batch of ``z`` with
``torch.func.vmap`` (checked once against one-draw scoring), else scored in a loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import Transform, biject_to


@dataclass(frozen=True)
class Site:
    """One latent site: its unconstrained shape and position in the packed vector."""

    name: str
    transform: Transform  # unconstrained -> support
    shape: torch.Size  # unconstrained shape
    start: int
    size: int


def latent_sites(trace: Trace) -> list[Site]:
    """The latent sites of a prototype trace, in order, with their packed positions."""
    sites, pos = [], 0
    for name, node in trace.iter_stochastic_nodes():
        transform = biject_to(node["fn"].support)
        shape = transform.inv(node["value"]).shape
        size = math.prod(shape)
        sites.append(Site(name, transform, shape, pos, size))
        pos += size
    return sites


class LogDensity:
    """``z (*batch, D) -> log p(x, T(z)) + log|det J_T(z)|`` for a Pyro model.

    Args:
        model: The Pyro model.
        trace: A prototype trace of the model (or of an autoguide's ``prototype_trace``) that
            fixes the latent sites, their supports and shapes.
        args: Positional arguments of the model.
        kwargs: Keyword arguments of the model.
    """

    def __init__(self, model: Callable, trace: Trace, args: tuple, kwargs: dict) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self.sites = latent_sites(trace)
        self.dim = sum(s.size for s in self.sites)
        self.method: str | None = None  # "vmap" or "loop", chosen on the first batched call
        self.evaluations = 0  # number of single-draw log-density evaluations so far

    def unpack(self, z: Tensor) -> dict[str, Tensor]:
        """Constrained site values ``(*batch, *site_shape)`` of a packed latent ``(*batch, D)``."""
        batch = z.shape[:-1]
        out = {}
        for s in self.sites:
            value = z[..., s.start : s.start + s.size].reshape(batch + s.shape)
            out[s.name] = s.transform(value)
        return out

    def pack(self, values: dict[str, Tensor]) -> Tensor:
        """The packed unconstrained vector ``(D,)`` of one set of constrained site values."""
        parts = [s.transform.inv(values[s.name]).reshape(-1) for s in self.sites]
        return torch.cat(parts)

    def single(self, z: Tensor) -> Tensor:
        """Log-density of one packed latent ``(D,)``: a scalar tensor."""
        values, log_jac = {}, z.new_zeros(())
        for s in self.sites:
            u = z[s.start : s.start + s.size].reshape(s.shape)
            x = s.transform(u)
            values[s.name] = x
            log_jac = log_jac + s.transform.log_abs_det_jacobian(u, x).sum()
        conditioned = poutine.condition(self.model, data=values)
        trace = poutine.trace(conditioned).get_trace(*self.args, **self.kwargs)
        return prune_subsample_sites(trace).log_prob_sum() + log_jac

    def __call__(self, z: Tensor) -> Tensor:
        """Log-density of a batch of packed latents ``(*batch, D)`` -> ``(*batch,)``."""
        if z.dim() == 1:
            self.evaluations += 1
            return self.single(z)
        flat = z.reshape(-1, z.shape[-1])
        self.evaluations += flat.shape[0]
        if self.method is None:
            self.method = self._choose(flat)
        if self.method == "vmap":
            with pyro.validation_enabled(False):
                out = torch.func.vmap(self.single)(flat)
        else:
            out = torch.stack([self.single(zi) for zi in flat])
        return out.reshape(z.shape[:-1])

    def _choose(self, flat: Tensor) -> str:
        """``"vmap"`` if it runs and matches one-draw scoring at two points, else ``"loop"``."""
        probe = flat.detach()[[0, -1]]
        try:
            with torch.no_grad(), pyro.validation_enabled(False):
                batched = torch.func.vmap(self.single)(probe)
        except Exception:  # models that vmap cannot trace (data-dependent control flow, ...)
            return "loop"
        with torch.no_grad():
            single = torch.stack([self.single(zi) for zi in probe])
        same = torch.isclose(batched, single, rtol=1e-5, atol=1e-6) | (
            ~torch.isfinite(single) & ~torch.isfinite(batched)
        )
        return "vmap" if bool(same.all()) else "loop"


def prototype_trace(model: Callable, guide: Any, args: tuple, kwargs: dict) -> Trace:
    """The prototype trace of an autoguide, set up (once) from the model's arguments.

    A guide that is set up here has no parameters yet, so any entry of Pyro's global param
    store under its name (``"AutoFlowGuide.loc"``, ...) is a leftover of an earlier guide with
    the same name; such entries are removed first, since ``PyroModule`` would otherwise
    replace the new guide's parameters by them (wrong values, or wrong shapes).
    """
    if getattr(guide, "prototype_trace", None) is None:
        store = pyro.get_param_store()
        prefix = getattr(guide, "_pyro_name", None)
        if prefix:
            for name in [n for n in store.keys() if n.startswith(prefix + ".")]:
                del store[name]
        with torch.no_grad(), poutine.block():
            guide(*args, **kwargs)
    return guide.prototype_trace
