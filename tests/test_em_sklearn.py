"""EM follows scikit-learn's GaussianMixture step for step (float64)."""

import warnings

import jax
import numpy as np
import pytest
from conftest import COVARIANCE_TYPES
from sklearn.datasets import load_iris, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import jaxgmm

pytestmark = pytest.mark.usefixtures("x64_module")

DATASETS = {"iris": load_iris().data, "wine": load_wine().data}


def sklearn_from(gmm, **kwargs):
    """A GaussianMixture started from exactly the parameters of ``gmm``."""
    covariances = np.asarray(gmm.covariances)
    if gmm.covariance_type in ("full", "tied"):
        precisions = np.linalg.inv(covariances)
    else:
        precisions = 1.0 / covariances
    return GaussianMixture(
        gmm.n_components,
        covariance_type=gmm.covariance_type,
        weights_init=np.asarray(gmm.weights),
        means_init=np.asarray(gmm.means),
        precisions_init=precisions,
        **kwargs,
    )


def assert_same_parameters(reference, gmm, rtol=1e-6):
    def relative(a, b):
        return np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-300)

    assert relative(gmm.weights, reference.weights_) < rtol
    assert relative(gmm.means, reference.means_) < rtol
    assert relative(gmm.covariances, reference.covariances_) < rtol
    assert relative(gmm.precisions_cholesky, reference.precisions_cholesky_) < rtol


def fit_and_sklearn(x, k, covariance_type, start, max_iter):
    """``max_iter`` EM steps (``tol=0``) from ``start`` by jaxgmm and by sklearn."""
    result = jaxgmm.fit(
        jax.random.key(0),
        x,
        k,
        covariance_type=covariance_type,
        max_iter=max_iter,
        tol=0.0,
        init_gmm=start,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = sklearn_from(start, max_iter=max_iter, tol=0.0).fit(x)
    return result, reference


def assert_fit_matches_sklearn(x, k, covariance_type, key, max_iter):
    """``max_iter`` EM steps from a one-step fit's parameters, against sklearn."""
    start = jaxgmm.fit(key, x, k, covariance_type=covariance_type, max_iter=1).gmm
    result, reference = fit_and_sklearn(x, k, covariance_type, start, max_iter)
    assert_same_parameters(reference, result.gmm)
    np.testing.assert_allclose(result.log_likelihood, reference.lower_bound_, rtol=1e-9)


@pytest.fixture(scope="module", params=sorted(DATASETS))
def dataset(request, x64_module):
    return np.asarray(DATASETS[request.param], np.float64)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fit_from_the_same_start_matches_sklearn_step_for_step(
    dataset, covariance_type
):
    start = jaxgmm.fit(
        jax.random.key(0),
        dataset,
        3,
        covariance_type=covariance_type,
        max_iter=1,
        init="kmeans",
    ).gmm
    n_steps = 20
    result, reference = fit_and_sklearn(dataset, 3, covariance_type, start, n_steps)
    assert result.gmm.means.dtype == np.float64
    assert_same_parameters(reference, result.gmm)
    assert int(result.n_iter) == reference.n_iter_ == n_steps
    np.testing.assert_allclose(result.log_likelihood, reference.lower_bound_, rtol=1e-9)
    assert not result.converged and not reference.converged_


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_stopping_rule_matches_sklearn(dataset, covariance_type):
    start = jaxgmm.fit(
        jax.random.key(1), dataset, 2, covariance_type=covariance_type, max_iter=1
    ).gmm
    result = jaxgmm.fit(
        jax.random.key(0),
        dataset,
        2,
        covariance_type=covariance_type,
        max_iter=200,
        tol=1e-3,
        init_gmm=start,
    )
    reference = sklearn_from(start, max_iter=200, tol=1e-3).fit(dataset)
    assert bool(result.converged) and reference.converged_
    assert int(result.n_iter) == reference.n_iter_
    np.testing.assert_allclose(result.log_likelihood, reference.lower_bound_, rtol=1e-9)
    history = np.asarray(result.history)
    n_iter = int(result.n_iter)
    assert np.isnan(history[n_iter:]).all() and np.isfinite(history[:n_iter]).all()
    assert history[n_iter - 1] == result.log_likelihood
    assert abs(history[n_iter - 1] - history[n_iter - 2]) < 1e-3
    assert np.all(np.abs(np.diff(history[: n_iter - 1])) >= 1e-3)
    assert_same_parameters(reference, result.gmm, rtol=1e-6)


def test_em_step_is_one_sklearn_iteration(dataset):
    start = jaxgmm.fit(jax.random.key(2), dataset, 3, max_iter=1).gmm
    new, log_likelihood = jaxgmm.em_step(start, dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = sklearn_from(start, max_iter=1, tol=0.0).fit(dataset)
    assert_same_parameters(reference, new)
    np.testing.assert_allclose(log_likelihood, reference.lower_bound_, rtol=1e-10)
    # The log-likelihood is that of the input parameters.
    np.testing.assert_allclose(
        log_likelihood, np.mean(start.log_prob(dataset)), rtol=1e-10
    )


def test_em_steps_equals_repeated_em_step(dataset):
    start = jaxgmm.fit(
        jax.random.key(3), dataset, 3, max_iter=1, covariance_type="diag"
    ).gmm
    stepped = start
    for _ in range(4):
        stepped, _ = jaxgmm.em_step(stepped, dataset)
    scanned = jaxgmm.em_steps(start, dataset, 4)
    for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(scanned)):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_history_of_a_float64_fit_never_decreases(dataset):
    # EM never lowers the likelihood: exact for the maximum-likelihood M-step
    # (reg_covar=0), to rounding in float64.
    result = jaxgmm.fit(
        jax.random.key(4), dataset, 4, max_iter=60, tol=0.0, reg_covar=0.0
    )
    history = np.asarray(result.history)
    assert np.all(np.diff(history) >= -1e-12 * np.abs(history[1:]))
    # reg_covar moves each M-step off the maximum by O(reg_covar / variance):
    # near convergence the likelihood may then dip by about that much
    # (scikit-learn's lower_bounds_ dip identically, e.g. -1.7e-9 relative
    # on iris with K=4), never more.
    result = jaxgmm.fit(jax.random.key(4), dataset, 4, max_iter=60, tol=0.0)
    history = np.asarray(result.history)
    assert np.all(np.diff(history) >= -1e-7 * np.abs(history[1:]))


def test_sample_weight_equals_repeating_rows(dataset):
    # sklearn has no sample_weight: integer weights must equal repeated rows.
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, size=len(dataset)).astype(np.float64)
    counts[:5] = 1.0
    start = jaxgmm.fit(jax.random.key(5), dataset, 3, max_iter=1, init="kmeans").gmm
    weighted = jaxgmm.fit(
        jax.random.key(0),
        dataset,
        3,
        max_iter=10,
        tol=0.0,
        init_gmm=start,
        sample_weight=counts,
    )
    repeated = np.repeat(dataset, counts.astype(int), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = sklearn_from(start, max_iter=10, tol=0.0).fit(repeated)
    assert_same_parameters(reference, weighted.gmm)
    np.testing.assert_allclose(
        weighted.log_likelihood, reference.lower_bound_, rtol=1e-9
    )


def clustered_rows(seed, n_clusters, n_features, n_rows, spread):
    """Rows from ``n_clusters`` axis-aligned Gaussians with random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(n_clusters, n_features))
    scales = rng.uniform(0.5, 2.0, size=(n_clusters, n_features))
    labels = rng.integers(0, n_clusters, n_rows)
    return centres[labels] + scales[labels] * rng.normal(size=(n_rows, n_features))


@pytest.fixture(scope="module")
def many_rows(x64_module):
    # 10,001 rows of 6 features: two 4,096-row chunks and a remainder, with
    # the matrix-product form of the E- and M-steps (D > 4).
    return clustered_rows(11, 3, 6, 10_001, spread=3.0)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fit_over_many_chunks_matches_sklearn(many_rows, covariance_type):
    from jaxgmm._data import rows_per_chunk

    assert rows_per_chunk(len(many_rows), 3, 6) < len(many_rows)
    assert_fit_matches_sklearn(many_rows, 3, covariance_type, jax.random.key(1), 8)


@pytest.fixture(scope="module")
def wide_rows(x64_module):
    # 3,000 rows of 64 features from 16 clusters: the diagonal M-step's
    # products are large enough to be split into component groups.
    return clustered_rows(12, 16, 64, 3_000, spread=2.0)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_fit_with_grouped_products_matches_sklearn(wide_rows, covariance_type):
    from jaxgmm import _linalg

    k, d = 16, wide_rows.shape[1]
    assert k >= _linalg.PRODUCT_GROUPS * _linalg.MIN_GROUP_ROWS
    assert k * d >= _linalg.GROUPED_MIN_OUTPUT
    assert_fit_matches_sklearn(wide_rows, k, covariance_type, jax.random.key(2), 5)


@pytest.fixture(scope="module")
def blocked_rows(x64_module):
    # 270,007 rows of 6 features: 33 chunks of 8,000 rows, each summed as ten
    # 800-row blocks in the diagonal E-step, and an unsplit 6,007-row remainder.
    return clustered_rows(13, 3, 6, 270_007, spread=3.0)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_fit_over_row_blocks_matches_sklearn(blocked_rows, covariance_type):
    from jaxgmm._data import blocked_chunking
    from jaxgmm._stats import e_step_row_width

    width = e_step_row_width(covariance_type, blocked_rows)
    assert width == 12
    assert blocked_chunking(len(blocked_rows), width) == (8000, 10)
    assert_fit_matches_sklearn(blocked_rows, 3, covariance_type, jax.random.key(3), 6)
