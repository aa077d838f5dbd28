"""FlowEncoder and VAE: shapes under plates, the ELBO by hand, architectures, errors."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from pyroflows.infer import elbo
from pyroflows.transforms import CONDITIONAL_FLOWS
from pyroflows.transforms._base import Reverse
from pyroflows.vae import VAE, FlowEncoder, conv_decoder, conv_encoder
from tests.conftest import randomize_

FLOWS = ["none", *sorted(CONDITIONAL_FLOWS)]


def small_encoder(flow: str, num_flows: int = 3, x_dim: int = 6, h_dim: int = 5, z_dim: int = 4):
    net = nn.Sequential(nn.Linear(x_dim, h_dim), nn.Tanh())
    return FlowEncoder(net, h_dim, z_dim, flow, num_flows).double()


@pytest.mark.parametrize("flow", FLOWS)
def test_encoder_shapes_under_plates(flow):
    enc = small_encoder(flow)
    x = torch.randn(7, 6, dtype=torch.float64)

    def guide():
        with pyro.plate("particles", 3, dim=-2), pyro.plate("data", 7, dim=-1):
            return pyro.sample("z", enc(x))

    q = enc(x)
    assert q.batch_shape == (7,) and q.event_shape == (4,)
    tr = poutine.trace(guide).get_trace()
    z = tr.nodes["z"]["value"]
    assert z.shape == (3, 7, 4)
    tr.compute_log_prob()
    assert tr.nodes["z"]["log_prob"].shape == (3, 7)
    assert torch.isfinite(tr.nodes["z"]["log_prob"]).all()
    # unplated: one sample per datum, and the log-density of a flow sample is finite
    z1 = q.rsample()
    assert z1.shape == (7, 4) and q.log_prob(z1).shape == (7,)


def test_encoder_starts_near_its_gaussian():
    """Fresh flows are near the identity, so q(z|x) starts near the Gaussian base."""
    enc = small_encoder("planar")
    x = torch.randn(5, 6, dtype=torch.float64)
    q = enc(x)
    z = q.rsample()
    z0 = z
    for t in reversed(q.transforms):
        z0 = t.inv(z0)
    assert (z - z0).abs().max() < 0.1


@pytest.mark.parametrize("flow", ["planar", "radial"])
def test_elbo_equals_hand_computation(flow):
    """ELBO = log p(x|z) + log p(z) − [log N(z0; μ, σ) − Σ_k log|det J_k|] at the sampled z."""
    vae = VAE((2, 3), latent_dim=4, flow=flow, num_flows=3, hidden_dim=5).double()
    randomize_(vae.encoder.flows, 0.5)
    x = torch.bernoulli(torch.full((3, 6), 0.5, dtype=torch.float64))

    pyro.set_rng_seed(3)
    tr = poutine.trace(vae.guide).get_trace(x)
    q, z = tr.nodes["z"]["fn"], tr.nodes["z"]["value"]
    z0 = z
    for t in reversed(q.transforms):  # the base draw, read back from the transforms' cache
        z0 = t.inv(z0)

    enc = vae.encoder
    h = enc.net(x)
    loc, scale = enc.loc(h), F.softplus(enc.scale(h)) + enc.min_scale
    log_base = (-0.5 * ((z0 - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(
        -1
    )
    log_dets = []
    for b in range(3):  # per datum: log|det| of the whole flow map by autograd
        flows = enc.transforms(h[b : b + 1].detach())

        def fk(v, flows=flows):
            for t in flows:
                v = t(v)
            return v

        jac = torch.autograd.functional.jacobian(lambda v, fk=fk: fk(v[None])[0], z0[b].detach())
        log_dets.append(torch.linalg.slogdet(jac).logabsdet)
        torch.testing.assert_close(fk(z0[b : b + 1]), z[b : b + 1])
    log_q = log_base - torch.stack(log_dets)
    logits = vae.decoder(z)
    log_px = (x * logits - F.softplus(logits)).sum(-1)
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    expected = (log_px + log_pz - log_q).sum()

    pyro.set_rng_seed(3)
    torch.testing.assert_close(elbo(vae.model, vae.guide, x), expected)
    pyro.set_rng_seed(3)
    loss = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)
    assert loss == pytest.approx(-expected.item(), rel=1e-10)


def test_beta_scales_only_the_latent_terms():
    vae = VAE((2, 3), latent_dim=4, flow="planar", num_flows=2, hidden_dim=5).double()
    x = torch.bernoulli(torch.full((3, 6), 0.5, dtype=torch.float64))
    pyro.set_rng_seed(0)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    log_px = model_tr.nodes["x"]["fn"].log_prob(x).sum()
    kl_term = model_tr.nodes["z"]["fn"].log_prob(guide_tr.nodes["z"]["value"]).sum()
    kl_term = kl_term - guide_tr.nodes["z"]["fn"].log_prob(guide_tr.nodes["z"]["value"]).sum()
    pyro.set_rng_seed(0)
    torch.testing.assert_close(elbo(vae.model, vae.guide, x, 0.25), log_px + 0.25 * kl_term)


@pytest.mark.parametrize("flow", ["none", "planar", "iaf", "sylvester-householder"])
@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_direct_elbo_equals_the_traced_one(flow, beta):
    """VAE.elbo (what Trainer and evaluate call) is infer.elbo on model/guide, same draw."""
    vae = VAE((2, 3), latent_dim=4, flow=flow, num_flows=2, hidden_dim=5).double()
    x = torch.bernoulli(torch.full((3, 6), 0.5, dtype=torch.float64))
    pyro.set_rng_seed(5)
    traced = elbo(vae.model, vae.guide, x, beta)
    pyro.set_rng_seed(5)
    direct = vae.elbo(x, beta)
    torch.testing.assert_close(direct, traced, rtol=1e-12, atol=1e-12)
    g_direct = torch.autograd.grad(direct, list(vae.parameters()))
    pyro.set_rng_seed(5)
    g_traced = torch.autograd.grad(elbo(vae.model, vae.guide, x, beta), list(vae.parameters()))
    for a, b in zip(g_direct, g_traced, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(
    not {"iaf", "sylvester-triangular"} & set(CONDITIONAL_FLOWS),
    reason="no autoregressive/triangular conditional flow registered",
)
def test_reversal_between_autoregressive_layers():
    name = "iaf" if "iaf" in CONDITIONAL_FLOWS else "sylvester-triangular"
    enc = small_encoder(name, num_flows=3)
    ts = enc.transforms(torch.zeros(2, 5, dtype=torch.float64))
    assert [isinstance(t, Reverse) for t in ts] == [False, True, False, True, False]
    assert ts[1](torch.arange(4.0)).tolist() == [3, 2, 1, 0]
    planar = small_encoder("planar", num_flows=3).transforms(torch.zeros(2, 5).double())
    assert not any(isinstance(t, Reverse) for t in planar)


@pytest.mark.parametrize("flow", sorted(CONDITIONAL_FLOWS))
def test_reversal_placement_follows_class_metadata(flow):
    """Reverse goes between layers whose class declares a fixed order (autoregressive or
    coupling), from the class metadata rather than a list of names."""
    enc = small_encoder(flow, num_flows=3)
    ts = enc.transforms(torch.zeros(2, 5, dtype=torch.float64))
    ordered = {"iaf", "iaf-gated", "sylvester-triangular", "nice", "realnvp", "spline", "maf"}
    ordered |= {"spline-ar"}
    reversals = [isinstance(t, Reverse) for t in ts]
    if flow in ordered:
        assert reversals == [False, True, False, True, False]
    else:  # (planar's three layers run as one fused stack)
        assert not any(reversals)


@pytest.mark.parametrize("flow", sorted(CONDITIONAL_FLOWS))
def test_cli_trains_every_registered_flow(flow, tmp_path):
    """``pyroflows vae --flow NAME`` runs end to end for every conditional family."""
    from pyroflows.cli import main

    fast = ["--epochs", "1", "--num-samples", "2", "--test-subset", "4", "--hidden-dim", "8"]
    fast += ["--latent-dim", "3", "--num-flows", "2", "--no-progress"]
    assert main(["vae", "--flow", flow, *fast, "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["flow"] == flow and math.isfinite(results["test_elbo"])


def test_vae_model_guide_run_under_svi():
    vae = VAE((2, 3), latent_dim=2, flow="planar", num_flows=2, hidden_dim=4)
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO()
    )
    assert math.isfinite(svi.step(x))
    assert vae.reconstruct(x).shape == (4, 6) and vae.sample(3).shape == (3, 6)


@pytest.mark.parametrize("shape", [(28, 28), (28, 20)])
def test_conv_architecture_shapes(shape):
    d = shape[0] * shape[1]
    assert conv_encoder(shape)(torch.zeros(2, 3, d)).shape == (2, 3, 256)
    assert conv_decoder(8, shape)(torch.zeros(4, 2, 8)).shape == (4, 2, d)
    vae = VAE(shape, latent_dim=8, flow="planar", num_flows=2, architecture="conv")
    assert vae.likelihood(vae.guide(torch.zeros(2, d))).batch_shape == (2,)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"flow": "nope"}, "flow must be one of"),
        ({"num_flows": 0, "flow": "planar"}, "num_flows must be a positive int"),
        ({"latent_dim": 0}, "latent_dim must be a positive int"),
        ({"architecture": "rnn"}, "architecture must be one of"),
        ({"shape": (28,)}, r"shape must be \(H, W\)"),
        ({"architecture": "conv", "shape": (10, 10)}, "conv architecture supports"),
    ],
)
def test_vae_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE(**kwargs)


def test_encoder_argument_errors():
    with pytest.raises(TypeError, match="net must be a torch.nn.Module"):
        FlowEncoder(lambda x: x, 3, 2)
    with pytest.raises(ValueError, match="min_scale must be a positive finite float"):
        FlowEncoder(nn.Identity(), 3, 2, min_scale=0.0)
    with pytest.raises(ValueError, match="min_scale must be a positive finite float"):
        FlowEncoder(nn.Identity(), 3, 2, min_scale=float("inf"))
    with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
        FlowEncoder(nn.Identity(), 0, 2)


def test_prior_is_standard_normal():
    vae = VAE((2, 3), latent_dim=3, hidden_dim=4)
    p = vae.prior()
    assert isinstance(p, dist.Independent)
    torch.testing.assert_close(
        p.log_prob(torch.zeros(3)), torch.tensor(-1.5 * math.log(2 * math.pi))
    )
