r"""Posterior mode and Laplace approximation in unconstrained space (the start of :class:`VI`).

:func:`find_mode` minimises the potential :math:`U(z) = -\log p(x, T(z)) - \log|J_T(z)|`
with L-BFGS (strong-Wolfe line search), then polishes with damped Newton steps on the exact
autograd Hessian, which converge quadratically where L-BFGS stalls on long, thin ridges.
Non-finite values met on the way are treated as "too far": the line searches backtrack from
them. :func:`laplace_factor` turns the Hessian at the mode into the lower-triangular factor
:math:`L_0` of the Laplace covariance :math:`H^{-1} = L_0 L_0^\top`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LogDensityFn = Callable[[Tensor], Tensor]


@dataclass
class Mode:
    r"""Result of :func:`find_mode`.

    Attributes:
        z: The last iterate ``(D,)``: the mode when ``found``.
        log_density: :math:`\log p` at ``z`` (up to the model's constant).
        hessian: Hessian of the potential at ``z`` ``(D, D)`` (``None`` if not computed).
        found: Whether a finite mode with a positive-definite Hessian was reached.
        message: Why not, or how it was found.
        evaluations: Log-density gradient evaluations spent (a Hessian costs ``D``).
    """

    z: Tensor
    log_density: float
    hessian: Tensor | None
    found: bool
    message: str
    evaluations: int


class _Counted:
    """The potential ``-log_density``, counting evaluations and guarding non-finite values."""

    def __init__(self, log_density: LogDensityFn) -> None:
        self.log_density = log_density
        self.evaluations = 0

    def __call__(self, z: Tensor) -> Tensor:
        self.evaluations += 1
        try:
            return -self.log_density(z)
        except ValueError:  # a distribution's argument check at a wild trial point: too far
            return torch.full((), float("nan"), dtype=z.dtype, device=z.device)

    def value_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z = z.detach().requires_grad_()
        u = self(z)
        if not torch.isfinite(u):
            return u.detach(), torch.full_like(z, float("nan"))
        (g,) = torch.autograd.grad(u, z)
        return u.detach(), g

    def hessian(self, z: Tensor) -> Tensor:
        self.evaluations += z.numel()
        try:
            h = torch.autograd.functional.hessian(lambda v: -self.log_density(v), z.detach())
        except ValueError:
            return torch.full((len(z), len(z)), float("nan"), dtype=z.dtype, device=z.device)
        return 0.5 * (h + h.T)


def _lbfgs(u: _Counted, z0: Tensor, max_iter: int) -> Tensor:
    """L-BFGS from ``z0``; non-finite trial points return a large value and a zero gradient."""
    z = z0.detach().clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    best = {"u": float("inf"), "z": z0.detach().clone()}

    def closure() -> Tensor:
        opt.zero_grad()
        value = u(z)
        if not torch.isfinite(value) or not bool(torch.isfinite(z).all()):
            z.grad = torch.zeros_like(z)
            # a finite "wall": the strong-Wolfe search then backtracks towards finite points
            wall = best["u"] if best["u"] < float("inf") else 0.0
            return torch.tensor(wall + 1e6 * (1.0 + abs(wall)), dtype=z.dtype)
        value.backward()
        if not bool(torch.isfinite(z.grad).all()):
            z.grad = torch.zeros_like(z)
        if float(value.detach()) < best["u"]:
            best["u"], best["z"] = float(value.detach()), z.detach().clone()
        return value.detach()

    try:
        opt.step(closure)
    except (RuntimeError, ValueError):  # e.g. a distribution rejecting a wild trial point
        pass
    return best["z"]


def _newton(u: _Counted, z: Tensor, max_iter: int, tol: float) -> tuple[Tensor, Tensor, bool]:
    """Damped Newton with a backtracking (Armijo) line search; returns (z, H, converged).

    Converged means a positive-definite Hessian and a Newton decrement below ``tol`` or, in
    low precision, below what rounding of the potential allows (``100 eps (1 + |U|)``).
    """
    value, grad = u.value_grad(z)
    hess = u.hessian(z)
    eps = torch.finfo(z.dtype).eps
    for _ in range(max_iter + 1):
        step, exact = _newton_step(hess, grad)
        decrement = float(-(grad @ step))
        floor = max(tol, 100 * eps * (1.0 + abs(float(value))))
        if exact and decrement < floor:
            return z, hess, True
        trial = _line_search(u, z, value, step, decrement)
        if trial is None:  # no decrease possible along the step: at the rounding floor?
            return z, hess, exact and decrement < 1e3 * floor
        z, value, grad = trial
        hess = u.hessian(z)
    return z, hess, False


def _line_search(
    u: _Counted, z: Tensor, value: Tensor, step: Tensor, decrement: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Backtrack from the full step until the Armijo condition holds (at most 30 halvings)."""
    t = 1.0
    for _ in range(30):
        trial = z + t * step
        v_trial, g_trial = u.value_grad(trial)
        if torch.isfinite(v_trial) and float(v_trial) <= float(value) - 1e-4 * t * decrement:
            return trial, v_trial, g_trial
        t *= 0.5
    return None


def _newton_step(hess: Tensor, grad: Tensor) -> tuple[Tensor, bool]:
    """``-H^{-1} g`` (``exact``) or, if ``H`` is not positive definite, a damped step."""
    if not bool(torch.isfinite(hess).all() and torch.isfinite(grad).all()):
        return torch.zeros_like(grad), False
    eye = torch.eye(len(grad), dtype=grad.dtype, device=grad.device)
    scale = float(hess.diagonal().abs().max()) or 1.0
    damping = 0.0
    while True:
        chol, info = torch.linalg.cholesky_ex(hess + damping * eye)
        if int(info) == 0:
            step = -torch.cholesky_solve(grad[:, None], chol)[:, 0]
            return step, damping == 0.0
        damping = max(10.0 * damping, 1e-10 * scale)
        if damping > 1e10 * scale:
            return -grad / scale, False


def find_mode(
    log_density: LogDensityFn,
    start: Tensor,
    *,
    max_lbfgs_iter: int = 200,
    max_newton_iter: int = 50,
    hessian: bool = True,
    tol: float = 1e-10,
) -> Mode:
    r"""Maximise ``log_density`` from ``start``: L-BFGS, then Newton on the exact Hessian.

    Args:
        log_density: ``z (D,) -> log p`` (a scalar tensor, differentiable twice).
        start: Initial point ``(D,)``.
        max_lbfgs_iter: L-BFGS iterations.
        max_newton_iter: Newton iterations after L-BFGS.
        hessian: Whether to compute the Hessian and polish with Newton (costs ``D``
            gradient evaluations per iteration); without it the mode is L-BFGS's.
        tol: Convergence threshold on the Newton decrement :math:`g^\top H^{-1} g` (nats).

    Returns:
        A :class:`Mode`. ``found`` is ``False`` when the density grows without bound (a
        funnel), the search ends where the Hessian is not positive definite, or no finite
        point is reached.
    """
    u = _Counted(log_density)
    start = start.detach()
    if not torch.isfinite(-log_density(start)):  # (argument errors at the start propagate)
        return Mode(start, float("nan"), None, False, "log-density not finite at start", 1)
    z = _lbfgs(u, start, max_lbfgs_iter)
    if not hessian:
        value, grad = u.value_grad(z)
        ok = bool(torch.isfinite(value)) and float(grad.abs().max()) < 1e-5
        msg = "L-BFGS (no Hessian)" if ok else "L-BFGS did not converge"
        return Mode(z, float(-value), None, ok, msg, u.evaluations)
    z, hess, converged = _newton(u, z, max_newton_iter, tol)
    value = float(-u(z))
    if not converged:
        bounded = torch.isfinite(hess).all() and torch.linalg.cholesky_ex(hess)[1] == 0
        why = "no stationary point" if bounded else "Hessian not positive definite"
        return Mode(
            z,
            value,
            hess,
            False,
            f"no finite mode ({why}; Newton did not converge)",
            u.evaluations,
        )
    return Mode(z, value, hess, True, "L-BFGS + Newton", u.evaluations)


def laplace_factor(hessian: Tensor) -> Tensor | None:
    r"""Lower-triangular :math:`L_0` with :math:`L_0 L_0^\top = H^{-1}`, or ``None``.

    Computed without forming :math:`H^{-1}`: with :math:`P` the reversal permutation and
    :math:`P H P = L' L'^\top`, :math:`H^{-1} = (P L'^{-\top} P)(P L'^{-\top} P)^\top` and
    :math:`P L'^{-\top} P` is lower triangular. ``None`` if ``H`` is not positive definite.
    """
    flipped = hessian.flip(0, 1)
    chol, info = torch.linalg.cholesky_ex(flipped)
    if int(info) != 0 or not bool(torch.isfinite(chol).all()):
        return None
    eye = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)  # L'^{-1}
    return inv.T.flip(0, 1).contiguous()
