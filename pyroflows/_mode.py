r"""Posterior mode and Laplace approximation in unconstrained space (the start of :class:`VI`).

:func:`find_mode` minimises the potential :math:`U(z) = -\log p(x, T(z)) - \log|J_T(z)|`
with L-BFGS (strong-Wolfe line search), then polishes with damped Newton steps on the exact
autograd Hessian, which converge quadratically where L-BFGS stalls on long, thin ridges.
Non-finite values met on the way are treated as "too far": the line searches backtrack from
them. :func:`laplace_factor` turns the Hessian at the mode into the lower-triangular factor
:math:`L_0` of the Laplace covariance :math:`H^{-1} = L_0 L_0^\top`. Above the dimension
where the exact Hessian is affordable, :func:`lbfgs_factor` builds a low-rank-plus-diagonal
inverse-Hessian approximation from the L-BFGS history instead (Pathfinder, Zhang et al.
2022), as a structured factor (:class:`LowRankFactor`, applied by :class:`LowRankAffine`)
whose products, solves and log-determinant cost :math:`O(DK)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

LogDensityFn = Callable[[Tensor], Tensor]
HISTORY = 60  # L-BFGS pairs kept when the history is the Laplace approximation


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
        lowrank: Without a Hessian: the L-BFGS-history approximation of the Laplace factor
            (:func:`lbfgs_factor`), or ``None``.
    """

    z: Tensor
    log_density: float
    hessian: Tensor | None
    found: bool
    message: str
    evaluations: int
    lowrank: LowRankFactor | None = field(default=None, repr=False)


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


def _lbfgs(
    u: _Counted,
    z0: Tensor,
    max_iter: int,
    history: list[tuple[Tensor, Tensor]] | None = None,
    history_size: int = 20,
) -> Tensor:
    """L-BFGS from ``z0``; non-finite trial points return a large value and a zero gradient.

    If ``history`` is a list, the optimiser's last (at most ``history_size``) accepted pairs
    ``(s, y)`` -- step and change of the potential's gradient -- are appended to it."""
    z = z0.detach().clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=history_size,
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
    state = opt.state[z]
    steps, grads = state.get("old_stps", []), state.get("old_dirs", [])
    if history is not None and steps:
        history.extend(zip(steps, grads, strict=True))
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
    lbfgs_tol: float = 1e-4,
) -> Mode:
    r"""Maximise ``log_density`` from ``start``: L-BFGS, then Newton on the exact Hessian.

    Args:
        log_density: ``z (D,) -> log p`` (a scalar tensor, differentiable twice).
        start: Initial point ``(D,)``.
        max_lbfgs_iter: L-BFGS iterations (five times as many without the Hessian).
        max_newton_iter: Newton iterations after L-BFGS.
        hessian: Whether to compute the Hessian and polish with Newton (costs ``D``
            gradient evaluations per iteration); without it the mode is L-BFGS's.
        tol: Convergence threshold on the Newton decrement :math:`g^\top H^{-1} g` (nats).
        lbfgs_tol: Without the Hessian: the same threshold, with L-BFGS's inverse-Hessian
            approximation (:func:`lbfgs_factor`) in place of :math:`H^{-1}`.

    Returns:
        A :class:`Mode`. ``found`` is ``False`` when the density grows without bound (a
        funnel), the search ends where the Hessian is not positive definite, or no finite
        point is reached. Without the Hessian, ``lowrank`` holds the L-BFGS-history factor.
    """
    u = _Counted(log_density)
    start = start.detach()
    if not torch.isfinite(-log_density(start)):  # (argument errors at the start propagate)
        return Mode(start, float("nan"), None, False, "log-density not finite at start", 1)
    history: list[tuple[Tensor, Tensor]] = []
    if hessian:
        z = _lbfgs(u, start, max_lbfgs_iter, history)
    else:  # L-BFGS is the whole search, and its history the Laplace approximation
        z = _lbfgs(u, start, 5 * max_lbfgs_iter, history, history_size=HISTORY)
    if not hessian:
        value, grad = u.value_grad(z)
        if not history:  # converged before a pair was stored (e.g. one exact line search)
            history.append((z - start, grad - u.value_grad(start)[1]))
        factor = lbfgs_factor(*map(torch.stack, zip(*history, strict=True)))
        finite = bool(torch.isfinite(value) and torch.isfinite(grad).all())
        # converged: a tiny gradient, or a Newton decrement g' H^-1 g (with L-BFGS's H^-1)
        # under lbfgs_tol nats, i.e. about sqrt(lbfgs_tol) posterior sds from the mode
        small = finite and float(grad.abs().max()) < 1e-5
        if finite and factor is not None and not small:
            small = float(factor.quad(grad)) < lbfgs_tol
        msg = "L-BFGS (no Hessian)" if small else "L-BFGS did not converge"
        return Mode(z, float(-value), None, small, msg, u.evaluations, factor)
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


# ---------------------------------------------------------------- low-rank + diagonal Laplace
@dataclass
class LowRankFactor:
    r"""A square root :math:`L_0 = \mathrm{diag}(s)\,(I + Q (L - I) Q^\top)` of
    :math:`\Sigma = \mathrm{diag}(s^2) + \beta \gamma \beta^\top` (see :func:`lbfgs_factor`).

    ``Q`` has orthonormal columns and ``L`` is lower triangular with a positive diagonal, so
    :math:`L_0 L_0^\top = \mathrm{diag}(s)(I + Q(LL^\top - I)Q^\top)\mathrm{diag}(s)`,
    :math:`L_0^{-1} = (I + Q(L^{-1} - I)Q^\top)\,\mathrm{diag}(s)^{-1}` and
    :math:`\log|L_0| = \sum \log s + \sum \log L_{kk}`: each ``O(DK)``.

    Attributes:
        scale: :math:`s`, ``(D,)``, positive.
        basis: :math:`Q`, ``(D, K)``, orthonormal columns.
        tril: :math:`L`, ``(K, K)``.
    """

    scale: Tensor
    basis: Tensor
    tril: Tensor

    def apply(self, u: Tensor) -> Tensor:
        """:math:`L_0 u` for ``u`` of shape ``(..., D)``."""
        eye = torch.eye(len(self.tril), dtype=u.dtype, device=u.device)
        v = u @ self.basis
        return self.scale * (u + (v @ (self.tril - eye).T) @ self.basis.T)

    def solve(self, x: Tensor) -> Tensor:
        """:math:`L_0^{-1} x` for ``x`` of shape ``(..., D)``."""
        w = x / self.scale
        v = w @ self.basis
        flat = v.reshape(-1, v.shape[-1]).T
        lv = torch.linalg.solve_triangular(self.tril, flat, upper=False).T.reshape(v.shape)
        return w + (lv - v) @ self.basis.T

    def quad(self, g: Tensor) -> Tensor:
        r""":math:`g^\top \Sigma g = \|L_0^\top g\|^2` for ``g`` of shape ``(D,)``."""
        eye = torch.eye(len(self.tril), dtype=g.dtype, device=g.device)
        w = self.scale * g
        v = w @ self.basis
        return (w + ((self.tril - eye).T @ v) @ self.basis.T).square().sum()

    def log_det(self) -> Tensor:
        r""":math:`\log|\det L_0|`."""
        return self.scale.log().sum() + self.tril.diagonal().log().sum()

    def covariance(self) -> Tensor:
        """The dense :math:`L_0 L_0^\top`, ``(D, D)`` (for tests and small D)."""
        eye = torch.eye(len(self.scale), dtype=self.scale.dtype, device=self.scale.device)
        root = self.apply(eye).T  # columns L0 e_i
        return root @ root.T

    def precision_diagonal(self) -> Tensor:
        r"""The diagonal of :math:`\Sigma^{-1}`, ``(D,)``, without forming it."""
        eye = torch.eye(len(self.tril), dtype=self.tril.dtype, device=self.tril.device)
        inv = torch.linalg.solve_triangular(self.tril, eye, upper=False)
        inner = inv.T @ inv - eye  # (L L^T)^-1 - I
        return (1.0 + ((self.basis @ inner) * self.basis).sum(-1)) / self.scale**2


def lbfgs_factor(steps: Tensor, grad_changes: Tensor, eps: float = 1e-12) -> LowRankFactor | None:
    r"""Pathfinder's inverse-Hessian approximation from an L-BFGS history, as a factor.

    With the pairs :math:`(s_j, y_j)` (steps and changes of the potential's gradient) that
    satisfy the curvature condition :math:`s_j^\top y_j > \epsilon \|y_j\|^2`, the diagonal
    :math:`\alpha` is updated pair by pair (Gilbert & Lemaréchal 1989; Pathfinder's
    Algorithm 3, starting from :math:`\alpha = 1`) and the inverse Hessian is the compact
    L-BFGS form :math:`\Sigma = \mathrm{diag}(\alpha) + \beta\gamma\beta^\top` with
    :math:`\beta = [\mathrm{diag}(\alpha) Y, S]` (Byrd, Nocedal & Schnabel 1994; Zhang et al.
    2022, eq. II.2). It satisfies the secant equation of the newest pair,
    :math:`\Sigma y_J = s_J`. The factor follows Pathfinder's sampler: a thin QR of
    :math:`\mathrm{diag}(\alpha)^{-1/2}\beta` and a ``2J x 2J`` Cholesky.

    Args:
        steps: :math:`S`, ``(J, D)``, oldest first.
        grad_changes: :math:`Y`, ``(J, D)``.
        eps: Tolerance of the curvature condition.

    Returns:
        A :class:`LowRankFactor`, or ``None`` if no pair qualifies or the result is not
        positive definite and finite.
    """
    keep = (steps * grad_changes).sum(-1) > eps * (grad_changes**2).sum(-1)
    s, y = steps[keep], grad_changes[keep]
    if len(s) == 0:
        return None
    alpha = torch.ones(s.shape[-1], dtype=s.dtype, device=s.device)
    for s_j, y_j in zip(s, y, strict=True):
        a, b, c = (y_j * alpha * y_j).sum(), (y_j * s_j).sum(), (s_j * s_j / alpha).sum()
        inv_alpha = a / (b * alpha) + y_j**2 / b - a * s_j**2 / (b * c * alpha**2)
        new = 1.0 / inv_alpha
        if bool(torch.isfinite(new).all() and (new > 0).all()):
            alpha = new
    j = len(s)
    sty = s @ y.T  # (J, J)
    r = torch.triu(sty) + torch.finfo(s.dtype).eps * torch.eye(j, dtype=s.dtype, device=s.device)
    eta = sty.diagonal()
    beta = torch.cat([(alpha * y).T, s.T], dim=1)  # (D, 2J)
    minv_r = -torch.linalg.inv(r)
    alpha_y = alpha.sqrt() * y  # rows sqrt(alpha) * y_j
    block = minv_r.T @ (alpha_y @ alpha_y.T + torch.diag(eta)) @ minv_r
    zero = torch.zeros_like(r)
    gamma = torch.cat([torch.cat([zero, minv_r], 1), torch.cat([minv_r.T, block], 1)], 0)
    q, rr = torch.linalg.qr(beta / alpha.sqrt()[:, None])
    inner = torch.eye(rr.shape[0], dtype=s.dtype, device=s.device) + rr @ gamma @ rr.T
    tril, info = torch.linalg.cholesky_ex(0.5 * (inner + inner.T))
    factor = LowRankFactor(alpha.sqrt(), q, tril)
    ok = int(info) == 0 and all(bool(torch.isfinite(t).all()) for t in (alpha, q, tril))
    return factor if ok else None


class LowRankAffine(Transform):
    r""":math:`x \mapsto c + L_0 x` for a :class:`LowRankFactor` :math:`L_0` (bijective,
    log-determinant constant)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: Tensor, factor: LowRankFactor, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.loc, self.factor = loc, factor

    @property
    def sign(self) -> int:
        return 1

    def with_cache(self, cache_size: int = 1) -> LowRankAffine:
        if self._cache_size == cache_size:
            return self
        return LowRankAffine(self.loc, self.factor, cache_size=cache_size)

    def _call(self, x: Tensor) -> Tensor:
        return self.loc + self.factor.apply(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.factor.solve(y - self.loc)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.factor.log_det().expand(x.shape[:-1])
