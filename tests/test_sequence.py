"""FlowSequence (fused amortized stacks) equals the ComposeTransform of its layers."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import Permute
from torch.distributions import ComposeTransform

from pyroflows.transforms import CONDITIONAL_FLOWS
from pyroflows.transforms._base import REVERSE, FlowSequence
from tests.conftest import randomize_
from tests.test_transforms import blockwise_jacobian_ladj

D, C = 4, 3


def layers_and_sequence(batch_shape: tuple[int, ...]):
    mods = [randomize_(CONDITIONAL_FLOWS[n](D, C).double()) for n in sorted(CONDITIONAL_FLOWS)]
    context = torch.randn(*batch_shape, C, dtype=torch.float64)
    flows = [m.condition(context) for m in mods]
    perm = Permute(torch.arange(D - 1, -1, -1))
    composed = ComposeTransform([t for f in flows for t in (f, perm)])
    fused = FlowSequence.of([t for f in flows for t in (f, REVERSE)])
    return composed, fused


@pytest.mark.parametrize("batch_shape", [(), (6,), (2, 3)], ids=str)
def test_sequence_matches_composition_and_autograd(batch_shape):
    composed, fused = layers_and_sequence(batch_shape)
    x = torch.randn(*batch_shape, D, dtype=torch.float64)
    y = fused(x)
    torch.testing.assert_close(y, composed(x))
    ladj = fused.log_abs_det_jacobian(x, y)
    torch.testing.assert_close(ladj, composed.log_abs_det_jacobian(x, composed(x)))
    torch.testing.assert_close(ladj, blockwise_jacobian_ladj(fused, x)[1], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(fused.inv(y.clone()), x, atol=1e-6, rtol=1e-6)


def test_sequence_log_prob_of_fresh_points():
    _, fused = layers_and_sequence((5,))
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [fused])
    z = d.rsample()
    torch.testing.assert_close(d.log_prob(z.detach().clone()), d.log_prob(z))


def test_sequence_rejects_modules():
    with pytest.raises(TypeError, match="cannot fuse"):
        FlowSequence.of([torch.nn.Linear(2, 2)])


def _planar_stack_and_layers(num: int, batch_shape: tuple[int, ...]):
    from pyroflows.transforms.planar import ConditionalPlanarStack, _planar

    stack = randomize_(ConditionalPlanarStack(D, C, num).double())
    context = torch.randn(*batch_shape, C, dtype=torch.float64)
    t = stack.condition(context)

    def layers(x):
        u, w, b, opc = t._params
        ladj = 0
        for k in range(num):
            x, step = _planar(x, u[k], w[k], b[k], opc[k])
            ladj = ladj + step
        return x, ladj

    return t, layers


@pytest.mark.parametrize("x_shape", [(6, D), (2, 6, D), (D,)], ids=str)
def test_planar_stack_equals_its_layers_and_autograd(x_shape):
    t, layers = _planar_stack_and_layers(5, (6,))
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = t(x)
    y_ref, ladj_ref = layers(x)
    torch.testing.assert_close(y, y_ref)
    ladj = t.log_abs_det_jacobian(x, y)
    torch.testing.assert_close(ladj, ladj_ref)
    xb = x.expand(y.shape)
    torch.testing.assert_close(ladj, blockwise_jacobian_ladj(t, xb)[1], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(t.inv(y.clone()), xb, atol=1e-6, rtol=1e-6)


def test_planar_stack_hand_written_backward_passes_gradcheck():
    from pyroflows.transforms._planar_stack import planar_stack

    t, _ = _planar_stack_and_layers(3, (4,))
    params = [p.detach().clone().requires_grad_() for p in t._params]
    for x in (torch.randn(4, D), torch.randn(2, 1, D), torch.randn(D)):
        x = x.double().requires_grad_()
        assert torch.autograd.gradcheck(planar_stack, (x, *params))
        assert torch.autograd.gradcheck(lambda *a: planar_stack(*a)[1], (x, *params))
        assert torch.autograd.gradcheck(lambda *a: planar_stack(*a)[0], (x, *params))


def test_planar_stack_module_gradients_match_per_layer_autograd():
    t, layers = _planar_stack_and_layers(4, (5,))
    x = torch.randn(5, D, dtype=torch.float64)
    params = t._params
    y, ladj = t._forward(x)
    g1 = torch.autograd.grad((y.sin().sum() + ladj.sum()), params, retain_graph=True)
    y2, ladj2 = layers(x)
    g2 = torch.autograd.grad((y2.sin().sum() + ladj2.sum()), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_planar_stack_log_det_stays_exact_for_huge_and_tiny_one_plus_c():
    """Where tanh² rounds to 1 the log-det is log 1 = 0 however large 1 + wᵀû is (a naive
    1 + wᵀû − tanh²·wᵀû cancels to 0 there), and a vanishing 1 + wᵀû stays finite."""
    from pyroflows.transforms._planar_stack import planar_stack
    from pyroflows.transforms.planar import _planar

    x = torch.tensor([[30.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # saturated, and s = 0
    u = torch.zeros(1, 2, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64)
    for opc, expected in (
        (1e20, [0.0, math.log(1e20)]),
        (0.0, [0.0, math.log(2.2250738585072014e-308)]),
    ):
        opc_t = torch.tensor([opc], dtype=torch.float64)
        ladj = planar_stack(x, u, w, b, opc_t)[1]
        torch.testing.assert_close(ladj, torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(_planar(x, u[0], w[0], b[0], opc_t[0])[1], ladj)


def _reference_u_hat(u, w):
    """The constraint written in plain autograd-recorded operations."""
    a = (w * u).sum(-1, keepdim=True)
    a_neg = a.clamp(max=0)
    n2 = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    u_hat = u + ((torch.expm1(a_neg) - a_neg) / n2) * w
    return u_hat, (torch.exp(a_neg) + a.clamp(min=0)).squeeze(-1)


def test_planar_u_hat_matches_plain_autograd_and_passes_grad_and_gradgradcheck():
    from pyroflows.transforms.planar import planar_u_hat

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64) * 2  # both signs of wᵀu
    w = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    w[0, 0] = 0.0  # w = 0: û = u, no division by zero
    u.requires_grad_()
    w.requires_grad_()
    got, ref = planar_u_hat(u, w), _reference_u_hat(u, w)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    probe = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    g_got = torch.autograd.grad([got[0], got[1]], [u, w], probe)
    g_ref = torch.autograd.grad([ref[0], ref[1]], [u, w], probe)
    for a, b in zip(g_got, g_ref, strict=True):  # a = 0 at w = 0: autograd's m'(0) = 2
        torch.testing.assert_close(a[1:], b[1:])
        torch.testing.assert_close(a[0, 1:], b[0, 1:])
    # w = 0: û = u, 1 + m(0) = 1, ∂/∂u = ḡ and ∂/∂w = γ m'(0) u with m'(0) = 1
    torch.testing.assert_close(got[0][0, 0], u[0, 0])
    assert got[1][0, 0] == 1
    torch.testing.assert_close(g_got[0][0, 0], probe[0][0, 0])
    torch.testing.assert_close(g_got[1][0, 0], probe[1][0, 0] * u[0, 0])
    small_u, small_w = u[1:].detach().requires_grad_(), w[1:].detach().requires_grad_()
    assert torch.autograd.gradcheck(planar_u_hat, (small_u, small_w))
    assert torch.autograd.gradgradcheck(planar_u_hat, (small_u, small_w))
    # broadcasting u (D,) against a batch of w
    u1 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(planar_u_hat, (u1, small_w))


def test_planar_u_hat_derivative_at_the_identity_start_is_one():
    """At u = 0 (every planar layer's start) wᵀu = 0 and d(1 + m(a))/da = m'(0) = 1; autograd
    through two clamps (e^{min(a,0)} + max(a, 0)) would report 2 there."""
    from pyroflows.transforms.planar import planar_u_hat

    w = torch.tensor([0.6, -0.8], dtype=torch.float64)
    u = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(planar_u_hat(u, w)[1], u)
    torch.testing.assert_close(g, w)
