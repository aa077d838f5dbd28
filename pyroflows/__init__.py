"""pyroflows: normalizing-flow variational inference for Pyro."""

from __future__ import annotations

__version__ = "0.1.0"

from pyroflows import transforms
from pyroflows.diagnostics import compare, psis, to_inference_data
from pyroflows.guides import AutoFlowGuide
from pyroflows.transforms import CONDITIONAL_FLOWS, FLOWS

__all__ = [
    "AutoFlowGuide",
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "__version__",
    "compare",
    "psis",
    "to_inference_data",
    "transforms",
]
