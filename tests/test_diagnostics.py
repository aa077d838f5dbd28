"""Tests of pyroflows.diagnostics: ArviZ export, PSIS k-hat and comparisons."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import MCMC, NUTS  # noqa: E402
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal  # noqa: E402

import pyroflows  # noqa: E402
from pyroflows._arviz import arviz, major_version  # noqa: E402
from pyroflows._arviz import group_arrays as _group_arrays  # noqa: E402
from pyroflows.diagnostics import (  # noqa: E402
    PSISResult,
    compare,
    psis,
    to_inference_data,
)

az = arviz()
F64 = torch.float64


def constrained_model(y: torch.Tensor) -> None:
    """Sites on the real line, the positive half-line, (0, 1) and the simplex, in a plate."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0, dtype=F64)))
    p = pyro.sample("p", dist.Beta(torch.tensor(2.0, dtype=F64), 2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=F64)))
    with pyro.plate("group", 4):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.deterministic("shifted", theta + p)
        pyro.sample("y", dist.Normal(theta + w[..., 0], 1.0), obs=y)


def flat_model(y: torch.Tensor) -> None:
    """Written for one draw only: ``beta.sum()`` broadcasts wrongly under a batch plate."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(beta.sum(), 1.0).expand([len(y)]).to_event(1), obs=y)


def scalar_model() -> None:
    pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))


def log_joint(model, values: dict, *args) -> float:
    conditioned = poutine.condition(model, data={k: torch.as_tensor(v) for k, v in values.items()})
    return float(poutine.trace(conditioned).get_trace(*args).log_prob_sum())


Y = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=F64)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_inference_data_round_trips_names_shapes_supports(guide_cls):
    guide = guide_cls(constrained_model, init_scale=0.5)
    data = to_inference_data(guide, constrained_model, Y, num_samples=200)
    post = _group_arrays(data, "posterior")
    assert set(post) == {"mu", "tau", "p", "w", "theta", "shifted"}
    shapes = {k: v.shape for k, v in post.items()}
    assert shapes["mu"] == (1, 200) and shapes["w"] == (1, 200, 3)
    assert shapes["theta"] == shapes["shifted"] == (1, 200, 4)
    assert data.posterior["theta"].dims == ("chain", "draw", "group")
    assert data.posterior["w"].dims == ("chain", "draw", "w_dim_0")
    assert data.posterior.attrs["draw_method"] == "plate"
    assert (post["tau"] > 0).all() and ((post["p"] > 0) & (post["p"] < 1)).all()
    np.testing.assert_allclose(post["w"].sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(post["shifted"], post["theta"] + post["p"][..., None])
    stats = _group_arrays(data, "sample_stats")
    assert set(stats) == {"lp", "log_q", "log_weight"}
    np.testing.assert_allclose(stats["log_weight"], stats["lp"] - stats["log_q"])
    for s in (0, 123):  # lp is the model's log joint at the exported draw
        draw = {k: post[k][0, s] for k in ("mu", "tau", "p", "w", "theta")}
        assert math.isclose(stats["lp"][0, s], log_joint(constrained_model, draw, Y), rel_tol=1e-9)


def test_inference_data_works_with_arviz_summary_and_plots():
    data = to_inference_data(AutoNormal(constrained_model), constrained_model, Y, num_samples=50)
    summary = az.summary(data, var_names=["mu", "theta"], kind="stats")
    assert list(summary.index) == ["mu", *(f"theta[{i}]" for i in range(4))]
    if major_version() >= 1:  # ArviZ 1.x replaced plot_posterior by plot_dist
        axes = list(az.plot_dist(data, var_names=["mu", "tau"]).viz["plot"].data_vars)
    else:
        axes = az.plot_posterior(data, var_names=["mu", "tau"])
    assert np.size(axes) == 2
    plt.close("all")


@pytest.mark.parametrize("vectorize", [None, False])
def test_models_written_for_one_draw_fall_back_and_stay_exact(vectorize):
    y = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    guide = AutoNormal(flat_model)
    data = to_inference_data(guide, flat_model, y, num_samples=60, vectorize=vectorize)
    want = "guide: plate, model: vmap" if vectorize is None else "loop"
    assert data.posterior.attrs["draw_method"] == want
    beta = _group_arrays(data, "posterior")["beta"][0]
    lp = _group_arrays(data, "sample_stats")["lp"][0]
    for s in (0, 17, 59):
        assert math.isclose(lp[s], log_joint(flat_model, {"beta": beta[s]}, y), rel_tol=1e-9)
    with pytest.raises(ValueError, match="batched log p"):
        to_inference_data(guide, flat_model, y, num_samples=5, vectorize=True)


def exact_guide(loc: float, scale: float, shift: float = 0.0, shrink: float = 1.0):
    def guide(*args: torch.Tensor) -> None:
        pyro.sample(
            "mu", dist.Normal(torch.tensor(loc + shift * scale, dtype=F64), scale * shrink)
        )

    return guide


def conjugate_model(y: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


YC = torch.tensor([0.5, 1.5, -0.3, 2.2], dtype=F64)
POST_LOC, POST_SCALE = float(YC.sum()) / 5, 1 / math.sqrt(5)  # exact N(loc, scale^2)


def test_psis_khat_small_for_exact_guide():
    result = psis(exact_guide(POST_LOC, POST_SCALE), conjugate_model, YC, num_samples=2000)
    # the ratios differ only by rounding: ArviZ 1.x's tail fit returned NaN for them
    assert math.isfinite(result.khat) and result.khat < 0.3 and result.band == "good"
    assert result.exact
    assert result.ess > 0.99 * 2000
    assert abs(result.means["mu"] - POST_LOC) < 4 * POST_SCALE / math.sqrt(2000)
    assert "k-hat" in str(result) and "good" in str(result)


def test_psis_khat_large_for_misfit_guide_and_corrects_means():
    guide = exact_guide(POST_LOC, POST_SCALE, shift=3.0, shrink=0.3)
    result = psis(guide, conjugate_model, YC, num_samples=2000)
    assert result.khat > 0.7 and result.band == "unreliable" and not result.exact
    assert result.ess < 0.2 * 2000
    assert "unreliable" in str(result)
    # PSIS moves the mean from the guide's (3 sd off) towards the posterior's
    assert abs(result.means["mu"] - POST_LOC) < abs(result.guide_means["mu"] - POST_LOC)


def test_psis_on_exported_data_matches_exact_ratios():
    data = to_inference_data(exact_guide(0.0, 1.0), scalar_model, num_samples=100)
    result = psis(data)
    assert result.khat == -1.0 and result.exact and result.ess == pytest.approx(100)
    np.testing.assert_allclose(result.means["mu"], result.guide_means["mu"])
    assert "exact posterior" in str(result)


def test_psis_exact_guide_in_float32_is_exact_not_a_fit_to_rounding_noise():
    def model32(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide32(y):
        pyro.sample("mu", dist.Normal(torch.tensor(POST_LOC), POST_SCALE))

    result = psis(guide32, model32, YC.float(), num_samples=1000)
    assert result.exact and result.khat == -1.0 and result.band == "good"


def test_psis_rejects_point_mass_guides():
    guide = AutoDelta(conjugate_model)
    with pytest.raises(ValueError, match=r"point-mass guide.*'?mu"):
        psis(guide, conjugate_model, YC, num_samples=100)
    data = to_inference_data(guide, conjugate_model, YC, num_samples=100)
    assert data.posterior.attrs["point_mass_sites"] == "mu"
    with pytest.raises(ValueError, match="point-mass guide"):
        psis(data)
    normal = to_inference_data(AutoNormal(conjugate_model), conjugate_model, YC, num_samples=30)
    assert normal.posterior.attrs["point_mass_sites"] == ""


@pytest.mark.parametrize(
    ("khat", "band"), [(-0.2, "good"), (0.49, "good"), (0.5, "usable"), (0.7, "unreliable")]
)
def test_psis_bands(khat, band):
    result = PSISResult(khat, 10.0, 10, {}, {}, np.zeros(10))
    assert result.band == band


def draws(seed: int = 0, n: int = 500) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"mu": rng.normal(1.0, 2.0, n), "theta": rng.normal(0.0, 1.0, (n, 3))}


def test_compare_identical_draws_reports_zero_errors():
    ref = draws()
    result = compare(ref, ref)
    assert result.params == ("mu", "theta[0]", "theta[1]", "theta[2]")
    for column in ("mean_error", "sd_error", "wasserstein"):
        np.testing.assert_array_equal(result.metrics[column], 0.0)
    assert result.worst_mean_error == result.worst_sd_error == result.worst_wasserstein == 0.0


def test_compare_identical_inference_data_and_mcmc():
    data = to_inference_data(AutoNormal(constrained_model), constrained_model, Y, num_samples=80)
    flat = {k: v[0] for k, v in _group_arrays(data, "posterior").items()}
    assert compare(data, flat).worst_wasserstein == 0.0
    mcmc = MCMC(NUTS(scalar_model), num_samples=30, warmup_steps=10, disable_progbar=True)
    mcmc.run()
    assert compare(mcmc, {"mu": mcmc.get_samples()["mu"]}).worst_mean_error == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("role", ["approx", "reference"])
def test_compare_never_skips_non_finite_draws(role, bad):
    good, broken = draws(), draws()
    broken["theta"][7, 1] = bad
    a, r = (broken, good) if role == "approx" else (good, broken)
    with pytest.raises(ValueError, match=rf"{role} draws of 'theta' contain 1 non-finite"):
        compare(a, r)


def test_compare_nan_metric_is_the_worst_not_skipped():
    ref, approx = draws(), draws(1)
    ref["mu"] = approx["mu"] = np.ones_like(ref["mu"])  # 0 / 0: the errors are not defined
    result = compare(approx, ref)
    assert math.isnan(result.worst_mean_error) and math.isnan(result.worst_wasserstein)


@pytest.mark.parametrize("module", ["_compare", "_arviz", "_draws"])
def test_helper_modules_do_not_import_diagnostics(module):
    """No import cycle: the helpers of diagnostics never import it back (even lazily)."""
    tree = ast.parse((Path(pyroflows.__file__).parent / f"{module}.py").read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not any("diagnostics" in name for name in imported), imported


def test_compare_shift_and_scale_errors_are_in_reference_sd_units():
    ref = draws()
    sd = ref["mu"].std(ddof=1)
    shifted = compare({"mu": ref["mu"] + 0.5 * sd}, ref)
    assert shifted.metrics["mean_error"][0] == pytest.approx(0.5)
    assert shifted.metrics["sd_error"][0] == pytest.approx(0.0, abs=1e-12)
    assert shifted.metrics["wasserstein"][0] == pytest.approx(0.5)
    scaled = compare({"mu": 1.0 + 2.0 * (ref["mu"] - 1.0)}, ref, var_names=["mu"])
    assert scaled.metrics["sd_error"][0] == pytest.approx(1.0)


def test_compare_guide_against_reference_table_and_plot(tmp_path):
    guide = exact_guide(POST_LOC, POST_SCALE)
    rng = np.random.default_rng(1)
    ref = {"mu": rng.normal(POST_LOC, POST_SCALE, 4000)}
    result = compare(guide, ref, conjugate_model, YC, num_samples=4000, labels=("q", "exact"))
    assert result.worst_mean_error < 0.1 and result.worst_sd_error < 0.1
    assert "q vs exact" in str(result) and "mean_error" in str(result)
    assert list(result.to_dataframe().columns)[-1] == "wasserstein"
    fig = compare(draws(0), draws(1)).plot(max_params=3)
    assert len(fig.axes) == 9
    fig.savefig(tmp_path / "pairs.png")
    assert (tmp_path / "pairs.png").stat().st_size > 0


def missing_site_guide(y: torch.Tensor) -> None:
    pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))


BAD_CALLS = [
    (lambda: to_inference_data("guide", scalar_model), TypeError, "guide must be"),
    (lambda: to_inference_data(exact_guide(0, 1), 3), TypeError, "model must be"),
    (
        lambda: to_inference_data(exact_guide(0, 1), scalar_model, num_samples=0),
        ValueError,
        "num_samples must be a positive int",
    ),
    (
        lambda: to_inference_data(exact_guide(0, 1), scalar_model, vectorize="yes"),
        TypeError,
        "vectorize must be",
    ),
    (
        lambda: to_inference_data(missing_site_guide, constrained_model, Y),
        ValueError,
        "does not sample the model's latent sites",
    ),
    (lambda: psis(exact_guide(0, 1)), TypeError, "needs the model"),
    (
        lambda: psis(exact_guide(0, 1), scalar_model, num_samples=10),
        ValueError,
        "num_samples must be >= 25",
    ),
    (lambda: compare(draws(), {"sigma": np.ones(5)}), ValueError, "share no site"),
    (lambda: compare(draws(), draws(), var_names=["tau"]), ValueError, "var_names"),
    (lambda: compare(draws(), draws(), var_names="mu"), TypeError, "var_names must be"),
    (lambda: compare({"mu": np.ones((5, 2))}, {"mu": np.ones((5, 3))}), ValueError, "has shape"),
    (lambda: compare({"mu": np.float64(1.0)}, draws()), ValueError, "num_draws >= 2"),
    (lambda: compare(draws(), exact_guide(0, 1)), TypeError, "reference must be"),
    (lambda: compare(exact_guide(0, 1), draws()), TypeError, "needs the model"),
    (lambda: compare(draws(), draws(), labels="q"), TypeError, "labels must be"),
    (lambda: compare(draws(), draws()).plot(params=["nope"]), ValueError, "params must be"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_CALLS)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_psis_on_data_rejects_model_and_too_few_draws():
    data = to_inference_data(exact_guide(0.0, 1.0), scalar_model, num_samples=10)
    with pytest.raises(ValueError, match="at least 25 draws"):
        psis(data)
    with pytest.raises(ValueError, match="takes no model"):
        psis(data, scalar_model)
