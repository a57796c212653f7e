"""Shared helpers for the jaxgmm benchmarks: timing, FLOP counts, data, reporting.

Timing
    :func:`time_call` runs a function ``repeats`` times (after ``warmup`` calls),
    waits for JAX's asynchronous dispatch with ``jax.block_until_ready`` and
    returns the individual wall-clock times; benchmarks report the median.
    Compilation is measured separately by :func:`compile_jit`, which times
    ``jax.jit(fn).lower(*args)`` (tracing + lowering to StableHLO) and
    ``.compile()`` (XLA) and returns the compiled executable, so steady-state
    timings never include compilation.

FLOP counts (:func:`em_iteration_flops`)
    One EM iteration on N rows, K components and D features, counting every
    multiply and every add as one FLOP (an FMA is 2), for the dense operations
    both jaxgmm and scikit-learn perform. The O(K D^3) M-step factorisations
    are ignored (negligible when N >> D).

    full::

        E-step  Mahalanobis   x - mu_k             N K D
                              (x - mu_k) @ P_k     2 N K D^2
                              squared norm         2 N K D
                log-sum-exp, responsibilities      6 N K
        M-step  counts                             N K
                sums  resp^T @ x                   2 N K D
                scatter  (x - mu_k) weighted       2 N K D
                         outer-product sum         2 N K D^2
        total                                      N K (4 D^2 + 7 D + 7)

    diag (the expanded form both libraries use)::

        E-step  x**2                               N D
                x @ (mu * prec)^T                  2 N K D
                x**2 @ prec^T                      2 N K D
                constant terms and sum             2 N K
                log-sum-exp, responsibilities      6 N K
        M-step  counts                             N K
                resp^T @ x, resp^T @ x**2          4 N K D  (+ N D for x**2)
        total                                      8 N K D + 2 N D + 9 N K

    GFLOP/s = FLOPs per iteration * iterations / seconds / 1e9. It is the
    same count for both libraries, so the GFLOP/s ratio is the speed ratio.

BLAS configuration
    The environment may set ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE``,
    which make OpenBLAS (used by numpy, hence scikit-learn) pick a slow kernel.
    :func:`ensure_clean_blas_env` (called by :func:`prepare_process`)
    re-executes the script with both unset (set
    ``JAXGMM_BENCH_KEEP_BLAS_ENV=1`` to keep them), and :func:`print_environment`
    prints the OpenBLAS kernel numpy actually uses (``threadpoolctl``).

XLA flag
    On jaxlib 0.10.2, :func:`prepare_process` also adds
    ``--xla_cpu_experimental_ynn_fusion_type=-reduce`` to ``XLA_FLAGS`` (that
    version miscompiles some vmapped reductions, jax-ml/jax#39103);
    ``JAXGMM_BENCH_XLA_WORKAROUND=0`` skips it, ``=1`` forces it elsewhere.

Results
    :func:`save_result` appends one JSON object per line to
    ``benchmarks/results/results.jsonl`` (``--no-save`` skips it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results" / "results.jsonl"

#: Environment variables that slow OpenBLAS down when set by the environment.
BLAS_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
KEEP_BLAS_ENV = "JAXGMM_BENCH_KEEP_BLAS_ENV"
#: Set by run_all.py so that its summary can find this run's records.
RUN_ID_ENV = "JAXGMM_BENCH_RUN_ID"


# -- environment -----------------------------------------------------------------


def clean_blas_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) without the OpenBLAS overrides."""
    env = dict(os.environ if env is None else env)
    for name in BLAS_ENV_VARS:
        env.pop(name, None)
    return env


def ensure_clean_blas_env() -> None:
    """Re-exec this script without ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE``.

    OpenBLAS reads them once when numpy loads it, so they must be unset
    before the process starts; both are removed together.
    """
    if os.environ.get(KEEP_BLAS_ENV) == "1":
        return
    present = [name for name in BLAS_ENV_VARS if name in os.environ]
    if present:
        print(f"[bench] re-running with {', '.join(present)} unset", flush=True)
        os.execve(sys.executable, [sys.executable, *sys.argv], clean_blas_env())


#: jaxlib 0.10.2's XLA:CPU offloads reductions to YNNPACK fusions that return
#: wrong numbers for some vmapped reductions (jax-ml/jax#39103); this flag keeps
#: reductions out of those fusions.
XLA_WORKAROUND_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
XLA_WORKAROUND_ENV = "JAXGMM_BENCH_XLA_WORKAROUND"


#: jaxlib versions known to miscompile without the flag.
XLA_WORKAROUND_JAXLIB = ("0.10.2",)


def apply_xla_workaround() -> None:
    """Add :data:`XLA_WORKAROUND_FLAG` to ``XLA_FLAGS`` on an affected jaxlib.

    Must run before jax is imported. ``JAXGMM_BENCH_XLA_WORKAROUND=1`` forces
    it on any version, ``=0`` turns it off.
    """
    from importlib.metadata import PackageNotFoundError, version

    setting = os.environ.get(XLA_WORKAROUND_ENV)
    if setting == "0" or "jax" in sys.modules:
        return
    try:
        affected = version("jaxlib") in XLA_WORKAROUND_JAXLIB
    except PackageNotFoundError:
        affected = False
    if not (affected or setting == "1"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_WORKAROUND_FLAG}".strip()


def prepare_process() -> None:
    """Call first in every benchmark's ``main()``: BLAS env, then XLA flags."""
    ensure_clean_blas_env()
    apply_xla_workaround()


def blas_info() -> list[dict[str, Any]]:
    """threadpoolctl's description of the loaded BLAS / OpenMP libraries."""
    import numpy  # noqa: F401  (load numpy's OpenBLAS first)
    import sklearn.mixture  # noqa: F401  (and scikit-learn's OpenMP)
    from threadpoolctl import threadpool_info

    keys = ("internal_api", "prefix", "version", "architecture", "num_threads")
    return [{k: info.get(k) for k in keys} for info in threadpool_info()]


def cpu_times() -> tuple[int, int] | None:
    """``(steal, total)`` CPU time of the whole machine so far, in clock
    ticks, from ``/proc/stat`` (None where it does not exist).

    Steal time is time this VM's virtual CPUs were ready to run but the host
    ran someone else: the main reason the same benchmark is up to ~2x slower
    in one hour than in another here.
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [
        int(v) for v in fields[1:9]
    ]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


def steal_share(start: tuple[int, int] | None) -> float | None:
    """Share of the machine's CPU time stolen by the host since ``start``
    (a :func:`cpu_times` reading), counting busy and idle time alike."""
    now = cpu_times()
    if start is None or now is None or now[1] <= start[1]:
        return None
    return (now[0] - start[0]) / (now[1] - start[1])


def environment() -> dict[str, Any]:
    import jax
    import numpy as np
    import sklearn

    import jaxgmm

    source = Path(jaxgmm.__file__).resolve().parent
    commit = _git("rev-parse", "--short", "HEAD", cwd=source)
    dirty = _git("status", "--porcelain", "--", ".", cwd=source).splitlines()
    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        # finish() turns this reading into env["cpu_steal_share"].
        "cpu_times_at_start": cpu_times(),
        "git_commit": commit,
        "jaxgmm_source": str(source),
        "jaxgmm_uncommitted_changes": dirty,
        "blas_env": {name: os.environ.get(name) for name in BLAS_ENV_VARS},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxlib": _jaxlib_version(),
        "blas": blas_info(),
    }


def _jaxlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return ""


def _git(*args: str, cwd: Path) -> str:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=False
        )
    except OSError:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def print_environment(env: dict[str, Any]) -> None:
    print(
        f"jax {env['jax']} (jaxlib {env['jaxlib']}, {env['backend']}, "
        f"{len(env['devices'])} device), "
        f"numpy {env['numpy']}, scikit-learn {env['sklearn']}, "
        f"{env['cpu_count']} CPUs, load average {env['load_average']}"
    )
    dirty = env["jaxgmm_uncommitted_changes"]
    print(
        f"jaxgmm from {env['jaxgmm_source']} (git {env['git_commit'] or '?'}"
        f"{', uncommitted changes: ' + str(len(dirty)) if dirty else ''})"
    )
    print(f"OpenBLAS env: {env['blas_env']}; XLA_FLAGS={env['xla_flags']!r}")
    for lib in env["blas"]:
        arch = lib.get("architecture") or "-"
        print(
            f"  {lib['internal_api']:<9} {lib['prefix']:<18} "
            f"{lib['version'] or '-':<14}"
            f" kernel={arch:<10} threads={lib['num_threads']}"
        )


# -- command line ----------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats")
    p.add_argument("--no-save", action="store_true", help="do not append to results")
    return p


# -- timing ----------------------------------------------------------------------


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return times


def median(times: Sequence[float]) -> float:
    return float(statistics.median(times))


def compile_jit(fn: Callable, *args, **jit_kwargs):
    """``(compiled, lower_seconds, compile_seconds)`` of ``jax.jit(fn)`` at ``args``.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct`` pytrees. The compiled
    executable is called as ``compiled(*args)`` with concrete arrays.
    """
    import jax

    jitted = jax.jit(fn, **jit_kwargs)
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return compiled, lower_s, compile_s


def abstract(tree):
    """``jax.ShapeDtypeStruct`` for every array leaf of ``tree``."""
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (1e6 bytes).

    ``ru_maxrss`` is in KiB on Linux.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def current_rss_mb() -> float:
    """Current resident set size of this process, in MB (1e6 bytes)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


# -- FLOP counts -----------------------------------------------------------------


def em_iteration_flops(n: int, d: int, k: int, covariance_type: str) -> int:
    """FLOPs of one EM iteration (see the module docstring for the count)."""
    if covariance_type == "full":
        return n * k * (4 * d * d + 7 * d + 7)
    if covariance_type == "diag":
        return 8 * n * k * d + 2 * n * d + 9 * n * k
    raise ValueError(f"no FLOP model for covariance_type={covariance_type!r}")


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


# -- data ------------------------------------------------------------------------


def random_mixture(rng, k: int, d: int, separation: float = 6.0):
    """Well-separated mixture parameters (float64 numpy): weights, means, covariances.

    Means are standard normal times ``separation``; each covariance is
    ``A A^T / d + 0.5 I`` with standard normal ``A`` (eigenvalues of order 1).
    Leading batch axes are allowed through ``k`` being a tuple ``(*batch, k)``.
    """
    import numpy as np

    shape = tuple(k) if isinstance(k, tuple) else (k,)
    *batch, k = shape
    weights = rng.uniform(0.5, 1.5, shape)
    weights /= weights.sum(-1, keepdims=True)
    means = rng.normal(size=(*shape, d)) * separation
    a = rng.normal(size=(*shape, d, d))
    covariances = a @ np.swapaxes(a, -1, -2) / d + 0.5 * np.eye(d)
    return weights, means, covariances


def sample_mixture(rng, n: int, weights, means, covariances, dtype="float32"):
    """``n`` rows from one mixture (numpy), cast to ``dtype``."""
    import numpy as np

    k, d = means.shape
    labels = rng.choice(k, size=n, p=weights)
    x = np.empty((n, d), dtype)
    chol = np.linalg.cholesky(covariances)
    for j in range(k):
        rows = np.flatnonzero(labels == j)
        noise = rng.standard_normal((rows.size, d))
        x[rows] = means[j] + noise @ chol[j].T
    return x


def sample_mixtures(rng, n: int, weights, means, covariances, dtype="float32"):
    """``(B, n, d)`` rows from B mixtures with ``(B, K, ...)`` parameters."""
    import numpy as np

    b, k, d = means.shape
    u = rng.uniform(size=(b, n, 1))
    labels = (u > np.cumsum(weights, -1)[:, None, :]).sum(-1).clip(0, k - 1)
    chol = np.linalg.cholesky(covariances)
    noise = rng.standard_normal((b, n, d))
    batch = np.arange(b)[:, None]
    centre = means[batch, labels]
    factor = chol[batch, labels]
    x = centre + np.einsum("bnde,bne->bnd", factor, noise)
    return x.astype(dtype)


def perturbed_start(rng, weights, means, covariances, scale: float = 0.5):
    """A start near the truth: uniform weights, jittered means, 1.5x covariances."""
    import numpy as np

    start_weights = np.full_like(weights, 1.0 / weights.shape[-1])
    start_means = means + scale * rng.normal(size=means.shape)
    return start_weights, start_means, 1.5 * covariances


def sklearn_init(gmm, index=None, dtype="float64") -> dict[str, Any]:
    """scikit-learn's ``weights_init``/``means_init``/``precisions_init`` for ``gmm``.

    ``index`` picks one mixture out of a batched GMM. Precisions are the
    inverse covariances (computed in float64 from jaxgmm's parameters), then
    cast to ``dtype``. scikit-learn keeps the dtype of the start for its
    parameters, and numpy computes a product of float32 ``X`` with float64
    parameters in float64: with the default float64 start most of its
    arithmetic is float64 even on float32 data (its default on numpy's
    float64 data too); with ``dtype="float32"`` and float32 data all of it is
    float32.
    """
    import numpy as np

    weights = np.asarray(gmm.weights, np.float64)
    means = np.asarray(gmm.means, np.float64)
    covariances = np.asarray(gmm.covariances, np.float64)
    if index is not None:
        weights, means, covariances = weights[index], means[index], covariances[index]
    weights = weights / weights.sum()
    if gmm.covariance_type == "full":
        precisions = np.linalg.inv(covariances)
        precisions = 0.5 * (precisions + np.swapaxes(precisions, -1, -2))
    else:
        precisions = 1.0 / covariances
    weights, means, precisions = (
        np.asarray(a, dtype) for a in (weights, means, precisions)
    )
    weights = weights / weights.sum()  # sums to 1 within the dtype's rounding
    return {"weights_init": weights, "means_init": means, "precisions_init": precisions}


# -- reporting -------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
        for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def check_target(
    label: str, value: float, target: float, higher_is_better: bool = True
) -> dict[str, Any]:
    """Print ``label: value vs target -> PASS/FAIL`` and return it as a dict."""
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    verdict = "PASS" if ok else "FAIL"
    print(f"TARGET {label}: {fmt(value)} (target {sign} {fmt(target)}) -> {verdict}")
    return {
        "label": label,
        "value": value,
        "target": target,
        "higher_is_better": higher_is_better,
        "pass": bool(ok),
    }


#: Prefix of the one-line summary that run_all.py reads from each script's output.
SUMMARY_PREFIX = "BENCH_SUMMARY "


def finish(
    benchmark: str,
    args: argparse.Namespace,
    env: dict[str, Any],
    results: dict[str, Any],
    targets: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]] = (),
) -> None:
    """Print the one-line summary for run_all.py and save the full record.

    ``summary`` rows are ``{"metric", "value", "unit"}`` dicts shown by
    run_all.py next to the targets (ratios, medians, compile times).
    """
    steal = steal_share(env.get("cpu_times_at_start"))
    env["cpu_steal_share"] = steal
    if steal is not None:
        print(
            f"CPU time stolen by the VM's host during this run: {100 * steal:.1f}%"
            " (time the virtual CPUs were ready but not running; a slow hour"
            " shows up here)"
        )
    line = {
        "benchmark": benchmark,
        "quick": bool(args.quick),
        "targets": list(targets),
        "summary": list(summary)
        + (
            []
            if steal is None
            else [{"metric": "CPU steal", "value": 100 * steal, "unit": "%"}]
        ),
    }
    print(SUMMARY_PREFIX + json.dumps(line, default=_json_default), flush=True)
    save_result(benchmark, args, env, results, targets)


def save_result(
    benchmark: str,
    args: argparse.Namespace,
    env: dict[str, Any],
    results: dict[str, Any],
    targets: Sequence[dict[str, Any]],
) -> None:
    """Append one JSON line describing this run to ``results/results.jsonl``."""
    if getattr(args, "no_save", False):
        return
    record = {
        "benchmark": benchmark,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": os.environ.get(RUN_ID_ENV),
        "quick": bool(args.quick),
        "env": env,
        "results": results,
        "targets": list(targets),
    }
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_FILE, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
    print(f"[bench] appended to {RESULTS_FILE.relative_to(REPO_DIR)}")


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def quiet_sklearn_warnings() -> None:
    """tol=0 never converges: silence scikit-learn's ConvergenceWarning."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
