"""Shared test configuration: seeding, ``--device``/``--dtype`` options, helpers.

Hypothesis runs derandomized (profile ``ci``, the default): every run draws the same
examples, so no test can fail by chance. ``HYPOTHESIS_PROFILE=explore python -m pytest``
searches with fresh random examples instead.
"""

from __future__ import annotations

import math
import os

import pyro
import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for tests, e.g. cuda")
    parser.addoption("--dtype", default="float64", choices=["float32", "float64"])


@pytest.fixture(autouse=True)
def _seed() -> None:
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


def randomize_(module: torch.nn.Module, scale: float = 1.0) -> torch.nn.Module:
    """Move every parameter far from its identity initialisation, in place.

    Vectors and scalars (the raw flow parameters) are drawn N(0, scale²); matrices (weights
    of hypernetworks and MADEs) N(0, scale²/fan_in), so the raw parameters they emit are
    also O(scale) rather than growing with the layer width.
    """
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, scale / math.sqrt(p.shape[-1]))
            else:
                p.normal_(0.0, scale)
    return module
