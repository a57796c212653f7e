"""EM fitting: ``em_step``, ``em_steps`` and ``fit``."""

from __future__ import annotations

import functools
import numbers
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._covariance import structure_for
from ._data import Data, data_status, make_data
from ._gmm import GMM, as_array, is_concrete, isotropic_gmm, prepare_x
from ._init import check_init, initial_gmm
from ._linalg import is_finite, vector_finite
from ._stats import e_step_row_width, em_iteration, em_iteration_redone
from ._status import MESSAGES, Status


class FitResult(eqx.Module):
    """What :func:`fit` returns (every leaf gains a leading axis under ``vmap``).

    Attributes:
        gmm: the fitted :class:`GMM`.
        log_likelihood: mean (weighted) log-likelihood per sample of the
            parameters before the last M-step: scikit-learn's ``lower_bound_``.
        n_iter: EM iterations run (int32).
        converged: whether the change in mean log-likelihood fell below ``tol``.
        history: ``(max_iter,)`` mean log-likelihood of each iteration, NaN
            after ``n_iter``.
        status: int32 :class:`Status` code; ``Status.success`` (0) when all
            went well.
    """

    gmm: GMM
    log_likelihood: Float[Array, ""]
    n_iter: Int[Array, ""]
    converged: Bool[Array, ""]
    history: Float[Array, " max_iter"]
    status: Int[Array, ""]


def shift_means(gmm: GMM, delta: Array) -> GMM:
    return eqx.tree_at(lambda g: g.means, gmm, gmm.means + delta)


# -- argument checks (Python level, before tracing) ----------------------------


def prepare_weight(sample_weight, x: Array) -> Array | None:
    """Checked weights; None stays None (unit weights, never materialised)."""
    if sample_weight is None:
        return None
    sample_weight = as_array(sample_weight, x.dtype)
    if sample_weight.shape != (x.shape[0],):
        raise ValueError(
            f"`sample_weight` must have shape ({x.shape[0]},) to match `x`, "
            f"got {sample_weight.shape}"
        )
    return sample_weight


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}, got {value}")
    return int(value)


def check_options(reg_covar, max_condition, tol=0.0) -> None:
    for name, value in (("reg_covar", reg_covar), ("tol", tol)):
        if isinstance(value, numbers.Real) and not value >= 0:
            raise ValueError(f"`{name}` must be non-negative, got {value}")
    if max_condition is not None and isinstance(max_condition, numbers.Real):
        if not max_condition >= 1:
            raise ValueError(f"`max_condition` must be at least 1, got {max_condition}")


def check_reg_covar(reg_covar, dtype) -> None:
    """``reg_covar`` must be finite in the data's dtype: an infinite one
    (1e39 in float32, say) would give zero precision factors and an infinite
    log-likelihood rather than an error."""
    if not isinstance(reg_covar, numbers.Real):
        return  # an array, possibly traced: checked no further
    if not abs(float(reg_covar)) <= float(np.finfo(dtype).max):
        raise ValueError(
            f"`reg_covar` must be finite in the data's dtype ({np.dtype(dtype)}), "
            f"got {reg_covar}"
        )


def check_gmm_matches(gmm: GMM, x: Array, name: str) -> None:
    if not isinstance(gmm, GMM):
        raise ValueError(f"`{name}` must be a jaxgmm.GMM, got {type(gmm).__name__}")
    if gmm.n_features != x.shape[1]:
        raise ValueError(
            f"`{name}` has {gmm.n_features} features but `x` has {x.shape[1]}"
        )


def cast_gmm(gmm: GMM, dtype) -> GMM:
    return jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), gmm)


status_jit = jax.jit(data_status, static_argnums=2)


def raise_for_bad_data(x: Array, sample_weight: Array, n_components: int) -> None:
    """Turn a bad-data status into a ``ValueError`` whenever the data are
    concrete: called eagerly, or closed over (a constant) inside a ``jit``."""
    if is_concrete(x, sample_weight):
        # Evaluated now even while an outer jit is tracing: the data are
        # constants there, and the answer must be a Python int.
        with jax.ensure_compile_time_eval():
            status = int(status_jit(x, sample_weight, n_components))
        if status != Status.success:
            raise ValueError(Status(status).message)


def check_status(out, status: Array):
    """``out``, unless ``status`` reports a problem: then, when the status is
    known (an eager call), ``ValueError``; under a trace, an equinox error
    attached to every leaf of ``out``, raised when any of them is used."""
    if is_concrete(status):
        status = int(status)
        if status != Status.success:
            raise ValueError(Status(status).message)
        return out
    return eqx.branched_error_if(out, status != Status.success, status, MESSAGES)


# -- EM ------------------------------------------------------------------------


def _em_data(x, sample_weight, n_components: int, covariance_type: str):
    """``make_data`` for EM: chunked (in row blocks where the E-step of this
    covariance type takes them, see ``e_step_row_width``)."""
    row_width = e_step_row_width(covariance_type, x)
    return make_data(x, sample_weight, n_components, row_width)


def _em_loop(
    gmm: GMM,
    data: Data,
    max_iter: int,
    tol,
    reg_covar,
    max_condition,
    anchored: bool = False,
):
    """sklearn's EM loop: E-step (log-likelihood of the current parameters),
    M-step, stop once the log-likelihood changes by less than ``tol``.

    Returns ``(gmm, log_likelihood, n_iter, converged, history, lost)``:
    ``lost`` is whether the last iteration's matrix-product E-step lost
    precision (see ``em_iteration``; never with ``anchored``). The loop
    itself never switches E-step: a ``lax.cond`` between the two in the loop
    made the common diag iteration ~4% slower and added ~0.3 s of compile
    time (XLA:CPU); ``fit`` refits with ``anchored`` instead.
    """
    dtype = data.x.dtype

    def step(carry, _):
        gmm, iteration, history, previous, converged, lost = carry
        new, log_likelihood, lost_now = em_iteration(
            gmm, data, reg_covar, max_condition, anchored=anchored
        )
        active = ~converged & (iteration < max_iter)
        if lost_now is not False:
            lost = jnp.where(active, lost_now, lost)
        gmm = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, gmm)
        # A select rather than a scatter: under vmap the iteration differs
        # between fits, and the scatter cost a copy of the batch's history.
        history = jnp.where(
            active & (jnp.arange(max_iter) == iteration), log_likelihood, history
        )
        converged = converged | (active & (jnp.abs(log_likelihood - previous) < tol))
        previous = jnp.where(active, log_likelihood, previous)
        return (
            gmm,
            iteration + active.astype(jnp.int32),
            history,
            previous,
            converged,
            lost,
        ), None

    def cond(carry):
        _, iteration, _, _, converged, _ = carry
        return (iteration < max_iter) & ~converged

    def body(carry):
        # The step sits in a one-iteration scan with its update masked by
        # `active`: XLA:CPU runs the identical step ~2.5x slower when it is
        # placed directly in a while-loop body (measured, jaxlib 0.10).
        return lax.scan(step, carry, None, length=1)[0]

    carry = (
        gmm,
        jnp.array(0, jnp.int32),
        jnp.full((max_iter,), jnp.nan, dtype),
        jnp.array(-jnp.inf, dtype),
        jnp.array(False),
        jnp.array(False),
    )
    gmm, n_iter, history, log_likelihood, converged, lost = lax.while_loop(
        cond, body, carry
    )
    return gmm, log_likelihood, n_iter, converged, history, lost


@partial(
    jax.jit,
    static_argnames=(
        "n_components",
        "covariance_type",
        "max_iter",
        "init",
        "n_init",
        "e_step",
    ),
)
def _fit(
    key,
    x,
    sample_weight,
    init_gmm,
    tol,
    reg_covar,
    max_condition,
    *,
    n_components,
    covariance_type,
    max_iter,
    init,
    n_init,
    e_step="auto",
):
    # Bad data are masked inside make_data; the status reports them (fit turns
    # it into an error with throw=True).
    data, status = _em_data(x, sample_weight, n_components, covariance_type)

    def run(key):
        if init_gmm is None:
            start = initial_gmm(
                key, data, n_components, covariance_type, init, reg_covar, max_condition
            )
        else:
            start = shift_means(init_gmm, -data.centre)
        anchored = e_step == "anchored"
        return _em_loop(start, data, max_iter, tol, reg_covar, max_condition, anchored)

    if n_init == 1:
        gmm, log_likelihood, n_iter, converged, history, lost = run(key)
    else:
        runs = jax.vmap(run)(jax.random.split(key, n_init))
        scores = jnp.where(jnp.isnan(runs[1]), -jnp.inf, runs[1])
        best = jnp.argmax(scores)
        gmm, log_likelihood, n_iter, converged, history, _ = jax.tree.map(
            lambda leaf: leaf[best], runs
        )
        # Every restart is refitted, or none: any of them could have won.
        lost = jnp.any(runs[5])
    gmm = shift_means(gmm, data.centre)
    # One test over every parameter: one small kernel rather than a
    # reduction per leaf and their conjunction.
    finite = vector_finite(
        jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(gmm)])
    )
    status = jnp.where(
        (status == Status.success) & ~finite, Status.nonfinite_parameters, status
    )
    status = jnp.where(
        (status == Status.success) & lost, Status.precision_loss, status
    ).astype(jnp.int32)
    # Parameters that overflowed (data near the float limit, say) are replaced
    # by a harmless finite mixture, so that a batch never carries NaN or inf.
    gmm = jax.tree.map(
        lambda a, b: jnp.where(finite, a, b), gmm, _placeholder_gmm(gmm, data)
    )
    return FitResult(gmm, log_likelihood, n_iter, converged, history, status)


def _placeholder_gmm(like: GMM, data) -> GMM:
    """Equal weights, every mean at the data centre (0 if that is not finite),
    unit covariances: the parameters reported when a fit did not give finite
    ones."""
    centre = jnp.where(is_finite(data.centre), data.centre, 0.0)
    means = jnp.broadcast_to(centre, like.means.shape).astype(like.means.dtype)
    return isotropic_gmm(means, 1.0, like.covariance_type)


# Elements (rows * K * D) per block when a batch of fits is vmapped: a block's
# working set stays in cache, which is ~1.6x faster for 10,000 small fits.
BLOCK_ELEMENTS = 1 << 20


def _divisor_block(axis_size: int, block: int) -> int:
    """A block size near ``block`` that divides ``axis_size`` if one exists:
    ``lax.map`` compiles a remainder block separately, doubling compile time."""
    if axis_size <= block:
        return axis_size
    for size in range(block, block // 2, -1):
        if axis_size % size == 0:
            return size
    return block


@functools.lru_cache(maxsize=256)
def _batchable_fit(n_rows: int, n_features: int, **static):
    """``_fit`` with a vmap rule that runs a batch in cache-sized blocks.

    Under ``jax.vmap`` the batch is processed by ``lax.map(..., batch_size)``:
    each block is vmapped as usual, blocks run one after another. Only the
    batched leaves are mapped; unbatched ones (a shared ``x``, say) are
    closed over, never replicated.
    """
    run = partial(_fit, **static)
    block = max(1, BLOCK_ELEMENTS // (n_rows * n_features * static["n_components"]))

    @custom_vmap
    def fit_one(*args):
        return run(*args)

    @fit_one.def_vmap
    def fit_batch(axis_size, in_batched, *args):
        leaves, treedef = jax.tree.flatten(args)
        flags = jax.tree.leaves(in_batched)
        mapped = [leaf for leaf, batched in zip(leaves, flags) if batched]

        def one(mapped_leaves):
            supply = iter(mapped_leaves)
            full = [next(supply) if b else leaf for leaf, b in zip(leaves, flags)]
            return run(*jax.tree.unflatten(treedef, full))

        out = lax.map(one, mapped, batch_size=_divisor_block(axis_size, block))
        return out, jax.tree.map(lambda _: True, out)

    return fit_one


def fit(
    key: PRNGKeyArray,
    x: Float[Array, "n d"],
    n_components: int,
    *,
    covariance_type: str = "full",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_condition: float | None = None,
    init: str = "kmeans++",
    n_init: int = 1,
    init_gmm: GMM | None = None,
    sample_weight: Float[Array, " n"] | None = None,
    throw: bool = True,
    e_step: str = "auto",
) -> FitResult:
    r"""Fit a Gaussian mixture to ``x`` by expectation-maximisation.

    Each iteration ``i`` computes the mean (weighted) log-likelihood of the
    current parameters in its E-step (``history[i]``) and then makes its
    M-step; the loop stops once ``abs(history[i] - history[i-1]) < tol`` or
    after ``max_iter`` iterations, exactly as scikit-learn's
    ``GaussianMixture``. With ``tol=0`` exactly ``max_iter`` iterations run.
    The loop is a ``lax.while_loop`` and rows are processed in chunks with
    ``lax.scan``, so memory does not grow with N * K * D.

    Args:
        key: PRNG key for the initialisation.
        x: ``(N, D)`` data.
        n_components: number of components K.
        covariance_type: ``"full"``, ``"diag"``, ``"spherical"`` or ``"tied"``.
        max_iter: maximum EM iterations (at least 1).
        tol: convergence threshold on the change in mean log-likelihood.
        reg_covar: added to every covariance's diagonal.
        max_condition: cap on each covariance's condition number (eigenvalues
            are raised to at least ``largest / max_condition``); None for no cap.
        init: ``"kmeans++"``, ``"kmeans"``, ``"random"`` or ``"random_from_data"``.
        n_init: restarts (vmapped over keys); the best log-likelihood is kept.
        init_gmm: start from these parameters instead (a warm start).
        sample_weight: ``(N,)`` non-negative row weights; 0 means the row is
            absent, so zero-weight padding gives the same fit.
        throw: if True, bad input, or a fit whose parameters are not finite,
            raises (``ValueError`` eagerly, an equinox runtime error under
            ``jit``); if False it is reported in ``result.status`` and the
            parameters are still finite: fitted to the usable rows (finite,
            with a finite positive weight) with their weights, to every finite
            row with unit weight when fewer than ``n_components`` rows are
            usable, and replaced by equal weights, means at the data centre
            and unit covariances if the fit itself did not give finite ones.
        e_step: ``"auto"`` or ``"anchored"``. With more than four features
            the E-step's distances and scatter are matrix products about the
            data centre, which in float32 lose about ``eps`` times the
            squared distance (in standard deviations) of a component from
            that centre. The ``"anchored"`` E-step takes every row relative
            to its nearest mean instead (1.5-2.5x the cost per iteration).
            ``"auto"`` checks every iteration; where more than ``1e-3`` is
            lost (tight clusters hundreds of standard deviations apart), a
            fit called eagerly is made again with ``"anchored"`` (same key,
            same start), and one under a transformation (``jit``, ``vmap``)
            reports ``Status.precision_loss``: raise with ``throw=True``, or
            pass ``e_step="anchored"``.

    Returns:
        A :class:`FitResult`.

    Example:
        >>> import jax, jaxgmm
        >>> x = jax.random.normal(jax.random.key(0), (500, 2))
        >>> result = jaxgmm.fit(jax.random.key(1), x, 3)
        >>> result.gmm.means.shape
        (3, 2)
        >>> keys = jax.random.split(jax.random.key(2), 8)
        >>> xs = jax.random.normal(jax.random.key(3), (8, 200, 2))
        >>> batch = jax.vmap(lambda k, x: jaxgmm.fit(k, x, 3))(keys, xs)
        >>> batch.gmm.weights.shape
        (8, 3)
    """
    structure_for(covariance_type)
    check_init(init)
    if e_step not in ("auto", "anchored"):
        raise ValueError(f"`e_step` must be 'auto' or 'anchored', got {e_step!r}")
    n_components = check_positive_int("n_components", n_components)
    max_iter = check_positive_int("max_iter", max_iter)
    n_init = check_positive_int("n_init", n_init)
    check_options(reg_covar, max_condition, tol)
    x = prepare_x(x)
    check_reg_covar(reg_covar, x.dtype)
    sample_weight = prepare_weight(sample_weight, x)
    if init_gmm is not None:
        check_gmm_matches(init_gmm, x, "init_gmm")
        if init_gmm.covariance_type != covariance_type:
            raise ValueError(
                f"`init_gmm` has covariance_type={init_gmm.covariance_type!r} but "
                f"`covariance_type` is {covariance_type!r}"
            )
        if init_gmm.n_components != n_components:
            raise ValueError(
                f"`init_gmm` has {init_gmm.n_components} components but "
                f"`n_components` is {n_components}"
            )
        init_gmm = cast_gmm(init_gmm, x.dtype)
    if throw:
        raise_for_bad_data(x, sample_weight, n_components)

    def run(e_step):
        fit_fn = _batchable_fit(
            x.shape[0],
            x.shape[1],
            n_components=n_components,
            covariance_type=covariance_type,
            max_iter=max_iter,
            init=init,
            n_init=n_init,
            e_step=e_step,
        )
        return fit_fn(
            key,
            x,
            sample_weight,
            init_gmm,
            jnp.asarray(tol, x.dtype),
            jnp.asarray(reg_covar, x.dtype),
            None if max_condition is None else jnp.asarray(max_condition, x.dtype),
        )

    result = run(e_step)
    if is_concrete(result.status) and int(result.status) == Status.precision_loss:
        # Called eagerly: the anchored program is compiled only when needed.
        result = run("anchored")
    # Eagerly, a problem only the fit finds (parameters that are not finite)
    # raises ValueError like bad input does.
    return check_status(result, result.status) if throw else result


@partial(jax.jit, static_argnames=("n_steps",))
def _em_steps(gmm, x, sample_weight, reg_covar, max_condition, *, n_steps):
    data, status = _em_data(x, sample_weight, gmm.n_components, gmm.covariance_type)

    def step(gmm, _):
        return em_iteration_redone(gmm, data, reg_covar, max_condition)

    gmm, log_likelihoods = lax.scan(
        step, shift_means(gmm, -data.centre), None, length=n_steps
    )
    return (shift_means(gmm, data.centre), log_likelihoods), status


def _prepare_steps(gmm, x, sample_weight, reg_covar, max_condition):
    x = prepare_x(x)
    check_gmm_matches(gmm, x, "gmm")
    check_options(reg_covar, max_condition)
    check_reg_covar(reg_covar, x.dtype)
    sample_weight = prepare_weight(sample_weight, x)
    raise_for_bad_data(x, sample_weight, gmm.n_components)
    max_condition = (
        None if max_condition is None else jnp.asarray(max_condition, x.dtype)
    )
    return (
        cast_gmm(gmm, x.dtype),
        x,
        sample_weight,
        jnp.asarray(reg_covar, x.dtype),
        max_condition,
    )


def em_step(
    gmm: GMM,
    x: Float[Array, "n d"],
    sample_weight: Float[Array, " n"] | None = None,
    *,
    reg_covar: float = 1e-6,
    max_condition: float | None = None,
) -> tuple[GMM, Float[Array, ""]]:
    """One E-step and one M-step.

    Returns ``(new_gmm, mean_log_likelihood_of_gmm)``: the log-likelihood is
    that of the *input* parameters, as in scikit-learn's loop.

    Example:
        >>> new_gmm, log_likelihood = jaxgmm.em_step(gmm, x)  # doctest: +SKIP
    """
    args = _prepare_steps(gmm, x, sample_weight, reg_covar, max_condition)
    out, status = _em_steps(*args, n_steps=1)
    new_gmm, log_likelihoods = check_status(out, status)
    return new_gmm, log_likelihoods[0]


def em_steps(
    gmm: GMM,
    x: Float[Array, "n d"],
    n_steps: int,
    sample_weight: Float[Array, " n"] | None = None,
    *,
    reg_covar: float = 1e-6,
    max_condition: float | None = None,
) -> GMM:
    """Exactly ``n_steps`` EM steps as a ``lax.scan``, with no stopping rule.

    Being a fixed-length scan, it is differentiable: ``jax.grad`` of any loss
    of the returned mixture works with respect to ``x``, ``sample_weight``
    and the array leaves of ``gmm``.

    Example:
        >>> loss = lambda x: jaxgmm.em_steps(gmm, x, 10).means.sum()  # doctest: +SKIP
        >>> jax.grad(loss)(x).shape  # doctest: +SKIP
        (N, D)
    """
    n_steps = check_positive_int("n_steps", n_steps, minimum=0)
    args = _prepare_steps(gmm, x, sample_weight, reg_covar, max_condition)
    out, status = _em_steps(*args, n_steps=n_steps)
    return check_status(out, status)[0]
