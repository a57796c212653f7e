"""The Gaussian mixture model: an immutable pytree with density methods."""

from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._covariance import (
    CovarianceStructure,
    log_normaliser,
    squared_distances,
    structure_for,
)
from ._linalg import UNROLL_MAX_DIM, all_finite


def is_concrete(*arrays) -> bool:
    """True when no argument is a tracer, so values can be checked eagerly."""
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(arrays))


def as_array(value, dtype=None) -> Array:
    """``jnp.asarray(value, dtype)``, kept concrete when ``value`` is not a
    tracer (inside a ``jit`` trace, a closed-over numpy array would otherwise
    become a tracer and escape the eager checks)."""
    if isinstance(value, jax.core.Tracer):
        return jnp.asarray(value, dtype)
    with jax.ensure_compile_time_eval():
        return jnp.asarray(value, dtype)


def float_dtype(dtype):
    """The dtype jaxgmm computes in for inputs of ``dtype``: float32 and
    float64 as they are; integers, booleans and half precision (float16,
    bfloat16: too few bits for EM's sums and for ``10 * eps``) as JAX's
    default float (float32, or float64 with ``jax_enable_x64``)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.result_type(float))


def prepare_x(x) -> Array:
    """``x`` as a non-empty 2-D float array; ``ValueError`` naming ``x``.

    Integer and half-precision input is converted to float32 (see
    :func:`float_dtype`).
    """
    x = as_array(x)
    if x.ndim != 2:
        raise ValueError(f"`x` must be a 2-D array (N, D), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"`x` must have at least one row and one column, got {x.shape}"
        )
    dtype = float_dtype(x.dtype)
    if x.dtype != dtype:
        x = as_array(x, dtype)
    return x


#: Up to this many components a draw's component is found by comparing its
#: uniform with every cumulative weight (one fused pass: 0.1 ms for 100,000
#: draws), beyond by binary search. Comparing with all costs O(K) per draw
#: and falls off a cliff past 32 (64: 2.7 ms, 256: 46 ms; binary search
#: ~1 ms for either).
COMPARE_ALL_MAX = 32


def inverse_cdf(
    values: Float[Array, " n"], target: Array, cumulative: Array | None = None
) -> Int[Array, "..."]:
    """First index whose cumulative sum exceeds ``target``, never a zero entry.

    ``cumulative`` is ``jnp.cumsum(values)`` when the caller already has it. A
    target at or past the total (rounding) gets the first index where the
    cumulative sum reaches its total, a positive entry (0 if none is): it is
    found by the same search, as the count of sums below the total.
    """
    if cumulative is None:
        cumulative = jnp.cumsum(values)
    total = cumulative[-1]
    below_total = jnp.nextafter(total, jnp.array(-jnp.inf, total.dtype))
    queries = jnp.append(jnp.ravel(target), below_total)
    # For a few values, counting the sums below each query is one fused pass
    # and compiles to fewer kernels than a binary-search loop.
    method = "compare_all" if cumulative.shape[0] <= COMPARE_ALL_MAX else "scan"
    index = jnp.searchsorted(cumulative, queries, side="right", method=method)
    last = jnp.where(total > 0, index[-1], 0)
    return jnp.minimum(index[:-1].reshape(jnp.shape(target)), last)


class GMM(eqx.Module):
    r"""A Gaussian mixture :math:`p(x) = \sum_k \pi_k \mathcal{N}(x | \mu_k, \Sigma_k)`.

    An immutable pytree (``equinox.Module``): ``weights``, ``means`` and
    ``precisions_cholesky`` are its array leaves, ``covariance_type`` is static.
    A batch of mixtures is a ``GMM`` whose leaves carry leading batch axes,
    as ``jax.vmap`` produces.

    Covariances are stored as the Cholesky factor of each precision matrix,
    with scikit-learn's shapes and meaning: ``full`` (K, D, D) upper
    triangular :math:`P_k` with :math:`\Sigma_k^{-1} = P_k P_k^T`; ``diag``
    (K, D) and ``spherical`` (K,) inverse standard deviations; ``tied``
    (D, D), one factor shared by every component.

    Args:
        weights: ``(K,)`` non-negative mixing weights summing to one.
        means: ``(K, D)`` component means.
        covariances: scikit-learn shaped covariances (see above).
        covariance_type: ``"full"``, ``"diag"``, ``"spherical"`` or ``"tied"``.

    Construction from concrete arrays validates them and raises
    ``ValueError`` naming the offending argument.

    Example:
        >>> import jax, jax.numpy as jnp, jaxgmm
        >>> gmm = jaxgmm.GMM(jnp.array([0.3, 0.7]), jnp.array([[0.0], [3.0]]),
        ...                  jnp.array([[[1.0]], [[0.5]]]))
        >>> gmm.log_prob(jnp.array([[0.0], [3.0]])).shape
        (2,)
    """

    weights: Float[Array, " k"]
    means: Float[Array, "k d"]
    precisions_cholesky: Array
    covariance_type: str = eqx.field(static=True)

    def __init__(
        self,
        weights,
        means,
        covariances=None,
        covariance_type: str = "full",
        *,
        precisions_cholesky=None,
    ):
        structure = structure_for(covariance_type)
        if (covariances is None) == (precisions_cholesky is None):
            raise ValueError(
                "give exactly one of `covariances` and `precisions_cholesky`"
            )
        weights = jnp.asarray(weights)
        means = jnp.asarray(means)
        # Weights given in half precision were rounded at that precision.
        weight_eps = max(_eps(weights.dtype), _eps(means.dtype))
        dtype = float_dtype(means.dtype)
        means = means.astype(dtype)
        weights = weights.astype(dtype)
        if covariances is not None:
            covariances = jnp.asarray(covariances).astype(dtype)
            concrete = is_concrete(weights, means, covariances)
            if concrete:
                _check_parameters(structure, weights, means, covariances, weight_eps)
            precisions_cholesky = structure.precisions_cholesky_from_covariances(
                covariances
            )
            if concrete:
                _check_factor_of_covariances(
                    structure, precisions_cholesky, means.shape[-2], means.shape[-1]
                )
        else:
            precisions_cholesky = jnp.asarray(precisions_cholesky).astype(dtype)
            if is_concrete(weights, means, precisions_cholesky):
                structure.check_precisions_cholesky(
                    np.asarray(precisions_cholesky), means.shape[-2], means.shape[-1]
                )
                covariances = structure.covariances_from_precisions_cholesky(
                    precisions_cholesky
                )
                _check_parameters(
                    structure,
                    weights,
                    means,
                    covariances,
                    weight_eps,
                    "precisions_cholesky",
                )
        self.weights = weights
        self.means = means
        self.precisions_cholesky = precisions_cholesky
        self.covariance_type = covariance_type

    @classmethod
    def from_precisions_cholesky(
        cls, weights, means, precisions_cholesky, covariance_type: str = "full"
    ) -> GMM:
        """Build a mixture from scikit-learn shaped precision Cholesky factors."""
        return cls(
            weights,
            means,
            covariance_type=covariance_type,
            precisions_cholesky=precisions_cholesky,
        )

    # -- shapes and derived parameters ------------------------------------

    @property
    def structure(self) -> type[CovarianceStructure]:
        return structure_for(self.covariance_type)

    @property
    def n_components(self) -> int:
        """Number of components K (a Python int)."""
        return self.means.shape[-2]

    @property
    def n_features(self) -> int:
        """Number of features D (a Python int)."""
        return self.means.shape[-1]

    @property
    def covariances(self) -> Array:
        """Covariances in scikit-learn's shape for ``covariance_type``."""
        return self.structure.covariances_from_precisions_cholesky(
            self.precisions_cholesky
        )

    @property
    def full_covariances(self) -> Float[Array, "k d d"]:
        """Covariances as ``(K, D, D)`` matrices, whatever the covariance type."""
        return self.structure.to_full(
            self.covariances, self.n_components, self.n_features
        )

    @property
    def n_parameters(self) -> int:
        """Free parameters, scikit-learn's count: covariances + means + K - 1."""
        k, d = self.n_components, self.n_features
        return self.structure.n_covariance_parameters(k, d) + k * d + k - 1

    # -- densities ----------------------------------------------------------

    def joint_log_prob(self, x: Float[Array, "n d"]) -> Float[Array, "k n"]:
        """``log pi_k + log N(x_n | mu_k, Sigma_k)``, component-major, unchecked.

        The public density methods all use it. With more than
        ``UNROLL_MAX_DIM`` features the rows and means are first taken
        relative to the mixture's mean, so that data far from the origin keep
        their precision in float32; where the components are still too far
        apart for the matrix-product distances, each row is taken relative
        to its nearest mean (see ``_covariance.loses_precision``).
        """
        structure = self.structure
        means = self.means
        if self.n_features > UNROLL_MAX_DIM:
            origin = self.weights @ means
            x, means = x - origin, means - origin
        squared = squared_distances(structure, x, means, self.precisions_cholesky)
        return self.joint_log_prob_from_squared(squared)

    def joint_log_prob_from_squared(
        self, squared: Float[Array, "k n"]
    ) -> Float[Array, "k n"]:
        """``joint_log_prob`` from the squared Mahalanobis distances."""
        log_det = self.structure.log_det_precisions_cholesky(
            self.precisions_cholesky, self.n_components, self.n_features
        )
        offset = log_det + jnp.log(self.weights) - log_normaliser(self.n_features)
        return -0.5 * squared + offset[:, None]

    def component_log_prob(self, x: Float[Array, "n d"]) -> Float[Array, "n k"]:
        r"""``(N, K)`` joint log densities :math:`\log \pi_k + \log \mathcal{N}(x_n | \mu_k, \Sigma_k)`.

        Example:
            >>> gmm.component_log_prob(x).shape  # doctest: +SKIP
            (N, K)
        """
        return _component_log_prob(self, self._check_x(x))

    def log_prob(self, x: Float[Array, "n d"]) -> Float[Array, " n"]:
        r"""``(N,)`` log density :math:`\log p(x_n)`, by log-sum-exp over components.

        Example:
            >>> gmm.log_prob(x).shape  # doctest: +SKIP
            (N,)
        """
        return _log_prob(self, self._check_x(x))

    def responsibilities(self, x: Float[Array, "n d"]) -> Float[Array, "n k"]:
        r"""``(N, K)`` posterior :math:`p(z_n = k | x_n)`; rows sum to one.

        Computed in log space, so far-off points still get a valid row.
        """
        return _responsibilities(self, self._check_x(x))

    def predict(self, x: Float[Array, "n d"]) -> Int[Array, " n"]:
        """``(N,)`` int32 index of the most responsible component per row."""
        return _predict(self, self._check_x(x))

    def score(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        r"""``(N, D)`` gradient of the log density with respect to each row.

        :math:`\nabla_x \log p(x) = -\sum_k r_k(x)\, \Sigma_k^{-1} (x - \mu_k)`.
        """
        return _score(self, self._check_x(x))

    def sample(
        self, key: PRNGKeyArray, n: int
    ) -> tuple[Float[Array, "n d"], Int[Array, " n"]]:
        """Draw ``n`` points: returns ``(x (n, D), z (n,))`` with component labels.

        Each draw picks its component first and then transforms standard
        normal noise with only that component's factor: O(D^2) per draw,
        independent of K.

        Example:
            >>> x, z = gmm.sample(jax.random.key(0), 100)  # doctest: +SKIP
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"`n` must be a non-negative int, got {n!r}")
        return _sample(self, key, int(n))

    def _draw(self, key: PRNGKeyArray, n: int):
        key_labels, key_noise = jax.random.split(key)
        # Inverse CDF over the cumulative weights: O(log K) per draw, where
        # jax.random.categorical would draw K Gumbel variates per sample.
        u = jax.random.uniform(key_labels, (int(n),), self.weights.dtype)
        labels = inverse_cdf(self.weights, u * jnp.sum(self.weights))
        labels = labels.astype(jnp.int32)
        noise = jax.random.normal(
            key_noise, (int(n), self.n_features), self.means.dtype
        )
        factor = self.structure.sampling_factor(self.precisions_cholesky)
        x = self.means[labels] + self.structure.scale_noise(factor, noise, labels)
        return x, labels

    def _check_x(self, x, finite: bool = True) -> Array:
        """``x`` for the density methods: 2-D, ``n_features`` columns, and
        (when concrete: called eagerly, or a constant inside a ``jit``)
        finite, as scikit-learn requires. Under a trace the values are not
        checked: a row with NaN or inf gets NaN densities, responsibilities
        and score, and an arbitrary label from ``predict``. ``finite=False``
        skips the values (for callers that mask rows by weight)."""
        x = prepare_x(x)
        if x.shape[1] != self.n_features:
            raise ValueError(
                f"`x` has {x.shape[1]} features but the mixture has {self.n_features}"
            )
        if finite and is_concrete(x):
            with jax.ensure_compile_time_eval():
                values_finite = bool(_all_finite(x))
            if not values_finite:
                raise ValueError(
                    "`x` contains NaN or infinite values; the density methods need "
                    "finite rows"
                )
        return x


# The public density methods run as one compiled function each (cached per
# shape): op by op, their first call on a new shape took about a second.


@jax.jit
def _all_finite(x: Array) -> Array:
    return all_finite(x, axis=None)


@jax.jit
def _component_log_prob(gmm: GMM, x: Array) -> Array:
    return gmm.joint_log_prob(x).T


@jax.jit
def _log_prob(gmm: GMM, x: Array) -> Array:
    return jax.nn.logsumexp(gmm.joint_log_prob(x), axis=0)


@jax.jit
def _responsibilities(gmm: GMM, x: Array) -> Array:
    return jax.nn.softmax(gmm.joint_log_prob(x), axis=0).T


@jax.jit
def _predict(gmm: GMM, x: Array) -> Array:
    return jnp.argmax(gmm.joint_log_prob(x), axis=0).astype(jnp.int32)


@jax.jit
def _score(gmm: GMM, x: Array) -> Array:
    return jax.grad(lambda rows: jnp.sum(_log_prob(gmm, rows)))(x)


@partial(jax.jit, static_argnums=2)
def _sample(gmm: GMM, key: PRNGKeyArray, n: int):
    return gmm._draw(key, n)


def isotropic_gmm(means: Array, scale, covariance_type: str) -> GMM:
    """Equal weights, the given ``(K, D)`` means and covariances ``scale**2``
    times the identity: the neutral mixture fits fall back on."""
    k, d = means.shape
    return GMM.from_precisions_cholesky(
        jnp.full((k,), 1.0 / k, means.dtype),
        means,
        structure_for(covariance_type).identity(k, d, means.dtype) / scale,
        covariance_type,
    )


#: Largest accepted ``abs(sum(weights) - 1)``, beyond the rounding of the sum.
WEIGHT_SUM_TOLERANCE = 1e-6


def _check_factor_of_covariances(structure, precisions_cholesky, k: int, d: int):
    """Covariances that pass the float64 eigenvalue test but are singular to
    rounding (eigenvalues of ~1e-16) have no finite Cholesky factor in their
    own dtype: say so, naming ``covariances``, rather than build a mixture
    whose densities are NaN."""
    try:
        structure.check_precisions_cholesky(np.asarray(precisions_cholesky), k, d)
    except ValueError:
        raise ValueError(
            "`covariances` must be positive definite: at least one is singular "
            f"in {precisions_cholesky.dtype} (its Cholesky factor is not finite)"
        ) from None


def _eps(dtype) -> float:
    """Machine epsilon of a float dtype (of float32 for any other)."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.dtype(jnp.float32)
    return float(jnp.finfo(dtype).eps)


def _check_parameters(
    structure,
    weights,
    means,
    covariances,
    weight_eps: float,
    covariance_name: str = "covariances",
):
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    covariances = np.asarray(covariances, dtype=np.float64)
    if weights.ndim != 1:
        raise ValueError(f"`weights` must be 1-D (K,), got shape {weights.shape}")
    if means.ndim != 2:
        raise ValueError(f"`means` must be 2-D (K, D), got shape {means.shape}")
    k, d = means.shape
    if weights.shape[0] != k:
        raise ValueError(
            f"`weights` has {weights.shape[0]} components but `means` has {k}"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("`weights` must be finite and non-negative")
    # Rounding of K weights in the parameters' dtype, and no more: a looser
    # tolerance would let a mixture whose density does not integrate to 1 in.
    tolerance = WEIGHT_SUM_TOLERANCE + 4 * k * weight_eps
    if not abs(weights.sum() - 1.0) <= tolerance:
        raise ValueError(f"`weights` must sum to 1, got {weights.sum():.8g}")
    if not np.all(np.isfinite(means)):
        raise ValueError("`means` contains NaN or infinite values")
    try:
        structure.check_covariances(covariances, k, d)
    except ValueError as error:
        message = str(error).replace("`covariances`", f"`{covariance_name}`")
        raise ValueError(message) from None
