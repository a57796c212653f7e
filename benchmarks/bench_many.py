"""Many small mixtures at once: jaxgmm's vmapped fit vs a scikit-learn loop.

What it measures
    10,000 independent data sets of N=200 rows, D=2 features, each drawn from
    its own well-separated 3-component full-covariance mixture (fixed seed,
    numpy float32). Each is fitted with K=3, covariance_type="full",
    max_iter=100 and tol=0, so exactly 100 EM iterations run everywhere.

    * jaxgmm: ``jax.jit(jax.vmap(lambda k, x, g: jaxgmm.fit(k, x, 3,
      max_iter=100, tol=0, init_gmm=g)))`` over all data sets in one call.
      Compile time (lower + XLA compile) is reported separately; the timed
      calls run the compiled executable (median of ``--repeats``, default 9:
      on a shared 2-core machine single runs of the same call vary by ~50%).
    * scikit-learn: ``GaussianMixture(3, covariance_type="full", max_iter=100,
      tol=0, weights_init=..., means_init=..., precisions_init=...)`` fitted
      in a Python loop, from the same starting parameters (precisions =
      inverse covariances). It is timed on a subset (default 100 data sets)
      and the time is extrapolated linearly to all data sets; the output says
      so. The loop is timed under ``threadpool_limits(1)`` and with numpy's
      default BLAS threads (on at most 20 data sets); the faster counts (for
      200-row fits the thread hand-off dominates, so one thread is usually
      much faster).
      scikit-learn receives the same float32 arrays and keeps float32 X; its
      parameters come out in the dtype of the start (printed): float64 for
      the target's reference, as on numpy's default float64 data. The same
      loop from a float32 start (all of scikit-learn's arithmetic float32,
      like jaxgmm's) is timed too, one thread, and its ratio printed beside.

    Both start from a perturbation of the true parameters (uniform weights,
    jittered means, 1.5x covariances). For information it also times the
    variant where each library initialises itself with k-means++ (jaxgmm's
    default ``init="kmeans++"``; scikit-learn's ``init_params="k-means++"``),
    where the two fits no longer follow the same path.

    Target: sklearn_time / jaxgmm_time >= 500 (given-init variant).
    GFLOP/s uses the EM FLOP model of ``_common.em_iteration_flops``.

BLAS
    The script re-executes itself with ``OPENBLAS_CORETYPE`` and
    ``OPENBLAS_L2_SIZE`` unset (both together; they slow numpy's OpenBLAS) and
    prints the OpenBLAS kernel numpy uses. ``JAXGMM_BENCH_KEEP_BLAS_ENV=1``
    keeps them.

Usage
    python benchmarks/bench_many.py [--quick] [--repeats R] [--sklearn-subset S]
"""

from __future__ import annotations

import time

import _common as c

N_SETS, N, D, K, MAX_ITER = 10_000, 200, 2, 3, 100
TARGET_RATIO = 500.0


def main() -> None:
    c.prepare_process()
    p = c.parser(__doc__)
    p.add_argument("--sklearn-subset", type=int, default=None)
    p.add_argument("--sklearn-repeats", type=int, default=None)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    import jaxgmm

    c.quiet_sklearn_warnings()
    env = c.environment()
    c.print_environment(env)

    n_sets, max_iter = (256, 20) if args.quick else (N_SETS, MAX_ITER)
    subset = args.sklearn_subset or (8 if args.quick else 100)
    subset = min(subset, n_sets)
    repeats = args.repeats or (2 if args.quick else 9)
    sk_repeats = args.sklearn_repeats or (1 if args.quick else 3)
    print(
        f"\n{n_sets} data sets x N={N}, D={D}, K={K}, full, max_iter={max_iter}, tol=0"
    )

    rng = np.random.default_rng(0)
    weights, means, covs = c.random_mixture(rng, (n_sets, K), D)
    xs_np = c.sample_mixtures(rng, N, weights, means, covs)  # float32
    w0, m0, c0 = c.perturbed_start(rng, weights, means, covs)
    xs = jnp.asarray(xs_np)
    init = jax.vmap(lambda w, m, s: jaxgmm.GMM(w, m, s, "full"))(
        jnp.asarray(w0, jnp.float32),
        jnp.asarray(m0, jnp.float32),
        jnp.asarray(c0, jnp.float32),
    )
    keys = jax.random.split(jax.random.key(1), n_sets)

    def fit_given(keys, xs, init):
        return jax.vmap(
            lambda k, x, g: jaxgmm.fit(k, x, K, max_iter=max_iter, tol=0.0, init_gmm=g)
        )(keys, xs, init)

    def fit_kmeanspp(keys, xs):
        return jax.vmap(lambda k, x: jaxgmm.fit(k, x, K, max_iter=max_iter, tol=0.0))(
            keys, xs
        )

    flops = c.em_iteration_flops(N, D, K, "full") * max_iter * n_sets
    rows, results, summary = [], {}, []

    # -- jaxgmm ----------------------------------------------------------------
    jax_runs = {}
    for name, fn, fn_args in (
        ("given init", fit_given, (keys, xs, init)),
        ("kmeans++ init", fit_kmeanspp, (keys, xs)),
    ):
        compiled, lower_s, compile_s = c.compile_jit(fn, *fn_args)
        start = time.perf_counter()
        out = c.block(compiled(*fn_args))
        first_s = time.perf_counter() - start
        times = c.time_call(lambda compiled=compiled, a=fn_args: compiled(*a), repeats)
        jax_runs[name] = dict(
            out=out,
            median=c.median(times),
            times=times,
            lower_s=lower_s,
            compile_s=compile_s,
            first_call_s=first_s,
        )
        assert int(jnp.min(out.n_iter)) == max_iter == int(jnp.max(out.n_iter))
        bad = int(jnp.sum(out.status != 0))
        print(
            f"jaxgmm {name}: median {jax_runs[name]['median']:.3f} s over {repeats}, "
            f"lower {lower_s:.2f} s + compile {compile_s:.2f} s, "
            f"{bad} fits with non-zero status"
        )

    # -- scikit-learn (subset, extrapolated) ----------------------------------
    # Tiny fits are dominated by per-call overhead, where OpenBLAS's thread
    # hand-off costs more than it saves (much more on a shared machine), so
    # the loop is timed with numpy's default threads and with one thread,
    # and the faster is scikit-learn's time.
    # With default threads the loop is much slower, so it runs on at most
    # 20 data sets and is scaled to the subset.
    def sklearn_loop(variant, count):
        models = []
        for i in range(count):
            if variant == "given init":
                kwargs = c.sklearn_init(init, i)
            elif variant == "given float32 init":
                kwargs = c.sklearn_init(init, i, dtype="float32")
            else:
                kwargs = {"init_params": "k-means++", "random_state": i}
            gm = GaussianMixture(
                K, covariance_type="full", max_iter=max_iter, tol=0.0, **kwargs
            )
            models.append(gm.fit(xs_np[i]))
        return models

    sk_runs = {}
    for name in ("given init", "kmeans++ init"):
        by_threads = {}
        for threads in (1, None):
            count = subset if threads == 1 else min(subset, 20)
            with threadpool_limits(threads):
                models = sklearn_loop(name, 2)  # warm-up
                times = []
                for _ in range(sk_repeats if threads == 1 else 1):
                    start = time.perf_counter()
                    models = sklearn_loop(name, count)
                    times.append(time.perf_counter() - start)
            label = "1 thread" if threads == 1 else "default threads"
            by_threads[label] = c.median(times) * subset / count
            print(
                f"scikit-learn {name}, {label}: {count} fits in "
                f"{c.median(times):.2f} s (median of {len(times)}), "
                f"{1e3 * c.median(times) / count:.1f} ms per fit; "
                f"parameters dtype {models[0].means_.dtype}"
            )
            if threads == 1:
                sk_runs[name] = dict(models=models, times=times)
        best = min(by_threads, key=by_threads.get)
        sk_runs[name].update(
            median=by_threads[best], threads=best, by_threads=by_threads
        )
        print(f"scikit-learn {name}: reference is {best}")

    # The given init is float64, so scikit-learn's parameters and most of its
    # arithmetic are float64; from a float32 start all of it is float32, like
    # jaxgmm's. Reported beside the target (one thread, the faster above).
    with threadpool_limits(1):
        sklearn_loop("given float32 init", 2)  # warm-up
        times32 = []
        for _ in range(sk_repeats):
            start = time.perf_counter()
            models32 = sklearn_loop("given float32 init", subset)
            times32.append(time.perf_counter() - start)
    sk32_total = c.median(times32) * n_sets / subset
    print(
        f"scikit-learn given float32 init, 1 thread: {subset} fits in "
        f"{c.median(times32):.2f} s, {1e3 * c.median(times32) / subset:.1f} ms "
        f"per fit; parameters dtype {models32[0].means_.dtype}"
    )

    # Same start, same data: the fits must agree (float32 vs sklearn's dtype).
    out = jax_runs["given init"]["out"]
    sk_models = sk_runs["given init"]["models"]
    ll_jax = np.asarray(out.log_likelihood[:subset], np.float64)
    ll_sk = np.array([m.lower_bound_ for m in sk_models])
    means_diff = max(
        float(np.max(np.abs(np.asarray(out.gmm.means[i]) - m.means_)))
        for i, m in enumerate(sk_models)
    )
    ll_diff = float(np.max(np.abs(ll_jax - ll_sk)))
    n_disagree = int(np.sum(np.abs(ll_jax - ll_sk) > 1e-3 * np.abs(ll_sk)))
    print(
        f"agreement on the subset (given init): max |loglik diff| {ll_diff:.2e}, "
        f"max |means diff| {means_diff:.2e}, {n_disagree} of {subset} data sets "
        "differ by more than 1e-3 relative"
    )
    if n_disagree:
        print(
            "WARNING: jaxgmm and scikit-learn disagree; "
            "the timings compare different work"
        )

    print(
        f"\nscikit-learn timed on {subset} of {n_sets} data sets and "
        f"EXTRAPOLATED x{n_sets / subset:g} to all {n_sets}."
    )
    headers = [
        "variant",
        "jaxgmm s",
        "compile s",
        "sklearn s (extrap.)",
        "sklearn ms/fit",
        "ratio",
        "jaxgmm GFLOP/s",
        "sklearn GFLOP/s",
    ]
    for name in ("given init", "kmeans++ init"):
        j, s = jax_runs[name], sk_runs[name]
        sk_total = s["median"] * n_sets / subset
        ratio = sk_total / j["median"]
        compile_total = j["lower_s"] + j["compile_s"]
        rows.append(
            [
                name,
                j["median"],
                compile_total,
                sk_total,
                1e3 * s["median"] / subset,
                ratio,
                c.gflops(flops, j["median"]),
                c.gflops(flops, sk_total),
            ]
        )
        results[name] = dict(
            jaxgmm_median_s=j["median"],
            jaxgmm_times_s=j["times"],
            jaxgmm_lower_s=j["lower_s"],
            jaxgmm_compile_s=j["compile_s"],
            jaxgmm_first_call_s=j["first_call_s"],
            sklearn_subset=subset,
            sklearn_subset_median_s=s["median"],
            sklearn_subset_times_s=s["times"],
            sklearn_threads=s["threads"],
            sklearn_subset_by_threads_s=s["by_threads"],
            sklearn_extrapolated_s=sk_total,
            ratio=ratio,
            jaxgmm_gflops=c.gflops(flops, j["median"]),
            sklearn_gflops=c.gflops(flops, sk_total),
        )
        summary += [
            {"metric": f"{name}: ratio sklearn/jaxgmm", "value": ratio, "unit": "x"},
            {"metric": f"{name}: jaxgmm median", "value": j["median"], "unit": "s"},
            {"metric": f"{name}: jaxgmm compile", "value": compile_total, "unit": "s"},
        ]
    c.print_table(rows, headers)
    print(f"(FLOPs: {flops / 1e9:.1f} GFLOP = {max_iter} iterations x {n_sets} sets)")
    ratio32 = sk32_total / jax_runs["given init"]["median"]
    print(
        f"given init, against scikit-learn computing in float32 (float32 start): "
        f"{sk32_total:.1f} s extrapolated, ratio {ratio32:.1f} (reported, not the "
        "target's reference)"
    )
    results["given float32 init"] = dict(
        sklearn_subset=subset,
        sklearn_subset_times_s=times32,
        sklearn_threads="1 thread",
        sklearn_extrapolated_s=sk32_total,
        sklearn_param_dtype=str(models32[0].means_.dtype),
        ratio=ratio32,
    )
    summary.append(
        {
            "metric": "given init: ratio vs float32 sklearn",
            "value": ratio32,
            "unit": "x",
        }
    )
    results.update(
        n_sets=n_sets,
        n=N,
        d=D,
        k=K,
        max_iter=max_iter,
        flops=flops,
        jaxgmm_dtype="float32",
        sklearn_input_dtype=str(xs_np.dtype),
        sklearn_param_dtype=str(sk_models[0].means_.dtype),
        agreement_max_loglik_diff=ll_diff,
        agreement_max_means_diff=means_diff,
        agreement_n_disagree=n_disagree,
    )
    ratio = results["given init"]["ratio"]
    targets = [c.check_target("bench_many ratio (given init)", ratio, TARGET_RATIO)]
    c.finish("bench_many", args, env, results, targets, summary)


if __name__ == "__main__":
    main()
