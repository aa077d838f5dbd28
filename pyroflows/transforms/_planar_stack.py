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
        num = u_hat.shape[0]
        xs, acts, dets = [], [], []
        for k in range(num):
            xs.append(x)
            a = torch.tanh((x * w[k]).sum(-1) + b[k])  # (*batch,)
            x = x + u_hat[k] * a.unsqueeze(-1)
            acts.append(a)
            dets.append(torch.addcmul(opc[k], a * a, 1 - opc[k]))
        det = torch.stack(dets)  # (K, *batch)
        ctx.save_for_backward(torch.stack(xs), torch.stack(acts), det, u_hat, w, b, opc)
        return x, torch.log(det.clamp_min(torch.finfo(det.dtype).tiny)).sum(0)

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
        g_u, g_s = [], []
        for k in range(u_hat.shape[0] - 1, -1, -1):
            ds = ((g * u_hat[k]).sum(-1) + da_ladj[k]) * one_minus_a2[k]  # (*batch,)
            g_u.append(g * acts[k].unsqueeze(-1))
            g_s.append(ds)
            g = torch.addcmul(g, ds.unsqueeze(-1), w[k])
        g_u = torch.stack(g_u[::-1])  # (K, *batch, D)
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
