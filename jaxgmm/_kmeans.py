"""Public k-means: weighted k-means++ seeding and Lloyd's algorithm in JAX."""

from __future__ import annotations

from functools import partial

import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._data import make_data
from ._fit import (
    check_positive_int,
    check_status,
    prepare_weight,
    raise_for_bad_data,
)
from ._gmm import prepare_x
from ._init import kmeans_labels, kmeans_plusplus, lloyd


@partial(jax.jit, static_argnames=("n_clusters", "max_iter"))
def _kmeans(key, x, sample_weight, *, n_clusters, max_iter):
    data, status = make_data(x, sample_weight, n_clusters)
    seeds, _ = kmeans_plusplus(key, data, n_clusters)
    centres, _ = lloyd(data, seeds, max_iter)
    return (centres + data.centre, kmeans_labels(data, centres)), status


def kmeans(
    key: PRNGKeyArray,
    x: Float[Array, "n d"],
    n_clusters: int,
    *,
    max_iter: int = 100,
    sample_weight: Float[Array, " n"] | None = None,
) -> tuple[Float[Array, "k d"], Int[Array, " n"]]:
    r"""Weighted k-means: k-means++ seeding, then Lloyd's algorithm.

    Minimises :math:`\sum_n w_n \min_k \|x_n - c_k\|^2`. Seeding is greedy
    k-means++ (scikit-learn's), Lloyd's iterations run in a
    ``lax.while_loop`` until the total squared centre shift is at most
    ``1e-4`` times the mean feature variance, or ``max_iter``. An empty
    cluster keeps its centre. Rows are labelled by the matrix-product
    distances :math:`|c_k|^2 - 2 x \cdot c_k`, except in float32 where they
    would lose more than ``1e-3`` of the smallest squared distance between
    two centres (close centres far from the data centre): there each row is
    compared again relative to the centre first chosen, so two tight
    clusters 1 apart and 1e4 from the centre are still told apart.
    jit- and vmap-able. Bad input (NaN or inf
    rows, negative weights, fewer usable rows than clusters) raises
    ``ValueError`` eagerly and an equinox runtime error under ``jit``.

    Returns:
        ``(centers (K, D), labels (N,))`` with int32 labels.

    Example:
        >>> centers, labels = jaxgmm.kmeans(jax.random.key(0), x, 3)  # doctest: +SKIP
    """
    n_clusters = check_positive_int("n_clusters", n_clusters)
    max_iter = check_positive_int("max_iter", max_iter, minimum=0)
    x = prepare_x(x)
    sample_weight = prepare_weight(sample_weight, x)
    raise_for_bad_data(x, sample_weight, n_clusters)
    out, status = _kmeans(
        key, x, sample_weight, n_clusters=n_clusters, max_iter=max_iter
    )
    # Bad data that only a trace sees (x traced under jit) raise at run time.
    return check_status(out, status)
