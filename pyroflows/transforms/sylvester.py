"""Sylvester flows (van den Berg et al. 2018): orthogonal, Householder and triangular Q."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.nn import functional as F

from pyroflows._utils import (
    cached_constant,
    check_context,
    check_hidden_dims,
    check_positive_int,
    hypernet,
    monotone_root,
    split_params,
)
from pyroflows.transforms._base import FlowModule, ParamFlow
from pyroflows.transforms._sylvester_q import (
    QSpec,
    is_index_q,
    make_q_spec,
    upper_triangular_pair,
)


def _diag_terms(r_diag: Tensor, rt_diag: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(tanh of both diagonals (*batch, 2M), rᵢᵢ r̃ᵢᵢ, log(1 + rᵢᵢ r̃ᵢᵢ))``.

    :math:`1 + \tanh a \tanh \tilde a = 2\sigma(2a)\sigma(2\tilde a)/\sigma(2a + 2\tilde a)`,
    so its logarithm is a signed sum of log-sigmoids plus :math:`\log 2`, exact even where
    the tanh's round to ±1. Few operations, with tensor operands only: at the small sizes
    where this matters each one costs microseconds of dispatch, and on the CPU a Python
    scalar operand costs an extra tensor per operation.
    """
    if r_diag.shape != rt_diag.shape:
        r_diag, rt_diag = torch.broadcast_tensors(r_diag, rt_diag)
    a = torch.stack([r_diag, rt_diag, r_diag + rt_diag], dim=-2)  # (*batch, 3, M)
    th = torch.tanh(a[..., :2, :])
    log_sig = F.logsigmoid(a + a)
    signs, log2 = _signs(a.shape[-1], a.dtype, a.device)
    if log_sig.dim() == 2:  # log 2 + Σ ± log σ in one matrix-vector product
        log1p_c = torch.addmv(log2, log_sig.mT, signs)
    else:
        log1p_c = torch.matmul(signs, log_sig) + log2
    return th.flatten(-2), th.prod(-2), log1p_c


def sylvester_r(
    r_off: Tensor, rt_off: Tensor, r_diag: Tensor, rt_diag: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Enforce :math:`r_{ii}\tilde r_{ii} > -1` (van den Berg et al. 2018, Theorem 2).

    As in the paper, the diagonals are :math:`r_{ii} = \tanh a_i` and
    :math:`\tilde r_{ii} = \tanh \tilde a_i`; the strict upper triangles are free.

    Returns:
        ``(R, R̃, log1p_c)``: the upper-triangular ``(*batch, M, M)`` matrices and
        :math:`\log(1 + r_{ii}\tilde r_{ii}) = \log 2 + \log\sigma(2a_i) +
        \log\sigma(2\tilde a_i) - \log\sigma(2a_i + 2\tilde a_i)`, exact even where the
        tanh's round to :math:`\pm 1`.
    """
    diags, _, log1p_c = _diag_terms(r_diag, rt_diag)
    r, rt = upper_triangular_pair(r_off, rt_off, diags)
    return r, rt, log1p_c


@cached_constant
def _signs(m: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The signs (+, +, −) of the log-sigmoids in log(1 + c), and log 2 repeated M times."""
    signs = torch.tensor([1.0, 1.0, -1.0], dtype=dtype, device=device)
    return signs, torch.full((m,), math.log(2.0), dtype=dtype, device=device)


def _rowmv(x: Tensor, a: Tensor) -> Tensor:
    """aᵀx for x (*batch, n) and a (*pbatch, n, m), broadcasting: (*batch ∨ pbatch, m)."""
    return (x.unsqueeze(-2) @ a).squeeze(-2)


def _qt(x: Tensor, q: Tensor) -> Tensor:
    """Qᵀx: (*batch, D) -> (*, M); a T-SNF permutation index gathers (no D×D product)."""
    return x.index_select(-1, q) if is_index_q(q) else _rowmv(x, q)


def _qv(v: Tensor, q: Tensor) -> Tensor:
    """Qv: (*, M) -> (*, D); a T-SNF index is its own inverse (identity or reversal)."""
    return v.index_select(-1, q) if is_index_q(q) else _rowmv(v, q.mT)


def _sylvester_unbatched(
    x: Tensor, q: Tensor, r: Tensor, rt: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """``(y, tanh(s))`` of :func:`_sylvester` for one set of parameters: matrix products
    over the flattened batch (a permutation index Q gathers before and after them)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (a view costs ~7 us)
    if is_index_q(q):
        x2q = x2.index_select(-1, q)  # Qᵀx
        a = torch.tanh(torch.addmm(b, x2q, rt.mT))  # (n, M)
        y = torch.addmm(x2q, a, r.mT).index_select(-1, q)  # Q(Qᵀx + R a)
    else:
        a = torch.tanh(torch.addmm(b, x2, q @ rt.mT))  # (n, M)
        y = torch.addmm(x2, a, (q @ r).mT)
    return (y if x.dim() == 2 else y.reshape(x.shape)), a


def _sylvester(
    x: Tensor, q: Tensor, r: Tensor, rt: Tensor, b: Tensor, one_plus_c: Tensor, c: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x + Q R tanh(s), s = R̃ Qᵀx + b, and log|det J| = Σᵢ log(1 + tanh'(sᵢ) cᵢ).

    Shapes: x (*batch, D), q (*p, D, M) or a T-SNF permutation index (D,) (then Qᵀx and Qv
    are gathers, :func:`~pyroflows.transforms._sylvester_q.permutation_q`), r and rt
    (*p, M, M), b, one_plus_c and c (*p, M), with cᵢ = rᵢᵢ r̃ᵢᵢ and ``one_plus_c`` = 1 + cᵢ
    taken from its exact logarithm (:func:`sylvester_r`), floored at the smallest normal
    number. Each log-det term is log((1 + cᵢ) − tanh²(sᵢ) cᵢ), a convex combination of 1 and
    1 + cᵢ, so it stays finite and accurate as cᵢ → −1. Unbatched parameters are folded into
    two D×M matrices first, so the batch costs two matrix products instead of four.
    """
    if r.dim() == 2 and b.dim() == 1 and (q.dim() == 2 or is_index_q(q)):
        y, a = _sylvester_unbatched(x, q, r, rt, b)
    else:
        s = _rowmv(_qt(x, q), rt.mT) + b  # (*, M)
        a = torch.tanh(s)
        y = x + _qv(_rowmv(a, r.mT), q)  # (*, D)
    ladj = torch.log(torch.addcmul(one_plus_c, a * a, c, value=-1)).sum(-1)
    return y, ladj if ladj.dim() == y.dim() - 1 else ladj.reshape(y.shape[:-1])


def _solve_component(t: Tensor, r_ii: Tensor, rt_ii: Tensor, c: Tensor) -> Tensor:
    """Solve the monotone v + rᵢᵢ tanh(r̃ᵢᵢ v + c) = t; the root lies in t ± |rᵢᵢ|.

    The bracket is t ± 2|rᵢᵢ|, so a root at the edge (tanh saturated) is strictly inside it
    and reached by Newton steps rather than by bisection.
    """

    def fn(v: Tensor) -> tuple[Tensor, Tensor]:
        th = torch.tanh(rt_ii * v + c)
        return v + r_ii * th, 1 + r_ii * rt_ii * (1 - th * th)

    half = 2 * r_ii.abs().expand_as(t)
    return monotone_root(fn, t, t - half, t + half)


def _sylvester_inverse(
    y: Tensor, q: Tensor, r: Tensor, rt: Tensor, b: Tensor, one_plus_c: Tensor, c: Tensor
) -> Tensor:
    """Invert Sylvester at any point: with v' = Qᵀy, solve v' = v + R tanh(R̃ v + b).

    The component of y orthogonal to Q's columns is unchanged. R and R̃ are upper
    triangular, so vᵢ depends only on v_{i+1:}: solve from the last component to the first,
    each a monotone scalar equation (vectorised over the batch).
    """
    vp = _qt(y, q)  # (*, M)
    shape = torch.broadcast_shapes(vp.shape, b.shape)
    acc_s = b.expand(shape)  # b + Σ_{k solved} R̃[:, k] v_k
    acc_r = vp.new_zeros(shape)  # Σ_{j solved} R[:, j] tanh(s_j)
    parts: list[Tensor] = []
    for i in reversed(range(shape[-1])):
        r_ii, rt_ii, c = r[..., i, i], rt[..., i, i], acc_s[..., i]
        v_i = _solve_component(vp[..., i] - acc_r[..., i], r_ii, rt_ii, c)
        acc_s = acc_s + rt[..., :, i] * v_i.unsqueeze(-1)
        acc_r = acc_r + r[..., :, i] * torch.tanh(rt_ii * v_i + c).unsqueeze(-1)
        parts.append(v_i)
    v = torch.stack(parts[::-1], dim=-1)  # (*, M)
    return y + _qv(v - vp, q)


def _raw_dims(spec: QSpec) -> tuple[int, ...]:
    """Sizes of the raw parameters (Q, R off-diagonal, R̃ off-diagonal, diagonals, b)."""
    m = spec.num_columns
    k = m * (m - 1) // 2
    return (spec.q_numel, k, k, m, m, m)


def _init_raw_(spec: QSpec, raws: Sequence[Tensor]) -> None:
    """Identity start: R = 0 and b = 0; random Q and R̃ so gradients reach every parameter."""
    q, r_off, rt_off, r_diag, rt_diag, b = raws
    bound = 1 / math.sqrt(spec.num_columns)
    spec.init_raw_(q)
    for p in (r_off, r_diag, b):
        nn.init.zeros_(p)
    for p in (rt_off, rt_diag):
        nn.init.uniform_(p, -bound, bound)


def _params(spec: QSpec, raws: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Constrained ``(Q, R, R̃, b, 1 + c, c)``, c = diag(R) diag(R̃), from the raw parameters."""
    q_raw, r_off, rt_off, r_diag, rt_diag, b = raws
    diags, c, log1p_c = _diag_terms(r_diag, rt_diag)
    r, rt = upper_triangular_pair(r_off, rt_off, diags)
    one_plus_c = log1p_c.exp().clamp_min(torch.finfo(log1p_c.dtype).tiny)
    return spec.build(q_raw, b), r, rt, b, one_plus_c, c


class Sylvester(FlowModule):
    r"""Sylvester flow :math:`y = x + Q R \tanh(\tilde R Q^\top x + b)`.

    :math:`Q` is :math:`D \times M` with orthonormal columns, :math:`R, \tilde R` are
    :math:`M \times M` upper triangular with :math:`r_{ii}\tilde r_{ii} > -1`
    (:func:`sylvester_r`), so :math:`\log|\det J| = \sum_i \log(1 + \tanh'(s_i)
    r_{ii}\tilde r_{ii})`. ``kind`` chooses how :math:`Q` is built:

    - ``"orthogonal"`` (O-SNF): the orthonormal polar factor of :math:`I_{D\times M} + A`
      for a free :math:`A`, by Björck's iteration (``num_ortho_vecs`` = M, default D);
    - ``"householder"`` (H-SNF): a product of ``num_householder`` reflections (default D;
      M = D);
    - ``"triangular"`` (T-SNF): the identity, or the reversal permutation if ``permute``
      (M = D), applied as a gather, never as a D×D matrix; alternate ``permute`` across
      stacked layers.

    Starts at the identity (:math:`R = 0`).

    Note:
        Sylvester has no closed-form inverse. ``log_prob`` still works at any point: the
        part orthogonal to :math:`Q` passes unchanged and the M-dimensional triangular
        system is solved from the last component to the first by safeguarded Newton on
        monotone scalar equations, so scoring an arbitrary point costs more than scoring
        a point this flow sampled (which is read from the cache).

    Args:
        input_dim: Dimension D of the event.
        kind: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
        num_ortho_vecs: Number M ≤ D of columns of Q (``kind="orthogonal"`` only).
        num_householder: Number H of Householder reflections (``kind="householder"`` only).
        permute: Use the reversal permutation for Q (``kind="triangular"`` only).

    Example:
        >>> flow = Sylvester(3, kind="householder")
        >>> flow(torch.zeros(3)).shape
        torch.Size([3])

    References:
        | Sylvester Normalizing Flows for Variational Inference
        | (van den Berg, Hasenclever, Tomczak & Welling, 2018)
        | https://arxiv.org/abs/1803.05649
    """

    forward_fn = staticmethod(_sylvester)
    inverse_fn = staticmethod(_sylvester_inverse)

    def __init__(
        self,
        input_dim: int,
        kind: str = "orthogonal",
        num_ortho_vecs: int | None = None,
        num_householder: int | None = None,
        permute: bool = False,
    ) -> None:
        super().__init__(cache_size=1)
        self.spec = make_q_spec(input_dim, kind, num_ortho_vecs, num_householder, permute)
        self.input_dim = input_dim
        # T-SNF's Jacobian is triangular in a fixed order: permute between layers
        self.autoregressive = kind == "triangular"
        q_dim, k, _, m, _, _ = _raw_dims(self.spec)
        self.q_raw = nn.Parameter(torch.empty(q_dim)) if q_dim else None
        self.r_off = nn.Parameter(torch.empty(k))
        self.rt_off = nn.Parameter(torch.empty(k))
        self.r_diag = nn.Parameter(torch.empty(m))
        self.rt_diag = nn.Parameter(torch.empty(m))
        self.b = nn.Parameter(torch.empty(m))
        self.reset_parameters()

    def _raws(self) -> tuple[Tensor | None, ...]:
        return (self.q_raw, self.r_off, self.rt_off, self.r_diag, self.rt_diag, self.b)

    def reset_parameters(self) -> None:
        """Identity start: R = 0, b = 0; random Q and R̃."""
        q_raw, *rest = self._raws()
        _init_raw_(self.spec, (self.b.new_empty(0) if q_raw is None else q_raw, *rest))

    def params(self) -> tuple[Tensor, ...]:
        return _params(self.spec, self._raws())

    def extra_repr(self) -> str:
        s = self.spec
        return f"input_dim={s.input_dim}, kind={s.kind!r}, M={s.num_columns}"


class ConditionalSylvester(ConditionalTransformModule):
    r"""Sylvester flow whose :math:`Q, R, \tilde R, b` are all emitted from a context vector.

    ``condition(context)`` with ``context`` of shape ``(*batch, context_dim)`` returns a
    parameter-free :class:`Sylvester`-equivalent transform with one set of parameters per
    context (vectorised: no loop over the batch) that broadcasts against the sample's batch
    shape. The options are those of :class:`Sylvester`.

    Note:
        Sylvester has no closed-form inverse. ``log_prob`` still works at any point (a
        triangular system of monotone scalar equations; see :class:`Sylvester`).

    Args:
        input_dim: Dimension D of the event.
        context_dim: Dimension of the context vector.
        kind: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
        hidden_dims: Hidden sizes of the hypernetwork; ``None`` gives ``[4D, 4D]`` and
            ``[]`` a single linear map from the context (as in the paper's VAEs).
        num_ortho_vecs: Number M ≤ D of columns of Q (``kind="orthogonal"`` only).
        num_householder: Number H of Householder reflections (``kind="householder"`` only).
        permute: Use the reversal permutation for Q (``kind="triangular"`` only).

    Example:
        >>> flow = ConditionalSylvester(3, 5, kind="triangular", hidden_dims=[])
        >>> flow.condition(torch.zeros(5))(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        kind: str = "orthogonal",
        hidden_dims: Sequence[int] | None = None,
        num_ortho_vecs: int | None = None,
        num_householder: int | None = None,
        permute: bool = False,
    ) -> None:
        super().__init__()
        self.spec = make_q_spec(input_dim, kind, num_ortho_vecs, num_householder, permute)
        self.input_dim = input_dim
        # T-SNF's Jacobian is triangular in a fixed order: permute between layers
        self.autoregressive = kind == "triangular"
        self.context_dim = check_positive_int("context_dim", context_dim)
        hidden = check_hidden_dims(hidden_dims, [4 * input_dim, 4 * input_dim])
        self.param_dims = _raw_dims(self.spec)
        self.nn = hypernet(context_dim, hidden, self.param_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start: the last bias gives R = 0, b = 0 and a random Q and R̃."""
        with torch.no_grad():
            _init_raw_(self.spec, split_params(self.nn[-1].bias, self.param_dims))

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        raws = split_params(self.nn(context), self.param_dims)
        params = _params(self.spec, raws)
        return ParamFlow(_sylvester, _sylvester_inverse, params, "Sylvester", self.input_dim)


def sylvester(
    input_dim: int,
    kind: str = "orthogonal",
    num_ortho_vecs: int | None = None,
    num_householder: int | None = None,
    permute: bool = False,
) -> Sylvester:
    """A :class:`Sylvester` flow on ``input_dim`` dimensions with Q of the given ``kind``."""
    return Sylvester(input_dim, kind, num_ortho_vecs, num_householder, permute)


def conditional_sylvester(
    input_dim: int,
    context_dim: int,
    kind: str = "orthogonal",
    hidden_dims: Sequence[int] | None = None,
    num_ortho_vecs: int | None = None,
    num_householder: int | None = None,
    permute: bool = False,
) -> ConditionalSylvester:
    """A :class:`ConditionalSylvester` flow; ``hidden_dims=[]`` is a linear hypernetwork."""
    return ConditionalSylvester(
        input_dim, context_dim, kind, hidden_dims, num_ortho_vecs, num_householder, permute
    )
