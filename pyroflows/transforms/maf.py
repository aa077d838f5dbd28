"""Masked autoregressive flows (Papamakarios et al. 2017): MADE in the density direction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor

from pyroflows._utils import check_context, check_hidden_dims, check_positive_int
from pyroflows.transforms._base import FlowModule, ParamFlow
from pyroflows.transforms.iaf import SCALE_MIN, _made_split
from pyroflows.transforms.made import MADE, MadeLayers, solve_autoregressive_aux
from pyroflows.transforms.realnvp import soft_clamp

MAF_LOG_SCALE_BOUND = -math.log(SCALE_MIN)
"""Bound of MAF's log-scale: |ℓ| < log(1000), so the scale σ = exp(−ℓ) stays in
(10^-3, 10^3), the floor IAF's softplus scale has (:data:`~pyroflows.transforms.iaf.SCALE_MIN`)."""


def _maf_density(y: Tensor, layers: MadeLayers, bound: float) -> tuple[Tensor, Tensor]:
    """x = m(y) + exp(ℓ(y)) ⊙ y in one MADE pass; returns ``(x, log|det ∂y/∂x|) = −Σ ℓ(y)``.

    The MADE's outputs give ``m = −μ/σ`` and ``ℓ = −log σ = soft_clamp(s)`` directly, so the
    step is one exp and one fused multiply-add whose exp serves the backward too (the form of
    Pyro's ``affine_autoregressive``, with a smooth bound in place of its hard clamp)."""
    m, s = _made_split(y, layers)
    log_scale = soft_clamp(s, bound)
    return torch.addcmul(m, log_scale.exp(), y), -log_scale.sum(-1)


def _maf_sample(x: Tensor, layers: MadeLayers, bound: float) -> tuple[Tensor, Tensor]:
    """y = (x − m(y)) ⊙ exp(−ℓ(y)), i.e. y = μ(y) + σ(y) ⊙ x (Papamakarios et al. 2017, Eq. 2),
    solved in at most D passes; the log-det −Σ ℓ(y) is the last pass's (exact there: ℓ_i
    reads only y_<i)."""

    def step(y: Tensor) -> tuple[Tensor, Tensor]:
        m, s = _made_split(y, layers)
        log_scale = soft_clamp(s, bound)
        return (x - m) * torch.exp(-log_scale), log_scale

    y, log_scale = solve_autoregressive_aux(step, x)
    return y, -log_scale.sum(-1)


class MAF(FlowModule):
    r"""Masked autoregressive flow :math:`y = \mu(y_{<}) + \sigma(y_{<}) \odot x`.

    The MADE reads the *output* (the data side), so the density direction
    :math:`x = (y - \mu(y)) / \sigma(y)` and :math:`\log|\det J| = \sum_i \log\sigma_i(y)`
    take one MADE pass: MAF scores data in one pass, and samples in D sequential passes
    (the mirror image of :class:`~pyroflows.transforms.IAF`). The MADE gives the density
    step's coefficients directly, :math:`x = m(y) + e^{\ell(y)} \odot y` with
    :math:`\sigma = e^{-\ell}`, as Pyro's ``affine_autoregressive`` does, but with a smooth
    bound :math:`\ell = 6.9 \tanh(s / 6.9)` (so :math:`10^{-3} < \sigma < 10^{3}`) in place
    of its hard clamp (STYLE rule 4: exp only of a bounded value). Starts
    near the identity. ``autoregressive = True``: stacks reverse the coordinates between
    layers.

    Note:
        Sampling (the forward map) takes D sequential MADE passes, the log-det included;
        ``log_prob`` of any point takes one. The log-det is a function of ``y`` alone.

    Args:
        input_dim: Dimension D of the event.
        hidden_dims: MADE hidden widths; ``None`` gives ``[3D + 1]``.
        permutation: Autoregressive order of the MADE; ``None`` is ``0, ..., D-1``.

    Example:
        >>> flow = MAF(3)
        >>> x = flow.inv(torch.ones(2, 3))  # density direction: one pass
        >>> torch.allclose(flow(x.clone()), torch.ones(2, 3), atol=1e-6)
        True

    References:
        | Masked Autoregressive Flow for Density Estimation
        | (Papamakarios, Pavlakou, Murray, 2017) https://arxiv.org/abs/1705.07057
    """

    autoregressive = True
    forward_fn = staticmethod(_maf_sample)

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        permutation: Sequence[int] | Tensor | None = None,
    ) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        hidden = check_hidden_dims(hidden_dims, [3 * input_dim + 1])
        self.made = MADE(input_dim, hidden, 2, 0, permutation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start: the MADE's last layer is scaled down, its bias zeroed."""
        self.made.reset_parameters()

    def params(self) -> tuple[MadeLayers, float]:
        return self.made.weights(), MAF_LOG_SCALE_BOUND

    def _inverse_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return _maf_density(y, *self.params())

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inverse_ladj(y)[0]

    def _ladj(self, x: Tensor, y: Tensor) -> Tensor:
        return _maf_density(y, *self.params())[1]


class ConditionalMAF(ConditionalTransformModule):
    r"""MAF whose MADE also takes a context (every layer, unmasked); see :class:`MAF`.

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: MADE hidden widths; ``None`` gives ``[10D]``.
        permutation: Autoregressive order of the MADE; ``None`` is ``0, ..., D-1``.

    Example:
        >>> flow = ConditionalMAF(3, 5)
        >>> flow.condition(torch.zeros(5)).inv(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    autoregressive = True

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        permutation: Sequence[int] | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.context_dim = check_positive_int("context_dim", context_dim)
        hidden = check_hidden_dims(hidden_dims, [10 * input_dim])
        self.made = MADE(input_dim, hidden, 2, context_dim, permutation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start, as :meth:`MAF.reset_parameters`."""
        self.made.reset_parameters()

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        params = (self.made.weights(context), MAF_LOG_SCALE_BOUND)
        return ParamFlow(
            _maf_sample, _maf_density, params, "MAF", self.input_dim, inverse_ladj=True
        )


def maf(input_dim: int, hidden_dims: Sequence[int] | None = None) -> MAF:
    """A :class:`MAF` layer on ``input_dim`` dimensions."""
    return MAF(input_dim, hidden_dims)


def conditional_maf(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalMAF:
    """A :class:`ConditionalMAF` layer."""
    return ConditionalMAF(input_dim, context_dim, hidden_dims)
