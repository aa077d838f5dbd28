"""NICE (Dinh et al. 2015): additive coupling layers and a diagonal scaling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyroflows._utils import check_context
from pyroflows.transforms._base import ParamFlow
from pyroflows.transforms._coupling import (
    ConditionalCouplingFlow,
    CouplingFlow,
    ElementwisePair,
    coupling_forward,
    coupling_inverse,
)
from pyroflows.transforms.iaf import _AFFINE_SHIFT, _affine_scale
from pyroflows.transforms.made import MadeLayers


def _additive(xb: Tensor, raw: Tensor) -> tuple[Tensor, None]:
    """y_b = x_b + m(x_a): volume preserving."""
    return xb + raw[..., 0], None


def _additive_inverse(yb: Tensor, raw: Tensor) -> tuple[Tensor, None]:
    return yb - raw[..., 0], None


ADDITIVE: ElementwisePair = (_additive, _additive_inverse)


def nice_scale(raw: Tensor) -> Tensor:
    """The positive diagonal scale S = softplus(raw + c) + 10⁻³ (S = 1 at raw = 0); the
    paper's exp(raw) would grow without bound (STYLE rule 4)."""
    return _affine_scale(raw, _AFFINE_SHIFT)


def _nice(
    x: Tensor, layers: MadeLayers, split: int, pair: ElementwisePair, scale_raw: Tensor
) -> tuple[Tensor, Tensor]:
    """y = S ⊙ additive_coupling(x); log|det J| = Σ log S (the coupling adds 0)."""
    z, _ = coupling_forward(x, layers, split, pair)
    scale = nice_scale(scale_raw)  # (*batch, D)
    y = z * scale
    return y, scale.log().sum(-1).expand(y.shape[:-1])


def _nice_inverse(
    y: Tensor, layers: MadeLayers, split: int, pair: ElementwisePair, scale_raw: Tensor
) -> tuple[Tensor, Tensor]:
    """x = coupling⁻¹(y / S), and the forward log-det Σ log S."""
    scale = nice_scale(scale_raw)
    x, _ = coupling_inverse(y / scale, layers, split, pair)
    return x, scale.log().sum(-1).expand(x.shape[:-1])


class NICE(CouplingFlow):
    r"""Additive coupling followed by a diagonal scaling, :math:`y = S \odot
    (x_a,\ x_b + m(x_a))`.

    ``a`` is the first ``D // 2`` coordinates and :math:`m` an MLP. The coupling is volume
    preserving; the diagonal scaling layer of the paper (Sec. 3.3) gives
    :math:`\log|\det J| = \sum_i \log S_i`. Here each layer carries its own scaling
    (``scale=False`` drops it): a product of diagonals is a diagonal, so a stack is the
    paper's model. Starts near the identity; a stack reverses the coordinates between
    layers (``coupling = True``), so the halves alternate.

    Note:
        Forward and inverse both cost one conditioner pass.

    Args:
        input_dim: Dimension D of the event.
        hidden_dims: Hidden widths of the coupling MLP; ``None`` gives ``[10D]``.
        scale: Include the learned diagonal scaling.

    Example:
        >>> flow = NICE(4)
        >>> y = flow(torch.ones(2, 4))
        >>> torch.allclose(flow.inv(y.clone()), torch.ones(2, 4), atol=1e-6)
        True

    References:
        | NICE: Non-linear Independent Components Estimation (Dinh, Krueger, Bengio, 2015)
        | https://arxiv.org/abs/1410.8516
    """

    params_per_dim = 1
    forward_fn = staticmethod(_nice)
    inverse_fn = staticmethod(_nice_inverse)

    def __init__(
        self, input_dim: int, hidden_dims: Sequence[int] | None = None, scale: bool = True
    ) -> None:
        super().__init__(input_dim, hidden_dims)
        if not isinstance(scale, bool):
            raise TypeError(f"scale must be a bool; got {scale!r}")
        self.scale_raw = nn.Parameter(torch.empty(input_dim)) if scale else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start: coupling output ≈ 0 and S = 1."""
        self.net.reset_parameters()
        if self.scale_raw is not None:
            nn.init.zeros_(self.scale_raw)

    def elementwise(self) -> ElementwisePair:
        return ADDITIVE

    def params(self) -> tuple:
        scale_raw = self.scale_raw
        if scale_raw is None:  # S = 1 exactly: a constant raw value, no parameter
            scale_raw = self.net.bias[-1].new_zeros(self.input_dim)
        return self.net.weights(), self.split, ADDITIVE, scale_raw


class ConditionalNICE(ConditionalCouplingFlow):
    r"""NICE whose coupling MLP also takes a context, and whose scaling is a linear function
    of the context; see :class:`NICE`.

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: Hidden widths of the coupling MLP; ``None`` gives ``[10D]``, ``[]`` a
            linear map of ``(x_a, context)``.

    Example:
        >>> flow = ConditionalNICE(4, 5)
        >>> flow.condition(torch.zeros(5))(torch.zeros(2, 4)).shape
        torch.Size([2, 4])
    """

    params_per_dim = 1

    def __init__(
        self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
    ) -> None:
        super().__init__(input_dim, context_dim, hidden_dims)
        self.scale_head = nn.Linear(context_dim, input_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start: coupling output ≈ 0, S ≈ 1 for any context."""
        self.net.reset_parameters()
        self.scale_head.reset_parameters()
        with torch.no_grad():
            self.scale_head.weight.mul_(1e-2)
            self.scale_head.bias.zero_()

    def elementwise(self) -> ElementwisePair:
        return ADDITIVE

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        params = (self.net.weights(context), self.split, ADDITIVE, self.scale_head(context))
        return ParamFlow(_nice, _nice_inverse, params, "NICE", self.input_dim, inverse_ladj=True)


def nice(input_dim: int, hidden_dims: Sequence[int] | None = None) -> NICE:
    """A :class:`NICE` layer (additive coupling and diagonal scaling)."""
    return NICE(input_dim, hidden_dims)


def conditional_nice(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalNICE:
    """A :class:`ConditionalNICE` layer."""
    return ConditionalNICE(input_dim, context_dim, hidden_dims)
