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
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from . import _linalg
from ._covariance import loses_precision
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


def e_step_stats(gmm: GMM, data: Data, batch_axes: tuple[str, ...] = ()) -> Stats:
    """E-step: responsibilities of every row, summed into :class:`Stats`.

    ``gmm`` must be in the data's centred coordinates. With many features
    the distances and the scatter are matrix products of per-row features
    about the data centre, which lose about ``eps`` times the squared
    Mahalanobis distance of the centre from a component. Where that is more
    than ``_covariance.PRECISION_LIMIT`` (float32 components some hundred
    standard deviations from the centre, see ``loses_precision``), the
    E-step takes each row relative to its nearest mean instead
    (``anchored_parts``) and accumulates each component's scatter about its
    current mean: the loss then grows with the distance, not its square, at
    1.5-2.5x the cost.

    ``batch_axes`` names the ``vmap`` axes (``axis_name``) this call is
    batched over, if any: the choice between the two is then made once for
    the whole batch (a ``lax.cond`` with a batched predicate would run both).
    """
    anchored = loses_precision(gmm.structure, gmm.means, gmm.precisions_cholesky)
    if anchored is False:
        return _e_step_stats(gmm, data, anchored=False)
    if batch_axes:
        anchored = lax.pmax(anchored.astype(jnp.int32), batch_axes) > 0
    return lax.cond(
        anchored,
        lambda gmm: _e_step_stats(gmm, data, anchored=True),
        lambda gmm: _e_step_stats(gmm, data, anchored=False),
        gmm,
    )


def _e_step_stats(gmm: GMM, data: Data, anchored: bool) -> Stats:
    structure = gmm.structure
    means, factors = gmm.means, gmm.precisions_cholesky
    shift = means if anchored else structure.scatter_shift(means)

    def distances_and_moments(xc):
        if anchored:
            return structure.anchored_parts(xc, means, factors)
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

    counts, sums, scatter, log_likelihood = data.sum(chunk)
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
    # counts / eps (a power of two: exact) rather than total * eps, which
    # XLA would hoist out of the EM loop into a kernel of its own.
    empty = stats.counts * (1 / eps) <= stats.total_weight
    keep = empty | ~_linalg.all_finite(means)
    means = jnp.where(keep[:, None], previous.means, means)
    precisions_cholesky = structure.keep_previous(
        precisions_cholesky, previous.precisions_cholesky, keep
    )
    weights = counts / jnp.sum(counts)
    return GMM.from_precisions_cholesky(
        weights, means, precisions_cholesky, previous.covariance_type
    )


def em_iteration(
    gmm: GMM, data: Data, reg_covar, max_condition, batch_axes: tuple[str, ...] = ()
) -> tuple[GMM, Array]:
    """One EM iteration: ``(new_gmm, mean log-likelihood of gmm)``."""
    stats = e_step_stats(gmm, data, batch_axes)
    # make_data keeps the total weight positive, so it divides as it is.
    log_likelihood = stats.log_likelihood / data.total_weight
    return m_step(stats, gmm, reg_covar, max_condition), log_likelihood
