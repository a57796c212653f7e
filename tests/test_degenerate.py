"""Degenerate data still give finite, positive-definite parameters."""

import jax
import numpy as np
import pytest
import scipy.stats
from conftest import (
    COVARIANCE_TYPES,
    close_clusters_far_from_the_centre,
    make_blobs,
)

import jaxgmm


def assert_valid(gmm, max_condition=None):
    for leaf in jax.tree.leaves(gmm):
        assert np.all(np.isfinite(leaf))
    weights = np.asarray(gmm.weights, np.float64)
    assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-5
    covariances = np.asarray(gmm.covariances, np.float64)
    if gmm.covariance_type in ("full", "tied"):
        eigenvalues = np.linalg.eigvalsh(covariances)
        assert np.all(eigenvalues > 0)
        np.testing.assert_allclose(
            covariances, np.swapaxes(covariances, -1, -2), atol=1e-6
        )
        if max_condition is not None:
            ratio = eigenvalues[..., -1] / eigenvalues[..., 0]
            assert np.all(ratio <= max_condition * 1.01)
    else:
        assert np.all(covariances > 0)
        if max_condition is not None and gmm.covariance_type == "diag":
            assert np.all(
                covariances.max(-1) / covariances.min(-1) <= max_condition * 1.01
            )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_identical_points(covariance_type):
    x = np.full((200, 2), 3.0, np.float32)
    result = jaxgmm.fit(jax.random.key(0), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)
    np.testing.assert_allclose(result.gmm.means, 3.0, atol=1e-5)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_points_on_a_line(covariance_type):
    t = np.linspace(-1, 1, 200, dtype=np.float32)
    x = np.stack([t, 2 * t + 1], axis=1)
    result = jaxgmm.fit(jax.random.key(1), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_more_components_than_distinct_points(covariance_type):
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]], np.float32), 100, axis=0)
    result = jaxgmm.fit(jax.random.key(2), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_far_offset_float32_keeps_the_variance(covariance_type):
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.normal(size=(200, 2))).astype(np.float32)
    result = jaxgmm.fit(jax.random.key(3), x, 1, covariance_type=covariance_type)
    assert_valid(result.gmm)
    variance = np.var(x.astype(np.float64) - 1e4, axis=0)
    covariances = np.asarray(result.gmm.covariances, np.float64)
    if covariance_type in ("full", "tied"):
        estimated = np.diagonal(covariances.reshape(-1, 2, 2)[0])
    elif covariance_type == "diag":
        estimated = covariances[0]
    else:
        estimated = np.full(2, covariances[0])
        variance = np.full(2, variance.mean())
    np.testing.assert_allclose(estimated, variance + 1e-6, rtol=0.02)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_offset_of_a_million_is_still_finite(covariance_type):
    x, _ = make_blobs(seed=4)
    x = (x.astype(np.float64) + 1e6).astype(np.float32)
    result = jaxgmm.fit(jax.random.key(4), x, 3, covariance_type=covariance_type)
    assert_valid(result.gmm)
    assert int(result.status) == 0


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_an_empty_component_keeps_its_parameters_and_gets_no_weight(covariance_type):
    x, _ = make_blobs(seed=5)
    start = jaxgmm.fit(
        jax.random.key(5), x, 3, covariance_type=covariance_type, max_iter=1
    )
    # Move one component so far away that no point is responsible for it.
    far = start.gmm.means.at[2].set(1e4)
    gmm = jaxgmm.GMM.from_precisions_cholesky(
        start.gmm.weights, far, start.gmm.precisions_cholesky, covariance_type
    )
    new, _ = jaxgmm.em_step(gmm, x)
    assert_valid(new)
    assert float(new.weights[2]) < 1e-7  # 10 * eps / N, as sklearn
    np.testing.assert_allclose(new.means[2], far[2])
    if covariance_type != "tied":
        np.testing.assert_allclose(
            new.precisions_cholesky[2], gmm.precisions_cholesky[2], rtol=1e-6
        )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_max_condition_caps_every_covariance(covariance_type):
    t = np.linspace(-1, 1, 200, dtype=np.float32)
    rng = np.random.default_rng(6)
    x = np.stack([t, 1e-3 * rng.normal(size=200).astype(np.float32)], axis=1)
    result = jaxgmm.fit(
        jax.random.key(6), x, 3, covariance_type=covariance_type, max_condition=100.0
    )
    assert_valid(result.gmm, max_condition=100.0)


def test_zero_reg_covar_on_identical_points_stays_finite():
    x = np.zeros((200, 2), np.float32)
    result = jaxgmm.fit(jax.random.key(7), x, 3, reg_covar=0.0)
    for leaf in jax.tree.leaves(result.gmm):
        assert np.all(np.isfinite(leaf))


# -- components far apart in float32 (more than UNROLL_MAX_DIM features) ------------

FAR_D = 6


def far_apart_clusters(separation, n=120, d=FAR_D, seed=1):
    """Two tight clusters (standard deviation 0.1) `separation` apart in every
    coordinate: each sits ~separation / 0.1 * sqrt(d) / 2 standard deviations
    from the data centre."""
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [0.1 * rng.normal(size=(n, d)), separation + 0.1 * rng.normal(size=(n, d))]
    )
    return x


@pytest.fixture(scope="module")
def far_apart_float64_fits():
    # float64 references, fitted with x64 on, for every covariance type.
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        x = far_apart_clusters(1000.0)
        fits = {
            kind: jaxgmm.fit(jax.random.key(0), x, 2, covariance_type=kind)
            for kind in COVARIANCE_TYPES
        }
        return x, {
            kind: (
                np.asarray(r.gmm.covariances, np.float64),
                np.asarray(r.gmm.means, np.float64),
                float(r.log_likelihood),
            )
            for kind, r in fits.items()
        }
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_far_apart_float32_clusters_keep_their_covariances(
    covariance_type, far_apart_float64_fits
):
    # Two clusters ~2e4 standard deviations from the data centre: the
    # matrix-product E-step would lose all of their variance (eps times 4e8)
    # and the log-likelihood with it; the per-component E-step keeps them.
    x, references = far_apart_float64_fits
    covariances, means, log_likelihood = references[covariance_type]
    result = jaxgmm.fit(
        jax.random.key(0), x.astype(np.float32), 2, covariance_type=covariance_type
    )
    assert int(result.status) == 0
    order = np.argsort(np.asarray(result.gmm.means)[:, 0])
    expected_order = np.argsort(means[:, 0])
    fitted = np.asarray(result.gmm.covariances, np.float64)
    if covariance_type != "tied":
        fitted, covariances = fitted[order], covariances[expected_order]
    # To 1e-3 of the variances (the anchored E-step loses about eps times the
    # distance in standard deviations, ~1e4 here: 1e-3 relative).
    np.testing.assert_allclose(fitted, covariances, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(result.gmm.means, np.float64)[order],
        means[expected_order],
        rtol=1e-5,
        atol=1e-4,
    )
    np.testing.assert_allclose(float(result.log_likelihood), log_likelihood, atol=1e-3)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_far_apart_clusters_from_a_start_with_the_whole_datas_covariance(
    covariance_type, far_apart_float64_fits
):
    # Means at the clusters, each covariance isotropic at the whole data's
    # scale: the current covariances then call for the matrix-product E-step,
    # whose moments cancel all of the new, tight ones. That iteration is made
    # again anchored (before, every M-step kept the start). (init="kmeans"
    # started like this until its first moments were taken about each row's
    # own centre.)
    x, references = far_apart_float64_fits
    covariances, means, log_likelihood = references[covariance_type]
    scale = np.full(FAR_D, np.mean(np.var(x, axis=0)))
    start = np.diag(scale) if covariance_type == "full" else scale
    init_gmm = jaxgmm.GMM(
        np.full(2, 0.5, np.float32),
        means.astype(np.float32),
        np.stack([start, start]).astype(np.float32),
        covariance_type,
    )
    result = jaxgmm.fit(
        jax.random.key(0),
        x.astype(np.float32),
        2,
        covariance_type=covariance_type,
        init_gmm=init_gmm,
    )
    np.testing.assert_allclose(float(result.log_likelihood), log_likelihood, atol=1e-3)
    fitted = np.sort(np.asarray(result.gmm.covariances, np.float64).ravel())
    np.testing.assert_allclose(
        fitted, np.sort(covariances.ravel()), rtol=1e-3, atol=1e-5
    )


def test_far_apart_clusters_under_vmap_jit_and_restarts():
    # Eagerly, fit refits with the anchored E-step by itself. Under a
    # transformation it cannot: the data set that needs it reports
    # precision_loss (an error with throw=True), and e_step="anchored" fits it.
    near = far_apart_clusters(1.0, seed=2).astype(np.float32)
    far = far_apart_clusters(1000.0, seed=3).astype(np.float32)
    xs = np.stack([near, far])
    keys = jax.random.split(jax.random.key(5), 2)
    options = dict(covariance_type="diag", tol=0.0, max_iter=20)
    batch = jax.vmap(lambda k, x: jaxgmm.fit(k, x, 2, throw=False, **options))(keys, xs)
    assert [int(s) for s in batch.status] == [0, int(jaxgmm.Status.precision_loss)]
    with pytest.raises(Exception, match="anchored"):
        jax.block_until_ready(
            jax.jit(lambda x: jaxgmm.fit(keys[1], x, 2, **options))(far)
        )
    anchored = jax.vmap(lambda k, x: jaxgmm.fit(k, x, 2, e_step="anchored", **options))(
        keys, xs
    )
    for i, x in enumerate(xs):
        alone = jaxgmm.fit(keys[i], x, 2, **options)  # eager: refitted if needed
        assert int(alone.status) == 0
        # Equal up to the anchored E-step's rounding (~2e-4 at 1e4 standard
        # deviations), which batched and single products round differently.
        np.testing.assert_allclose(
            anchored.gmm.covariances[i], alone.gmm.covariances, rtol=1e-3, atol=1e-7
        )
    restarts = jaxgmm.fit(jax.random.key(6), far, 2, covariance_type="diag", n_init=2)
    variances = np.asarray(restarts.gmm.covariances)
    # Both clusters' variances, ~0.01 each, not the 1e-6 of a lost variance.
    assert np.all((variances > 0.005) & (variances < 0.02))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_anchored_e_step_anchors_rows_at_their_nearest_mean(covariance_type):
    # Two clusters of spread 0.02, 1 apart and 1e4 from the data centre. The
    # anchored E-step loses about eps |z| |mu| / variance, z a row's offset from
    # its anchor: 0.02 from its own mean (~6% for one row, ~0.6-2% for the
    # cluster). The product form |mu|^2 - 2 x.mu (loss ~eps |mu|^2 = 12 > 1)
    # anchored many rows at the other cluster's mean, 1 away: variances
    # 0.9% (diag) and 5% (full) off.
    x64, truth, _ = close_clusters_far_from_the_centre(6)
    x32 = x64.astype(np.float32)
    result = jaxgmm.fit(
        jax.random.key(0),
        x32,
        3,
        covariance_type=covariance_type,
        init="kmeans",
        max_iter=5,
        e_step="anchored",
    )
    rows = x32.astype(np.float64)
    clusters = [rows[truth == j] for j in range(3)]
    means = np.asarray(result.gmm.means, np.float64)
    order = [int(np.argmin(((means - c.mean(0)) ** 2).sum(-1))) for c in clusters]
    assert sorted(order) == [0, 1, 2]
    covariances = np.asarray(result.gmm.covariances, np.float64)[order]
    if covariance_type == "full":
        covariances = np.diagonal(covariances, axis1=-2, axis2=-1)
    variances = np.stack([c.var(0) for c in clusters]) + 1e-6
    rtol = 3e-2 if covariance_type == "full" else 5e-3
    np.testing.assert_allclose(covariances, variances, rtol=rtol)


def test_e_step_must_be_auto_or_anchored():
    with pytest.raises(ValueError, match="e_step"):
        jaxgmm.fit(jax.random.key(0), far_apart_clusters(1.0), 2, e_step="exact")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_prob_of_data_far_from_the_origin_matches_scipy(covariance_type):
    # 1e4 standard deviations from the origin in float32: the density methods
    # work relative to the mixture's mean, and per component where needed.
    x = (100.0 + far_apart_clusters(0.5, n=50)).astype(np.float32)
    rng = np.random.default_rng(7)
    means = np.stack([x[:50].mean(0), x[50:].mean(0)]).astype(np.float32)
    gmm = jaxgmm.GMM(np.array([0.4, 0.6]), means, np.full((2, FAR_D), 0.01), "diag")
    if covariance_type != "diag":
        covariances = {
            "full": np.broadcast_to(
                np.diag(rng.uniform(0.005, 0.02, FAR_D)), (2, FAR_D, FAR_D)
            ),
            "tied": np.diag(rng.uniform(0.005, 0.02, FAR_D)),
            "spherical": np.array([0.01, 0.02]),
        }[covariance_type]
        gmm = jaxgmm.GMM(gmm.weights, means, covariances, covariance_type)
    dense = np.asarray(gmm.full_covariances, np.float64)
    expected = np.logaddexp(
        *[
            np.log(w)
            + scipy.stats.multivariate_normal(m, c).logpdf(x.astype(np.float64))
            for w, m, c in zip(
                np.asarray(gmm.weights, np.float64), means.astype(np.float64), dense
            )
        ]
    )
    np.testing.assert_allclose(gmm.log_prob(x), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_anchored_forms_equal_per_component_differences(x64, covariance_type):
    # The anchored distances and moments (used for components far from the
    # rows' origin) against the definitions, from x - mu_k in numpy float64.
    from jaxgmm._covariance import structure_for

    structure = structure_for(covariance_type)
    rng = np.random.default_rng(8)
    k, d, n = 3, FAR_D, 40
    # Rows spread over all three components, so every anchor is used.
    x = rng.normal(size=(n, d)) + 3.0 * rng.normal(size=(k, d))[np.arange(n) % k]
    covariances = {
        "full": np.stack(
            [np.eye(d) + 0.3 * np.outer(v, v) for v in rng.normal(size=(k, d))]
        ),
        "tied": np.eye(d) * 1.5 + 0.2,
        "diag": rng.uniform(0.5, 2.0, (k, d)),
        "spherical": rng.uniform(0.5, 2.0, k),
    }[covariance_type]
    gmm = jaxgmm.GMM(
        np.array([0.2, 0.3, 0.5]), rng.normal(size=(k, d)), covariances, covariance_type
    )
    means = np.asarray(gmm.means)
    dense = np.asarray(gmm.full_covariances)
    precisions = np.linalg.inv(dense)
    diff = x[None, :, :] - means[:, None, :]  # (k, n, d)
    squared, moments = structure.anchored_parts(x, gmm.means, gmm.precisions_cholesky)
    np.testing.assert_allclose(
        squared, np.einsum("knd,kde,kne->kn", diff, precisions, diff), rtol=1e-10
    )
    resp = rng.uniform(size=(k, n))
    scale = rng.uniform(size=n)
    weighted = resp * scale
    counts, sums, scatter = moments(resp, scale)
    np.testing.assert_allclose(counts, weighted.sum(1), rtol=1e-12)
    np.testing.assert_allclose(
        sums, np.einsum("kn,knd->kd", weighted, diff), rtol=1e-10
    )
    outer = np.einsum("kn,knd,kne->kde", weighted, diff, diff)
    expected = outer if scatter.ndim == 3 else np.diagonal(outer, axis1=1, axis2=2)
    np.testing.assert_allclose(scatter, expected, rtol=1e-9, atol=1e-9)
    # The scale of the cancelled terms: |mu_k|^T |P_k| |mu_k|, per component.
    magnitude = np.abs(means)
    np.testing.assert_allclose(
        structure.cancellation(gmm.means, gmm.precisions_cholesky),
        np.einsum("ki,kij,kj->k", magnitude, np.abs(precisions), magnitude),
        rtol=1e-9,
    )


def test_the_anchored_e_step_is_chosen_only_for_components_far_from_the_centre():
    from jaxgmm._covariance import loses_precision, structure_for

    structure = structure_for("full")
    near = jaxgmm.fit(jax.random.key(0), far_apart_clusters(1.0).astype(np.float32), 2)
    far = jaxgmm.fit(jax.random.key(0), far_apart_clusters(30.0).astype(np.float32), 2)
    for result, expected in ((near, False), (far, True)):
        centre = np.mean(np.asarray(result.gmm.means), axis=0)
        means = result.gmm.means - centre
        assert (
            bool(loses_precision(structure, means, result.gmm.precisions_cholesky))
            is expected
        )
    # Statically never in float64 or with few features.
    assert loses_precision(structure, np.zeros((2, 6)), np.ones((2, 6, 6))) is False
    assert (
        loses_precision(
            structure, np.zeros((2, 4), np.float32), np.ones((2, 4, 4), np.float32)
        )
        is False
    )
