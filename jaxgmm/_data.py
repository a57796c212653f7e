"""A data set seen in row chunks: centring, sanitising and chunked sums.

Every pass over the rows in jaxgmm goes through :class:`Data`, so that
(1) memory stays O(chunk * K * D) whatever N is (``lax.scan`` over chunks of
a fixed static size, never a copy of ``x``), (2) rows that are not there
(weight 0, or non-finite) are masked in one place, and (3) all arithmetic
happens in coordinates centred on the data, so far-off data keep their
precision in float32.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from ._linalg import all_finite, is_finite, variadic_reduce
from ._status import Status

# Budget (elements) for one chunk's temporaries. A row needs at most
# K + D + D*D of them (responsibilities and quadratic features), so a chunk
# stays a few MiB to a few tens of MiB whatever N is.
CHUNK_ELEMENTS = 1 << 24
# Past a few thousand rows a larger chunk no longer speeds up the GEMMs.
MAX_CHUNK_ROWS = 4096


# The E-step's passes (Data.sum) can take a chunk as this many independent
# blocks of rows. XLA:CPU's runtime runs the operations that are ready on the
# thread that made them ready, and hands half of them to another thread only
# when more than eight are ready at once (see _linalg.grouped_matmul). One
# chunk's feature kernels, log-sum-exp kernels and small products each wait
# for the one before, so on two cores one thread ran them while the other
# waited. The kernels of ten blocks are ready ten at a time, and both threads
# take them (N=1e6, 2 cores: D=64, K=32 diag 0.129-0.133 s per EM iteration
# instead of 0.142-0.155 s; D=16, K=16 diag 0.038 s instead of 0.058-0.061 s).
# Which covariance types take blocks: CovarianceStructure.e_step_in_blocks.
BLOCKS_PER_CHUNK = 10
# Rows per block: at most this many, and at most BLOCK_ELEMENTS row features
# per block. Measured optima: 800 rows for D=64 diag (128 features a row)
# and D=16 full (152); 400 for D=32 full (560). Fewer rows cost more in the
# runtime's per-operation overhead than they gain (400 rows for D=64 diag:
# 0.157 s), more spill the blocks out of the cores' caches (1,000: 0.144 s).
MAX_BLOCK_ROWS = 800
BLOCK_ELEMENTS = 1 << 18
# Block sizes are multiples of this many rows: the (K, rows) arrays of the
# E-step then start every row on a cache line (625- and 1,250-row blocks
# were 10-20% slower than 800 rows).
BLOCK_ROW_MULTIPLE = 16
# Data with fewer rows are not taken in blocks. Each block is compiled on its
# own (~0.6 s more compile time for a fit), and below this size the gain per
# iteration is small: N=2e5, D=64, K=32 diag 0.027-0.029 s per iteration
# against 0.029-0.030 s, N=1e5 no gain; hundreds of iterations would not
# repay the compile time.
MIN_BLOCKED_ROWS = 1 << 18


def rows_per_chunk(n_rows: int, n_components: int, n_features: int) -> int:
    """Static chunk size: the whole data set when small, else a fixed budget."""
    per_row = n_components + n_features + n_features * n_features
    return chunk_rows(n_rows, min(MAX_CHUNK_ROWS, max(CHUNK_ELEMENTS // per_row, 64)))


def blocked_chunking(n_rows: int, row_width: int) -> tuple[int, int] | None:
    """``(chunk size, blocks per chunk)`` for passes that take a chunk as
    :data:`BLOCKS_PER_CHUNK` blocks of rows, or None for fewer than
    ``MIN_BLOCKED_ROWS`` rows (they are then chunked as by
    :func:`rows_per_chunk`).

    ``row_width``: features per row that the pass computes (2D for diag,
    D + D(D+1)/2 for full). Prefers blocks of a size whose chunks divide N
    (no remainder chunk, which is compiled separately); the remainder, if
    any, is one unsplit call.
    """
    step = BLOCK_ROW_MULTIPLE
    most = min(MAX_BLOCK_ROWS, BLOCK_ELEMENTS // max(row_width, 1)) // step * step
    if most < step or n_rows < max(MIN_BLOCKED_ROWS, 2 * BLOCKS_PER_CHUNK * most):
        return None
    sizes = range(most, most // 2, -step)
    block = next((b for b in sizes if n_rows % (BLOCKS_PER_CHUNK * b) == 0), most)
    return BLOCKS_PER_CHUNK * block, BLOCKS_PER_CHUNK


def chunk_rows(n_rows: int, budget: int) -> int:
    """At most ``budget`` rows per chunk, preferring a size that divides N:
    that spares the separately compiled remainder chunk of every pass
    (compile time and compile memory)."""
    if n_rows <= budget:
        return max(1, n_rows)
    for size in range(budget, budget // 2, -1):
        if n_rows % size == 0:
            return size
    return budget


def _identity(combine, shape: jax.ShapeDtypeStruct) -> Array:
    """The identity element of ``combine`` (add or minimum) for ``shape``."""
    if combine is jnp.add:
        value = 0
    elif combine is jnp.minimum:
        dtype = jnp.dtype(shape.dtype)
        value = jnp.iinfo(dtype).max if jnp.issubdtype(dtype, jnp.integer) else jnp.inf
    else:
        raise ValueError(f"`combine` must be jnp.add or jnp.minimum, got {combine!r}")
    return jnp.full(shape.shape, value, shape.dtype)


def reduce_rows(operands, ops) -> tuple:
    """``ops[i]`` (``jnp.add`` or ``jnp.minimum``) of ``operands[i]`` over
    their leading (row) axis, for two or more operands of one shape, as one
    variadic reduction.

    XLA:CPU rewrites a single-operand reduction over more than 32 values into
    a tree of reduce-window kernels (three for 200 rows, each compiled
    separately); variadic reductions are exempt and fuse with the code that
    produces their operands, so each such pass is one kernel. For passes made
    once per fit, where compile time matters and run time does not.
    """
    operands = tuple(operands)
    if len(operands) < 2:
        raise ValueError("`operands` must hold at least two arrays")
    identities = [
        _identity(op, jax.ShapeDtypeStruct((), a.dtype)) for op, a in zip(ops, operands)
    ]
    return variadic_reduce(operands, identities, ops, 0)


def _chunk_at(x, sample_weight, start, size: int):
    """Rows ``[start, start + size)``: ``(x, sample_weight or None, row_index)``."""
    x_chunk = lax.dynamic_slice_in_dim(x, start, size)
    w_chunk = (
        None
        if sample_weight is None
        else lax.dynamic_slice_in_dim(sample_weight, start, size)
    )
    return x_chunk, w_chunk, start + jnp.arange(size)


def _chunk_starts(n_rows: int, chunk_size: int):
    """``(starts of the full chunks, start of the remainder or None)``."""
    n_full, remainder = divmod(n_rows, chunk_size)
    starts = jnp.arange(n_full, dtype=jnp.int32) * chunk_size
    return starts, (n_full * chunk_size if remainder else None)


def scan_chunks(x, sample_weight, chunk_size: int, step, carry):
    """The one loop over row chunks behind the passes below.

    ``step(carry, x_chunk, weight_chunk, row_index, start) -> (carry, out)``
    runs as a ``lax.scan`` over the full chunks, then once on the remainder
    (or once on everything when one chunk holds all rows). Returns
    ``(carry, stacked outs of the full chunks or None, out of the last call)``.
    """
    n_rows = x.shape[0]
    if chunk_size >= n_rows:
        carry, out = step(carry, x, sample_weight, jnp.arange(n_rows), 0)
        return carry, None, out
    starts, remainder = _chunk_starts(n_rows, chunk_size)
    carry, stacked = lax.scan(
        lambda c, start: step(
            c, *_chunk_at(x, sample_weight, start, chunk_size), start
        ),
        carry,
        starts,
    )
    if remainder is None:
        return carry, stacked, None
    size = n_rows - remainder
    carry, tail = step(carry, *_chunk_at(x, sample_weight, remainder, size), remainder)
    return carry, stacked, tail


def _partial_shapes(fn, x, sample_weight, chunk_size: int):
    """Abstract output of ``fn`` on one chunk."""
    size = min(chunk_size, x.shape[0])
    return jax.eval_shape(
        fn,
        jax.ShapeDtypeStruct((size,) + x.shape[1:], x.dtype),
        None
        if sample_weight is None
        else jax.ShapeDtypeStruct((size,), sample_weight.dtype),
        jax.ShapeDtypeStruct((size,), jnp.int32),
    )


def _identities(combine, out_shape):
    leaves, treedef = jax.tree.flatten(out_shape)
    ops = _ops(combine, len(leaves))
    return treedef.unflatten([_identity(op, a) for op, a in zip(ops, leaves)])


def reduce_chunks(x, sample_weight, chunk_size: int, fn, combine):
    """``fn(x_chunk, weight_chunk, row_index)`` over row chunks of the raw
    ``x`` (and ``sample_weight``, which may be None), combined with
    ``combine`` (one op, or a tuple of one op per output leaf).

    A ``lax.scan`` over the full chunks plus one remainder chunk: nothing the
    size of ``x`` is ever materialised.
    """
    return reduce_update_chunks(
        x, sample_weight, chunk_size, lambda *a: (fn(*a), None), combine, None
    )[0]


def reduce_update_chunks(x, sample_weight, chunk_size: int, fn, combine, out):
    """:func:`reduce_chunks` and an in-place row update in one pass.

    ``fn(x_chunk, weight_chunk, row_index) -> (partial, rows_out)``: the
    partials are combined as in :func:`reduce_chunks`, ``rows_out`` is
    written into the ``(N, ...)`` buffer ``out`` in place (``out`` None:
    nothing is written). Returns ``(combined, out)``.
    """
    if chunk_size >= x.shape[0]:
        # One chunk holds every row: its partial is the total (and tracing
        # ``fn`` a second time for the shapes of a loop carry is spared).
        partial, new = fn(x, sample_weight, jnp.arange(x.shape[0]))
        return partial, None if out is None else new.astype(out.dtype)
    partial_shape = _partial_shapes(lambda *a: fn(*a)[0], x, sample_weight, chunk_size)

    def step(carry, x_chunk, w_chunk, rows, start):
        total, out = carry
        partial, new = fn(x_chunk, w_chunk, rows)
        if out is not None:
            out = lax.dynamic_update_slice_in_dim(out, new.astype(out.dtype), start, 0)
        return (_combine(combine, total, partial), out), None

    carry = (_identities(combine, partial_shape), out)
    return scan_chunks(x, sample_weight, chunk_size, step, carry)[0]


def map_chunks(x, sample_weight, chunk_size: int, fn):
    """Row-wise ``fn(x_chunk, weight_chunk, row_index) -> (n_chunk, ...)``
    over the same chunks as :func:`reduce_chunks`, concatenated."""

    def step(_, x_chunk, w_chunk, rows, __):
        return None, fn(x_chunk, w_chunk, rows)

    _, stacked, tail = scan_chunks(x, sample_weight, chunk_size, step, None)
    if stacked is None:
        return tail
    out = stacked.reshape((-1,) + stacked.shape[2:])
    return out if tail is None else jnp.concatenate([out, tail])


def _in_blocks(fn, blocks: int, chunk_size: int):
    """``fn(x_chunk, weight_chunk, row_index)`` summed over ``blocks`` equal
    blocks of the chunk's rows; a shorter (remainder) chunk in one call.

    The blocks are unrolled on purpose: each is its own chain of operations,
    so that XLA:CPU runs them concurrently (see ``BLOCKS_PER_CHUNK``).
    """

    def blocked(x_chunk, w_chunk, rows):
        if x_chunk.shape[0] != chunk_size:
            return fn(x_chunk, w_chunk, rows)
        size = chunk_size // blocks
        pieces = [slice(i * size, (i + 1) * size) for i in range(blocks)]
        parts = [
            fn(
                x_chunk[rows_in],
                None if w_chunk is None else w_chunk[rows_in],
                rows[rows_in],
            )
            for rows_in in pieces
        ]
        return jax.tree.map(lambda *leaves: sum(leaves[1:], leaves[0]), *parts)

    return blocked


def _ops(combine, n_leaves: int) -> tuple:
    return tuple(combine) if isinstance(combine, tuple) else (combine,) * n_leaves


def _combine(combine, a, b):
    """Leaf-wise ``combine(a, b)``; ``combine`` is one op or one per leaf."""
    leaves_a, treedef = jax.tree.flatten(a)
    ops = _ops(combine, len(leaves_a))
    return treedef.unflatten(
        [op(u, v) for op, u, v in zip(ops, leaves_a, jax.tree.leaves(b))]
    )


class Data(eqx.Module):
    """Rows ``x`` with weights, their weighted centre and per-feature variance,
    and the chunk size to process them with."""

    x: Float[Array, "n d"]
    sample_weight: Float[Array, " n"] | None  # None: every row has weight 1
    centre: Float[Array, " d"]
    variance: Float[Array, " d"]
    #: Sum of the effective row weights, at least the smallest normal float
    #: so that it divides (found with the centre, once per fit).
    total_weight: Float[Array, ""]
    #: Number of rows with positive effective weight, at least 1 (found with
    #: the total): ``total_weight / n_weighted`` is the mean weight of a row
    #: that is there, the unit sklearn's ``10 * eps`` is counted in.
    n_weighted: Float[Array, ""]
    unit_weights: Bool[Array, ""]
    #: ``(N,)``: whether each row of ``x`` is finite, found once per fit so
    #: that no pass tests every entry again (None once ``prepared``).
    finite_rows: Bool[Array, " n"] | None
    chunk_size: int = eqx.field(static=True)
    #: Independent row blocks per full chunk in ``sum(..., in_blocks=True)``
    #: (see ``BLOCKS_PER_CHUNK``); 1: a chunk is one block.
    blocks: int = eqx.field(static=True, default=1)
    #: True when ``x`` and ``sample_weight`` already hold the centred,
    #: masked rows and effective weights (small data sets, see make_data).
    prepared: bool = eqx.field(static=True, default=False)

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    @property
    def weight_unit(self) -> Array:
        """Mean weight of a row that is there (see ``Stats.weight_unit``)."""
        return self.total_weight / self.n_weighted

    @property
    def origin(self) -> Array:
        """The data centre in the coordinates ``x`` is stored in."""
        return jnp.zeros_like(self.centre) if self.prepared else self.centre

    def centred(self, rows: Array) -> Array:
        """Stored rows in centred coordinates."""
        return rows - self.origin

    def weights(self, x_chunk, weight_chunk, finite=None):
        """Effective weights: 0 for non-finite rows, 1 everywhere in fallback."""
        if self.prepared:
            return weight_chunk
        if finite is None:
            finite = all_finite(x_chunk)
        dtype = x_chunk.dtype
        if weight_chunk is None:  # unit weights, in fallback or not
            return finite.astype(dtype)
        # `>= 0`, not `> 0`: a zero weight passes through unchanged (the row
        # still adds nothing), so that its derivative is not cut off.
        usable = (weight_chunk >= 0) & is_finite(weight_chunk)
        weight = jnp.where(usable, weight_chunk, 0.0).astype(dtype)
        # Fallback by arithmetic rather than a select on the scalar flag:
        # LLVM compiles a row loop once per value of each loop-invariant
        # condition it selects on (loop unswitching).
        unit = self.unit_weights.astype(dtype)
        return jnp.where(finite, weight * (1 - unit) + unit, 0.0)

    def rows(self, x_chunk, weight_chunk, row_index):
        """Centred, sanitised rows and their effective weights."""
        if self.prepared:
            return x_chunk, weight_chunk
        # Read from finite_rows: testing every entry and reducing along the
        # minor axis in each pass cost a third of the chunk's elementwise
        # work for many features (XLA:CPU reduces a minor axis serially).
        finite = lax.dynamic_slice_in_dim(
            self.finite_rows, row_index[0], x_chunk.shape[0]
        )
        xc = jnp.where(finite[:, None], x_chunk - self.centre, 0.0)
        return xc, self.weights(x_chunk, weight_chunk, finite)

    def weight_rows(self, select):
        """``select(sample_weight)``, or None when every row has weight 1."""
        return None if self.sample_weight is None else select(self.sample_weight)

    def _prepared_fn(self, fn):
        """``fn(xc, weight, rows)`` as a function of raw chunks."""
        return lambda x_chunk, w_chunk, rows: fn(
            *self.rows(x_chunk, w_chunk, rows), rows
        )

    def sum(self, fn, in_blocks: bool = False):
        """``sum over chunks of fn(xc, weight, row_index)`` for a pytree-valued fn.

        ``in_blocks``: each full chunk as ``blocks`` calls on its row blocks
        (for the EM iteration's E-step; every block is compiled on its own,
        so other passes take a chunk in one call)."""
        fn = self._prepared_fn(fn)
        if in_blocks and self.blocks > 1:
            fn = _in_blocks(fn, self.blocks, self.chunk_size)
        return reduce_chunks(self.x, self.sample_weight, self.chunk_size, fn, jnp.add)

    def map(self, fn):
        """Row-wise ``fn(xc, weight, row_index) -> (n, ...)`` over chunks, concatenated."""
        return map_chunks(
            self.x, self.sample_weight, self.chunk_size, self._prepared_fn(fn)
        )


def _survey(
    x: Float[Array, "n d"],
    sample_weight: Float[Array, " n"] | None,
    n_components: int,
    chunk_size: int,
):
    """One chunked pass over the input: ``(status, too few usable rows, first
    finite row, first finite row with positive weight, finite rows)`` (a
    missing row is reported as N; ``finite rows`` is the ``(N,)`` mask).
    Usable rows are finite with a finite positive weight.

    Chunk by chunk: a whole-array ``isfinite(x)`` would materialise an N x D
    boolean array (160 MB for 10 million rows of 16 features). The row mask
    is written in place into one N-sized buffer.
    """
    n, d = x.shape

    def first(mask, rows):
        return jnp.where(mask, rows, n).astype(jnp.int32)

    def count(mask):
        return mask.astype(jnp.int32)

    add, least = jnp.add, jnp.minimum

    def chunk(x_chunk, w_chunk, rows):
        finite = all_finite(x_chunk)
        if w_chunk is None:
            nonfinite, first_finite = reduce_rows(
                (count(~finite), first(finite, rows)), (add, least)
            )
            return (nonfinite, jnp.int32(0), first_finite), finite
        positive = finite & (w_chunk > 0) & is_finite(w_chunk)
        return reduce_rows(
            (
                count(~finite & (w_chunk != 0)),
                count(~is_finite(w_chunk) | (w_chunk < 0)),
                first(finite, rows),
                first(positive, rows),
                count(positive),
            ),
            (add, add, least, least, add),
        ), finite

    out, finite_rows = reduce_update_chunks(
        x,
        sample_weight,
        chunk_size,
        chunk,
        (jnp.add, jnp.add, jnp.minimum, jnp.minimum, jnp.add),
        jnp.zeros((n,), bool),
    )
    if sample_weight is None:
        nonfinite, negative, first_finite = out
        first_positive, usable = first_finite, n - nonfinite
    else:
        nonfinite, negative, first_finite, first_positive, usable = out
    too_few = usable < n_components
    status = jnp.where(too_few, Status.too_few_weighted_rows, 0)
    status = jnp.where(negative > 0, Status.negative_weights, status)
    status = jnp.where(nonfinite > 0, Status.nonfinite_input, status)
    return status.astype(jnp.int32), too_few, first_finite, first_positive, finite_rows


def data_status(
    x: Float[Array, "n d"], sample_weight: Float[Array, " n"] | None, n_components: int
) -> Int[Array, ""]:
    """The first problem found in the input, as a :class:`Status` code."""
    chunk = rows_per_chunk(x.shape[0], n_components, x.shape[1])
    return _survey(x, sample_weight, n_components, chunk)[0]


def make_data(
    x: Float[Array, "n d"],
    sample_weight: Float[Array, " n"] | None,
    n_components: int,
    row_width: int | None = None,
) -> tuple[Data, Int[Array, ""]]:
    """Wrap checked input: ``(data, status)``.

    Finds the first problem with the input (:func:`data_status`), masks bad
    rows, picks the centre and the chunk size. Whatever the status, the rows
    used are the usable ones (finite, with a finite positive weight) with
    their weights; only when fewer than ``n_components`` rows are usable does
    every finite row get unit weight, so that a fit can still return finite
    parameters.

    ``row_width``: the features per row of the E-step that will read the
    data; with it, large data are summed in blocks (:func:`blocked_chunking`).
    """
    n, d = x.shape
    chunk, blocks = rows_per_chunk(n, n_components, d), 1
    if row_width is not None:
        chunk, blocks = blocked_chunking(n, row_width) or (chunk, blocks)
    status, unit, first_finite, first_positive, finite = _survey(
        x, sample_weight, n_components, chunk
    )
    zeros = jnp.zeros((d,), x.dtype)
    # The centre is the first usable row plus the weighted mean offset from
    # it: no cancellation, and independent of zero-weight padding.
    # The first row with positive effective weight (see Data.weights).
    first = jnp.where(unit, first_finite, first_positive)
    first = jnp.where(first < n, first, 0)
    anchor = jnp.where(is_finite(x[first]), x[first], 0.0)
    zero = zeros[0]
    data = Data(
        x, sample_weight, anchor, zeros, zero, zero, unit, finite, chunk, blocks
    )

    def moments(xc, w, _):
        w = w[:, None]
        # `tie`: an operand with a zero derivative of its own beside operands
        # with derivatives trips the variadic reduction's JVP (jax 0.10).
        # Without sample weights the weights have none, and `jax.grad` with
        # respect to x failed. Rows and weights here are finite, so adding
        # 0 leaves every sum unchanged.
        tie = 0 * w + 0 * xc
        # One reduction for the four sums: w is repeated along the features.
        count, total, first, second = reduce_rows(
            ((w > 0).astype(xc.dtype) + tie, w + tie, w * xc, w * xc**2),
            (jnp.add,) * 4,
        )
        return count[0], total[0], first, second

    count, total, first, second = data.sum(moments)
    total = jnp.maximum(total, jnp.finfo(x.dtype).tiny)
    count = jnp.maximum(count, 1.0)
    offset = first / total
    variance = jnp.maximum(second / total - offset**2, 0.0)
    centre = anchor + offset
    data = Data(
        x, sample_weight, centre, variance, total, count, unit, finite, chunk, blocks
    )
    if chunk < n:
        return data, status
    # A data set that fits in one chunk is centred and masked once here, not
    # in every EM iteration: for thousands of small vmapped fits that removes
    # several passes over the batch per iteration. Memory is one chunk.
    xc, weight = data.rows(x, sample_weight, jnp.arange(n))
    return Data(
        xc, weight, centre, variance, total, count, unit, None, chunk, prepared=True
    ), status
