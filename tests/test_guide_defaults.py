"""AutoFlowGuide.default_num_samples is the default of median() and quantiles()."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import AutoFlowGuide


def model() -> None:
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize("where", ["instance", "subclass"])
def test_default_num_samples_is_overridable(where, monkeypatch):
    if where == "instance":
        guide = AutoFlowGuide(model, flow="planar", num_flows=1)
        guide.default_num_samples = 17
    else:
        guide = type("Small", (AutoFlowGuide,), {"default_num_samples": 17})(
            model, flow="planar", num_flows=1
        )
    seen = []
    original = guide._latent_quantiles

    def spy(probs, num_samples):
        seen.append(num_samples)
        return original(probs, num_samples)

    monkeypatch.setattr(guide, "_latent_quantiles", spy)
    guide.median()
    guide.quantiles([0.1, 0.9])
    guide.quantiles([0.5], num_samples=5)
    assert seen == [17, 17, 5]
