"""jit, vmap, grad and dtypes: the same answers under every transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_blobs

import jaxgmm
from jaxgmm import _fit

X, _ = make_blobs(seed=31)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(left, right, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def eager():
    return jaxgmm.fit(jax.random.key(0), X, 3, max_iter=30)


def test_jit_of_fit_equals_eager_fit(eager):
    jitted = jax.jit(lambda key, x: jaxgmm.fit(key, x, 3, max_iter=30))(
        jax.random.key(0), X
    )
    assert_trees_close(eager, jitted)


def test_data_closed_over_by_jit_equals_eager(eager):
    # Closed-over data are constants inside the trace: the eager input check
    # still runs (and raises ValueError), and the answers are the eager ones.
    fit = jax.jit(lambda key: jaxgmm.fit(key, X, 3, max_iter=30))
    assert_trees_close(eager, fit(jax.random.key(0)))
    # The batch's first key is the eager fit's key.
    batch = jax.jit(jax.vmap(lambda key: jaxgmm.fit(key, X, 3, max_iter=30)))(
        jax.vmap(jax.random.key)(jnp.array([0, 1]))
    )
    assert_trees_close(eager.gmm, jax.tree.map(lambda a: a[0], batch.gmm))
    step = jax.jit(lambda g: jaxgmm.em_step(g, X))(eager.gmm)
    assert_trees_close(step, jaxgmm.em_step(eager.gmm, X))
    centres = jax.jit(lambda key: jaxgmm.kmeans(key, X, 3)[0])(jax.random.key(2))
    np.testing.assert_allclose(
        centres, jaxgmm.kmeans(jax.random.key(2), X, 3)[0], rtol=1e-5, atol=1e-5
    )
    bad = X.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="`x`"):
        jax.jit(lambda key: jaxgmm.fit(key, bad, 3, max_iter=30))(jax.random.key(0))


def test_vmap_over_keys_data_and_weights_equals_separate_fits():
    xs = np.stack([X, X[::-1] * 2.0, X + 3.0])
    weights = np.ones((3, len(X)), np.float32)
    weights[1, :50] = 2.0
    keys = jax.random.split(jax.random.key(1), 3)
    batch = jax.vmap(lambda k, x, w: jaxgmm.fit(k, x, 3, max_iter=30, sample_weight=w))(
        keys, xs, weights
    )
    assert batch.gmm.means.shape == (3, 3, 2) and batch.history.shape == (3, 30)
    for i in range(3):
        alone = jaxgmm.fit(keys[i], xs[i], 3, max_iter=30, sample_weight=weights[i])
        row = jax.tree.map(lambda leaf, i=i: leaf[i], batch)
        assert_trees_close(row, alone, 1e-4, 1e-4)


def test_vmap_over_init_gmm(eager):
    starts = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), eager.gmm)
    xs = np.stack([X, X * 0.5])
    batch = jax.vmap(
        lambda g, x: jaxgmm.fit(jax.random.key(0), x, 3, init_gmm=g, max_iter=5)
    )(starts, xs)
    alone = jaxgmm.fit(jax.random.key(0), xs[1], 3, init_gmm=eager.gmm, max_iter=5)
    assert_trees_close(batch.gmm.means[1], alone.gmm.means, 1e-4, 1e-4)


def test_vmapped_density_methods_on_a_batched_gmm(eager):
    batched = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), eager.gmm)
    log_prob = jax.vmap(lambda g: g.log_prob(X))(batched)
    np.testing.assert_allclose(log_prob[1], eager.gmm.log_prob(X), rtol=1e-6)


def test_fit_compiles_once_for_new_data_of_the_same_shape():
    jaxgmm.fit(jax.random.key(2), X, 2, max_iter=7)
    before = _fit._fit._cache_size()
    for seed in range(3):
        jaxgmm.fit(jax.random.key(seed), X + seed, 2, max_iter=7, tol=1e-4 * seed)
    assert _fit._fit._cache_size() == before


def test_float32_in_float32_out(eager):
    assert eager.gmm.means.dtype == jnp.float32
    assert eager.gmm.precisions_cholesky.dtype == jnp.float32
    assert eager.history.dtype == jnp.float32
    assert eager.gmm.sample(jax.random.key(0), 3)[0].dtype == jnp.float32


def test_float64_in_float64_out(x64):
    result = jaxgmm.fit(jax.random.key(0), X.astype(np.float64), 3, max_iter=3)
    assert result.gmm.means.dtype == jnp.float64
    assert result.log_likelihood.dtype == jnp.float64


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_input_is_fitted_in_float32(dtype):
    # Half precision has too few bits for EM's sums (and its 10 * eps is
    # 0.01): the rows are converted, and the fit is that of the float32 rows.
    half = jnp.asarray(X, dtype)
    result = jaxgmm.fit(jax.random.key(0), half, 3, max_iter=5, tol=0.0)
    same = jaxgmm.fit(
        jax.random.key(0), half.astype(jnp.float32), 3, max_iter=5, tol=0.0
    )
    assert result.gmm.means.dtype == jnp.float32
    assert_trees_close(result, same, rtol=1e-6, atol=1e-6)
    gmm = jaxgmm.GMM(
        jnp.asarray([0.25, 0.75], dtype),
        jnp.zeros((2, 2), dtype),
        jnp.ones((2, 2), dtype),
        "diag",
    )
    assert gmm.precisions_cholesky.dtype == jnp.float32


def test_gradient_with_respect_to_a_zero_weight_is_the_one_sided_derivative(x64):
    # A weight of 0 means the row is absent, but the loss is still a smooth
    # function of that weight from the right: its gradient is not cut to 0.
    x = jnp.asarray(np.r_[X[:60], [[0.5, 0.5]]], jnp.float64)
    weight = jnp.asarray(np.r_[np.ones(60), 0.0])
    start = jaxgmm.fit(jax.random.key(0), X[:60].astype(np.float64), 3, max_iter=2).gmm

    def loss(weight):
        return jnp.sum(jaxgmm.em_steps(start, x, 2, weight).means)

    grad = jax.grad(loss)(weight)[-1]
    h = 1e-7
    one_sided = (loss(weight.at[-1].set(h)) - loss(weight)) / h
    assert abs(float(one_sided)) > 1e-3  # the row matters once it is there
    np.testing.assert_allclose(grad, one_sided, rtol=1e-5)


def test_em_steps_is_differentiable_and_matches_finite_differences(x64, eager):
    x = jnp.asarray(X[:60], jnp.float64)
    start = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), eager.gmm)

    def loss(x, weight, means):
        gmm = jaxgmm.GMM.from_precisions_cholesky(
            start.weights, means, start.precisions_cholesky, "full"
        )
        fitted = jaxgmm.em_steps(gmm, x, 3, weight)
        return jnp.sum(fitted.means**2) + jnp.sum(fitted.covariances)

    weight = jnp.ones(60, jnp.float64)
    grads = jax.grad(loss, argnums=(0, 1, 2))(x, weight, start.means)
    for g in grads:
        assert np.all(np.isfinite(g))
    # Directional derivatives against central differences.
    rng = np.random.default_rng(0)
    for argnum, (value, g) in enumerate(zip((x, weight, start.means), grads)):
        direction = jnp.asarray(rng.normal(size=value.shape))
        h = 1e-6
        args = [x, weight, start.means]
        args[argnum] = value + h * direction
        up = loss(*args)
        args[argnum] = value - h * direction
        down = loss(*args)
        np.testing.assert_allclose(
            (up - down) / (2 * h), jnp.sum(g * direction), rtol=1e-4, atol=1e-6
        )


def test_em_steps_gradient_with_respect_to_unweighted_rows(x64, eager):
    # Without sample weights (their derivative is then a symbolic zero).
    x = jnp.asarray(X[:60], jnp.float64)
    start = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), eager.gmm)

    def loss(x):
        fitted = jaxgmm.em_steps(start, x, 3)
        return jnp.sum(fitted.means**2) + jnp.sum(fitted.covariances)

    grad = jax.jit(jax.grad(loss))(x)
    direction = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    h = 1e-6
    central = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(grad * direction), central, rtol=1e-5)


@pytest.mark.parametrize("n_features", [2, 6])
def test_jitted_log_prob_on_many_rows_matches_a_numpy_reference(n_features):
    # Guards against CPU miscompiles of broadcast-multiply-reduce (jaxlib
    # 0.10.2, jax-ml/jax#39103), for the unrolled and the einsum path.
    rng = np.random.default_rng(3)
    k = 3
    a = rng.normal(size=(k, n_features, n_features))
    covariances = a @ np.swapaxes(a, -1, -2) + np.eye(n_features)
    means = rng.normal(scale=3, size=(k, n_features))
    gmm = jaxgmm.GMM(np.full(k, 1 / k), means, covariances)
    x = rng.normal(scale=3, size=(40_000, n_features)).astype(np.float32)
    precisions = np.linalg.inv(covariances)
    diff = x[:, None, :].astype(np.float64) - means[None]
    squared = np.einsum("nkd,kde,nke->nk", diff, precisions, diff)
    _, log_det = np.linalg.slogdet(covariances)
    joint = -0.5 * (squared + log_det + n_features * np.log(2 * np.pi)) + np.log(1 / k)
    expected = np.logaddexp.reduce(joint, axis=1)
    jitted = jax.jit(lambda g, x: g.log_prob(x))(gmm, x)
    np.testing.assert_allclose(jitted, expected, rtol=1e-4, atol=1e-3)


def test_vmapped_fits_run_in_blocks_and_equal_separate_fits(monkeypatch):
    # Blocks of two data sets, so five make two full blocks and a remainder.
    monkeypatch.setattr(_fit, "BLOCK_ELEMENTS", 2 * len(X) * 2 * 3)
    _fit._batchable_fit.cache_clear()
    try:
        xs = np.stack([X + i for i in range(5)])
        keys = jax.random.split(jax.random.key(7), 5)
        batch = jax.vmap(lambda k, x: jaxgmm.fit(k, x, 3, max_iter=20))(keys, xs)
        shared = jax.vmap(lambda k: jaxgmm.fit(k, X, 3, max_iter=20))(keys)
        for i in range(5):
            alone = jaxgmm.fit(keys[i], xs[i], 3, max_iter=20)
            row = jax.tree.map(lambda leaf, i=i: leaf[i], batch)
            assert_trees_close(row, alone, 1e-4, 1e-4)
            # Every leaf comes back with its dtype, counts and flags exactly.
            for got, want in zip(jax.tree.leaves(row), jax.tree.leaves(alone)):
                assert got.dtype == want.dtype and got.shape == want.shape
            assert int(row.n_iter) == int(alone.n_iter)
            assert bool(row.converged) == bool(alone.converged)
            assert int(row.status) == int(alone.status)
            alone = jaxgmm.fit(keys[i], X, 3, max_iter=20)
            row = jax.tree.map(lambda leaf, i=i: leaf[i], shared)
            assert_trees_close(row, alone, 1e-4, 1e-4)
    finally:
        _fit._batchable_fit.cache_clear()
