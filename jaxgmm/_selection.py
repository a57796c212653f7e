"""Model selection (BIC / AIC) and density-based anomaly thresholds."""

from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._data import data_status
from ._fit import FitResult, check_status, fit, prepare_weight, status_jit
from ._gmm import GMM, _log_prob, is_concrete, prepare_x
from ._status import Status

_NO_POSITIVE_WEIGHT = "`sample_weight` must have at least one positive weight"


def _checked_input(x, sample_weight=None):
    """``(x, sample_weight)`` checked as a fit checks them: NaN or infinite
    rows with non-zero weight, and negative or non-finite weights, raise
    ``ValueError`` when called eagerly (an equinox error under ``jit``, see
    :func:`_checked`), rather than turning the result into NaN."""
    x = prepare_x(x)
    sample_weight = prepare_weight(sample_weight, x)
    if is_concrete(x, sample_weight):
        status = int(status_jit(x, sample_weight, 1))
        if status == Status.too_few_weighted_rows:
            raise ValueError(_NO_POSITIVE_WEIGHT)
        if status != Status.success:
            raise ValueError(Status(status).message)
    return x, sample_weight


def _checked(value, x, sample_weight):
    """``value``, tied under a trace to an error raised if the input is bad."""
    if is_concrete(x, sample_weight):
        return value  # checked eagerly by _checked_input
    return check_status(value, data_status(x, sample_weight, 1))


def _total_log_likelihood(gmm: GMM, x, sample_weight):
    x, sample_weight = _checked_input(x, sample_weight)
    # Not gmm.log_prob, which rejects any non-finite row: a row of weight 0
    # may hold NaN here (it is absent, as in a fit).
    log_prob = _log_prob(gmm, gmm._check_x(x, finite=False))
    if sample_weight is None:
        total, count = jnp.sum(log_prob), jnp.asarray(x.shape[0], log_prob.dtype)
    else:
        total = jnp.sum(jnp.where(sample_weight > 0, sample_weight * log_prob, 0.0))
        count = jnp.sum(sample_weight)
    return _checked((total, count), x, sample_weight)


def bic(gmm: GMM, x: Float[Array, "n d"], sample_weight=None) -> Float[Array, ""]:
    r"""Bayesian information criterion, scikit-learn's definition (lower is better).

    :math:`\mathrm{BIC} = -2 \sum_n w_n \log p(x_n) + p \log \sum_n w_n`
    with :math:`p` = ``gmm.n_parameters``.

    Example:
        >>> jaxgmm.bic(result.gmm, x)  # doctest: +SKIP
    """
    total, count = _total_log_likelihood(gmm, x, sample_weight)
    return -2.0 * total + gmm.n_parameters * jnp.log(count)


def aic(gmm: GMM, x: Float[Array, "n d"], sample_weight=None) -> Float[Array, ""]:
    r"""Akaike information criterion, scikit-learn's definition (lower is better).

    :math:`\mathrm{AIC} = -2 \sum_n w_n \log p(x_n) + 2 p`.
    """
    total, _ = _total_log_likelihood(gmm, x, sample_weight)
    return -2.0 * total + 2.0 * gmm.n_parameters


_CRITERIA = {"bic": bic, "aic": aic}


class Selection:
    """Result of :func:`select_n_components`.

    Attributes:
        n_components: the best K (a Python int).
        candidates: the K values tried, in order.
        scores: ``(len(candidates),)`` criterion for each K (lower is better).
        result: the :class:`FitResult` for the best K.
        results: the fit result for every K, in order.
    """

    def __init__(self, n_components, candidates, scores, result, results):
        self.n_components = n_components
        self.candidates = candidates
        self.scores = scores
        self.result = result
        self.results = results

    def __repr__(self) -> str:
        return (
            f"Selection(n_components={self.n_components}, "
            f"candidates={self.candidates}, scores={np.asarray(self.scores)})"
        )


def select_n_components(
    key: PRNGKeyArray,
    x: Float[Array, "n d"],
    n_components: Iterable[int] = range(1, 7),
    *,
    criterion: str = "bic",
    **fit_kwargs,
) -> Selection:
    """Fit one mixture per K and keep the one with the lowest criterion.

    Args:
        key: PRNG key; the same key is used for every K.
        x: ``(N, D)`` data.
        n_components: the K values to try.
        criterion: ``"bic"`` or ``"aic"``.
        **fit_kwargs: passed to :func:`fit` (``covariance_type``, ``n_init``, ...).

    Example:
        >>> sel = jaxgmm.select_n_components(jax.random.key(0), x, range(1, 5))  # doctest: +SKIP
        >>> sel.n_components, sel.scores  # doctest: +SKIP
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"`criterion` must be 'bic' or 'aic', got {criterion!r}")
    candidates = [int(k) for k in n_components]
    if not candidates:
        raise ValueError("`n_components` must name at least one K")
    score_fn = _CRITERIA[criterion]
    sample_weight = fit_kwargs.get("sample_weight")
    results: list[FitResult] = []
    scores = []
    for k in candidates:
        result = fit(key, x, k, **fit_kwargs)
        results.append(result)
        scores.append(score_fn(result.gmm, x, sample_weight))
    scores = jnp.stack(scores)
    best = int(jnp.argmin(jnp.where(jnp.isnan(scores), jnp.inf, scores)))
    return Selection(candidates[best], candidates, scores, results[best], results)


def anomaly_threshold(
    gmm: GMM, x: Float[Array, "n d"], contamination: float = 0.01
) -> Float[Array, ""]:
    """Log density below which a fraction ``contamination`` of ``x`` falls.

    ``gmm.log_prob(x_new) < threshold`` then flags anomalies at that rate.

    Example:
        >>> threshold = jaxgmm.anomaly_threshold(gmm, x, 0.05)  # doctest: +SKIP
        >>> is_anomaly = gmm.log_prob(x_new) < threshold  # doctest: +SKIP
    """
    if not (isinstance(contamination, float | int) and 0 <= contamination <= 1):
        raise ValueError(f"`contamination` must be in [0, 1], got {contamination!r}")
    x, _ = _checked_input(x)
    # Checked above (eagerly): the values need no second pass.
    threshold = jnp.quantile(
        _log_prob(gmm, gmm._check_x(x, finite=False)), contamination
    )
    return _checked(threshold, x, None)
