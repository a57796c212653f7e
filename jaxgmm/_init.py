"""Initialisation: k-means++, k-means (Lloyd), random responsibilities, random rows.

Everything is jit- and vmap-able and weighted. No random draw depends on the
number of rows: per-row randomness is keyed by the row's index (hashed for
k-means++'s exponential race, ``fold_in`` elsewhere) and rows of weight 0 are
never drawn, so padding a data set with zero-weight rows never changes the
initialisation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._covariance import nearest_centres, structure_for
from ._data import Data, chunk_rows, reduce_chunks, scan_chunks
from ._gmm import GMM, isotropic_gmm
from ._linalg import is_finite, vector_sum
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


def _smaller(a: Array, b: Array) -> Array:
    """``jnp.minimum`` for values that are never NaN, as a select: XLA's CPU
    code for a NaN-propagating minimum is several times larger."""
    return jnp.where(b < a, b, a)


def _potential(data: Data, closest, point, chunk_size: int) -> Array:
    r"""k-means++ potential of adding ``point``:
    :math:`\sum_n \min(\text{closest}_n, w_n |x_n - \text{point}|^2)`,
    one chunked pass (no N-sized temporary)."""

    def chunk_potential(x_chunk, w_chunk, rows):
        part = lax.dynamic_slice_in_dim(closest, rows[0], rows.shape[0])
        distance = _weighted_distance(data, point, x_chunk, w_chunk)
        return vector_sum(_smaller(part, distance))

    return reduce_chunks(
        data.x, data.sample_weight, chunk_size, chunk_potential, jnp.add
    )


# Elements of x per chunk in k-means++'s passes over the rows.
SEEDING_CHUNK_ELEMENTS = 1 << 20


def _mix32(x: Array) -> Array:
    """A bijective 32-bit integer finaliser with strong avalanche: every
    input bit flips each output bit with probability ~1/2 ("lowbias32",
    from C. Wellons' hash-prospector search)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _exponentials(
    words: Array, rows: Int[Array, " n"], counters: Int[Array, " t"], dtype
) -> Float[Array, "t n"]:
    r"""Standard exponential draws, one per ``(counter, row)``, of ``dtype``.

    Counter-based: each row hashes its index with every 32-bit word of the
    key's data (``words``, from ``jax.random.key_data``) into two 32-bit
    streams (:func:`_mix32` after each word), and each counter is hashed
    into both. The same key, row and counter always give the same draw, so
    a draw depends neither on how the rows are chunked nor on how many rows
    follow (padding); keys from ``split`` or ``fold_in`` give unrelated
    draws.

    The 64 bits form :math:`V \in (0, 1)` with full relative precision near
    0 (24 bits from one word, then 32 from the other), and the draw is
    :math:`E = -\log(1 - V)`. Near 0 is where it matters: the smallest of a
    million draws is ~1e-6, where a 32-bit fixed-point uniform would leave
    only a few thousand distinct values.
    """
    dtype = jnp.promote_types(dtype, jnp.float32)
    index = rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
    streams = []
    for seed in (0x632BE5AB, 0x2545F491):
        state = index ^ jnp.uint32(seed)
        for i in range(words.shape[0]):
            state = _mix32(state ^ words[i])
        streams.append(state)
    counter = counters.astype(jnp.uint32)[:, None] * jnp.uint32(0x85EBCA6B)
    high = _mix32(streams[0][None, :] ^ counter) >> 8
    low = _mix32(streams[1][None, :] ^ counter)
    v = high.astype(dtype) * 2.0**-24 + low.astype(dtype) * 2.0**-56
    v = jnp.minimum(v, 1.0 - jnp.finfo(dtype).epsneg)
    return -jnp.log1p(-v)


def _race_winner(a, b):
    """Of two ``(score, order, *values)`` tuples, the one of smaller score;
    on a tie, the one of lower order (for ``(score, row)`` pairs: a global
    argmin, whatever the chunking, the earlier row on a tie)."""
    take_b = (b[0] < a[0]) | ((b[0] == a[0]) & (b[1] < a[1]))
    return tuple(jnp.where(take_b, v, u) for u, v in zip(a, b))


def _closer_and_draw(
    data: Data, closest, point, chunk_size: int, keep, first, words, counters
) -> tuple[Array, Int[Array, " t"], Bool[Array, " t"]]:
    r"""One chunked pass: the weighted distances to the closest centre
    updated with ``point``, and rows drawn in proportion to them.

    ``closest`` is kept (``keep``), replaced by the weighted distance to
    ``point`` (``first``) or lowered to it. Then, for each counter, the row
    :math:`\arg\min_n E_n / \text{closest}_n` is drawn, with :math:`E_n`
    independent standard exponentials (:func:`_exponentials`): row ``n``
    wins with probability exactly :math:`\text{closest}_n / \sum_m
    \text{closest}_m` (the exponential race), a row at distance 0 never.
    Unlike an inverse CDF this needs no cumulative sum over the rows, only
    a minimum, and it is folded into the update. Returns ``(closest, rows
    drawn, whether a row could be drawn)``; none can when every distance is
    0.
    """
    dtype = data.x.dtype
    n_draws = counters.shape[0]
    # keep: min(closest, inf); first: min(inf, distance). Added, not
    # selected: LLVM compiles a loop once per value of each loop-invariant
    # condition it selects on (loop unswitching), several times the code.
    inf = jnp.array(jnp.inf, dtype)
    ignore_part = jnp.where(first, inf, 0.0)
    ignore_distance = jnp.where(keep, inf, 0.0)

    def step(carry, x_chunk, w_chunk, rows, start):
        closest, best_score, best_row = carry
        part = lax.dynamic_slice_in_dim(closest, start, x_chunk.shape[0])
        distance = _weighted_distance(data, point, x_chunk, w_chunk)
        new = _smaller(part + ignore_part, distance + ignore_distance)
        # Written back first, then read back for the draws: when both read
        # the old values, XLA copies the (N,) buffer twice per chunk so that
        # the in-place update cannot overtake the read.
        closest = lax.dynamic_update_slice_in_dim(closest, new, start, 0)
        new = lax.dynamic_slice_in_dim(closest, start, x_chunk.shape[0])
        score = _exponentials(words, rows, counters, dtype) / new[None, :]
        row_index = jnp.broadcast_to(rows.astype(jnp.int32), score.shape)
        score, row = lax.reduce(
            (score, row_index),
            (jnp.array(jnp.inf, score.dtype), jnp.array(data.n_rows, jnp.int32)),
            _race_winner,
            (1,),
        )
        best_score, best_row = _race_winner((best_score, best_row), (score, row))
        return (closest, best_score, best_row), None

    dtype_score = jnp.promote_types(dtype, jnp.float32)
    carry = (
        closest,
        jnp.full((n_draws,), jnp.inf, dtype_score),
        jnp.full((n_draws,), data.n_rows, jnp.int32),
    )
    closest, score, row = scan_chunks(
        data.x, data.sample_weight, chunk_size, step, carry
    )[0]
    return closest, row, score < jnp.inf


def kmeans_plusplus(
    key: PRNGKeyArray, data: Data, n_clusters: int
) -> tuple[Float[Array, "k d"], Int[Array, " k"]]:
    """Greedy weighted k-means++ seeding (scikit-learn's ``kmeans_plusplus``).

    Returns centres in the data's centred coordinates and their row indices.
    Each new centre is the best of ``2 + log(k)`` candidates drawn with
    probability proportional to weight times squared distance to the
    closest centre so far (the first centre: one row drawn in proportion to
    weight).

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
    words = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)

    # weight * min(d_1, d_2) = min(weight * d_1, weight * d_2): the weighted
    # distance to the closest centre is all the loop needs to carry. Before
    # the first centre it is the weight itself, so the first centre is drawn
    # with probability proportional to weight by the same code.
    #
    # Iteration c scores the candidates drawn for centre c - 1, keeps the
    # best as that centre, updates the distances with it and, in the same
    # pass, draws the candidates for centre c. Iteration 0 only draws (its
    # scores and update are ignored), iteration 1 takes its first candidate
    # (the first centre is one draw), iteration k's draws go unused. One
    # loop body, so the passes compile once.
    def add_centre(c, carry):
        indices, closest, candidates = carry

        def potential(candidate):
            return _potential(data, closest, _row(data, candidate), chunk_size)

        # The trials are vmapped: one pass over the rows scores them all, and
        # it compiles faster than a loop over them.
        scores = jax.vmap(potential)(candidates)
        # The candidate of least potential (the first on a tie), carried
        # through the reduction rather than gathered after an argmin, and
        # written without a scatter's index checks: each spares kernels.
        trial = jnp.arange(n_trials, dtype=jnp.int32)
        _, _, best = lax.reduce(
            (scores, trial, candidates),
            (jnp.array(jnp.inf, scores.dtype), jnp.int32(n_trials), jnp.int32(0)),
            _race_winner,
            (0,),
        )
        best = jnp.where(c <= 1, candidates[0], best)
        indices = lax.dynamic_update_index_in_dim(indices, best, c, 0)
        closest, drawn, found = _closer_and_draw(
            data,
            closest,
            _row(data, best),
            chunk_size,
            c == 0,
            c == 1,
            words,
            c * n_trials + jnp.arange(n_trials),
        )
        # When every usable row already sits on a centre, any of them is one
        # of the centres: take the first centre's row again (scikit-learn
        # also falls back to a fixed row there).
        candidates = jnp.where(found, drawn, indices[1])
        return indices, closest, candidates

    indices = jnp.zeros((n_clusters + 1,), jnp.int32)
    weight = data.weights(data.x, data.sample_weight, data.finite_rows)
    candidates = jnp.zeros((n_trials,), jnp.int32)
    indices, _, _ = lax.fori_loop(
        0, n_clusters + 1, add_centre, (indices, weight, candidates)
    )
    indices = indices[1:]
    centres = data.centred(jax.vmap(lambda i: _row(data, i))(indices))
    return centres, indices


def lloyd(
    data: Data, centres: Float[Array, "k d"], max_iter: int, tol: float = 1e-4
) -> tuple[Float[Array, "k d"], Int[Array, ""]]:
    """Weighted Lloyd iterations from ``centres`` (centred coordinates).

    Stops when the total squared centre shift is at most ``tol`` times the
    mean per-feature variance (scikit-learn's rule) or after ``max_iter``.
    An empty cluster keeps its centre. Rows are labelled by
    :func:`nearest_centres`.
    """
    n_clusters = centres.shape[0]
    tolerance = tol * jnp.mean(data.variance)

    def update(centres):
        nearest = nearest_centres(centres)

        def chunk(xc, w, _):
            labels = nearest(xc)
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


def kmeans_labels(data: Data, centres: Float[Array, "k d"]) -> Int[Array, " n"]:
    nearest = nearest_centres(centres)
    return data.map(lambda xc, w, _: nearest(xc))


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
    point's weight (plus sklearn's ``10 * eps``, in units of the mean row
    weight). With ``reg_covar = 0`` the
    covariances come from ``fallback`` instead.
    """
    rows = data.x[indices]
    points = jnp.where(is_finite(rows), data.centred(rows), 0.0)
    weights = data.weights(rows, data.weight_rows(lambda w: w[indices]))
    weights = weights + 10 * jnp.finfo(weights.dtype).eps * data.weight_unit
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
    """Stats of the responsibilities ``resp_fn(xc, rows) -> (resp, about)``
    ``(K, n)``: each row enters the moments as ``xc - about``, the sums and
    scatter are about ``shift``. ``about`` is 0, or where each row's
    responsibility is one-hot, the ``shift`` of its component: the moments
    then stay exact however far the components sit from the data centre."""

    def chunk(xc, w, rows):
        resp, about = resp_fn(xc, rows)
        features = structure.row_features(xc - about)
        return structure.moments(features, resp * w[None, :], jnp.zeros_like(shift))

    counts, sums, scatter = data.sum(chunk)
    zero = jnp.zeros((), counts.dtype)
    return Stats(counts, sums, scatter, shift, zero, data.total_weight, data.n_weighted)


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
        nearest = nearest_centres(centres)

        def labelled(xc, rows):
            labels = nearest(xc)
            return jax.nn.one_hot(labels, k, dtype=dtype).T, centres[labels]

        # Each row's moments about its own centre: exact in float32 for
        # close clusters far from the data centre, where moments about the
        # centre would cancel most of their variance.
        stats = _responsibility_stats(structure, data, centres, labelled)
    else:  # "random", validated by check_init

        def random_resp(xc, rows):
            draw = jax.vmap(
                lambda i: jax.random.uniform(jax.random.fold_in(key, i), (k,), dtype)
            )(rows)
            return (draw / jnp.sum(draw, axis=-1, keepdims=True)).T, 0.0

        stats = _responsibility_stats(
            structure, data, jnp.zeros((k, d), dtype), random_resp
        )
    return m_step(stats, whole_data, reg_covar, max_condition)
