"""Issue 18, "Scale": default sizes at large D (the measurements are in
``benchmarks/large_d.py``; these tests check the sizes, cheaply)."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms import IAF, iaf_stack
from pyroflows.transforms.made import default_hidden_dim


def _hidden_width(flow: IAF) -> int:
    return flow.made.layers[0].out_features


@pytest.mark.parametrize("dim", [1, 2, 3, 10, 64, 99, 100])
def test_default_iaf_width_is_pyros_up_to_d_100(dim):
    """Results measured at small D (posteriordb, speed tables) stay valid: the default MADE
    is Pyro's ``[3D + 1]`` there, with the same parameter count."""
    flow = IAF(dim)
    assert _hidden_width(flow) == 3 * dim + 1
    weights = dim * (3 * dim + 1) + (3 * dim + 1) * 2 * dim
    biases = (3 * dim + 1) + 2 * dim
    assert sum(p.numel() for p in flow.parameters()) == weights + biases


def test_default_iaf_size_grows_linearly_in_d():
    """At D = 5,000 Pyro's width 3D + 1 gave 225M weights per layer (900M for the default
    guide's four); the default width is held at 301, so 3·D·301 weights per layer."""
    assert [default_hidden_dim(d) for d in (100, 101, 302, 5000, 20000)] == [301] * 5
    dim = 5000
    flow = IAF(dim)
    assert _hidden_width(flow) == 301
    n = sum(p.numel() for p in flow.parameters())
    assert n == 3 * dim * 301 + 301 + 2 * dim
    assert n < 3 * dim * (3 * dim + 1) / 40


def test_narrow_default_made_stays_autoregressive_and_documents_its_loss():
    """Above D = 302 the layer loses some nearest predecessors (as the docstring of
    ``default_hidden_dim`` states: at most ceil((D-1)/H) - 1), never gains a successor."""
    dim = 1000
    stack = iaf_stack(dim, num_flows=2)
    for layer in stack:
        w1, w2 = (m.mask for m in layer.made.layers)
        order = layer.made.permutation
        conn = (w2[:dim] @ w1 > 0)[order][:, order]  # (output, input) in the MADE's order
        allowed = torch.ones(dim, dim, dtype=torch.bool).tril(-1)
        assert not (conn & ~allowed).any()
        lost = (allowed & ~conn).sum(1)
        assert int(lost.max()) == -(-(dim - 1) // 301) - 1 == 3


def _tiny_model():
    import pyro
    import pyro.distributions as dist

    pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))


def _call_after_to_meta(make_guide, call_first: bool, clear_store: bool = False) -> dict:
    """Samples of ``guide()`` after ``guide.to("meta")`` (optionally after a first call, and
    optionally with Pyro's param store cleared between the move and the call)."""
    import pyro

    pyro.clear_param_store()
    guide = make_guide(_tiny_model)
    if call_first:
        guide()
    guide.to("meta")
    if clear_store:
        pyro.clear_param_store()
    return guide()


@pytest.mark.parametrize("base", ["diagonal", "full"])
def test_to_meta_before_the_first_call_then_call_works_as_for_autonormal(base):
    """Issue 18: ``guide.to("meta")`` then ``guide()``. Before the first call a guide has no
    parameters to move; the call creates them on the model's device (CPU here), for Pyro's
    AutoNormal and for AutoFlowGuide alike (no 10 GB first call at D = 5,000 any more,
    see ``default_hidden_dim``)."""
    from pyro.infer.autoguide import AutoNormal

    from pyroflows import AutoFlowGuide

    expected = _call_after_to_meta(AutoNormal, call_first=False)
    ours = _call_after_to_meta(lambda m: AutoFlowGuide(m, base=base), call_first=False)
    assert {k: (v.shape, v.device) for k, v in ours.items()} == {
        k: (v.shape, v.device) for k, v in expected.items()
    }


@pytest.mark.parametrize("base", ["diagonal", "full"])
def test_to_meta_after_the_first_call_then_call_works_as_for_autonormal(base):
    """AutoNormal: its parameters come back from the param store, the call returns CPU
    samples. AutoFlowGuide: ``loc`` and the flows' parameters come back from the store too,
    and the buffers the move replaced (MADE masks and permutation, the preconditioner) with
    them: the guide is the one before the move, and trains on."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.optim import Adam

    from pyroflows import AutoFlowGuide

    expected = _call_after_to_meta(AutoNormal, call_first=True)
    assert {v.device.type for v in expected.values()} == {"cpu"}
    ours = _call_after_to_meta(lambda m: AutoFlowGuide(m, base=base), call_first=True)
    assert {k: (v.shape, v.device) for k, v in ours.items()} == {
        k: (v.shape, v.device) for k, v in expected.items()
    }

    pyro.clear_param_store()
    guide = AutoFlowGuide(_tiny_model, base=base)
    guide()
    guide.precondition(torch.ones(3), torch.eye(3) * 2)
    state = {k: v.clone() for k, v in guide.state_dict().items()}
    z = torch.randn(5, 3)
    log_q = guide.get_posterior().log_prob(z).detach()
    guide.to("meta")
    guide()
    assert {k: (v.device, v.dtype) for k, v in guide.state_dict().items()} == {
        k: (v.device, v.dtype) for k, v in state.items()
    }
    torch.testing.assert_close(guide.state_dict(), state, rtol=0, atol=0)
    torch.testing.assert_close(guide.get_posterior().log_prob(z), log_q, rtol=0, atol=0)
    store = pyro.get_param_store()
    for name in ("loc", "flows$$$0.made.layers.0.weight"):
        param = guide.get_parameter(name.replace("$$$", "."))
        assert store._params[f"AutoFlowGuide.{name}"] is param  # what the optimizer steps
    SVI(_tiny_model, guide, Adam({"lr": 0.1}), Trace_ELBO()).step()
    assert not torch.equal(guide.loc, state["loc"])
    assert not torch.equal(guide.get_posterior().log_prob(z), log_q)  # no stale flow cache


@pytest.mark.parametrize("validate", [True, False], ids=["validation", "no-validation"])
def test_to_meta_then_clear_param_store_then_call_is_as_for_autonormal(validate):
    """With the param store cleared after the move there is nothing to undo it: the guide
    stays on meta, for AutoNormal and AutoFlowGuide alike. With Pyro's validation on, both
    calls fail on the meta tensors; with it off, both return meta samples."""
    import pyro
    from pyro.infer.autoguide import AutoNormal

    from pyroflows import AutoFlowGuide

    def outcome(make_guide):
        with pyro.validation_enabled(validate):
            try:
                out = _call_after_to_meta(make_guide, call_first=True, clear_store=True)
            except RuntimeError as e:
                return "meta" in str(e)
        return {k: (v.shape, v.device) for k, v in out.items()}

    expected = outcome(AutoNormal)
    assert expected == (True if validate else {"x": (torch.Size([3]), torch.device("meta"))})
    assert outcome(AutoFlowGuide) == expected


def test_only_a_move_is_undone_guides_of_the_same_name_stay_independent():
    """Fitting guides one after another (``pyro.clear_param_store()`` before each) and then
    calling each, as ``examples/autoguide_funnel.py`` does: the store holds the last guide's
    tensors under the same names, and an earlier guide that was not moved keeps its own
    ``loc`` and flows (its call must not take the last guide's, nor fail on their shapes)."""
    import pyro

    from pyroflows import AutoFlowGuide

    guides = []
    for width in (5, 7):
        pyro.clear_param_store()
        guides.append(AutoFlowGuide(_tiny_model, num_flows=1, hidden_dims=[width]))
        guides[-1]()
    first = guides[0]
    own = {k: v for k, v in first.named_parameters() if not k.endswith("_unconstrained")}
    first()
    assert all(first.get_parameter(k) is v for k, v in own.items())
