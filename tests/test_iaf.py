"""IAF- and MADE-specific checks the generic registry tests cannot make."""

from __future__ import annotations

import importlib
import math

import pyro.distributions as dist
import pytest
import torch

from pyroflows.transforms import IAF, MADE, ConditionalIAF, conditional_iaf_stack, iaf_stack
from pyroflows.transforms.iaf import SCALE_MIN
from tests.conftest import randomize_

F64 = torch.float64
iaf_module = importlib.import_module("pyroflows.transforms.iaf")  # the name iaf is a function


def order_rank(perm: torch.Tensor) -> torch.Tensor:
    """rank[i] = position of variable i in the autoregressive order."""
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(len(perm))
    return rank


def allowed(perm: torch.Tensor) -> torch.Tensor:
    """allowed[i, j]: output i may depend on input j (j strictly before i in the order)."""
    rank = order_rank(perm)
    return rank[None, :] < rank[:, None]


MADE_CASES = [
    # (input_dim, hidden_dims, context_dim, permutation)
    (1, [4], 0, None),
    (1, [4], 2, None),
    (2, [5], 0, None),
    (5, [16, 16], 0, None),
    (5, [16, 16], 3, [3, 0, 4, 1, 2]),
    (6, [], 0, [5, 4, 3, 2, 1, 0]),
    (6, [], 2, [1, 0, 3, 2, 5, 4]),
    (7, [3], 0, [6, 2, 0, 1, 5, 3, 4]),  # narrower than D: still autoregressive
]


@pytest.mark.parametrize("coordinate_major", [False, True], ids=["param-major", "coord-major"])
@pytest.mark.parametrize("input_dim,hidden_dims,context_dim,perm", MADE_CASES, ids=str)
def test_made_jacobian_is_strictly_triangular_in_its_order(
    input_dim, hidden_dims, context_dim, perm, coordinate_major
):
    made = MADE(input_dim, hidden_dims, 2, context_dim, perm, coordinate_major=coordinate_major)
    made = randomize_(made.to(F64))
    context = torch.randn(context_dim, dtype=F64) if context_dim else None
    ok = allowed(made.permutation)

    def blocks(out: torch.Tensor) -> torch.Tensor:  # (2D, ...) -> (2, D, ...)
        if coordinate_major:
            return out.reshape(input_dim, 2, *out.shape[1:]).transpose(0, 1)
        return out.reshape(2, input_dim, *out.shape[1:])

    for _ in range(10):
        x = torch.randn(input_dim, dtype=F64)
        jac = blocks(torch.autograd.functional.jacobian(lambda v: made(v, context), x))
        assert (jac[:, ~ok] == 0).all(), "an output depends on itself or on a later input"
    # connectivity: (number of paths from input j to output i) = product of the masks
    paths = made.layers[0].mask
    for layer in made.layers[1:]:
        paths = layer.mask @ paths
    paths = blocks(paths)
    assert (paths[:, ~ok] == 0).all()
    if hidden_dims == [] or min(hidden_dims) >= input_dim - 1:
        assert (paths[:, ok] > 0).all(), "wide enough: every allowed dependency has a path"


@pytest.mark.parametrize("gated", [False, True], ids=["affine", "gated"])
def test_iaf_jacobian_is_triangular_with_diagonal_sigma(gated):
    perm = [2, 0, 3, 1]
    flow = randomize_(IAF(4, [12, 12], gated=gated, permutation=perm).double())
    x = torch.randn(4, dtype=F64)
    jac = torch.autograd.functional.jacobian(flow, x)
    ok = allowed(torch.tensor(perm))
    off = ~ok & ~torch.eye(4, dtype=torch.bool)
    assert (jac[off] == 0).all()
    assert (jac.diagonal() >= SCALE_MIN).all()
    torch.testing.assert_close(jac.diagonal().log().sum(), flow.log_abs_det_jacobian(x, flow(x)))


def test_affine_starts_at_sigma_one_and_gated_at_sigmoid_forget_bias():
    x = torch.randn(50, 4, dtype=F64)
    for b in (1.0, 2.0, 8.0):
        flow = IAF(4, gated=True, forget_bias=b).double()
        y = flow(x)
        sigma = SCALE_MIN + (1 - SCALE_MIN) / (1 + math.exp(-b))
        torch.testing.assert_close(y, sigma * x, atol=0.05, rtol=0)
        torch.testing.assert_close(
            flow.log_abs_det_jacobian(x, y), torch.full((50,), 4 * math.log(sigma), dtype=F64),
            atol=0.02, rtol=0,
        )  # fmt: skip
    # large forget bias: the gated flow is then near the identity too
    torch.testing.assert_close(
        IAF(4, gated=True, forget_bias=8.0).double()(x), x, atol=0.05, rtol=0
    )
    # affine: sigma(0) = 1 exactly, so an all-zero MADE is exactly the identity
    flow = IAF(4).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()
    assert torch.equal(flow(x), x)
    assert torch.equal(flow.log_abs_det_jacobian(x, flow(x)), torch.zeros(50, dtype=F64))


@pytest.mark.parametrize("gated", [False, True], ids=["affine", "gated"])
def test_scale_is_floored_and_finite_for_extreme_raw_scales(gated):
    flow = IAF(3, [], gated=gated).double()
    x = torch.randn(5, 3, dtype=F64)
    for s in (-1e6, -50.0, 50.0, 1e6):
        with torch.no_grad():
            flow.made.layers[-1].weight.zero_()
            flow.made.layers[-1].bias.fill_(0.0)
            flow.made.layers[-1].bias[3:] = s  # the raw scales
        y = flow(x)
        ladj = flow.log_abs_det_jacobian(x, y)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        assert (ladj >= 3 * math.log(SCALE_MIN) - 1e-9).all()
        torch.testing.assert_close(flow.inv(y.clone()), x)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["affine", "gated"])
def test_inverse_early_exit_equals_all_passes_bitwise(gated, dtype, device):
    flow = IAF(16, gated=gated).to(device=device, dtype=dtype)
    for scale in (0.1, 1.0):  # near the identity (exits early) and far from it
        randomize_(flow, scale)
        x = torch.randn(30, 16, dtype=dtype, device=device)
        y = flow(x).detach()
        with torch.no_grad():
            fast = flow.inv(y.clone())
        full = flow.inv(y.clone())  # parameters require grad: all D passes
        assert full.requires_grad and fast.dtype == dtype and fast.device == y.device
        assert torch.equal(fast, full.detach())
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(fast, x, atol=tol, rtol=tol)


def test_inverse_stops_early_only_without_autograd(monkeypatch):
    passes = []
    real = iaf_module.made_forward
    monkeypatch.setattr(iaf_module, "made_forward", lambda *a: passes.append(1) or real(*a))
    flow = randomize_(IAF(32).double(), 0.1)  # near the identity: weak dependencies
    y = flow(torch.randn(10, 32, dtype=F64)).detach()
    passes.clear()
    with torch.no_grad():
        fast = flow.inv(y.clone())
    n_fast = len(passes)
    passes.clear()
    full = flow.inv(y.clone())
    assert len(passes) == 32  # recording gradients: the full, exactly differentiable solve
    assert 2 <= n_fast < 32
    assert torch.equal(fast, full.detach())


@pytest.mark.parametrize("gated", [False, True], ids=["affine", "gated"])
def test_inverse_is_exactly_differentiable(gated):
    """The unrolled D-pass inverse has the implicit-function derivative, in y and in θ."""
    flow = randomize_(IAF(5, [11], gated=gated).double())
    x = torch.randn(5, dtype=F64)
    y = flow(x).detach()
    j_inv = torch.autograd.functional.jacobian(lambda v: flow.inv(v), y)
    j_fwd = torch.autograd.functional.jacobian(flow, x)
    torch.testing.assert_close(j_inv, torch.linalg.inv(j_fwd), atol=1e-10, rtol=1e-8)
    # d/dθ of log p(y) at a fixed y (the inverse runs inside) vs central differences
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(5, dtype=F64), 1.0).to_event(1), flow)
    bias = flow.made.layers[0].bias
    d.log_prob(y.clone()).backward()
    eps = 1e-6
    for k in range(3):
        with torch.no_grad():
            bias[k] += eps
            up = d.log_prob(y.clone())
            bias[k] -= 2 * eps
            down = d.log_prob(y.clone())
            bias[k] += eps
        assert abs(float(bias.grad[k]) - float((up - down) / (2 * eps))) < 1e-6


def test_stack_alternates_orders_and_mixes_all_variables():
    stack = randomize_(iaf_stack(4, num_flows=3, hidden_dims=[9]).double())
    perms = [layer.made.permutation.tolist() for layer in stack]
    assert perms == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]
    assert len(list(stack.parameters())) == 3 * len(list(stack[0].parameters()))
    x = torch.randn(4, dtype=F64)
    jac = torch.autograd.functional.jacobian(stack, x)
    assert (jac != 0).sum() > 10  # no longer triangular: both orders are used
    y = stack(x)
    torch.testing.assert_close(stack.inv(y.clone()), x)
    expected = torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(stack.log_abs_det_jacobian(x, y), expected)


def test_conditional_stack_and_context_dependence_of_first_variable():
    stack = randomize_(conditional_iaf_stack(3, 2, num_flows=2, gated=True).double())
    c1, c2 = torch.randn(2, dtype=F64), torch.randn(2, dtype=F64)
    x = torch.randn(7, 3, dtype=F64)
    y1, y2 = stack.condition(c1)(x), stack.condition(c2)(x)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(stack.condition(c1).inv(y1.clone()), x)
    # in a single layer the first variable cannot see x, but it does see the context
    flow = randomize_(ConditionalIAF(3, 2, [6]).double())
    t1, t2 = flow.condition(c1), flow.condition(c2)
    x_other = x.clone()
    x_other[:, 1:] = torch.randn(7, 2, dtype=F64)
    torch.testing.assert_close(t1(x)[:, 0], t1(x_other)[:, 0], atol=0, rtol=0)
    assert not torch.allclose(t1(x)[:, 0], t2(x)[:, 0])


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_one_dimensional_iaf_is_an_invertible_elementwise_affine_map(conditional):
    module = randomize_((ConditionalIAF(1, 2) if conditional else IAF(1)).double())
    t = module.condition(torch.randn(2, dtype=F64)) if conditional else module
    x = torch.randn(9, 1, dtype=F64)
    y = t(x)
    slope = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    torch.testing.assert_close(slope, slope[:1].expand_as(slope))  # affine in x
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), slope[0, 0].log().expand(9))
    torch.testing.assert_close(t.inv(y.clone()), x)


@pytest.mark.parametrize(
    "ctor,kwargs,error,match",
    [
        (IAF, {"input_dim": 0}, ValueError, "input_dim must be a positive int; got 0"),
        (IAF, {"input_dim": 2.0}, ValueError, "input_dim must be a positive int; got 2.0"),
        (IAF, {"input_dim": 3, "hidden_dims": 8}, TypeError, "hidden_dims must be a sequence"),
        (IAF, {"input_dim": 3, "hidden_dims": [8, 0]}, ValueError, "every entry of hidden_dims"),
        (IAF, {"input_dim": 3, "gated": 1}, TypeError, "gated must be a bool; got 1"),
        (IAF, {"input_dim": 3, "forget_bias": "2"}, TypeError, "forget_bias must be a real"),
        (IAF, {"input_dim": 3, "forget_bias": math.inf}, ValueError, "forget_bias must be fin"),
        (IAF, {"input_dim": 3, "permutation": [0, 1]}, ValueError, r"permutation of range\(3\)"),
        (IAF, {"input_dim": 3, "permutation": [0, 1, 1]}, ValueError, r"range\(3\); got \[0, 1"),
        (IAF, {"input_dim": 3, "permutation": [0.0, 1, 2]}, ValueError, "permutation of range"),
        (IAF, {"input_dim": 3, "permutation": "abc"}, TypeError, "permutation must be a sequ"),
        (ConditionalIAF, {"input_dim": 3, "context_dim": -1}, ValueError, "context_dim must be"),
        (iaf_stack, {"input_dim": 3, "num_flows": 0}, ValueError, "num_flows must be a positive"),
        (MADE, {"input_dim": 3, "hidden_dims": [4], "num_params": 0}, ValueError, "num_params"),
    ],
)
def test_argument_validation(ctor, kwargs, error, match):
    with pytest.raises(error, match=match):
        ctor(**kwargs)


def test_condition_validates_context():
    flow = ConditionalIAF(3, 2)
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 2\); got \(4, 3\)"):
        flow.condition(torch.zeros(4, 3))
