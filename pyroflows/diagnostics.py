r"""Posterior quality of a Pyro guide: ArviZ export, PSIS diagnostics and comparisons.

Three questions, each answered in a line or two:

* :func:`to_inference_data` -- what does the guide believe? Draws from any Pyro guide (every
  autoguide, :class:`~pyroflows.AutoFlowGuide`, a hand-written guide) as ArviZ data, so
  ``az.summary``, ``az.plot_posterior`` and friends work on it.
* :func:`psis` -- can the guide be trusted? Pareto-smoothed importance sampling (Yao et al.
  2018): the k-hat diagnostic, the importance-sampling ESS and PSIS-corrected means.
* :func:`compare` -- how far is the guide from NUTS or from reference draws? Per scalar
  parameter: error of the mean and of the sd in reference-sd units and a 1-D Wasserstein
  distance, plus a pair plot.

ArviZ is imported lazily (it takes seconds), and every difference between ArviZ 0.x
(``InferenceData``) and ArviZ >= 1 (``xarray.DataTree``) is confined to the private module
``pyroflows._arviz``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyroflows import _arviz
from pyroflows._compare import Comparison, comparison, site_draws
from pyroflows._draws import Sampler
from pyroflows._utils import check_positive_int

__all__ = ["Comparison", "PSISResult", "compare", "psis", "to_inference_data"]

KHAT_GOOD = 0.5
KHAT_USABLE = 0.7
_MIN_PSIS_DRAWS = 25  # PSIS fits a Pareto tail of min(0.2 S, 3 sqrt(S)) >= 5 draws


def to_inference_data(
    guide: Callable,
    model: Callable | None = None,
    *args: Any,
    num_samples: int = 1000,
    vectorize: bool | None = None,
    **kwargs: Any,
) -> Any:
    r"""Draw from a guide and return ArviZ data for its approximate posterior.

    Each draw :math:`z \sim q` is replayed through the model, so the posterior group holds
    every latent site of the model and every ``pyro.deterministic`` site, in constrained
    space, one variable per site with shape ``(1 chain, num_samples, *site_shape)``; batch
    dims inside a ``pyro.plate`` are named after the plate (with integer coords), other dims
    ``<site>_dim_<k>``. ``posterior.attrs["point_mass_sites"]`` names the latent sites whose
    draws are all equal (a point-mass guide such as ``AutoDelta``). ``sample_stats`` holds
    ``lp`` (:math:`\log p(x, z)`, ArviZ's name), ``log_q`` (:math:`\log q(z)`) and
    ``log_weight`` (:math:`\log p(x, z) - \log q(z)`, the importance log-ratio that
    :func:`psis` smooths).

    Args:
        guide: A Pyro guide: any autoguide or a guide function taking the model's arguments;
            or a fitted :class:`pyroflows.VI` (then omit the model and its arguments: those
            given to ``VI.run`` are used, and ``posterior.attrs`` gets the fit's
            diagnostics as ``vi_*`` entries).
        model: The Pyro model the guide approximates.
        *args: Positional arguments of the model and guide.
        num_samples: Number of draws.
        vectorize: ``None`` (default): draw all samples in one pass under a batch plate if
            the model and guide support it, else vectorise the model's log-density with
            ``torch.func.vmap``, else loop; every batched result is checked against
            one-draw scoring of the first and last draw. ``True``: batch plate or error.
            ``False``: one draw at a time. The method used is in ``posterior.attrs``.
        **kwargs: Keyword arguments of the model and guide.

    Returns:
        ``arviz.InferenceData`` on ArviZ 0.x; the equivalent ``xarray.DataTree`` on ArviZ 1.x.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> data = to_inference_data(AutoNormal(model), model, torch.zeros(3), num_samples=50)
        >>> data.posterior["mu"].shape
        (1, 50)
        >>> sorted(data.sample_stats.data_vars)
        ['log_q', 'log_weight', 'lp']
    """
    vi_attrs: dict[str, str | float | int] = {}
    if _is_vi(guide):
        if model is not None or args or kwargs:
            raise ValueError(
                "to_inference_data(vi) takes no model or model arguments: it uses those of "
                "vi.run(...)"
            )
        vi_attrs = guide.attrs()
        guide, model, args, kwargs = guide.guide, guide.model, guide.args, guide.kwargs
    if not callable(guide):
        raise TypeError(f"guide must be a callable Pyro guide; got {type(guide).__name__}")
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model; got {type(model).__name__}")
    check_positive_int("num_samples", num_samples)
    if vectorize is not None and not isinstance(vectorize, bool):
        raise TypeError(f"vectorize must be True, False or None; got {vectorize!r}")
    draws = Sampler(guide, model, args, kwargs).draw(num_samples, vectorize)
    layouts = draws.layouts
    posterior = {name: v[None] for name, v in draws.values.items()}
    stats = {
        "lp": draws.log_joint[None],
        "log_q": draws.log_q[None],
        "log_weight": (draws.log_joint - draws.log_q)[None],
    }
    dims = {name: lay.dims for name, lay in layouts.items()}
    coords = {k: v for lay in layouts.values() for k, v in lay.coords.items()}
    attrs = {
        "guide": type(guide).__name__,
        "inference_library": "pyro",
        "draws": "independent draws from the guide",
        "draw_method": draws.method,
        "point_mass_sites": ", ".join(draws.point_masses),
        **vi_attrs,
    }
    return _arviz.from_dict({"posterior": posterior, "sample_stats": stats}, dims, coords, attrs)


def _is_vi(obj: object) -> bool:
    from pyroflows.vi import VI

    return isinstance(obj, VI)


# ---------------------------------------------------------------- PSIS
@dataclass(frozen=True)
class PSISResult:
    r"""Pareto-smoothed importance sampling diagnostic of a guide (Yao et al. 2018).

    Attributes:
        khat: Estimated Pareto shape of the importance-ratio tail. When the ratios are equal
            up to floating-point rounding (see ``exact``) no tail can be fitted and ``khat``
            is -1, the shape of a bounded (uniform) tail.
        ess: Importance-sampling effective sample size of the smoothed weights,
            :math:`1 / \sum_i w_i^2`.
        num_samples: Number of guide draws used.
        means: PSIS-corrected posterior means :math:`\sum_i w_i z_i`, per site.
        guide_means: Plain guide means, per site, for contrast.
        log_weights: Smoothed, self-normalised log importance weights, shape ``(S,)``.
        exact: Whether every ratio was equal up to rounding (spread at most
            ``64 * eps * max(1, |log p|, |log q|)`` in the draws' float precision): the guide
            is the exact posterior up to a constant and the weights are uniform.
    """

    khat: float
    ess: float
    num_samples: int
    means: dict[str, np.ndarray]
    guide_means: dict[str, np.ndarray]
    log_weights: np.ndarray
    exact: bool = False

    @property
    def band(self) -> str:
        """``"good"`` (k < 0.5), ``"usable"`` (k < 0.7) or ``"unreliable"`` (k >= 0.7)."""
        if self.khat < KHAT_GOOD:
            return "good"
        return "usable" if self.khat < KHAT_USABLE else "unreliable"

    def __str__(self) -> str:
        advice = {
            "good": "ratios equal up to rounding: the guide is the exact posterior"
            if self.exact
            else "< 0.5: the guide is close to the posterior",
            "usable": "< 0.7: usable; PSIS-corrected estimates are reliable",
            "unreliable": ">= 0.7: the guide misses posterior mass; do not trust it",
        }[self.band]
        lines = [
            f"PSIS diagnostic ({self.num_samples} guide draws)",
            f"  k-hat = {self.khat:.2f}  [{self.band}] ({advice})",
            f"  importance-sampling ESS = {self.ess:.1f} "
            f"({100 * self.ess / self.num_samples:.1f}% of the draws)",
            "  posterior means: PSIS-corrected (guide)",
        ]
        width = max((len(n) for n in self.means), default=0)
        for name, mean in self.means.items():
            lines.append(f"    {name:<{width}}  {_fmt(mean)}  ({_fmt(self.guide_means[name])})")
        return "\n".join(lines)


def _fmt(x: np.ndarray, max_items: int = 6) -> str:
    flat = np.ravel(x)
    items = " ".join(f"{v:.3g}" for v in flat[:max_items])
    more = f" ... ({flat.size} values)" if flat.size > max_items else ""
    return items if np.ndim(x) == 0 else f"[{items}{more}]"


def psis(
    guide: Any,
    model: Callable | None = None,
    *args: Any,
    num_samples: int = 1000,
    **kwargs: Any,
) -> PSISResult:
    r"""Pareto-smoothed importance sampling diagnostic of a guide (Yao et al. 2018).

    Draws :math:`z_i \sim q`, forms the ratios :math:`\log p(x, z_i) - \log q(z_i)` and
    smooths their upper tail with ArviZ's PSIS. The fitted Pareto shape :math:`\hat k` says
    how far the guide is from the posterior: < 0.5 good, < 0.7 usable (PSIS-corrected
    estimates are reliable), >= 0.7 unreliable. Ratios that are equal up to floating-point
    rounding (an exact guide) are not fitted: the weights are uniform, ``khat`` is -1 and
    ``exact`` is True, on every ArviZ version.

    PSIS needs a guide with a density: a point-mass guide (``AutoDelta``, or any guide
    whose draws of a latent site are all equal) raises a ``ValueError``, since its
    importance ratios say nothing about the posterior; use :func:`compare` against reference
    draws instead.

    Args:
        guide: A Pyro guide, or ArviZ data returned by :func:`to_inference_data` (then
            ``model`` and the model arguments must be omitted).
        model: The Pyro model; required when ``guide`` is a guide.
        *args: Positional arguments of the model and guide.
        num_samples: Number of guide draws (at least 25; 1000 or more recommended).
        **kwargs: Keyword arguments of the model and guide.

    Returns:
        A :class:`PSISResult`; ``print`` it for a readable report.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> guide = AutoNormal(model, init_scale=1.0)  # the exact posterior
        >>> result = psis(guide, model, num_samples=500)
        >>> result.band, round(result.ess)
        ('good', 500)

    References:
        | Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018)
        | https://arxiv.org/abs/1802.02538
    """
    if _arviz.is_arviz_data(guide):
        if model is not None or args or kwargs:
            raise ValueError("psis(data) takes no model or model arguments; got some")
        data = guide
    else:
        if model is None:
            raise TypeError("psis(guide, model, ...) needs the model when given a guide")
        check_positive_int("num_samples", num_samples)
        if num_samples < _MIN_PSIS_DRAWS:
            raise ValueError(f"num_samples must be >= {_MIN_PSIS_DRAWS}; got {num_samples}")
        data = to_inference_data(guide, model, *args, num_samples=num_samples, **kwargs)
    return _psis_from_data(data)


_KHAT_EXACT = _arviz.KHAT_EXACT


def _check_not_point_mass(data: Any) -> None:
    sites = str(data["posterior"].attrs.get("point_mass_sites", ""))
    if sites:
        raise ValueError(
            f"PSIS does not apply to a point-mass guide: every draw of the latent site(s) "
            f"{sites} is the same value (e.g. AutoDelta), so log q is not a density and "
            "k-hat says nothing about the posterior; use compare() against reference draws, "
            "or a guide with a density (AutoNormal, AutoFlowGuide)"
        )


def _rounding_tolerance(data: Any, stats: dict[str, np.ndarray], log_w: np.ndarray) -> float:
    """Largest spread of log-ratios explained by floating-point rounding alone."""
    post = _arviz.group_arrays(data, "posterior").values()
    single = any(v.dtype.kind == "f" and v.dtype.itemsize < 8 for v in post)
    eps = float(np.finfo(np.float32 if single else np.float64).eps)
    scale = max(
        [1.0, *(float(np.max(np.abs(stats[k]))) for k in ("lp", "log_q") if k in stats)],
        default=1.0,
    )
    return 64 * eps * max(scale, float(np.max(np.abs(log_w))))


def _psis_from_data(data: Any) -> PSISResult:
    _check_not_point_mass(data)
    stats = _arviz.group_arrays(data, "sample_stats")
    if "log_weight" not in stats:
        raise ValueError("the ArviZ data has no sample_stats.log_weight; use to_inference_data")
    log_w = stats["log_weight"].reshape(-1).astype(np.float64)
    n = log_w.size
    if n < _MIN_PSIS_DRAWS:
        raise ValueError(f"PSIS needs at least {_MIN_PSIS_DRAWS} draws; got {n}")
    if not np.isfinite(log_w).all():
        raise ValueError(
            "some importance log-weights are not finite; the guide puts mass "
            "where the model has none (check supports)"
        )
    lw, khat, exact = _arviz.smooth_log_weights(log_w, _rounding_tolerance(data, stats, log_w))
    w = np.exp(lw)
    means, guide_means = {}, {}
    for name, v in _arviz.group_arrays(data, "posterior").items():
        flat = v.reshape(n, *v.shape[2:]).astype(np.float64)
        means[name] = np.tensordot(w, flat, axes=1)
        guide_means[name] = flat.mean(0)
    return PSISResult(khat, float(1.0 / np.sum(w**2)), n, means, guide_means, lw, exact)


# ---------------------------------------------------------------- comparison with references
def compare(
    approx: Any,
    reference: Any,
    model: Callable | None = None,
    *args: Any,
    num_samples: int = 4000,
    var_names: Sequence[str] | None = None,
    labels: tuple[str, str] = ("guide", "reference"),
    **kwargs: Any,
) -> Comparison:
    r"""Compare approximate posterior draws with NUTS or reference draws, per parameter.

    For every scalar component, with reference mean :math:`\bar r` and sd :math:`s`:
    ``mean_error`` :math:`= (\bar z - \bar r)/s`, ``sd_error`` :math:`= (s_z - s)/s` and
    ``wasserstein`` :math:`= W_1(z, r)/s`. Draws are pooled over chains. Draws that are
    NaN or infinite raise a ``ValueError`` naming the site (they are never skipped), and a
    metric that is NaN (a constant reference) makes the ``worst_*`` summaries NaN.

    Args:
        approx: A Pyro guide (then pass ``model`` and its arguments), ArviZ data (e.g. from
            :func:`to_inference_data`), a ``pyro.infer.MCMC`` run or a dict of draws
            ``{site: array (num_draws, *shape)}``.
        reference: The same kinds except a guide: typically a NUTS run or reference draws.
        model: The model, needed only when ``approx`` is a guide.
        *args: Positional arguments of the model and guide.
        num_samples: Number of guide draws when ``approx`` is a guide.
        var_names: Sites to compare; default: every site present in both.
        labels: Display names of the approximation and the reference.
        **kwargs: Keyword arguments of the model and guide.

    Returns:
        A :class:`Comparison`: ``print`` it, use ``.table`` (a DataFrame when pandas is
        installed), ``.worst_sd_error`` etc., and ``.plot()`` for the pair plot.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> ref = {"mu": rng.normal(0.0, 1.0, 4000)}
        >>> result = compare({"mu": rng.normal(0.0, 2.0, 4000)}, ref)
        >>> round(result.worst_sd_error, 1)
        1.0
        >>> compare(ref, ref).worst_mean_error
        0.0
    """
    if not (isinstance(labels, tuple) and len(labels) == 2):
        raise TypeError(f"labels must be a tuple of two strings; got {labels!r}")

    def guide_data(guide: Callable) -> Any:
        if model is None:
            raise TypeError("compare(guide, reference, model, ...) needs the model for a guide")
        return to_inference_data(guide, model, *args, num_samples=num_samples, **kwargs)

    a = site_draws(approx, "approx", guide_data)
    r = site_draws(reference, "reference")
    return comparison(a, r, var_names, labels)
