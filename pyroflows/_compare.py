r"""Guide-versus-reference comparison (see :func:`pyroflows.diagnostics.compare`).

Imports nothing from :mod:`pyroflows.diagnostics`; a guide is turned into draws by the
``to_data`` callable that :func:`~pyroflows.diagnostics.compare` passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro.infer import MCMC

from pyroflows import _arviz

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("ref_mean", "ref_sd", "mean", "sd", "mean_error", "sd_error", "wasserstein")


@dataclass(frozen=True)
class Comparison:
    r"""Per-parameter comparison of approximate draws with reference draws.

    Every scalar component (``theta[3]``, ``tau``) gets the reference mean and sd, the
    approximation's mean and sd and three errors in units of the reference sd :math:`s`:
    ``mean_error`` :math:`(\bar z - \bar r)/s`, ``sd_error`` :math:`(s_z - s)/s` and
    ``wasserstein`` :math:`W_1(z, r)/s`, the 1-D Wasserstein distance of the marginals.

    Attributes:
        params: Component names, in reference order.
        metrics: Column name (``METRICS``) to an array over ``params``.
        approx: Component name to the approximation's draws ``(N,)``.
        reference: Component name to the reference draws ``(M,)``.
        labels: Display names of the approximation and the reference.
    """

    params: tuple[str, ...]
    metrics: dict[str, np.ndarray]
    approx: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    labels: tuple[str, str] = ("guide", "reference")

    def _worst(self, column: str) -> float:
        """Largest absolute value; NaN (e.g. a constant reference) is the worst, not skipped."""
        return float(np.max(np.abs(self.metrics[column])))

    @property
    def worst_mean_error(self) -> float:
        """Largest ``|mean_error|`` over the parameters, in reference-sd units."""
        return self._worst("mean_error")

    @property
    def worst_sd_error(self) -> float:
        """Largest ``|sd_error|`` (relative error of the sd) over the parameters."""
        return self._worst("sd_error")

    @property
    def worst_wasserstein(self) -> float:
        """Largest standardised 1-D Wasserstein distance over the parameters."""
        return self._worst("wasserstein")

    def to_dataframe(self) -> Any:
        """The table as a ``pandas.DataFrame`` indexed by parameter (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is a dev extra
            raise ImportError("to_dataframe needs pandas; pip install pandas") from err
        return pd.DataFrame(self.metrics, index=pd.Index(self.params, name="param"))

    @property
    def table(self) -> Any:
        """A ``pandas.DataFrame`` if pandas is installed, else the formatted text table."""
        try:
            return self.to_dataframe()
        except ImportError:
            return str(self)

    def __str__(self) -> str:
        width = max(len("param"), *(len(p) for p in self.params))
        header = f"{'param':<{width}}" + "".join(f"{c:>12}" for c in METRICS)
        lines = [f"{self.labels[0]} vs {self.labels[1]}", header]
        for i, p in enumerate(self.params):
            lines.append(
                f"{p:<{width}}" + "".join(f"{self.metrics[c][i]:>12.4g}" for c in METRICS)
            )
        lines.append(
            f"worst |mean error| {self.worst_mean_error:.3f} sd, worst |sd error| "
            f"{self.worst_sd_error:.3f}, worst W1 {self.worst_wasserstein:.3f} sd"
        )
        return "\n".join(lines)

    def plot(
        self, params: Sequence[str] | None = None, max_params: int = 6, num_points: int = 1000
    ) -> Figure:
        """Pair plot overlaying the approximation on the reference.

        Diagonal: marginal histograms; below it: scatter plots of up to ``num_points``
        draws of each. By default shows the ``max_params`` parameters with the largest
        ``|mean_error| + |sd_error|``. Returns a ``matplotlib.figure.Figure`` (no pyplot
        state is touched; save it with ``fig.savefig``).
        """
        from matplotlib.figure import Figure

        names = list(params) if params is not None else self._worst_params(max_params)
        unknown = [p for p in names if p not in self.reference]
        if unknown or not names:
            raise ValueError(
                f"params must be a non-empty subset of {list(self.params)}; got {names!r}"
            )
        k = len(names)
        fig = Figure(figsize=(2.2 * k + 1, 2.2 * k))
        axes = np.asarray(fig.subplots(k, k, squeeze=False))
        fig.subplots_adjust(left=0.12, bottom=0.1, right=0.8, top=0.95, wspace=0.3, hspace=0.3)
        rng = np.random.default_rng(0)
        sets = [(self.reference, "0.55", self.labels[1]), (self.approx, "C1", self.labels[0])]
        for i, j in np.ndindex(k, k):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            for draws, color, label in sets:
                x = draws[names[j]]
                if i == j:
                    ax.hist(x, bins=40, density=True, histtype="step", color=color, label=label)
                    continue
                idx = rng.choice(len(x), min(num_points, len(x)), replace=False)
                ax.scatter(x[idx], draws[names[i]][idx], s=3, alpha=0.3, color=color)
            ax.set_xlabel(names[j] if i == k - 1 else "")
            ax.set_ylabel(names[i] if j == 0 and i > 0 else "")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right")
        return fig

    def _worst_params(self, max_params: int) -> list[str]:
        score = np.abs(self.metrics["mean_error"]) + np.abs(self.metrics["sd_error"])
        top = set(np.argsort(-np.nan_to_num(score, nan=np.inf))[:max_params].tolist())
        return [p for i, p in enumerate(self.params) if i in top]


def _as_numpy(value: Any, name: str, role: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[0] < 2:
        raise ValueError(
            f"draws of {name!r} must have shape (num_draws >= 2, *shape); got {arr.shape}"
        )
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(
            f"{role} draws of {name!r} contain {bad} non-finite values (NaN or inf) out of "
            f"{arr.size}; remove the failed draws or fix the sampler before comparing"
        )
    return arr


def site_draws(
    obj: Any, role: str, to_data: Callable[[Any], Any] | None = None
) -> dict[str, np.ndarray]:
    """Draws ``(N, *shape)`` per site from a dict, an MCMC run, ArviZ data or a guide.

    A guide is accepted only when ``to_data`` is given: ``to_data(guide)`` returns its draws
    as ArviZ data. Non-finite draws raise a ``ValueError`` naming the site.
    """
    if _arviz.is_arviz_data(obj):  # before Mapping: InferenceData is a Mapping of groups
        arrays = _arviz.group_arrays(obj, "posterior")
        return {k: _as_numpy(v.reshape(-1, *v.shape[2:]), k, role) for k, v in arrays.items()}
    if isinstance(obj, Mapping):
        return {str(k): _as_numpy(v, str(k), role) for k, v in obj.items()}
    if isinstance(obj, MCMC):
        return {k: _as_numpy(v, k, role) for k, v in obj.get_samples().items()}
    if callable(obj) and to_data is not None:
        return site_draws(to_data(obj), role)
    kinds = "a dict of arrays, a pyro.infer.MCMC, ArviZ data" + (
        " or a Pyro guide" if to_data is not None else ""
    )
    raise TypeError(f"{role} must be {kinds}; got {type(obj).__name__}")


def _components(draws: dict[str, np.ndarray], sites: list[str]) -> dict[str, np.ndarray]:
    """Flatten each site ``(N, *shape)`` into scalar components ``site[i,j]`` of shape (N,)."""
    out = {}
    for site in sites:
        v = draws[site]
        for idx in np.ndindex(v.shape[1:]):
            name = f"{site}[{','.join(map(str, idx))}]" if idx else site
            out[name] = v[(slice(None), *idx)]
    return out


def _select_sites(
    approx: dict[str, np.ndarray], reference: dict[str, np.ndarray], var_names: Any
) -> list[str]:
    if var_names is None:
        sites = [s for s in reference if s in approx]
        if not sites:
            raise ValueError(
                f"approx and reference share no site: approx has {sorted(approx)}, "
                f"reference has {sorted(reference)}"
            )
    else:
        if isinstance(var_names, str) or not isinstance(var_names, Sequence) or not var_names:
            raise TypeError(f"var_names must be a non-empty list of site names; got {var_names!r}")
        sites = list(var_names)
        missing = [s for s in sites if s not in approx or s not in reference]
        if missing:
            raise ValueError(
                f"var_names {missing} are missing from approx {sorted(approx)} "
                f"or reference {sorted(reference)}"
            )
    for s in sites:
        if approx[s].shape[1:] != reference[s].shape[1:]:
            raise ValueError(
                f"site {s!r} has shape {approx[s].shape[1:]} in approx but "
                f"{reference[s].shape[1:]} in reference"
            )
    return sites


def _metrics(z: np.ndarray, r: np.ndarray) -> tuple[float, ...]:
    from scipy.stats import wasserstein_distance

    m, s = r.mean(), r.std(ddof=1)
    mz, sz = z.mean(), z.std(ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.divide([mz - m, sz - s, wasserstein_distance(z, r)], s)
    return (m, s, mz, sz, *scaled.tolist())


def comparison(
    approx: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    var_names: Sequence[str] | None,
    labels: tuple[str, str],
) -> Comparison:
    """The :class:`Comparison` of two dicts of draws ``{site: (N, *shape)}``."""
    sites = _select_sites(approx, reference, var_names)
    ca, cr = _components(approx, sites), _components(reference, sites)
    params = tuple(cr)
    rows = np.array([_metrics(ca[p], cr[p]) for p in params], dtype=np.float64)  # (P, 7)
    metrics = {c: rows[:, i] for i, c in enumerate(METRICS)}
    return Comparison(params, metrics, ca, cr, (str(labels[0]), str(labels[1])))


__all__ = ["METRICS", "Comparison", "comparison", "site_draws"]
