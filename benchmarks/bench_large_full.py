"""One large data set, full covariances: time per EM iteration.

What it measures
    N=1,000,000 rows, D=16 features, K=16 components, covariance_type="full",
    drawn (fixed seed, numpy float32) from a well-separated random mixture.
    jaxgmm (``jax.jit`` of ``jaxgmm.fit(..., tol=0, init_gmm=g)``, float32) and
    scikit-learn (``GaussianMixture(tol=0, weights_init/means_init/
    precisions_init)`` on the same float32 array) start from the same
    perturbation of the true parameters (precisions = inverse covariances).

    Per-iteration times, compile time and the float32 reference are
    measured as ``_large.py`` describes. GFLOP/s uses
    ``_common.em_iteration_flops``
    (N K (4 D^2 + 7 D + 7) per iteration, about 18.5 GFLOP here).

    Target: sklearn / jaxgmm per-iteration time >= 25 (scikit-learn is
    expected near 4.5 s per iteration on the reference 2-core machine).

BLAS
    The script re-executes itself with ``OPENBLAS_CORETYPE`` and
    ``OPENBLAS_L2_SIZE`` unset (both together) and prints the OpenBLAS kernel
    numpy uses; ``JAXGMM_BENCH_KEEP_BLAS_ENV=1`` keeps them.

Usage
    python benchmarks/bench_large_full.py [--quick] [--repeats R]
        [--jax-iters J] [--sklearn-iters S] [--sklearn-repeats R]
"""

from __future__ import annotations

from _large import run_large

if __name__ == "__main__":
    run_large(
        __doc__,
        "bench_large_full",
        "full",
        n=1_000_000,
        d=16,
        k=16,
        target_ratio=25.0,
        quick_sizes=(20_000, 16, 16),
    )
