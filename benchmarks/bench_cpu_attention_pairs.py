"""The cpu backend's attention against torch's SDPA, as interleaved pairs in one process.

    python benchmarks/bench_cpu_attention_pairs.py                       # fp32 and bf16, (4, 8, 1024, 64)
    python benchmarks/bench_cpu_attention_pairs.py --dtypes bfloat16 --shapes 1x8x2048x128
    python benchmarks/bench_cpu_attention_pairs.py --dtypes float16                 # fp16 (float32 tiles)
    python benchmarks/bench_cpu_attention_pairs.py --decode 1x32x8x1x8192x128   # BxHqxHkvxNqxNkxD, GQA decode

Each row times ``fusedlayers.attention(backend="cpu")`` and ``F.scaled_dot_product_attention`` on
the same inputs in alternating batches (``benchmarks.core.interleaved_pair``) and reports the median
time of each and the median per-pair speedup SDPA / ours (above 1: fusedlayers is faster), which the
machine's drift cancels out of; forward, causal forward and forward + backward (into accumulating
leaf gradients, as training does); decode rows (``--decode``: a few queries against a long KV cache,
GQA) time the forward against SDPA with ``enable_gqa=True``. Each output is checked against SDPA's
before timing.

For scale, the same run measures the matrix-multiply rate this CPU reaches in each dtype
(``torch.matmul`` of two 2048 x 2048 matrices, GFLOP/s): the ceiling of an attention kernel, whose
work is two (forward) or five (backward) such products plus the softmax. float16 takes 512 x 512: torch's
CPU matmul runs it at under 1 GFLOP/s, and our kernels run its products on the float32 tiles, so the
float32 rate is its ceiling here. The attention rate of
each side is in the rows (forward FLOPs 4 B H N^2 D, halved when causal, x3.5 for forward +
backward). Results: benchmarks/results/cpu/attention-pairs/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedlayers  # noqa: E402
from benchmarks.core import attention_flops, environment, interleaved_pair  # noqa: E402


def matmul_size(dtype: torch.dtype) -> int:
    """The matrices' size of the matmul rate: 2048, and 512 for float16, whose CPU matmul in torch runs at under
    1 GFLOP/s (a 2048 product takes most of a minute)."""
    return 512 if dtype == torch.float16 else 2048


def matmul_gflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of torch.matmul on two n x n matrices of ``dtype``, n = matmul_size(dtype) (median of runs over
    ``seconds``)."""
    n = matmul_size(dtype)
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    torch.matmul(a, b)
    rates, start = [], time.perf_counter()
    while len(rates) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return sorted(rates)[len(rates) // 2]


def rows(b: int, h: int, n: int, d: int, dtype: torch.dtype):
    """(mode, ours, sdpa, ok, flops) for one shape: fwd, causal fwd, fwd+bwd."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def ours(q, k, v, causal):
        return fusedlayers.attention(q, k, v, causal=causal, backend="cpu")

    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for mode, causal in (("fwd", False), ("fwd causal", True), ("fwd+bwd", False)):
        ok = torch.allclose(ours(q, k, v, causal).float(), sdpa(q, k, v, causal).float(), rtol=tol, atol=tol)
        flops = attention_flops(b, h, n, n, d, causal, "fwd+bwd" if mode == "fwd+bwd" else "fwd")
        if mode == "fwd+bwd":
            yield mode, (lambda: ours(qg, kg, vg, False).backward(dout)), \
                (lambda: sdpa(qg, kg, vg, False).backward(dout)), ok, flops
        else:
            yield mode, (lambda c=causal: ours(q, k, v, c)), (lambda c=causal: sdpa(q, k, v, c)), ok, flops


def decode_rows(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype):
    """(mode, ours, sdpa, ok, flops) of one decode step: nq queries of hq heads against nk keys of hkv heads."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, nk, d, generator=g).to(dtype) for _ in range(2))

    def ours():
        return fusedlayers.attention(q, k, v, backend="cpu")

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    ok = torch.allclose(ours().float(), sdpa().float(), rtol=tol, atol=tol)
    yield "decode", ours, sdpa, ok, attention_flops(b, hq, nq, nk, d, False, "fwd")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shapes", nargs="*", default=["4x8x1024x64"], help="BxHxNxD")
    parser.add_argument("--decode", nargs="*", default=[], help="BxHqxHkvxNqxNkxD decode shapes (forward only)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu" / "attention-pairs")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    env = environment(torch.device("cpu"))
    env["cpu_kernels"] = torch.ops.fusedlayers._cpu_kernels_info()
    env["matmul_GFLOPs"] = {dt: round(matmul_gflops(getattr(torch, dt)), 1) for dt in args.dtypes}
    print(f"{env['device']}, torch {env['torch']}, {env['threads']} threads, {env['cpu_kernels']}; "
          f"torch.matmul (n x n, n 2048, fp16 512): {env['matmul_GFLOPs']} GFLOP/s", flush=True)
    results = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        cases = [(shape, rows(*(int(v) for v in shape.split("x")), dtype)) for shape in args.shapes]
        cases += [(shape, decode_rows(*(int(v) for v in shape.split("x")), dtype)) for shape in args.decode]
        for shape, timed in cases:
            for mode, ours, theirs, ok, flops in timed:
                if not ok:
                    print(f"{shape} {dtype_name} {mode}: WRONG (differs from SDPA), not timed")
                    continue
                res = interleaved_pair(ours, theirs, args.pairs, 1 if mode != "decode" else 10)
                row = {"shape": shape, "dtype": dtype_name, "mode": mode, "ours_ms": res["ours_us"] / 1e3,
                       "sdpa_ms": res["torch_us"] / 1e3, "speedup": 1.0 / res["ratio"],
                       "ours_GFLOPs": flops / res["ours_us"] / 1e3, "sdpa_GFLOPs": flops / res["torch_us"] / 1e3}
                results.append(row)
                print(f"{shape} {dtype_name:8} {mode:10} ours {row['ours_ms']:8.1f} ms ({row['ours_GFLOPs']:5.0f} "
                      f"GFLOP/s)  SDPA {row['sdpa_ms']:8.1f} ms ({row['sdpa_GFLOPs']:5.0f})  "
                      f"speedup {row['speedup']:.2f}x", flush=True)
    env["matmul_GFLOPs_end"] = {dt: round(matmul_gflops(getattr(torch, dt)), 1) for dt in args.dtypes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"env": env, "rows": results}, indent=1))
    ceiling = ", ".join(f"{dt} ({matmul_size(getattr(torch, dt))}) {env['matmul_GFLOPs'][dt]} / "
                        f"{env['matmul_GFLOPs_end'][dt]}" for dt in args.dtypes)
    lines = [f"# cpu attention vs SDPA, interleaved pairs: {env['device']}", "",
             f"{env['date']}, fusedlayers ({env.get('commit')}), torch {env['torch']}, {env['threads']} threads, "
             f"allocator: {env['allocator']}; {env['cpu_kernels']}", "",
             f"torch.matmul n x n (n in brackets), GFLOP/s at the start / end of the run: {ceiling}", "",
             "| shape | dtype | mode | fusedlayers ms (GFLOP/s) | SDPA ms (GFLOP/s) | speedup (SDPA / ours) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['ours_ms']:.1f} ({r['ours_GFLOPs']:.0f}) | "
              f"{r['sdpa_ms']:.1f} ({r['sdpa_GFLOPs']:.0f}) | {r['speedup']:.2f}x |" for r in results]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/results.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
