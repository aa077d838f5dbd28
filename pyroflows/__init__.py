"""pyroflows: normalizing-flow variational inference for Pyro."""

from __future__ import annotations

__version__ = "0.1.0"

from pyroflows import datasets, objectives, transforms
from pyroflows.amortized import AutoAmortizedFlowGuide
from pyroflows.density import FlowDensity
from pyroflows.diagnostics import compare, psis, to_inference_data
from pyroflows.guides import AutoFlowGuide
from pyroflows.objectives import log_likelihood
from pyroflows.saga import SAGA_ELBO
from pyroflows.train import Trainer, evaluate
from pyroflows.transforms import CONDITIONAL_FLOWS, FLOWS
from pyroflows.vae import VAE, FlowEncoder
from pyroflows.vi import VI

__all__ = [
    "AutoAmortizedFlowGuide",
    "AutoFlowGuide",
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "FlowDensity",
    "FlowEncoder",
    "SAGA_ELBO",
    "Trainer",
    "VAE",
    "VI",
    "__version__",
    "compare",
    "datasets",
    "evaluate",
    "log_likelihood",
    "objectives",
    "psis",
    "to_inference_data",
    "transforms",
]
