"""Plots: what each function draws, for every covariance type and for D > 2."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from matplotlib.path import Path  # noqa: E402

import jaxgmm  # noqa: E402
from jaxgmm.plot import plot_criterion, plot_gmm, plot_history  # noqa: E402

WEIGHTS = jnp.array([0.2, 0.3, 0.5])
MEANS = jnp.array([[0.0, 0.0], [4.0, 1.0], [1.0, 5.0]])
COVARIANCES = {
    "full": jnp.array(
        [[[1.0, 0.5], [0.5, 2.0]], [[0.6, -0.2], [-0.2, 0.3]], [[2.0, 0.0], [0.0, 2.0]]]
    ),
    "diag": jnp.array([[1.0, 2.0], [0.5, 0.3], [2.0, 1.0]]),
    "spherical": jnp.array([1.0, 0.5, 2.0]),
    "tied": jnp.array([[1.0, 0.3], [0.3, 0.8]]),
}


def as_full(gmm):
    """(K, D, D) covariances, computed independently of jaxgmm.plot."""
    covariances = np.asarray(gmm.covariances, dtype=np.float64)
    k, d = gmm.n_components, gmm.n_features
    if gmm.covariance_type == "full":
        return covariances
    if gmm.covariance_type == "tied":
        return np.stack([covariances] * k)
    if gmm.covariance_type == "diag":
        return np.stack([np.diag(row) for row in covariances])
    return np.stack([value * np.eye(d) for value in covariances])


def ellipse_covariance(ellipse, n_std=2.0):
    """The 2x2 covariance whose ``n_std`` ellipse is ``ellipse``."""
    angle = np.radians(ellipse.angle)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    )
    scales = np.diag(
        [(ellipse.width / (2 * n_std)) ** 2, (ellipse.height / (2 * n_std)) ** 2]
    )
    return rotation @ scales @ rotation.T


@pytest.fixture
def ax():
    figure, ax = plt.subplots()
    yield ax
    plt.close(figure)


@pytest.fixture(scope="module", params=sorted(COVARIANCES))
def gmm(request):
    return jaxgmm.GMM(WEIGHTS, MEANS, COVARIANCES[request.param], request.param)


@pytest.fixture(scope="module")
def x():
    full = jaxgmm.GMM(WEIGHTS, MEANS, COVARIANCES["full"])
    return full.sample(jax.random.key(0), 150)[0]


@pytest.fixture(scope="module")
def gmm_3d():
    covariances = jnp.array(
        [
            [[1.0, 0.4, 0.3], [0.4, 2.0, -0.5], [0.3, -0.5, 1.5]],
            [[0.5, 0.0, -0.2], [0.0, 1.0, 0.1], [-0.2, 0.1, 0.8]],
        ]
    )
    means = jnp.array([[0.0, 1.0, 2.0], [3.0, -1.0, 5.0]])
    return jaxgmm.GMM(jnp.array([0.4, 0.6]), means, covariances)


@pytest.fixture(scope="module")
def result(x):
    result = jaxgmm.fit(jax.random.key(1), x, 3, max_iter=60)
    assert np.isnan(result.history).any(), "the fit should stop before max_iter"
    return result


def artists(ax):
    ellipses = [p for p in ax.patches if isinstance(p, Ellipse)]
    contours = [c for c in ax.collections if isinstance(c, ContourSet)]
    by_label = {c.get_label(): c for c in ax.collections}
    return ellipses, contours, by_label


# -- plot_gmm ---------------------------------------------------------------------


def test_plot_gmm_draws_one_ellipse_per_component_contours_and_the_points(gmm, x, ax):
    assert plot_gmm(gmm, x, ax=ax) is ax
    ellipses, contours, by_label = artists(ax)
    assert len(ellipses) == gmm.n_components
    assert len(contours) == 1
    np.testing.assert_allclose(by_label["data"].get_offsets(), x, rtol=1e-6)
    np.testing.assert_allclose(by_label["means"].get_offsets(), MEANS)


def test_plot_gmm_ellipses_are_two_sigma_ellipses_of_each_covariance(gmm, ax):
    plot_gmm(gmm, ax=ax)
    ellipses, _, _ = artists(ax)
    for ellipse, mean, covariance in zip(ellipses, MEANS, as_full(gmm), strict=True):
        np.testing.assert_allclose(ellipse.center, mean, atol=1e-6)
        np.testing.assert_allclose(ellipse_covariance(ellipse), covariance, atol=1e-5)


def test_plot_gmm_colours_points_by_their_responsibilities(gmm, x, ax):
    plot_gmm(gmm, x, ax=ax)
    ellipses, _, by_label = artists(ax)
    component_colours = np.array([e.get_edgecolor()[:3] for e in ellipses])
    expected = np.asarray(gmm.responsibilities(x)) @ component_colours
    colours = by_label["data"].get_facecolors()[:, :3]
    np.testing.assert_allclose(colours, expected, atol=1e-5)


def test_plot_gmm_without_data_draws_ellipses_and_contours_only(gmm, ax):
    plot_gmm(gmm, ax=ax)
    ellipses, contours, by_label = artists(ax)
    assert len(ellipses) == gmm.n_components
    assert len(contours) == 1
    assert "data" not in by_label


def test_plot_gmm_contours_follow_the_density(ax):
    gmm = jaxgmm.GMM(WEIGHTS, MEANS, COVARIANCES["full"])
    plot_gmm(gmm, ax=ax)
    _, (contour,), _ = artists(ax)
    peak = float(jnp.max(gmm.log_prob(MEANS)))
    # The top level sits just below the highest density, the others below it.
    assert contour.levels[-1] < peak
    assert contour.levels[-1] > peak - 1.0
    assert np.all(np.diff(contour.levels) > 0)


def test_plot_gmm_contours_ring_every_component(ax):
    # Two components of equal height: the top contour must ring both modes.
    means = jnp.array([[0.0, 0.0], [6.0, 3.0]])
    gmm = jaxgmm.GMM(jnp.array([0.5, 0.5]), means, jnp.stack([jnp.eye(2)] * 2))
    plot_gmm(gmm, ax=ax)
    _, (contour,), _ = artists(ax)
    top = [Path(segment) for segment in contour.allsegs[-1]]
    for mean in np.asarray(means):
        assert any(path.contains_point(mean) for path in top)


def test_plot_gmm_of_three_features_draws_the_marginal_of_the_chosen_two(gmm_3d, ax):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) + np.asarray(gmm_3d.means)[rng.integers(0, 2, 40)]
    plot_gmm(gmm_3d, x, ax=ax, features=(0, 2))
    ellipses, contours, by_label = artists(ax)
    assert len(ellipses) == 2 and len(contours) == 1
    np.testing.assert_allclose(by_label["data"].get_offsets(), x[:, [0, 2]])
    covariances = np.asarray(gmm_3d.covariances)[:, [0, 2]][:, :, [0, 2]]
    for ellipse, mean, covariance in zip(
        ellipses, np.asarray(gmm_3d.means)[:, [0, 2]], covariances, strict=True
    ):
        np.testing.assert_allclose(ellipse.center, mean, atol=1e-6)
        np.testing.assert_allclose(ellipse_covariance(ellipse), covariance, atol=1e-5)
    # Colours come from responsibilities given all three features.
    colours = np.array([e.get_edgecolor()[:3] for e in ellipses])
    expected = np.asarray(gmm_3d.responsibilities(x)) @ colours
    np.testing.assert_allclose(
        by_label["data"].get_facecolors()[:, :3], expected, atol=1e-5
    )
    assert ax.get_xlabel() == "feature 0" and ax.get_ylabel() == "feature 2"


def test_marginal_density_integrates_out_the_other_features(gmm_3d):
    from scipy.stats import multivariate_normal

    from jaxgmm.plot import _marginal_gmm

    picked = [0, 2]
    means = np.asarray(gmm_3d.means)[:, picked]
    covariances = np.asarray(gmm_3d.covariances)[:, picked][:, :, picked]
    points = np.random.default_rng(1).normal(2.0, 2.0, (25, 2))
    expected = np.log(
        sum(
            w * multivariate_normal(m, c).pdf(points)
            for w, m, c in zip(gmm_3d.weights, means, covariances, strict=True)
        )
    )
    marginal = _marginal_gmm(gmm_3d, picked)
    assert marginal.covariance_type == "full"
    actual = marginal.log_prob(points)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_plot_gmm_draws_on_the_current_axes_by_default(gmm):
    figure = plt.figure()
    try:
        assert plot_gmm(gmm) is plt.gca()
    finally:
        plt.close(figure)


@pytest.mark.parametrize("features", [(0, 0), (0, 2), (-1, 1), (0,), "ab"])
def test_plot_gmm_rejects_bad_features(features, ax):
    gmm = jaxgmm.GMM(WEIGHTS, MEANS, COVARIANCES["full"])
    with pytest.raises(ValueError, match="features"):
        plot_gmm(gmm, ax=ax, features=features)


def test_plot_gmm_rejects_data_with_the_wrong_number_of_features(gmm_3d, ax):
    with pytest.raises(ValueError, match="shape"):
        plot_gmm(gmm_3d, np.zeros((5, 2)), ax=ax)


def test_plot_gmm_rejects_a_batch_of_mixtures(ax):
    gmm = jaxgmm.GMM(WEIGHTS, MEANS, COVARIANCES["spherical"], "spherical")
    batch = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), gmm)
    with pytest.raises(ValueError, match="batch"):
        plot_gmm(batch, ax=ax)


# -- plot_criterion ---------------------------------------------------------------


def test_plot_criterion_draws_the_scores_and_marks_the_lowest(ax):
    candidates, scores = [1, 2, 3, 4], np.array([10.0, 7.5, 8.0, 9.0])
    assert plot_criterion(candidates, scores, ax=ax) is ax
    curve, best = ax.lines
    np.testing.assert_array_equal(curve.get_xdata(), candidates)
    np.testing.assert_array_equal(curve.get_ydata(), scores)
    np.testing.assert_array_equal(best.get_xdata(), [2])
    np.testing.assert_array_equal(best.get_ydata(), [7.5])
    assert "K = 2" in best.get_label()


def test_plot_criterion_skips_nan_scores(ax):
    plot_criterion(range(1, 4), jnp.array([jnp.nan, 3.0, 5.0]), ax=ax)
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), [2])


def test_plot_criterion_rejects_mismatched_lengths(ax):
    with pytest.raises(ValueError, match="same"):
        plot_criterion([1, 2, 3], [1.0, 2.0], ax=ax)


# -- plot_history -----------------------------------------------------------------


def test_plot_history_draws_the_iterations_that_ran(result, ax):
    assert plot_history(result, ax=ax) is ax
    (trace,) = ax.lines
    history = np.asarray(result.history)
    finite = history[np.isfinite(history)]
    assert len(finite) == int(result.n_iter)
    np.testing.assert_array_equal(trace.get_ydata(), finite)
    np.testing.assert_array_equal(trace.get_xdata(), np.arange(1, len(finite) + 1))


def test_plot_history_rejects_a_batch_of_fits(result, ax):
    batch = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), result)
    with pytest.raises(ValueError, match="batch"):
        plot_history(batch, ax=ax)


# -- without matplotlib -----------------------------------------------------------


def test_a_missing_matplotlib_is_reported_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxgmm\[plot\]'"):
        plot_criterion([1, 2], [1.0, 2.0])
