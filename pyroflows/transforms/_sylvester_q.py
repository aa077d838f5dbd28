"""Building blocks of Sylvester flows: the three constructions of Q and triangular packing.

All functions are pure and vectorised over leading batch dimensions, and create every
tensor on the device and in the dtype of their input.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from math import inf

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from pyroflows._utils import cached_constant, check_positive_int

KINDS = ("orthogonal", "householder", "triangular")
BJORCK_MAX_ITER = 100
_SEQUENTIAL_MAX_H = 3  # up to this many reflections, multiply them out one by one


def _rescale(a: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Divide by the largest |entry| over ``dims`` (floored at the smallest normal number, so
    zero blocks stay zero), so norms cannot overflow."""
    amax = torch.linalg.vector_norm(a, inf, dim=dims, keepdim=True)  # max |entry|
    return a / amax.clamp_min(torch.finfo(a.dtype).tiny)


def _warn_not_converged(max_iter: int, err: float) -> None:
    warnings.warn(
        f"Björck orthonormalisation did not converge in {max_iter} iterations "
        f"(max ||I - QᵀQ||_F = {err:.3g}): the raw Q matrix is numerically rank-deficient, "
        "so Q is not orthonormal and the Sylvester log-det is wrong.",
        RuntimeWarning,
        stacklevel=4,
    )


def bjorck_orthonormalize(a: Tensor, max_iter: int = BJORCK_MAX_ITER) -> Tensor:
    r"""Orthonormalise the columns of ``a`` (``(*batch, D, M)``, M ≤ D) by Björck's iteration.

    :math:`Q \leftarrow Q\,(I + \tfrac12 (I - Q^\top Q))` converges to the orthonormal polar
    factor of ``a`` for every start :math:`a / s` whose singular values lie in
    :math:`(0, \sqrt 3)` (linearly at rate 3/2 for small singular values, then
    quadratically). The scale :math:`s = \min(\|a\|_F, \sqrt{\|a\|_1 \|a\|_\infty})` bounds
    the largest singular value, so the start's lie in :math:`(0, 1]`, and for a
    near-orthonormal ``a`` (the ``I + A`` of O-SNF) they start far above the
    :math:`1/\sqrt M` of the Frobenius norm alone (fewer steps: 7 instead of 10 for
    ``I + 0.02 * noise``, 64 × 32). The batch stops after the step taken when every
    :math:`\|I - Q^\top Q\|_F \le \sqrt{\epsilon}`, which leaves it at rounding level.

    The iteration runs without recording a graph; the gradient is the exact derivative of
    the polar factor (:class:`_PolarFn`), so memory does not grow with the iterations.

    Warns (``RuntimeWarning``) if ``max_iter`` steps do not get there, which only happens
    when ``a`` is numerically rank-deficient; ``Q`` is then not orthonormal.

    References:
        | An iterative algorithm for computing the best estimate of an orthogonal matrix
        | (Björck & Bowie, 1971), https://doi.org/10.1137/0708036
    """
    shape = a.shape
    a = _rescale(a, (-2, -1)).reshape(-1, *shape[-2:])  # (n, D, M)
    if a.shape[0] == 0:
        return a.reshape(shape)
    return _PolarFn.apply(a, max_iter).reshape(shape)


def _bjorck_iterate(
    a: Tensor, max_iter: int, check_every: int | None = None
) -> tuple[Tensor, int]:
    """Björck's iteration on ``(n, D, M)`` (entries at most 1 in size; no graph).

    Returns ``(Q, steps taken)``. Convergence is checked after every ``check_every`` steps:
    by default every step on the CPU and every fourth elsewhere, so the host waits on an
    accelerator at most once per four steps (the extra steps at a converged Q change it only
    at rounding level).
    """
    tiny = torch.finfo(a.dtype).tiny
    spectral_bound = (torch.linalg.matrix_norm(a, 1) * torch.linalg.matrix_norm(a, inf)).sqrt()
    scale = torch.minimum(torch.linalg.matrix_norm(a), spectral_bound).clamp_min(tiny)
    q = a / scale[:, None, None]
    eye = _eye(a.shape[-1], a.dtype, a.device)
    tol = math.sqrt(torch.finfo(a.dtype).eps)
    every = check_every or (1 if a.device.type == "cpu" else 4)
    for step in range(1, max_iter + 1):
        e = torch.baddbmm(eye, q.mT, q, alpha=-1)  # I − QᵀQ
        q = torch.baddbmm(q, q, e, alpha=0.5)
        if (step % every == 0 or step == max_iter) and bool(
            torch.linalg.matrix_norm(e).amax() <= tol
        ):
            return q, step
    err = float(torch.linalg.matrix_norm(torch.baddbmm(eye, q.mT, q, alpha=-1)).amax())
    _warn_not_converged(max_iter, err)
    return q, max_iter


class _PolarFn(torch.autograd.Function):
    r"""Orthonormal polar factor :math:`Q = A (A^\top A)^{-1/2}` by Björck's iteration.

    Backward without unrolling the iteration: with :math:`P = Q^\top A` (symmetric positive
    definite), :math:`dQ = (I - QQ^\top)\, dA\, P^{-1} + Q\Omega`, where the skew
    :math:`\Omega` solves :math:`P\Omega + \Omega P = Q^\top dA - dA^\top Q`. Its adjoint
    gives :math:`\bar A = (I - QQ^\top)\bar Q P^{-1} + 2QY` with
    :math:`PY + YP = \mathrm{skew}(Q^\top \bar Q)`, solved in the eigenbasis of :math:`P`.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, a: Tensor, max_iter: int) -> Tensor:
        q, _ = _bjorck_iterate(a.detach(), max_iter)
        p = q.mT @ a.detach()
        ctx.save_for_backward(q, 0.5 * (p + p.mT))
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor, None]:
        q, p = ctx.saved_tensors
        lam, v = torch.linalg.eigh(p)  # (n, M), (n, M, M)
        qtg = q.mT @ g  # (n, M, M)
        skew = v.mT @ (0.5 * (qtg - qtg.mT)) @ v
        y = v @ (skew / (lam[..., :, None] + lam[..., None, :])) @ v.mT
        resid = g - q @ qtg  # (I - QQᵀ) Ḡ
        grad = (resid @ v / lam[..., None, :]) @ v.mT + 2 * q @ y
        return grad, None


@cached_constant
def _eye(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(d, dtype=dtype, device=device)


@cached_constant
def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=dtype, device=device)


def householder_product(v: Tensor) -> Tensor:
    r""":math:`Q = H_1 \cdots H_H`, :math:`H_k = I - 2 \hat v_k \hat v_k^\top`, from ``v``.

    ``v`` is ``(*batch, H, D)``; returns ``(*batch, D, D)``. For H > 3 it is formed in
    compact WY form, :math:`Q = I - U T U^\top` with :math:`U = [\hat v_1, \dots, \hat v_H]`
    and :math:`T^{-1} = \tfrac12 I + \mathrm{striu}(U^\top U)` (Schreiber & Van Loan 1989;
    Joffrain et al. 2006): three batched matrix products rather than H sequential rank-one
    updates; for H ≤ 3 the rank-one updates are cheaper than the triangular solve. A zero
    :math:`v_k` gives :math:`H_k = I` (no division by zero), so :math:`Q` is orthogonal for
    any input.
    """
    v = _rescale(v, (-1,))  # rows at max |entry| 1 first: the norm cannot overflow
    tiny = torch.finfo(v.dtype).tiny
    u = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(tiny)  # (*b, H, D)
    h, d = u.shape[-2:]
    eye = _eye(d, v.dtype, v.device)  # shared: only read (every use below is out of place)
    if h <= _SEQUENTIAL_MAX_H:  # a few rank-one updates beat the triangular solve
        if u.dim() == 2:
            u0, *rest = u.unbind(0)
            q = torch.addr(eye, u0, u0, alpha=-2)
            for uk in rest:
                q = torch.addr(q, q @ uk, uk, alpha=-2)
            return q
        q = eye
        for uk in u.unbind(-2):
            qu = q @ uk.unsqueeze(-1)
            q = q - (qu + qu) * uk.unsqueeze(-2)
        return q
    t_inv = (u @ u.mT).triu(1)  # (*batch, H, H)
    t_inv.diagonal(dim1=-2, dim2=-1).fill_(0.5)
    w = torch.linalg.solve_triangular(t_inv, u, upper=True)  # T Uᵀ: (*batch, H, D)
    if u.dim() == 2:
        return torch.addmm(eye, u.mT, w, alpha=-1)
    return eye - u.mT @ w


def permutation_q(input_dim: int, permute: bool, like: Tensor) -> Tensor:
    r"""T-SNF's Q as an index ``perm`` (``(D,)``, int64, on ``like``'s device): the identity
    ``0, ..., D-1``, or the reversal if ``permute``.

    Q is the permutation matrix :math:`I[:, \text{perm}]`, so :math:`Q^\top x` =
    ``x[..., perm]`` and, as both choices are their own inverse, :math:`Q v` =
    ``v[..., perm]``: the flow gathers instead of multiplying by a dense D×D matrix (forming
    :math:`Q\tilde R^\top` and :math:`QR` cost O(D³) per call: one layer's forward and
    backward at D = 4,000 took 7.1 s, 0.12 s with the gather, ``python
    benchmarks/large_d.py --sylvester 4000``). :func:`dense_q` gives the matrix.
    """
    return _perm_index(input_dim, permute, like.device)


@cached_constant
def _perm_index(input_dim: int, permute: bool, device: torch.device) -> Tensor:
    index = torch.arange(input_dim, device=device)
    return index.flip(0) if permute else index


def is_index_q(q: Tensor) -> bool:
    """Whether ``q`` is a T-SNF permutation index (:func:`permutation_q`), not a matrix."""
    return not q.is_floating_point()


def dense_q(q: Tensor, like: Tensor) -> Tensor:
    """Q as a ``(*batch, D, M)`` matrix in ``like``'s dtype, also for a permutation index.

    Example:
        >>> dense_q(permutation_q(3, True, torch.zeros(1)), torch.zeros(1))
        tensor([[0., 0., 1.],
                [0., 1., 0.],
                [1., 0., 0.]])
    """
    if not is_index_q(q):
        return q
    return torch.eye(q.numel(), dtype=like.dtype, device=like.device)[:, q]


@cached_constant
def _triangular_pair_index(m: int, device: torch.device) -> Tensor:
    """Flat positions in a ``(2, M, M)`` buffer of [R's strict upper part (row-major),
    R̃'s, R's diagonal, R̃'s diagonal], the order :func:`upper_triangular_pair` packs."""
    rows, cols = torch.triu_indices(m, m, 1)
    off = rows * m + cols
    diag = torch.arange(m) * (m + 1)
    return torch.cat([off, off + m * m, diag, diag + m * m]).to(device)


def upper_triangular_pair(r_off: Tensor, rt_off: Tensor, diags: Tensor) -> tuple[Tensor, Tensor]:
    """Two upper-triangular ``(*batch, M, M)`` matrices R, R̃ filled by one scatter.

    ``r_off``/``rt_off`` are their strict upper parts ``(*batch, M(M-1)/2)`` (row-major) and
    ``diags`` is ``(*batch, 2M)``: R's diagonal, then R̃'s. Leading dimensions broadcast.

    Example:
        >>> r, rt = upper_triangular_pair(
        ...     torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
        >>> r
        tensor([[1., 1.],
                [0., 1.]])
        >>> rt
        tensor([[0., 2.],
                [0., 0.]])
    """
    m = diags.shape[-1] // 2
    parts = [r_off, rt_off, diags]
    if not r_off.shape[:-1] == rt_off.shape[:-1] == diags.shape[:-1]:
        batch = torch.broadcast_shapes(*(t.shape[:-1] for t in parts))
        parts = [t.expand(*batch, t.shape[-1]) for t in parts]
    vals = torch.cat(parts, dim=-1)
    zeros = _zeros(2 * m * m, vals.dtype, vals.device)  # shared: index_copy is out of place
    if vals.dim() > 1:
        zeros = zeros.expand(*vals.shape[:-1], 2 * m * m)
    flat = zeros.index_copy(-1, _triangular_pair_index(m, vals.device), vals)
    r, rt = flat.unflatten(-1, (2, m, m)).unbind(-3)
    return r, rt


@dataclass(frozen=True)
class QSpec:
    """How a Sylvester flow builds its ``(D, M)`` matrix Q from raw parameters."""

    kind: str
    input_dim: int
    num_columns: int  # M
    num_householder: int  # H (householder only)
    permute: bool  # reversal permutation (triangular only)

    @property
    def q_numel(self) -> int:
        """Number of raw parameters behind Q."""
        d = self.input_dim
        sizes = {"orthogonal": d * self.num_columns, "householder": self.num_householder * d}
        return sizes.get(self.kind, 0)

    def build(self, raw: Tensor | None, like: Tensor) -> Tensor:
        """Q ``(*batch, D, M)`` from raw parameters ``(*batch, q_numel)`` (``None``: none)."""
        d, m = self.input_dim, self.num_columns
        if raw is None or self.kind == "triangular":
            return permutation_q(d, self.permute, like)
        if self.kind == "orthogonal":
            eye = torch.eye(d, m, dtype=raw.dtype, device=raw.device)
            return bjorck_orthonormalize(raw.unflatten(-1, (d, m)) + eye)
        return householder_product(raw.unflatten(-1, (self.num_householder, d)))

    def init_raw_(self, raw: Tensor) -> None:
        """Random start for the raw Q parameters: ``U(-1/√D, 1/√D)``."""
        bound = 1 / math.sqrt(self.input_dim)
        nn.init.uniform_(raw, -bound, bound)


def make_q_spec(
    input_dim: int,
    kind: str,
    num_ortho_vecs: int | None,
    num_householder: int | None,
    permute: bool,
) -> QSpec:
    """Validate the Q options of a Sylvester flow; defaults are M = D and H = D."""
    d = check_positive_int("input_dim", input_dim)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if not isinstance(permute, bool):
        raise TypeError(f"permute must be a bool; got {permute!r}")
    if permute and kind != "triangular":
        raise ValueError(f"permute=True only applies to kind='triangular'; got kind={kind!r}")
    if num_ortho_vecs is not None and kind != "orthogonal":
        raise ValueError(f"num_ortho_vecs only applies to kind='orthogonal'; got kind={kind!r}")
    if num_householder is not None and kind != "householder":
        raise ValueError(f"num_householder only applies to kind='householder'; got kind={kind!r}")
    m = d if num_ortho_vecs is None else check_positive_int("num_ortho_vecs", num_ortho_vecs)
    if m > d:
        raise ValueError(f"num_ortho_vecs must be at most input_dim={d}; got {m}")
    h = d if num_householder is None else check_positive_int("num_householder", num_householder)
    return QSpec(kind, d, m, h if kind == "householder" else 0, permute)
