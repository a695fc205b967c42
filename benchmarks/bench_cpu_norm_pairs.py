"""The cpu backend's norms against torch's, as interleaved pairs in one process.

    python benchmarks/bench_cpu_norm_pairs.py                   # fp32, 1024x768 and 8192x1024
    python benchmarks/bench_cpu_norm_pairs.py --dtype bfloat16
    python benchmarks/bench_cpu_norm_pairs.py --no-mmap         # glibc keeps freed pages: no page faults

Each row times fusedlayers and torch on the same inputs in alternating batches
(``benchmarks.core.interleaved_pair``) and reports the median time of each and the median
per-pair speedup torch / ours (above 1: fusedlayers is faster), which the machine's drift
cancels out of. Competitors: ``F.layer_norm``, ``F.rms_norm`` and the unfused
``F.layer_norm(x + r)``; ``fwd+bwd`` runs ``backward(dy)`` into accumulating leaf grads,
as training does. Outputs are fresh tensors on both sides, as a model gets them (glibc
malloc: blocks above its mmap threshold are new pages, which fault on first touch; the
``cpu`` kernels advise transparent huge pages on large outputs, see README); ``--no-mmap``
measures under glibc settings where they do not. The ``cpu`` kernels keep freed outputs for
their next ones (``fusedlayers.cpu_output_cache``; ``FUSEDLAYERS_CPU_CACHE_MB=0`` turns that
off); page faults per call of each side are counted after the timing, and each forward's
share of the machine's copy bandwidth (its input and output tensors against ``dst.copy_(src)``
of one tensor, timed in interleaved pairs with it). Each
output is checked against torch's before timing. Results: benchmarks/results/cpu/norm-pairs/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedlayers  # noqa: E402
from benchmarks.core import environment, interleaved_pair, malloc_name, rerun_without_mmap  # noqa: E402


def rows(m: int, n: int, dtype: torch.dtype):
    """(name, ours, torch, check) for one shape."""
    g = torch.Generator().manual_seed(0)
    x, r, dy = (torch.randn(m, n, generator=g).to(dtype) for _ in range(3))
    w, b = (torch.randn(n, generator=g).to(dtype) for _ in range(2))
    xg, rg, wg, bg = (t.clone().requires_grad_() for t in (x, r, w, b))
    ops = {
        "layer_norm": (lambda x, r, w, b: fusedlayers.layer_norm(x, w, b), lambda x, r, w, b: F.layer_norm(x, (n,), w, b)),
        "rms_norm": (lambda x, r, w, b: fusedlayers.rms_norm(x, w), lambda x, r, w, b: F.rms_norm(x, (n,), w)),
        "add_layer_norm": (lambda x, r, w, b: fusedlayers.add_layer_norm(x, r, w, b),
                           lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b)),
    }
    for name, (ours, theirs) in ops.items():
        ok = torch.allclose(ours(x, r, w, b).float(), theirs(x, r, w, b).float(), rtol=2e-2, atol=2e-2)
        tensors = 3 if name == "add_layer_norm" else 2  # tensors a fused forward reads and writes (no grad)
        yield name, "fwd", (lambda f=ours: f(x, r, w, b)), (lambda f=theirs: f(x, r, w, b)), ok, tensors
        yield name, "fwd+bwd", (lambda f=ours: f(xg, rg, wg, bg).backward(dy)), \
            (lambda f=theirs: f(xg, rg, wg, bg).backward(dy)), ok, None


def faults_per_call(ours, theirs, calls: int) -> tuple[float, float]:
    """Minor page faults per call of each side, in batches of ``calls`` calls, ours then
    theirs twice over (the mean of the two batches of each)."""
    counts = [0, 0]
    for _ in range(2):
        for side, fn in enumerate((ours, theirs)):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(calls):
                fn()
            counts[side] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return counts[0] / (2 * calls), counts[1] / (2 * calls)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shapes", nargs="+", default=["1024x768", "8192x1024"])
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--no-mmap", action="store_true",
                        help="rerun under MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**40: glibc serves large "
                             "outputs from its heap and keeps freed pages, so fresh outputs do not page-fault")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu" / "norm-pairs")
    args = parser.parse_args(argv)
    if args.no_mmap:
        rerun_without_mmap()
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    dtype = getattr(torch, args.dtype)
    env = environment(torch.device("cpu"))
    env["malloc"] = malloc_name()
    results = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        calls = max(2, int(2e7 // (m * n)))
        src = torch.randn(m, n).to(dtype)
        dst = torch.empty_like(src)
        for name, mode, ours, theirs, ok, tensors in rows(m, n, dtype):
            if not ok:
                print(f"{shape} {name} {mode}: WRONG (differs from torch), not timed")
                continue
            res = interleaved_pair(ours, theirs, args.pairs, calls)
            faults = faults_per_call(ours, theirs, calls)
            # the forward's share of this machine's copy bandwidth: its tensors against dst.copy_(src)'s two,
            # timed in interleaved pairs with the copy
            of_copy = None
            if tensors is not None:
                of_copy = tensors / 2 / interleaved_pair(ours, lambda: dst.copy_(src), args.pairs, calls)["ratio"]
            row = {"shape": shape, "dtype": args.dtype, "op": name, "mode": mode, "ours_us": res["ours_us"],
                   "torch_us": res["torch_us"], "speedup": 1.0 / res["ratio"], "ours_faults": faults[0],
                   "torch_faults": faults[1], "of_copy_bandwidth": of_copy}
            results.append(row)
            print(f"{shape} {args.dtype} {name:15} {mode:8} ours {row['ours_us']:10.1f} µs  torch "
                  f"{row['torch_us']:10.1f} µs  speedup {row['speedup']:.2f}x  page faults per call "
                  f"{faults[0]:.0f} / {faults[1]:.0f}" + (f"  {of_copy:.0%} of copy bandwidth" if of_copy else ""),
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (f"results-{args.dtype}" + ("-no-mmap" if env["malloc"] == "no-mmap" else "")
            + ("-no-cache" if env.get("cpu_output_cache_mb") == 0 else ""))
    (args.out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": results}, indent=1))
    lines = [f"# cpu norms vs torch, interleaved pairs: {env['device']}", "",
             f"{env['date']}, fusedlayers ({env.get('commit')}), torch {env['torch']}, {env['threads']} threads, "
             f"allocator: {env['allocator']}, glibc {env['malloc']}, cpu output cache "
             f"{env.get('cpu_output_cache_mb')} MB", "",
             "| shape | op | mode | fusedlayers µs | torch µs | speedup (torch / ours) | page faults per call (ours / torch) "
             "| ours, of copy bandwidth |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} {r['dtype']} | {r['op']} | {r['mode']} | {r['ours_us']:.0f} | {r['torch_us']:.0f} | "
              f"{r['speedup']:.2f}x | {r['ours_faults']:.0f} / {r['torch_faults']:.0f} | "
              + (f"{r['of_copy_bandwidth']:.0%} |" if r["of_copy_bandwidth"] else "|") for r in results]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/{stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
