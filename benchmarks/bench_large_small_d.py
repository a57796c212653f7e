"""One large data set with few features, full covariances: time per EM iteration.

What it measures
    N=1,000,000 rows, D=2 features, K=8 components, covariance_type="full",
    drawn (fixed seed, numpy float32) from a well-separated random mixture:
    the long, low-dimensional data sets of maps, sensor traces and 2-D
    embeddings. Same protocol as ``bench_large_full.py`` (see ``_large.py``):
    jaxgmm and scikit-learn start from the same perturbation of the true
    parameters, jaxgmm's per-iteration time a difference of fits, scikit-learn's
    its EM loop body, compile time reported separately.

    For few features jaxgmm takes its elementwise path (per-component
    differences, unrolled 2x2 factorisations) rather than GEMMs, chunk by
    chunk. No target: the issue sets none; the ratio is reported for
    information.

Usage
    python benchmarks/bench_large_small_d.py [--quick] [--repeats R]
        [--jax-iters J] [--sklearn-iters S] [--sklearn-repeats R]
"""

from __future__ import annotations

from _large import run_large

if __name__ == "__main__":
    run_large(
        __doc__,
        "bench_large_small_d",
        "full",
        n=1_000_000,
        d=2,
        k=8,
        target_ratio=None,
        quick_sizes=(20_000, 2, 8),
    )
