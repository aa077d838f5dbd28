"""Small pure helpers shared across pyroflows: validation, hypernetworks and root finding."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive ``int``; otherwise raise a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def check_hidden_dims(hidden_dims: Sequence[int] | None, default: list[int]) -> list[int]:
    """Validate a hypernetwork's ``hidden_dims``; ``None`` means ``default``, ``[]`` linear."""
    if hidden_dims is None:
        return list(default)
    if isinstance(hidden_dims, (int, str)) or not isinstance(hidden_dims, Sequence):
        raise TypeError(f"hidden_dims must be a sequence of ints or None; got {hidden_dims!r}")
    for h in hidden_dims:
        check_positive_int("every entry of hidden_dims", h)
    return list(hidden_dims)


def hypernet(
    context_dim: int, hidden_dims: Sequence[int], param_dims: Sequence[int]
) -> nn.Sequential:
    """An MLP from a context vector to the concatenated raw parameters of a flow.

    ``hidden_dims=[]`` gives a single linear map (the amortization of the flow papers). The
    last layer's weight is scaled down by 1e-2 so a fresh conditional flow starts near its
    identity parameters, which the caller writes into the last bias.
    """
    dims = [context_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    last = nn.Linear(dims[-1], sum(param_dims))
    with torch.no_grad():
        last.weight.mul_(1e-2)
        last.bias.zero_()
    layers.append(last)
    return nn.Sequential(*layers)


def split_params(out: Tensor, param_dims: Sequence[int]) -> tuple[Tensor, ...]:
    """Split a hypernetwork output ``(*batch, sum(param_dims))`` into its raw parameters."""
    return tuple(torch.split(out, list(param_dims), dim=-1))


def check_context(context: Tensor, context_dim: int) -> None:
    """Raise a ``ValueError`` unless ``context`` is a tensor ending in ``context_dim``."""
    if not isinstance(context, Tensor):
        raise TypeError(f"context must be a torch.Tensor; got {type(context).__name__}")
    if context.dim() < 1 or context.shape[-1] != context_dim:
        raise ValueError(
            f"context must have shape (*batch, {context_dim}); got {tuple(context.shape)}"
        )


def monotone_root(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    lo: Tensor,
    hi: Tensor,
    max_iter: int = 200,
) -> Tensor:
    """Solve ``f(s) = target`` elementwise for a non-decreasing scalar ``f`` on ``[lo, hi]``.

    Vectorized safeguarded Newton (Press et al., Numerical Recipes, ``rtsafe``): a Newton
    step is taken when it stays inside the current bracket, otherwise the bracket is bisected,
    so the iteration converges even where ``f' = 0``. ``fn(s)`` returns ``(f(s), f'(s))``.
    Stops when every residual is at float tolerance or the bracket has collapsed.
    """
    lo, hi = torch.broadcast_tensors(lo, hi)
    lo, hi = lo.clone(), hi.clone()
    s = 0.5 * (lo + hi)
    tol = torch.finfo(s.dtype).eps
    for _ in range(max_iter):
        f, df = fn(s)
        r = f - target
        scale = 1.0 + target.abs() + s.abs()
        done = (r.abs() <= 4 * tol * scale) | (hi - lo <= 4 * tol * scale)
        if bool(done.all()):
            break
        hi = torch.where(r > 0, s, hi)
        lo = torch.where(r > 0, lo, s)
        newton = s - r / df.clamp_min(torch.finfo(s.dtype).tiny)
        ok = (df > 0) & (newton > lo) & (newton < hi)
        # converged entries stay put: their Newton step is not strictly inside the bracket
        s = torch.where(done, s, torch.where(ok, newton, 0.5 * (lo + hi)))
    return s


_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)


T = TypeVar("T")

_CONSTANT_CACHES: list[functools._lru_cache_wrapper] = []


def clear_constant_caches() -> None:
    """Empty every :func:`cached_constant` cache (they rebuild on the next call)."""
    for cache in _CONSTANT_CACHES:
        cache.cache_clear()


def cached_constant(factory: Callable[..., T]) -> Callable[..., T]:
    """Memoise a factory of constant tensors or tuples of them (keyed by its hashable
    arguments, e.g. sizes, dtype and device), so hot paths do not rebuild them per call.
    While ``torch.compile`` traces, the factory is called directly (the graph then holds
    the constant).

    Constants are built outside inference mode even when first asked for inside
    ``torch.inference_mode()``: an inference tensor could not be saved for backward by a
    later call that records a graph."""

    def build(*args: object) -> T:
        with torch.inference_mode(False):
            return factory(*args)

    cached = functools.lru_cache(maxsize=64)(build)
    _CONSTANT_CACHES.append(cached)

    @functools.wraps(factory)
    def get(*args: object) -> T:
        return factory(*args) if _is_compiling() else cached(*args)

    return get
