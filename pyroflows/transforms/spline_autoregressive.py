"""Autoregressive rational-quadratic spline flows (Durkan et al. 2019): MADE in the density
direction, as MAF, with a monotone spline per coordinate instead of an affine map."""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401 (the doctests' namespace)
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor

from pyroflows._utils import check_context, check_hidden_dims, check_positive_int
from pyroflows.transforms._base import FlowModule, ParamFlow
from pyroflows.transforms.made import MADE, MadeLayers, made_forward, solve_autoregressive_aux
from pyroflows.transforms.spline import (
    check_bins_bound,
    rq_spline,
    rq_spline_inverse,
    spline_temperature,
)

SplineOpts = tuple[int, float, float]  # bins K, bound B, temperature


def _raw(y: Tensor, layers: MadeLayers, bins: int) -> Tensor:
    """The MADE's 3K − 1 spline parameters per coordinate, ``(*batch, D, 3K − 1)``."""
    out = made_forward(y, layers)  # (*batch, D (3K − 1)), coordinate-major
    return out.unflatten(-1, (y.shape[-1], 3 * bins - 1))


def _spline_ar_density(y: Tensor, layers: MadeLayers, opts: SplineOpts) -> tuple[Tensor, Tensor]:
    """x_i = g⁻¹(y_i; θ(y_<i)) in one MADE pass; returns ``(x, log|det ∂y/∂x|)``."""
    bins, bound, temperature = opts
    return rq_spline_inverse(y, _raw(y, layers, bins), bins, bound, temperature)


def _spline_ar_sample(x: Tensor, layers: MadeLayers, opts: SplineOpts) -> tuple[Tensor, Tensor]:
    """y_i = g(x_i; θ(y_<i)), solved in at most D passes; the log-det is the last pass's
    (exact there: θ_i reads only y_<i, already exact)."""
    bins, bound, temperature = opts

    def step(y: Tensor) -> tuple[Tensor, Tensor]:
        return rq_spline(x, _raw(y, layers, bins), bins, bound, temperature)

    return solve_autoregressive_aux(step, x)


def _made(
    input_dim: int,
    hidden_dims: Sequence[int] | None,
    bins: int,
    context_dim: int,
    permutation: Sequence[int] | Tensor | None,
) -> MADE:
    hidden = check_hidden_dims(hidden_dims, [10 * input_dim])
    # coordinate-major outputs: each coordinate's 3K − 1 raw values are contiguous, as the
    # spline's per-coordinate ops (softmax, cumsum, gather over the bins) want them
    return MADE(input_dim, hidden, 3 * bins - 1, context_dim, permutation, coordinate_major=True)


def _opts(bins: int, bound: float, made: MADE) -> SplineOpts:
    """K, B and the bins' temperature (√ of the MADE's last fan-in, as the coupling's)."""
    return bins, bound, spline_temperature(made.layers[-1].weight)


class SplineAutoregressive(FlowModule):
    r"""Autoregressive rational-quadratic spline :math:`y_i = g(x_i; \theta(y_{<i}))`.

    The MADE reads the *output* (data side), as in :class:`~pyroflows.transforms.MAF`, and
    gives each coordinate a monotone rational-quadratic spline with K bins on
    :math:`[-B, B]` and identity tails (:class:`~pyroflows.transforms.SplineCoupling`'s
    spline), so every coordinate is transformed conditioned on all earlier ones (zuko's
    default ``NSF``). Starts near the identity. ``autoregressive = True``: stacks reverse
    the coordinates between layers.

    Note:
        ``log_prob`` of any point takes one MADE pass (the spline's analytic inverse);
        sampling takes D sequential passes, the log-det included.

    Args:
        input_dim: Dimension D of the event.
        hidden_dims: MADE hidden widths; ``None`` gives ``[10D]``.
        bins: Number of bins K.
        bound: Half-width B of the interval the spline acts on.
        permutation: Autoregressive order of the MADE; ``None`` is ``0, ..., D-1``.

    Example:
        >>> flow = SplineAutoregressive(3)
        >>> x = flow.inv(torch.ones(2, 3))  # density direction: one pass
        >>> torch.allclose(flow(x.clone()), torch.ones(2, 3), atol=1e-5)
        True

    References:
        | Neural Spline Flows (Durkan, Bekasov, Murray, Papamakarios, 2019)
        | https://arxiv.org/abs/1906.04032
    """

    autoregressive = True
    forward_fn = staticmethod(_spline_ar_sample)
    inverse_fn = staticmethod(_spline_ar_density)
    inverse_ladj = True

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        bins: int = 8,
        bound: float = 3.0,
        permutation: Sequence[int] | Tensor | None = None,
    ) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.bins, self.bound = check_bins_bound(bins, bound)
        self.made = _made(input_dim, hidden_dims, self.bins, 0, permutation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start: the MADE's last layer is scaled down, its bias zeroed."""
        self.made.reset_parameters()

    def params(self) -> tuple[MadeLayers, SplineOpts]:
        return self.made.weights(), _opts(self.bins, self.bound, self.made)

    def _ladj(self, x: Tensor, y: Tensor) -> Tensor:
        """One MADE pass over ``y``, and the spline's forward derivative at ``x`` (the
        formula the sampling pass uses, so a cached and a recomputed log-det agree)."""
        layers, (bins, bound, temperature) = self.params()
        return rq_spline(x, _raw(y, layers, bins), bins, bound, temperature)[1]

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, bins={self.bins}, bound={self.bound}"


class ConditionalSplineAutoregressive(ConditionalTransformModule):
    r"""SplineAutoregressive whose MADE also takes a context (every layer, unmasked); see
    :class:`SplineAutoregressive`.

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: MADE hidden widths; ``None`` gives ``[10D]``.
        bins: Number of bins K.
        bound: Half-width B of the interval the spline acts on.
        permutation: Autoregressive order of the MADE; ``None`` is ``0, ..., D-1``.

    Example:
        >>> flow = ConditionalSplineAutoregressive(3, 5)
        >>> flow.condition(torch.zeros(5)).inv(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    autoregressive = True

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        bins: int = 8,
        bound: float = 3.0,
        permutation: Sequence[int] | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.context_dim = check_positive_int("context_dim", context_dim)
        self.bins, self.bound = check_bins_bound(bins, bound)
        self.made = _made(input_dim, hidden_dims, self.bins, context_dim, permutation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start, as :meth:`SplineAutoregressive.reset_parameters`."""
        self.made.reset_parameters()

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        opts = _opts(self.bins, self.bound, self.made)
        return ParamFlow(
            _spline_ar_sample,
            _spline_ar_density,
            (self.made.weights(context), opts),
            "SplineAutoregressive",
            self.input_dim,
            inverse_ladj=True,
        )


def spline_autoregressive(
    input_dim: int, hidden_dims: Sequence[int] | None = None, bins: int = 8, bound: float = 3.0
) -> SplineAutoregressive:
    """A :class:`SplineAutoregressive` layer on ``input_dim`` dimensions."""
    return SplineAutoregressive(input_dim, hidden_dims, bins, bound)


def conditional_spline_autoregressive(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    bins: int = 8,
    bound: float = 3.0,
) -> ConditionalSplineAutoregressive:
    """A :class:`ConditionalSplineAutoregressive` layer."""
    return ConditionalSplineAutoregressive(input_dim, context_dim, hidden_dims, bins, bound)
