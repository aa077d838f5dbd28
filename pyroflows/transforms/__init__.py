"""Flow transforms and their registries.

``FLOWS[name](input_dim)`` builds an unconditional flow layer and
``CONDITIONAL_FLOWS[name](input_dim, context_dim)`` a conditional one; the generic tests in
``tests/test_transforms.py`` run over both registries. A new flow family is a file here, its
registry entries below and a docs entry.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule

from pyroflows.transforms.iaf import (
    IAF,
    ConditionalIAF,
    conditional_gated_iaf,
    conditional_iaf,
    conditional_iaf_stack,
    gated_iaf,
    iaf,
    iaf_stack,
)
from pyroflows.transforms.made import MADE
from pyroflows.transforms.planar import (
    ConditionalPlanar,
    ConditionalPlanarStack,
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
from pyroflows.transforms.sylvester import (
    ConditionalSylvester,
    Sylvester,
    conditional_sylvester,
    sylvester,
    sylvester_r,
)

FLOWS: dict[str, Callable[[int], TransformModule]] = {
    "planar": planar,
    "radial": radial,
    "sylvester-orthogonal": partial(sylvester, kind="orthogonal"),
    "sylvester-householder": partial(sylvester, kind="householder"),
    "sylvester-triangular": partial(sylvester, kind="triangular"),
    "iaf": iaf,
    "iaf-gated": gated_iaf,
}

CONDITIONAL_FLOWS: dict[str, Callable[[int, int], ConditionalTransformModule]] = {
    "planar": conditional_planar,
    "radial": conditional_radial,
    "sylvester-orthogonal": partial(conditional_sylvester, kind="orthogonal"),
    "sylvester-householder": partial(conditional_sylvester, kind="householder"),
    "sylvester-triangular": partial(conditional_sylvester, kind="triangular"),
    "iaf": conditional_iaf,
    "iaf-gated": conditional_gated_iaf,
}

__all__ = [
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "IAF",
    "MADE",
    "ConditionalIAF",
    "ConditionalPlanar",
    "ConditionalPlanarStack",
    "ConditionalRadial",
    "ConditionalSylvester",
    "Planar",
    "Radial",
    "Sylvester",
    "conditional_gated_iaf",
    "conditional_iaf",
    "conditional_iaf_stack",
    "conditional_planar",
    "conditional_radial",
    "conditional_sylvester",
    "gated_iaf",
    "iaf",
    "iaf_stack",
    "planar",
    "planar_u_hat",
    "radial",
    "radial_alpha_gamma",
    "sylvester",
    "sylvester_r",
]
