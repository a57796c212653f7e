"""Quick start: fit, densities, sampling, many mixtures at once, files.

Run with ``python examples/quickstart.py``; it mirrors the README.
"""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxgmm


def main() -> dict:
    key = jax.random.key(0)
    # Two blobs in 2-D.
    a = jax.random.normal(jax.random.key(1), (500, 2))
    b = jax.random.normal(jax.random.key(2), (500, 2)) * 0.5 + jnp.array([4.0, 4.0])
    x = jnp.concatenate([a, b])

    # EM with k-means++ initialisation and scikit-learn's stopping rule.
    result = jaxgmm.fit(key, x, n_components=2, covariance_type="full")
    gmm = result.gmm
    print(
        "log-likelihood", float(result.log_likelihood), "iterations", int(result.n_iter)
    )
    print("weights", gmm.weights, "\nmeans\n", gmm.means)

    log_density = gmm.log_prob(x)  # (N,)
    labels = gmm.predict(x)  # (N,) int32
    samples, components = gmm.sample(jax.random.key(3), 5)

    # Thousands of small mixtures at once: vmap the fit.
    keys = jax.random.split(jax.random.key(4), 256)
    xs = jax.random.normal(jax.random.key(5), (256, 200, 2))
    batch = jax.jit(jax.vmap(lambda k, x: jaxgmm.fit(k, x, 3)))(keys, xs)
    print("batched means", batch.gmm.means.shape)

    # Model selection by BIC, and the file format.
    selection = jaxgmm.select_n_components(jax.random.key(6), x, range(1, 5))
    print("BIC picks K =", selection.n_components)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        jaxgmm.save(path, selection.result.gmm)
        same = jaxgmm.load(path)
    return {
        "gmm": gmm,
        "log_density": log_density,
        "labels": labels,
        "samples": samples,
        "batch": batch,
        "selection": selection,
        "loaded": same,
    }


if __name__ == "__main__":
    main()
