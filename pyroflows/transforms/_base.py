"""Shared machinery: forward and log-det computed together, cached only for the same (x, y)."""

from __future__ import annotations

from collections.abc import Callable

from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints

ForwardFn = Callable[..., tuple[Tensor, Tensor]]
InverseFn = Callable[..., Tensor]


class FlowMixin:
    """Mixin for vector flows whose ``_forward(x)`` returns ``(y, ladj)`` in one pass.

    ``log_abs_det_jacobian(x, y)`` reuses the log-det of the last forward call only when
    ``x`` and ``y`` are the very tensors of that call (the identity check torch's own
    ``cache_size=1`` uses); any other pair is recomputed from ``x``. Nothing else is read
    back from ``self``, so a flow can score any point.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    _ladj_cache: tuple[Tensor, Tensor, Tensor] | None = None

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _call(self, x: Tensor) -> Tensor:
        y, ladj = self._forward(x)
        if self._cache_size == 1:
            # a plain attribute: nn.Module.__setattr__'s bookkeeping costs ~8 us per call
            object.__setattr__(self, "_ladj_cache", (x, y, ladj))
        return y

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        cached = self._ladj_cache
        if cached is not None and cached[0] is x and cached[1] is y:
            return cached[2]
        return self._forward(x)[1]


class ParamFlow(FlowMixin, Transform):
    """A parameter-free flow for fixed (possibly batched) parameters.

    ``ConditionalTransformModule.condition(context)`` returns one of these: the parameters
    are tensors computed from the context, and ``forward``/``inverse`` are pure functions of
    ``(x, *params)``.
    """

    def __init__(
        self,
        forward: ForwardFn,
        inverse: InverseFn | None,
        params: tuple[Tensor, ...],
        name: str,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self._fn = forward
        self._inv_fn = inverse
        self._params = params
        self._name = name

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._fn(x, *self._params)

    def _inverse(self, y: Tensor) -> Tensor:
        if self._inv_fn is None:
            raise NotImplementedError(f"{self._name} has no inverse.")
        return self._inv_fn(y, *self._params)

    def with_cache(self, cache_size: int = 1) -> ParamFlow:
        if self._cache_size == cache_size:
            return self
        return ParamFlow(self._fn, self._inv_fn, self._params, self._name, cache_size)


class FlowModule(FlowMixin, TransformModule):
    """Base for unconditional flows: subclasses define ``params()`` and the pure functions."""

    forward_fn: staticmethod
    inverse_fn: staticmethod

    def params(self) -> tuple[Tensor, ...]:
        """The constrained parameters passed to the pure forward/inverse functions."""
        raise NotImplementedError

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return type(self).forward_fn(x, *self.params())

    def _inverse(self, y: Tensor) -> Tensor:
        return type(self).inverse_fn(y, *self.params())

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


#: Registry families whose layers are triangular in a fixed coordinate order; a parameter-free
#: reversal is inserted between consecutive layers so every coordinate can depend on every
#: other (for T-SNF this equals alternating its Q between the identity and the reversal).
PERMUTED_FLOWS = frozenset({"iaf", "iaf-gated", "sylvester-triangular"})


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


def _reverse(x: Tensor) -> tuple[Tensor, None]:
    """The reversal permutation of the event (volume preserving)."""
    return x.flip(-1), None


def _reverse_inverse(y: Tensor) -> Tensor:
    return y.flip(-1)


REVERSE: tuple[ForwardFn, InverseFn, tuple[Tensor, ...]] = (_reverse, _reverse_inverse, ())


class FlowSequence(FlowMixin, Transform):
    """Several parameter-free flows applied in one transform, log-dets summed in one loop.

    Equivalent to ``ComposeTransform([ParamFlow(...), ...])`` but with one transform and one
    cache entry instead of one per layer. In the flow VAE this measured no step-time gain over
    the plain composition (the layers' own kernels dominate), so :class:`~pyroflows.vae.
    FlowEncoder` does not use it; planar stacks get their speed from
    :class:`~pyroflows.transforms.ConditionalPlanarStack` instead. ``steps`` are
    ``(forward, inverse, params)`` triples; a forward may return ``None`` for its log-det
    (volume-preserving steps such as :data:`REVERSE`).
    """

    def __init__(
        self,
        steps: list[tuple[ForwardFn, InverseFn | None, tuple[Tensor, ...]]],
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.steps = steps

    @classmethod
    def of(cls, flows: list[Transform | tuple]) -> FlowSequence:
        """Fuse :class:`ParamFlow` s, other sequences and raw step triples into one."""
        steps: list[tuple] = []
        for f in flows:
            if isinstance(f, ParamFlow):
                steps.append((f._fn, f._inv_fn, f._params))
            elif isinstance(f, FlowSequence):
                steps.extend(f.steps)
            elif isinstance(f, tuple) and len(f) == 3:
                steps.append(f)
            else:
                raise TypeError(f"cannot fuse {type(f).__name__}; expected ParamFlow or a step")
        return cls(steps)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ladj: Tensor | None = None
        for fn, _, params in self.steps:
            x, step_ladj = fn(x, *params)
            if step_ladj is not None:
                ladj = step_ladj if ladj is None else ladj + step_ladj
        if ladj is None:
            ladj = x.new_zeros(x.shape[:-1])
        return x, ladj

    def _inverse(self, y: Tensor) -> Tensor:
        for _, inv, params in reversed(self.steps):
            if inv is None:
                raise NotImplementedError("a step of this FlowSequence has no inverse")
            y = inv(y, *params)
        return y

    def with_cache(self, cache_size: int = 1) -> FlowSequence:
        if self._cache_size == cache_size:
            return self
        return FlowSequence(self.steps, cache_size)
