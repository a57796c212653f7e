"""Initialisation and k-means: sklearn meanings, weights, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_blobs
from sklearn.cluster import KMeans

import jaxgmm

INITS = ("kmeans++", "kmeans", "random", "random_from_data")


@pytest.fixture(scope="module")
def data():
    x, labels = make_blobs(seed=11)
    return x, labels


def inertia(x, centres):
    d2 = ((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1)
    return d2.min(axis=1).sum()


def test_kmeans_matches_sklearn_inertia_on_separated_blobs(data):
    x, labels = data
    centres, assigned = jaxgmm.kmeans(jax.random.key(0), x, 3)
    reference = KMeans(3, n_init=10, random_state=0).fit(x)
    assert inertia(x, centres) <= reference.inertia_ * 1.001
    assert assigned.dtype == jnp.int32 and assigned.shape == (len(x),)
    # The labels are the nearest centres, and recover the true blobs.
    np.testing.assert_array_equal(
        assigned,
        ((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).argmin(1),
    )
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(labels, np.asarray(assigned)) > 0.95


def test_kmeans_sample_weight_equals_repetition(data):
    x, _ = data
    weight = np.ones(len(x), np.float32)
    weight[:40] = 3.0
    repeated = np.concatenate([x, x[:40], x[:40]])
    centres_w, _ = jaxgmm.kmeans(jax.random.key(1), x, 3, sample_weight=weight)
    reference = KMeans(3, n_init=10, random_state=0).fit(repeated)
    assert inertia(repeated, centres_w) <= reference.inertia_ * 1.001


@pytest.mark.parametrize("init", INITS)
def test_every_init_gives_a_finite_fit_that_finds_the_blobs(data, init):
    x, labels = data
    result = jaxgmm.fit(jax.random.key(2), x, 3, init=init, n_init=3)
    assert int(result.status) == 0
    for leaf in jax.tree.leaves(result.gmm):
        assert np.all(np.isfinite(leaf))
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(labels, np.asarray(result.gmm.predict(x))) > 0.9


@pytest.mark.parametrize("init", INITS)
def test_padding_with_zero_weight_rows_gives_the_same_fit(data, init):
    x, _ = data
    padded = np.concatenate([x, np.full((37, 2), 123.0, np.float32)])
    weight = np.concatenate([np.ones(len(x)), np.zeros(37)]).astype(np.float32)
    a = jaxgmm.fit(jax.random.key(3), x, 3, init=init, max_iter=20, tol=0.0)
    b = jaxgmm.fit(
        jax.random.key(3),
        padded,
        3,
        init=init,
        max_iter=20,
        tol=0.0,
        sample_weight=weight,
    )
    for left, right in zip(jax.tree.leaves(a.gmm), jax.tree.leaves(b.gmm)):
        np.testing.assert_allclose(left, right, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-5)


def test_kmeans_plus_plus_seeds_are_distinct_data_rows(data):
    x, _ = data
    from jaxgmm._data import make_data
    from jaxgmm._init import kmeans_plusplus

    w = jnp.ones(len(x))
    d, _ = make_data(jnp.asarray(x), w, 3)
    centres, indices = kmeans_plusplus(jax.random.key(4), d, 3)
    assert len(set(np.asarray(indices).tolist())) == 3
    np.testing.assert_allclose(
        np.asarray(centres) + np.asarray(d.centre), x[indices], atol=1e-5
    )


def test_random_from_data_never_picks_a_zero_weight_row(data):
    x, _ = data
    weight = np.zeros(len(x), np.float32)
    weight[[5, 50, 150]] = 1.0
    result = jaxgmm.fit(
        jax.random.key(5),
        x,
        3,
        init="random_from_data",
        max_iter=1,
        sample_weight=weight,
    )
    means = np.sort(np.asarray(result.gmm.means), axis=0)
    np.testing.assert_allclose(means, np.sort(x[[5, 50, 150]], axis=0), atol=1e-4)


def test_unknown_init_is_rejected(data):
    with pytest.raises(ValueError, match="init"):
        jaxgmm.fit(jax.random.key(0), data[0], 3, init="kmeans+++")


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_permuting_or_duplicating_rows_gives_the_same_fit(data, covariance_type):
    x, _ = data
    start = jaxgmm.fit(
        jax.random.key(6), x, 3, covariance_type=covariance_type, max_iter=1
    ).gmm
    kwargs = dict(covariance_type=covariance_type, max_iter=15, tol=0.0, init_gmm=start)
    base = jaxgmm.fit(jax.random.key(0), x, 3, **kwargs)
    order = np.random.default_rng(0).permutation(len(x))
    permuted = jaxgmm.fit(jax.random.key(0), x[order], 3, **kwargs)
    doubled = jaxgmm.fit(jax.random.key(0), np.concatenate([x, x]), 3, **kwargs)
    for other in (permuted, doubled):
        for left, right in zip(jax.tree.leaves(base.gmm), jax.tree.leaves(other.gmm)):
            np.testing.assert_allclose(left, right, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(base.log_likelihood, other.log_likelihood, rtol=1e-5)


def test_two_level_inverse_cdf_matches_one_cumulative_sum(monkeypatch):
    # More than two blocks of SAMPLING_BLOCK rows plus a short last block.
    # Small integer values keep every float32 partial sum exact, so the
    # reference (one cumulative sum in float64) must agree index for index.
    from jaxgmm import _init
    from jaxgmm._init import SAMPLING_BLOCK, _draw_indices

    monkeypatch.setattr(_init, "TWO_LEVEL_MIN_ROWS", 2 * SAMPLING_BLOCK)

    n = 3 * SAMPLING_BLOCK + 123
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4, n).astype(np.float32)
    values[rng.random(n) < 0.5] = 0.0
    values[-200:] = 0.0  # the tail (part of the last block) is empty
    u = np.r_[rng.random(500), 0.0, np.nextafter(np.float32(1), np.float32(0))]
    u = u.astype(np.float32)
    draw = jax.jit(_draw_indices)
    got, total = draw(u, values)
    got = np.asarray(got)
    assert float(total) == float(values.sum())
    cumulative = np.cumsum(values.astype(np.float64))
    target = u * np.float32(cumulative[-1])  # float32, as jaxgmm forms it
    expected = np.searchsorted(cumulative, target.astype(np.float64), side="right")
    np.testing.assert_array_equal(got, expected)
    assert np.all(values[got] > 0)
    # Zero-valued rows appended at the end change no draw.
    padded = np.r_[values, np.zeros(5000, np.float32)]
    np.testing.assert_array_equal(np.asarray(draw(u, padded)[0]), got)


def test_seeding_draws_are_uniform_independent_and_follow_the_key():
    # k-means++ hashes its draws from the key's data (_uniforms), not with
    # jax.random: check them as a generator, at a significance of 1e-4 each
    # (the draws are fixed by the keys, so the test is deterministic).
    from scipy import stats

    from jaxgmm._init import _uniforms

    n = 100_000
    draw = jax.jit(lambda k: _uniforms(k, (n,), jnp.float32))
    u = np.asarray(draw(jax.random.key(0)), np.float64)
    assert u.dtype == np.float64 and 0.0 <= u.min() and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    # Consecutive draws are independent: uncorrelated, and their pairs fill
    # a 10 x 10 grid as evenly as chance would (neither less nor, like a
    # lattice, more: the test is two-sided).
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 4.5 / np.sqrt(n)
    pairs = np.histogram2d(u[:-1:2], u[1::2], bins=10, range=[[0, 1], [0, 1]])[0]
    assert 1e-4 < stats.chisquare(pairs.ravel()).pvalue < 1 - 1e-4
    # Same key, same draws; split keys and neighbouring raw keys give
    # uncorrelated streams (|r| below 4.5 standard errors).
    np.testing.assert_array_equal(draw(jax.random.key(0)), u.astype(np.float32))
    others = [jax.random.key(1), *jax.random.split(jax.random.key(0), 2)]
    for other in others:
        v = np.asarray(draw(other), np.float64)
        assert abs(np.corrcoef(u, v)[0, 1]) < 4.5 / np.sqrt(n)
        assert np.mean(u == v) < 1e-3
    # vmap over keys draws what each key draws alone.
    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.vmap(lambda k: _uniforms(k, (4, 3), jnp.float32))(keys)
    for k, row in zip(keys, batched):
        np.testing.assert_array_equal(row, _uniforms(k, (4, 3), jnp.float32))


def test_float64_seeding_draws_use_52_bits(x64):
    from scipy import stats

    from jaxgmm._init import _uniforms

    u = np.asarray(_uniforms(jax.random.key(3), (50_000,), jnp.float64))
    assert u.dtype == np.float64 and 0.0 <= u.min() and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    scaled = u * 2.0**52
    np.testing.assert_array_equal(scaled, np.round(scaled))
    # The low 26 bits come from a second word: they are uniform too.
    low = np.mod(scaled, 2.0**26) / 2.0**26
    assert stats.kstest(low, "uniform").pvalue > 1e-4


def test_first_kmeans_plus_plus_centre_is_drawn_in_proportion_to_weight():
    # The first centre is a row drawn with probability weight / total weight:
    # over 4,000 keys, the counts pass a chi-square test against the weights
    # (significance 1e-4), and the zero-weight row is never drawn.
    from scipy import stats

    from jaxgmm._data import make_data
    from jaxgmm._init import kmeans_plusplus

    x = jnp.arange(12.0, dtype=jnp.float32).reshape(6, 2)
    weight = jnp.array([1.0, 2.0, 0.0, 3.0, 4.0, 5.0], jnp.float32)

    def first(key):
        data, _ = make_data(x, weight, 2)
        return kmeans_plusplus(key, data, 2)[1][0]

    keys = jax.random.split(jax.random.key(11), 4000)
    counts = np.bincount(np.asarray(jax.jit(jax.vmap(first))(keys)), minlength=6)
    assert counts[2] == 0
    positive = np.asarray(weight) > 0
    expected = 4000 * np.asarray(weight)[positive] / float(weight.sum())
    assert stats.chisquare(counts[positive], expected).pvalue > 1e-4
