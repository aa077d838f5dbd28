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


def lu_factors(lu: Tensor) -> tuple[Tensor, Tensor]:
    """The packed factors ``m`` of raw ``lu`` ``(*batch, D, D)`` and log diag(U).

    L = I + the strict lower triangle of ``m`` (unit lower triangular) and U = the upper
    triangle of ``m``, whose diagonal is softplus(diag ``lu``) + 10⁻⁴ > 0 (zuko's packing
    with a positive diagonal). Triangular solves read their triangle of ``m`` directly.
    """
    diag = F.softplus(lu.diagonal(dim1=-2, dim2=-1) + _SHIFT) + DIAG_MIN  # (*batch, D)
    return lu.diagonal_scatter(diag, dim1=-2, dim2=-1), diag.log()


def _more_points_than_dims(x: Tensor) -> bool:
    """Whether forming the D x D matrix (D³) costs less than a second pass over the points."""
    d = x.shape[-1]
    return d > 0 and x.numel() // d > d


def _matvec(a: Tensor, v: Tensor) -> Tensor:
    """``a @ v`` for every point of ``v`` ``(*batch, D)``; ``a`` is (D, D) or batched."""
    return v @ a.mT if a.dim() == 2 else (a @ v.unsqueeze(-1)).squeeze(-1)


def _linear_lu(x: Tensor, lu: Tensor, bias: Tensor, perm: Tensor | None) -> tuple[Tensor, Tensor]:
    """y = P L U x + b, with (P v)_i = v_{perm_i} (``None``: P = I); log|det J| = Σ log U_ii.

    One matrix and more points N than D: W = P L U is formed once (D³ + N D²); fewer points go
    through U, then L (2 N D², no D³). Batched matrices (a conditional flow): per point.
    """
    m, log_diag = lu_factors(lu)
    upper, strict_lower = m.triu(), m.tril(-1)
    if m.dim() == 2 and _more_points_than_dims(x):
        w = torch.addmm(upper, strict_lower, upper)  # (I + L₀) U
        w = w if perm is None else w[perm]
        y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), w.mT).reshape(x.shape)
    else:
        u_x = _matvec(upper, x)
        l_u_x = u_x + _matvec(strict_lower, u_x)
        y = (l_u_x if perm is None else l_u_x[..., perm]) + bias
    return y, log_diag.sum(-1).expand(y.shape[:-1])


def _linear_lu_inverse(
    y: Tensor, lu: Tensor, bias: Tensor, perm: Tensor | None
) -> tuple[Tensor, Tensor]:
    """x = U⁻¹ L⁻¹ Pᵀ (y − b), and the forward log-det Σ log U_ii.

    One matrix and more points N than D: W⁻¹ is formed by two triangular solves against Pᵀ
    (D³) and applied in one product whose input needs no gradient (N D²); fewer points are
    the columns of two triangular solves (2 N D²). Batched matrices: two solves per point.
    """
    m, log_diag = lu_factors(lu)
    d = y.shape[-1]
    solve = torch.linalg.solve_triangular
    if m.dim() == 2 and _more_points_than_dims(y):
        p_t = torch.eye(d, dtype=y.dtype, device=y.device)
        p_t = p_t if perm is None else p_t[perm].mT
        w_inv = solve(m, solve(m, p_t, upper=False, unitriangular=True), upper=True)
        x = torch.addmm(-(bias @ w_inv.mT), y.reshape(-1, d), w_inv.mT).reshape(y.shape)
        return x, log_diag.sum(-1).expand(x.shape[:-1])
    rhs = y - bias
    if perm is not None:
        rhs = torch.empty_like(rhs).index_copy_(-1, perm, rhs)  # Pᵀ: v_{perm_i} = rhs_i
    if m.dim() == 2:  # every point is a column of one solve, (D, N)
        cols = rhs.reshape(-1, d).mT
        cols = solve(m, solve(m, cols, upper=False, unitriangular=True), upper=True)
        x = cols.mT.reshape(y.shape)
    else:  # batched matrices (a conditional flow): one solve per point
        batch = torch.broadcast_shapes(rhs.shape[:-1], m.shape[:-2])
        col = rhs.expand(*batch, d).unsqueeze(-1)
        x = solve(m, solve(m, col, upper=False, unitriangular=True), upper=True).squeeze(-1)
    return x, log_diag.sum(-1).expand(x.shape[:-1])


class LinearLU(FlowModule):
    r"""Invertible linear map :math:`y = P L U x + b` (the LU form of Glow's 1x1 conv).

    :math:`P` is a fixed permutation, :math:`L` unit lower triangular, :math:`U` upper
    triangular with a positive diagonal (softplus plus a floor), so the map is always
    invertible and :math:`\log|\det J| = \sum_i \log U_{ii}` costs O(D). With the default
    :math:`P = I` it starts at the identity; a non-identity ``permutation`` sets
    ``starts_at_identity = False``.

    Note:
        Both directions cost the same: a batch of N > D points is mapped by one D x D
        matrix, W or W⁻¹, formed once per call (a product, or two triangular solves: D³);
        N ≤ D points go through the two triangular factors (products, or solves: 2 N D²).

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
    affine = True

    def __init__(self, input_dim: int, permutation: Sequence[int] | Tensor | None = None) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.perm: Tensor
        self.register_buffer("perm", check_permutation(permutation, input_dim))
        self._note_permutation()
        #: raw L and U in one matrix: strict lower triangle L, strict upper triangle U, and
        #: the diagonal of U before its positivity map (:func:`lu_factors`)
        self.lu = nn.Parameter(torch.empty(input_dim, input_dim))
        self.bias = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def _note_permutation(self) -> None:
        self.starts_at_identity = bool(torch.equal(self.perm.cpu(), torch.arange(self.input_dim)))

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._note_permutation()  # the loaded buffer may hold another permutation

    def reset_parameters(self) -> None:
        """Identity start (up to P): L = U = I, b = 0."""
        for p in (self.lu, self.bias):
            nn.init.zeros_(p)

    def params(self) -> tuple[Tensor, ...]:
        return self.lu, self.bias, None if self.starts_at_identity else self.perm


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
        self.param_dims = [input_dim * input_dim, input_dim]  # raw L and U (lu_factors), b
        self.nn = hypernet(context_dim, check_hidden_dims(hidden_dims, []), self.param_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-identity start for any context: the last bias is zero."""
        with torch.no_grad():
            self.nn[-1].bias.zero_()

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        lu, bias = self.nn(context).split(self.param_dims, -1)
        params = (lu.unflatten(-1, (self.input_dim, self.input_dim)), bias, None)
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
