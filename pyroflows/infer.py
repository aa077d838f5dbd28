"""Compatibility module: the names that lived here before the split.

Training moved to :mod:`pyroflows.train` (:class:`~pyroflows.train.Trainer`,
:func:`~pyroflows.train.evaluate`) and the estimators to :mod:`pyroflows.objectives`
(:func:`~pyroflows.objectives.elbo`, :func:`~pyroflows.objectives.log_weights`,
:func:`~pyroflows.objectives.log_likelihood`); they are re-exported here unchanged.
"""

from __future__ import annotations

from pyroflows.objectives import elbo, log_likelihood, log_weights
from pyroflows.train import Trainer, evaluate, module_elbo

__all__ = ["Trainer", "elbo", "evaluate", "log_likelihood", "log_weights", "module_elbo"]
