"""A large EM iteration against its matrix products run on their own.

What it measures
    For the workload of ``bench_large_diag.py`` (N=1,000,000, D=64, K=32,
    diag) or of ``bench_large_full.py`` (``--workload full``: D=16, K=16),
    in one process and in alternating rounds:

    - jaxgmm's time per EM iteration, ``(T(max_iter=6) - T(max_iter=1)) / 5``
      of ``jax.jit(jaxgmm.fit)`` from a fixed start, as in the benchmarks;
    - the matrix products that one iteration computes, alone: the same
      shapes and layouts on the same row chunks (``_data.rows_per_chunk``),
      in a ``lax.scan`` over the chunks, with every operand (features,
      coefficients, responsibilities) computed beforehand, so that no
      elementwise work is timed (the features are read from memory, where
      jaxgmm forms the squares or quadratic features in cache);
    - the same products with numpy (OpenBLAS, default threads), one call per
      product and chunk.

    The products are 8 N K D FLOPs per diag iteration and 4 N K p for full
    (p = D + D(D+1)/2). Their GFLOP/s alone is about what the iteration can
    reach on this machine's matrix-product kernels at these shapes.

Usage
    python benchmarks/products_floor.py [--workload diag|full] [--quick]
        [--repeats R] [--no-save]
"""

from __future__ import annotations

import time

import _common as c

WORKLOADS = {"diag": (1_000_000, 64, 32), "full": (1_000_000, 16, 16)}


def main() -> None:
    c.prepare_process()
    p = c.parser(__doc__)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="diag")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import jaxgmm
    from jaxgmm import _data, _linalg

    env = c.environment()
    c.print_environment(env)
    kind = args.workload
    n, d, k = WORKLOADS[kind]
    if args.quick:
        n = 40_000
    repeats = args.repeats or (2 if args.quick else 7)
    chunk = _data.rows_per_chunk(n, k, d)
    n_chunks = n // chunk
    rows = n_chunks * chunk
    print(f"\nN={n:,}, D={d}, K={k}, {kind!r}; {n_chunks} chunks of {chunk} rows")

    rng = np.random.default_rng(0)
    weights, means, covs = c.random_mixture(rng, k, d)
    if kind == "diag":
        covs = np.diagonal(covs, axis1=-2, axis2=-1).copy()
        x_np = c.sample_mixture(rng, n, weights, means, covs[:, :, None] * np.eye(d))
    else:
        x_np = c.sample_mixture(rng, n, weights, means, covs)
    w0, mu0, cov0 = c.perturbed_start(rng, weights, means, covs)
    f32 = np.float32
    init = jaxgmm.GMM(w0.astype(f32), mu0.astype(f32), cov0.astype(f32), kind)
    x = jnp.asarray(x_np)
    key = jax.random.key(0)

    def fit(max_iter):
        return jax.jit(
            lambda key, x, init: jaxgmm.fit(
                key, x, k, covariance_type=kind, max_iter=max_iter, tol=0.0,
                init_gmm=init,
            )
        )  # fmt: skip

    # The operands, as jaxgmm lays them out: diag reads (x, x**2) row-major
    # (N, D) each, full the quadratic features feature-major (p, N).
    xc = x[:rows] - jnp.mean(x, axis=0)
    if kind == "diag":
        features = (xc, xc * xc)
    else:
        features = (_linalg.quadratic_features(xc),)
    width = features[0].shape[1] if kind == "diag" else features[0].shape[0]
    coefficients = jnp.asarray(rng.normal(size=(len(features), k, width)).astype(f32))
    resp = jax.nn.softmax(jnp.asarray(rng.normal(size=(k, rows)).astype(f32)), 0)

    @jax.jit
    def products(features, coefficients, resp):
        def step(total, start):
            r = lax.dynamic_slice_in_dim(resp, start, chunk, axis=1)
            if kind == "diag":
                parts = [lax.dynamic_slice_in_dim(f, start, chunk) for f in features]
                log_prob = sum(w @ f.T for w, f in zip(coefficients, parts))
                moments = _linalg.grouped_matmul(r, tuple(parts))
            else:
                part = lax.dynamic_slice_in_dim(features[0], start, chunk, axis=1)
                log_prob = coefficients[0] @ part
                moments = (r @ part.T,)
            # A matrix-vector product reads every log-density (~1% of the work).
            used = sum(m.sum() for m in moments) + _linalg.row_sums(log_prob).sum()
            return total + used, None

        starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
        return lax.scan(step, jnp.zeros((), f32), starts)[0]

    np_features = [np.asarray(f) for f in features]
    np_coefficients = np.asarray(coefficients)
    # Each chunk's (K, C) responsibilities contiguous: numpy's matmul takes a
    # much slower path for a strided view of the (K, N) array.
    np_resp = np.ascontiguousarray(
        np.asarray(resp).reshape(k, n_chunks, chunk).transpose(1, 0, 2)
    )

    def numpy_products():
        total = 0.0
        for i in range(n_chunks):
            lo, hi = i * chunk, (i + 1) * chunk
            r = np_resp[i]
            if kind == "diag":
                parts = [f[lo:hi] for f in np_features]
                log_prob = sum(w @ f.T for w, f in zip(np_coefficients, parts))
                total += sum(float((r @ f).sum()) for f in parts)
            else:
                part = np_features[0][:, lo:hi]
                log_prob = np_coefficients[0] @ part
                total += float((r @ part.T).sum())
            total += float(log_prob.sum())
        return total

    fits = {m: fit(m) for m in (1, 6)}
    runs = {
        "fit1": lambda: fits[1](key, x, init),
        "fit6": lambda: fits[6](key, x, init),
        "xla": lambda: products(features, coefficients, resp),
        "numpy": numpy_products,
    }
    for run in runs.values():
        c.block(run())
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            c.block(run())
            times[name].append(time.perf_counter() - start)

    med = {name: c.median(values) for name, values in times.items()}
    iteration = (med["fit6"] - med["fit1"]) / 5
    flops = 2 * 2 * rows * k * width * len(features)
    print()
    c.print_table(
        [
            ["jaxgmm EM iteration", iteration, c.gflops(flops, iteration)],
            ["its products alone, XLA", med["xla"], c.gflops(flops, med["xla"])],
            ["its products alone, numpy", med["numpy"], c.gflops(flops, med["numpy"])],
        ],
        ["measure", "seconds", "product GFLOP/s"],
    )  # fmt: skip
    print(
        f"(median of {repeats} alternating rounds; the products are "
        f"{flops / 1e9:.2f} GFLOP per iteration)"
    )
    results = dict(
        workload=kind,
        n=n,
        d=d,
        k=k,
        chunk_rows=chunk,
        times_s=times,
        jaxgmm_per_iteration_s=iteration,
        xla_products_s=med["xla"],
        numpy_products_s=med["numpy"],
        product_flops=flops,
    )
    summary = [
        {"metric": "jaxgmm GFLOP/s", "value": c.gflops(flops, iteration), "unit": ""},
        {"metric": "XLA products alone", "value": c.gflops(flops, med["xla"]),
         "unit": "GFLOP/s"},
        {"metric": "numpy products alone", "value": c.gflops(flops, med["numpy"]),
         "unit": "GFLOP/s"},
    ]  # fmt: skip
    c.finish(f"products_floor_{kind}", args, env, results, [], summary)


if __name__ == "__main__":
    main()
