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
