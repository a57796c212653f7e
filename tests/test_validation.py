"""Bad input: ValueError eagerly, runtime errors under jit, status with throw=False."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_blobs

import jaxgmm
from jaxgmm import Status

X, _ = make_blobs(seed=21)


def with_nan(x):
    x = x.copy()
    x[7, 1] = np.nan
    return x


def with_inf(x):
    x = x.copy()
    x[3, 0] = np.inf
    return x


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: jaxgmm.fit(jax.random.key(0), with_nan(X), 3), "x"),
        (lambda: jaxgmm.fit(jax.random.key(0), with_inf(X), 3), "x"),
        (lambda: jaxgmm.fit(jax.random.key(0), X[:, 0], 3), "x"),
        (lambda: jaxgmm.fit(jax.random.key(0), X[None], 3), "x"),
        (lambda: jaxgmm.fit(jax.random.key(0), X[:2], 3), "n_components"),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 0), "n_components"),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 2.5), "n_components"),
        (
            lambda: jaxgmm.fit(jax.random.key(0), X, 3, sample_weight=-np.ones(len(X))),
            "sample_weight",
        ),
        (
            lambda: jaxgmm.fit(jax.random.key(0), X, 3, sample_weight=np.ones(5)),
            "sample_weight",
        ),
        (
            lambda: jaxgmm.fit(
                jax.random.key(0), X, 3, sample_weight=np.r_[np.ones(2), np.zeros(198)]
            ),
            "n_components",
        ),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 3, init="nope"), "init"),
        (
            lambda: jaxgmm.fit(jax.random.key(0), X, 3, covariance_type="x"),
            "covariance_type",
        ),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 3, max_iter=0), "max_iter"),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 3, n_init=0), "n_init"),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 3, reg_covar=-1.0), "reg_covar"),
        # Finite in float64 but not in the data's float32.
        (lambda: jaxgmm.fit(jax.random.key(0), X, 3, reg_covar=1e39), "reg_covar"),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 3, reg_covar=np.inf), "reg_covar"),
        (
            lambda: jaxgmm.em_step(
                jaxgmm.fit(jax.random.key(0), X, 3).gmm, X, reg_covar=1e39
            ),
            "reg_covar",
        ),
        (lambda: jaxgmm.fit(jax.random.key(0), X, 3, tol=-1.0), "tol"),
        (
            lambda: jaxgmm.fit(jax.random.key(0), X, 3, max_condition=0.5),
            "max_condition",
        ),
        (lambda: jaxgmm.kmeans(jax.random.key(0), with_nan(X), 3), "x"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


@pytest.fixture(scope="module")
def start():
    return jaxgmm.fit(jax.random.key(0), X, 3, max_iter=2).gmm


def test_init_gmm_must_match_the_data(start):
    with pytest.raises(ValueError, match="`init_gmm`"):
        jaxgmm.fit(jax.random.key(0), np.concatenate([X, X], 1), 3, init_gmm=start)
    with pytest.raises(ValueError, match="`init_gmm`"):
        jaxgmm.fit(jax.random.key(0), X, 4, init_gmm=start)
    with pytest.raises(ValueError, match="`init_gmm`"):
        jaxgmm.fit(jax.random.key(0), X, 3, init_gmm=start, covariance_type="diag")
    with pytest.raises(ValueError, match="`gmm`"):
        jaxgmm.em_step(start, np.concatenate([X, X], 1))
    with pytest.raises(ValueError, match="`x`"):
        jaxgmm.em_steps(start, with_nan(X), 3)


@pytest.mark.parametrize(
    ("x", "weight", "status"),
    [
        (with_nan(X), None, Status.nonfinite_input),
        (X, -np.ones(len(X), np.float32), Status.negative_weights),
        (
            X,
            np.r_[np.ones(2), np.zeros(198)].astype(np.float32),
            Status.too_few_weighted_rows,
        ),
        (X, None, Status.success),
    ],
)
def test_throw_false_reports_status_and_keeps_parameters_finite(x, weight, status):
    result = jaxgmm.fit(jax.random.key(1), x, 3, sample_weight=weight, throw=False)
    assert int(result.status) == status
    for leaf in jax.tree.leaves(result.gmm):
        assert np.all(np.isfinite(leaf))


def test_nan_in_a_zero_weight_row_is_ignored():
    weight = np.ones(len(X), np.float32)
    weight[7] = 0.0
    result = jaxgmm.fit(jax.random.key(1), with_nan(X), 3, sample_weight=weight)
    assert int(result.status) == Status.success


def test_under_jit_throw_true_raises_at_run_time():
    fit = jax.jit(lambda x: jaxgmm.fit(jax.random.key(1), x, 3).gmm.means)
    fit(X)  # compiles and runs on good data
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.block_until_ready(fit(with_nan(X)))


def test_one_bad_data_set_in_a_vmapped_batch_spoils_nothing_else():
    xs = np.stack([X, with_nan(X), X + 1.0])
    keys = jax.random.split(jax.random.key(2), 3)
    batch = jax.vmap(lambda k, x: jaxgmm.fit(k, x, 3, throw=False))(keys, xs)
    np.testing.assert_array_equal(batch.status, [0, Status.nonfinite_input, 0])
    assert np.all(np.isfinite(batch.gmm.means))
    alone = jaxgmm.fit(keys[2], xs[2], 3)
    np.testing.assert_allclose(
        batch.gmm.means[2], alone.gmm.means, rtol=1e-4, atol=1e-4
    )


def test_status_members_carry_messages():
    assert Status.success == 0
    for member in Status:
        assert isinstance(member.message, str) and member.message
    assert jnp.asarray(Status.nonfinite_input).dtype == jnp.int32


def test_status_is_counted_over_every_chunk():
    # 10,001 rows are 2 full chunks of 4096 plus a remainder: a bad row or
    # weight in any of the three pieces is found (data_status works by chunks).
    from jaxgmm._data import data_status, rows_per_chunk

    n = 10_001
    assert rows_per_chunk(n, 3, 2) == 4096
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    status = jax.jit(data_status, static_argnums=2)
    assert int(status(x, None, 3)) == Status.success
    for row in (5, 5000, 10_000):
        bad = x.copy()
        bad[row, 1] = np.inf
        assert int(status(bad, None, 3)) == Status.nonfinite_input
        weight = np.ones(n, np.float32)
        weight[row] = -1.0
        assert int(status(x, weight, 3)) == Status.negative_weights
        weight[row] = 0.0
        assert int(status(bad, weight, 3)) == Status.success
    few = np.zeros(n, np.float32)
    few[[1, 9000]] = 1.0
    assert int(status(x, few, 3)) == Status.too_few_weighted_rows


def test_throw_false_fits_the_usable_rows_with_their_weights():
    # A NaN row or a negative weight is reported, but the fit is the one of
    # the usable rows with their weights: zero-weight padding far away stays
    # absent, the NaN row and the negative weight count as weight 0.
    without_row_7 = np.ones(len(X), np.float32)
    without_row_7[7] = 0.0
    expected = jaxgmm.fit(jax.random.key(1), X, 3, sample_weight=without_row_7)
    padded = np.concatenate([with_nan(X), np.full((20, 2), 50.0, np.float32)])
    weight = np.r_[np.ones(len(X)), np.zeros(20)].astype(np.float32)
    result = jaxgmm.fit(jax.random.key(1), padded, 3, sample_weight=weight, throw=False)
    assert int(result.status) == Status.nonfinite_input
    negative = without_row_7.copy()
    negative[7] = -1.0
    clamped = jaxgmm.fit(jax.random.key(1), X, 3, sample_weight=negative, throw=False)
    assert int(clamped.status) == Status.negative_weights
    for fitted in (result, clamped):
        np.testing.assert_allclose(
            fitted.gmm.means, expected.gmm.means, rtol=1e-4, atol=1e-4
        )


def test_overflowing_fit_reports_nonfinite_parameters():
    # Finite data whose squares overflow float32: the fit cannot give finite
    # parameters. Eagerly that is a ValueError; with throw=False, a finite
    # placeholder mixture and the status.
    huge = X * np.float32(3e37)
    with pytest.raises(ValueError, match="not finite"):
        jaxgmm.fit(jax.random.key(1), huge, 3, max_iter=5)
    result = jaxgmm.fit(jax.random.key(1), huge, 3, max_iter=5, throw=False)
    assert int(result.status) == Status.nonfinite_parameters
    for leaf in jax.tree.leaves(result.gmm):
        assert np.all(np.isfinite(leaf))
    np.testing.assert_allclose(result.gmm.weights, np.full(3, 1 / 3), rtol=1e-6)


def test_kmeans_under_jit_raises_at_run_time_on_bad_data():
    kmeans = jax.jit(lambda x: jaxgmm.kmeans(jax.random.key(1), x, 3)[0])
    assert np.all(np.isfinite(kmeans(X)))
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.block_until_ready(kmeans(with_inf(X)))


@pytest.mark.parametrize("scale", [1e-20, 1e-6, 1e10])
def test_scaling_every_weight_by_one_number_changes_no_fit(scale):
    # Weights are row multiplicities: probabilities summing to 1 over the rows
    # (1e-6 each for a million rows) must fit like unit weights. sklearn's
    # 10 * eps is counted in units of the mean row weight for that.
    unit = jaxgmm.fit(jax.random.key(0), X, 3, tol=0.0, max_iter=10)
    scaled = jaxgmm.fit(
        jax.random.key(0),
        X,
        3,
        tol=0.0,
        max_iter=10,
        sample_weight=np.full(len(X), scale, np.float32),
    )
    np.testing.assert_allclose(scaled.gmm.means, unit.gmm.means, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scaled.gmm.weights, unit.gmm.weights, rtol=1e-5)
    np.testing.assert_allclose(scaled.log_likelihood, unit.log_likelihood, rtol=1e-5)


@pytest.mark.parametrize(
    "method",
    ["log_prob", "component_log_prob", "responsibilities", "predict", "score"],
)
def test_density_methods_reject_non_finite_rows_when_called_eagerly(start, method):
    # As scikit-learn's score_samples / predict_proba / predict do. Under jit
    # the values are not checked: the bad rows' results are NaN (predict's
    # label arbitrary) and the other rows are unaffected.
    for bad in (with_nan(X), with_inf(X)):
        with pytest.raises(ValueError, match="`x` contains NaN or infinite"):
            getattr(start, method)(bad)
    traced = jax.jit(lambda x: getattr(start, method)(x))(with_nan(X))
    expected = getattr(start, method)(X)
    rows = np.arange(len(X)) != 7
    np.testing.assert_allclose(traced[rows], expected[rows], rtol=1e-5, atol=1e-6)
    if method != "predict":
        assert np.all(np.isnan(traced[7]))
