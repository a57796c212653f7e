"""Batched linear algebra that vectorises for small matrices.

XLA lowers a batched ``cholesky`` or ``triangular_solve`` on CPU to one LAPACK
call per matrix, which dominates the cost of fitting thousands of tiny
mixtures. For a small static dimension the factorisations below are written
out element by element, so they become plain elementwise arithmetic that XLA
vectorises across every batch axis. Larger matrices use the library routines.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax
from jaxtyping import Array, Float

# Up to this many features the element-wise forms are used. Their graph grows
# as D**3, so beyond a handful of features the LAPACK routines win.
UNROLL_MAX_DIM = 4


def _stack_matrix(entries: list[list[Array]]) -> Array:
    return jnp.stack([jnp.stack(row, axis=-1) for row in entries], axis=-2)


# Rows summed per step of the tree in ``sums_over_rows``; the row counts from
# which the first step, and each further step (an extra pass), pay off.
ROW_SPLIT = 8
ROW_SPLIT_MIN = 16
ROW_SPLIT_AGAIN_MIN = 64


def sums_over_rows(terms: list[Array], min_rows: int = ROW_SPLIT_MIN) -> list[Array]:
    """``[t.sum(axis=-1) for t in terms]`` as variadic reductions.

    One variadic reduction reads the (fused) inputs in a single pass instead
    of writing each product out and reducing it separately: for many small
    fits the moments are bound by memory traffic, not arithmetic.

    XLA's CPU backend sums along the minor (row) axis one element at a time:
    without fast-math it may not reorder float additions, so the loop does not
    vectorise. Viewing the ``n`` rows as ``(ROW_SPLIT, n / ROW_SPLIT)`` and
    first summing over the short major axis turns the first pass into
    ``ROW_SPLIT`` vectorised adds of contiguous rows; only ``n / ROW_SPLIT``
    values per output are then summed serially (2.3x faster moments for
    N=200, and pairwise-style sums are also more accurate). Rows beyond the
    last multiple of ``ROW_SPLIT`` are summed separately.
    """
    n = terms[0].shape[-1]
    axis = terms[0].ndim - 1
    if n < min_rows:
        return _variadic_sum(terms, axis)
    head = n - n % ROW_SPLIT
    if head < n:
        sums = sums_over_rows([t[..., :head] for t in terms], min_rows)
        tail = _variadic_sum([t[..., head:] for t in terms], axis)
        return [a + b for a, b in zip(sums, tail)]
    shape = terms[0].shape[:-1] + (ROW_SPLIT, n // ROW_SPLIT)
    partial = _variadic_sum([jnp.reshape(t, shape) for t in terms], axis)
    return sums_over_rows(partial, ROW_SPLIT_AGAIN_MIN)


def variadic_reduce(operands, identities, ops, axis: int) -> tuple:
    """``ops[i]`` of ``operands[i]`` along ``axis`` (starting from
    ``identities[i]``), every operand in one variadic ``lax.reduce``."""

    def combine(a, b):
        return tuple(op(u, v) for op, u, v in zip(ops, a, b))

    return tuple(lax.reduce(tuple(operands), tuple(identities), combine, (axis,)))


def _variadic_sum(terms: list[Array], axis: int) -> list[Array]:
    zeros = [jnp.zeros((), t.dtype) for t in terms]
    return list(variadic_reduce(terms, zeros, [jnp.add] * len(terms), axis))


def _upper_indices(d: int):

    return np.triu_indices(d)


def quadratic_features(x: Float[Array, "n d"]) -> Float[Array, "p n"]:
    """``[x, x_i x_j for i <= j]`` per row, feature-major: ``(D + D(D+1)/2, n)``.

    Feature-major, every feature is a product of two contiguous rows of
    ``x.T``. XLA would otherwise keep ``x.T`` as a strided view of ``x`` and
    read it column by column; taking it as the product ``I @ x.T`` (exact:
    one nonzero term per entry, and the rows are finite) makes a contiguous
    copy, and the features then cost about a third as much (measured).
    """
    d = x.shape[-1]
    xt = lax.dot_general(jnp.eye(d, dtype=x.dtype), x, (((1,), (1,)), ((), ())))
    rows, cols = _upper_indices(d)
    return jnp.concatenate([xt, xt[rows] * xt[cols]], axis=0)


def upper_entries(a: Float[Array, "... d d"], off_diagonal_scale: float = 1.0) -> Array:
    """Upper-triangle entries of ``a`` in ``quadratic_features`` order."""

    rows, cols = _upper_indices(a.shape[-1])
    scale = np.where(rows == cols, 1.0, off_diagonal_scale).astype(a.dtype)
    return a[..., rows, cols] * scale


def symmetric_from_upper(upper: Float[Array, "... p"], d: int) -> Array:
    """Inverse of ``upper_entries``: the symmetric ``(..., d, d)`` matrix."""

    rows, cols = _upper_indices(d)
    position = np.zeros((d, d), dtype=np.int32)
    position[rows, cols] = np.arange(len(rows))
    position[cols, rows] = np.arange(len(rows))
    return upper[..., position]


def stack_symmetric(entries: dict[tuple[int, int], Array], d: int) -> Array:
    """A symmetric ``(..., d, d)`` matrix from its upper-triangle entries."""
    return _stack_matrix(
        [[entries[(min(i, j), max(i, j))] for j in range(d)] for i in range(d)]
    )


def cholesky(a: Float[Array, "... d d"]) -> Float[Array, "... d d"]:
    """Lower Cholesky factor ``L`` with ``a = L L^T``; NaN where not positive definite."""
    d = a.shape[-1]
    if d > UNROLL_MAX_DIM:
        return jnp.linalg.cholesky(a)
    zero = jnp.zeros_like(a[..., 0, 0])
    factor = [[zero] * d for _ in range(d)]
    for j in range(d):
        diagonal = a[..., j, j] - sum((factor[j][k] ** 2 for k in range(j)), zero)
        factor[j][j] = jnp.sqrt(diagonal)
        for i in range(j + 1, d):
            off = a[..., i, j] - sum(
                (factor[i][k] * factor[j][k] for k in range(j)), zero
            )
            factor[i][j] = off / factor[j][j]
    return _stack_matrix(factor)


def lower_triangular_inverse(lower: Float[Array, "... d d"]) -> Float[Array, "... d d"]:
    """Inverse of a lower-triangular matrix (itself lower triangular)."""
    d = lower.shape[-1]
    if d > UNROLL_MAX_DIM:
        eye = jnp.broadcast_to(jnp.eye(d, dtype=lower.dtype), lower.shape)
        return jsl.solve_triangular(lower, eye, lower=True)
    zero = jnp.zeros_like(lower[..., 0, 0])
    inverse = [[zero] * d for _ in range(d)]
    for j in range(d):
        inverse[j][j] = 1.0 / lower[..., j, j]
        for i in range(j + 1, d):
            acc = sum((lower[..., i, k] * inverse[k][j] for k in range(j, i)), zero)
            inverse[i][j] = -acc / lower[..., i, i]
    return _stack_matrix(inverse)


def matmul(a: Float[Array, "... m k"], b: Float[Array, "... k n"]) -> Array:
    """Batched matrix product, written element-wise for small inner dimension."""
    if a.shape[-1] > UNROLL_MAX_DIM:
        return jnp.matmul(a, b)
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def elementwise_reduce(op, values: Array, axis: int) -> Array:
    """``op`` (add, maximum, ...) folded over a short ``axis`` as elementwise
    operations on its slices: XLA fuses them with their producers and
    vectorises across the remaining axes, where a reduction of a minor axis
    runs one element at a time. For a handful of slices only: the trace
    grows with the axis length."""
    slices = [
        lax.index_in_dim(values, i, axis, keepdims=False)
        for i in range(values.shape[axis])
    ]
    result = slices[0]
    for piece in slices[1:]:
        result = op(result, piece)
    return result


def sum_last(values: Float[Array, "... d"]) -> Float[Array, "..."]:
    """``values.sum(-1)``, elementwise over a last axis of at most
    ``UNROLL_MAX_DIM`` (the log-determinants of a vmapped batch of small
    mixtures: ~4% of their EM time as a reduction)."""
    if values.shape[-1] > UNROLL_MAX_DIM:
        return jnp.sum(values, axis=-1)
    return elementwise_reduce(jnp.add, values, -1)


def row_sums(
    a: Float[Array, "k n"], weights: Float[Array, " n"] | None = None
) -> Float[Array, " k"]:
    r"""``a.sum(-1)``, or :math:`\sum_n a_{kn} w_n` with ``weights``, over a
    long minor axis, as a matrix-vector product.

    XLA's CPU code reduces a minor axis one element at a time; the product
    runs as a vectorised kernel (the counts of a 4,000-row chunk of 32
    components: ~4% of a large diag EM iteration as a reduction). With
    ``weights`` the weighted matrix ``a * w`` is never formed.

    Example:
        >>> row_sums(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([1.0, 0.5]))
        Array([2., 5.], dtype=float32)
    """
    if weights is None:
        weights = jnp.ones(a.shape[-1:], a.dtype)
    return (a @ weights[:, None])[..., 0]


# The M-step's matrix products are split into this many groups of
# components when there are at least MIN_GROUP_ROWS components per group and
# each (K, p) output has at least GROUPED_MIN_OUTPUT entries (see
# ``grouped_matmul``).
PRODUCT_GROUPS = 8
MIN_GROUP_ROWS = 2
GROUPED_MIN_OUTPUT = 1024
GROUPED_MIN_ROWS = 2048


def grouped_matmul(
    weights: Float[Array, "k n"], operands: tuple[Array, ...]
) -> tuple[Array, ...]:
    r"""``weights @ b`` for each ``b`` ``(n, p)`` in ``operands``; for large
    outputs as one product per group of rows of ``weights`` (components).

    Each output row is the same dot product as in ``weights @ b``; only the
    grouping of the work differs. The split is for XLA:CPU: a product with a
    small ``(K, p)`` output runs on one thread, and its runtime runs ready
    operations concurrently only when more than eight are ready at once, so
    the diagonal M-step's two products (``r @ x`` and ``r @ x**2``) ran one
    after the other on one of two cores while the other waited. Split into
    ``PRODUCT_GROUPS`` groups (16 products) they run on both. Measured on
    2 cores, N=1e6 (``benchmarks/bench_large_diag.py`` and A/B runs of
    ``fit``): D=64, K=32 diag 0.17 s per EM iteration instead of 0.21 s;
    K=16 or 64 with D=64 ~10-20% faster; D=32, K=32 ~5%; but outputs of
    fewer than ``GROUPED_MIN_OUTPUT`` entries (D=32 with K=16, D=16 with
    K=16) got 10-70% slower, so those stay one product each. Products over
    fewer than ``GROUPED_MIN_ROWS`` rows stay whole too: they are those of a
    chunk's row blocks, which run concurrently already (see
    ``_data.BLOCKS_PER_CHUNK``; grouped there, D=64, K=32 diag took 0.139-0.147 s
    per iteration instead of 0.129-0.135 s).
    """
    k, n = weights.shape
    p = max(b.shape[-1] for b in operands)
    few = k < PRODUCT_GROUPS * MIN_GROUP_ROWS or k * p < GROUPED_MIN_OUTPUT
    if few or n < GROUPED_MIN_ROWS:
        return tuple(weights @ b for b in operands)
    bounds = [(i * k) // PRODUCT_GROUPS for i in range(PRODUCT_GROUPS + 1)]
    blocks = [weights[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return tuple(
        jnp.concatenate([block @ b for block in blocks], axis=0) for b in operands
    )


def is_finite(a: Array) -> Array:
    """``jnp.isfinite(a)``, as ``a * 0 == 0`` (NaN for infinities and NaN).

    XLA's CPU code for ``is-finite`` (or ``abs(a) < inf``, which it turns
    into it) vectorises badly: fused into a select over a 16 x 16 array it
    is a 66 KB kernel of LLVM IR, the multiply-compare 12 KB. Compile time
    grows with the code, so every finiteness test in a fit uses this.

    Example:
        >>> is_finite(jnp.array([1.0, jnp.inf, jnp.nan]))
        Array([ True, False, False], dtype=bool)
    """
    return a * 0 == 0


def all_finite(a: Array, axis=-1) -> Array:
    """``jnp.all(jnp.isfinite(a), axis)``, as a float sum.

    ``a * 0`` is zero where ``a`` is finite and NaN where it is not, so its
    sum is finite exactly when every entry is. XLA's CPU code for the float
    sum is about a fifth of the size of a boolean and-reduction's (6 KB
    against 30 KB of LLVM IR for rows of 16 features), and a fit checks
    finiteness in several places, each one more kernel to compile.

    Example:
        >>> all_finite(jnp.array([[1.0, 2.0], [jnp.inf, 0.0]]))
        Array([ True, False], dtype=bool)
    """
    return is_finite(jnp.sum(a * 0, axis=axis))


def vector_finite(v: Float[Array, " n"]) -> Array:
    """Whether every entry of the vector ``v`` is finite, as a dot product.

    ``v * 0`` holds zeros where ``v`` is finite and NaN where it is not, so
    its dot product with ones is finite exactly when every entry is. XLA
    would compile a sum of more than 32 values into a tree of three
    reduction kernels; the dot is one small one.

    Example:
        >>> vector_finite(jnp.array([1.0, jnp.nan]))
        Array(False, dtype=bool)
    """
    return is_finite(vector_sum(v * 0))


def vector_sum(v: Float[Array, " n"]) -> Array:
    """``jnp.sum(v)`` as a dot product with ones: one kernel where XLA:CPU
    would compile a sum of more than 32 values into a tree of reduction
    kernels (and under ``vmap``, a matrix-vector product).

    Example:
        >>> vector_sum(jnp.arange(100.0))
        Array(4950., dtype=float32)
    """
    return jnp.dot(v, jnp.ones_like(v))


def transpose(a: Array) -> Array:
    return jnp.swapaxes(a, -1, -2)


def symmetrise(a: Float[Array, "... d d"]) -> Float[Array, "... d d"]:
    return 0.5 * (a + transpose(a))


def cap_condition(
    covariance: Float[Array, "... d d"], max_condition: float | None
) -> Float[Array, "... d d"]:
    """Raise every eigenvalue to at least ``largest / max_condition``."""
    if max_condition is None:
        return covariance
    eigenvalues, vectors = jnp.linalg.eigh(covariance)
    floor = eigenvalues[..., -1:] / max_condition
    eigenvalues = jnp.maximum(eigenvalues, floor)
    capped = matmul(vectors * eigenvalues[..., None, :], transpose(vectors))
    return symmetrise(capped)
