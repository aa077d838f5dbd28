"""Planar flows (Rezende & Mohamed 2015), with an inverse for arbitrary points."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from pyroflows._utils import (
    check_context,
    check_hidden_dims,
    check_positive_int,
    hypernet,
    monotone_root,
    split_params,
)
from pyroflows.transforms._base import FlowModule, ParamFlow
from pyroflows.transforms._planar_stack import planar_stack


def planar_u_hat(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    r"""Enforce :math:`w^\top \hat u > -1` (Rezende & Mohamed 2015, App. A.1), finitely.

    :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` with
    :math:`m(a) = a` for :math:`a \ge 0` and :math:`m(a) = e^a - 1` below, so
    :math:`w^\top \hat u = m(w^\top u) > -1`. Unlike the paper's
    :math:`m(a) = -1 + \mathrm{softplus}(a)`, the correction vanishes whenever
    :math:`w^\top u \ge 0` and is :math:`O(\|u\|^2 \|w\|)` otherwise, so :math:`\hat u`
    stays finite (and equals ``u``) as :math:`w \to 0`, where Pyro's version divides 0 by 0.

    Returns:
        ``(u_hat, one_plus_c)`` with :math:`1 + w^\top \hat u` computed without
        cancellation (it is :math:`e^a` for :math:`a < 0`), so the log-det stays accurate
        even where :math:`w^\top \hat u` itself rounds to :math:`-1`.
    """
    a = torch.linalg.vecdot(w, u).unsqueeze(-1)  # (*batch, 1)
    a_neg = a.clamp(max=0)
    gap = torch.expm1(a_neg) - a_neg  # m(a) - a; exactly 0 where a >= 0
    n2 = torch.linalg.vecdot(w, w).unsqueeze(-1).clamp_min(torch.finfo(w.dtype).tiny)
    # 1 + m(a) = e^{min(a,0)} + max(a, 0), with max(a, 0) written as a − min(a, 0) so that
    # autograd gives m'(0) = 1 at the identity start a = 0 (two clamps would give 2)
    one_plus_c = torch.exp(a_neg) + (a - a_neg)
    return torch.addcmul(u, gap / n2, w), one_plus_c.squeeze(-1)


def _planar(
    x: Tensor, u_hat: Tensor, w: Tensor, b: Tensor, one_plus_c: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x + û tanh(s), s = wᵀx + b, and log|det J| = log(1 + tanh'(s) wᵀû).

    The log-det is evaluated as log(tanh²(s) + (1 − tanh²(s))(1 + wᵀû)), a sum of
    non-negative terms, so it stays finite and accurate as wᵀû → −1.
    """
    s = (x @ w if w.dim() == 1 else torch.linalg.vecdot(x, w)) + b  # (*batch,)
    a = torch.tanh(s)
    y = torch.addcmul(x, u_hat, a.unsqueeze(-1))  # (*batch, D)
    # a convex combination of 1 and 1 + wᵀû, so >= min(1 + wᵀû, 1) > 0 after the floor,
    # in the form that stays exact for a huge 1 + wᵀû where tanh² rounds to 1
    th2 = a * a
    det = torch.addcmul(th2, 1 - th2, one_plus_c.clamp_min(torch.finfo(a.dtype).tiny))
    return y, torch.log(det)


def _planar_inverse(y: Tensor, u_hat: Tensor, w: Tensor, b: Tensor, one_plus_c: Tensor) -> Tensor:
    """Invert planar: s = wᵀx + b solves the monotone s + (wᵀû) tanh(s) = wᵀy + b."""
    t = (y * w).sum(-1) + b  # (*batch,)
    c = (one_plus_c - 1).expand_as(t)  # wᵀû

    def fn(s: Tensor) -> tuple[Tensor, Tensor]:
        th = torch.tanh(s)
        return s + c * th, 1 + c * (1 - th * th)

    # |s - t| <= |c| |tanh s|; widened so a root at a saturated tanh is not on the edge
    s = monotone_root(fn, t, t - 2 * c.abs() - 1, t + 2 * c.abs() + 1)
    return y - u_hat * torch.tanh(s).unsqueeze(-1)


class Planar(FlowModule):
    r"""Planar flow :math:`y = x + \hat u \tanh(w^\top x + b)`.

    :math:`\log|\det J| = \log(1 + \tanh'(w^\top x + b)\, w^\top \hat u)`, with
    :math:`w^\top \hat u > -1` enforced by :func:`planar_u_hat` so the map is invertible.
    Starts at the identity (``u = 0``).

    Note:
        Planar has no closed-form inverse. ``log_prob`` still works at any point: the inverse
        solves the monotone scalar equation along :math:`w` by safeguarded Newton to float
        tolerance (a few iterations), so scoring an arbitrary point costs more than scoring
        a point this flow sampled (which is read from the cache).

    Args:
        input_dim: Dimension D of the event.

    Example:
        >>> flow = Planar(3)
        >>> flow(torch.zeros(3)).shape
        torch.Size([3])

    References:
        | Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        | https://arxiv.org/abs/1505.05770
    """

    forward_fn = staticmethod(_planar)
    inverse_fn = staticmethod(_planar_inverse)

    def __init__(self, input_dim: int) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.u = nn.Parameter(torch.empty(input_dim))
        self.w = nn.Parameter(torch.empty(input_dim))
        self.b = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: ``u = 0``, ``b = 0``, ``w ~ U(-1/√D, 1/√D)``."""
        bound = 1 / math.sqrt(self.input_dim)
        nn.init.zeros_(self.u)
        nn.init.uniform_(self.w, -bound, bound)
        nn.init.zeros_(self.b)

    def params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u_hat, one_plus_c = planar_u_hat(self.u, self.w)
        return u_hat, self.w, self.b, one_plus_c


class ConditionalPlanar(ConditionalTransformModule):
    r"""Planar flow whose :math:`u, w, b` are emitted from a context vector.

    ``condition(context)`` with ``context`` of shape ``(*batch, context_dim)`` returns a
    parameter-free :class:`Planar`-equivalent transform with batched parameters that
    broadcast against the sample's batch shape.

    Note:
        Planar has no closed-form inverse. ``log_prob`` still works at any point (safeguarded
        Newton along :math:`w`; see :class:`Planar`).

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: Hidden sizes of the hypernetwork; ``None`` gives ``[10D, 10D]`` and
            ``[]`` a single linear map from the context (as in the flow papers).

    Example:
        >>> flow = ConditionalPlanar(3, 5, hidden_dims=[])
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
        self.param_dims = (input_dim, input_dim, 1)
        self.nn = hypernet(context_dim, hidden, self.param_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: the last bias gives ``u = 0``, ``b = 0`` and a random ``w``."""
        bound = 1 / math.sqrt(self.input_dim)
        bias = self.nn[-1].bias
        with torch.no_grad():
            bias.zero_()
            bias[self.input_dim : 2 * self.input_dim].uniform_(-bound, bound)

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        u, w, b = split_params(self.nn(context), self.param_dims)
        u_hat, one_plus_c = planar_u_hat(u, w)
        params = (u_hat, w, b.squeeze(-1), one_plus_c)
        return ParamFlow(_planar, _planar_inverse, params, "Planar", self.input_dim)


def planar_stack_inverse(
    y: Tensor, u_hat: Tensor, w: Tensor, b: Tensor, one_plus_c: Tensor
) -> Tensor:
    """Invert :func:`planar_stack` (parameters stacked on a leading K axis), last layer first."""
    for k in range(u_hat.shape[0] - 1, -1, -1):
        y = _planar_inverse(y, u_hat[k], w[k], b[k], one_plus_c[k])
    return y


class ConditionalPlanarStack(ConditionalTransformModule):
    r"""K amortized planar layers from one linear head, run as a single autograd node.

    Equivalent to K :class:`ConditionalPlanar` layers with ``hidden_dims=[]`` (each layer's
    :math:`u_k, w_k, b_k` a linear function of the context), but all K parameter sets come
    from one matrix product (the paper's single amortization head), the constraint is
    applied to all layers at once, and the K layers run in one custom autograd function
    with a hand-written backward. This is the speed path of
    :class:`~pyroflows.vae.FlowEncoder` for ``flow="planar"``.

    Note:
        Planar has no closed-form inverse. ``log_prob`` still works at any point (safeguarded
        Newton along each :math:`w_k`, last layer first; see :class:`Planar`).

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        num_flows: Number of planar layers K.

    Example:
        >>> stack = ConditionalPlanarStack(3, 5, num_flows=4)
        >>> stack.condition(torch.zeros(2, 5))(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, input_dim: int, context_dim: int, num_flows: int) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.context_dim = check_positive_int("context_dim", context_dim)
        self.num_flows = check_positive_int("num_flows", num_flows)
        self.param_dims = (input_dim, input_dim, 1)
        self.nn = hypernet(context_dim, [], [num_flows * (2 * input_dim + 1)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: every layer has ``u = 0``, ``b = 0`` and a random ``w``."""
        bound = 1 / math.sqrt(self.input_dim)
        bias = self.nn[-1].bias.view(self.num_flows, 2 * self.input_dim + 1)
        with torch.no_grad():
            bias.zero_()
            bias[:, self.input_dim : 2 * self.input_dim].uniform_(-bound, bound)

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        out = self.nn(context).unflatten(-1, (self.num_flows, -1)).movedim(-2, 0)
        u, w, b = split_params(out, self.param_dims)  # (K, *batch, ·)
        u_hat, one_plus_c = planar_u_hat(u, w)
        params = (u_hat, w, b.squeeze(-1), one_plus_c)
        return ParamFlow(planar_stack, planar_stack_inverse, params, "PlanarStack", self.input_dim)


def planar(input_dim: int) -> Planar:
    """A :class:`Planar` flow on ``input_dim`` dimensions."""
    return Planar(input_dim)


def conditional_planar(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalPlanar:
    """A :class:`ConditionalPlanar` flow; ``hidden_dims=[]`` is a linear hypernetwork."""
    return ConditionalPlanar(input_dim, context_dim, hidden_dims)
