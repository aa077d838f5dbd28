"""Activation normalisation (Glow, Kingma & Dhariwal 2018) with explicit data initialisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import Transform
from torch.nn import functional as F

from pyroflows._utils import check_context, check_hidden_dims, check_positive_int, hypernet
from pyroflows.transforms._base import FlowModule, ParamFlow

SCALE_MIN = 1e-4
"""Floor of the actnorm scale: keeps log s finite for any raw parameter."""

_SHIFT = math.log(math.expm1(1.0 - SCALE_MIN))  # softplus(shift) + SCALE_MIN == 1


def actnorm_scale(raw: Tensor) -> Tensor:
    """s = softplus(raw + c) + 10⁻⁴, with s = 1 at raw = 0 (positivity without exp)."""
    return F.softplus(raw + _SHIFT) + SCALE_MIN


def _raw_of_scale(scale: Tensor) -> Tensor:
    """Inverse of :func:`actnorm_scale` (scales below the floor map to the floor)."""
    v = (scale - SCALE_MIN).clamp_min(torch.finfo(scale.dtype).tiny)
    return v + torch.log(-torch.expm1(-v)) - _SHIFT  # softplus⁻¹(v) − c, overflow-free


def _actnorm(x: Tensor, loc: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
    """y = loc + s ⊙ x; log|det J| = Σ log s."""
    scale = actnorm_scale(raw)
    y = torch.addcmul(loc, scale, x)
    return y, scale.log().sum(-1).expand(y.shape[:-1])


def _actnorm_inverse(y: Tensor, loc: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
    """x = y / s − loc / s, and the forward log-det Σ log s.

    One fused multiply-add over the points (the per-coordinate 1/s and loc/s are computed
    once), whose backward needs no product with the points except for the gradient of 1/s.
    """
    scale = actnorm_scale(raw)
    inv = scale.reciprocal()
    x = torch.addcmul(-loc * inv, y, inv)
    return x, scale.log().sum(-1).expand(x.shape[:-1])


def _moments(y: Tensor, input_dim: int) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean and standard deviation over every batch dimension of ``y``."""
    if not isinstance(y, Tensor) or y.dim() < 2 or y.shape[-1] != input_dim:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"data must have shape (N, ..., {input_dim}) with N > 1; got {shape}")
    flat = y.detach().reshape(-1, input_dim)
    return flat.mean(0), flat.std(0)


class ActNorm(FlowModule):
    r"""Elementwise affine map :math:`y = \mu + s \odot x` (Glow's actnorm), in the
    sampling direction, with :math:`s = \mathrm{softplus}(\cdot) + 10^{-4} > 0`.

    :math:`\log|\det J| = \sum_i \log s_i`. Starts at the identity. Data-dependent
    initialisation is an explicit call, :meth:`initialize_from`, never a side effect of the
    first forward pass; :func:`initialize_actnorm` does it for every actnorm of a stack.

    Args:
        input_dim: Dimension D of the event.

    Example:
        >>> flow = ActNorm(2).initialize_from(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
        >>> flow.inv(torch.tensor([[1.0, 0.0], [3.0, 4.0]])).std(0)
        tensor([1., 1.], grad_fn=<StdBackward0>)

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    forward_fn = staticmethod(_actnorm)
    inverse_fn = staticmethod(_actnorm_inverse)
    inverse_ladj = True
    affine = True

    def __init__(self, input_dim: int) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.loc = nn.Parameter(torch.empty(input_dim))
        self.scale_raw = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: ``loc = 0``, ``s = 1``."""
        nn.init.zeros_(self.loc)
        nn.init.zeros_(self.scale_raw)

    def params(self) -> tuple[Tensor, Tensor]:
        return self.loc, self.scale_raw

    @torch.no_grad()
    def initialize_from(self, y: Tensor) -> ActNorm:
        """Set ``loc``, ``s`` to the mean and standard deviation of ``y`` ``(N, ..., D)``
        (points on this layer's output side), so the inverse standardises them. Returns
        ``self``; deterministic given ``y``."""
        mean, std = _moments(y, self.input_dim)
        self.loc.copy_(mean)
        self.scale_raw.copy_(_raw_of_scale(std))
        return self


class ConditionalActNorm(ConditionalTransformModule):
    r"""ActNorm whose :math:`\mu, s` are a function of a context; see :class:`ActNorm`.

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: Hidden widths of the hypernetwork; ``None`` and ``[]`` give a linear
            map of the context.

    Example:
        >>> flow = ConditionalActNorm(3, 5)
        >>> flow.condition(torch.zeros(5))(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.context_dim = check_positive_int("context_dim", context_dim)
        hidden = check_hidden_dims(hidden_dims, [])
        self.nn = hypernet(context_dim, hidden, [input_dim, input_dim])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start: ``loc ≈ 0``, ``s ≈ 1`` for any context."""
        with torch.no_grad():
            self.nn[-1].bias.zero_()

    @torch.no_grad()
    def initialize_from(self, y: Tensor) -> ConditionalActNorm:
        """Set the context-free part of ``loc``, ``s`` from the moments of ``y`` (see
        :meth:`ActNorm.initialize_from`); the context-dependent part is left as it is."""
        mean, std = _moments(y, self.input_dim)
        self.nn[-1].bias.copy_(torch.cat([mean, _raw_of_scale(std)]))
        return self

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        loc, raw = self.nn(context).split(self.input_dim, -1)
        params = (loc, raw)
        return ParamFlow(
            _actnorm, _actnorm_inverse, params, "ActNorm", self.input_dim, inverse_ladj=True
        )


@torch.no_grad()
def initialize_actnorm(transforms: Sequence[Transform], y: Tensor) -> None:
    """Initialise every :class:`ActNorm` of ``transforms`` (base side first) from data ``y``.

    Walks from the data end: each actnorm is initialised from the data as it arrives at
    that layer, i.e. ``y`` pulled back through the layers after it.

    Example:
        >>> flows = [ActNorm(2), ActNorm(2)]
        >>> initialize_actnorm(flows, torch.tensor([[0.0, 1.0], [2.0, 5.0]]))
        >>> flows[-1].loc
        Parameter containing:
        tensor([1., 3.], requires_grad=True)
    """
    for t in reversed(list(transforms)):
        if isinstance(t, ActNorm):
            t.initialize_from(y)
        y = t.inv(y)


def actnorm(input_dim: int) -> ActNorm:
    """An :class:`ActNorm` layer on ``input_dim`` dimensions."""
    return ActNorm(input_dim)


def conditional_actnorm(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalActNorm:
    """A :class:`ConditionalActNorm` layer."""
    return ConditionalActNorm(input_dim, context_dim, hidden_dims)
