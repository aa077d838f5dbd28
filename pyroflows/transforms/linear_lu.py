"""Invertible linear maps parameterised as P L U (Glow's invertible 1x1 convolution)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.nn import functional as F

from pyroflows._utils import check_context, check_hidden_dims, check_positive_int, hypernet
from pyroflows.transforms._base import FlowModule, ParamFlow
from pyroflows.transforms.made import check_permutation

DIAG_MIN = 1e-4
"""Floor of U's diagonal: keeps the map invertible and log|det| finite for any parameters."""

_SHIFT = math.log(math.expm1(1.0 - DIAG_MIN))  # softplus(shift) + DIAG_MIN == 1


def lu_factors(lower: Tensor, upper: Tensor, diag_raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit lower-triangular L, upper-triangular U with diagonal softplus(·) + 10⁻⁴ > 0, and
    log diag(U). The raw vectors ``(*batch, D(D−1)/2)`` fill the strict triangles."""
    d = diag_raw.shape[-1]
    rows, cols = torch.tril_indices(d, d, -1, device=lower.device)
    diag = F.softplus(diag_raw + _SHIFT) + DIAG_MIN
    eye = torch.eye(d, dtype=lower.dtype, device=lower.device)
    if lower.dim() == upper.dim() == diag.dim() == 1:  # one matrix: out-of-place fills
        # (3 ops instead of 7 and no broadcast_shapes, ~15 us: the cost at small D)
        l_mat = eye.index_put((rows, cols), lower)
        return l_mat, torch.diag(diag).index_put((cols, rows), upper), diag.log()
    batch = torch.broadcast_shapes(lower.shape[:-1], upper.shape[:-1], diag_raw.shape[:-1])
    l_mat = eye.expand(*batch, d, d).clone()
    l_mat[..., rows, cols] = lower
    u_mat = torch.diag_embed(diag.expand(*batch, d))
    u_mat[..., cols, rows] = upper
    return l_mat, u_mat, diag.log()


def _linear_lu(
    x: Tensor, lower: Tensor, upper: Tensor, diag_raw: Tensor, bias: Tensor, perm: Tensor
) -> tuple[Tensor, Tensor]:
    """y = P L U x + b, with (P v)_i = v_{perm_i}; log|det J| = Σ log U_ii, O(D)."""
    l_mat, u_mat, log_diag = lu_factors(lower, upper, diag_raw)
    w = l_mat @ u_mat  # (*pbatch, D, D)
    v = x @ w.mT if w.dim() == 2 else (w @ x.unsqueeze(-1)).squeeze(-1)
    y = v[..., perm] + bias
    return y, log_diag.sum(-1).expand(y.shape[:-1])


def _linear_lu_inverse(
    y: Tensor, lower: Tensor, upper: Tensor, diag_raw: Tensor, bias: Tensor, perm: Tensor
) -> tuple[Tensor, Tensor]:
    """x = U⁻¹ L⁻¹ Pᵀ (y − b) by two triangular solves, O(D²) per point; and the forward
    log-det Σ log U_ii."""
    l_mat, u_mat, log_diag = lu_factors(lower, upper, diag_raw)
    rhs = y - bias
    v = torch.empty_like(rhs)
    v[..., perm] = rhs
    if l_mat.dim() == 2:  # one matrix: every point is a column of one solve, (D, N)
        cols = v.reshape(-1, v.shape[-1]).T
        w = torch.linalg.solve_triangular(l_mat, cols, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(u_mat, w, upper=True).T.reshape(v.shape)
    else:  # batched matrices (a conditional flow): one solve per point
        batch = torch.broadcast_shapes(v.shape[:-1], l_mat.shape[:-2])
        v = v.expand(*batch, v.shape[-1]).unsqueeze(-1)
        w = torch.linalg.solve_triangular(l_mat, v, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(u_mat, w, upper=True).squeeze(-1)
    return x, log_diag.sum(-1).expand(x.shape[:-1])


class LinearLU(FlowModule):
    r"""Invertible linear map :math:`y = P L U x + b` (the LU form of Glow's 1x1 conv).

    :math:`P` is a fixed permutation, :math:`L` unit lower triangular, :math:`U` upper
    triangular with a positive diagonal (softplus plus a floor), so the map is always
    invertible and :math:`\log|\det J| = \sum_i \log U_{ii}` costs O(D). With the default
    :math:`P = I` it starts at the identity; a non-identity ``permutation`` sets
    ``starts_at_identity = False``.

    Note:
        The inverse takes two triangular solves, O(D²) per point.

    Args:
        input_dim: Dimension D of the event.
        permutation: The fixed permutation P as an order of ``range(D)``; ``None`` is I.

    Example:
        >>> flow = LinearLU(3)
        >>> flow(torch.ones(2, 3))
        tensor([[1., 1., 1.],
                [1., 1., 1.]], grad_fn=<AddBackward0>)

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    forward_fn = staticmethod(_linear_lu)
    inverse_fn = staticmethod(_linear_lu_inverse)
    inverse_ladj = True

    def __init__(self, input_dim: int, permutation: Sequence[int] | Tensor | None = None) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        n_off = input_dim * (input_dim - 1) // 2
        self.perm: Tensor
        self.register_buffer("perm", check_permutation(permutation, input_dim))
        self.starts_at_identity = bool(torch.equal(self.perm, torch.arange(input_dim)))
        self.lower = nn.Parameter(torch.empty(n_off))
        self.upper = nn.Parameter(torch.empty(n_off))
        self.diag_raw = nn.Parameter(torch.empty(input_dim))
        self.bias = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start (up to P): L = U = I, b = 0."""
        for p in (self.lower, self.upper, self.diag_raw, self.bias):
            nn.init.zeros_(p)

    def params(self) -> tuple[Tensor, ...]:
        return self.lower, self.upper, self.diag_raw, self.bias, self.perm


class ConditionalLinearLU(ConditionalTransformModule):
    r"""LinearLU whose L, U and b come from a context; see :class:`LinearLU`.

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        hidden_dims: Hidden widths of the hypernetwork; ``None`` and ``[]`` give a linear
            map of the context.

    Example:
        >>> flow = ConditionalLinearLU(3, 5)
        >>> flow.condition(torch.zeros(5))(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.context_dim = check_positive_int("context_dim", context_dim)
        n_off = input_dim * (input_dim - 1) // 2
        self.param_dims = [n_off, n_off, input_dim, input_dim]
        self.nn = hypernet(context_dim, check_hidden_dims(hidden_dims, []), self.param_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start for any context: the last bias is zero."""
        with torch.no_grad():
            self.nn[-1].bias.zero_()

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        raws = self.nn(context).split(self.param_dims, -1)
        perm = torch.arange(self.input_dim, device=context.device)
        params = (*raws, perm)
        return ParamFlow(
            _linear_lu, _linear_lu_inverse, params, "LinearLU", self.input_dim, inverse_ladj=True
        )


def linear_lu(input_dim: int) -> LinearLU:
    """A :class:`LinearLU` layer on ``input_dim`` dimensions."""
    return LinearLU(input_dim)


def conditional_linear_lu(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalLinearLU:
    """A :class:`ConditionalLinearLU` layer."""
    return ConditionalLinearLU(input_dim, context_dim, hidden_dims)
