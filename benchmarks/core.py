"""Benchmark machinery: work counts, timing, environment, result files.

Conventions (DESIGN.md): every implementation runs in the same process on the same inputs;
its output is checked before it is timed; GPU times are medians of
``triton.testing.do_bench`` (which flushes L2 before every run); CPU times are medians of
wall-clock runs after a warm-up, with the thread count and allocator stated. Throughput
comes from the work counts written here, never from a profiler:

* attention: forward FLOPs = 4·B·Hq·Nq·Nk·D (two matmuls of 2·Nq·Nk·D each), halved when
  causal; backward = 2.5x forward (five matmuls instead of two); forward+backward = 3.5x.
* norms: the bytes a fused kernel must move at least once (see ``norm_bytes``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
_BWD_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(b: int, hq: int, nq: int, nk: int, d: int, causal: bool, mode: str) -> float:
    """FLOPs of attention: 4·B·Hq·Nq·Nk·D forward (QKᵀ and PV), halved when causal,
    times 2.5 for backward (dV, dP, dQ, dK and the recomputed S), 3.5 for both."""
    flops = 4.0 * b * hq * nq * nk * d
    if causal:
        flops /= 2
    return flops * _BWD_FACTOR[mode]


def norm_bytes(rows: int, hidden: int, act_bytes: int, mode: str, *, residual: bool = False, prenorm: bool = False,
               weight_bytes: int = 0, bias: bool = False) -> float:
    """Bytes a fused (residual-add +) norm must move, each tensor read or written once.

    forward: read x (and residual), write y (and the stream z when there is a residual or
    prenorm), read weight/bias, write mean and rstd (fp32 per row).
    backward: read dy, the saved input (z or x), weight, mean, rstd (and dz with prenorm),
    write dx (and dresidual), write dweight/dbias.
    """
    m, n = rows, hidden
    params = n * weight_bytes * (2 if bias else 1)
    stats = m * 4 * 2
    fwd = m * n * act_bytes * (1 + residual + 1 + (residual or prenorm)) + params + stats
    bwd = m * n * act_bytes * (1 + 1 + prenorm + 1 + residual) + 2 * params + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def measure(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                             return_mode="median"))
    fn()  # warm-up (allocations, lazy initialisation)
    times, budget, start = [], 0.5 if quick else 2.0, time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_all(fns: dict, device: torch.device, *, quick: bool = False) -> dict:
    """Median milliseconds of each ``fns[name]()``. On the CPU the calls are interleaved, one call of each per
    round with the order rotating, so that the machine's drift over the run weighs on every competitor alike;
    each function has been called once before (a warm-up). Rounds: at least 3, then up to 200 while the run is
    within 0.5 s (quick) or 2 s per competitor. On a GPU, ``measure`` one after another."""
    if device.type == "cuda":
        return {name: measure(fn, device, quick=quick) for name, fn in fns.items()}
    names = list(fns)
    times = {name: [] for name in names}
    budget, start, rounds = (0.5 if quick else 2.0) * len(names), time.perf_counter(), 0
    while rounds < 3 or (time.perf_counter() - start < budget and rounds < 200):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_pair(ours: Callable[[], object], theirs: Callable[[], object], pairs: int, calls: int) -> dict:
    """Host time per call of two functions on the CPU clock: ``pairs`` rounds of a batch of
    ``calls`` calls of each, back to back, alternating which goes first; the medians of each
    side's µs per call and of the per-round ratio ours / theirs (the machine's drift cancels
    in the ratio)."""

    def per_call(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6

    for _ in range(max(calls // 10, 20)):  # warm-up
        ours(), theirs()
    a, b, ratio = [], [], []
    for i in range(pairs):
        if i % 2:
            tb, ta = per_call(theirs), per_call(ours)
        else:
            ta, tb = per_call(ours), per_call(theirs)
        a.append(ta), b.append(tb), ratio.append(ta / tb)
    return {"ours_us": statistics.median(a), "torch_us": statistics.median(b), "ratio": statistics.median(ratio)}


# glibc settings under which large blocks come from its heap and freed pages are kept, so a fresh output does not
# page-fault (glibc reads them at start-up only)
NO_MMAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def rerun_without_mmap() -> None:
    """Replaces this process by the same command under ``NO_MMAP_ENV``, unless it already runs under it."""
    if os.environ.get("MALLOC_MMAP_MAX_") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **NO_MMAP_ENV))


def malloc_name() -> str:
    """``no-mmap`` under ``NO_MMAP_ENV``, else ``glibc-default``: the allocator condition of a result."""
    return "no-mmap" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "glibc-default"


def environment(device: torch.device) -> dict:
    """Date, device, versions, threads and allocator: written beside every result."""
    import fusedlayers
    from fusedlayers.verify import device_name

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "fusedlayers": fusedlayers.__version__,
        "commit": commit,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    if device.type == "cpu":
        env["threads"] = torch.get_num_threads()
        env["allocator"] = os.environ.get("LD_PRELOAD") or "default (c10 CPU allocator over glibc malloc)"
        if fusedlayers._ext.available():  # the cpu kernels' own cache of their large outputs
            env["cpu_output_cache_mb"] = fusedlayers.cpu_output_cache()["limit_bytes"] >> 20
    return env


def device_slug(device: torch.device) -> str:
    """Folder name under results/: the GPU name, or cpu-<threads>t."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")
    return f"cpu-{torch.get_num_threads()}t"


@dataclass
class Result:
    """One timed (case, implementation) pair."""

    op: str  # "attention", "decode", "varlen", "layer_norm", "add_layer_norm", "rms_norm"
    mode: str  # fwd | bwd | fwd+bwd
    case: dict  # shape and options
    impl: str
    ms: Optional[float]  # None when skipped or wrong
    rate: Optional[float]  # TFLOP/s or GB/s
    unit: str
    ours: bool
    note: str = ""

    def key(self) -> tuple:
        return (self.op, self.mode, tuple(sorted(self.case.items())))


@dataclass
class Report:
    env: dict
    results: list[Result] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # implementation -> why it did not run

    def groups(self) -> dict[tuple, list[Result]]:
        out: dict[tuple, list[Result]] = {}
        for r in self.results:
            out.setdefault(r.key(), []).append(r)
        return out

    def markdown(self) -> str:
        """One table per op and mode: a row per case, a column per implementation, and the
        ratio of our best to the best competitor."""
        env = self.env
        lines = [f"# fusedlayers benchmarks: {env['device']}", "",
                 f"{env['date']}, fusedlayers {env['fusedlayers']} ({env.get('commit')}), torch {env['torch']}"
                 f" (CUDA {env['cuda']}), triton {env['triton']}, python {env['python']}"
                 + (f", {env['threads']} threads, allocator: {env['allocator']}" if "threads" in env else ""), ""]
        by_table: dict[tuple, list[tuple, list[Result]]] = {}
        for key, rows in self.groups().items():
            by_table.setdefault((key[0], key[1]), []).append((key, rows))
        for (op, mode), entries in by_table.items():
            impls = list(dict.fromkeys(r.impl for _, rows in entries for r in rows))
            unit = entries[0][1][0].unit
            lines += [f"## {op} {mode} ({unit})", "",
                      "| case | " + " | ".join(impls) + " | ours / best other |",
                      "|---|" + "---|" * (len(impls) + 1)]
            for key, rows in entries:
                by_impl = {r.impl: r for r in rows}
                cells = []
                for impl in impls:
                    r = by_impl.get(impl)
                    cells.append("" if r is None else (f"{r.rate:.3g}" if r.rate is not None else r.note or "n/a"))
                ours = [r.rate for r in rows if r.ours and r.rate]
                others = [r.rate for r in rows if not r.ours and r.rate]
                ratio = f"{max(ours) / max(others):.2f}x" if ours and others else ""
                case = ", ".join(f"{k}={v}" for k, v in rows[0].case.items())
                lines.append(f"| {case} | " + " | ".join(cells) + f" | {ratio} |")
            lines.append("")
        if self.not_run:
            lines += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in self.not_run.items()), ""]
        return "\n".join(lines)

    def save(self, folder: Path) -> list[Path]:
        """results.json, results.md and one PNG per (op, mode) under ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / "results.json", folder / "results.md"]
        paths[0].write_text(json.dumps({"env": self.env, "results": [asdict(r) for r in self.results],
                                        "not_run": self.not_run}, indent=1))
        paths[1].write_text(self.markdown())
        paths += self._plots(folder)
        return paths

    def _plots(self, folder: Path) -> list[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plots (pip install 'fusedlayers[bench]')")
            return []
        paths = []
        tables: dict[tuple, list[Result]] = {}
        for r in self.results:
            tables.setdefault((r.op, r.mode), []).append(r)
        for (op, mode), rows in tables.items():
            cases = list(dict.fromkeys(self._label(r.case) for r in rows))
            fig, ax = plt.subplots(figsize=(7, 4))
            for impl in dict.fromkeys(r.impl for r in rows):
                pts = [(cases.index(self._label(r.case)), r.rate) for r in rows if r.impl == impl and r.rate]
                if pts:
                    ours = any(r.ours for r in rows if r.impl == impl)
                    ax.plot(*zip(*pts), marker="o", label=impl, linewidth=2.5 if ours else 1.2)
            ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(rows[0].unit)
            ax.set_title(f"{op} {mode} on {self.env['device']}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = folder / f"{op}_{mode.replace('+', '_')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
        return paths

    @staticmethod
    def _label(case: dict) -> str:
        return " ".join(f"{k}{v}" for k, v in case.items() if k not in ("dtype",))
