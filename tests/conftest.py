"""Shared fixtures. JAX compilation dominates test time, so tests reuse a
few shapes (N=200, D=2, K=3 above all) and module-scoped fitted models."""

import jax
import numpy as np
import pytest

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


def make_blobs(seed=0, n=200, d=2, k=3, spread=0.5, separation=4.0, dtype=np.float32):
    """Well-separated Gaussian blobs with random full covariances."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=separation, size=(k, d))
    labels = rng.integers(0, k, size=n)
    factors = rng.normal(scale=spread, size=(k, d, d)) / np.sqrt(d) + spread * np.eye(d)
    noise = rng.normal(size=(n, d))
    x = centres[labels] + np.einsum("nde,ne->nd", factors[labels], noise)
    return x.astype(dtype), labels


def close_clusters_far_from_the_centre(d):
    """Two tight clusters 1 apart, 1e4 from the data centre (a third, heavier
    cluster sits on the other side): ``(x float64, true labels, means)``."""
    rng = np.random.default_rng(5)
    offsets = np.zeros((3, d))
    offsets[0, 0] = offsets[1, 0] = 1e4
    offsets[1, 1] = 1.0
    offsets[2, 0] = -1e4
    sizes = (100, 100, 200)
    x64 = np.concatenate(
        [o + 0.02 * rng.standard_normal((m, d)) for o, m in zip(offsets, sizes)]
    )
    truth = np.repeat(np.arange(3), sizes)
    means = np.stack([x64[truth == j].mean(0) for j in range(3)])
    return x64, truth, means


@pytest.fixture(scope="session")
def blobs():
    return make_blobs()


@pytest.fixture
def x64():
    """Run one test with float64 enabled (restored afterwards)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module")
def x64_module():
    """Run a whole module with float64 enabled (restored afterwards)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
