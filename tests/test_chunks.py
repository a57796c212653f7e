"""Chunked passes over the rows: chunk sizes, in-place updates, and k-means++
giving the same seeds whether its passes run in one chunk or many."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgmm
from jaxgmm import _covariance, _init, _linalg
from jaxgmm._data import (
    blocked_chunking,
    chunk_rows,
    make_data,
    reduce_rows,
    reduce_update_chunks,
)

N = 10_001  # 73 * 137: no chunk size in (budget / 2, budget] divides it


def test_chunk_rows_prefers_a_divisor_of_the_row_count():
    assert chunk_rows(10_000_000, 4096) == 4000  # 2500 chunks, no remainder
    assert chunk_rows(N, 4096) == 4096  # no divisor in range: a remainder
    assert chunk_rows(300, 4096) == 300  # small data: one chunk
    assert chunk_rows(0, 4096) == 1


def test_blocked_chunking_takes_ten_blocks_of_at_most_800_rows():
    # D=64 diag (128 features a row): 800-row blocks, 125 chunks of 8,000.
    assert blocked_chunking(1_000_000, 128) == (8000, 10)
    # D=32 full (560 features): at most 2**18 / 560 rows, a multiple of 16
    # (464), preferring a size whose chunks divide N (400).
    assert blocked_chunking(1_000_000, 560) == (4000, 10)
    # No block size in (400, 800] divides an odd N: 800 with a remainder.
    assert blocked_chunking(270_007, 12) == (8000, 10)
    # Fewer rows than MIN_BLOCKED_ROWS, or rows too wide for 16-row blocks:
    # no blocks.
    assert blocked_chunking(2**18 - 1, 12) is None
    assert blocked_chunking(10**7, 2**15) is None


def test_blocked_e_step_equals_the_unblocked_one():
    # Weighted rows, a non-finite row in a block of each full chunk and in the
    # remainder: the blocks' sums equal one pass per chunk.
    from jaxgmm._stats import e_step_row_width, e_step_stats

    rng = np.random.default_rng(8)
    n, d, k = 270_007, 6, 3
    x = rng.normal(size=(n, d)).astype(np.float32) + 100.0
    x[[5, 9_613, 266_000]] = np.nan
    w = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
    gmm = jaxgmm.GMM(
        np.full(k, 1 / k, np.float32),
        (100.0 + rng.normal(size=(k, d))).astype(np.float32),
        rng.uniform(0.5, 2.0, size=(k, d)).astype(np.float32),
        "diag",
    )

    @jax.jit
    def stats(x, w, gmm):
        width = e_step_row_width("diag", x)
        blocked, _ = make_data(x, w, k, width)
        plain, _ = make_data(x, w, k)
        assert (blocked.chunk_size, blocked.blocks) == (8000, 10)
        assert plain.blocks == 1
        centred = jaxgmm.GMM(
            gmm.weights, gmm.means - blocked.centre, gmm.covariances, "diag"
        )
        return e_step_stats(centred, blocked), e_step_stats(centred, plain)

    blocked, plain = stats(x, w, gmm)
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(plain)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-3)


def test_reduce_rows_adds_and_minimises_each_operand_in_one_reduction():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(300, 4)).astype(np.float32)
    index = rng.integers(0, 1000, size=(300, 4)).astype(np.int32)
    total, least = reduce_rows((values, index), (jnp.add, jnp.minimum))
    np.testing.assert_allclose(total, values.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(least, index.min(0))
    assert least.dtype == jnp.int32
    with pytest.raises(ValueError, match="operands"):
        reduce_rows((values,), (jnp.add,))


def test_vector_sum_matches_numpy():
    v = np.random.default_rng(4).normal(size=1000)
    np.testing.assert_allclose(
        _linalg.vector_sum(jnp.asarray(v)), v.sum(), rtol=1e-5, atol=1e-4
    )


def test_reduce_update_chunks_writes_every_row_once_including_the_remainder():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    w = rng.uniform(size=N).astype(np.float32)
    out = rng.uniform(size=N).astype(np.float32)

    def fn(x_chunk, w_chunk, rows):
        new = w_chunk * jnp.sum(x_chunk**2, -1) + rows
        return jnp.sum(w_chunk), new

    total, got = jax.jit(
        lambda x, w, o: reduce_update_chunks(x, w, 1000, fn, jnp.add, o)
    )(x, w, out)
    np.testing.assert_allclose(got, w * (x**2).sum(-1) + np.arange(N), rtol=1e-6)
    np.testing.assert_allclose(total, w.astype(np.float64).sum(), rtol=1e-5)


@pytest.mark.parametrize("n", [7, 16, 199, 200, 1003])
def test_sums_over_rows_matches_float64_sums(n):
    # 7: one plain pass; 16 and 200: one step of the tree; 199: a 7-row tail;
    # 1003 = 8 * 125 + 3: a tail, then two steps (125 >= ROW_SPLIT_AGAIN_MIN).
    rng = np.random.default_rng(n)
    terms = [rng.normal(loc=3.0, size=(5, 3, n)).astype(np.float32) for _ in range(3)]
    got = jax.jit(_linalg.sums_over_rows)(terms)
    assert len(got) == 3
    for g, t in zip(got, terms):
        assert g.shape == (5, 3) and g.dtype == np.float32
        expected = t.astype(np.float64).sum(-1)
        np.testing.assert_allclose(
            g, expected, rtol=0, atol=2e-6 * np.abs(t).sum(-1).max()
        )


@pytest.mark.parametrize(
    "k, n, products",
    [(3, 2048, 2), (15, 2048, 2), (17, 2048, 16), (32, 2048, 16), (32, 800, 2)],
)
def test_grouped_matmul_matches_float64_products(k, n, products):
    # 3 and 15 components: one product per operand (fewer than 8 groups of
    # 2); 17: eight uneven groups; 32: eight groups of 4; over 800 rows (a
    # row block, fewer than GROUPED_MIN_ROWS): one product per operand.
    rng = np.random.default_rng(k)
    weights = rng.uniform(size=(k, n)).astype(np.float32)
    a, b = (rng.normal(size=(n, d)).astype(np.float32) for d in (64, 1))
    jaxpr = jax.make_jaxpr(_linalg.grouped_matmul)(weights, (a, b))
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == products
    got = jax.jit(_linalg.grouped_matmul)(weights, (a, b))
    assert len(got) == 2
    for g, operand in zip(got, (a, b)):
        expected = weights.astype(np.float64) @ operand.astype(np.float64)
        assert g.shape == expected.shape and g.dtype == np.float32
        scale = weights.astype(np.float64) @ np.abs(operand.astype(np.float64))
        np.testing.assert_allclose(g, expected, rtol=0, atol=1e-6 * scale.max())


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
@pytest.mark.parametrize("d", [3, 64])
def test_moments_from_factored_row_weights_match_the_weighted_rows(covariance_type, d):
    # The E-step passes responsibilities as (unnormalised, per-row scale):
    # every statistic must be that of the weights unnormalised * scale, and
    # the counts those of a float64 sum. D=3: the unrolled small-D moments;
    # D=64 with 17 components: the grouped products (diag and spherical).
    structure = _covariance.structure_for(covariance_type)
    rng = np.random.default_rng(d)
    x = rng.normal(size=(300, d)).astype(np.float32)
    resp = rng.uniform(size=(17, 300)).astype(np.float32)
    scale = rng.uniform(0.0, 2.0, size=300).astype(np.float32)
    scale[::7] = 0.0
    shift = structure.scatter_shift(jnp.asarray(rng.normal(size=(17, d)), jnp.float32))
    features = structure.row_features(jnp.asarray(x))
    factored = structure.moments(features, resp, shift, scale)
    dense = structure.moments(features, resp * scale[None, :], shift)
    for got, expected in zip(factored, dense):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-4)
    counts = resp.astype(np.float64) @ scale.astype(np.float64)
    np.testing.assert_allclose(factored[0], counts, rtol=2e-6)


def test_columns_are_the_exact_transpose():
    # The identity product behind the small-D features must not round.
    # (Subnormals are flushed to zero, as everywhere in XLA's CPU code.)
    x = np.random.default_rng(2).normal(size=(37, 3)).astype(np.float32) * 1e5
    x[3] = [2e-38, -3.4e38, 0.0]
    np.testing.assert_array_equal(jax.jit(_covariance._columns)(x), x.T)


@pytest.fixture(scope="module")
def weighted_data():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=5.0, size=(4, 2))
    x = centres[rng.integers(0, 4, N)] + rng.normal(size=(N, 2))
    weight = rng.uniform(0.0, 2.0, N)
    weight[rng.uniform(size=N) < 0.2] = 0.0
    return jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32)


def seeds(x, weight, key):
    data, _ = make_data(x, weight, 5)
    return _init.kmeans_plusplus(key, data, 5)


def test_kmeans_plusplus_seeds_do_not_depend_on_the_chunking(
    weighted_data, monkeypatch
):
    x, weight = weighted_data
    keys = [jax.random.key(i) for i in range(3)]
    whole = [jax.jit(seeds)(x, weight, key) for key in keys]
    # 2 features: chunks of 1000 rows, the last of 1 row.
    monkeypatch.setattr(_init, "SEEDING_CHUNK_ELEMENTS", 2 * 1000)
    chunked = [jax.jit(seeds)(x, weight, key) for key in keys]
    for (centres_a, indices_a), (centres_b, indices_b) in zip(whole, chunked):
        np.testing.assert_array_equal(indices_a, indices_b)
        np.testing.assert_array_equal(centres_a, centres_b)
        assert np.all(np.asarray(weight)[np.asarray(indices_a)] > 0)


@pytest.mark.parametrize("chunk_size", [1000, N])
@pytest.mark.parametrize("weighted", [True, False])
def test_kmeans_plusplus_passes_match_numpy(weighted_data, chunk_size, weighted):
    # The potential of a candidate and the updated closest distances, chunk
    # by chunk (last chunk of 1 row) and in one piece, against float64 numpy.
    # Unweighted, one row is NaN: it must count as absent (distance 0).
    x, weight = weighted_data
    if not weighted:
        x, weight = x.at[17].set(jnp.nan), None
    data, _ = make_data(x, weight, 5)
    xs = np.asarray(x, np.float64)
    w = np.ones(N) if weight is None else np.asarray(weight, np.float64)
    w[~np.isfinite(xs).all(1)] = 0.0
    closest = np.random.default_rng(2).uniform(0.0, 20.0, N)
    point = xs[3]

    distance = w * np.where(w > 0, ((np.nan_to_num(xs) - point) ** 2).sum(1), 0.0)
    potential = jax.jit(_init._potential, static_argnums=3)(
        data, jnp.asarray(closest, jnp.float32), jnp.asarray(point, jnp.float32),
        chunk_size,
    )  # fmt: skip
    np.testing.assert_allclose(
        potential, np.minimum(closest, distance).sum(), rtol=1e-5
    )
    closer = jax.jit(_init._closer_and_draw, static_argnums=3)
    words = jax.random.key_data(jax.random.key(0)).astype(jnp.uint32)
    modes = (
        (False, False, np.minimum(closest, distance)),
        (False, True, distance),
        (True, False, closest),
    )
    for keep, first, expected in modes:
        got, rows, found = closer(
            data, jnp.asarray(closest, jnp.float32), jnp.asarray(point, jnp.float32),
            chunk_size, keep, first, words, jnp.arange(3),
        )  # fmt: skip
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert np.all(found) and np.all(expected[np.asarray(rows)] > 0)


@pytest.fixture(scope="module")
def many_features():
    # 10,001 rows of 6 features: 2 chunks of 4096 plus a remainder, and the
    # matrix-product (D > 4) form of the E- and M-steps.
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=4.0, size=(3, 6))
    x = centres[rng.integers(0, 3, N)] + rng.normal(size=(N, 6))
    return x.astype(np.float32)


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_non_finite_rows_in_every_chunk_count_as_absent(many_features, covariance_type):
    # With throw=False a row holding NaN or inf, in the first chunk, the
    # second or the remainder, is fitted as a row of weight 0.
    from jaxgmm._data import rows_per_chunk

    assert rows_per_chunk(N, 3, 6) == 4096
    bad_rows = [5, 5000, 10_000]
    x = many_features.copy()
    x[bad_rows[0], 2] = np.nan
    x[bad_rows[1], 0] = np.inf
    x[bad_rows[2], 5] = -np.inf
    weight = np.ones(N, np.float32)
    weight[bad_rows] = 0.0
    key = jax.random.key(4)
    kwargs = dict(covariance_type=covariance_type, max_iter=5, tol=0.0)
    got = jaxgmm.fit(key, x, 3, throw=False, **kwargs)
    expected = jaxgmm.fit(key, many_features, 3, sample_weight=weight, **kwargs)
    assert int(got.status) == jaxgmm.Status.nonfinite_input
    for a, b in zip(jax.tree.leaves(got.gmm), jax.tree.leaves(expected.gmm)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.history, expected.history, rtol=1e-6)


@pytest.mark.parametrize("n", [21, 4368])
def test_finiteness_tests_find_every_non_finite_entry(n):
    # The fit's parameter check (a dot product of v * 0 with ones) and the
    # row-wise sum: one NaN, +inf or -inf anywhere is found, and the
    # largest finite values (whose squares overflow) are not flagged.
    rng = np.random.default_rng(n)
    v = (rng.normal(size=n) * 3e38).clip(-3.4e38, 3.4e38).astype(np.float32)
    check = jax.jit(_linalg.vector_finite)
    rows = jax.jit(_linalg.all_finite)
    assert bool(check(v)) and bool(rows(v.reshape(-1, 1 if n == 21 else 16)).all())
    for position in {0, 1, n // 2, n - 2, n - 1}:
        for bad in (np.nan, np.inf, -np.inf):
            w = v.copy()
            w[position] = bad
            assert not bool(check(w))
            w2 = w.reshape(-1, 1 if n == 21 else 16)
            expected = np.isfinite(w2).all(-1)
            np.testing.assert_array_equal(rows(w2), expected)
