"""Flow-specific checks of the density-estimation families that the generic harness in
``tests/test_transforms.py`` cannot make: actnorm's explicit data initialisation, MAF's
pass counts, the bounded RealNVP scale, the spline's tails, LinearLU's permutation, and
argument validation."""

from __future__ import annotations

import importlib

import pyro.distributions as dist
import pytest
import torch

from pyroflows.transforms import (
    MAF,
    NICE,
    ActNorm,
    ConditionalActNorm,
    LinearLU,
    RealNVP,
    SplineAutoregressive,
    SplineCoupling,
    initialize_actnorm,
    realnvp,
)
from pyroflows.transforms import made as made_module
from pyroflows.transforms._base import interleave_permutations, starts_at_identity
from pyroflows.transforms.linear_lu import lu_factors
from pyroflows.transforms.realnvp import LOG_SCALE_BOUND

F64 = torch.float64


def test_actnorm_initialises_only_when_asked_and_reproducibly():
    data = torch.randn(500, 3, dtype=F64) * torch.tensor([0.5, 2.0, 7.0], dtype=F64) + 3.0
    flow = ActNorm(3).double()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    dist.TransformedDistribution(dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1), [flow])
    flow(data)  # a forward call (and log_prob below) initialises nothing
    flow.log_abs_det_jacobian(data, flow(data))
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    flow.initialize_from(data)
    z = flow.inv(data.clone())
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(3, dtype=F64))
    again = ActNorm(3).double().initialize_from(data)
    assert all(torch.equal(flow.state_dict()[k], v) for k, v in again.state_dict().items())


def test_initialize_actnorm_walks_from_the_data_end():
    data = 4.0 * torch.randn(400, 2, dtype=F64) + 1.0
    layers = [ActNorm(2).double(), realnvp(2).double(), ActNorm(2).double()]
    initialize_actnorm(layers, data)
    inner = layers[1].inv(layers[2].inv(data.clone()))  # what the first actnorm receives
    torch.testing.assert_close(layers[0].inv(inner).std(0), torch.ones(2, dtype=F64))
    cond = ConditionalActNorm(2, 3).double().initialize_from(data)
    z = cond.condition(torch.zeros(3, dtype=F64)).inv(data.clone())
    torch.testing.assert_close(z.std(0), torch.ones(2, dtype=F64))


def test_maf_scores_data_in_one_pass_and_samples_in_d(monkeypatch):
    calls = []
    real = made_module.made_forward

    def counting(x, layers):
        calls.append(1)
        return real(x, layers)

    # (the package exports a function named iaf, so reach the module by import_module)
    monkeypatch.setattr(
        importlib.import_module("pyroflows.transforms.iaf"), "made_forward", counting
    )
    flow = MAF(5).double()
    d = dist.TransformedDistribution(
        dist.Normal(torch.zeros(5, dtype=F64), 1.0).to_event(1), [flow]
    )
    d.log_prob(torch.randn(7, 5, dtype=F64))
    assert len(calls) == 1  # inverse and log-det together
    calls.clear()
    with torch.enable_grad():
        d.rsample((7,))
    assert len(calls) == 5  # D fixed-point passes with autograd, the log-det from the last


def test_spline_ar_scores_data_in_one_pass_and_samples_in_d(monkeypatch):
    module = importlib.import_module("pyroflows.transforms.spline_autoregressive")
    calls = []
    real = module.made_forward

    def counting(x, layers):
        calls.append(1)
        return real(x, layers)

    monkeypatch.setattr(module, "made_forward", counting)
    flow = SplineAutoregressive(4).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 0.3)
    d = dist.TransformedDistribution(
        dist.Normal(torch.zeros(4, dtype=F64), 1.0).to_event(1), [flow]
    )
    y = 2.0 * torch.randn(7, 4, dtype=F64)
    lp = d.log_prob(y)
    assert len(calls) == 1  # inverse and log-det together
    calls.clear()
    with torch.enable_grad():
        x = d.base_dist.rsample((7,))
        y2 = flow(x)
    assert len(calls) == 4  # D fixed-point passes with autograd, the log-det from the last
    torch.testing.assert_close(flow.inv(y2.clone()), x, rtol=1e-9, atol=1e-9)
    # the density at the sample equals base density minus the log-det of the sampling pass
    ladj = flow.log_abs_det_jacobian(x, y2)
    torch.testing.assert_close(d.log_prob(y2.clone()), d.base_dist.log_prob(x) - ladj)
    assert torch.isfinite(lp).all()


def test_realnvp_log_scale_is_bounded_and_keeps_a_gradient():
    flow = RealNVP(2, hidden_dims=[]).double()
    with torch.no_grad():
        flow.net.bias[-1].fill_(1e4)  # raw log-scale far beyond the bound
    x = torch.randn(3, 2, dtype=F64)
    ladj = flow.log_abs_det_jacobian(x, flow(x))
    assert (ladj <= LOG_SCALE_BOUND + 1e-12).all()
    with torch.no_grad():
        flow.net.bias[-1].fill_(2.0)
    flow.log_abs_det_jacobian(x, flow(x)).sum().backward()
    assert flow.net.bias[-1].grad.abs().sum() > 0  # no hard clamp: the gradient survives


def test_spline_is_the_identity_outside_its_interval():
    flow = SplineCoupling(2, bins=5, bound=2.0).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_()
    x = torch.tensor([[0.3, 2.5], [0.3, -7.0], [-1.0, 1.9]], dtype=F64)
    y = flow(x)
    torch.testing.assert_close(y[:2], x[:2], atol=0, rtol=0)
    assert not torch.equal(y[2], x[2])
    ladj = flow.log_abs_det_jacobian(x, y)
    assert ladj[0] == 0 and ladj[1] == 0
    # knots map onto knots: the boundary stays fixed and the inverse is exact there
    edge = torch.tensor([[0.1, 2.0], [0.1, -2.0]], dtype=F64)
    torch.testing.assert_close(flow(edge), edge, atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.inv(edge.clone()), edge, atol=1e-12, rtol=0)


def test_linear_lu_permutation_and_its_metadata():
    flow = LinearLU(3, permutation=[2, 0, 1]).double()
    assert not starts_at_identity(flow)
    assert starts_at_identity(LinearLU(3))
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(flow(x), x[:, [2, 0, 1]])
    torch.testing.assert_close(flow.inv(flow(x).clone()), x)


def test_linear_lu_batch_paths_agree():
    """N > D points go through the formed W or W⁻¹, N ≤ D through the triangular factors:
    same values and gradients, with a permutation, at far-from-identity parameters."""
    gen = torch.Generator().manual_seed(3)
    flow = LinearLU(5, permutation=[3, 0, 4, 1, 2]).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(12, 5, generator=gen, dtype=F64)

    def outputs(points: torch.Tensor) -> list[torch.Tensor]:
        flow.zero_grad()
        z, ladj = LinearLU.inverse_fn(points, *flow.params())
        y, ladj_fwd = LinearLU.forward_fn(points, *flow.params())
        (z.square().sum() + y.square().sum()).backward()
        return [z, ladj, y, ladj_fwd, flow.lu.grad.clone(), flow.bias.grad.clone()]

    many, few = outputs(x), [outputs(x[i : i + 4]) for i in (0, 4, 8)]
    for k in range(4):
        torch.testing.assert_close(many[k], torch.cat([f[k] for f in few]), rtol=1e-10, atol=0)
    for k in (4, 5):
        torch.testing.assert_close(many[k], sum(f[k] for f in few), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(LinearLU.forward_fn(many[0], *flow.params())[0], x)


@pytest.mark.parametrize("n", [2, 9])
@pytest.mark.parametrize("perm", [None, [2, 0, 3, 1]])
def test_linear_lu_inverse_and_its_gradient_match_a_dense_solve(n, perm):
    """The triangular solves read their triangles of one packed matrix: values and gradients
    equal those of a general solve with W = P L U built densely."""
    gen = torch.Generator().manual_seed(n)
    flow = LinearLU(4, permutation=perm).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    y = torch.randn(n, 4, generator=gen, dtype=F64)
    x = flow.inv(y)
    grads = torch.autograd.grad(x.pow(3).sum(), [flow.lu, flow.bias])
    m, _ = lu_factors(flow.lu)
    w = (m.tril(-1) + torch.eye(4, dtype=F64)) @ m.triu()
    w = w[flow.perm]
    expected = torch.linalg.solve(w, (y - flow.bias).T).T
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)
    ref = torch.autograd.grad(expected.pow(3).sum(), [flow.lu, flow.bias])
    for ours, theirs in zip(grads, ref, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


def test_coupling_layers_alternate_halves_in_a_stack():
    layers = interleave_permutations([realnvp(3), realnvp(3), NICE(3)])
    assert [type(t).__name__ for t in layers] == [
        "RealNVP",
        "Reverse",
        "RealNVP",
        "Reverse",
        "NICE",
    ]
    flows = [MAF(3), ActNorm(3), ActNorm(3)]
    assert [type(t).__name__ for t in interleave_permutations(flows)] == [
        "MAF",
        "ActNorm",
        "ActNorm",
    ]


BAD = [
    (lambda: SplineCoupling(3, bins=0), ValueError, r"bins must be a positive int; got 0"),
    (lambda: SplineCoupling(3, bound=-1.0), ValueError, r"bound must be a positive number"),
    (lambda: SplineCoupling(3, bound=float("inf")), ValueError, r"bound must be finite"),
    (lambda: NICE(3, scale=1), TypeError, r"scale must be a bool; got 1"),
    (lambda: RealNVP(0), ValueError, r"input_dim must be a positive int; got 0"),
    (lambda: MAF(3, hidden_dims=5), TypeError, r"hidden_dims must be a sequence"),
    (lambda: LinearLU(3, permutation=[0, 0, 1]), ValueError, r"permutation of range\(3\)"),
    (lambda: ActNorm(2).initialize_from(torch.zeros(5, 3)), ValueError, r"\(N, \.\.\., 2\)"),
]


@pytest.mark.parametrize("build,error,match", BAD, ids=range(len(BAD)))
def test_argument_validation(build, error, match):
    with pytest.raises(error, match=match):
        build()
