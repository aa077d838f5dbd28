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

from pyroflows.transforms.actnorm import (
    ActNorm,
    ConditionalActNorm,
    actnorm,
    conditional_actnorm,
    initialize_actnorm,
)
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
from pyroflows.transforms.linear_lu import (
    ConditionalLinearLU,
    LinearLU,
    conditional_linear_lu,
    linear_lu,
)
from pyroflows.transforms.made import MADE
from pyroflows.transforms.maf import MAF, ConditionalMAF, conditional_maf, maf
from pyroflows.transforms.nice import NICE, ConditionalNICE, conditional_nice, nice
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
from pyroflows.transforms.realnvp import ConditionalRealNVP, RealNVP, conditional_realnvp, realnvp
from pyroflows.transforms.spline import (
    ConditionalSplineCoupling,
    SplineCoupling,
    conditional_spline,
    spline,
)
from pyroflows.transforms.spline_autoregressive import (
    ConditionalSplineAutoregressive,
    SplineAutoregressive,
    conditional_spline_autoregressive,
    spline_autoregressive,
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
    "nice": nice,
    "realnvp": realnvp,
    "spline": spline,
    "spline-ar": spline_autoregressive,
    "maf": maf,
    "actnorm": actnorm,
    "linear-lu": linear_lu,
}

CONDITIONAL_FLOWS: dict[str, Callable[[int, int], ConditionalTransformModule]] = {
    "planar": conditional_planar,
    "radial": conditional_radial,
    "sylvester-orthogonal": partial(conditional_sylvester, kind="orthogonal"),
    "sylvester-householder": partial(conditional_sylvester, kind="householder"),
    "sylvester-triangular": partial(conditional_sylvester, kind="triangular"),
    "iaf": conditional_iaf,
    "iaf-gated": conditional_gated_iaf,
    "nice": conditional_nice,
    "realnvp": conditional_realnvp,
    "spline": conditional_spline,
    "spline-ar": conditional_spline_autoregressive,
    "maf": conditional_maf,
    "actnorm": conditional_actnorm,
    "linear-lu": conditional_linear_lu,
}

__all__ = [
    "CONDITIONAL_FLOWS",
    "FLOWS",
    "ActNorm",
    "ConditionalActNorm",
    "ConditionalIAF",
    "ConditionalLinearLU",
    "ConditionalMAF",
    "ConditionalNICE",
    "ConditionalPlanar",
    "ConditionalPlanarStack",
    "ConditionalRadial",
    "ConditionalRealNVP",
    "ConditionalSplineAutoregressive",
    "ConditionalSplineCoupling",
    "ConditionalSylvester",
    "IAF",
    "LinearLU",
    "MADE",
    "MAF",
    "NICE",
    "Planar",
    "Radial",
    "RealNVP",
    "SplineAutoregressive",
    "SplineCoupling",
    "Sylvester",
    "actnorm",
    "conditional_actnorm",
    "conditional_gated_iaf",
    "conditional_iaf",
    "conditional_iaf_stack",
    "conditional_linear_lu",
    "conditional_maf",
    "conditional_nice",
    "conditional_planar",
    "conditional_radial",
    "conditional_realnvp",
    "conditional_spline",
    "conditional_spline_autoregressive",
    "conditional_sylvester",
    "gated_iaf",
    "iaf",
    "iaf_stack",
    "initialize_actnorm",
    "linear_lu",
    "maf",
    "nice",
    "planar",
    "planar_u_hat",
    "radial",
    "radial_alpha_gamma",
    "realnvp",
    "spline",
    "spline_autoregressive",
    "sylvester",
    "sylvester_r",
]
