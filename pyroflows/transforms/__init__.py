"""Flow transforms and their registries.

``FLOWS[name](input_dim)`` builds an unconditional flow layer and
``CONDITIONAL_FLOWS[name](input_dim, context_dim)`` a conditional one; the generic tests in
``tests/test_transforms.py`` run over both registries. A new flow family is a file here, its
registry entries below and a docs entry.
"""

from __future__ import annotations

from collections.abc import Callable

from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule

from pyroflows.transforms.planar import (
    ConditionalPlanar,
    Planar,
    conditional_planar,
    planar,
    planar_u_hat,
)
from pyroflows.transforms.radial import (
    ConditionalRadial,
    Radial,
    conditional_radial,
    radial,
    radial_alpha_gamma,
)

FLOWS: dict[str, Callable[[int], TransformModule]] = {
    "planar": planar,
    "radial": radial,
}

CONDITIONAL_FLOWS: dict[str, Callable[[int, int], ConditionalTransformModule]] = {
    "planar": conditional_planar,
    "radial": conditional_radial,
}

__all__ = [
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "ConditionalPlanar",
    "ConditionalRadial",
    "Planar",
    "Radial",
    "conditional_planar",
    "conditional_radial",
    "planar",
    "planar_u_hat",
    "radial",
    "radial_alpha_gamma",
]
