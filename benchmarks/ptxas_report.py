"""Resource report of the hand-written CUDA kernels from a build log, without a GPU.

The build prints ptxas's report of every kernel when ``FUSEDLAYERS_PTXAS_VERBOSE=1``
(``nvcc -Xptxas -v``)::

    ptxas info    : Compiling entry function '_ZN...' for 'sm_80'
    ptxas info    : Function properties for _ZN...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 226 registers, used 1 barriers, 832 bytes cmem[0]

This script turns those lines into one table row per (kernel, architecture): registers,
stack frame, spill stores / loads, static shared memory (dynamic shared memory, which
the attention kernels size at launch, is not in ptxas's report: see the ``kSmem`` of the
tiles in ``csrc/attention/attention_kernel_utils.cuh``, or ``cuda_backend.smem_bytes``), and exits 1 when any kernel spills, or when
the log holds no ptxas report at all (a build without ``FUSEDLAYERS_PTXAS_VERBOSE=1``).

    CUDA_HOME=/usr/local/cuda FUSEDLAYERS_FORCE_CUDA=1 FUSEDLAYERS_PTXAS_VERBOSE=1 \\
        TORCH_CUDA_ARCH_LIST="8.0;9.0a" python setup.py build_ext --inplace 2>&1 | tee build.log
    python benchmarks/ptxas_report.py build.log        # or: ... | python benchmarks/ptxas_report.py -
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

_COMPILING = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass
class Kernel:
    mangled: str
    arch: str
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    name: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse(lines: Iterable[str]) -> list[Kernel]:
    """Kernels in the order ptxas reported them (one entry per kernel and architecture;
    a kernel compiled twice, e.g. by a rebuild in the same log, keeps its last report)."""
    found: dict[tuple[str, str], Kernel] = {}
    current: Optional[Kernel] = None
    for line in lines:
        m = _COMPILING.search(line)
        if m:
            current = Kernel(m.group(1), m.group(2))
            found[(current.mangled, current.arch)] = current
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
            current.smem = int(m.group(2) or 0)
            current = None
    return list(found.values())


def _short(demangled: str) -> str:
    """'void fusedlayers::cuda::attn::attention_fwd_kernel<__half, 64>(...)' -> 'attn::attention_fwd_kernel<__half, 64>'."""
    name = demangled.replace("(anonymous namespace)::", "").split("(")[0].replace("void ", "", 1)
    for prefix in ("fusedlayers::cuda::", "fusedlayers::"):
        name = name.replace(prefix, "")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def demangle(kernels: list[Kernel]) -> None:
    names = [k.mangled for k in kernels]
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
        if len(out) == len(names):
            names = out
    for k, n in zip(kernels, names):
        k.name = _short(n)


def table(kernels: list[Kernel]) -> str:
    width = max([len(k.name) for k in kernels] + [6])
    head = f"{'kernel':{width}s} {'arch':7s} {'regs':>5s} {'stack':>6s} {'spill st':>9s} {'spill ld':>9s} {'smem':>6s}"
    rows = [head, "-" * len(head)]
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        rows.append(f"{k.name:{width}s} {k.arch:7s} {k.registers:5d} {k.stack:6d} {k.spill_stores:9d} "
                    f"{k.spill_loads:9d} {k.smem:6d}" + ("  SPILLS" if k.spills else ""))
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="build log with ptxas -v output, or - for stdin")
    args = parser.parse_args(argv)
    if args.log == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(args.log, errors="replace") as f:
            lines = f.read().splitlines()
    kernels = parse(lines)
    if not kernels:
        print("ptxas_report: no ptxas report in the log (build with FUSEDLAYERS_PTXAS_VERBOSE=1)", file=sys.stderr)
        return 1
    demangle(kernels)
    print(table(kernels))
    spilling = [k for k in kernels if k.spills]
    archs = sorted({k.arch for k in kernels})
    print(f"{len(kernels)} kernels ({', '.join(archs)}); "
          + (f"{len(spilling)} SPILL: " + ", ".join(f"{k.name} {k.arch}" for k in spilling) if spilling
             else "no spills"))
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
