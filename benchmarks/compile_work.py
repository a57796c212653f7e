"""Compile work of ``jaxgmm.fit``, in instructions executed (callgrind).

Why
    On this shared 2-core VM the wall-clock compile time of the same program
    moves by up to ~1.7x from hour to hour (``bench_compile.py`` measures it
    as a user sees it). The instructions XLA executes to compile it hardly
    move: repeated runs agree to ~1-3% in total and closer in the LLVM part.
    That makes a change's effect on compile time measurable, even when it is
    a few percent.

What it measures
    The program of ``bench_compile.py``'s k-means++ configurations
    (``large``: N=1,000,000, D=16, K=16, full; ``many``: ``jax.vmap`` of
    10,000 fits with N=200, D=2, K=3), lowered from abstract shapes, then
    compiled under ``valgrind --tool=callgrind`` with instrumentation
    switched on (``callgrind_control -i on``) only around ``.compile()``.
    It prints the total and its parts: LLVM (optimisation and machine code
    for each kernel), the fusion emitter (HLO fusion to LLVM IR via MLIR),
    XLA's HLO passes and the thunk emitter. Waiting threads add a little
    noise to the total; the LLVM part is the steadiest figure.

    About 3 minutes per configuration (valgrind runs the compiler ~50x
    slower). Not part of ``run_all.py``; it needs valgrind.

Usage
    python benchmarks/compile_work.py [large] [many] [--given]

``--given`` compiles the fit from ``init_gmm`` instead of k-means++.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

PARTS = {
    "llvm": r"xla::cpu::IrCompiler::operator\(\)\(llvm::Module&\)",
    "fusion emitter": r"xla::cpu::ParallelFusionEmitter::CompileFusion\(",
    "HLO passes": r"xla::cpu::CpuCompiler::RunHloPasses\(",
    "thunk emitter": r"xla::cpu::ThunkEmitter::EmitEntryComputation",
}


def compile_under_callgrind(config: str, given: bool) -> None:
    """The child: lower, then compile with instrumentation on."""
    import jax
    import jax.numpy as jnp

    import jaxgmm

    f32 = jnp.float32
    key = jax.eval_shape(lambda: jax.random.key(0))
    if config == "large":
        n, d, k, batch = 1_000_000, 16, 16, ()
    else:
        n, d, k, batch = 200, 2, 3, (10_000,)
    x = jax.ShapeDtypeStruct((*batch, n, d), f32)
    start = jaxgmm.GMM(
        jnp.full((k,), 1 / k, f32),
        jnp.zeros((k, d), f32),
        jnp.broadcast_to(jnp.eye(d, dtype=f32), (k, d, d)),
    )
    start = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((*batch, *a.shape), a.dtype), start
    )
    keys = jax.ShapeDtypeStruct(batch, key.dtype)

    def one(key, x, g):
        return jaxgmm.fit(
            key, x, k, max_iter=100, tol=0.0, init_gmm=g if given else None
        )

    fn = jax.vmap(one) if batch else one
    lowered = jax.jit(fn).lower(keys, x, start)
    pid = str(os.getpid())
    subprocess.run(
        ["callgrind_control", "-i", "on", pid], check=True, capture_output=True
    )
    lowered.compile()
    subprocess.run(
        ["callgrind_control", "-i", "off", pid], check=True, capture_output=True
    )


def inclusive_counts(out_file: str) -> dict[str, int]:
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", out_file],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts = {}
    for line in text.splitlines():
        value = line.strip().split(" ", 1)[0].replace(",", "")
        if not value.isdigit():
            continue
        if "PROGRAM TOTALS" in line:
            counts.setdefault("total", int(value))
        for name, pattern in PARTS.items():
            if re.search(pattern, line):
                counts.setdefault(name, int(value))
    return counts


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("configs", nargs="*", default=["large", "many"])
    p.add_argument("--given", action="store_true", help="fit from init_gmm")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        compile_under_callgrind(args.child, args.given)
        return
    if shutil.which("valgrind") is None:
        sys.exit("compile_work.py needs valgrind (apt-get install valgrind)")
    start = "init_gmm" if args.given else "kmeans++"
    for config in args.configs:
        if config not in ("large", "many"):
            sys.exit(f"unknown configuration {config!r}: use large or many")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "callgrind.out")
            command = [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                config,
            ] + (["--given"] if args.given else [])
            subprocess.run(command, check=True, capture_output=True)
            counts = inclusive_counts(out)
        parts = ", ".join(f"{name} {counts.get(name, 0) / 1e9:.2f}G" for name in PARTS)
        print(
            f"{config} ({start}): {counts.get('total', 0) / 1e9:.2f}G instructions "
            f"to compile ({parts})",
            flush=True,
        )


if __name__ == "__main__":
    main()
