"""One small structure per covariance type.

Every covariance-specific formula of jaxgmm lives here: storage (the Cholesky
factor of the precision, as scikit-learn keeps it), log-determinant, squared
Mahalanobis distances, the scatter statistic EM accumulates, the M-step
estimate with its safeguards, sampling and the parameter count. The rest of
the package looks a structure up once with :func:`structure_for` and never
branches on the covariance type.

Array shapes follow scikit-learn: ``full`` (K, D, D), ``diag`` (K, D),
``spherical`` (K,), ``tied`` (D, D), for the covariances and for their
precision Cholesky factors alike.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from . import _linalg


class CovarianceStructure:
    """The interface each covariance type implements (all static methods)."""

    name: ClassVar[str]
    #: Whether the EM iteration's E-step takes large data in row blocks
    #: (``_data.BLOCKS_PER_CHUNK``). Each block is compiled on its own:
    #: ~0.06 s of compile time each. The diagonal structures' iteration gains
    #: most (N=1e6, D=64, K=32 diag: 0.129-0.133 s instead of 0.142-0.155 s);
    #: full and tied gain too (D=16, K=16 full: 0.098-0.105 s instead of
    #: 0.122-0.126 s) but their fits already compile longer, and blocks would
    #: take a kmeans++ full fit's compile time from ~1.7 s to ~2.25 s.
    e_step_in_blocks: ClassVar[bool] = False

    @staticmethod
    def scatter_shift(means: Float[Array, "k d"]) -> Float[Array, "k d"]:
        """The point each component's scatter is accumulated about.

        The current means where the statistics are formed from per-component
        differences (exact in float32 however far a component sits from the
        data centre); zero (the data centre) where they are formed by matrix
        products of per-row features, which is faster but loses about
        ``eps * (distance / std)**2`` to cancellation.
        """
        ...

    @staticmethod
    def covariance_shape(n_components: int, n_features: int) -> tuple[int, ...]: ...

    @staticmethod
    def n_covariance_parameters(n_components: int, n_features: int) -> int: ...

    @staticmethod
    def precisions_cholesky_from_covariances(covariances: Array) -> Array: ...

    @staticmethod
    def covariances_from_precisions_cholesky(precisions_cholesky: Array) -> Array: ...

    @staticmethod
    def log_det_precisions_cholesky(
        precisions_cholesky: Array, n_components: int, n_features: int
    ) -> Float[Array, " k"]: ...

    @staticmethod
    def row_features(x: Float[Array, "n d"]) -> Array:
        """Per-row features that the distances and the moments both read.

        The columns of ``x`` as ``(D, n)`` where both work on per-component
        differences (up to ``UNROLL_MAX_DIM`` features); otherwise what the
        matrix products need (the pair ``(x, x**2)``, each ``(n, D)``, for
        diag and spherical: two products each instead of a concatenated copy;
        the quadratic features as ``(p, n)`` for full and tied). The E-step
        computes them once per chunk and passes them to both: XLA does not
        reliably merge two computations of them inside loops.
        """
        ...

    @staticmethod
    def squared_mahalanobis(
        features: Array,
        means: Float[Array, "k d"],
        precisions_cholesky: Array,
    ) -> Float[Array, "k n"]:
        """Squared Mahalanobis distance of every row to every component."""
        ...

    @staticmethod
    def moments(
        features: Array,
        resp: Float[Array, "k n"],
        shift: Array,
        row_scale: Float[Array, " n"] | None = None,
    ) -> tuple[Float[Array, " k"], Float[Array, "k d"], Array]:
        """``(counts, sums, scatter)`` of the rows about ``shift`` (see
        ``Stats``), each row weighted by ``resp * row_scale[None, :]`` (by
        ``resp`` when ``row_scale`` is None; see :func:`_row_weights`)."""
        ...

    @staticmethod
    def cancellation(
        means: Float[Array, "k d"], precisions_cholesky: Array
    ) -> Float[Array, " k"]:
        r"""Scale of the terms the expanded (matrix-product) distances and
        scatter cancel, relative to one unit of squared Mahalanobis distance:
        :math:`|\mu_k|^T |\Sigma_k^{-1}| |\mu_k|` (absolute values
        entrywise), with the means in the coordinates the rows are in.

        Those forms lose about ``eps`` times this much (see
        :func:`loses_precision`).
        """
        ...

    @staticmethod
    def scatter_diagonal(scatter: Array) -> Float[Array, "k d"]:
        """The per-feature entries of a ``(K, ...)`` scatter statistic."""
        ...

    @staticmethod
    def anchored_parts(
        x: Float[Array, "n d"],
        means: Float[Array, "k d"],
        precisions_cholesky,
        nearest=None,
    ):
        """What an E-step needs, computed relative to an anchor per row (the
        nearest mean) so that little cancels: ``(squared, moments)``, the
        squared Mahalanobis distances ``(K, n)`` and ``moments(resp,
        row_scale) -> (counts, sums, scatter)`` with the sums and scatter
        about ``means`` (see :meth:`moments`). The precision lost grows with
        the distance of the components from the rows' origin, not with its
        square as in :meth:`squared_mahalanobis` and :meth:`moments`, for one
        more matrix product (the anchors) and a small one (see
        :func:`_anchored_diagonal_parts`, :func:`_anchored_quadratic_parts`).
        ``nearest``: ``nearest_centres(means)``, made once for a pass over
        many chunks (made here when None).
        For many features only: up to ``UNROLL_MAX_DIM`` the usual forms are
        exact already.
        """
        ...

    @staticmethod
    def covariances_from_scatter(
        scatter: Array,
        counts: Float[Array, " k"],
        offsets: Float[Array, "k d"],
        reg_covar: float,
        max_condition: float | None,
    ) -> Array: ...

    @staticmethod
    def sampling_factor(precisions_cholesky: Array) -> Array: ...

    @staticmethod
    def scale_noise(
        factor: Array, noise: Float[Array, "n d"], labels: Int[Array, " n"]
    ) -> Float[Array, "n d"]: ...

    @staticmethod
    def keep_previous(new: Array, previous: Array, keep: Bool[Array, " k"]) -> Array:
        """Per component: ``previous`` where ``keep`` or where ``new`` is not finite."""
        ...

    @staticmethod
    def check_precisions_cholesky(
        factor: np.ndarray, n_components: int, n_features: int
    ):
        """Eager validation; raises ``ValueError`` naming ``precisions_cholesky``."""
        ...

    @staticmethod
    def to_full(covariances: Array, n_components: int, n_features: int) -> Array:
        """The same covariances as ``(K, D, D)`` matrices."""
        ...

    @staticmethod
    def identity(n_components: int, n_features: int, dtype) -> Array:
        """Identity covariances (which are also their own precision factors)."""
        ...

    @staticmethod
    def check_covariances(covariances: np.ndarray, n_components: int, n_features: int):
        """Eager validation; raises ``ValueError`` naming ``covariances``."""
        ...


def _columns(x: Float[Array, "n d"]) -> Float[Array, "d n"]:
    """The features of a few-feature ``x`` as contiguous columns ``(D, n)``.

    Formed by a matrix product with the identity (exact), which XLA computes
    into a buffer of its own. Inside a chunk loop that keeps the chunk's
    dynamic slice out of the elementwise passes that read the columns: XLA's
    CPU code reloads a dynamic slice's start index for every element, which
    stops those loops from vectorising (2-3x slower E-steps for D=2). Without
    a loop the passes still read contiguous rows instead of every D-th
    value: 10,000 vmapped fits are 9% faster than with a fused ``x.T``.
    """
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.einsum("de,ne->dn", eye, x, precision=lax.Precision.HIGHEST)


def _column_differences(columns: Float[Array, "d n"], centres: Float[Array, "k d"]):
    """``[x[:, d] - centres[:, d]]`` per feature, each ``(K, n)``: rows innermost.

    For a small number of features, per-feature ``(K, n)`` arrays keep the
    long axis innermost, so XLA vectorises across rows (and across a vmapped
    batch of data sets) instead of over a tiny trailing D.
    """
    return [columns[d][None, :] - centres[:, d][:, None] for d in range(len(columns))]


def _diagonal_features(x: Float[Array, "n d"]):
    """Columns ``(D, n)`` for small D, else the pair ``(x, x**2)``.

    The pair feeds two matrix products per step; concatenating it into one
    ``(n, 2D)`` operand cost a copy that took longer than the products save
    (N=1e6, D=64, K=32: ~4% of an iteration)."""
    if x.shape[-1] <= _linalg.UNROLL_MAX_DIM:
        return _columns(x)
    return x, x * x


def _row_weights(resp: Float[Array, "k n"], row_scale: Array | None):
    """``(resp * row_scale, counts)``: the weights of the rows in the
    moments, in the factored form the E-step has them (unnormalised
    responsibilities and, per row, weight / normaliser).

    The counts are ``resp @ row_scale``, read from ``resp``. Summing the
    weighted product instead made XLA write that ``(K, n)`` product out as a
    kernel of its own, which ran on one thread while the other waited:
    N=1e6, D=64, K=32 diag 0.141 s per EM iteration instead of 0.155 s
    (alternating runs); D=16, K=16 full unchanged.
    """
    if row_scale is None:
        return resp, _linalg.row_sums(resp)
    return resp * row_scale[None, :], _linalg.row_sums(resp, row_scale)


def _small_moments(
    weighted_resp: Float[Array, "k n"],
    diff: list[Array],
    pairs: list[tuple[int, int]],
):
    """``(counts, sums, {pair: sum_n r_kn diff_i diff_j})`` for small D.

    ``diff`` holds the ``(K, n)`` (or broadcastable) per-feature offsets. All
    sums come from one variadic reduction over the rows: one pass, where
    separate sums would each write their product out and read it back.
    """
    d = len(diff)
    totals = _linalg.sums_over_rows(
        [weighted_resp]
        + [weighted_resp * column for column in diff]
        + [weighted_resp * diff[i] * diff[j] for i, j in pairs]
    )
    sums = jnp.stack(totals[1 : d + 1], -1)
    return totals[0], sums, dict(zip(pairs, totals[d + 1 :]))


def _diagonal_moments(features: Array, resp: Array, row_scale: Array | None, d: int):
    """``(sum_n r_kn, sum_n r_kn x_n, sum_n r_kn x_n**2)`` about zero, with
    ``r = resp * row_scale``."""
    if d <= _linalg.UNROLL_MAX_DIM:
        columns = [features[i][None, :] for i in range(d)]
        pairs = [(i, i) for i in range(d)]
        weighted, _ = _row_weights(resp, row_scale)
        counts, sums, squares = _small_moments(weighted, columns, pairs)
        return counts, sums, jnp.stack([squares[pair] for pair in pairs], -1)
    x, squares = features
    weighted, counts = _row_weights(resp, row_scale)
    sums, scatter = _linalg.grouped_matmul(weighted, (x, squares))
    return counts, sums, scatter


def _squared_norms(y: Float[Array, "n d"]) -> Float[Array, " n"]:
    """``sum(y**2, axis=-1)`` as a matrix-vector product (XLA:CPU sums a
    minor axis one element at a time)."""
    return (y * y) @ jnp.ones(y.shape[-1:], y.dtype)


def _entrywise_quadratic(
    means: Float[Array, "k d"], precisions_cholesky: Array
) -> Float[Array, " k"]:
    """``|mu_k|^T |P_k| |mu_k|`` with ``P_k = L_k L_k^T`` for precision
    factors ``L_k`` (``(K, D, D)``, or one shared ``(D, D)``): the magnitude
    of the terms ``(x - mu)^T P (x - mu)`` expands into. (``|| |L_k|^T
    |mu_k| ||**2`` would spare forming ``P`` but ignores the cancellation
    within it: 300x larger for the full-covariance benchmark's mixture.)"""
    precisions = precisions_cholesky @ _linalg.transpose(precisions_cholesky)
    magnitude = jnp.abs(means)
    spec = "ki,kij,kj->k" if precisions.ndim == 3 else "ki,ij,kj->k"
    return jnp.einsum(spec, magnitude, jnp.abs(precisions), magnitude)


def _anchored_diagonal_parts(
    x: Float[Array, "n d"],
    means: Float[Array, "k d"],
    precisions: Float[Array, "k d"],
    nearest=None,
):
    r"""``anchored_parts`` for diagonal precisions ``P`` ``(K, D)`` (diag, and
    spherical with its one precision repeated), as matrix products.

    Each row is taken relative to an anchor: the mean :math:`\mu_a` nearest
    to it (Euclidean; any nearby mean serves). With :math:`z = x - \mu_a`,
    :math:`v = z (z + 2 \mu_a)` and :math:`\Delta_{ak} = \mu_a - \mu_k`,

    .. math::
        \sum_d P_{kd} (x_d - \mu_{kd})^2
            = v \cdot P_k - 2 z \cdot (P_k \mu_k) + \Delta_{ak}^T P_k \Delta_{ak},

    and about :math:`\mu_k` the sums and scatter are
    :math:`\sum_n r_{nk} z_n + \sum_a R_{ka} \Delta_{ak}` and
    :math:`\sum_n r_{nk} v_n - 2 \mu_k \sum_n r_{nk} z_n + \sum_a R_{ka}
    \Delta_{ak}^2` with :math:`R_{ka}` the responsibility of component
    :math:`k` summed over the rows anchored at :math:`a`. The terms that
    cancel are of size :math:`|z| |\mu|` rather than :math:`|\mu|^2`: the
    precision lost grows with the distance from the origin, not its square,
    at the cost of one more product for the anchors and one for :math:`R`
    (N=1e6, D=64, K=32: 0.34 s per EM iteration against 0.15 s, and 1.5 s
    for per-component differences ``x - mu_k``).
    """
    anchor, at_anchor, one_hot = _anchors(x, means, nearest)
    z = x - at_anchor
    v = z * (z + 2.0 * at_anchor)
    delta = means[:, None, :] - means[None, :, :]  # (a, k, D): mu_a - mu_k
    # (a, k): Delta_ak^T P_k Delta_ak, exact (zero on the diagonal).
    between = jnp.einsum("akd,kd->ak", delta * delta, precisions)
    squared = precisions @ v.T - 2.0 * (precisions * means) @ z.T + between[anchor].T

    def moments(resp, row_scale=None):
        weighted, counts = _row_weights(resp, row_scale)
        rz, rv = weighted @ z, weighted @ v
        by_anchor = weighted @ one_hot  # (k, a)
        sums = rz + jnp.einsum("ka,akd->kd", by_anchor, delta)
        scatter = rv - 2.0 * means * rz + jnp.einsum("ka,akd->kd", by_anchor, delta**2)
        return counts, sums, scatter

    return squared, moments


def _anchors(x: Float[Array, "n d"], means: Float[Array, "k d"], nearest=None):
    """``(index, mean, one_hot)`` of each row's anchor, its nearest mean
    (:func:`nearest_centres`). The anchored forms lose about ``eps |z| |mu|``
    with ``z`` the row's offset from its anchor: a nearby mean other than
    the nearest (two close means far from the data centre, which the
    product form of the distances mixes up) makes ``|z|`` and the loss
    larger (N=400, D=6, two clusters of spread 0.02 at 1e4, 1 apart: the
    anchored fit's variances 1-5% off instead of 0.3-2%)."""
    index = (nearest or nearest_centres(means))(x)
    return index, means[index], jax.nn.one_hot(index, means.shape[0], dtype=x.dtype)


def nearest_centres(centres: Float[Array, "k d"]):
    r"""``nearest(xc)``: the index (int32) of each row's nearest centre by
    squared Euclidean distance, rows and centres in centred coordinates.

    The distances are scikit-learn's matrix-product form
    :math:`|c_k|^2 - 2 x \cdot c_k`, which in float32 loses about
    :math:`\epsilon |c|^2`: with centres far from the data centre and close
    to one another (two tight clusters 1 apart at 1e4) rows get the wrong
    centre. Where that loss exceeds ``PRECISION_LIMIT`` of the smallest
    squared distance between two distinct centres (checked here, once),
    each row is compared again relative to the centre the product form
    chose, its anchor :math:`a` (a ``lax.cond`` in ``nearest``): with
    :math:`z = x - c_a`,
    :math:`|x - c_k|^2 - |x - c_a|^2 = |c_a - c_k|^2 - 2 z \cdot (c_k - c_a)`,
    whose rounding grows with :math:`|z| |c|` instead.
    """
    if jnp.dtype(centres.dtype).itemsize > 4:
        return partial(_nearest, centres=centres)
    gaps = _centre_gaps(centres)
    distinct = jnp.where(gaps > 0, gaps, jnp.inf)
    lost = jnp.finfo(centres.dtype).eps * jnp.max(_squared_norms(centres))
    needed = lost > PRECISION_LIMIT * jnp.min(distinct)

    def nearest(xc):
        anchor = _nearest(xc, centres)
        return lax.cond(
            needed,
            lambda: _nearest_anchored(xc, centres, gaps, anchor),
            lambda: anchor,
        )

    return nearest


def _centre_gaps(centres: Float[Array, "k d"]) -> Float[Array, "k k"]:
    """Squared distances between centres, from their differences (one centre
    at a time: no ``(K, K, D)`` temporary)."""
    return lax.map(lambda c: jnp.sum((centres - c) ** 2, axis=-1), centres)


def _nearest(xc: Float[Array, "n d"], centres: Float[Array, "k d"]) -> Array:
    # |x|^2 is common to every centre; (K, n): rows innermost.
    closeness = 2.0 * (centres @ xc.T) - _squared_norms(centres)[:, None]
    return jnp.argmax(closeness, axis=0).astype(jnp.int32)


def _nearest_anchored(xc, centres, gaps, anchor) -> Array:
    z = xc - centres[anchor]
    # |c_a - c_k|^2 - 2 z.c_k (the row's own -2 z.c_a is common to every k),
    # (K, n) as in _nearest; gaps is symmetric.
    squared = gaps[:, anchor] - 2.0 * (centres @ z.T)
    return jnp.argmin(squared, axis=0).astype(jnp.int32)


def _anchored_quadratic_parts(
    x: Float[Array, "n d"],
    means: Float[Array, "k d"],
    precisions_cholesky,
    nearest=None,
):
    r"""``anchored_parts`` for full precisions (``(K, D, D)`` factors; tied
    tiles its one factor), with the features of the matrix-product form.

    With the anchor :math:`\mu_a` of a row, :math:`z = x - \mu_a` and
    :math:`\Delta_{ak} = \mu_a - \mu_k`,
    :math:`(x - \mu_k)^T P_k (x - \mu_k) = \sum_{ij} P_{k,ij} w_{ij}
    - 2 z^T P_k \mu_k + \Delta_{ak}^T P_k \Delta_{ak}` with
    :math:`w_{ij} = z_i x_j + \mu_{a,i} z_j` (symmetric in :math:`i, j`
    where it counts): the per-row features ``[z, w_ij (i <= j)]`` take the
    place of ``[x, x_i x_j]`` and meet the same coefficients. About
    :math:`\mu_k`, the sums are :math:`\sum_n r_{nk} z_n + \sum_a R_{ka}
    \Delta_{ak}` and the scatter
    :math:`\sum_n r_{nk} w_n - \mu_k (\sum_n r_{nk} z_n)^T - (\ldots)^T
    + \sum_a R_{ka} \Delta_{ak} \Delta_{ak}^T`, where :math:`R_{ka}` sums
    component :math:`k`'s responsibilities over the rows anchored at
    :math:`a`.
    """
    d = means.shape[-1]
    anchor, at_anchor, one_hot = _anchors(x, means, nearest)
    z = x - at_anchor
    # Feature-major, as quadratic_features: every feature a product of rows.
    eye = jnp.eye(d, dtype=x.dtype)
    zt, xt, at = (
        lax.dot_general(eye, a, (((1,), (1,)), ((), ()))) for a in (z, x, at_anchor)
    )
    rows, cols = np.triu_indices(d)
    features = jnp.concatenate([zt, zt[rows] * xt[cols] + at[rows] * zt[cols]])
    precisions = _linalg.matmul(
        precisions_cholesky, _linalg.transpose(precisions_cholesky)
    )
    coefficients, _ = _quadratic_coefficients(means, precisions)
    delta = means[:, None, :] - means[None, :, :]  # (a, k, D): mu_a - mu_k
    between = jnp.einsum("akd,kde,ake->ak", delta, precisions, delta)
    squared = coefficients @ features + between[anchor].T

    def moments(resp, row_scale=None):
        weighted, counts = _row_weights(resp, row_scale)
        first = weighted @ features.T
        rz = first[:, :d]
        by_anchor = weighted @ one_hot  # (k, a)
        sums = rz + jnp.einsum("ka,akd->kd", by_anchor, delta)
        cross = means[:, :, None] * rz[:, None, :]
        scatter = (
            _linalg.symmetric_from_upper(first[:, d:], d)
            - cross
            - _linalg.transpose(cross)
            + jnp.einsum("ka,akd,ake->kde", by_anchor, delta, delta)
        )
        return counts, sums, scatter

    return squared, moments


def _quadratic_coefficients(means: Float[Array, "k d"], precisions: Array):
    """``(coefficients, linear)``: ``[-2 P mu, P_ii, 2 P_ij (i < j)]`` per
    component, which meet the features ``[x, x_i x_j (i <= j)]``, and ``P mu``."""
    linear = jnp.einsum("kde,ke->kd", precisions, means)
    coefficients = jnp.concatenate(
        [-2.0 * linear, _linalg.upper_entries(precisions, off_diagonal_scale=2.0)],
        axis=-1,
    )
    return coefficients, linear


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...], kind: str):
    if array.shape != shape:
        raise ValueError(
            f"`{name}` must have shape {shape} for covariance_type={kind!r}, "
            f"got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values")


def _check_spd(name: str, matrices: np.ndarray):
    matrices = np.asarray(matrices, dtype=np.float64)
    scale = np.maximum(np.abs(matrices).max(axis=(-1, -2), keepdims=True), 1e-300)
    asymmetry = np.abs(matrices - np.swapaxes(matrices, -1, -2)) / scale
    if np.any(asymmetry > 1e-5):
        raise ValueError(f"`{name}` must be symmetric")
    eigenvalues = np.linalg.eigvalsh(matrices)
    if np.any(eigenvalues <= 0):
        raise ValueError(f"`{name}` must be positive definite")


def _check_factor(name: str, factor: np.ndarray, shape, kind: str, triangular: bool):
    """A precision Cholesky factor: right shape, finite, positive diagonal."""
    _check_shape(name, factor, shape, kind)
    if triangular:
        if np.any(np.tril(factor, -1) != 0):
            raise ValueError(f"`{name}` must be upper triangular for {kind!r}")
        diagonal = np.diagonal(factor, axis1=-2, axis2=-1)
    else:
        diagonal = factor
    if np.any(diagonal <= 0):
        raise ValueError(f"`{name}` must have a positive diagonal")


def _check_positive(name: str, values: np.ndarray):
    if np.any(values <= 0):
        raise ValueError(f"`{name}` must be positive")


class Full(CovarianceStructure):
    """Full covariances.

    For up to ``UNROLL_MAX_DIM`` features the Mahalanobis distances and the
    scatter come from per-component differences ``x - mu_k``. For more
    features both are matrix products with the per-row features
    ``[x, x_i x_j (i <= j)]`` (the Gaussian's natural parameters), which
    needs ~40% fewer operations than whitening every row with every factor
    and runs as large GEMMs.
    """

    name = "full"

    @staticmethod
    def scatter_shift(means):
        if means.shape[-1] <= _linalg.UNROLL_MAX_DIM:
            return means
        return jnp.zeros_like(means)

    @staticmethod
    def covariance_shape(n_components, n_features):
        return (n_components, n_features, n_features)

    @staticmethod
    def n_covariance_parameters(n_components, n_features):
        return n_components * n_features * (n_features + 1) // 2

    @staticmethod
    def precisions_cholesky_from_covariances(covariances):
        # sklearn: precision = P P^T with P = inv(chol(cov))^T, upper triangular.
        lower = _linalg.cholesky(covariances)
        return _linalg.transpose(_linalg.lower_triangular_inverse(lower))

    @staticmethod
    def covariances_from_precisions_cholesky(precisions_cholesky):
        lower = Full.sampling_factor(precisions_cholesky)
        return _linalg.matmul(lower, _linalg.transpose(lower))

    @staticmethod
    def log_det_precisions_cholesky(precisions_cholesky, n_components, n_features):
        d = precisions_cholesky.shape[-1]
        if d <= _linalg.UNROLL_MAX_DIM:
            # One elementwise log per diagonal entry. The masked row sum below
            # puts a reduction in the logs' loop, which then runs one scalar
            # log at a time: ~5% of the EM time of 10,000 vmapped D=2 fits.
            return sum(jnp.log(precisions_cholesky[..., i, i]) for i in range(d))
        # The diagonal as a masked row sum (adding zeros is exact), not
        # jnp.diagonal's gather: fused with the logs into the E-step, the
        # gather's kernel is the largest of a whole fit (~110 KB of LLVM IR
        # at D=16; the masked sum's ~40 KB).
        eye = jnp.eye(precisions_cholesky.shape[-1], dtype=precisions_cholesky.dtype)
        diagonal = jnp.sum(precisions_cholesky * eye, axis=-1)
        return _linalg.sum_last(jnp.log(diagonal))

    @staticmethod
    def row_features(x):
        if x.shape[-1] <= _linalg.UNROLL_MAX_DIM:
            return _columns(x)
        return _linalg.quadratic_features(x)

    @staticmethod
    def squared_mahalanobis(features, means, precisions_cholesky):
        if means.shape[-1] <= _linalg.UNROLL_MAX_DIM:
            diff = _column_differences(features, means)
            # y_e = sum_{d <= e} P_de (x_d - mu_d): P is upper triangular.
            whitened = [
                sum(
                    precisions_cholesky[:, d, e][:, None] * diff[d]
                    for d in range(e + 1)
                )
                for e in range(len(diff))
            ]
            return sum(y * y for y in whitened)
        # (x - mu)^T L (x - mu) = [x, x_i x_j] . [-2 L mu, L_ii, 2 L_ij] + mu^T L mu
        precisions = _linalg.matmul(
            precisions_cholesky, _linalg.transpose(precisions_cholesky)
        )
        coefficients, linear = _quadratic_coefficients(means, precisions)
        constant = jnp.sum(linear * means, axis=-1)
        return coefficients @ features + constant[:, None]

    @staticmethod
    def moments(features, resp, shift, row_scale=None):
        d = shift.shape[-1]
        if d <= _linalg.UNROLL_MAX_DIM:
            diff = _column_differences(features, shift)
            pairs = [(i, j) for i in range(d) for j in range(i, d)]
            weighted, _ = _row_weights(resp, row_scale)
            counts, sums, entries = _small_moments(weighted, diff, pairs)
            return counts, sums, _linalg.stack_symmetric(entries, d)
        # The shift is zero here (see scatter_shift): one GEMM gives
        # sum_n r_kn x_n and the upper triangle of sum_n r_kn x_n x_n^T.
        weighted, counts = _row_weights(resp, row_scale)
        moments = weighted @ features.T
        return counts, moments[:, :d], _linalg.symmetric_from_upper(moments[:, d:], d)

    cancellation = staticmethod(_entrywise_quadratic)

    anchored_parts = staticmethod(_anchored_quadratic_parts)

    @staticmethod
    def scatter_diagonal(scatter):
        # A masked sum rather than jnp.diagonal's gather (see
        # log_det_precisions_cholesky).
        return jnp.sum(scatter * jnp.eye(scatter.shape[-1], dtype=scatter.dtype), -1)

    @staticmethod
    def covariances_from_scatter(scatter, counts, offsets, reg_covar, max_condition):
        d = offsets.shape[-1]
        covariances = scatter / counts[:, None, None] - (
            offsets[:, :, None] * offsets[:, None, :]
        )
        # Exactly symmetric already (the scatter is built from its upper
        # triangle, and a_i a_j == a_j a_i): no symmetrising pass.
        covariances = covariances + reg_covar * jnp.eye(d, dtype=covariances.dtype)
        return _linalg.cap_condition(covariances, max_condition)

    @staticmethod
    def sampling_factor(precisions_cholesky):
        # cov = inv(P P^T) = L L^T with L = inv(P^T), lower triangular.
        return _linalg.lower_triangular_inverse(_linalg.transpose(precisions_cholesky))

    @staticmethod
    def scale_noise(factor, noise, labels):
        return jnp.einsum("nde,ne->nd", factor[labels], noise)

    @staticmethod
    def keep_previous(new, previous, keep):
        keep = keep | ~_linalg.all_finite(new, axis=(-1, -2))
        return jnp.where(keep[:, None, None], previous, new)

    @staticmethod
    def to_full(covariances, n_components, n_features):
        return covariances

    @staticmethod
    def identity(n_components, n_features, dtype):
        return jnp.broadcast_to(
            jnp.eye(n_features, dtype=dtype), (n_components, n_features, n_features)
        )

    @staticmethod
    def check_precisions_cholesky(factor, n_components, n_features):
        shape = Full.covariance_shape(n_components, n_features)
        _check_factor("precisions_cholesky", factor, shape, "full", True)

    @staticmethod
    def check_covariances(covariances, n_components, n_features):
        shape = Full.covariance_shape(n_components, n_features)
        _check_shape("covariances", covariances, shape, "full")
        _check_spd("covariances", covariances)


class Tied(CovarianceStructure):
    name = "tied"

    @staticmethod
    def scatter_shift(means):
        return Full.scatter_shift(means)

    @staticmethod
    def covariance_shape(n_components, n_features):
        return (n_features, n_features)

    @staticmethod
    def n_covariance_parameters(n_components, n_features):
        return n_features * (n_features + 1) // 2

    @staticmethod
    def precisions_cholesky_from_covariances(covariances):
        return Full.precisions_cholesky_from_covariances(covariances)

    @staticmethod
    def covariances_from_precisions_cholesky(precisions_cholesky):
        return Full.covariances_from_precisions_cholesky(precisions_cholesky)

    @staticmethod
    def log_det_precisions_cholesky(precisions_cholesky, n_components, n_features):
        log_det = Full.log_det_precisions_cholesky(
            precisions_cholesky, n_components, n_features
        )
        return jnp.broadcast_to(log_det, (n_components,))

    @staticmethod
    def row_features(x):
        return Full.row_features(x)

    @staticmethod
    def squared_mahalanobis(features, means, precisions_cholesky):
        k = means.shape[0]
        tiled = jnp.broadcast_to(precisions_cholesky, (k,) + precisions_cholesky.shape)
        return Full.squared_mahalanobis(features, means, tiled)

    @staticmethod
    def moments(features, resp, shift, row_scale=None):
        return Full.moments(features, resp, shift, row_scale)

    cancellation = staticmethod(_entrywise_quadratic)

    @staticmethod
    def anchored_parts(x, means, precisions_cholesky, nearest=None):
        k = means.shape[0]
        tiled = jnp.broadcast_to(precisions_cholesky, (k,) + precisions_cholesky.shape)
        return _anchored_quadratic_parts(x, means, tiled, nearest)

    @staticmethod
    def scatter_diagonal(scatter):
        return Full.scatter_diagonal(scatter)

    @staticmethod
    def covariances_from_scatter(scatter, counts, offsets, reg_covar, max_condition):
        d = offsets.shape[-1]
        within = scatter - counts[:, None, None] * (
            offsets[:, :, None] * offsets[:, None, :]
        )
        covariance = _linalg.symmetrise(jnp.sum(within, axis=0) / jnp.sum(counts))
        covariance = covariance + reg_covar * jnp.eye(d, dtype=covariance.dtype)
        return _linalg.cap_condition(covariance, max_condition)

    @staticmethod
    def sampling_factor(precisions_cholesky):
        return Full.sampling_factor(precisions_cholesky)

    @staticmethod
    def scale_noise(factor, noise, labels):
        return noise @ _linalg.transpose(factor)

    @staticmethod
    def keep_previous(new, previous, keep):
        # One matrix serves every component: keep it only if all are kept.
        keep = jnp.all(keep) | ~_linalg.all_finite(new, axis=None)
        return jnp.where(keep, previous, new)

    @staticmethod
    def to_full(covariances, n_components, n_features):
        return jnp.broadcast_to(covariances, (n_components, n_features, n_features))

    @staticmethod
    def identity(n_components, n_features, dtype):
        return jnp.eye(n_features, dtype=dtype)

    @staticmethod
    def check_precisions_cholesky(factor, n_components, n_features):
        shape = Tied.covariance_shape(n_components, n_features)
        _check_factor("precisions_cholesky", factor, shape, "tied", True)

    @staticmethod
    def check_covariances(covariances, n_components, n_features):
        shape = Tied.covariance_shape(n_components, n_features)
        _check_shape("covariances", covariances, shape, "tied")
        _check_spd("covariances", covariances)


class Diag(CovarianceStructure):
    name = "diag"
    e_step_in_blocks = True

    @staticmethod
    def scatter_shift(means):
        return jnp.zeros_like(means)

    @staticmethod
    def covariance_shape(n_components, n_features):
        return (n_components, n_features)

    @staticmethod
    def n_covariance_parameters(n_components, n_features):
        return n_components * n_features

    @staticmethod
    def precisions_cholesky_from_covariances(covariances):
        return 1.0 / jnp.sqrt(covariances)

    @staticmethod
    def covariances_from_precisions_cholesky(precisions_cholesky):
        return 1.0 / precisions_cholesky**2

    @staticmethod
    def log_det_precisions_cholesky(precisions_cholesky, n_components, n_features):
        return _linalg.sum_last(jnp.log(precisions_cholesky))

    @staticmethod
    def row_features(x):
        return _diagonal_features(x)

    @staticmethod
    def squared_mahalanobis(features, means, precisions_cholesky):
        if means.shape[-1] <= _linalg.UNROLL_MAX_DIM:
            diff = _column_differences(features, means)
            return sum(
                (precisions_cholesky[:, d][:, None] * column) ** 2
                for d, column in enumerate(diff)
            )
        # Expanded into matrix products (sklearn's form); x is already centred
        # on the data, so the cancellation stays small.
        precisions = precisions_cholesky**2
        x, squares = features
        constant = jnp.sum(means**2 * precisions, axis=-1)
        return (
            (-2.0 * means * precisions) @ x.T
            + precisions @ squares.T
            + constant[:, None]
        )

    @staticmethod
    def moments(features, resp, shift, row_scale=None):
        return _diagonal_moments(features, resp, row_scale, shift.shape[-1])

    @staticmethod
    def cancellation(means, precisions_cholesky):
        return _squared_norms(precisions_cholesky * means)

    @staticmethod
    def anchored_parts(x, means, precisions_cholesky, nearest=None):
        return _anchored_diagonal_parts(x, means, precisions_cholesky**2, nearest)

    @staticmethod
    def scatter_diagonal(scatter):
        return scatter

    @staticmethod
    def covariances_from_scatter(scatter, counts, offsets, reg_covar, max_condition):
        variances = jnp.maximum(scatter / counts[:, None] - offsets**2, 0.0) + reg_covar
        if max_condition is not None:
            floor = jnp.max(variances, axis=-1, keepdims=True) / max_condition
            variances = jnp.maximum(variances, floor)
        return variances

    @staticmethod
    def sampling_factor(precisions_cholesky):
        return 1.0 / precisions_cholesky

    @staticmethod
    def scale_noise(factor, noise, labels):
        return factor[labels] * noise

    @staticmethod
    def keep_previous(new, previous, keep):
        keep = keep | ~_linalg.all_finite(new)
        return jnp.where(keep[:, None], previous, new)

    @staticmethod
    def to_full(covariances, n_components, n_features):
        return covariances[:, :, None] * jnp.eye(n_features, dtype=covariances.dtype)

    @staticmethod
    def identity(n_components, n_features, dtype):
        return jnp.ones((n_components, n_features), dtype)

    @staticmethod
    def check_precisions_cholesky(factor, n_components, n_features):
        shape = Diag.covariance_shape(n_components, n_features)
        _check_factor("precisions_cholesky", factor, shape, "diag", False)

    @staticmethod
    def check_covariances(covariances, n_components, n_features):
        shape = Diag.covariance_shape(n_components, n_features)
        _check_shape("covariances", covariances, shape, "diag")
        _check_positive("covariances", covariances)


class Spherical(CovarianceStructure):
    name = "spherical"
    e_step_in_blocks = True

    @staticmethod
    def scatter_shift(means):
        return jnp.zeros_like(means)

    @staticmethod
    def covariance_shape(n_components, n_features):
        return (n_components,)

    @staticmethod
    def n_covariance_parameters(n_components, n_features):
        return n_components

    @staticmethod
    def precisions_cholesky_from_covariances(covariances):
        return Diag.precisions_cholesky_from_covariances(covariances)

    @staticmethod
    def covariances_from_precisions_cholesky(precisions_cholesky):
        return Diag.covariances_from_precisions_cholesky(precisions_cholesky)

    @staticmethod
    def log_det_precisions_cholesky(precisions_cholesky, n_components, n_features):
        return n_features * jnp.log(precisions_cholesky)

    @staticmethod
    def row_features(x):
        return _diagonal_features(x)

    @staticmethod
    def squared_mahalanobis(features, means, precisions_cholesky):
        precisions = (precisions_cholesky**2)[:, None]
        d = means.shape[-1]
        if d <= _linalg.UNROLL_MAX_DIM:
            diff = _column_differences(features, means)
            return precisions * sum(column * column for column in diff)
        x, squares = features
        squared_distance = (
            jnp.sum(means**2, axis=-1)[:, None]
            - 2.0 * means @ x.T
            + jnp.sum(squares, axis=-1)[None, :]
        )
        return squared_distance * precisions

    @staticmethod
    def moments(features, resp, shift, row_scale=None):
        return _diagonal_moments(features, resp, row_scale, shift.shape[-1])

    @staticmethod
    def cancellation(means, precisions_cholesky):
        return precisions_cholesky**2 * _squared_norms(means)

    @staticmethod
    def anchored_parts(x, means, precisions_cholesky, nearest=None):
        precisions = jnp.broadcast_to((precisions_cholesky**2)[:, None], means.shape)
        return _anchored_diagonal_parts(x, means, precisions, nearest)

    @staticmethod
    def scatter_diagonal(scatter):
        return scatter

    @staticmethod
    def covariances_from_scatter(scatter, counts, offsets, reg_covar, max_condition):
        # sklearn: the mean of the diagonal covariance; one number per
        # component, so the condition number is always 1.
        variances = Diag.covariances_from_scatter(
            scatter, counts, offsets, reg_covar, None
        )
        return jnp.mean(variances, axis=-1)

    @staticmethod
    def sampling_factor(precisions_cholesky):
        return Diag.sampling_factor(precisions_cholesky)

    @staticmethod
    def scale_noise(factor, noise, labels):
        return factor[labels][:, None] * noise

    @staticmethod
    def keep_previous(new, previous, keep):
        return jnp.where(keep | ~_linalg.is_finite(new), previous, new)

    @staticmethod
    def to_full(covariances, n_components, n_features):
        return covariances[:, None, None] * jnp.eye(n_features, dtype=covariances.dtype)

    @staticmethod
    def identity(n_components, n_features, dtype):
        return jnp.ones((n_components,), dtype)

    @staticmethod
    def check_precisions_cholesky(factor, n_components, n_features):
        shape = Spherical.covariance_shape(n_components, n_features)
        _check_factor("precisions_cholesky", factor, shape, "spherical", False)

    @staticmethod
    def check_covariances(covariances, n_components, n_features):
        shape = Spherical.covariance_shape(n_components, n_features)
        _check_shape("covariances", covariances, shape, "spherical")
        _check_positive("covariances", covariances)


COVARIANCE_TYPES: dict[str, type[CovarianceStructure]] = {
    structure.name: structure for structure in (Full, Diag, Spherical, Tied)
}


def structure_for(covariance_type: str) -> type[CovarianceStructure]:
    """The structure for a covariance type name; ``ValueError`` if unknown."""
    try:
        return COVARIANCE_TYPES[covariance_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"`covariance_type` must be one of {sorted(COVARIANCE_TYPES)}, "
            f"got {covariance_type!r}"
        ) from None


def log_normaliser(n_features: int) -> float:
    return 0.5 * n_features * math.log(2.0 * math.pi)


#: Largest ``eps * cancellation`` (see ``CovarianceStructure.cancellation``)
#: at which the matrix-product forms are used: their distances are then good
#: to ~1e-3 of a unit of squared Mahalanobis distance and the variances to
#: ~1e-3 relative (measured: two float32 clusters 100 standard deviations
#: apart, D=5 and 16, lose 1.2e-3 and 1.4e-3 of their variance, with
#: ``eps * cancellation`` at 1.5e-3 and 4.8e-3). The benchmarks' mixtures
#: sit at ~2e-4 to 3e-4. Past the limit the anchored forms take over, at
#: 1.5-2.5x the cost per EM iteration (N=1e6: D=16, K=16 full 0.18 s
#: against 0.12 s; D=64, K=32 diag 0.34 s against 0.15 s).
PRECISION_LIMIT = 1e-3


def squared_distances(
    structure: type[CovarianceStructure],
    x: Float[Array, "n d"],
    means: Float[Array, "k d"],
    precisions_cholesky: Array,
) -> Float[Array, "k n"]:
    """Squared Mahalanobis distance of every row to every component: the
    matrix-product forms, or where they would lose precision
    (:func:`loses_precision`) the anchored ones (``anchored_parts``)."""
    anchored = loses_precision(structure, means, precisions_cholesky)

    def fast(x, means, precisions_cholesky):
        features = structure.row_features(x)
        return structure.squared_mahalanobis(features, means, precisions_cholesky)

    if anchored is False:
        return fast(x, means, precisions_cholesky)
    return lax.cond(
        anchored,
        lambda *args: structure.anchored_parts(*args)[0],
        fast,
        x,
        means,
        precisions_cholesky,
    )


def loses_precision(
    structure: type[CovarianceStructure],
    means: Float[Array, "k d"],
    precisions_cholesky: Array,
):
    """Whether the matrix-product forms would lose more than
    ``PRECISION_LIMIT`` for components at ``means`` (in the rows'
    coordinates): a traced bool, or the Python ``False`` where they are exact
    enough whatever the parameters (up to ``UNROLL_MAX_DIM`` features, where
    the usual forms are per-component differences already, and in float64,
    where components would have to sit ~1e6 standard deviations apart).
    """
    if not may_lose_precision(means):
        return False
    scale = structure.cancellation(means, precisions_cholesky)
    return jnp.finfo(means.dtype).eps * jnp.max(scale) > PRECISION_LIMIT


def may_lose_precision(means: Float[Array, "k d"]) -> bool:
    """False where the matrix-product forms are exact enough whatever the
    parameters (see :func:`loses_precision`): a static property of the shape
    and dtype."""
    dtype = jnp.dtype(means.dtype)
    return means.shape[-1] > _linalg.UNROLL_MAX_DIM and dtype.itemsize <= 4


def scatter_loses_precision(
    structure: type[CovarianceStructure],
    counts: Float[Array, " k"],
    sums: Float[Array, "k d"],
    scatter: Array,
    reg_covar,
    nonempty,
):
    """Whether a scatter accumulated about the origin (the matrix-product
    moments) cancelled more than ``PRECISION_LIMIT`` of a variance: its
    rounding, about ``eps`` times the raw second moment, against the variance
    it leaves (plus ``reg_covar``), for the ``nonempty`` components.

    The distances' check (:func:`loses_precision`) sees the current
    covariances; this one sees the new ones, which can be far tighter (a
    start with the whole data's covariance, say).
    """
    n = jnp.maximum(counts, jnp.finfo(counts.dtype).tiny)[:, None]
    raw = structure.scatter_diagonal(scatter) / n
    variance = raw - (sums / n) ** 2 + reg_covar
    eps = jnp.finfo(counts.dtype).eps
    # Also true where rounding left no variance at all (variance <= 0).
    lost = eps * raw > PRECISION_LIMIT * variance
    return jnp.any(lost & nonempty[:, None])
