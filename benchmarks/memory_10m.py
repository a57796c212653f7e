"""Peak memory of a float32 fit on 10 million rows.

What it measures
    N=10,000,000 rows, D=16 features (640 MB of float32), K=16 components,
    covariance_type="full", max_iter=3, tol=0 and the default
    ``init="kmeans++"``. The data are generated with numpy, chunk by chunk,
    into one 64-byte-aligned buffer that ``jax.device_put`` adopts without a
    copy (the script checks this), so the process holds the data once and no
    generator temporaries linger; then ``jaxgmm.fit`` runs.

    Each measurement runs in a fresh child process (this script re-invokes
    itself with ``--child``) so that nothing else has touched the heap:
      * baseline: resident set size (RSS, /proc/self/statm) after importing
        jax and jaxgmm, before the data exist;
      * after data: RSS once the data are materialised;
      * peak: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end, the
        peak RSS of the whole process (includes XLA compilation).
    Reported: peak / data size (the target) and (peak - baseline) / data
    size. MB are 1e6 bytes. For information it also measures the same fit
    started from ``init_gmm`` (no k-means++) and both with ``throw=False``
    (no ``equinox`` error check on ``x``), to separate the memory of the
    initialisation, of the input check and of EM itself; and the default fit
    compiled ahead (``jax.jit(fit).lower(...).compile()``) before it runs,
    which splits the peak into what XLA's compilation leaves resident
    ("before fit" minus "after data") and what the running fit adds on top
    ("peak - before fit"; "fit s" then excludes compilation).

    Target: peak RSS < 2 x data size (1,280 MB) for the default fit
    (k-means++, throw=True).
    scikit-learn is not run here (it would convert to float64 and hold
    N x K responsibilities: several GB).

BLAS
    Children run with ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset, like
    every benchmark (numpy is not on the hot path here).

Usage
    python benchmarks/memory_10m.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import _common as c

N, D, K, MAX_ITER = 10_000_000, 16, 16, 3
TARGET_RATIO = 2.0
CHILD_PREFIX = "MEMORY_RESULT "


VARIANTS = (  # (init, throw, compile_first); the first is the target
    ("kmeans++", True, False),
    ("init_gmm", True, False),
    ("kmeans++", False, False),
    ("init_gmm", False, False),
    ("kmeans++", True, True),
)


def _aligned_empty(shape, dtype, align: int = 64):
    """An uninitialised numpy array whose buffer starts on an ``align`` boundary."""
    import numpy as np

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def child(n: int, init: str, throw: bool, compile_first: bool) -> None:
    import jax
    import numpy as np

    import jaxgmm

    baseline = c.current_rss_mb()
    peak_after_import = c.peak_rss_mb()

    rng = np.random.default_rng(0)
    weights, means, covs = c.random_mixture(rng, K, D)
    mu = means.astype(np.float32)
    chol = np.linalg.cholesky(covs).astype(np.float32)
    chunk = 20_000

    # The data are written chunk by chunk into one 64-byte-aligned numpy
    # buffer, which jax.device_put then adopts without a copy (checked
    # below): the process holds the 640 MB once, as a user's would.
    data = _aligned_empty((n, D), np.float32)
    for start in range(0, n, chunk):
        rows = data[start : start + chunk]
        labels = rng.choice(K, size=len(rows), p=weights)
        rng.standard_normal(out=rows, dtype=np.float32)
        for k in range(K):
            hit = labels == k
            rows[hit] = rows[hit] @ chol[k].T + mu[k]
    x = c.block(jax.device_put(data))
    if x.unsafe_buffer_pointer() != data.ctypes.data:
        raise SystemExit(
            "jax.device_put copied the data; the measurement needs one copy"
        )
    del data
    after_data = c.current_rss_mb()
    peak_after_data = c.peak_rss_mb()

    init_gmm = None
    if init == "init_gmm":
        w0, m0, s0 = c.perturbed_start(rng, weights, means, covs)
        init_gmm = jaxgmm.GMM(
            w0.astype(np.float32), m0.astype(np.float32), s0.astype(np.float32)
        )

    def fit(key, x):
        return jaxgmm.fit(
            key, x, K, max_iter=MAX_ITER, tol=0.0, init_gmm=init_gmm, throw=throw
        )

    if compile_first:
        # XLA's compilation, separately: what it leaves resident (memory the
        # allocator keeps after the compiler frees it) versus what the fit
        # itself needs while it runs.
        fit = jax.jit(fit).lower(jax.random.key(1), x).compile()
    rss_before_fit = c.current_rss_mb()
    start = time.perf_counter()
    result = c.block(fit(jax.random.key(1), x))
    seconds = time.perf_counter() - start
    out = dict(
        n=n,
        d=D,
        k=K,
        init=init,
        throw=throw,
        data_mb=x.nbytes / 1e6,
        baseline_rss_mb=baseline,
        peak_after_import_mb=peak_after_import,
        rss_after_data_mb=after_data,
        compile_first=compile_first,
        rss_before_fit_mb=rss_before_fit,
        peak_after_data_mb=peak_after_data,
        peak_rss_mb=c.peak_rss_mb(),
        fit_seconds=seconds,  # includes compilation unless compile_first
        n_iter=int(result.n_iter),
        log_likelihood=float(result.log_likelihood),
    )
    print(CHILD_PREFIX + json.dumps(out), flush=True)


def main() -> None:
    c.prepare_process()
    p = c.parser(__doc__)
    p.add_argument("--child", choices=("kmeans++", "init_gmm"), default=None)
    p.add_argument("--no-throw", action="store_true", help="child: throw=False")
    p.add_argument("--compile-first", action="store_true", help="child: AOT compile")
    args = p.parse_args()
    n = 200_000 if args.quick else N
    if args.child:
        child(n, args.child, not args.no_throw, args.compile_first)
        return

    env = c.environment()
    c.print_environment(env)
    print(f"\nN={n:,}, D={D}, K={K}, full, float32, max_iter={MAX_ITER}, tol=0")
    runs = {}
    for init, throw, compile_first in VARIANTS:
        name = f"{init}, throw={throw}" + (", compiled first" if compile_first else "")
        cmd = [sys.executable, __file__, "--child", init]
        if not throw:
            cmd.append("--no-throw")
        if compile_first:
            cmd.append("--compile-first")
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=c.clean_blas_env(), check=False
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_PREFIX)]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            raise SystemExit(f"child {name} failed with exit code {proc.returncode}")
        runs[name] = json.loads(lines[-1][len(CHILD_PREFIX) :])
        print(f"{name}: peak RSS {runs[name]['peak_rss_mb']:,.0f} MB", flush=True)

    rows = []
    for name, r in runs.items():
        r["peak_over_data"] = r["peak_rss_mb"] / r["data_mb"]
        r["increment_over_data"] = (r["peak_rss_mb"] - r["baseline_rss_mb"]) / r[
            "data_mb"
        ]
        rows.append(
            [
                name,
                r["data_mb"],
                r["baseline_rss_mb"],
                r["rss_after_data_mb"],
                r["rss_before_fit_mb"],
                r["peak_rss_mb"],
                r["peak_rss_mb"] - r["rss_before_fit_mb"],
                r["peak_over_data"],
                r["increment_over_data"],
                r["fit_seconds"],
            ]
        )
    print()
    c.print_table(
        rows,
        ["variant", "data MB", "baseline MB", "after data MB", "before fit MB",
         "peak MB", "peak - before fit", "peak/data", "(peak-base)/data", "fit s"],
    )  # fmt: skip
    main_run = runs["kmeans++, throw=True"]
    targets = [
        c.check_target(
            "memory_10m peak RSS / data (kmeans++)",
            main_run["peak_over_data"],
            TARGET_RATIO,
            higher_is_better=False,
        )
    ]
    summary = [
        {"metric": "peak RSS / data", "value": main_run["peak_over_data"], "unit": "x"},
        {"metric": "peak RSS", "value": main_run["peak_rss_mb"], "unit": "MB"},
        {
            "metric": "(peak - baseline) / data",
            "value": main_run["increment_over_data"],
            "unit": "x",
        },
    ] + [
        {
            "metric": f"{name}: peak RSS / data",
            "value": r["peak_over_data"],
            "unit": "x",
        }
        for name, r in runs.items()
        if r is not main_run
    ]
    c.finish("memory_10m", args, env, runs, targets, summary)


if __name__ == "__main__":
    main()
