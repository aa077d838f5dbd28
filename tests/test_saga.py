"""SAGA_ELBO: the correction vanishes without subsampling, the table holds each member's
gradient (hand-written reference), a subsampled fit recovers a conjugate posterior, errors."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyroflows import AutoAmortizedFlowGuide
from pyroflows.saga import SAGA_ELBO
from tests.test_amortized import particle_model as model

D64 = torch.float64


def data(n=40, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2.0 + torch.randn(n, 1, generator=g, dtype=D64)) + torch.randn(
        n, m, generator=g, dtype=D64
    )


def grads(guide):
    return {n: p.grad.clone() for n, p in guide.named_parameters() if p.grad is not None}


def zero(guide):
    for p in guide.parameters():
        p.grad = None


def test_without_subsampling_the_gradient_is_trace_elbos():
    """B = N: the correction sum_j T_j - (N/N) sum_i T_i is 0, so with the same random
    numbers every gradient equals Trace_ELBO's (vectorized particles)."""
    y = data(12)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    guide(y)
    saga = SAGA_ELBO("groups", num_particles=3)
    pyro.set_rng_seed(1)
    saga.loss_and_grads(model, guide, y)  # fills the table
    assert saga.table is not None and bool((saga.table != 0).all())
    zero(guide)
    pyro.set_rng_seed(2)
    loss = saga.loss_and_grads(model, guide, y)
    ours = grads(guide)
    zero(guide)
    pyro.set_rng_seed(2)
    ref = Trace_ELBO(3, vectorize_particles=True, max_plate_nesting=1)
    expected = ref.loss_and_grads(model, guide, y)
    theirs = grads(guide)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert ours.keys() == theirs.keys() and any("global" in n for n in ours)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-9)
    zero(guide)
    pyro.set_rng_seed(3)
    estimate = saga.loss(model, guide, y)
    pyro.set_rng_seed(3)
    assert estimate == pytest.approx(ref.loss(model, guide, y), rel=1e-12)


def test_table_holds_each_members_gradient():
    """With a local guide that ignores the globals, member i's gradient in mu is
    theta_i - mu (its prior term); the table row is its mean over the particles."""
    y = data(30)
    guide = AutoAmortizedFlowGuide(
        model, num_flows=1, num_local_flows=1, condition_on_globals=False
    )
    guide(y, 6)
    saga = SAGA_ELBO("groups", num_particles=4)
    pyro.set_rng_seed(3)
    saga.loss_and_grads(model, guide, y, 6)
    pyro.set_rng_seed(3)
    with pyro.plate("_saga_particles", 4, dim=-2):
        trace = poutine.trace(guide).get_trace(y, 6)
    index = trace.nodes["groups"]["value"]
    theta, mu = trace.nodes["theta"]["value"], trace.nodes["mu"]["value"]  # (4, 6), (4, 1)
    expected = (theta - mu).mean(0)
    torch.testing.assert_close(saga.table[index, 0], expected, rtol=1e-6, atol=1e-6)
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[index] = False
    assert bool((saga.table[rest] == 0).all())
    torch.testing.assert_close(saga.total, saga.table.sum(0))


def fitted_guide(y):
    """A guide after 200 Trace_ELBO steps of 10 of the groups (the fixed guide of the noise
    tests)."""
    pyro.set_rng_seed(0)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1, hidden_dims=[16])
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(200):
        svi.step(y, 10)
    return guide


def test_saga_removes_most_of_the_groups_spread():
    """At a fixed guide, the sd of the gradient for the global guide's location over steps
    of 10 of 200 groups, 16 particles: SAGA's (table filled by 3 epochs) is under half the
    plain estimator's (measured: 14.8 against 59.4; with one particle 60 against 70, where
    the local draws' noise, which the table does not remove, dominates)."""
    y = data(200, 3)
    guide = fitted_guide(y)
    loc = guide.global_guide.loc
    sds = {}
    for name, elbo in [
        ("plain", Trace_ELBO(16, vectorize_particles=True, max_plate_nesting=1)),
        ("saga", SAGA_ELBO("groups", 16, max_plate_nesting=1)),
    ]:
        if name == "saga":
            for _ in range(60):
                elbo.loss_and_grads(model, guide, y, 10)
        out = []
        for _ in range(100):
            zero(guide)
            elbo.loss_and_grads(model, guide, y, 10)
            out.append(loc.grad.clone())
        sds[name] = float(torch.stack(out).std(0).max())
    zero(guide)
    assert sds["saga"] < 0.5 * sds["plain"], sds


def test_loss_has_the_control_variate_too():
    """At a fixed guide the returned loss is unbiased (its mean over steps of 10 of 200
    groups matches the full-batch ELBO within Monte-Carlo error) and, once the table is
    filled, less noisy than the plain subsampled estimate (measured sd 27.5 against 86.3;
    the full-batch estimate's is 2.2: the table removes the members' spread, not the local
    draws' noise, which the factor N / B still scales)."""
    y = data(200, 3)
    guide = fitted_guide(y)
    full = Trace_ELBO(16, vectorize_particles=True, max_plate_nesting=1)
    exact = torch.tensor([full.loss(model, guide, y) for _ in range(100)], dtype=D64)
    plain = torch.tensor([full.loss(model, guide, y, 10) for _ in range(200)], dtype=D64)
    saga = SAGA_ELBO("groups", 16, max_plate_nesting=1)
    for _ in range(60):  # three epochs fill the table
        saga.loss_and_grads(model, guide, y, 10)
    controlled = []
    for _ in range(200):
        controlled.append(saga.loss_and_grads(model, guide, y, 10))
        zero(guide)
    controlled = torch.tensor(controlled, dtype=D64)
    assert controlled.std() < 0.5 * plain.std(), (controlled.std(), plain.std())
    se = (controlled.var() / 200 + exact.var() / 100).sqrt()  # steps are correlated: a margin
    assert abs(controlled.mean() - exact.mean()) < 6 * se, (controlled.mean(), exact.mean())
    assert saga.loss_total == pytest.approx(float(saga.loss_table.sum()), rel=1e-9)


def exact_mu(y):
    """Posterior mean and sd of mu, theta integrated out: y_i-bar ~ N(mu, 1 + 1/m)."""
    n, m = y.shape
    prec = 1 / 25 + n / (1 + 1 / m)
    return (y.mean(1).sum() / (1 + 1 / m)) / prec, prec**-0.5


@pytest.mark.slow  # ~16 s: the default run is kept under 10 minutes
def test_subsampled_fit_recovers_the_globals():
    """N = 400 groups, 20 per step: SAGA's fit of mu is within 0.3 posterior sd of the exact
    posterior mean and its sd within 30% (measured: -0.02 sd and 0.93)."""
    y = data(400, 4)
    pyro.set_rng_seed(0)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1, hidden_dims=[16])
    guide(y, 20)
    saga = SAGA_ELBO("groups", num_particles=4)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), saga)
    for _ in range(300):
        svi.step(y, 20)
    guide.precondition_globals()
    optim = pyro.optim.LambdaLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": 0.02},
            "lr_lambda": lambda t: 0.01 ** (t / 500),
        }
    )
    svi = SVI(model, guide, optim, saga)
    for _ in range(500):
        svi.step(y, 20)
        optim.step()
    draws = guide.global_guide.sample_posterior(y, 20, num_samples=4000)["mu"]
    mean, sd = exact_mu(y)
    assert abs(float((draws.mean() - mean) / sd)) < 0.3
    assert abs(float(draws.std() / sd) - 1) < 0.3


def test_errors():
    y = data(10)
    with pytest.raises(TypeError, match="plate must be the name"):
        SAGA_ELBO(3)
    with pytest.raises(ValueError, match="num_particles"):
        SAGA_ELBO("groups", num_particles=0)
    with pytest.raises(ValueError, match="max_plate_nesting must be a non-negative int"):
        SAGA_ELBO("groups", max_plate_nesting=-1)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    with pytest.raises(ValueError, match="plate 'nope'"):
        SAGA_ELBO("nope").loss_and_grads(model, guide, y, 5)

    def locals_first(y, subsample_size=None):
        loc = pyro.param("q_loc", torch.zeros((), dtype=y.dtype))
        with pyro.plate("groups", len(y), subsample_size=subsample_size):
            pyro.sample("theta", dist.Normal(loc, 1.0))
        pyro.sample("mu", dist.Normal(loc, 1.0))

    pyro.clear_param_store()

    with pytest.raises(RuntimeError, match="must sample every global latent before"):
        SAGA_ELBO("groups").loss_and_grads(model, locals_first, y, 5)


def test_example_runs_with_saga(tmp_path):
    from tests.test_amortized import _example

    ex = _example()
    args = ["--num-groups", "300", "--num-steps", "20", "--saga", "--num-particles", "2"]
    result = ex.main(ex.parse_args([*args, "--output-dir", str(tmp_path)]))
    assert (tmp_path / "amortized_hierarchical.json").exists()
    assert all(abs(result[n]["mean"]) < 100 for n in ("mu", "beta"))


@pytest.mark.slow  # ~7 s: the default run is kept under 10 minutes
@pytest.mark.filterwarnings("ignore:VI. :UserWarning")  # 60 steps do not converge
def test_example_runs_with_vi_and_checks_the_globals(tmp_path):
    """--vi runs VI (60 steps: too few for its first plateau, so no check of the globals),
    and --check-globals checks them after SVI."""
    from tests.test_amortized import _example

    ex = _example()
    out = ["--output-dir", str(tmp_path), "--num-groups", "200", "--subsample-size", "50"]
    result = ex.main(ex.parse_args([*out[:2], "--num-groups", "40", "--vi", "--num-steps", "60"]))
    assert all(abs(result[n]["mean"]) < 100 for n in ("mu", "beta"))
    assert "globals_check" not in result
    result = ex.main(ex.parse_args([*out, "--num-steps", "100", "--check-globals"]))
    check = result["globals_check"]
    assert check["rounds"] >= 1 and check["local_draws"] == 64
    mean, cov = ex.exact_globals(ex.simulate(200, 4, seed=0))
    if check["remaining"] is not None:  # settled: within 0.2 posterior sd of the exact mean
        for i, name in enumerate(("mu", "beta")):
            assert abs(result[name]["mean"] - float(mean[i])) < 0.2 * float(cov[i, i].sqrt())
