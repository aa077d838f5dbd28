"""FlowSequence (fused amortized stacks) equals the ComposeTransform of its layers."""

from __future__ import annotations

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
