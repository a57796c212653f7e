"""Initialisation and k-means: sklearn meanings, weights, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import close_clusters_far_from_the_centre, make_blobs
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


def exponentials(key, n_rows, counters, dtype=jnp.float32):
    from jaxgmm._init import _exponentials

    words = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
    return _exponentials(words, jnp.arange(n_rows), jnp.asarray(counters), dtype)


_exponentials_jit = jax.jit(exponentials, static_argnums=(1, 3))


def test_seeding_draws_are_exponential_independent_and_follow_the_key():
    # k-means++ draws its rows by an exponential race over per-row draws
    # hashed from the key's data (_exponentials). Checked as a generator at a
    # significance of 1e-4 each (the draws are fixed by the keys, so the
    # test is deterministic).
    from scipy import stats

    n = 100_000
    draw = _exponentials_jit(jax.random.key(0), n, jnp.arange(3))
    e = np.asarray(draw, np.float64)
    assert draw.dtype == jnp.float32 and e.shape == (3, n) and e.min() > 0
    for row in e:
        assert stats.kstest(row, "expon").pvalue > 1e-4
    # Neighbouring rows and counters are independent: uncorrelated, and their
    # pairs (as uniforms) fill a 10 x 10 grid as evenly as chance would
    # (neither less nor, like a lattice, more: the test is two-sided).
    u = -np.expm1(-e)
    bound = 4.5 / np.sqrt(n)
    assert abs(np.corrcoef(u[0, :-1], u[0, 1:])[0, 1]) < bound
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < bound
    for a, b in ((u[0, :-1:2], u[0, 1::2]), (u[0], u[1])):
        pairs = np.histogram2d(a, b, bins=10, range=[[0, 1], [0, 1]])[0]
        assert 1e-4 < stats.chisquare(pairs.ravel()).pvalue < 1 - 1e-4
    # Along the counters, for one row, too.
    along = np.asarray(_exponentials_jit(jax.random.key(0), 1, jnp.arange(n)))[:, 0]
    assert stats.kstest(along, "expon").pvalue > 1e-4
    # Same key, same draws; split keys and neighbouring raw keys give
    # uncorrelated streams.
    np.testing.assert_array_equal(
        _exponentials_jit(jax.random.key(0), n, jnp.arange(3)), draw
    )
    for other in [jax.random.key(1), *jax.random.split(jax.random.key(0), 2)]:
        v = -np.expm1(-np.asarray(_exponentials_jit(other, n, jnp.arange(3))[0]))
        assert abs(np.corrcoef(u[0], v)[0, 1]) < bound
        assert np.mean(u[0] == v) < 1e-3
    # A draw depends on its row and counter, not on the rows around it.
    np.testing.assert_array_equal(
        _exponentials_jit(jax.random.key(0), 1000, jnp.arange(1, 3)),
        draw[1:, :1000],
    )
    # vmap over keys draws what each key draws alone.
    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.vmap(lambda k: exponentials(k, 5, jnp.arange(3)))(keys)
    for k, got in zip(keys, batched):
        np.testing.assert_array_equal(got, exponentials(k, 5, jnp.arange(3)))


def test_seeding_draws_keep_full_precision_near_zero():
    # The race is decided by the smallest draws (~1/N): there they must not
    # sit on a coarse grid. Of 2^21 draws, those below 1e-4 (~210) are all
    # distinct and, scaled by 1e4, uniform (the exponential's density is
    # flat to 1e-4 there); a 32-bit fixed-point uniform would put them on
    # ~430,000 grid points (fine), a 24-bit one on 1,678 (ties).
    from scipy import stats

    e = np.asarray(_exponentials_jit(jax.random.key(5), 1 << 21, jnp.arange(1)))[0]
    small = e[e < 1e-4]
    expected = (1 << 21) * -np.expm1(-1e-4)
    assert abs(len(small) - expected) < 4.5 * np.sqrt(expected)
    assert len(np.unique(small)) == len(small)
    assert stats.kstest(small * 1e4, "uniform").pvalue > 1e-4
    # The smallest of them still has its low bits: not a multiple of 2^-24.
    tiny = np.sort(small)[:20].astype(np.float64)
    assert np.mean(np.mod(tiny * 2.0**24, 1.0) != 0) > 0.5


def test_float64_seeding_draws(x64):
    from scipy import stats

    e = _exponentials_jit(jax.random.key(3), 50_000, jnp.arange(1), jnp.float64)
    assert e.dtype == jnp.float64
    assert stats.kstest(np.asarray(e)[0], "expon").pvalue > 1e-4


def race(key, closest, chunk_size, n_draws=4):
    from jaxgmm._data import make_data
    from jaxgmm._init import _closer_and_draw

    n = closest.shape[0]
    data, _ = make_data(jnp.zeros((n, 2), jnp.float32), None, 1)
    words = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
    _, rows, found = _closer_and_draw(
        data, closest, jnp.zeros(2), chunk_size, True, False, words,
        jnp.arange(n_draws) + 3,
    )  # fmt: skip
    return rows, found


@pytest.mark.parametrize("chunk_size", [60, 1000])
def test_race_draws_rows_in_proportion_to_distance(chunk_size):
    # Rows drawn by the race over 2,000 keys x 4 draws follow the values
    # (chi-square, significance 1e-4), each draw on its own too; rows of
    # value 0 are never drawn; chunks of 60 rows (4 full chunks and a
    # remainder of 10) draw exactly what one chunk draws.
    from scipy import stats

    rng = np.random.default_rng(3)
    values = rng.uniform(0.0, 1.0, 250).astype(np.float32) ** 3
    values[rng.uniform(size=250) < 0.3] = 0.0
    values[7] = 5.0  # one heavy row
    closest = jnp.asarray(values)
    keys = jax.random.split(jax.random.key(1), 2000)
    draw = jax.jit(jax.vmap(lambda k: race(k, closest, chunk_size)))
    rows, found = (np.asarray(a) for a in draw(keys))
    assert found.all()
    assert np.all(values[rows] > 0)
    positive = values > 0
    # Pool the lightest rows so that every expected count is at least 5.
    order = np.argsort(values[positive])
    exact = values.astype(np.float64)[positive][order]
    p = exact / exact.sum()

    def test(counts):
        counts = counts[positive][order]
        expected = counts.sum() * p
        cut = np.searchsorted(np.cumsum(expected), 5.0)
        observed = np.r_[counts[:cut].sum(), counts[cut:]]
        expect = np.r_[expected[:cut].sum(), expected[cut:]]
        return stats.chisquare(observed, expect).pvalue

    assert test(np.bincount(rows.ravel(), minlength=250)) > 1e-4
    for t in range(rows.shape[1]):
        assert test(np.bincount(rows[:, t], minlength=250)) > 1e-4
    # The draws of one key are independent: two draws agree as often as
    # independent ones would (sum of p^2), within 4.5 standard errors.
    same = np.mean(rows[:, 0] == rows[:, 1])
    q = float((p**2).sum())
    assert abs(same - q) < 4.5 * np.sqrt(q * (1 - q) / len(keys))
    if chunk_size < 250:
        whole = jax.jit(jax.vmap(lambda k: race(k, closest, 250)))(keys)[0]
        np.testing.assert_array_equal(rows, whole)


def test_race_reports_when_no_row_can_be_drawn():
    rows, found = jax.jit(lambda k: race(k, jnp.zeros(100), 30))(jax.random.key(0))
    assert not np.any(found)


def test_kmeans_plus_plus_pairs_follow_the_greedy_rule():
    # Two centres from 5 weighted rows: the first is drawn in proportion to
    # weight, the second is the better (lower potential; the earlier draw on
    # a tie) of 2 + int(log 2) = 2 rows drawn in proportion to weight times
    # squared distance to the first. The exact pair distribution, summed
    # over the draws in numpy, against 6,000 keys: chi-square, 1e-4.
    from itertools import product

    from scipy import stats

    from jaxgmm._data import make_data
    from jaxgmm._init import kmeans_plusplus

    x = np.array([[0, 0], [1, 0], [0, 2], [4, 1], [5, 5]], np.float64)
    w = np.array([1.0, 3.0, 2.0, 1.0, 0.5])
    n = len(x)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.zeros((n, n))
    for i in range(n):
        closest = w * d2[i]
        q = closest / closest.sum()
        potential = np.minimum(closest[None], w * d2).sum(1)
        for a, b in product(range(n), repeat=2):
            second = a if potential[a] <= potential[b] else b
            expected[i, second] += w[i] / w.sum() * q[a] * q[b]

    def pair(key):
        data, _ = make_data(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 2)
        return kmeans_plusplus(key, data, 2)[1]

    keys = jax.random.split(jax.random.key(2), 6000)
    got = np.asarray(jax.jit(jax.vmap(pair))(keys))
    counts = np.zeros((n, n))
    np.add.at(counts, (got[:, 0], got[:, 1]), 1)
    assert np.all(counts[expected == 0] == 0)
    keep = expected > 0
    observed, expect = counts[keep], 6000 * expected[keep]
    big = expect >= 5
    observed = np.r_[observed[big], observed[~big].sum()]
    expect = np.r_[expect[big], expect[~big].sum()]
    assert stats.chisquare(observed, expect).pvalue > 1e-4


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


@pytest.mark.parametrize("d", [2, 6])
def test_kmeans_in_float32_separates_close_clusters_far_from_the_data_centre(d):
    # |c|^2 - 2 x.c loses ~eps * 1e8 ~ 12 in float32, more than the squared
    # gap of 1 between the two close clusters: the product form labels most
    # rows of one with the other's centre.
    x64, truth, expected = close_clusters_far_from_the_centre(d)
    centres, labels = jaxgmm.kmeans(jax.random.key(0), x64.astype(np.float32), 3)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, np.asarray(labels)) == 1.0
    # Each centre is its cluster's mean (to float32 rounding of 1e4: ~1e-3).
    order = [int(np.asarray(labels)[truth == j][0]) for j in range(3)]
    np.testing.assert_allclose(np.asarray(centres)[order], expected, atol=4e-3)


def test_kmeans_init_in_float32_separates_close_clusters_far_from_the_data_centre():
    # init="kmeans" labels the rows once more after Lloyd's iterations, with
    # the same comparison. (The matrix-product E-steps then lose precision
    # here; fit, called eagerly, makes them again anchored.)
    x64, _, expected = close_clusters_far_from_the_centre(6)
    result = jaxgmm.fit(
        jax.random.key(0),
        x64.astype(np.float32),
        3,
        covariance_type="diag",
        init="kmeans",
        max_iter=10,
    )
    means = np.asarray(result.gmm.means, np.float64)
    order = [int(np.argmin(((means - m) ** 2).sum(-1))) for m in expected]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(
        np.asarray(result.gmm.weights)[order], [0.25, 0.25, 0.5], atol=1e-4
    )
    np.testing.assert_allclose(means[order], expected, atol=4e-3)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_kmeans_init_moments_are_exact_for_close_clusters_far_from_the_centre(
    covariance_type,
):
    # init="kmeans" takes each row's moments about its own k-means centre.
    # About the data centre, 1e4 away, float32 cancels the clusters' variance
    # of ~4e-4: the first full covariances were ~2e3 (diag 0.2-2% off).
    from jaxgmm._data import make_data
    from jaxgmm._init import initial_gmm

    x64, truth, _ = close_clusters_far_from_the_centre(6)
    x32 = x64.astype(np.float32)

    @jax.jit
    def start(x):
        data, _ = make_data(x, None, 3)
        gmm = initial_gmm(
            jax.random.key(0), data, 3, covariance_type, "kmeans", 1e-6, None
        )
        return gmm.weights, gmm.means + data.centre, gmm.covariances

    weights, means, covariances = (np.asarray(a, np.float64) for a in start(x32))
    # The float32 data's own clusters (rounding at 1e4, ~1e-3, moves their
    # variances by ~1%).
    rows = x32.astype(np.float64)
    clusters = [rows[truth == j] for j in range(3)]
    expected = np.stack([c.mean(0) for c in clusters])
    order = [int(np.argmin(((means - m) ** 2).sum(-1))) for m in expected]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(weights[order], [0.25, 0.25, 0.5], atol=1e-6)
    np.testing.assert_allclose(means[order], expected, atol=2e-3)
    covariances = covariances[order]
    if covariance_type == "full":
        covariances = np.diagonal(covariances, axis1=-2, axis2=-1)
    variances = np.stack([c.var(0) for c in clusters]) + 1e-6
    np.testing.assert_allclose(covariances, variances, rtol=1e-4)
