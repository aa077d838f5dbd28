"""Radial flows (Rezende & Mohamed 2015), with a closed-form inverse."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.nn import functional as F

from pyroflows._utils import (
    check_context,
    check_hidden_dims,
    check_positive_int,
    hypernet,
    split_params,
)
from pyroflows.transforms._base import FlowModule, ParamFlow

_SOFTPLUS_INV_1 = math.log(math.expm1(1.0))  # softplus(_SOFTPLUS_INV_1) == 1


def radial_alpha_gamma(alpha_raw: Tensor, beta_raw: Tensor) -> tuple[Tensor, Tensor]:
    """Enforce α > 0 and β ≥ −α (Rezende & Mohamed 2015, App. A.2) via softplus.

    Returns α = softplus(α_raw) and γ = α + β = softplus(β_raw), each floored at √tiny so
    the log-det stays finite even at the boundary β = −α (where the map degenerates at x₀).
    """
    floor = torch.finfo(alpha_raw.dtype).tiny ** 0.5
    return F.softplus(alpha_raw).clamp_min(floor), F.softplus(beta_raw).clamp_min(floor)


def _radial(x: Tensor, x0: Tensor, alpha: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """y = x + β h(α, r)(x − x₀), h = 1/(α + r), r = ‖x − x₀‖, with γ = α + β; log|det J|.

    Written as y − x₀ = (x − x₀)(γ + r)/(α + r); each log-det factor is a ratio of sums of
    non-negative terms, so there is no cancellation near β = −α.
    """
    diff = x - x0  # (*batch, D)
    r = diff.norm(dim=-1)  # (*batch,)
    ar = alpha + r  # (*batch,)
    ratio = (gamma + r) / ar  # 1 + βh
    y = torch.addcmul(x0, diff, ratio.unsqueeze(-1))
    # 1 + βh + βh'r = (r² + 2αr + αγ)/(α + r)²  (Python scalars kept out of tensor ops: on
    # the CPU each one costs an extra tensor)
    radial_term = torch.addcmul(alpha * gamma, r, torch.add(r, alpha, alpha=2)) / (ar * ar)
    ladj = torch.add(torch.log(radial_term), torch.log(ratio), alpha=x.shape[-1] - 1)
    return y, ladj


def _radial_inverse(y: Tensor, x0: Tensor, alpha: Tensor, gamma: Tensor) -> Tensor:
    """Invert radial: r solves r² + (γ − ρ) r − αρ = 0 with ρ = ‖y − x₀‖ (root ≥ 0)."""
    diff = y - x0  # (*batch, D)
    rho = diff.norm(dim=-1)  # (*batch,)
    p = gamma - rho
    disc = torch.sqrt(p * p + 4 * alpha * rho)
    # the stable form of the positive root for either sign of p
    tiny = torch.finfo(y.dtype).tiny
    r = torch.where(p > 0, 2 * alpha * rho / (p + disc).clamp_min(tiny), (disc - p) / 2)
    return x0 + diff * ((alpha + r) / (gamma + r)).unsqueeze(-1)


class Radial(FlowModule):
    r"""Radial flow :math:`y = x + \beta h(\alpha, r)(x - x_0)`, :math:`h = 1/(\alpha + r)`.

    :math:`r = \|x - x_0\|`; :math:`\alpha > 0` and :math:`\beta \ge -\alpha` are enforced by
    :func:`radial_alpha_gamma`, so the map is invertible. It starts at the identity
    (:math:`\beta = 0`). The inverse is closed form: :math:`r` is the positive root of a
    quadratic in :math:`\|y - x_0\|`, so ``log_prob`` works at any point.

    Args:
        input_dim: Dimension D of the event.

    Example:
        >>> flow = Radial(3)
        >>> flow(torch.zeros(3)).shape
        torch.Size([3])

    References:
        | Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        | https://arxiv.org/abs/1505.05770
    """

    forward_fn = staticmethod(_radial)
    inverse_fn = staticmethod(_radial_inverse)

    def __init__(self, input_dim: int) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.x0 = nn.Parameter(torch.empty(input_dim))
        self.alpha_raw = nn.Parameter(torch.empty(()))
        self.beta_raw = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: α = 1, β = 0 and ``x0 ~ U(-1/√D, 1/√D)``."""
        bound = 1 / math.sqrt(self.input_dim)
        nn.init.uniform_(self.x0, -bound, bound)
        nn.init.constant_(self.alpha_raw, _SOFTPLUS_INV_1)
        nn.init.constant_(self.beta_raw, _SOFTPLUS_INV_1)

    def params(self) -> tuple[Tensor, Tensor, Tensor]:
        return (self.x0, *radial_alpha_gamma(self.alpha_raw, self.beta_raw))


class ConditionalRadial(ConditionalTransformModule):
    r"""Radial flow whose :math:`x_0, \alpha, \beta` are emitted from a context vector.

    ``condition(context)`` with ``context`` of shape ``(*batch, context_dim)`` returns a
    parameter-free radial transform with batched parameters that broadcast against the
    sample's batch shape. Its inverse is closed form (see :class:`Radial`).

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: Hidden sizes of the hypernetwork; ``None`` gives ``[10D, 10D]`` and
            ``[]`` a single linear map from the context.

    Example:
        >>> flow = ConditionalRadial(3, 5, hidden_dims=[])
        >>> flow.condition(torch.zeros(5))(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.context_dim = check_positive_int("context_dim", context_dim)
        hidden = check_hidden_dims(hidden_dims, [10 * input_dim, 10 * input_dim])
        self.param_dims = (input_dim, 1, 1)
        self.nn = hypernet(context_dim, hidden, self.param_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: the last bias gives α = 1, β = 0 and a random ``x0``."""
        bound = 1 / math.sqrt(self.input_dim)
        bias = self.nn[-1].bias
        with torch.no_grad():
            bias[: self.input_dim].uniform_(-bound, bound)
            bias[self.input_dim :].fill_(_SOFTPLUS_INV_1)

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        x0, alpha_raw, beta_raw = split_params(self.nn(context), self.param_dims)
        alpha, gamma = radial_alpha_gamma(alpha_raw.squeeze(-1), beta_raw.squeeze(-1))
        return ParamFlow(_radial, _radial_inverse, (x0, alpha, gamma), "Radial", self.input_dim)


def radial(input_dim: int) -> Radial:
    """A :class:`Radial` flow on ``input_dim`` dimensions."""
    return Radial(input_dim)


def conditional_radial(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalRadial:
    """A :class:`ConditionalRadial` flow; ``hidden_dims=[]`` is a linear hypernetwork."""
    return ConditionalRadial(input_dim, context_dim, hidden_dims)
