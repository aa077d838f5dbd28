"""pyroflows.VI with an AutoAmortizedFlowGuide: joint log-weights against a hand-written
joint density, draws of every member, fits of a conjugate hierarchical model with and
without subsampling, errors."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import VI, AutoAmortizedFlowGuide
from pyroflows._vi_amortized import AmortizedTarget
from pyroflows.objectives import get_objective
from pyroflows.vi import PairedMonitor, _PhaseScore
from tests.test_amortized import particle_model as model

D64 = torch.float64


def data(n, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = 2.0 + torch.randn(n, 1, generator=g, dtype=D64)
    return theta + torch.randn(n, m, generator=g, dtype=D64)


def exact(y):
    """Exact posterior mean and sd of (mu, theta_1..N): mu ~ N(0, 5²), theta_i ~ N(mu, 1),
    y_ij ~ N(theta_i, 1), from the joint precision matrix."""
    n, m = y.shape
    prec = torch.zeros(n + 1, n + 1, dtype=D64)
    prec[0, 0] = 1 / 25 + n
    prec[0, 1:] = prec[1:, 0] = -1.0
    prec[1:, 1:] = torch.eye(n, dtype=D64) * (1 + m)
    lin = torch.cat([torch.zeros(1, dtype=D64), y.sum(1)])
    cov = torch.linalg.inv(prec)
    return cov @ lin, cov.diagonal().sqrt()


def normal_lp(x, loc, sd):
    return -0.5 * ((x - loc) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)


def test_joint_log_weights_match_the_hand_written_joint():
    """N = 10 members in runs of B = 4 (the last run overlaps the one before): each draw's
    log-weight is log p(y, mu, theta_1..10) - log q(mu) - sum_i log q(theta_i | y_i, mu),
    written out by hand, and every member appears once."""
    y = data(10)
    pyro.set_rng_seed(0)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=2)
    guide(y, 4)
    target = AmortizedTarget(model, guide, (y, 4), {})
    values, log_w = target.log_weights(6, seed=1)
    mu, theta = values["mu"], values["theta"]  # (6,), (6, 10)
    assert mu.shape == (6,) and theta.shape == (6, 10)
    log_p = normal_lp(mu, 0.0, 5.0) + normal_lp(theta, mu[:, None], 1.0).sum(-1)
    log_p = log_p + normal_lp(y, theta[..., None], 1.0).sum((-1, -2))
    log_q = guide.global_guide.get_posterior().log_prob(mu[:, None])
    context = (y - guide.feature_loc) / guide.feature_scale  # (10, 3)
    context = torch.cat([context.expand(6, -1, -1), mu[:, None, None].expand(-1, 10, 1)], -1)
    log_q = log_q + guide.local(context).log_prob(theta[..., None]).sum(-1)
    torch.testing.assert_close(log_w, (log_p - log_q).detach(), rtol=1e-6, atol=1e-6)
    # a subset of members: the global terms plus N / M times the members' terms
    sub, sub_w = target.log_weights(6, seed=1, members=torch.arange(4))
    torch.testing.assert_close(sub["mu"], mu)
    assert sub["theta"].shape == (6, 4)


def test_draws_cover_every_member():
    """get_samples' counterpart: all N members, in order, under a subsampled plate."""
    y = data(10)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    guide(y, 4)
    draws = AmortizedTarget(model, guide, (y, 4), {}).sample(7)
    assert draws["mu"].shape == (7,) and draws["theta"].shape == (7, 10)
    assert bool(torch.isfinite(draws["theta"]).all())


@pytest.mark.slow  # ~35 s together: the default run is kept under 10 minutes
def test_fit_without_subsampling_matches_the_exact_posterior():
    """N = 12 groups, the whole plate per step: VI's amortized fit is within 0.15 posterior
    sd of the exact means of mu and every theta_i, its sds within 15%, and k-hat < 0.7
    (measured: 0.03 sd, 0.97-1.02, k-hat 0.29, 1,100 steps; the check of the globals
    kept the fit, 0.03 sd off its estimate)."""
    y = data(12)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=2, hidden_dims=[32])
    vi = VI(model, guide, seed=0, progress_bar=False, num_draws=2000).run(y)
    draws = vi.get_samples(4000)
    q = torch.cat([draws["mu"][:, None], draws["theta"]], dim=1).double()
    mean, sd = exact(y)
    assert float(((q.mean(0) - mean) / sd).abs().max()) < 0.15
    ratio = q.std(0) / sd
    assert 0.85 < float(ratio.min()) and float(ratio.max()) < 1.15, ratio
    d = vi.diagnostics()
    assert d["khat"] < 0.7 and d["converged"] and "amortized" in d["init"]
    assert vi.guide.global_guide.preconditioned  # whitened at the first plateau


@pytest.mark.slow  # ~35 s together: the default run is kept under 10 minutes
def test_subsampled_fit_uses_saga_and_the_paired_rule():
    """N = 200 groups, 20 per step: the fit runs SAGA steps and stops by the paired rule
    before the budget; mu is within 0.5 posterior sd of its exact mean and its sd within
    20% (measured: -0.001 sd, sd ratio 0.98, k-hat 0.32, 1,200 steps; the check kept it)."""
    y = data(200)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1, hidden_dims=[32])
    vi = VI(model, guide, seed=0, progress_bar=False, num_draws=500, max_steps=3000)
    vi.run(y, 20)
    mean, sd = exact(y)
    mu = vi.get_samples(2000)["mu"].double()
    assert abs(float(mu.mean()) - float(mean[0])) < 0.5 * float(sd[0])
    assert 0.8 < float(mu.std()) / float(sd[0]) < 1.2
    assert vi.get_samples(3)["theta"].shape == (3, 200)
    d = vi.diagnostics()
    assert d["khat"] < 0.7 and d["num_draws"] == 500 and d["steps"] < 3000


def test_paired_monitor_continues_while_the_average_improves():
    """The rule scores window averages with common random numbers: a score that rises by 1
    per window (noise 0.1) never plateaus; a flat one does at the second comparison."""
    p = torch.nn.Parameter(torch.zeros(()))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(50, generator=g, dtype=D64)
    rising = PairedMonitor(5, 0.01, lambda: p.detach() + 0.1 * noise, [p])
    flat = PairedMonitor(5, 0.01, lambda: 0.1 * noise + 0.0 * p.detach(), [p])
    fired_rising, fired_flat = [], []
    for step in range(30):
        with torch.no_grad():
            p.fill_(step / 5)
        fired_rising.append(rising.update(0.0))
        fired_flat.append(flat.update(0.0))
    assert not any(fired_rising)
    assert fired_flat.index(True) == 9  # windows end at steps 4, 9: first comparison at 9


def test_paired_monitor_restores_the_best_window_average():
    """A score that peaks in the second window and then falls: the plateau fires at the
    third, and restore_best() puts back the second window's average parameters."""
    p = torch.nn.Parameter(torch.zeros(()))
    peak = PairedMonitor(5, 0.01, lambda: -((p.detach() - 7.0) ** 2).expand(4), [p])
    fired = []
    for step in range(20):
        with torch.no_grad():
            p.fill_(float(step))
        fired.append(peak.update(0.0))
    first = fired.index(True)
    # window averages (each also holds the value it started from): 5/3, 6.5, 11.5
    assert first == 14
    peak.restore_best()
    assert float(p.detach()) == pytest.approx(6.5)


def test_paired_monitor_counts_the_reset_state_as_a_candidate():
    """Both window averages score worse than the state the monitor was reset at (a step
    size too large): restore_best() puts that state back and says it changed the
    parameters."""
    p = torch.nn.Parameter(torch.zeros(()))
    worse = PairedMonitor(5, 0.01, lambda: -(p.detach() ** 2).expand(4), [p])
    fired = []
    for step in range(1, 11):
        with torch.no_grad():
            p.fill_(float(step))
        fired.append(worse.update(0.0))
    assert fired.index(True) == 9
    assert worse.restore_best() is True
    assert float(p.detach()) == 0.0


def test_paired_monitor_waits_for_a_stationary_gradient():
    """A flat score plateaus only when the window-mean gradient is within 2 se plus
    gradient_tol of zero: a gradient of mean 0.5 (noise 0.1) keeps the fit going; one of
    mean 0.02 lets it stop at the second comparison, like a monitor without gradient."""
    p = torch.nn.Parameter(torch.zeros(()))
    g = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(40, 2, generator=g, dtype=D64)
    step = [0]

    def gradient(mean):
        return lambda: mean + noise[step[0]]

    flat = lambda: 0.0 * p.detach() + 0.1 * noise[:, 0]  # noqa: E731
    offset = PairedMonitor(5, 0.01, flat, [p], gradient=gradient(0.5), gradient_tol=0.1)
    settled = PairedMonitor(5, 0.01, flat, [p], gradient=gradient(0.02), gradient_tol=0.1)
    fired_offset, fired_settled = [], []
    for step[0] in range(30):
        fired_offset.append(offset.update(0.0))
        fired_settled.append(settled.update(0.0))
    assert not any(fired_offset)
    assert offset.last_gradient == pytest.approx(0.5, abs=0.1)
    assert fired_settled.index(True) == 9


def test_paired_monitor_refreshes_the_score_at_each_reset():
    """The state a phase starts from was chosen on the last phase's draws and members: a
    score with refresh() gets new ones at every reset (VI's: new draws, and a new subset
    of members when the plate has more than it scores), and keeps them within a phase."""
    y = data(3000, m=1)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    guide(y, 256)
    target = AmortizedTarget(model, guide, (y, 256), {})
    calls = []
    vi = SimpleNamespace(
        _target=target,
        num_score_draws=3,
        _log_weights=lambda n, seed, members: calls.append((seed, members)) or (None, p_w()),
    )
    p = torch.nn.Parameter(torch.zeros(()))
    p_w = lambda: torch.zeros(3, dtype=D64) + p.detach()  # noqa: E731
    score = _PhaseScore(vi, seed=10)
    monitor = PairedMonitor(2, 0.01, score, [p])  # the reset in __init__ refreshes once
    for _ in range(6):  # windows end at updates 2, 4, 6 (each also scores the start once)
        monitor.update(0.0)
    first = calls[:]
    monitor.reset()
    for _ in range(3):
        monitor.update(0.0)
    second = calls[len(first) :]
    assert {s for s, _ in first} == {10} and {s for s, _ in second} == {11}
    assert all(torch.equal(m, first[0][1]) for _, m in first)
    assert len(first[0][1]) == 1024 and not torch.equal(first[0][1], second[0][1])


def test_global_gradient_is_the_loss_gradient_in_loc_and_log_scale():
    """After the whitening, global_gradient() is the last step's gradient in the global
    guide's whitened location and in log(scale) (the chain rule through the softplus
    checked by autograd of an explicit log-scale leaf); None before the whitening."""
    y = data(12)
    pyro.set_rng_seed(0)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    guide(y, 4)
    target = AmortizedTarget(model, guide, (y, 4), {})
    loss_fn = target.loss_fn(2, get_objective("elbo"))

    def step():
        for p in target.params():
            p.grad = None
        loss = loss_fn()
        if isinstance(loss, torch.Tensor):  # Trace_ELBO; SAGA_ELBO has backpropagated
            loss.backward()

    step()
    assert target.global_gradient() is None  # not whitened yet
    assert target.on_plateau() is True
    step()  # SAGA_ELBO from here: the plate is subsampled and the globals whitened
    gg = guide.global_guide
    got = target.global_gradient()
    log_s = gg.scale.detach().log().requires_grad_()
    raw = torch.log(torch.expm1(log_s.exp()))  # the unconstrained value, as a function
    assert torch.allclose(raw, gg.scale_unconstrained.detach(), atol=1e-6)
    (want,) = torch.autograd.grad(raw, log_s, grad_outputs=gg.scale_unconstrained.grad)
    g = gg.latent_dim
    assert got.shape == (2 * g,)
    assert torch.equal(got[:g], gg.loc.grad.reshape(-1))
    assert torch.allclose(got[g:], want.reshape(-1), rtol=1e-5)


def test_global_guide_is_whitened_again_when_its_coordinates_go_stale():
    """At the first plateau the globals are whitened; at a later one again (rewhiten())
    only if the global guide's sd in those coordinates is off 1 by more than a factor 2
    along some direction (here: shrunk 3x, as at large N, where the first whitening was
    11x too wide); the guide's distribution is the same before and after."""
    from pyroflows.guides import _set_constrained

    y = data(12)
    pyro.set_rng_seed(0)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    guide(y, 4)
    target = AmortizedTarget(model, guide, (y, 4), {})
    gg = guide.global_guide
    assert target.rewhiten() is False  # nothing to re-whiten before the whitening
    assert target.on_plateau() is True  # the first whitening
    assert not target.whitening_stale()
    assert target.on_plateau() is False and target.rewhiten() is False  # fresh: kept
    with torch.no_grad():
        _set_constrained(gg, "scale", gg.scale / 3)
        gg.loc.fill_(0.7)
    assert target.whitening_stale()
    before = gg.get_posterior().sample((20000,))
    old = gg.precond_scale_tril.clone()
    assert target.on_plateau() is False  # the first whitening happens once
    assert target.rewhiten() is True  # whitened again: the phase restarts
    assert target.rewhitenings == 1 and not target.whitening_stale()
    torch.testing.assert_close(gg.precond_scale_tril, old / 3, rtol=0.05, atol=0.0)
    after = gg.get_posterior().sample((20000,))
    sd = before.std(0)
    assert ((after.mean(0) - before.mean(0)).abs() < 0.05 * sd).all()
    assert ((after.std(0) / sd - 1).abs() < 0.05).all()
    with torch.no_grad():  # 1.5x wider: within the factor 2, kept
        _set_constrained(gg, "scale", gg.scale * 1.5)
    assert not target.whitening_stale()


def test_a_rewhitening_restarts_the_phase_at_the_same_step_size(monkeypatch):
    """VI's optimiser loop: at a plateau where the target whitens again, the phase starts
    over (same step size, a fresh Adam, the stopping rule reset) instead of counting as a
    decay; the other plateaus decay as before."""
    import pyroflows.vi as vi_module
    from pyroflows.vi import ConvergenceMonitor, _Run

    p = torch.nn.Parameter(torch.zeros(()))
    events = []

    class Target:
        rewhitenings = 0

        def params(self):
            return [p]

        def rewhiten(self):
            if self.rewhitenings == 0:  # at the first plateau only
                self.rewhitenings = 1
                events.append("rewhiten")
                return True
            return False

        def on_plateau(self):
            events.append("plateau")
            return False

    class EveryTenSteps(ConvergenceMonitor):
        def reset(self):
            super().reset()
            self.count = 0
            events.append("reset")

        def update(self, loss):
            self.count += 1
            return self.count == 10

    optimisers, lrs = [], []

    def step(opt, params, loss_fn):
        if not optimisers or optimisers[-1] is not opt:
            optimisers.append(opt)
        lrs.append(opt.param_groups[0]["lr"])
        return 0.0

    monkeypatch.setattr(vi_module, "_step", step)
    vi = VI(model, progress_bar=False, num_decays=2, decay=0.5, max_steps=100)
    vi._target = Target()
    score = lambda num=0: 0.0  # noqa: E731
    monitor = EveryTenSteps()
    events.clear()
    converged, _ = vi._optimise(None, 0.1, _Run(), lambda: None, score, monitor)
    assert converged and len(lrs) == 40  # 10 steps each: the phase twice, then two decays
    assert lrs == [0.1] * 20 + [0.05] * 10 + [0.025] * 10
    assert events == ["reset", "rewhiten", "reset", "plateau", "reset", "plateau", "reset"]
    assert len(optimisers) == 2  # a fresh Adam after the rewhitening only (no restore)


def test_warns_when_the_report_draws_are_capped(monkeypatch):
    """When N is so large that the report's joint weights afford fewer draws than
    num_draws, VI says its k-hat cannot certify the globals (and what to do); not
    otherwise."""
    import pyroflows._vi_amortized as amortized_module

    y = data(12)

    def fit():
        guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vi = VI(model, guide, seed=0, progress_bar=False, max_steps=40, num_draws=300)
            vi.run(y, 4)
        return vi, [str(w.message) for w in caught]

    vi, messages = fit()
    assert vi.diagnostics()["num_draws"] == 300
    assert not any("cannot certify" in m for m in messages)
    monkeypatch.setattr(amortized_module, "REPORT_MEMBER_BUDGET", 1200)  # 100 draws x 12
    vi, messages = fit()
    assert vi.diagnostics()["num_draws"] == 100
    (message,) = [m for m in messages if "cannot certify" in m]
    assert "all 12 members" in message and "only 100 draws" in message
    assert "num_draws=300" in message and "SAGA_ELBO" in message


def test_errors():
    y = data(10)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    with pytest.raises(ValueError, match="loss='elbo' only; got 'iwae'"):
        VI(model, guide, loss="iwae", progress_bar=False).run(y, 4)


def scale_model(y, subsample_size=None):
    """A constrained global: tau ~ LogNormal(0, 0.5), theta_i ~ N(0, tau), y_i ~ N(theta_i,
    1), so y_i ~ N(0, tau² + 1) with theta integrated out."""
    tau = pyro.sample("tau", dist.LogNormal(torch.zeros((), dtype=y.dtype), 0.5))
    with pyro.plate("groups", len(y), subsample_size=subsample_size) as i:
        theta = pyro.sample("theta", dist.Normal(torch.zeros_like(tau), tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y[i])


def trained_target(model_fn, y, batch, steps, seed=0):
    """An amortized guide after ``steps`` SVI steps on ``batch`` members, globals whitened."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = AutoAmortizedFlowGuide(model_fn, num_flows=1, num_local_flows=1, hidden_dims=[32])
    svi = pyro.infer.SVI(model_fn, guide, pyro.optim.Adam({"lr": 0.02}), pyro.infer.Trace_ELBO())
    for _ in range(steps):
        svi.step(y, batch)
    guide.precondition_globals()
    return AmortizedTarget(model_fn, guide, (y, batch), {})


@pytest.mark.parametrize("chunk", [None, 1])
def test_marginal_score_matches_the_exact_score_of_a_constrained_global(chunk, monkeypatch):
    """The importance-sampled, jackknifed score of u = log tau (N = 60 members in runs of
    B = 16) against the exact d/du [log p(tau) + log|dtau/du| + sum_i log N(y_i; 0,
    tau² + 1)] by autograd, at three values of u: within 2% of the score's range (the
    score is about N times one member's); also one draw of u per pass (``chunk``)."""
    import pyroflows._vi_amortized as amortized_module

    if chunk is not None:
        monkeypatch.setattr(amortized_module, "CHECK_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    y = 1.5 * torch.randn(60, generator=g, dtype=D64)
    target = trained_target(scale_model, y, 16, 300)
    u = torch.tensor([[-0.2], [0.2], [0.5]], dtype=D64)
    torch.manual_seed(0)
    score, local_ess = target.marginal_score(u, 4096)

    def exact_score(u):
        u = u.detach().clone().requires_grad_()
        tau = u.exp()
        lp = dist.LogNormal(torch.zeros((), dtype=D64), 0.5).log_prob(tau) + u
        lp = lp + dist.Normal(0.0, (tau**2 + 1).sqrt()).log_prob(y).sum()
        return torch.autograd.grad(lp, u)[0]

    expected = torch.stack([exact_score(v) for v in u[:, 0]])[:, None]
    spread = float(expected.max() - expected.min())
    assert float((score - expected).abs().max()) < 0.02 * spread, (score, expected)
    assert 0.5 < local_ess <= 1.0


@pytest.mark.slow  # ~15 s: the default run is kept under 10 minutes
def test_check_globals_moves_an_offset_global_guide_onto_the_exact_marginal(monkeypatch):
    """N = 200 groups in runs of 20 (the conjugate model), 64 draws of the global guide and
    16 of each member's locals per estimate (the default 16 x 64 leave an se of about 0.04
    posterior sd here; 64 x 64, 0.02): a
    global guide moved 3 posterior sd off with half the sd is found off, moved back and
    verified: mu within 0.1 posterior sd of the exact mean, sd within 10%; so is the guide
    after 800 SVI steps, and a guide already there is kept."""
    import pyroflows._vi_amortized as amortized_module

    monkeypatch.setattr(amortized_module, "CHECK_GLOBAL_DRAWS", 64)
    monkeypatch.setattr(amortized_module, "CHECK_LOCAL_DRAWS", (16, 16))
    y = data(200)
    target = trained_target(model, y, 20, 800)
    mean, sd = exact(y)
    gg = target.guide.global_guide

    def errors():
        mu = gg.get_posterior().sample((20_000,))[:, 0].double()
        return float((mu.mean() - mean[0]) / sd[0]), float(mu.std() / sd[0])

    first = target.check_globals(seed=0)  # after 800 SVI steps, wherever the guide is
    err, ratio = errors()
    assert abs(err) < 0.1 and abs(ratio - 1) < 0.1, (first, err, ratio)
    kept = target.check_globals(seed=1)  # now it is kept
    assert not kept["moved"] and kept["rounds"] == 1 and kept["remaining"] < 0.1, kept
    # move it 3 posterior sd off, with half the sd
    q_mean, q_cov = target._guide_moments()
    whitened_sd = float(sd[0] / gg.precond_scale_tril[0, 0])
    target.move_globals(q_mean + 3 * whitened_sd, q_cov / 4)
    err, ratio = errors()
    assert abs(err - 3) < 0.2 and abs(ratio - 0.5) < 0.05
    check = target.check_globals(seed=2)
    assert check["moved"] and 2.5 < check["offset"] < 3.5 and check["remaining"] < 0.1
    assert 0.45 < check["sd_ratio"][0] < 0.55
    err, ratio = errors()
    assert abs(err) < 0.1 and abs(ratio - 1) < 0.1, (err, ratio)


def test_move_globals_sets_the_whitened_moments_and_keeps_the_flows():
    """The affine move folded into the preconditioner: afterwards the global guide's mean
    and covariance are the requested ones in the whitened coordinates it had before (two
    globals, so the Cholesky ratio is exercised), and its learnable parameters are
    untouched."""
    from tests.test_amortized import _example

    ex = _example()
    y = ex.simulate(30, 4)
    pyro.set_rng_seed(0)
    guide = AutoAmortizedFlowGuide(ex.model)
    guide(y)
    guide.precondition_globals()
    target = AmortizedTarget(ex.model, guide, (y,), {})
    gg = guide.global_guide
    params = {k: v.detach().clone() for k, v in gg.named_parameters()}
    loc, tril = gg.precond_loc.clone(), gg.precond_scale_tril.clone()
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    target.move_globals(mean, cov)
    torch.manual_seed(1)
    theta = gg.get_posterior().sample((200_000,))  # (S, 2)
    w = torch.linalg.solve_triangular(tril, (theta - loc).T, upper=False).T  # old coordinates
    torch.testing.assert_close(w.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(w.T), cov, atol=0.03, rtol=0)
    for k, v in guide.global_guide.named_parameters():
        torch.testing.assert_close(v.detach(), params[k], rtol=0, atol=0)


def test_check_globals_rounds(monkeypatch):
    """The loop over estimates (stubbed): a guide found on its estimate is kept; one found
    off is moved and, when the next estimate finds it on, moved onto that one too
    (remaining = that estimate's offset); three estimates that all find it off leave
    ``remaining`` None; no estimate leaves a reason."""
    from pyroflows._vi_amortized import GlobalsEstimate

    y = data(10)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    guide(y, 4)
    guide.precondition_globals()
    target = AmortizedTarget(model, guide, (y, 4), {})
    one = torch.eye(1)

    def estimate(offset, sd=1.0):  # the guide at 0 with sd 1, the estimate at -offset
        loc = -torch.tensor([offset])
        return GlobalsEstimate(loc, one * sd**2, torch.zeros(1), one, 0.01, 1.0)

    moves = []
    monkeypatch.setattr(target, "move_globals", lambda m, c: moves.append((float(m), float(c))))

    def run(estimates):
        moves.clear()
        it = iter(estimates)
        monkeypatch.setattr(target, "estimate_globals", lambda seed: next(it))
        return target.check_globals(0)

    kept = run([estimate(0.05)])
    assert not kept["moved"] and kept["rounds"] == 1 and moves == []
    assert kept["remaining"] == pytest.approx(0.05) and kept["offset"] == pytest.approx(0.05)
    moved = run([estimate(2.0), estimate(0.05)])
    assert moved["moved"] and moved["rounds"] == 2 and len(moves) == 2
    assert moves[0] == pytest.approx((-2.0, 1.0)) and moves[1] == pytest.approx((-0.05, 1.0))
    assert moved["offset"] == pytest.approx(2.0) and moved["remaining"] == pytest.approx(0.05)
    sd_off = run([estimate(0.0, sd=2.0), estimate(0.0)])  # sd off by half: moved
    assert sd_off["moved"] and sd_off["sd_ratio"] == pytest.approx((0.5, 0.5))
    unsettled = run([estimate(2.0), estimate(1.0), estimate(0.5)])
    assert unsettled["rounds"] == 3 and unsettled["remaining"] is None and len(moves) == 3
    failed = run([None])
    assert "reason" in failed and not failed["moved"] and "offset" not in failed


def test_public_check_globals_errors():
    """guide.check_globals before precondition_globals, and bad draw counts, say what to do."""
    y = data(10)
    guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
    guide(y, 4)
    with pytest.raises(RuntimeError, match=r"call precondition_globals\(\) first"):
        guide.check_globals(y, 4)
    guide.precondition_globals()
    with pytest.raises(ValueError, match="num_global_draws must be at least G . 2 = 3"):
        guide.check_globals(y, 4, num_global_draws=2)
    with pytest.raises(ValueError, match="num_local_draws must be an int >= 2; got 1"):
        guide.check_globals(y, 4, num_local_draws=1)
    check = guide.check_globals(y, 4, num_global_draws=8, num_local_draws=4)
    assert check["local_draws"] == 4 and check["rounds"] >= 1


def test_summary_line_of_the_globals_check():
    """diagnostics()["globals_check"] as summary() prints it: kept, moved, unsettled, none."""
    from pyroflows.vi import _globals_text

    base = dict(local_draws=16, local_ess=0.99, offset=0.72, sd_ratio=(0.6, 1.1), se=0.04)
    (kept,) = _globals_text(base | dict(moved=False, rounds=1, remaining=0.72))
    assert "16 draws, ESS / K 0.99" in kept and "0.72 posterior sd off" in kept
    assert kept.endswith("(se 0.04): kept")
    (moved,) = _globals_text(base | dict(moved=True, rounds=2, remaining=0.07))
    assert moved.endswith("moved onto the estimates (2; the last found it 0.07 ± 0.04 sd off)")
    (unsettled,) = _globals_text(base | dict(moved=True, rounds=3, remaining=None))
    assert unsettled.endswith("moved, not settled after 3 estimates")
    assert _globals_text(dict(moved=False, rounds=0, local_draws=16, reason="why")) == [
        "globals: not checked (why)"
    ]
    assert _globals_text(None) == []
