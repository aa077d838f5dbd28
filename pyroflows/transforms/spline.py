"""Rational-quadratic spline coupling flows (Durkan et al. 2019) with linear tails."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from pyroflows._utils import check_positive_int
from pyroflows.transforms._coupling import (
    ConditionalCouplingFlow,
    CouplingFlow,
    ElementwisePair,
)

MIN_BIN = 1e-3
"""Floor of every bin width and height (as a fraction of the interval) and of every knot
derivative: keeps the spline strictly monotone and its inverse well-conditioned."""

_DERIV_SHIFT = math.log(math.expm1(1.0 - MIN_BIN))  # softplus(shift) + MIN_BIN == 1


def _knots(
    raw: Tensor, bins: int, bound: float, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Knot positions ``(xs, ys)`` ``(*batch, K+1)`` and derivatives ``(*batch, K+1)``.

    ``raw`` is ``(*batch, 3K − 1)``: K widths, K heights, K − 1 interior derivatives. The
    boundary derivatives are 1, so the spline joins the identity tails with a continuous
    derivative. Zero raw values give the identity. Width and height logits are divided by
    ``temperature`` (√ of the conditioner's last fan-in, as in Durkan et al.'s code), so
    the bins' softmax does not saturate as the conditioner widens.
    """
    rw, rh = raw[..., :bins] / temperature, raw[..., bins : 2 * bins] / temperature
    rd = raw[..., 2 * bins :] / temperature

    def positions(r: Tensor) -> Tensor:
        frac = MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(r, -1)
        cum = F.pad(torch.cumsum(frac, -1), (1, 0))
        # exact end points: the last knot is `bound`, not bound up to rounding
        return torch.cat(
            [2 * bound * cum[..., :-1] - bound, cum.new_full(cum[..., :1].shape, bound)], -1
        )

    deriv = F.pad(F.softplus(rd + _DERIV_SHIFT) + MIN_BIN, (1, 1), value=1.0)
    return positions(rw), positions(rh), deriv


def _bin_params(
    knots: tuple[Tensor, Tensor, Tensor], v: Tensor, along_y: bool
) -> tuple[Tensor, ...]:
    """Gather ``(x_k, w_k, y_k, h_k, d_k, d_{k+1})`` of the bin containing ``v`` (*batch,)."""
    xs, ys, ds = knots
    ref = ys if along_y else xs
    ref = ref.expand(*v.shape, ref.shape[-1])
    k = (v[..., None] >= ref[..., 1:-1]).sum(-1, keepdim=True)  # bin index (*batch, 1)

    def take(t: Tensor, offset: int = 0) -> Tensor:
        return t.expand(*v.shape, t.shape[-1]).gather(-1, k + offset)[..., 0]

    x0, x1, y0, y1 = take(xs), take(xs, 1), take(ys), take(ys, 1)
    return x0, x1 - x0, y0, y1 - y0, take(ds), take(ds, 1)


def rq_spline(
    xb: Tensor, raw: Tensor, bins: int, bound: float, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline on [−B, B], identity outside (Durkan et al. 2019,
    Eq. 4 and App. A); returns ``(y, Σ log y')``."""
    knots = _knots(raw, bins, bound, temperature)  # each (*batch, D_b, K+1)
    inside = xb.abs() <= bound
    xc = xb.clamp(-bound, bound)  # keeps the unused branch finite (and its gradient zero)
    x0, w, y0, h, d0, d1 = _bin_params(knots, xc, along_y=False)
    s = h / w
    xi = (xc - x0) / w
    t = xi * (1 - xi)
    denom = s + (d0 + d1 - 2 * s) * t
    y = y0 + h * (s * xi * xi + d0 * t) / denom
    y = torch.where(inside, y, xb)
    return y, _masked_ladj(inside, xi, s, d0, d1)


def _masked_ladj(inside: Tensor, xi: Tensor, s: Tensor, d0: Tensor, d1: Tensor) -> Tensor:
    """Σ log g'(x) over the event: the bin's derivative (Durkan et al. 2019, Eq. 5) inside
    [−B, B], 0 in the identity tails."""
    t = xi * (1 - xi)
    denom = s + (d0 + d1 - 2 * s) * t
    dnum = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2
    ladj = 2 * torch.log(s) + torch.log(dnum) - 2 * torch.log(denom)
    return torch.where(inside, ladj, torch.zeros_like(ladj)).sum(-1)


def rq_spline_inverse(
    yb: Tensor, raw: Tensor, bins: int, bound: float, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Analytic inverse: the root in [0, 1] of the bin's quadratic (Durkan et al. 2019,
    App. A.3), written in the cancellation-free form 2c / (−b − √(b² − 4ac)); returns
    ``(x, Σ log g'(x))``."""
    knots = _knots(raw, bins, bound, temperature)
    inside = yb.abs() <= bound
    yc = yb.clamp(-bound, bound)
    x0, w, y0, h, d0, d1 = _bin_params(knots, yc, along_y=True)
    s = h / w
    dy = yc - y0
    a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
    b = h * d0 - dy * (d1 + d0 - 2 * s)
    c = -s * dy
    disc = (b * b - 4 * a * c).clamp_min(0)
    xi = (2 * c) / (-b - disc.sqrt())
    return torch.where(inside, x0 + xi * w, yb), _masked_ladj(inside, xi, s, d0, d1)


def _pair(bins: int, bound: float, temperature: float) -> ElementwisePair:
    opts = {"bins": bins, "bound": bound, "temperature": temperature}
    return partial(rq_spline, **opts), partial(rq_spline_inverse, **opts)


def spline_temperature(last_weight: Tensor) -> float:
    """√ of the fan-in of a conditioner's last layer, weight ``(out, in)`` (at least 1)."""
    return math.sqrt(max(last_weight.shape[1], 1))


def check_bins_bound(bins: int, bound: float) -> tuple[int, float]:
    check_positive_int("bins", bins)
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ValueError(f"bound must be a positive number; got {bound!r}")
    if not math.isfinite(bound):
        raise ValueError(f"bound must be finite; got {bound!r}")
    return bins, float(bound)


class SplineCoupling(CouplingFlow):
    r"""Rational-quadratic spline coupling: :math:`y_a = x_a`, :math:`y_b = g(x_b; x_a)`.

    Each coordinate of ``b`` (all but the first ``D // 2``) goes through a monotone
    rational-quadratic spline with K bins on :math:`[-B, B]` whose widths, heights and
    interior knot derivatives come from an MLP of :math:`x_a`; outside the interval the
    map is the identity (linear tails, boundary derivatives 1). Starts near the identity
    (zero raw parameters give equal bins and unit derivatives). A stack reverses the
    coordinates between layers (``coupling = True``), so the halves alternate.

    Note:
        The inverse is analytic (one quadratic per coordinate), so scoring any point costs
        one conditioner pass, like sampling.

    Args:
        input_dim: Dimension D of the event.
        hidden_dims: Hidden widths of the conditioner MLP; ``None`` gives ``[10D]``.
        bins: Number of bins K.
        bound: Half-width B of the interval the spline acts on.

    Example:
        >>> flow = SplineCoupling(4)
        >>> y = flow(torch.ones(2, 4))
        >>> torch.allclose(flow.inv(y.clone()), torch.ones(2, 4), atol=1e-6)
        True

    References:
        | Neural Spline Flows (Durkan, Bekasov, Murray, Papamakarios, 2019)
        | https://arxiv.org/abs/1906.04032
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        bins: int = 8,
        bound: float = 3.0,
    ) -> None:
        self.bins, self.bound = check_bins_bound(bins, bound)
        self.params_per_dim = 3 * bins - 1
        super().__init__(input_dim, hidden_dims)
        self.reset_parameters()

    def elementwise(self) -> ElementwisePair:
        return _pair(self.bins, self.bound, spline_temperature(self.net.weight[-1]))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, bins={self.bins}, bound={self.bound}"


class ConditionalSplineCoupling(ConditionalCouplingFlow):
    r"""Spline coupling whose conditioner also takes a context; see :class:`SplineCoupling`.

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: Hidden widths of the conditioner; ``None`` gives ``[10D]``, ``[]`` a
            linear map of ``(x_a, context)``.
        bins: Number of bins K.
        bound: Half-width B of the interval the spline acts on.

    Example:
        >>> flow = ConditionalSplineCoupling(4, 5)
        >>> flow.condition(torch.zeros(5))(torch.zeros(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        bins: int = 8,
        bound: float = 3.0,
    ) -> None:
        self.bins, self.bound = check_bins_bound(bins, bound)
        self.params_per_dim = 3 * bins - 1
        super().__init__(input_dim, context_dim, hidden_dims)
        self.reset_parameters()

    def elementwise(self) -> ElementwisePair:
        return _pair(self.bins, self.bound, spline_temperature(self.net.weight[-1]))


def spline(
    input_dim: int, hidden_dims: Sequence[int] | None = None, bins: int = 8, bound: float = 3.0
) -> SplineCoupling:
    """A :class:`SplineCoupling` layer on ``input_dim`` dimensions."""
    return SplineCoupling(input_dim, hidden_dims, bins, bound)


def conditional_spline(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    bins: int = 8,
    bound: float = 3.0,
) -> ConditionalSplineCoupling:
    """A :class:`ConditionalSplineCoupling` layer."""
    return ConditionalSplineCoupling(input_dim, context_dim, hidden_dims, bins, bound)
