"""Initialisation: k-means++, k-means (Lloyd), random responsibilities, random rows.

Everything is jit- and vmap-able and weighted. No random draw depends on the
number of rows: indices are drawn by inverse-CDF over cumulative weights, and
per-row randomness is keyed by the row's index (``fold_in``), so padding a
data set with zero-weight rows never changes the initialisation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._covariance import structure_for
from ._data import Data, chunk_rows, reduce_chunks, update_chunks
from ._gmm import GMM, inverse_cdf, isotropic_gmm
from ._linalg import is_finite
from ._stats import Stats, m_step

INIT_METHODS = ("kmeans++", "kmeans", "random", "random_from_data")


def check_init(init: str) -> None:
    if init not in INIT_METHODS:
        raise ValueError(f"`init` must be one of {INIT_METHODS}, got {init!r}")


def _row(data: Data, index: Int[Array, ""]) -> Float[Array, " d"]:
    """One stored row (the data centre if it is not finite)."""
    row = data.x[index]
    return jnp.where(is_finite(row), row, data.origin)


def _weighted_distance(
    data: Data, point: Float[Array, " d"], x_chunk, weight_chunk
) -> Array:
    """Row weight times squared distance to ``point`` (0 for unusable rows),
    for raw stored rows and their given weights (``weight_chunk`` may be None).

    One fused pass: no centred copy of the rows, and the row weights come
    with it (a row is finite exactly when its distance is).
    """
    distance = jnp.sum((x_chunk - point) ** 2, axis=-1)
    finite = is_finite(distance)
    weight = data.weights(x_chunk, weight_chunk, finite)
    return jnp.where(finite & (weight > 0), weight * distance, 0.0)


def _potential(data: Data, closest, point, chunk_size: int) -> Array:
    r"""k-means++ potential of adding ``point``:
    :math:`\sum_n \min(\text{closest}_n, w_n |x_n - \text{point}|^2)`,
    one chunked pass (no N-sized temporary)."""

    def partial(x_chunk, w_chunk, rows):
        part = lax.dynamic_slice_in_dim(closest, rows[0], rows.shape[0])
        distance = _weighted_distance(data, point, x_chunk, w_chunk)
        return jnp.sum(jnp.minimum(part, distance))

    return reduce_chunks(data.x, data.sample_weight, chunk_size, partial, jnp.add)


def _closer(data: Data, closest, point, chunk_size: int, first) -> Array:
    """``closest`` lowered to the weighted distance to ``point`` (replaced by
    it when ``first``), updated in place chunk by chunk."""

    def update(x_chunk, w_chunk, rows, part):
        distance = _weighted_distance(data, point, x_chunk, w_chunk)
        return jnp.where(first, distance, jnp.minimum(part, distance))

    return update_chunks(data.x, data.sample_weight, chunk_size, update, closest)


# Rows per block of the two-level inverse CDF in ``_draw_indices``, and the
# number of rows from which it is used (below, one cumulative sum of all
# rows is cheap, and compiles faster).
SAMPLING_BLOCK = 4096
# Elements of x per chunk in k-means++'s passes over the rows.
SEEDING_CHUNK_ELEMENTS = 1 << 20
TWO_LEVEL_MIN_ROWS = 1 << 22


def _draw_indices(
    u: Float[Array, " t"], values: Float[Array, " n"]
) -> tuple[Int[Array, " t"], Float[Array, ""]]:
    """Index ``i`` with probability ``values_i / sum(values)`` for each ``u``,
    and ``sum(values)``.

    Inverse CDF in two levels, so that no cumulative sum of all N values
    (and none of its N-sized temporaries) is formed: block totals first,
    then the cumulative sum of the one block the target falls in. Blocks
    start at row 0, so zero-valued rows appended at the end (padding)
    change no draw.
    """
    n = values.shape[0]
    block = SAMPLING_BLOCK
    if n < max(TWO_LEVEL_MIN_ROWS, 2 * block):
        cumulative = jnp.cumsum(values)
        indices = inverse_cdf(values, u * cumulative[-1], cumulative)
        return indices.astype(jnp.int32), cumulative[-1]
    n_full = n // block
    # Sliced inside a loop: slicing the first n_full * block values and
    # reshaping them would copy all N of them.
    totals = lax.map(
        lambda b: jnp.sum(lax.dynamic_slice_in_dim(values, b * block, block)),
        jnp.arange(n_full),
    )
    if n_full * block < n:
        totals = jnp.concatenate([totals, jnp.sum(values[n_full * block :])[None]])
    block_cumulative = jnp.cumsum(totals)

    def one(u):
        target = u * block_cumulative[-1]
        chosen = inverse_cdf(totals, target, block_cumulative)
        before = jnp.where(chosen > 0, block_cumulative[chosen - 1], 0.0)
        # The last block may be short: slice a full block ending at row n and
        # zero the rows of the previous block it overlaps.
        start = jnp.minimum(chosen * block, n - block)
        piece = lax.dynamic_slice_in_dim(values, start, block)
        piece = jnp.where(start + jnp.arange(block) >= chosen * block, piece, 0.0)
        # The piece's sums are offset by `before` rather than the target
        # reduced by it: XLA may fuse `u * total - before` into one rounding
        # (a fused multiply-add), which would break ties differently from
        # the single-level search.
        return start + inverse_cdf(piece, target, before + jnp.cumsum(piece))

    return jax.vmap(one)(u).astype(jnp.int32), block_cumulative[-1]


def _mix32(x: Array) -> Array:
    """A bijective 32-bit integer finaliser with strong avalanche: every
    input bit flips each output bit with probability ~1/2 ("lowbias32",
    from C. Wellons' hash-prospector search)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _uniforms(key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Array:
    """``shape`` uniform draws in [0, 1) of ``dtype``, determined by ``key``.

    A counter-based generator over the key's raw data: draw ``i`` hashes
    its counter with every word of ``jax.random.key_data(key)`` in turn
    (:func:`_mix32` after each word, then once more). The same key gives the
    same draws; keys from ``split`` or ``fold_in`` give unrelated ones. The
    top 23 bits of one word (float32; fewer for narrower floats) or 26 of
    each of two words (float64) form the mantissa, as ``jax.random.uniform``
    does.

    k-means++ needs only a few dozen draws. ``jax.random.uniform`` would
    hash them with threefry, whose rolled loop over a (K, T) array compiles
    to large kernels: about a fifth of the XLA compile time of a whole
    k-means++ fit (N=1e6, D=16, K=16), more under ``vmap``. This is one
    small elementwise kernel.
    """
    words = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
    wide = jnp.finfo(dtype).nmant > 23
    n = math.prod(shape) * (2 if wide else 1)
    state = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    for i in range(words.shape[0]):
        state = _mix32(state ^ words[i])
    bits = _mix32(state + jnp.uint32(0x632BE5AB))
    if not wide:
        # At most as many bits as dtype's mantissa holds, so that the cast is
        # exact and never rounds a draw up to 1.
        m = min(int(jnp.finfo(dtype).nmant), 23)
        mantissa = (bits >> (32 - m)).astype(jnp.float32) * (2.0**-m)
        return mantissa.astype(dtype).reshape(shape)
    high, low = (bits.reshape(-1, 2) >> 6).astype(dtype).T
    return ((high * 2.0**26 + low) * 2.0**-52).reshape(shape)


def kmeans_plusplus(
    key: PRNGKeyArray, data: Data, n_clusters: int
) -> tuple[Float[Array, "k d"], Int[Array, " k"]]:
    """Greedy weighted k-means++ seeding (scikit-learn's ``kmeans_plusplus``).

    Returns centres in the data's centred coordinates and their row indices.
    Each new centre is the best of ``2 + log(k)`` candidates drawn with
    probability proportional to weight times squared distance.

    Memory: one per-row vector, the weighted distance to the closest centre
    so far; weights and distances to candidates are fused into the passes
    that use them, never stored.
    """
    n_trials = 2 + int(math.log(n_clusters))
    # Passes over the rows go chunk by chunk, so that no distance vector is
    # ever stored: XLA would materialise each one before its reduction. A
    # chunk holds one value per row, so chunks are larger than EM's.
    chunk_size = chunk_rows(
        data.n_rows, max(SEEDING_CHUNK_ELEMENTS // data.x.shape[1], 64)
    )

    # Every draw up front, from one small hash kernel (see _uniforms).
    draws = _uniforms(key, (n_clusters, n_trials), data.x.dtype)

    # weight * min(d_1, d_2) = min(weight * d_1, weight * d_2): the weighted
    # distance to the closest centre is all the loop needs to carry. Before
    # the first centre it is the weight itself, so the first centre is drawn
    # with probability proportional to weight by the same code.
    def add_centre(c, carry):
        indices, closest = carry
        candidates, total = _draw_indices(draws[c], closest)
        # When every usable row already sits on a centre, any of them is one
        # of the centres: take the first centre's row again (scikit-learn
        # also falls back to a fixed row there).
        candidates = jnp.where(total > 0, candidates, indices[0])

        def potential(candidate):
            return _potential(data, closest, _row(data, candidate), chunk_size)

        # The first centre is one draw; later ones the best of n_trials. The
        # trials are vmapped: one pass over the rows scores them all, and it
        # compiles faster than a loop over them. The first iteration scores
        # them too and ignores the scores: one pass over x more than needed,
        # where a cond skipping it compiled 7 more kernels (~80 ms).
        scores = jax.vmap(potential)(candidates)
        best = jnp.where(c == 0, candidates[0], candidates[jnp.argmin(scores)])
        closest = _closer(data, closest, _row(data, best), chunk_size, c == 0)
        return indices.at[c].set(best), closest

    indices = jnp.zeros((n_clusters,), jnp.int32)
    weight = data.weights(data.x, data.sample_weight, data.finite_rows)
    indices, _ = lax.fori_loop(0, n_clusters, add_centre, (indices, weight))
    centres = data.centred(jax.vmap(lambda i: _row(data, i))(indices))
    return centres, indices


def lloyd(
    data: Data, centres: Float[Array, "k d"], max_iter: int, tol: float = 1e-4
) -> tuple[Float[Array, "k d"], Int[Array, ""]]:
    """Weighted Lloyd iterations from ``centres`` (centred coordinates).

    Stops when the total squared centre shift is at most ``tol`` times the
    mean per-feature variance (scikit-learn's rule) or after ``max_iter``.
    An empty cluster keeps its centre.
    """
    n_clusters = centres.shape[0]
    total, first, second = data.sum(lambda xc, w, _: (jnp.sum(w), w @ xc, w @ (xc**2)))
    total = jnp.maximum(total, jnp.finfo(centres.dtype).tiny)
    variance = jnp.maximum(second / total - (first / total) ** 2, 0.0)
    tolerance = tol * jnp.mean(variance)

    def update(centres):
        def chunk(xc, w, _):
            labels = _nearest(xc, centres)
            onehot = jax.nn.one_hot(labels, n_clusters, dtype=xc.dtype) * w[:, None]
            return jnp.sum(onehot, axis=0), onehot.T @ xc

        counts, sums = data.sum(chunk)
        safe = jnp.maximum(counts, jnp.finfo(centres.dtype).tiny)[:, None]
        return jnp.where(counts[:, None] > 0, sums / safe, centres)

    def cond(carry):
        _, shift, iteration = carry
        return (iteration < max_iter) & (shift > tolerance)

    def body(carry):
        centres, _, iteration = carry
        new = update(centres)
        return new, jnp.sum((new - centres) ** 2), iteration + 1

    inf = jnp.array(jnp.inf, centres.dtype)
    centres, _, n_iter = lax.while_loop(cond, body, (centres, inf, 0))
    return centres, n_iter


def _nearest(xc: Float[Array, "n d"], centres: Float[Array, "k d"]) -> Array:
    squared = (
        jnp.sum(centres**2, axis=-1)[None, :] - 2.0 * xc @ centres.T
    )  # |x|^2 is common to every centre
    return jnp.argmin(squared, axis=-1).astype(jnp.int32)


def kmeans_labels(data: Data, centres: Float[Array, "k d"]) -> Int[Array, " n"]:
    return data.map(lambda xc, w, _: _nearest(xc, centres))


def _gumbel_top_k(key: PRNGKeyArray, data: Data, k: int) -> Int[Array, " k"]:
    """k distinct rows drawn with probability proportional to weight."""
    weight = data.weights(data.x, data.sample_weight, data.finite_rows)
    rows = jnp.arange(data.n_rows)
    gumbel = jax.vmap(
        lambda i: jax.random.gumbel(jax.random.fold_in(key, i), dtype=weight.dtype)
    )(rows)
    scores = jnp.where(
        weight > 0, jnp.log(jnp.where(weight > 0, weight, 1.0)) + gumbel, -jnp.inf
    )
    # Rows without weight come last, ordered by index (stable under padding).
    scores = jnp.where(weight > 0, scores, -1e30 - rows.astype(weight.dtype))
    return lax.top_k(scores, k)[1].astype(jnp.int32)


def _point_gmm(structure, data: Data, indices: Int[Array, " k"], reg_covar, fallback):
    """scikit-learn's M-step for one-hot responsibilities at ``indices``.

    Each component holds one point, so in closed form: mean = the point,
    covariance = ``reg_covar`` times the identity, weight proportional to the
    point's weight (plus sklearn's ``10 * eps``). With ``reg_covar = 0`` the
    covariances come from ``fallback`` instead.
    """
    rows = data.x[indices]
    points = jnp.where(is_finite(rows), data.centred(rows), 0.0)
    weights = data.weights(rows, data.weight_rows(lambda w: w[indices]))
    weights = weights + 10 * jnp.finfo(weights.dtype).eps
    k, d = points.shape
    precisions_cholesky = jnp.where(
        reg_covar > 0,
        structure.identity(k, d, points.dtype)
        / jnp.sqrt(jnp.maximum(reg_covar, 1e-300)),
        fallback.precisions_cholesky,
    )
    return GMM.from_precisions_cholesky(
        weights / jnp.sum(weights),
        points,
        precisions_cholesky,
        fallback.covariance_type,
    )


def _responsibility_stats(structure, data: Data, shift, resp_fn) -> Stats:
    def chunk(xc, w, rows):
        weighted = resp_fn(xc, rows) * w[None, :]
        features = structure.row_features(xc)
        counts, sums, scatter = structure.moments(features, weighted, shift)
        return counts, sums, scatter, jnp.sum(w)

    counts, sums, scatter, total = data.sum(chunk)
    return Stats(counts, sums, scatter, shift, jnp.zeros((), total.dtype), total)


def initial_gmm(
    key: PRNGKeyArray,
    data: Data,
    n_components: int,
    covariance_type: str,
    init: str,
    reg_covar,
    max_condition,
    kmeans_max_iter: int = 100,
) -> GMM:
    """Initial mixture in the data's centred coordinates.

    Following scikit-learn, each method yields responsibilities (one-hot at
    k-means++ seeds, at random rows, at k-means labels, or random rows of
    weights) and the first parameters are one M-step from them. Components
    the start leaves empty sit at the data's centre with an isotropic
    covariance of the data's scale.
    """
    structure = structure_for(covariance_type)
    k, d = n_components, data.x.shape[1]
    dtype = data.x.dtype
    # Where the start leaves a component empty (or degenerate), it falls back
    # to the data centre with an isotropic covariance of the data's scale.
    scale = jnp.sqrt(jnp.mean(data.variance) + reg_covar)
    scale = jnp.where(scale > 0, scale, 1.0)
    whole_data = isotropic_gmm(jnp.zeros((k, d), dtype), scale, covariance_type)

    if init == "kmeans++":
        _, indices = kmeans_plusplus(key, data, k)
        return _point_gmm(structure, data, indices, reg_covar, whole_data)
    if init == "random_from_data":
        indices = _gumbel_top_k(key, data, k)
        return _point_gmm(structure, data, indices, reg_covar, whole_data)
    if init == "kmeans":
        seeds, _ = kmeans_plusplus(key, data, k)
        centres, _ = lloyd(data, seeds, kmeans_max_iter)
        shift = structure.scatter_shift(centres)
        stats = _responsibility_stats(
            structure,
            data,
            shift,
            lambda xc, rows: jax.nn.one_hot(_nearest(xc, centres), k, dtype=dtype).T,
        )
    else:  # "random", validated by check_init

        def random_resp(xc, rows):
            draw = jax.vmap(
                lambda i: jax.random.uniform(jax.random.fold_in(key, i), (k,), dtype)
            )(rows)
            return (draw / jnp.sum(draw, axis=-1, keepdims=True)).T

        stats = _responsibility_stats(
            structure, data, jnp.zeros((k, d), dtype), random_resp
        )
    return m_step(stats, whole_data, reg_covar, max_condition)
