"""Independent draws from a Pyro guide, scored under the guide and the model.

Used by :mod:`pyroflows.diagnostics`. Three strategies, fastest first, each checked against
one-draw-at-a-time scoring of the first and last draw before it is trusted:

1. ``plate``: guide and model run once under an outer batch plate (Pyro's
   ``vectorize_particles`` idea); needs a model and guide written for batched particles.
2. ``vmap``: the guide under the batch plate (autoguides support it) or in a loop, then the
   model's log-density ``torch.func.vmap``-ed over the draws; works for most models written
   for a single draw (e.g. the posteriordb translations), with validation off inside vmap.
3. ``loop``: one guide and model trace per draw; always works, slowest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyroflows.objectives import max_plate_nesting, sum_log_probs

_DRAW_PLATE = "_pyroflows_draws"


@dataclass
class Layout:
    """Shape of one posterior site per draw, with ArviZ dims (plates named) and coords."""

    shape: tuple[int, ...]
    dims: list[str]
    coords: dict[str, np.ndarray]


@dataclass
class Draws:
    """``num_samples`` draws: constrained site values and their log-densities."""

    values: dict[str, np.ndarray]  # site -> (S, *shape)
    log_joint: np.ndarray  # (S,) log p(x, z)
    log_q: np.ndarray  # (S,) log q(z)
    method: str  # how the guide and the model were evaluated
    layouts: dict[str, Layout]
    point_masses: list[str]  # latent sites equal in every draw (e.g. AutoDelta's)


def _trace_pair(
    guide: Callable, model: Callable, args: tuple, kwargs: dict
) -> tuple[Trace, Trace]:
    guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    return prune_subsample_sites(guide_tr), prune_subsample_sites(model_tr)


def _layout(name: str, site: dict) -> Layout:
    """Name batch dims after their plates; drop broadcast size-1 dims outside any plate."""
    value = site["value"]
    n_batch = value.dim() - site["fn"].event_dim
    frames = {f.dim: f for f in site["cond_indep_stack"] if f.vectorized}
    shape, dims, coords, k = [], [], {}, 0
    for i, size in enumerate(value.shape):
        frame = frames.get(i - n_batch) if i < n_batch else None
        if frame is not None:
            shape.append(size)
            dims.append(frame.name)
            coords[frame.name] = np.arange(size)
        elif size != 1 or i >= n_batch:
            shape.append(size)
            dims.append(f"{name}_dim_{k}")
            k += 1
    return Layout(tuple(shape), dims, coords)


def _batched(value: Tensor, n: int, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """A value drawn under the batch plate as ``(n, *shape)``."""
    if value.numel() == n * math.prod(shape):
        return value.reshape(n, *shape)
    if value.numel() == math.prod(shape):  # does not depend on the draw
        return value.reshape(shape).expand(n, *shape)
    raise ValueError(f"cannot read {n} draws of shape {tuple(shape)} from {tuple(value.shape)}")


def _log_prob(trace: Trace) -> float:
    return float(prune_subsample_sites(trace).log_prob_sum())


def _per_draw(trace: Trace, n: int, nesting: int) -> np.ndarray:
    """Sum every site's log-density down to the draw plate at dim ``-(nesting + 1)``."""
    return sum_log_probs(trace, nesting, {}, n, dtype=torch.float64).cpu().numpy()


class Sampler:
    """Draws from ``guide`` scored under ``guide`` and ``model`` (see the module docstring)."""

    def __init__(self, guide: Callable, model: Callable, args: tuple, kwargs: dict) -> None:
        self.guide, self.model, self.args, self.kwargs = guide, model, args, kwargs
        with torch.no_grad():
            self.guide_proto, model_proto = _trace_pair(guide, model, args, kwargs)
        self.nesting = max_plate_nesting(self.guide_proto, model_proto)
        self.sites = [
            name
            for name, site in model_proto.nodes.items()
            if site["type"] == "sample"
            and (not site["is_observed"] or site["infer"].get("_deterministic", False))
        ]
        self.latents = [s for s in self.sites if not model_proto.nodes[s]["is_observed"]]
        missing = [s for s in self.latents if s not in self.guide_proto.nodes]
        if missing:
            raise ValueError(f"the guide does not sample the model's latent sites {missing}")
        self.shapes = {s: model_proto.nodes[s]["value"].shape for s in self.sites}
        self.layouts = {s: _layout(s, model_proto.nodes[s]) for s in self.sites}
        self.guide_sites = [
            name
            for name, site in self.guide_proto.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
        ]

    def draw(self, n: int, vectorize: bool | None) -> Draws:
        """``n`` draws: plate-vectorised, else vmap, else loops (``vectorize`` as documented)."""
        with torch.no_grad():
            if vectorize is False:
                gvals, log_q = self._guide_loop(n)
                z = {s: gvals[s] for s in self.latents}
                return self._finish(gvals, log_q, *self._model_loop(n, z), "loop")
            try:
                return self._plate(n)
            except Exception:
                if vectorize:
                    raise
            try:
                gvals, log_q = self._guide_plate(n)
                how = "guide: plate"
            except Exception:
                gvals, log_q = self._guide_loop(n)
                how = "guide: loop"
            z = {s: gvals[s] for s in self.latents}
            try:
                values, log_p = self._model_vmap(n, z)
                return self._finish(gvals, log_q, values, log_p, how + ", model: vmap")
            except Exception:
                return self._finish(gvals, log_q, *self._model_loop(n, z), how + ", model: loop")

    def _finish(
        self, gvals: dict, log_q: np.ndarray, values: dict, log_p: np.ndarray, method: str
    ) -> Draws:
        del gvals
        out = {s: values[s].reshape(-1, *self.layouts[s].shape).cpu().numpy() for s in self.sites}
        n = len(log_p)
        point = [s for s in self.latents if n > 1 and (out[s] == out[s][:1]).all()]
        return Draws(out, log_p, log_q, method, self.layouts, point)

    def _in_plate(self, fn: Callable, n: int) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with pyro.plate(_DRAW_PLATE, n, dim=-self.nesting - 1):
                return fn(*args, **kwargs)

        return wrapped

    def _plate(self, n: int) -> Draws:
        guide_tr, model_tr = _trace_pair(
            self._in_plate(self.guide, n), self._in_plate(self.model, n), self.args, self.kwargs
        )
        gvals = {
            s: _batched(guide_tr.nodes[s]["value"], n, self._gshape(s)) for s in self.guide_sites
        }
        values = {s: _batched(model_tr.nodes[s]["value"], n, self.shapes[s]) for s in self.sites}
        log_q = _per_draw(guide_tr, n, self.nesting)
        log_p = _per_draw(model_tr, n, self.nesting)
        self._check(gvals, log_q, {s: values[s] for s in self.latents}, log_p)
        return self._finish(gvals, log_q, values, log_p, "plate")

    def _gshape(self, site: str) -> torch.Size:
        return self.guide_proto.nodes[site]["value"].shape

    def _guide_plate(self, n: int) -> tuple[dict[str, Tensor], np.ndarray]:
        tr = prune_subsample_sites(
            poutine.trace(self._in_plate(self.guide, n)).get_trace(*self.args, **self.kwargs)
        )
        gvals = {s: _batched(tr.nodes[s]["value"], n, self._gshape(s)) for s in self.guide_sites}
        log_q = _per_draw(tr, n, self.nesting)
        self._check(gvals, log_q, None, None)
        return gvals, log_q

    def _guide_loop(self, n: int) -> tuple[dict[str, Tensor], np.ndarray]:
        traces = [
            prune_subsample_sites(poutine.trace(self.guide).get_trace(*self.args, **self.kwargs))
            for _ in range(n)
        ]
        gvals = {s: torch.stack([tr.nodes[s]["value"] for tr in traces]) for s in self.guide_sites}
        return gvals, np.array([float(tr.log_prob_sum()) for tr in traces])

    def _score_model(self, z: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        conditioned = poutine.condition(self.model, data=z)
        tr = prune_subsample_sites(poutine.trace(conditioned).get_trace(*self.args, **self.kwargs))
        return tr.log_prob_sum(), {s: tr.nodes[s]["value"] for s in self.sites}

    def _model_vmap(self, n: int, z: dict[str, Tensor]) -> tuple[dict[str, Tensor], np.ndarray]:
        with pyro.validation_enabled(False):
            log_p, values = torch.func.vmap(self._score_model)(z)
        values = {s: _batched(v, n, self.shapes[s]) for s, v in values.items()}
        log_p = log_p.double().cpu().numpy()
        self._check(None, None, z, log_p)
        return values, log_p

    def _model_loop(self, n: int, z: dict[str, Tensor]) -> tuple[dict[str, Tensor], np.ndarray]:
        scored = [self._score_model({s: v[i] for s, v in z.items()}) for i in range(n)]
        values = {s: torch.stack([vals[s] for _, vals in scored]) for s in self.sites}
        return values, np.array([float(lp) for lp, _ in scored])

    def _check(
        self,
        gvals: dict[str, Tensor] | None,
        log_q: np.ndarray | None,
        z: dict[str, Tensor] | None,
        log_p: np.ndarray | None,
    ) -> None:
        """Re-score the first and last draw one at a time; raise if a batched value differs.

        Catches models and guides that run under a batch plate or vmap but broadcast wrongly.
        """
        n = len(log_q if log_q is not None else log_p)
        for i in (0, n - 1):
            if gvals is not None and log_q is not None:
                cond = poutine.condition(self.guide, data={s: v[i] for s, v in gvals.items()})
                want = _log_prob(poutine.trace(cond).get_trace(*self.args, **self.kwargs))
                _assert_close("log q", float(log_q[i]), want)
            if z is not None and log_p is not None:
                want = float(self._score_model({s: v[i] for s, v in z.items()})[0])
                _assert_close("log p", float(log_p[i]), want)


def _assert_close(what: str, got: float, want: float) -> None:
    if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-3) and not (got == want):
        raise ValueError(f"batched {what} = {got} but one-draw {what} = {want}")
