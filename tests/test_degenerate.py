"""Degenerate data still give finite, positive-definite parameters."""

import jax
import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_blobs

import jaxgmm


def assert_valid(gmm, max_condition=None):
    for leaf in jax.tree.leaves(gmm):
        assert np.all(np.isfinite(leaf))
    weights = np.asarray(gmm.weights, np.float64)
    assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-5
    covariances = np.asarray(gmm.covariances, np.float64)
    if gmm.covariance_type in ("full", "tied"):
        eigenvalues = np.linalg.eigvalsh(covariances)
        assert np.all(eigenvalues > 0)
        np.testing.assert_allclose(
            covariances, np.swapaxes(covariances, -1, -2), atol=1e-6
        )
        if max_condition is not None:
            ratio = eigenvalues[..., -1] / eigenvalues[..., 0]
            assert np.all(ratio <= max_condition * 1.01)
    else:
        assert np.all(covariances > 0)
        if max_condition is not None and gmm.covariance_type == "diag":
            assert np.all(
                covariances.max(-1) / covariances.min(-1) <= max_condition * 1.01
            )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_identical_points(covariance_type):
    x = np.full((200, 2), 3.0, np.float32)
    result = jaxgmm.fit(jax.random.key(0), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)
    np.testing.assert_allclose(result.gmm.means, 3.0, atol=1e-5)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_points_on_a_line(covariance_type):
    t = np.linspace(-1, 1, 200, dtype=np.float32)
    x = np.stack([t, 2 * t + 1], axis=1)
    result = jaxgmm.fit(jax.random.key(1), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_more_components_than_distinct_points(covariance_type):
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]], np.float32), 100, axis=0)
    result = jaxgmm.fit(jax.random.key(2), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_far_offset_float32_keeps_the_variance(covariance_type):
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.normal(size=(200, 2))).astype(np.float32)
    result = jaxgmm.fit(jax.random.key(3), x, 1, covariance_type=covariance_type)
    assert_valid(result.gmm)
    variance = np.var(x.astype(np.float64) - 1e4, axis=0)
    covariances = np.asarray(result.gmm.covariances, np.float64)
    if covariance_type in ("full", "tied"):
        estimated = np.diagonal(covariances.reshape(-1, 2, 2)[0])
    elif covariance_type == "diag":
        estimated = covariances[0]
    else:
        estimated = np.full(2, covariances[0])
        variance = np.full(2, variance.mean())
    np.testing.assert_allclose(estimated, variance + 1e-6, rtol=0.02)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_offset_of_a_million_is_still_finite(covariance_type):
    x, _ = make_blobs(seed=4)
    x = (x.astype(np.float64) + 1e6).astype(np.float32)
    result = jaxgmm.fit(jax.random.key(4), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)
    assert int(result.status) == 0


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_an_empty_component_keeps_its_parameters_and_gets_no_weight(covariance_type):
    x, _ = make_blobs(seed=5)
    start = jaxgmm.fit(
        jax.random.key(5), x, 3, covariance_type=covariance_type, max_iter=1
    )
    # Move one component so far away that no point is responsible for it.
    far = start.gmm.means.at[2].set(1e4)
    gmm = jaxgmm.GMM.from_precisions_cholesky(
        start.gmm.weights, far, start.gmm.precisions_cholesky, covariance_type
    )
    new, _ = jaxgmm.em_step(gmm, x)
    assert_valid(new)
    assert float(new.weights[2]) < 1e-7  # 10 * eps / N, as sklearn
    np.testing.assert_allclose(new.means[2], far[2])
    if covariance_type != "tied":
        np.testing.assert_allclose(
            new.precisions_cholesky[2], gmm.precisions_cholesky[2], rtol=1e-6
        )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_max_condition_caps_every_covariance(covariance_type):
    t = np.linspace(-1, 1, 200, dtype=np.float32)
    rng = np.random.default_rng(6)
    x = np.stack([t, 1e-3 * rng.normal(size=200).astype(np.float32)], axis=1)
    result = jaxgmm.fit(
        jax.random.key(6), x, 3, covariance_type=covariance_type, max_condition=100.0
    )
    assert_valid(result.gmm, max_condition=100.0)


def test_zero_reg_covar_on_identical_points_stays_finite():
    x = np.zeros((200, 2), np.float32)
    result = jaxgmm.fit(jax.random.key(7), x, 3, reg_covar=0.0)
    for leaf in jax.tree.leaves(result.gmm):
        assert np.all(np.isfinite(leaf))
