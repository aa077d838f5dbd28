"""FlowDensity: a flow as a Pyro model of data, fitted by the Trainer."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import FlowDensity, Trainer
from pyroflows.objectives import get_objective
from pyroflows.train import ObjectiveModule
from pyroflows.transforms import ActNorm, RealNVP

F64 = torch.float64


def test_log_prob_is_the_flow_density():
    pyro.set_rng_seed(0)
    density = FlowDensity.from_family("realnvp", 3, num_flows=3, hidden_dims=[5]).double()
    with torch.no_grad():
        for p in density.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(7, 3, dtype=F64)
    base = dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1)
    expected = dist.TransformedDistribution(base, density.flows).log_prob(x)
    torch.testing.assert_close(density.log_prob(x), expected)
    # by hand: pull back through the layers, adding each inverse log-det
    z, ladj = x, torch.zeros(7, dtype=F64)
    for t in reversed(density.flows):
        prev = t.inv(z)
        ladj = ladj - t.log_abs_det_jacobian(prev, z)
        z = prev
    manual = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + ladj
    torch.testing.assert_close(density.log_prob(x), manual)
    assert density.sample((4,)).shape == (4, 3)
    assert sum(1 for _ in density.parameters()) == sum(
        1 for t in density.flows if isinstance(t, RealNVP) for _ in t.parameters()
    )


def test_trainer_reaches_the_maximum_likelihood_estimate():
    """One actnorm layer is N(loc, diag s²): its MLE is the data mean and (biased) sd."""
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(512, 2, generator=gen, dtype=F64) * torch.tensor([0.5, 3.0], dtype=F64)
    data = data + torch.tensor([2.0, -1.0], dtype=F64)
    density = FlowDensity([ActNorm(2)]).double()
    trainer = Trainer(
        density, data, data, batch_size=128, lr=0.05, optimizer="adam",
        warmup_epochs=0, early_stopping_epochs=0, progress=False,
    )  # fmt: skip
    trainer.fit(300)
    layer = density.layers[0]
    scale = torch.nn.functional.softplus(layer.scale_raw + 0.5413248546129181) + 1e-4
    torch.testing.assert_close(layer.loc.detach(), data.mean(0), atol=2e-3, rtol=0)
    torch.testing.assert_close(scale.detach(), data.std(0, correction=0), atol=2e-3, rtol=2e-3)
    with torch.no_grad():
        mean_log_lik = float(density.log_prob(data).mean())
    # the restored parameters are the best validation epoch's (the ELBO is exact here)
    assert trainer.best_elbo == pytest.approx(mean_log_lik, rel=1e-6)


@pytest.mark.parametrize("loss", ["stl", "iwae", "dreg"])
def test_every_objective_is_the_log_likelihood_without_latents(loss):
    pyro.set_rng_seed(2)
    density = FlowDensity.from_family("maf", 2, num_flows=2, hidden_dims=[6]).double()
    x = torch.randn(5, 2, dtype=F64)
    # fresh copies: a flow's cache would hand the second call the first call's freed graph
    value, surrogate = ObjectiveModule(density, get_objective("elbo"))(x.clone(), 1.0)
    grads = torch.autograd.grad(surrogate, list(density.parameters()))
    v2, s2 = ObjectiveModule(density, get_objective(loss))(x.clone(), 1.0)
    torch.testing.assert_close(v2, density.log_prob(x.clone()).sum())
    torch.testing.assert_close(value, v2)
    for a, b in zip(grads, torch.autograd.grad(s2, list(density.parameters())), strict=True):
        torch.testing.assert_close(a, b)


def test_checkpoint_round_trip(tmp_path):
    pyro.set_rng_seed(3)
    data = torch.randn(64, 2)
    density = FlowDensity.from_family("spline", 2, num_flows=2, hidden_dims=[8])
    trainer = Trainer(density, data, batch_size=16, warmup_epochs=0, progress=False)
    trainer.fit(2)
    trainer.save(tmp_path / "c.pt")
    other = FlowDensity.from_family("spline", 2, num_flows=2, hidden_dims=[8])
    Trainer(other, data, batch_size=16, warmup_epochs=0, progress=False).load(tmp_path / "c.pt")
    torch.testing.assert_close(other.log_prob(data), density.log_prob(data), rtol=0, atol=0)


def test_initialize_actnorm_standardises_the_data():
    data = torch.randn(300, 2) * 4.0 + 7.0
    density = FlowDensity.from_family("actnorm", 2, num_flows=1).initialize_actnorm(data)
    z = density.flows[0].inv(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make,err,match",
    [
        (lambda: FlowDensity([torch.nn.Linear(2, 2)]), TypeError, "flows must be torch"),
        (lambda: FlowDensity.from_family("glowz", 2), ValueError, "family must be one of"),
        (lambda: FlowDensity.from_family("actnorm", 2, hidden_dims=[3]), ValueError, "hidden"),
        (lambda: FlowDensity.from_family("nice", 2, num_flows=0), ValueError, "num_flows"),
        (lambda: FlowDensity([ActNorm(2)], input_dim=0), ValueError, "input_dim"),
    ],
)
def test_errors(make, err, match):
    with pytest.raises(err, match=match):
        make()
