"""K planar layers in one autograd node: the fast path for amortized planar stacks.

Every layer of an amortized stack has per-sample parameters, so autograd would record ~10
tiny kernels per layer forward and ~25 backward; at VAE batch sizes that dispatch overhead,
not arithmetic, is the cost. :class:`_PlanarStackFn` runs the K layers with no graph and
back-propagates them by hand (the derivatives below), so the whole stack is one node.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


class _PlanarStackFn(torch.autograd.Function):
    """Forward: K planar layers; backward: their analytic vector-Jacobian products.

    Layer k: s = wₖᵀx + bₖ, a = tanh s, x' = x + ûₖ a, detₖ = a² + (1 − a²)(1 + wₖᵀûₖ).
    With upstream gradients g (for x') and γ (for Σ log det):
    ∂/∂a = gᵀûₖ + γ · 2a(1 − opcₖ)/detₖ, ∂/∂s = ∂/∂a · (1 − a²), ∂/∂ûₖ = g a,
    ∂/∂wₖ = ∂/∂s · x, ∂/∂bₖ = ∂/∂s, ∂/∂opcₖ = γ (1 − a²)/detₖ, ∂/∂x = g + ∂/∂s · wₖ.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, u_hat: Tensor, w: Tensor, b: Tensor, opc: Tensor
    ) -> tuple[Tensor, Tensor]:
        us, ws, bs = u_hat.unbind(0), w.unbind(0), b.unbind(0)
        xs, acts = [], []
        for u_k, w_k, b_k in zip(us, ws, bs, strict=True):
            xs.append(x)
            a = torch.tanh(torch.linalg.vecdot(x, w_k) + b_k)  # (*batch,)
            x = torch.addcmul(x, u_k, a.unsqueeze(-1))
            acts.append(a)
        a = torch.stack(acts)  # (K, *batch)
        a2 = a * a
        # a² + (1 − a²)(1 + wᵀû): a convex combination of 1 and 1 + wᵀû (floored), so > 0 and
        # exact even for a huge 1 + wᵀû where a² rounds to 1
        det = torch.addcmul(a2, 1 - a2, opc.clamp_min(torch.finfo(opc.dtype).tiny))
        ctx.save_for_backward(torch.stack(xs), a, det, u_hat, w, b, opc)
        return x, torch.log(det).sum(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, gy: Tensor | None, gl: Tensor | None) -> tuple[Tensor, ...]:
        xs, acts, det, u_hat, w, b, opc = ctx.saved_tensors
        g = torch.zeros_like(xs[0]) if gy is None else gy.expand_as(xs[0])
        gl = torch.zeros_like(acts[0]) if gl is None else gl.expand_as(acts[0])
        one_minus_a2 = 1 - acts * acts  # (K, *batch)
        gl_over_det = gl / det  # (K, *batch)
        g_opc = gl_over_det * one_minus_a2
        da_ladj = 2 * acts * (1 - opc) * gl_over_det
        us, ws = u_hat.unbind(0), w.unbind(0)
        gs, g_s = [], []
        for k in range(u_hat.shape[0] - 1, -1, -1):
            gs.append(g)  # the gradient reaching layer k's output
            ds = (torch.linalg.vecdot(g, us[k]) + da_ladj[k]) * one_minus_a2[k]  # (*batch,)
            g_s.append(ds)
            g = torch.addcmul(g, ds.unsqueeze(-1), ws[k])
        g_u = torch.stack(gs[::-1]) * acts.unsqueeze(-1)  # (K, *batch, D)
        g_s = torch.stack(g_s[::-1])  # (K, *batch)
        g_w = g_s.unsqueeze(-1) * xs
        return g, g_u, g_w, g_s, g_opc


def planar_stack(
    x: Tensor, u_hat: Tensor, w: Tensor, b: Tensor, one_plus_c: Tensor
) -> tuple[Tensor, Tensor]:
    """K planar layers with parameters stacked on a leading axis; returns (y, Σ ladj).

    Shapes: x (*batch, D); u_hat, w (K, *pbatch, D); b, one_plus_c (K, *pbatch), with
    ``pbatch`` broadcasting against ``batch``.
    """
    # expand (views, no copies) so the hand-written backward sees one batch shape; autograd
    # sums the gradients back over the broadcast dimensions
    shape = torch.broadcast_shapes(x.shape, u_hat.shape[1:])  # (*batch, D)
    num, lead = u_hat.shape[0], len(shape) - (u_hat.dim() - 1)

    def full(p: Tensor, event: tuple[int, ...]) -> Tensor:
        p = p.reshape(num, *([1] * lead), *p.shape[1:])
        return p.expand(num, *shape[:-1], *event)

    d = (shape[-1],)
    return _PlanarStackFn.apply(
        x.expand(shape), full(u_hat, d), full(w, d), full(b, ()), full(one_plus_c, ())
    )
