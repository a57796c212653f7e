"""BIC, AIC, choosing K, and anomaly thresholds."""

import jax
import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_blobs
from sklearn.mixture import GaussianMixture

import jaxgmm

X, _ = make_blobs(seed=41, separation=6.0)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_bic_and_aic_match_sklearn(x64, covariance_type):
    x = X.astype(np.float64)
    reference = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(
        x
    )
    gmm = jaxgmm.GMM(
        reference.weights_, reference.means_, reference.covariances_, covariance_type
    )
    np.testing.assert_allclose(jaxgmm.bic(gmm, x), reference.bic(x), rtol=1e-10)
    np.testing.assert_allclose(jaxgmm.aic(gmm, x), reference.aic(x), rtol=1e-10)


def test_bic_closed_form_with_sample_weight():
    result = jaxgmm.fit(jax.random.key(0), X, 3)
    weight = np.linspace(0.5, 1.5, len(X)).astype(np.float32)
    log_prob = np.asarray(result.gmm.log_prob(X), np.float64)
    total = np.sum(weight * log_prob)
    expected = -2 * total + result.gmm.n_parameters * np.log(weight.sum())
    np.testing.assert_allclose(jaxgmm.bic(result.gmm, X, weight), expected, rtol=1e-5)
    np.testing.assert_allclose(
        jaxgmm.aic(result.gmm, X, weight),
        -2 * total + 2 * result.gmm.n_parameters,
        rtol=1e-5,
    )


def test_select_n_components_finds_three_blobs():
    selection = jaxgmm.select_n_components(jax.random.key(1), X, range(1, 6), n_init=2)
    assert selection.n_components == 3
    assert selection.candidates == [1, 2, 3, 4, 5]
    assert selection.scores.shape == (5,)
    assert int(np.argmin(selection.scores)) == 2
    assert selection.result.gmm.n_components == 3
    np.testing.assert_allclose(
        selection.scores[2], jaxgmm.bic(selection.result.gmm, X), rtol=1e-6
    )
    by_aic = jaxgmm.select_n_components(
        jax.random.key(1), X, [2, 3], criterion="aic", n_init=2
    )
    assert by_aic.n_components == 3


def test_select_rejects_unknown_criterion():
    with pytest.raises(ValueError, match="criterion"):
        jaxgmm.select_n_components(jax.random.key(0), X, [1], criterion="dic")


def test_anomaly_threshold_flags_the_requested_fraction():
    result = jaxgmm.fit(jax.random.key(2), X, 3)
    threshold = jaxgmm.anomaly_threshold(result.gmm, X, 0.05)
    flagged = np.asarray(result.gmm.log_prob(X) < threshold)
    assert abs(flagged.mean() - 0.05) <= 1 / len(X)
    # A threshold set on many draws from the model flags fresh draws at the
    # requested rate, within four binomial standard errors.
    reference, _ = result.gmm.sample(jax.random.key(3), 20_000)
    model_threshold = jaxgmm.anomaly_threshold(result.gmm, reference, 0.05)
    fresh, _ = result.gmm.sample(jax.random.key(4), 20_000)
    rate = float(np.mean(result.gmm.log_prob(fresh) < model_threshold))
    assert abs(rate - 0.05) < 4 * np.sqrt(0.05 * 0.95 / 20_000) * np.sqrt(2)
    # Points far from every component are anomalies.
    assert bool(np.all(result.gmm.log_prob(X[:5] + 100.0) < threshold))
    with pytest.raises(ValueError, match="contamination"):
        jaxgmm.anomaly_threshold(result.gmm, X, 1.5)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda g, x: jaxgmm.bic(g, x, -np.ones(len(x))), "sample_weight"),
        (lambda g, x: jaxgmm.aic(g, x, np.zeros(len(x))), "sample_weight"),
        (lambda g, x: jaxgmm.bic(g, np.vstack([x, [[np.nan, 0.0]]])), "x"),
        (
            lambda g, x: jaxgmm.anomaly_threshold(g, np.vstack([x, [[np.inf, 0.0]]])),
            "x",
        ),
    ],
)
def test_scores_reject_bad_input_instead_of_returning_nan(call, name):
    x, _ = make_blobs(seed=4, n=60)
    gmm = jaxgmm.fit(jax.random.key(0), x, 2).gmm
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(gmm, x)


def test_scores_under_jit_raise_at_run_time_on_bad_weights():
    x, _ = make_blobs(seed=4, n=60)
    gmm = jaxgmm.fit(jax.random.key(0), x, 2).gmm
    bic = jax.jit(lambda x, w: jaxgmm.bic(gmm, x, w))
    assert np.isfinite(bic(x, np.ones(len(x), np.float32)))
    with pytest.raises(Exception, match="sample_weight"):
        jax.block_until_ready(bic(x, -np.ones(len(x), np.float32)))


def test_bic_skips_a_non_finite_row_of_weight_zero():
    # A row of weight 0 is absent, as in a fit: it may hold NaN.
    result = jaxgmm.fit(jax.random.key(0), X, 3)
    padded = np.vstack([X, [[np.nan, 0.0]]]).astype(np.float32)
    weight = np.r_[np.ones(len(X)), 0.0].astype(np.float32)
    np.testing.assert_allclose(
        jaxgmm.bic(result.gmm, padded, weight), jaxgmm.bic(result.gmm, X), rtol=1e-6
    )
