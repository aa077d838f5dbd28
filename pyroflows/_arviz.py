"""Every difference between ArviZ 0.x (``InferenceData``) and ArviZ >= 1 (``xarray.DataTree``).

The rest of pyroflows calls only these functions; none of it imports ArviZ directly. ArviZ is
imported lazily because importing it takes seconds.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np


@functools.cache
def arviz() -> Any:
    """Import ArviZ lazily, silencing only its once-a-day "undergoing a major refactor" note."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning
        )
        import arviz
    return arviz


def major_version() -> int:
    """ArviZ's major version: 0 for ``InferenceData``, >= 1 for ``xarray.DataTree``."""
    return int(arviz().__version__.split(".")[0])


def from_dict(
    groups: dict[str, dict[str, np.ndarray]],
    dims: dict[str, list[str]],
    coords: dict[str, np.ndarray],
    attrs: dict[str, str],
) -> Any:
    """``az.from_dict`` on either ArviZ: InferenceData on 0.x, DataTree on >= 1.

    ``attrs`` go on the posterior group.
    """
    az = arviz()
    if major_version() >= 1:
        return az.from_dict(groups, dims=dims, coords=coords, attrs={"posterior": attrs})
    return az.from_dict(**groups, dims=dims, coords=coords, posterior_attrs=attrs)


def is_arviz_data(obj: object) -> bool:
    """Whether ``obj`` is ArviZ data: ``InferenceData`` (0.x) or ``xarray.DataTree`` (>= 1)."""
    return type(obj).__name__ in ("InferenceData", "DataTree")


def group_arrays(data: Any, group: str) -> dict[str, np.ndarray]:
    """Variables of one group of InferenceData or DataTree as ``(chain, draw, *shape)``."""
    try:
        node = data[group]
    except KeyError:
        raise ValueError(f"the ArviZ data has no {group!r} group") from None
    return {str(name): np.asarray(node[name].values) for name in node.data_vars}


def psislw(log_ratios: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, self-normalised log weights and k-hat of raw log ratios ``(S,)``.

    ArviZ 0.x smooths ``log_ratios`` (``az.psislw``); ArviZ >= 1 (``arviz_stats``) expects
    log-likelihoods and negates them itself, so it is given ``-log_ratios``. Ratios equal up
    to rounding have no tail to fit (0.x returns k-hat = inf or a fit to rounding noise, 1.x
    NaN); :func:`smooth_log_weights` handles them before calling this.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    az = arviz()
    if hasattr(az, "psislw"):  # ArviZ < 1
        lw, khat = az.psislw(log_ratios.copy(), reff=1.0)
    else:  # ArviZ >= 1
        from arviz_stats.base import array_stats

        lw, khat = array_stats.psislw(-log_ratios, r_eff=1.0)
    return np.asarray(lw, dtype=np.float64), float(khat)


KHAT_EXACT = -1.0  # Pareto shape of a bounded (uniform) tail, reported for equal ratios


def smooth_log_weights(log_ratios: np.ndarray, tolerance: float) -> tuple[np.ndarray, float, bool]:
    """PSIS of finite raw log ratios ``(S,)``: ``(normalised log weights, k-hat, exact)``.

    The one convention for :func:`pyroflows.psis` and :class:`pyroflows.VI`: ratios whose
    spread is at most ``tolerance`` (the guide is the posterior, up to rounding) are not
    fitted; the weights are uniform, k-hat is :data:`KHAT_EXACT` (-1) and ``exact`` is True
    on every ArviZ version.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    n = log_ratios.size
    if np.ptp(log_ratios) <= tolerance:
        return np.full(n, -np.log(n)), KHAT_EXACT, True
    # ArviZ's generalized-Pareto fit overflows harmlessly in exp() on extreme ratios (a guide
    # far from the posterior): its k-hat is then large, as it should be
    with np.errstate(over="ignore"):
        lw, khat = psislw(log_ratios)
    return lw - np.logaddexp.reduce(lw), khat, False
