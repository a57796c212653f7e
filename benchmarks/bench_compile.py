"""Compile time of ``jaxgmm.fit`` for a few configurations.

What it measures
    For each configuration, ``jax.jit(lambda key, x, g: jaxgmm.fit(...))``
    is lowered and compiled from abstract shapes (``jax.ShapeDtypeStruct``,
    float32; no data is created): "trace+lower" is
    ``jax.jit(f).lower(*shapes)`` (Python tracing and lowering to StableHLO)
    and "compile" is ``.compile()`` (XLA). Their sum is compared with the
    target. A trivial function is compiled first so that one-time backend
    start-up is not charged to the first configuration. Each configuration
    is a different program, so nothing is reused from a cache between them.

    Configurations (max_iter=100, tol=0 unless noted):
      * small full:    N=200, D=2, K=3, full, init_gmm given / kmeans++
      * large full:    N=1,000,000, D=16, K=16, full, init_gmm given / kmeans++
      * large diag:    N=1,000,000, D=64, K=32, diag, init_gmm given
      * many (vmap):   10,000 x (N=200, D=2, K=3), full, init_gmm given /
                       kmeans++ (``jax.vmap`` of ``fit`` under ``jax.jit``)

    Target: trace+lower+compile <= 2 s for every configuration.
    scikit-learn is not involved (it has nothing to compile).

BLAS
    Like the other benchmarks, it re-executes itself with
    ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset (irrelevant to XLA,
    done for uniformity) and prints the BLAS in use.

Usage
    python benchmarks/bench_compile.py [--quick]
"""

from __future__ import annotations

import _common as c

TARGET_S = 2.0


def main() -> None:
    c.prepare_process()
    args = c.parser(__doc__).parse_args()

    import jax
    import jax.numpy as jnp

    import jaxgmm

    env = c.environment()
    c.print_environment(env)

    key = jax.eval_shape(lambda: jax.random.key(0))
    f32 = jnp.float32

    def shapes(n, d, k, cov, batch=()):
        x = jax.ShapeDtypeStruct((*batch, n, d), f32)
        w = jnp.full((k,), 1.0 / k, f32)
        m = jnp.zeros((k, d), f32)
        s = (
            jnp.ones((k, d), f32)
            if cov == "diag"
            else jnp.broadcast_to(jnp.eye(d, dtype=f32), (k, d, d))
        )
        gmm = c.abstract(jaxgmm.GMM(w, m, s, cov))
        if batch:
            gmm = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct((*batch, *a.shape), a.dtype), gmm
            )
            keys = jax.ShapeDtypeStruct((*batch,), key.dtype)
            return keys, x, gmm
        return key, x, gmm

    def single(k, cov, given, max_iter=100):
        def f(key, x, g):
            return jaxgmm.fit(
                key,
                x,
                k,
                covariance_type=cov,
                max_iter=max_iter,
                tol=0.0,
                init_gmm=g if given else None,
            )

        return f

    def many(k, given, max_iter=100):
        return lambda keys, xs, gs: jax.vmap(single(k, "full", given, max_iter))(
            keys, xs, gs
        )

    n_sets = 256 if args.quick else 10_000
    configs = [
        ("small full, init_gmm", single(3, "full", True), shapes(200, 2, 3, "full")),
        ("small full, kmeans++", single(3, "full", False), shapes(200, 2, 3, "full")),
        (
            "large full, init_gmm",
            single(16, "full", True),
            shapes(1_000_000, 16, 16, "full"),
        ),
        (
            "large full, kmeans++",
            single(16, "full", False),
            shapes(1_000_000, 16, 16, "full"),
        ),
        (
            "large diag, init_gmm",
            single(32, "diag", True),
            shapes(1_000_000, 64, 32, "diag"),
        ),
        (
            f"many x{n_sets}, init_gmm",
            many(3, True),
            shapes(200, 2, 3, "full", (n_sets,)),
        ),
        (
            f"many x{n_sets}, kmeans++",
            many(3, False),
            shapes(200, 2, 3, "full", (n_sets,)),
        ),
    ]
    if args.quick:
        configs = [configs[0], configs[1], configs[5]]

    c.compile_jit(lambda a: a + 1, jnp.zeros(3))  # backend start-up
    rows, results, targets, summary = [], {}, [], []
    for name, fn, fn_args in configs:
        _, lower_s, compile_s = c.compile_jit(fn, *fn_args)
        total = lower_s + compile_s
        rows.append([name, lower_s, compile_s, total, TARGET_S])
        results[name] = dict(lower_s=lower_s, compile_s=compile_s, total_s=total)
        summary.append({"metric": f"{name}: compile", "value": total, "unit": "s"})
        print(f"{name}: trace+lower {lower_s:.2f} s, compile {compile_s:.2f} s")
    print()
    c.print_table(
        rows, ["configuration", "trace+lower s", "compile s", "total s", "target s"]
    )
    for name, *_ in configs:
        targets.append(
            c.check_target(f"compile {name}", results[name]["total_s"], TARGET_S, False)
        )
    c.finish("bench_compile", args, env, results, targets, summary)


if __name__ == "__main__":
    main()
