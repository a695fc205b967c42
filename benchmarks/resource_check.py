"""Compile every Triton kernel configuration for sm_80 and sm_90a, without a GPU, and
report registers, spills and shared memory.

Each module in ``MODULES`` exposes ``compile_targets()``: a list of
``(name, jit_function, signature, constexprs[, options[, attrs[, archs]]])`` tuples, one
per configuration its launcher may pick: ``signature`` and ``constexprs`` as
``triton.compiler.ASTSource`` takes them (keyed by argument name, or by a path (argument
index, field index) into a tuple argument); ``options`` such as ``{"num_warps": 8,
"num_stages": 3}``; ``attrs`` the runtime specialisation by argument name or path, e.g.
``{"N": [["tt.divisibility", 16]]}``; ``archs`` the architectures whose
launcher picks it (default: all). Every target is compiled with ``triton.compile`` for each
of its architectures; Triton's bundled ``ptxas -v`` on the PTX, with the flags Triton
itself passes, gives registers and spill bytes, ``compiled.metadata.shared`` the shared
memory. Compiles run in ``--jobs`` processes (default: one per core); Triton's cache
(``~/.triton/cache``) makes a second run fast.

    python benchmarks/resource_check.py            # every module, both architectures
    python benchmarks/resource_check.py --arch sm_90a --only norm_fwd
    python benchmarks/resource_check.py --module fusedlayers.kernels.attention_configs   # one module
    python benchmarks/resource_check.py --jobs 1                                  # serially

Exit status 1 when any configuration spills, uses more shared memory than the
architecture allows per block (sm_80: 163 KB, sm_90a: 227 KB), or fails to compile.

The figures are those of the installed Triton (its LLVM and bundled ptxas): the tile tables are
tuned to 0 spills for the Triton CI installs (3.8), and another version allocates registers
differently. To see another version, run this script under a throwaway venv that has that Triton
(``pip install --no-deps triton==X``) and sees this environment's packages (a ``.pth`` file in it
with ``import site; site.addsitedir("<this site-packages>")``); the README (Running on a GPU)
records what was measured for 3.6.
Runs on a machine without a GPU; the Triton interpreter must be off (it is turned off
here, before any kernel module is imported).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be decorated for compilation

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Modules whose kernels are checked: add a kernel module here once it exposes compile_targets().
MODULES = [
    "fusedlayers.kernels.attention_configs",
    "fusedlayers.kernels.layer_norm",
]

# name -> (target, shared-memory limit per block in bytes)
ARCHS = {
    "sm_80": (GPUTarget("cuda", 80, 32), 163 * 1024),
    "sm_90a": (GPUTarget("cuda", 90, 32), 227 * 1024),  # capability 90 compiles for sm_90a
}


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) of the one kernel in ``ptx``."""
    ptxas = triton.knobs.nvidia.ptxas.path  # Triton's bundled ptxas (the toolkit's may be too old)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # The flags triton.compile passes to ptxas (triton/backends/nvidia/compiler.py, make_cubin), so the
        # figures are those of the cubin Triton launches: register allocation differs without them.
        out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
                              "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"cannot parse ptxas output:\n{log}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


@functools.cache
def _module_targets(module: str) -> dict:
    """name -> (ASTSource, options, archs or None) of every compile target of ``module``."""
    out = {}
    for entry in importlib.import_module(module).compile_targets():
        name, fn, signature, constexprs = entry[:4]
        options = entry[4] if len(entry) > 4 and entry[4] else {}
        attrs = entry[5] if len(entry) > 5 and entry[5] else {}
        attrs = {(fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in attrs.items()}
        archs = entry[6] if len(entry) > 6 else None
        out[name] = (ASTSource(fn, signature, constexprs, attrs), options, archs)
    return out


def check(module: str, name: str, arch: str) -> tuple[str, bool, list[str]]:
    """Compile one target for one architecture: (printed row, compiled, failures). Runs in a worker process."""
    source, options, _ = _module_targets(module)[name]
    target, shared_limit = ARCHS[arch]
    try:
        compiled = triton.compile(source, target=target, options=options)
        regs, spill_st, spill_ld = ptxas_usage(compiled.asm["ptx"], arch)
    except Exception as e:  # a configuration that does not compile is a failure too
        failure = f"{name} {arch}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return f"{name:<52} {arch:<7} compile failed: {failure}", False, [failure]
    shared = compiled.metadata.shared
    bad = []
    if spill_st or spill_ld:
        bad.append("spills")
    if shared > shared_limit:
        bad.append(f"shared > {shared_limit // 1024} KB")
    row = (f"{name:<52} {arch:<7} {compiled.metadata.num_warps:>5} {regs:>5} {f'{spill_st}/{spill_ld}':>14} "
           f"{shared:>9}{'  FAIL: ' + ', '.join(bad) if bad else ''}")
    return row, True, [f"{name} {arch}: {', '.join(bad)}"] if bad else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="default: all")
    parser.add_argument("--only", help="check only targets whose name contains this")
    parser.add_argument("--module", action="append", help=f"check this module instead of {MODULES}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    args = parser.parse_args()
    archs = args.arch or list(ARCHS)
    jobs = [(module, name, arch) for module in (args.module or MODULES)
            for name, (_, _, only_archs) in _module_targets(module).items() if args.only is None or args.only in name
            for arch in archs if only_archs is None or arch in only_archs]

    print(f"triton {triton.__version__}, ptxas {triton.knobs.nvidia.ptxas.path}")
    header = f"{'kernel configuration':<52} {'arch':<7} {'warps':>5} {'regs':>5} {'spill st/ld B':>14} {'shared B':>9}"
    print(header)
    print("-" * len(header))
    failures = []
    start = time.time()
    count = 0
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for row, compiled, bad in pool.map(check, *zip(*jobs)) if jobs else ():  # printed in job order
            print(row, flush=True)
            count += compiled
            failures += bad
    print(f"\n{count} compiled in {time.time() - start:.0f} s; {len(failures)} failure(s)")
    for f in failures:
        print(f"  {f}")
    if count == 0 and not failures:
        print("no targets matched")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
