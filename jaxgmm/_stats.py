"""EM as statistics in, parameters out.

:class:`Stats` holds the weighted sufficient statistics of a mixture's
components. Statistics of disjoint row sets add with ``+``, which is what
makes chunked, sharded, batched and streamed EM the same algorithm:
``m_step(e_step_stats(gmm, a) + e_step_stats(gmm, b))`` is one EM step on
the union of ``a`` and ``b``.
"""

from __future__ import annotations

import math
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from . import _linalg
from ._covariance import (
    loses_precision,
    may_lose_precision,
    nearest_centres,
    scatter_loses_precision,
    structure_for,
)
from ._data import Data
from ._gmm import GMM


class Stats(eqx.Module):
    r"""Weighted sufficient statistics of each component.

    With row weights :math:`w_n` and responsibilities :math:`r_{nk}`:

    - ``counts`` ``(K,)``: :math:`\sum_n w_n r_{nk}`
    - ``sums`` ``(K, D)``: :math:`\sum_n w_n r_{nk} (x_n - s_k)`
    - ``scatter``: :math:`\sum_n w_n r_{nk} (x_n - s_k)(x_n - s_k)^T`
      (``(K, D, D)``; ``(K, D)`` diagonal only for diag and spherical)
    - ``shift`` ``(K, D)``: the :math:`s_k` the sums are taken about (the
      current means, or zero), so float32 keeps the scatter of far-off data
    - ``log_likelihood``: :math:`\sum_n w_n \log p(x_n)`
    - ``total_weight``: :math:`\sum_n w_n`
    - ``n_weighted``: the number of rows with :math:`w_n > 0`

    Coordinates are those of the :class:`~jaxgmm._data.Data` they came from
    (centred on the data). ``+`` adds every field but ``shift``, which both
    sides must share.
    """

    counts: Float[Array, " k"]
    sums: Float[Array, "k d"]
    scatter: Array
    shift: Float[Array, "k d"]
    log_likelihood: Float[Array, ""]
    total_weight: Float[Array, ""]
    n_weighted: Float[Array, ""]

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            self.counts + other.counts,
            self.sums + other.sums,
            self.scatter + other.scatter,
            self.shift,
            self.log_likelihood + other.log_likelihood,
            self.total_weight + other.total_weight,
            self.n_weighted + other.n_weighted,
        )

    def scale(self, factor) -> Stats:
        """Every additive field times ``factor`` (for stepwise EM blending)."""
        return Stats(
            self.counts * factor,
            self.sums * factor,
            self.scatter * factor,
            self.shift,
            self.log_likelihood * factor,
            self.total_weight * factor,
            self.n_weighted * factor,
        )

    @property
    def weight_unit(self) -> Float[Array, ""]:
        """Mean weight of a row that is there: the unit in which scikit-learn's
        ``10 * eps`` is added to each count, so that multiplying every weight
        by one number changes no fit (1 for unit weights, as in sklearn)."""
        return self.total_weight / self.n_weighted


# Up to this many components the per-row maximum is taken elementwise.
ELEMENTWISE_MAX_COMPONENTS = 3


def _max_over_components(log_prob: Float[Array, "k n"]) -> Float[Array, " n"]:
    """``max(log_prob, axis=0)``. For K <= 3 as (at most two) elementwise
    maxima, which XLA fuses with the log-densities instead of writing them
    out for a separate reduction: ~5% faster EM for K=2 and 3 (10,000 vmapped
    fits, and N=1e6 with D=2). From K=4 on, one reduction: the fused form
    recomputes the log-densities, which then costs more (K=4: 6% slower,
    K=8: 40%)."""
    if log_prob.shape[0] > ELEMENTWISE_MAX_COMPONENTS:
        return jnp.max(log_prob, axis=0)
    return _linalg.elementwise_reduce(jnp.maximum, log_prob, 0)


def e_step_row_width(covariance_type: str, x) -> int | None:
    """Features per row that the E-step computes on ``x`` ``(N, D)`` (2D for
    diag and spherical), for :func:`~jaxgmm._data.make_data` to size its row
    blocks; None where the E-step takes no blocks: covariance types without
    ``e_step_in_blocks`` (full, tied), and at most ``UNROLL_MAX_DIM``
    features, whose E-step works on per-component columns and got slower in
    blocks (N=1e6, D=2, K=8: 0.026 s per iteration against 0.011 s)."""
    structure = structure_for(covariance_type)
    if x.shape[-1] <= _linalg.UNROLL_MAX_DIM or not structure.e_step_in_blocks:
        return None
    row = jax.ShapeDtypeStruct((1, x.shape[-1]), x.dtype)
    features = jax.eval_shape(structure.row_features, row)
    return sum(leaf.size for leaf in jax.tree.leaves(features))


def e_step_stats(gmm: GMM, data: Data, anchored=None) -> Stats:
    """E-step: responsibilities of every row, summed into :class:`Stats`.

    ``gmm`` must be in the data's centred coordinates. With many features
    the distances and the scatter are matrix products of per-row features
    about the data centre, which lose about ``eps`` times the squared
    Mahalanobis distance of the centre from a component. The anchored
    E-step (``anchored_parts``) takes each row relative to its nearest mean
    instead and accumulates each component's scatter about its current
    mean: the loss then grows with the distance, not its square, at
    1.5-2.5x the cost. ``anchored``: True or False takes one or the other;
    None takes the anchored one where the matrix products would lose more
    than ``_covariance.PRECISION_LIMIT`` (float32 components some hundred
    standard deviations from the centre, see ``loses_precision``), as a
    ``lax.cond``.
    """
    if anchored is None:
        return _chosen_e_step(gmm, data)[0]
    return _e_step_stats(gmm, data, anchored=anchored and may_lose_precision(gmm.means))


def _chosen_e_step(gmm: GMM, data: Data):
    """``(stats, whether they are anchored)``: a traced bool, or the Python
    ``False`` where the anchored E-step is never needed (see
    ``may_lose_precision``)."""
    if not may_lose_precision(gmm.means):
        return _e_step_stats(gmm, data, anchored=False), False
    choice = loses_precision(gmm.structure, gmm.means, gmm.precisions_cholesky)
    stats = lax.cond(
        choice,
        lambda gmm: _e_step_stats(gmm, data, anchored=True),
        lambda gmm: _e_step_stats(gmm, data, anchored=False),
        gmm,
    )
    return stats, choice


def _e_step_stats(gmm: GMM, data: Data, anchored: bool) -> Stats:
    structure = gmm.structure
    means, factors = gmm.means, gmm.precisions_cholesky
    shift = means if anchored else structure.scatter_shift(means)
    # Made once for the pass: the check it makes on the means.
    nearest = nearest_centres(means) if anchored else None

    def distances_and_moments(xc):
        if anchored:
            return structure.anchored_parts(xc, means, factors, nearest)
        # Computed once: the distances and the moments read the same features.
        features = structure.row_features(xc)
        squared = structure.squared_mahalanobis(features, means, factors)
        return squared, partial(structure.moments, features, shift=shift)

    def chunk(xc, weight, _):
        squared, moments = distances_and_moments(xc)
        log_prob = gmm.joint_log_prob_from_squared(squared)
        # One exp per (component, row) serves both the log-sum-exp and the
        # responsibilities.
        peak = _max_over_components(log_prob)
        peak = jnp.where(_linalg.is_finite(peak), peak, 0.0)
        # Responsibilities below eps**2 of a row's largest change no statistic
        # at this precision; flushing them to exact zero keeps denormal floats
        # (exp(-100) in float32), which are ~100x slower, out of the GEMMs.
        relative = log_prob - peak[None, :]
        floor = 2.0 * math.log(jnp.finfo(relative.dtype).eps)
        unnormalised = jnp.where(relative > floor, jnp.exp(relative), 0.0)
        total = jnp.sum(unnormalised, axis=0)
        log_norm = peak + jnp.log(total)
        scale = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)
        # Responsibilities times row weights: unnormalised * scale[None, :].
        counts, sums, scatter = moments(unnormalised, row_scale=scale)
        # A row of weight 0 adds 0 even where its density is 0 (log_norm is
        # -inf), and its derivative with respect to the weight where it is not.
        counted = (weight > 0) | _linalg.is_finite(log_norm)
        log_likelihood = jnp.sum(jnp.where(counted, weight * log_norm, 0.0))
        return counts, sums, scatter, log_likelihood

    # Row blocks (see Data.sum) for the matrix-product pass only: the
    # anchored one is rare, and one call per chunk keeps its compile time.
    counts, sums, scatter, log_likelihood = data.sum(chunk, in_blocks=not anchored)
    # The total weight does not change between iterations: make_data found it.
    return Stats(
        counts,
        sums,
        scatter,
        shift,
        log_likelihood,
        data.total_weight,
        data.n_weighted,
    )


def m_step(
    stats: Stats,
    previous: GMM,
    reg_covar,
    max_condition=None,
) -> GMM:
    r"""M-step: maximum-likelihood parameters from :class:`Stats`.

    Follows scikit-learn: :math:`n_k` gets ``10 * eps`` added (in units of
    the mean row weight, ``stats.weight_unit``: 1 for unit weights), weights are
    :math:`n_k / \sum_j n_j`, ``reg_covar`` is added to each covariance's
    diagonal, and with ``max_condition`` each covariance's eigenvalues are
    raised to at least ``largest / max_condition``.

    A component whose weight has fallen to (almost) zero keeps its mean and
    covariance from ``previous``; its weight becomes (almost) zero
    (``10 * eps`` relative), so it stays harmless and can regain data in
    later iterations. A component whose new covariance has no finite
    Cholesky factor (not positive definite) keeps its previous covariance
    but takes its new mean and weight. With ``tied`` covariances the shared
    matrix is kept only if every component is kept or it is not positive
    definite. No NaN is produced either way.
    """
    structure = previous.structure
    dtype = stats.counts.dtype
    eps = jnp.finfo(dtype).eps
    counts = stats.counts + 10 * eps * stats.weight_unit
    offsets = stats.sums / counts[:, None]
    means = stats.shift + offsets
    covariances = structure.covariances_from_scatter(
        stats.scatter, counts, offsets, reg_covar, max_condition
    )
    precisions_cholesky = structure.precisions_cholesky_from_covariances(covariances)
    keep = _empty(stats) | ~_linalg.all_finite(means)
    means = jnp.where(keep[:, None], previous.means, means)
    precisions_cholesky = structure.keep_previous(
        precisions_cholesky, previous.precisions_cholesky, keep
    )
    weights = counts / jnp.sum(counts)
    return GMM.from_precisions_cholesky(
        weights, means, precisions_cholesky, previous.covariance_type
    )


def _empty(stats: Stats):
    """``(K,)``: components whose weight is (almost) zero, at most ``eps`` of
    the total. As ``counts / eps`` (a power of two: exact) rather than
    ``total * eps``, which XLA would hoist out of the EM loop into a kernel of
    its own."""
    return stats.counts * (1 / jnp.finfo(stats.counts.dtype).eps) <= (
        stats.total_weight
    )


def em_iteration(
    gmm: GMM, data: Data, reg_covar, max_condition, *, anchored=None
) -> tuple[GMM, Array, Array | bool]:
    """One EM iteration: ``(new_gmm, mean log-likelihood of gmm, lost)``.

    ``anchored``: True or False takes the anchored or the matrix-product
    E-step; None chooses from the current parameters (a ``lax.cond``, see
    :func:`e_step_stats`).

    ``lost`` is true where the matrix-product E-step was taken and lost
    more than ``PRECISION_LIMIT``: in its distances (``loses_precision`` of
    ``gmm``, unless that chose the anchored one) or in its moments, where
    the scatter about the origin cancelled that much of a new variance
    (``scatter_loses_precision``: the new covariances can be far tighter
    than the current ones). The iteration should then be made with the
    anchored E-step. ``lost`` is the Python ``False`` where the anchored
    E-step was taken or is never needed.
    """
    possible = may_lose_precision(gmm.means)
    if anchored is None:
        stats, used = _chosen_e_step(gmm, data)
    else:
        used = bool(anchored) and possible
        stats = _e_step_stats(gmm, data, anchored=used)
    # make_data keeps the total weight positive, so it divides as it is.
    log_likelihood = stats.log_likelihood / data.total_weight
    new = m_step(stats, gmm, reg_covar, max_condition)
    if used is True or not possible:
        return new, log_likelihood, False
    lost = scatter_loses_precision(
        gmm.structure,
        stats.counts,
        stats.sums,
        stats.scatter,
        reg_covar,
        ~_empty(stats),
    )
    if used is False:  # chosen statically: the distances were not checked
        distances = loses_precision(gmm.structure, gmm.means, gmm.precisions_cholesky)
        return new, log_likelihood, lost | distances
    return new, log_likelihood, ~used & lost


def em_iteration_redone(
    gmm: GMM, data: Data, reg_covar, max_condition
) -> tuple[GMM, Array]:
    """One EM iteration, made again with the anchored E-step (a
    ``lax.cond``) where the first attempt lost precision (see
    :func:`em_iteration`): for ``em_step`` and ``em_steps``, which return
    parameters only."""
    new, log_likelihood, redo = em_iteration(gmm, data, reg_covar, max_condition)
    if redo is False:
        return new, log_likelihood

    def again():
        return em_iteration(gmm, data, reg_covar, max_condition, anchored=True)[:2]

    return lax.cond(redo, again, lambda: (new, log_likelihood))
