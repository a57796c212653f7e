"""Plots of a mixture, of a model-selection criterion and of an EM trace.

matplotlib is an optional dependency (``pip install 'jaxgmm[plot]'``); it is
imported when a plot function is called, never when jaxgmm is imported.
Every function draws on ``ax`` (the current axes when None) and returns it,
so plots compose with the rest of a matplotlib figure.

Example:
    >>> import jax, jaxgmm, matplotlib.pyplot as plt
    >>> from jaxgmm.plot import plot_gmm, plot_history
    >>> x = jax.random.normal(jax.random.key(0), (300, 2))
    >>> result = jaxgmm.fit(jax.random.key(1), x, 2)
    >>> fig, (left, right) = plt.subplots(1, 2)
    >>> _ = plot_gmm(result.gmm, x, ax=left)
    >>> _ = plot_history(result, ax=right)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._fit import FitResult
from ._gmm import GMM

# Ellipses are drawn at this many standard deviations: in two dimensions the
# 2-sigma ellipse of a Gaussian holds 1 - exp(-2) = 86% of its mass.
_ELLIPSE_STDS = 2.0
# Contours of the log density, this far below its peak (natural log units).
_CONTOUR_DEPTHS = (7.0, 5.5, 4.0, 3.0, 2.0, 1.25, 0.5)
_GRID_SIZE = 120

__all__ = ["plot_criterion", "plot_gmm", "plot_history"]


def _import_matplotlib():
    try:
        import matplotlib  # noqa: F401
        import matplotlib.patches  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "jaxgmm.plot needs matplotlib, an optional dependency: "
            "pip install 'jaxgmm[plot]'"
        ) from error
    return matplotlib


def _axes(ax):
    """``ax`` itself, or pyplot's current axes when None."""
    _import_matplotlib()
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.gca()


def _marginal_gmm(gmm: GMM, features: Sequence[int]) -> GMM:
    """The mixture of the ``features`` columns alone, as a ``full`` GMM.

    Marginalising a Gaussian mixture over the other features keeps the weights
    and takes the sub-vector of each mean and the sub-block of each covariance.
    """
    picked = list(features)
    covariances = np.asarray(gmm.full_covariances, dtype=np.float64)[:, picked][
        :, :, picked
    ]
    means = np.asarray(gmm.means, dtype=np.float64)[:, picked]
    dtype = gmm.means.dtype
    return GMM(
        jnp.asarray(gmm.weights, dtype),
        jnp.asarray(means, dtype),
        jnp.asarray(covariances, dtype),
        "full",
    )


def _check_single_mixture(gmm) -> None:
    if not isinstance(gmm, GMM):
        raise ValueError(f"`gmm` must be a jaxgmm.GMM, got {type(gmm).__name__}")
    if jnp.ndim(gmm.weights) != 1:
        raise ValueError(
            "`gmm` is a batch of mixtures; plot one at a time, e.g. "
            "jax.tree.map(lambda leaf: leaf[0], gmm)"
        )


def _check_features(features, n_features: int) -> tuple[int, int]:
    if n_features < 2:
        raise ValueError("plot_gmm needs a mixture with at least 2 features")
    try:
        first, second = (int(f) for f in features)
    except (TypeError, ValueError):
        raise ValueError(
            f"`features` must be two feature indices, got {features!r}"
        ) from None
    for feature in (first, second):
        if not 0 <= feature < n_features:
            raise ValueError(
                f"`features` index {feature} is out of range for {n_features} features"
            )
    if first == second:
        raise ValueError(f"`features` must be two different indices, got {features!r}")
    return first, second


def _component_colours(n_components: int) -> np.ndarray:
    """``(K, 3)`` RGB colours, one per component."""
    import matplotlib

    if n_components <= 10:
        palette = matplotlib.colormaps["tab10"]
        return np.array([palette(k)[:3] for k in range(n_components)])
    palette = matplotlib.colormaps["turbo"]
    return palette(np.linspace(0.05, 0.95, n_components))[:, :3]


def _plot_extent(means, covariances, points) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper corners covering every component (3 sd) and the points."""
    spread = 3.0 * np.sqrt(np.diagonal(covariances, axis1=1, axis2=2))
    lower = np.min(means - spread, axis=0)
    upper = np.max(means + spread, axis=0)
    if points is not None:
        points = points[np.all(np.isfinite(points), axis=1)]
    if points is not None and len(points):
        lower = np.minimum(lower, points.min(axis=0))
        upper = np.maximum(upper, points.max(axis=0))
    pad = 0.05 * np.maximum(upper - lower, 1e-12)
    return lower - pad, upper + pad


def plot_gmm(
    gmm: GMM,
    x: Float[Array, "n d"] | None = None,
    *,
    ax=None,
    features: Sequence[int] = (0, 1),
):
    """Draw a mixture over two features: points, component ellipses, density contours.

    * Each row of ``x`` (if given) is a point whose colour mixes the component
      colours with weights ``gmm.responsibilities(x)``: a point owned by one
      component has its colour, a point shared between two has a blend.
    * Each component gets one ellipse at 2 standard deviations of its
      covariance restricted to the two features (whatever the covariance
      type), and a cross at its mean.
    * Grey contours show the log density of the marginal mixture over the two
      features: for D > 2 the other features are integrated out (the marginal
      of a Gaussian mixture keeps the weights, the sub-means and the
      covariance sub-blocks), not fixed at some value.

    Args:
        gmm: one (not batched) mixture with ``D >= 2`` features.
        x: ``(N, D)`` data to draw, or None for the ellipses and contours only.
        ax: matplotlib ``Axes`` to draw on; the current axes when None.
        features: the two feature indices for the horizontal and vertical axes.

    Returns:
        The matplotlib ``Axes``.

    Example:
        >>> import jax, jaxgmm
        >>> from jaxgmm.plot import plot_gmm
        >>> x = jax.random.normal(jax.random.key(0), (300, 3))
        >>> gmm = jaxgmm.fit(jax.random.key(1), x, 2).gmm
        >>> ax = plot_gmm(gmm, x, features=(0, 2))
        >>> ax.figure.savefig("gmm.png")  # doctest: +SKIP
    """
    ax = _axes(ax)
    from matplotlib.patches import Ellipse

    _check_single_mixture(gmm)
    first, second = _check_features(features, gmm.n_features)
    marginal = _marginal_gmm(gmm, (first, second))
    weights = np.asarray(marginal.weights, dtype=np.float64)
    means = np.asarray(marginal.means, dtype=np.float64)
    covariances = np.asarray(marginal.covariances, dtype=np.float64)
    colours = _component_colours(gmm.n_components)

    points = None
    if x is not None:
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != gmm.n_features:
            raise ValueError(
                f"`x` must have shape (N, {gmm.n_features}) to match the mixture, "
                f"got {x.shape}"
            )
        # Responsibilities use every feature, not just the two drawn.
        responsibilities = np.asarray(gmm.responsibilities(x), dtype=np.float64)
        point_colours = np.clip(responsibilities @ colours, 0.0, 1.0)
        # Rows with NaN get no responsibilities: draw them grey if drawable.
        point_colours[~np.all(np.isfinite(point_colours), axis=1)] = 0.5
        points = np.asarray(x, dtype=np.float64)[:, [first, second]]

    lower, upper = _plot_extent(means, covariances, points)
    grid_x, grid_y = np.meshgrid(
        np.linspace(lower[0], upper[0], _GRID_SIZE),
        np.linspace(lower[1], upper[1], _GRID_SIZE),
    )
    grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    log_density = marginal.log_prob(jnp.asarray(grid, marginal.means.dtype))
    log_density = np.asarray(log_density, dtype=np.float64)
    log_density = log_density.reshape(grid_x.shape)
    finite = log_density[np.isfinite(log_density)]
    peak = finite.max() if finite.size else 0.0
    ax.contour(
        grid_x,
        grid_y,
        log_density,
        levels=peak - np.array(_CONTOUR_DEPTHS),
        # Light grey far out to dark grey near the modes: visible on white.
        colors=[str(grey) for grey in np.linspace(0.8, 0.3, len(_CONTOUR_DEPTHS))],
        linewidths=0.8,
        zorder=1,
    )

    if points is not None:
        ax.scatter(
            points[:, 0],
            points[:, 1],
            c=point_colours,
            s=12,
            alpha=0.85,
            edgecolors="none",
            zorder=2,
            label="data",
        )

    for k in range(gmm.n_components):
        variances, axes = np.linalg.eigh(covariances[k])
        variances = np.maximum(variances, 0.0)
        major = axes[:, -1]
        ax.add_patch(
            Ellipse(
                tuple(means[k]),
                width=2 * _ELLIPSE_STDS * np.sqrt(variances[-1]),
                height=2 * _ELLIPSE_STDS * np.sqrt(variances[0]),
                angle=float(np.degrees(np.arctan2(major[1], major[0]))),
                fill=False,
                edgecolor=colours[k],
                linewidth=2.0,
                zorder=3,
                label=f"component {k}: weight {weights[k]:.2f}",
            )
        )
    ax.scatter(
        means[:, 0],
        means[:, 1],
        c=colours,
        marker="X",
        s=70,
        edgecolors="black",
        linewidths=0.8,
        zorder=4,
        label="means",
    )
    ax.set_xlim(lower[0], upper[0])
    ax.set_ylim(lower[1], upper[1])
    ax.set_xlabel(f"feature {first}")
    ax.set_ylabel(f"feature {second}")
    return ax


def plot_criterion(
    n_components: Iterable[int],
    scores: Float[Array, " c"],
    *,
    ax=None,
):
    """Draw a model-selection criterion against K, with the best (lowest) K marked.

    Args:
        n_components: the K values tried, e.g. ``sel.candidates``.
        scores: the criterion for each K, e.g. ``sel.scores`` from
            :func:`jaxgmm.select_n_components` (lower is better; NaN is skipped).
        ax: matplotlib ``Axes`` to draw on; the current axes when None.

    Returns:
        The matplotlib ``Axes``: ``ax.lines[0]`` is the criterion curve and
        ``ax.lines[1]`` the marker of the best K.

    Example:
        >>> import jax, jaxgmm
        >>> from jaxgmm.plot import plot_criterion
        >>> x = jax.random.normal(jax.random.key(0), (300, 2))
        >>> sel = jaxgmm.select_n_components(jax.random.key(1), x, range(1, 5))
        >>> ax = plot_criterion(sel.candidates, sel.scores)
    """
    ax = _axes(ax)
    from matplotlib.ticker import MaxNLocator

    candidates = np.asarray(list(n_components))
    scores = np.asarray(scores, dtype=np.float64)
    if candidates.ndim != 1 or scores.shape != candidates.shape or not len(scores):
        raise ValueError(
            "`n_components` and `scores` must be 1-D, non-empty and of the same "
            f"length, got {candidates.shape} and {scores.shape}"
        )
    finite = np.isfinite(scores)
    if not finite.any():
        raise ValueError("`scores` has no finite value to choose from")
    best = int(np.argmin(np.where(finite, scores, np.inf)))
    ax.plot(candidates, scores, "o-", color="C0", label="criterion")
    ax.plot(
        candidates[best : best + 1],
        scores[best : best + 1],
        linestyle="none",
        marker="*",
        markersize=18,
        color="C3",
        label=f"best: K = {candidates[best]}",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of components K")
    ax.set_ylabel("criterion (lower is better)")
    ax.legend()
    return ax


def plot_history(result: FitResult, *, ax=None):
    """Draw the mean log-likelihood of each EM iteration of a fit.

    Only the ``result.n_iter`` iterations that ran are drawn (``history`` is
    NaN after them); iteration ``i`` (from 1) shows ``history[i - 1]``, the
    log-likelihood of the parameters that iteration started from.

    Args:
        result: a (not batched) :class:`jaxgmm.FitResult`.
        ax: matplotlib ``Axes`` to draw on; the current axes when None.

    Returns:
        The matplotlib ``Axes``; ``ax.lines[0]`` is the trace.

    Example:
        >>> import jax, jaxgmm
        >>> from jaxgmm.plot import plot_history
        >>> x = jax.random.normal(jax.random.key(0), (300, 2))
        >>> result = jaxgmm.fit(jax.random.key(1), x, 3)
        >>> ax = plot_history(result)
    """
    ax = _axes(ax)
    from matplotlib.ticker import MaxNLocator

    history = np.asarray(result.history, dtype=np.float64)
    if history.ndim != 1:
        raise ValueError(
            "`result` is a batch of fits; plot one at a time, e.g. "
            "jax.tree.map(lambda leaf: leaf[0], result)"
        )
    n_iter = int(result.n_iter)
    state = "converged" if bool(result.converged) else "not converged"
    ax.plot(
        np.arange(1, n_iter + 1),
        history[:n_iter],
        "o-",
        markersize=3,
        label=f"{n_iter} iterations, {state}",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean log-likelihood")
    ax.legend()
    return ax
