"""One large data set, diagonal covariances: time per EM iteration.

What it measures
    N=1,000,000 rows, D=64 features, K=32 components, covariance_type="diag",
    drawn (fixed seed, numpy float32) from a well-separated random mixture
    with diagonal covariances. jaxgmm (``jax.jit`` of ``jaxgmm.fit(...,
    tol=0, init_gmm=g)``, float32) and scikit-learn (``GaussianMixture(tol=0,
    weights_init/means_init/precisions_init)`` on the same float32 array)
    start from the same perturbation of the true parameters (precisions =
    inverse variances).

    Per-iteration times, compile time and the float32 reference are
    measured as ``_large.py`` describes. GFLOP/s uses
    ``_common.em_iteration_flops``
    (8 N K D + 2 N D + 9 N K per iteration, about 16.8 GFLOP here).

    Target: sklearn / jaxgmm per-iteration time >= 15.

BLAS
    The script re-executes itself with ``OPENBLAS_CORETYPE`` and
    ``OPENBLAS_L2_SIZE`` unset (both together) and prints the OpenBLAS kernel
    numpy uses; ``JAXGMM_BENCH_KEEP_BLAS_ENV=1`` keeps them.

Usage
    python benchmarks/bench_large_diag.py [--quick] [--repeats R]
        [--jax-iters J] [--sklearn-iters S] [--sklearn-repeats R]
"""

from __future__ import annotations

from _large import run_large

if __name__ == "__main__":
    run_large(
        __doc__,
        "bench_large_diag",
        "diag",
        n=1_000_000,
        d=64,
        k=32,
        target_ratio=15.0,
        quick_sizes=(20_000, 64, 32),
    )
