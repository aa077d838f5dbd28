"""Generic checks run over every registered flow and conditional flow.

Every test builds the flow, moves all its parameters far from the identity (``randomize_``)
and checks one property. A new flow joins by adding a registry entry.

Flows and tensors follow ``--device`` and ``--dtype`` (default ``cpu`` and ``float64``,
where every check and tolerance is the float64 one); in ``float32`` the tolerances of
the numerical comparisons are :data:`F32_TOL`. Two tests fix their dtype: the float32
far-out test, and the adversarial-parameter test, whose autograd reference needs float64.
"""

from __future__ import annotations

import copy

import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyroflows.transforms import CONDITIONAL_FLOWS, FLOWS
from pyroflows.transforms._base import starts_at_identity
from tests.conftest import randomize_

D = 4
C = 3  # context dimension
F32_TOL = 2e-4  # atol = rtol of a float32 comparison that is 1e-8 .. 1e-6 in float64
BATCH_SHAPES = [(), (7,), (3, 5)]
CASES = [("flow", n) for n in sorted(FLOWS)] + [
    ("conditional", n) for n in sorted(CONDITIONAL_FLOWS)
]
IDS = [f"{kind}-{name}" for kind, name in CASES]


@pytest.fixture
def fk(device: torch.device, dtype: torch.dtype) -> dict:
    """Tensor options from ``--device`` / ``--dtype`` (default cpu, float64)."""
    return {"device": device, "dtype": dtype}


def tol(dtype: torch.dtype, f64: float) -> float:
    """The float64 tolerance ``f64``, or :data:`F32_TOL` in float32 when that is looser."""
    return f64 if dtype == torch.float64 else max(f64, F32_TOL)


def build(kind: str, name: str, dim: int = D, dtype: torch.dtype = torch.float64, device="cpu"):
    """Return the module (holding the parameters) built from the registry, in ``dtype``."""
    registry = FLOWS if kind == "flow" else CONDITIONAL_FLOWS
    args = (dim,) if kind == "flow" else (dim, C)
    return registry[name](*args).to(device=device, dtype=dtype)


def transform_of(
    module, kind: str, batch_shape: tuple[int, ...], dtype=torch.float64, device="cpu"
):
    """The transform to apply: the module itself, or it conditioned on a batched context."""
    if kind == "flow":
        return module
    return module.condition(torch.randn(*batch_shape, C, dtype=dtype, device=device))


def base_dist(dim: int, dtype=torch.float64, device="cpu"):
    zero = torch.zeros(dim, dtype=dtype, device=device)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


def jacobian_blocks(t, x: torch.Tensor) -> torch.Tensor:
    """The per-sample Jacobians of ``t`` at ``x`` via autograd, shape ``(*batch, D, D)``."""
    batch_shape, dim = x.shape[:-1], x.shape[-1]
    n = int(torch.tensor(batch_shape).prod()) if batch_shape else 1

    def f(flat: torch.Tensor) -> torch.Tensor:
        return t(flat.reshape(x.shape)).reshape(n, dim)

    jac = torch.autograd.functional.jacobian(f, x.reshape(n, dim))  # (n, D, n, D)
    return jac[torch.arange(n), :, torch.arange(n), :].reshape(*batch_shape, dim, dim)


def blockwise_jacobian_ladj(t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, log|det|) of the per-sample autograd Jacobians of ``t`` at ``x``."""
    return torch.linalg.slogdet(jacobian_blocks(t, x))


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_shapes_and_ladj_match_autograd(kind, name, batch_shape, fk):
    module = randomize_(build(kind, name, **fk))
    t = transform_of(module, kind, batch_shape, **fk)
    x = torch.randn(*batch_shape, D, **fk)
    eps = tol(x.dtype, 1e-8)
    y = t(x)
    assert y.shape == x.shape
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.shape == batch_shape
    sign, expected = blockwise_jacobian_ladj(t, x)
    assert (sign > 0).all(), "Jacobian determinant must be positive (orientation-preserving)"
    torch.testing.assert_close(ladj, expected, atol=eps, rtol=eps)
    # the uncached path (a fresh y) gives the same log-det
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y.clone()), expected, atol=eps, rtol=eps)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_inverse_round_trip(kind, name, batch_shape, fk):
    module = randomize_(build(kind, name, **fk))
    t = transform_of(module, kind, batch_shape, **fk)
    x = torch.randn(*batch_shape, D, **fk)
    y = t(x)
    x_back = t.inv(y.clone())  # a fresh tensor: no cache hit
    eps = tol(x.dtype, 1e-6)
    torch.testing.assert_close(x_back, x, atol=eps, rtol=eps)
    inv_ladj = t.inv.log_abs_det_jacobian(y.clone(), x_back)
    ladj = -t.log_abs_det_jacobian(x, y)
    torch.testing.assert_close(inv_ladj, ladj, atol=tol(x.dtype, 1e-8), rtol=eps)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_log_prob_of_fresh_tensor_equals_cached(kind, name, batch_shape, fk):
    module = randomize_(build(kind, name, **fk))
    t = transform_of(module, kind, batch_shape, **fk)
    d = dist.TransformedDistribution(base_dist(D, **fk), [t])
    y = d.rsample(batch_shape)
    cached = d.log_prob(y)
    fresh = d.log_prob(y.detach().clone())
    assert cached.shape == batch_shape
    torch.testing.assert_close(fresh, cached, atol=tol(y.dtype, 1e-8), rtol=tol(y.dtype, 1e-6))


def test_conditional_context_broadcasts_against_sample_batch(fk):
    for name in sorted(CONDITIONAL_FLOWS):
        module = randomize_(build("conditional", name, **fk))
        context = torch.randn(5, 1, C, **fk)  # broadcasts to (5, 3)
        base = base_dist(D, **fk)
        d = dist.ConditionalTransformedDistribution(base, [module]).condition(context)
        x = torch.randn(5, 3, D, **fk)
        lp = d.log_prob(x)
        assert lp.shape == (5, 3)
        for i in range(3):  # each column equals the log-density with that context alone
            di = dist.ConditionalTransformedDistribution(base, [module])
            lpi = di.condition(context[:, 0]).log_prob(x[:, i])
            torch.testing.assert_close(lp[:, i], lpi)


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_density_integrates_to_one_in_2d(kind, name, fk):
    module = randomize_(build(kind, name, dim=2, **fk))
    t = transform_of(module, kind, (), **fk)
    d = dist.TransformedDistribution(base_dist(2, **fk), [t])
    with torch.no_grad():
        s = d.sample((20000,))
        lo = s.min(0).values - 1.5 * s.std(0) - 2.0
        hi = s.max(0).values + 1.5 * s.std(0) + 2.0
        n = 1201
        g0 = torch.linspace(float(lo[0]), float(hi[0]), n, **fk)
        g1 = torch.linspace(float(lo[1]), float(hi[1]), n, **fk)
        grid = torch.stack(torch.meshgrid(g0, g1, indexing="ij"), -1)
        dens = d.log_prob(grid).exp()
        total = torch.trapezoid(torch.trapezoid(dens, g1, dim=1), g0, dim=0)
    assert abs(float(total) - 1.0) < 1e-3, float(total)


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_every_parameter_gets_a_finite_gradient(kind, name, fk):
    module = randomize_(build(kind, name, **fk))
    t = transform_of(module, kind, (6,), **fk)
    d = dist.TransformedDistribution(base_dist(D, **fk), [t])
    y = d.rsample((6,))
    loss = d.log_prob(y).sum() + d.log_prob(torch.randn(6, D, **fk)).sum()
    loss.backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_trains_after_a_first_call_under_inference_mode(kind, name, fk):
    """Constants memoised during an inference-mode call are normal tensors: a later call
    that records a graph can save them for backward."""
    from pyroflows._utils import clear_constant_caches

    module = randomize_(build(kind, name, **fk))
    clear_constant_caches()
    with torch.inference_mode():
        transform_of(module, kind, (6,), **fk)(torch.randn(6, D, **fk))
    t = transform_of(module, kind, (6,), **fk)
    x = torch.randn(6, D, **fk)
    y = t(x)
    (y.sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_state_dict_round_trip(kind, name, tmp_path, fk):
    module = randomize_(build(kind, name, **fk))
    path = tmp_path / "flow.pt"
    torch.save(module.state_dict(), path)
    fresh = build(kind, name, **fk)
    fresh.load_state_dict(torch.load(path))
    context = torch.randn(5, C, **fk)
    x = torch.randn(5, D, **fk)
    lps = []
    for m in (module, fresh):
        t = m if kind == "flow" else m.condition(context)
        lps.append(dist.TransformedDistribution(base_dist(D, **fk), [t]).log_prob(x))
    torch.testing.assert_close(lps[0], lps[1], atol=0, rtol=0)
    assert [copy.deepcopy(p) is not None for p in fresh.parameters()]


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_starts_near_identity(kind, name, fk):
    """Unless its class declares ``starts_at_identity = False`` (the gated IAF starts, by
    design, as the contraction y ≈ sigmoid(b)·x; tests/test_iaf.py checks that start)."""
    module = build(kind, name, **fk)
    if not starts_at_identity(module):
        pytest.skip(f"{name} declares starts_at_identity = False")
    t = transform_of(module, kind, (10,), **fk)
    x = torch.randn(10, D, **fk)
    y = t(x)
    torch.testing.assert_close(y, x, atol=0.05, rtol=0)
    assert t.log_abs_det_jacobian(x, y).abs().max() < 0.05


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_float32_is_finite_far_out(kind, name, device):
    module = randomize_(build(kind, name, dtype=torch.float32, device=device))
    t = transform_of(module, kind, (8,), dtype=torch.float32, device=device)
    direction = torch.nn.functional.normalize(torch.randn(8, D, device=device), dim=-1)
    for radius in (1e-3, 1.0, 1e2, 1e3):
        x = radius * direction
        y = t(x)
        assert torch.isfinite(y).all() and torch.isfinite(t.log_abs_det_jacobian(x, y)).all()
        assert torch.isfinite(t.inv(y.clone())).all()


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    scale=st.sampled_from([0.0, 1e-8, 1.0, 30.0, 1e3]),
    zero_mask_seed=st.integers(0, 2**16),
    x_scale=st.sampled_from([0.0, 1.0, 10.0]),
)
def test_invertibility_constraint_holds_for_adversarial_parameters(
    kind, name, scale, zero_mask_seed, x_scale, device
):
    """Any raw parameters (huge, tiny, some exactly zero) give a positive Jacobian det.

    In float64 whatever ``--dtype`` says: the autograd reference needs its accuracy.
    """
    gen = torch.Generator().manual_seed(zero_mask_seed)
    module = build(kind, name, dim=3, device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
            if torch.rand((), generator=gen) < 0.3:
                p.zero_()  # e.g. planar's w = 0
    t = transform_of(module, kind, (4,), device=device)
    x = x_scale * torch.randn(4, 3, dtype=torch.float64, generator=gen).to(device)
    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    blocks = jacobian_blocks(t, x)
    # the autograd reference itself can be NaN (radial at x = x0 with alpha at its floor):
    # skip those points; the finiteness of ours was asserted above at every point
    finite = torch.isfinite(blocks).flatten(-2).all(-1)
    blocks, ladj = blocks[finite], ladj[finite]
    sign, expected = torch.linalg.slogdet(blocks)
    # slogdet of the autograd Jacobian has relative error ~ eps * cond(J): compare only where
    # it is reliable (ours stays exact where it is not, see the flow-specific tests)
    cond = torch.linalg.cond(blocks)
    reliable = (expected > -20) & (cond < 1e10)
    assert (sign[reliable] > 0).all()
    accurate = (expected > -10) & (cond < 1e8)
    torch.testing.assert_close(ladj[accurate], expected[accurate], atol=1e-6, rtol=1e-6)


PLAIN = [("flow", n) for n in sorted(FLOWS)]


@pytest.mark.parametrize("kind,name", PLAIN, ids=[f"flow-{n}" for _, n in PLAIN])
def test_cache_is_not_reused_after_a_parameter_update(kind, name, fk):
    """Issue 18: the same input tensor after an in-place parameter update (an optimizer
    step) is recomputed, in both directions and for the log-det; a value cached without
    grad is not returned to a call that records a graph."""
    module = randomize_(build(kind, name, **fk))
    x = torch.randn(5, D, **fk)
    with torch.no_grad():
        y = module(x)
    assert module(x).grad_fn is not None  # cached under no_grad, now recorded
    y = module(x)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    y2 = module(x)
    assert module.inv(y2) is x  # cached with the current parameters: a hit
    assert not torch.equal(y2, y)
    torch.testing.assert_close(y2, module(x.clone()), atol=0, rtol=0)
    y3 = module(x)  # a new entry for x with the current parameters, and its log-det
    torch.testing.assert_close(
        module.log_abs_det_jacobian(x, y3),
        module.log_abs_det_jacobian(x.clone(), y3.clone()),
        atol=0,
        rtol=0,
    )
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.testing.assert_close(module.inv(y2), module.inv(y2.clone()), atol=0, rtol=0)


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_mle_on_one_fixed_tensor_trains_for_three_steps(kind, name, fk):
    """Issue 18: maximum likelihood on one fixed full-batch tensor (the scored tensor is the
    same object every step) runs, and every step's loss is that of the current parameters."""
    module = build(kind, name, **fk)
    data = 1.5 * torch.randn(32, D, **fk) + 0.5
    context = torch.randn(32, C, **fk)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        t = module if kind == "flow" else module.condition(context)
        d = dist.TransformedDistribution(base_dist(D, **fk), [t])
        loss = -d.log_prob(data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] != losses[1] != losses[2]
    t = module if kind == "flow" else module.condition(context)
    d = dist.TransformedDistribution(base_dist(D, **fk), [t])
    with torch.no_grad():
        again = d.log_prob(data)  # the same tensor: must not return pre-step values
        torch.testing.assert_close(again, d.log_prob(data.clone()), atol=0, rtol=0)


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_wrong_event_size_raises(kind, name, fk):
    """Issue 18: a size-1 (or any wrong-size) last dimension raises instead of
    broadcasting against the D-dimensional parameters."""
    t = transform_of(build(kind, name, **fk), kind, (), **fk)
    for bad in (1, D + 1):
        v = torch.randn(5, bad, **fk)
        match = rf"event of size {D} in the last dimension; got {bad}"
        with pytest.raises(ValueError, match=match):
            t(v)
        with pytest.raises(ValueError, match=match):
            t.inv(v)
        with pytest.raises(ValueError, match=match):
            t.log_abs_det_jacobian(v, v)


@pytest.mark.parametrize("kind,name", PLAIN, ids=[f"flow-{n}" for _, n in PLAIN])
def test_cache_follows_copies_and_conversions(kind, name, fk):
    """A deep copy tracks its own parameters (not the original's), and ``.to()`` after a
    call drops the cache, so neither can serve values of other parameters."""
    module = randomize_(build(kind, name, **fk))
    x = torch.randn(5, D, **fk)
    y = module(x)
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.equal(clone(x), y)
    assert module(x) is y
    module.load_state_dict(clone.state_dict(), assign=True)  # new parameter objects
    torch.testing.assert_close(module(x), clone(x.clone()), atol=0, rtol=0)
    other = torch.float32 if fk["dtype"] == torch.float64 else torch.float64
    module.to(other)
    assert module(torch.randn(5, D, dtype=other, device=fk["device"])).dtype == other


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_affine_metadata_is_true_exactly_for_affine_maps(name):
    """A class declaring ``affine = True`` is an affine map at random parameters (the image
    of a midpoint is the midpoint of the images, and the log-det is the same everywhere);
    every other family is not, at random far-from-identity parameters."""
    torch.manual_seed(0)
    module = randomize_(build("flow", name))
    x, z = torch.randn(2, 64, D, dtype=torch.float64)
    with torch.no_grad():
        mid = module(0.5 * (x + z))
        gap = (mid - 0.5 * (module(x) + module(z))).abs().max()
        ladj = module.log_abs_det_jacobian(x, module(x))
    if module.affine:
        assert float(gap) < 1e-10
        torch.testing.assert_close(ladj, ladj[:1].expand_as(ladj))
    else:
        assert float(gap) > 1e-3, f"{name} looks affine but does not declare it"
