"""Shared machinery: forward and log-det computed together, cached only for the same (x, y)
and the same parameters; family metadata (permutations, identity start)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

ForwardFn = Callable[..., tuple[Tensor, Tensor]]
InverseFn = Callable[..., Tensor]


def _param_versions(module: object) -> tuple:
    """Grad mode and the in-place version counters of ``module``'s parameters (cache key).

    The flat tuple of parameters is collected once per module (walking ``parameters()``
    costs ~8 us per call) and dropped by ``_apply`` (``.to()``, ``.double()``) and on copy;
    in-place updates, which is what optimizers and ``load_state_dict`` do, bump versions.
    """
    if not isinstance(module, nn.Module):
        return (torch.is_grad_enabled(),)
    params = module.__dict__.get("_flat_params")
    if params is None:
        params = tuple(module.parameters())
        object.__setattr__(module, "_flat_params", params)
    return (torch.is_grad_enabled(), *[p._version for p in params])


class FlowMixin:
    """Mixin for vector flows whose ``_forward(x)`` returns ``(y, ladj)`` in one pass.

    With ``cache_size=1`` one ``(x, y, ladj)`` triple is kept and reused only when the
    argument is the very tensor of that call (torch's identity check) *and* the cache key
    still matches: the grad mode and, for a module, the version counters of its parameters,
    which every in-place update (an optimizer step, ``load_state_dict``) bumps. So scoring
    one fixed tensor again after a training step recomputes it (STYLE rule 8). Nothing else
    is read back from ``self``, so a flow can score any point.

    The event size is checked on every call against ``input_dim``: a size-1 last dimension
    would otherwise broadcast silently against the flow's D-dimensional parameters.

    Class attributes describe the family (read by :func:`needs_permutation` and the tests):
    ``autoregressive`` / ``coupling`` (a fixed coordinate order, so a permutation belongs
    between consecutive layers), ``starts_at_identity``, and ``affine`` (an affine map of
    its input: a stack of such layers over a Gaussian base is still Gaussian, so it can
    match but not beat a full-rank Gaussian guide).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = False
    coupling = False
    starts_at_identity = True
    affine = False
    input_dim: int
    _flow_cache: tuple[Tensor, Tensor, Tensor | None, tuple] | None = None

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_ladj(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(x, ladj or None)``; flows whose inverse yields the log-det too override this."""
        return self._inverse(y), None

    def _ladj(self, x: Tensor, y: Tensor) -> Tensor:
        """The log-det at ``(x, y)`` without the cache (from ``x`` by default)."""
        return self._forward(x)[1]

    def _cache_key(self) -> tuple:
        return _param_versions(self)

    def _check_event(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.input_dim:
            actual = x.shape[-1] if x.dim() else "a scalar"
            raise ValueError(
                f"{type(self).__name__} expects an event of size {self.input_dim} in the last "
                f"dimension; got {actual} (input shape {tuple(x.shape)})"
            )

    def _store(self, entry: tuple) -> None:
        # a plain attribute: nn.Module.__setattr__'s bookkeeping costs ~8 us per call
        object.__setattr__(self, "_flow_cache", entry)

    def __call__(self, x: Tensor) -> Tensor:
        self._check_event(x)
        if self._cache_size == 0:
            return self._forward(x)[0]
        key = self._cache_key()
        cached = self._flow_cache
        if cached is not None and cached[0] is x and cached[3] == key:
            return cached[1]
        y, ladj = self._forward(x)
        self._store((x, y, ladj, key))
        return y

    def _call(self, x: Tensor) -> Tensor:
        return self._forward(x)[0]

    def _inv_call(self, y: Tensor) -> Tensor:
        self._check_event(y)
        if self._cache_size == 0:
            return self._inverse(y)
        key = self._cache_key()
        cached = self._flow_cache
        if cached is not None and cached[1] is y and cached[3] == key:
            return cached[0]
        x, ladj = self._inverse_ladj(y)
        self._store((x, y, ladj, key))
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        cached = self._flow_cache
        if (
            cached is not None
            and cached[0] is x
            and cached[1] is y
            and cached[2] is not None
            and cached[3] == self._cache_key()
        ):
            return cached[2]
        self._check_event(x)
        return self._ladj(x, y)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_flow_cache", None)
        state.pop("_flat_params", None)
        return state


class ParamFlow(FlowMixin, Transform):
    """A parameter-free flow for fixed (possibly batched) parameters.

    ``ConditionalTransformModule.condition(context)`` returns one of these: the parameters
    are tensors computed from the context, and ``forward``/``inverse`` are pure functions of
    ``(x, *params)``. With ``inverse_ladj=True`` the inverse returns ``(x, ladj)`` (the
    forward log-det at ``x``), and a log-det not found in the cache is computed from ``y``:
    scoring data takes one inverse pass (MAF's density direction, coupling flows).
    """

    def __init__(
        self,
        forward: ForwardFn,
        inverse: InverseFn | None,
        params: tuple[Tensor, ...],
        name: str,
        input_dim: int,
        cache_size: int = 1,
        *,
        inverse_ladj: bool = False,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self._fn = forward
        self._inv_fn = inverse
        self._params = params
        self._name = name
        self.input_dim = input_dim
        self._inverse_ladj_fn = inverse_ladj

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._fn(x, *self._params)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inverse_ladj(y)[0]

    def _inverse_ladj(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        if self._inv_fn is None:
            raise NotImplementedError(f"{self._name} has no inverse.")
        out = self._inv_fn(y, *self._params)
        return out if self._inverse_ladj_fn else (out, None)

    def _ladj(self, x: Tensor, y: Tensor) -> Tensor:
        if self._inverse_ladj_fn:  # from y: one inverse pass (MAF's forward takes D)
            return self._inv_fn(y, *self._params)[1]
        return self._forward(x)[1]

    def with_cache(self, cache_size: int = 1) -> ParamFlow:
        if self._cache_size == cache_size:
            return self
        return ParamFlow(
            self._fn,
            self._inv_fn,
            self._params,
            self._name,
            self.input_dim,
            cache_size,
            inverse_ladj=self._inverse_ladj_fn,
        )


class FlowModule(FlowMixin, TransformModule):
    """Base for unconditional flows: subclasses define ``params()`` and the pure functions."""

    forward_fn: staticmethod
    inverse_fn: staticmethod
    #: ``inverse_fn`` returns ``(x, ladj)`` with the forward log-det at ``x``, so ``log_prob``
    #: of a point needs one inverse call (the pair is cached) instead of inverse + forward
    inverse_ladj = False

    def params(self) -> tuple[Tensor, ...]:
        """The constrained parameters passed to the pure forward/inverse functions."""
        raise NotImplementedError

    def _forget(self) -> None:
        self.__dict__.pop("_flat_params", None)
        self.__dict__.pop("_flow_cache", None)

    def _apply(self, fn: Callable, *args: object, **kwargs: object) -> FlowModule:
        # .to() / .double() may replace parameter objects: forget them and the cache
        self._forget()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        # load_state_dict(assign=True) replaces parameter objects
        self._forget()
        super()._load_from_state_dict(*args, **kwargs)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return type(self).forward_fn(x, *self.params())

    def _inverse(self, y: Tensor) -> Tensor:
        out = type(self).inverse_fn(y, *self.params())
        return out[0] if self.inverse_ladj else out

    def _inverse_ladj(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.inverse_ladj:
            return self._inverse(y), None
        return type(self).inverse_fn(y, *self.params())

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


class Reverse(Transform):
    """Reverse the order of the last dimension; volume preserving and parameter free.

    Example:
        >>> import torch
        >>> Reverse()(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    volume_preserving = True

    def __init__(self, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reverse)

    def __getstate__(self) -> dict:
        # torch's cache may hold tensors of an autograd graph, which copy.deepcopy refuses
        state = super().__getstate__()
        state["_cached_x_y"] = None, None
        return state

    def __hash__(self) -> int:
        return hash(Reverse)

    def _call(self, x: Tensor) -> Tensor:
        return x.flip(-1)

    def _inverse(self, y: Tensor) -> Tensor:
        return y.flip(-1)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-1])

    def with_cache(self, cache_size: int = 1) -> Reverse:
        return self if cache_size == self._cache_size else Reverse(cache_size)


def needs_permutation(layer: object) -> bool:
    """Whether a permutation belongs between ``layer`` and the next layer of its family.

    True for layers with a fixed coordinate order (``autoregressive = True``, as in Pyro's
    autoregressive transforms, or ``coupling = True``): reversing the coordinates between
    them lets every coordinate depend on every other (for T-SNF this equals alternating its
    Q between the identity and the reversal; for coupling layers, alternating the halves).
    """
    return bool(getattr(layer, "autoregressive", False) or getattr(layer, "coupling", False))


def starts_at_identity(layer: object) -> bool:
    """Whether a freshly built ``layer`` is (near) the identity map (default: true)."""
    return bool(getattr(layer, "starts_at_identity", True))


def interleave_permutations(layers: Sequence[Transform]) -> list[Transform]:
    """``layers`` with a :class:`Reverse` between consecutive ones that need a permutation.

    Example:
        >>> from pyroflows.transforms import realnvp
        >>> [type(t).__name__ for t in interleave_permutations([realnvp(3), realnvp(3)])]
        ['RealNVP', 'Reverse', 'RealNVP']
    """
    out: list[Transform] = []
    for i, layer in enumerate(layers):
        if i > 0 and needs_permutation(layers[i - 1]) and needs_permutation(layer):
            out.append(Reverse())
        out.append(layer)
    return out
