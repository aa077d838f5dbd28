"""pyroflows: normalizing-flow variational inference for Pyro."""

from __future__ import annotations

__version__ = "0.1.0"

from pyroflows import transforms
from pyroflows.transforms import CONDITIONAL_FLOWS, FLOWS

__all__ = ["CONDITIONAL_FLOWS", "FLOWS", "__version__", "transforms"]
