"""Where the time of a large EM fit goes, kernel by kernel (XLA:CPU).

What it measures
    One of the large workloads of ``bench_large_*.py`` (same sizes, same
    data generator, ``tol=0``, ``init_gmm`` from a short fit on a subset),
    compiled once, then run ``--fits`` times under ``jax.profiler.trace``
    with XLA's per-kernel trace events on
    (``--xla_cpu_enable_xprof_traceme=true``, set before jax is imported).
    It prints the ``--top`` kernels by total time: how often each ran, its
    median duration and its total divided by the traced EM iterations
    (kernels that run once per fit, such as the centring pass, are spread
    over them too), and the median period of the row-chunk loop (the time
    of one chunk step, from the start times of its most frequent kernel).
    Kernels run on XLA's intra-op threads; each thread's busy share is
    printed too. Like the other scripts it adds the jaxlib 0.10.2 XLA
    workaround flag where that version is installed (``_common``).

    Tracing adds some overhead (the chunk period is ~10% longer than
    without it); the split between kernels is what this is for, not the
    absolute time. No scikit-learn, no results file.

Usage
    python benchmarks/profile_ops.py [--workload diag|full|small_d]
        [--fits 2] [--max-iter 3] [--top 25]
"""

from __future__ import annotations

import os
import sys

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"

WORKLOADS = {
    # name: (N, D, K, covariance_type), as in bench_large_*.py
    "diag": (1_000_000, 64, 32, "diag"),
    "full": (1_000_000, 16, 16, "full"),
    "small_d": (1_000_000, 2, 8, "full"),
}


def kernel_events(trace_dir: str):
    """``{thread: [(name, start_ns, end_ns)]}`` of XLA's intra-op threads."""
    import glob

    from jax.profiler import ProfileData

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    threads: dict[str, list[tuple[str, int, int]]] = {}
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            events = threads.setdefault(line.name, [])
            for event in line.events:
                # Executor bookkeeping and loop thunks contain the kernels.
                if event.name.startswith(
                    ("end:", "ThunkExecutor", "Threadpool", "while")
                ):
                    continue
                events.append((event.name, event.start_ns, event.end_ns))
    return threads


def summarise(threads, n_iterations: int, top: int) -> None:
    import numpy as np

    durations: dict[str, list[int]] = {}
    starts: dict[str, list[int]] = {}
    for events in threads.values():
        for name, start, end in events:
            durations.setdefault(name, []).append(end - start)
            starts.setdefault(name, []).append(start)
    if not durations:
        print("no kernel events recorded (is XLA's traceme flag honoured?)")
        return
    span = max(e for ev in threads.values() for _, _, e in ev) - min(
        s for ev in threads.values() for _, s, _ in ev
    )
    # Waits inside a multi-threaded YNNPACK kernel are not a kernel of their own.
    kernels = [name for name in durations if "Await" not in name]
    busiest = max(kernels, key=lambda name: len(durations[name]))
    period = float(np.median(np.diff(np.sort(starts[busiest]))))
    print(
        f"chunk step: median period {period / 1e3:.1f} us "
        f"(from the start times of {busiest!r}, run {len(starts[busiest])} times)"
    )
    for name, events in threads.items():
        busy = sum(end - start for _, start, end in events)
        print(f"thread {name[-8:]}: busy {100 * busy / span:.0f}% of the traced span")
    rows = sorted(durations.items(), key=lambda item: -sum(item[1]))[:top]
    print(f"\n{'kernel':36s} {'runs':>7s} {'median us':>10s} {'ms / iteration':>15s}")
    for name, values in rows:
        per_iteration = sum(values) / n_iterations / 1e6
        print(
            f"{name:36s} {len(values):7d} {np.median(values) / 1e3:10.1f} "
            f"{per_iteration:15.2f}"
        )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="diag")
    parser.add_argument("--fits", type=int, default=2)
    parser.add_argument("--max-iter", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    if "jax" in sys.modules:
        raise RuntimeError("profile_ops must set XLA_FLAGS before jax is imported")
    from _common import apply_xla_workaround

    apply_xla_workaround()
    flags = os.environ.get("XLA_FLAGS", "")
    if TRACE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TRACE_FLAG}".strip()

    import tempfile

    import jax
    import numpy as np
    from _common import random_mixture, sample_mixture

    import jaxgmm

    n, d, k, covariance_type = WORKLOADS[args.workload]
    rng = np.random.default_rng(0)
    weights, means, covariances = random_mixture(rng, k, d)
    if covariance_type == "diag":
        covariances = covariances * np.eye(d)
    x = jax.device_put(sample_mixture(rng, n, weights, means, covariances))
    start = jaxgmm.fit(
        jax.random.key(0), x[:20_000], k, covariance_type=covariance_type, max_iter=3
    ).gmm

    def fit(x, init):
        return jaxgmm.fit(
            jax.random.key(0),
            x,
            k,
            covariance_type=covariance_type,
            tol=0.0,
            max_iter=args.max_iter,
            init_gmm=init,
        )

    compiled = jax.jit(fit).lower(x, start).compile()
    jax.block_until_ready(compiled(x, start))
    print(
        f"N={n:,}, D={d}, K={k}, covariance_type={covariance_type!r}, "
        f"max_iter={args.max_iter}, {args.fits} traced fits; jax {jax.__version__}"
    )
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.fits):
                jax.block_until_ready(compiled(x, start))
        threads = kernel_events(trace_dir)
    summarise(threads, args.fits * args.max_iter, args.top)


if __name__ == "__main__":
    main()
