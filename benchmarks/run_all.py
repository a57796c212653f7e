"""Run every jaxgmm benchmark, one at a time, and summarise the ratios.

Each benchmark script runs in its own subprocess, sequentially (never two at
once: they would compete for the cores), with ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` removed from the environment together, so that numpy
(and so scikit-learn) uses the OpenBLAS kernel it detects for this CPU; each
script prints that kernel (threadpoolctl). Every script appends its full
record to ``benchmarks/results/results.jsonl`` and prints a one-line
``BENCH_SUMMARY`` that this runner collects into the final table of ratios,
times and targets (PASS/FAIL).

Usage
    python benchmarks/run_all.py [--quick] [--only NAME ...] [--timeout S]
                                 [--strict] [--no-save]

``make bench`` runs it with no arguments (full sizes, roughly 15-25 minutes
on a 2-core machine). ``--quick`` is a smoke test of every script (about a
minute or two). Exit status is 1 if a script fails or times out, and with
``--strict`` also if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import _common as c

BENCHMARKS = [
    "bench_compile",
    "bench_many",
    "bench_large_full",
    "bench_large_diag",
    "bench_large_small_d",
    "memory_10m",
]


def run_one(name: str, args, env) -> tuple[dict | None, str]:
    script = Path(__file__).resolve().parent / f"{name}.py"
    cmd = [sys.executable, str(script)]
    if args.quick:
        cmd.append("--quick")
    if args.no_save:
        cmd.append("--no-save")
    print(f"\n{'=' * 78}\n== {name}: {' '.join(cmd[1:])}\n{'=' * 78}", flush=True)
    start = time.perf_counter()
    summary = None
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = start + args.timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(c.SUMMARY_PREFIX):
                summary = json.loads(line[len(c.SUMMARY_PREFIX) :])
            else:
                print(line, end="", flush=True)
            if time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(cmd, args.timeout)
        proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, f"timed out after {args.timeout:.0f} s"
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return None, f"failed (exit {proc.returncode}) after {elapsed:.0f} s"
    if summary is None:
        return None, "printed no summary"
    return summary, f"ok in {elapsed:.0f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    p.add_argument("--timeout", type=float, default=1800.0, help="per script, s")
    p.add_argument("--strict", action="store_true", help="exit 1 on a missed target")
    p.add_argument("--no-save", action="store_true", help="do not append results")
    args = p.parse_args()

    env = c.clean_blas_env()
    env[c.RUN_ID_ENV] = uuid.uuid4().hex[:12]
    removed = [v for v in c.BLAS_ENV_VARS if v in os.environ]
    print(
        f"run id {env[c.RUN_ID_ENV]}; running subprocesses without "
        f"{' and '.join(c.BLAS_ENV_VARS)}"
        + (f" (removed: {', '.join(removed)})" if removed else " (neither was set)")
    )

    outcomes = {}
    for name in args.only or BENCHMARKS:
        outcomes[name] = run_one(name, args, env)
        print(f"== {name}: {outcomes[name][1]}", flush=True)

    print(f"\n{'=' * 78}\nSUMMARY{' (quick sizes)' if args.quick else ''}\n{'=' * 78}")
    rows, failed, missed = [], False, False
    for name, (summary, status) in outcomes.items():
        if summary is None:
            failed = True
            rows.append([name, status, "", "", ""])
            continue
        for t in summary["targets"]:
            sign = ">=" if t["higher_is_better"] else "<="
            verdict = "PASS" if t["pass"] else "FAIL"
            missed |= not t["pass"]
            rows.append(
                [name, t["label"], t["value"], f"{sign} {c.fmt(t['target'])}", verdict]
            )
    c.print_table(rows, ["benchmark", "target", "value", "target", "result"])

    print()
    detail = []
    for name, (summary, _) in outcomes.items():
        for s in (summary or {}).get("summary", []):
            detail.append([name, s["metric"], s["value"], s["unit"]])
    if detail:
        c.print_table(detail, ["benchmark", "measure", "value", "unit"])
    if not args.no_save:
        print(f"\nfull records: {c.RESULTS_FILE}")
    if failed or (args.strict and missed):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
