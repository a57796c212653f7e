"""The GMM model: construction checks, densities, sampling, score, counts."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import COVARIANCE_TYPES, make_blobs

import jaxgmm

K, D = 3, 2


def random_covariances(covariance_type, rng, k=K, d=D):
    if covariance_type == "full":
        a = rng.normal(size=(k, d, d))
        return a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(d)
    if covariance_type == "tied":
        a = rng.normal(size=(d, d))
        return a @ a.T + 0.5 * np.eye(d)
    if covariance_type == "diag":
        return rng.uniform(0.3, 2.0, size=(k, d))
    return rng.uniform(0.3, 2.0, size=(k,))


def full_covariances(covariance_type, covariances, k=K, d=D):
    """Expand sklearn-shaped covariances to (K, D, D)."""
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.broadcast_to(covariances, (k, d, d))
    if covariance_type == "diag":
        return np.stack([np.diag(c) for c in covariances])
    return covariances[:, None, None] * np.eye(d)


@pytest.fixture(scope="module", params=COVARIANCE_TYPES)
def model(request):
    covariance_type = request.param
    rng = np.random.default_rng(1)
    weights = np.array([0.2, 0.3, 0.5], np.float32)
    means = rng.normal(scale=3, size=(K, D)).astype(np.float32)
    covariances = random_covariances(covariance_type, rng).astype(np.float32)
    gmm = jaxgmm.GMM(weights, means, covariances, covariance_type)
    return gmm, weights, means, covariances


def scipy_log_prob(x, weights, means, covariances):
    dense = np.stack(
        [
            scipy.stats.multivariate_normal(m, c).logpdf(x)
            for m, c in zip(means, covariances)
        ],
        axis=1,
    )
    return dense + np.log(weights)


def test_log_prob_matches_scipy_for_every_covariance_type(model):
    gmm, weights, means, covariances = model
    x, _ = make_blobs(seed=5, n=50)
    dense = full_covariances(gmm.covariance_type, covariances.astype(np.float64))
    expected = scipy_log_prob(x.astype(np.float64), weights, means, dense)
    np.testing.assert_allclose(
        gmm.component_log_prob(x), expected, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        gmm.log_prob(x), scipy.special.logsumexp(expected, axis=1), rtol=1e-4, atol=1e-4
    )


def test_responsibilities_are_the_posterior_and_predict_its_argmax(model):
    gmm, weights, means, covariances = model
    x, _ = make_blobs(seed=6, n=50)
    dense = full_covariances(gmm.covariance_type, covariances.astype(np.float64))
    joint = scipy_log_prob(x.astype(np.float64), weights, means, dense)
    posterior = np.exp(joint - scipy.special.logsumexp(joint, axis=1, keepdims=True))
    resp = gmm.responsibilities(x)
    np.testing.assert_allclose(resp, posterior, atol=1e-5)
    np.testing.assert_allclose(resp.sum(axis=1), 1.0, atol=1e-6)
    assert gmm.predict(x).dtype == jnp.int32
    np.testing.assert_array_equal(gmm.predict(x), posterior.argmax(axis=1))


def test_covariances_round_trip_and_precision_factor_matches_sklearn(model):
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    gmm, _, _, covariances = model
    np.testing.assert_allclose(gmm.covariances, covariances, rtol=1e-5, atol=1e-6)
    expected = _compute_precision_cholesky(
        covariances.astype(np.float64), gmm.covariance_type
    )
    np.testing.assert_allclose(gmm.precisions_cholesky, expected, rtol=1e-4)
    rebuilt = jaxgmm.GMM.from_precisions_cholesky(
        gmm.weights, gmm.means, gmm.precisions_cholesky, gmm.covariance_type
    )
    np.testing.assert_allclose(rebuilt.covariances, covariances, rtol=1e-5, atol=1e-6)


def test_score_is_the_closed_form_gradient_of_the_log_density(model):
    gmm, weights, means, covariances = model
    x, _ = make_blobs(seed=7, n=20)
    dense = full_covariances(gmm.covariance_type, covariances.astype(np.float64))
    resp = np.asarray(gmm.responsibilities(x), np.float64)
    precisions = np.linalg.inv(dense)
    diff = x[:, None, :].astype(np.float64) - means[None]
    expected = -np.einsum("nk,kde,nke->nd", resp, precisions, diff)
    np.testing.assert_allclose(gmm.score(x), expected, rtol=1e-3, atol=1e-4)


def test_n_parameters_is_sklearns_count(model):
    from sklearn.mixture import GaussianMixture

    gmm = model[0]
    reference = GaussianMixture(K, covariance_type=gmm.covariance_type)
    reference.means_ = np.zeros((K, D))
    assert gmm.n_parameters == reference._n_parameters()
    assert (gmm.n_components, gmm.n_features) == (K, D)


def test_sample_moments_and_component_frequencies(model):
    gmm, weights, means, covariances = model
    n = 60_000
    x, z = gmm.sample(jax.random.key(3), n)
    assert x.shape == (n, D) and z.shape == (n,) and x.dtype == jnp.float32
    counts = np.bincount(np.asarray(z), minlength=K)
    # Pearson chi-square test of the component draws at the 0.1% level.
    chi2 = scipy.stats.chisquare(counts, weights / weights.sum() * n)
    assert chi2.pvalue > 1e-3
    dense = full_covariances(gmm.covariance_type, covariances)
    x, z = np.asarray(x), np.asarray(z)
    for k in range(K):
        rows = x[z == k]
        standard_error = np.sqrt(np.diag(dense[k]) / len(rows))
        assert np.all(np.abs(rows.mean(axis=0) - means[k]) < 5 * standard_error)
        np.testing.assert_allclose(np.cov(rows.T), dense[k], rtol=0.1, atol=0.03)


def test_sample_follows_the_density_kolmogorov_smirnov():
    # One-dimensional mixture: compare the sample with the exact mixture CDF.
    weights = np.array([0.3, 0.7], np.float32)
    means = np.array([[-2.0], [1.5]], np.float32)
    variances = np.array([[0.5], [1.2]], np.float32)
    gmm = jaxgmm.GMM(weights, means, variances, "diag")
    x, _ = gmm.sample(jax.random.key(0), 5000)

    def cdf(t):
        return sum(
            w * scipy.stats.norm(m[0], np.sqrt(v[0])).cdf(t)
            for w, m, v in zip(weights, means, variances)
        )

    assert scipy.stats.kstest(np.asarray(x[:, 0]), cdf).pvalue > 1e-3


def _output_sizes(jaxpr):
    """Sizes of every value a jaxpr computes, nested jaxprs (jit, loops,
    conditionals) included."""
    for eqn in jaxpr.eqns:
        yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _output_sizes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _output_sizes(sub)


@pytest.mark.parametrize("k", [64, 512])
def test_sampling_cost_does_not_grow_with_components(k):
    # Each draw finds its component by binary search and gathers only that
    # component's factor: nothing computed has n * K entries.
    n = 1000
    gmm = jaxgmm.GMM(
        jnp.full((k,), 1.0 / k), jnp.zeros((k, D)), jnp.ones((k, D)), "diag"
    )
    jaxpr = jax.make_jaxpr(lambda g: g.sample(jax.random.key(0), n))(gmm)
    sizes = list(_output_sizes(jaxpr.jaxpr))
    assert max(sizes) >= n * D  # the walk reached the draws themselves
    assert max(sizes) < n * k


def test_output_sizes_sees_an_all_pairs_comparison_inside_jit():
    # The check above must be able to fail: an O(n K) draw is caught.
    k, n = 64, 1000
    cumulative = jnp.linspace(0.0, 1.0, k)
    draw = jax.jit(lambda u: jnp.sum(u[:, None] > cumulative[None, :], axis=1))
    jaxpr = jax.make_jaxpr(draw)(jnp.zeros(n))
    assert max(_output_sizes(jaxpr.jaxpr)) >= n * k


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weights": [0.5, 0.6, -0.1]}, "weights"),
        ({"weights": [0.2, 0.2, 0.2]}, "weights"),
        ({"weights": [0.5, 0.5]}, "weights"),
        ({"means": np.zeros((K, D, 1))}, "means"),
        ({"means": [[0.0, np.nan]] * K}, "means"),
        ({"covariances": np.ones((K, D, D))}, "covariances"),
        ({"covariances": np.array([[[1.0, 0.5], [0.4, 1.0]]] * K)}, "covariances"),
        ({"covariances": np.eye(D)}, "covariances"),
        # Exactly singular, but rounding leaves its float64 eigenvalues at
        # +-1e-16: it has no finite Cholesky factor in float32.
        (
            {
                "covariances": np.array(
                    [[[20.0, -6, -18], [-6, 9, 15], [-18, 15, 29]]] * K, np.float32
                ),
                "means": np.zeros((K, 3)),
            },
            "covariances",
        ),
        # A density that integrates to 1.04 (the tolerance must not grow with K).
        (
            {
                "weights": np.full(500, 1.04 / 500),
                "means": np.zeros((500, D)),
                "covariances": np.broadcast_to(np.eye(D), (500, D, D)),
            },
            "weights",
        ),
        ({"covariance_type": "banana"}, "covariance_type"),
    ],
)
def test_invalid_construction_raises_value_error_naming_the_argument(kwargs, name):
    arguments = {
        "weights": np.full(K, 1 / K),
        "means": np.zeros((K, D)),
        "covariances": np.broadcast_to(np.eye(D), (K, D, D)),
        "covariance_type": "full",
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=name):
        jaxgmm.GMM(**arguments)


def test_weights_that_sum_to_one_in_float32_are_accepted_for_many_components():
    k = 500
    weights = np.full(k, 1.0 / k, np.float32)
    gmm = jaxgmm.GMM(weights, np.zeros((k, D)), np.ones((k, D)), "diag")
    assert gmm.n_components == k


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_non_positive_variances_are_rejected(covariance_type):
    shape = (K, D) if covariance_type == "diag" else (K,)
    with pytest.raises(ValueError, match="covariances"):
        jaxgmm.GMM(
            np.full(K, 1 / K), np.zeros((K, D)), -np.ones(shape), covariance_type
        )


def test_density_methods_reject_wrong_feature_count(model):
    gmm = model[0]
    with pytest.raises(ValueError, match="features"):
        gmm.log_prob(np.zeros((4, D + 1)))
    with pytest.raises(ValueError, match="2-D"):
        gmm.log_prob(np.zeros(D))


def test_precision_factors_must_be_upper_triangular_with_positive_diagonal():
    gmm = jaxgmm.GMM(np.full(K, 1 / K), np.zeros((K, D)), np.ones((K, D)), "diag")
    with pytest.raises(ValueError, match="precisions_cholesky"):
        jaxgmm.GMM.from_precisions_cholesky(
            gmm.weights, gmm.means, -gmm.precisions_cholesky, "diag"
        )
    lower = np.broadcast_to(np.array([[1.0, 0.0], [0.3, 1.0]]), (K, D, D))
    with pytest.raises(ValueError, match="upper triangular"):
        jaxgmm.GMM.from_precisions_cholesky(gmm.weights, gmm.means, lower, "full")


def test_full_covariances_expand_every_type_to_matrices(model):
    gmm, _, _, covariances = model
    np.testing.assert_allclose(
        gmm.full_covariances,
        full_covariances(gmm.covariance_type, covariances),
        rtol=1e-5,
        atol=1e-6,
    )
