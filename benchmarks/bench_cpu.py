"""The cpu backend (C++ kernels of csrc/) against PyTorch's own CPU ops, in one process.

    python benchmarks/bench_cpu.py            # the issue-#5 table, a few minutes on 2 cores
    python benchmarks/bench_cpu.py --quick    # fewer cases, shorter timing

Competitors, on the same inputs: ``torch.nn.functional.scaled_dot_product_attention``
(ATen's CPU flash kernel), ``F.layer_norm``, ``F.layer_norm(x + r)`` for add_layer_norm, and
the naive reference backend (``fusedlayers/reference_backend.py``, on the smaller shapes
only: it materialises the score matrix). Every output and gradient is checked before
anything is timed, with the test method's rule (``fusedlayers.testing``: error against
float64 within 2x / 3x torch's own same-dtype error); a failing implementation is
reported as WRONG and not timed. Times are
medians of wall-clock runs after a warm-up (``benchmarks.core.measure``), with torch's
thread count and the allocator stated: every run allocates fresh outputs, as a model does,
so glibc's mmap threshold (large blocks page-fault on first touch) applies to both sides
alike; set MALLOC_MMAP_THRESHOLD_ / LD_PRELOAD to compare under other settings.

Work counts (benchmarks/core.py): attention forward 4*B*H*Nq*Nk*D FLOPs, halved when
causal, x3.5 for forward+backward; norms the bytes a fused kernel must move once (read x,
r, write y, z, stats; backward read dy, z, write dx, dr). The machine's copy bandwidth
(``dst.copy_(src)`` of 256 MB, read + write) is measured in the same run for scale.
Results: benchmarks/results/cpu/ (JSON, Markdown, PNG when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.core import (Report, Result, attention_flops, environment, malloc_name, measure,  # noqa: E402
                             norm_bytes, rerun_without_mmap)


def copy_bandwidth(quick: bool) -> float:
    """GB/s of a plain 256 MB copy (bytes read + written): the ceiling of a norm kernel."""
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), torch.device("cpu"), quick=quick)
    return 2 * src.numel() * 4 / ms / 1e6


def _checked(results: dict, fn64, leaves, grad_out) -> dict:
    """Which implementations pass the test method's rule (fusedlayers.testing): output
    and gradients within 2x / 3x torch's own same-dtype error against float64, plus the floor."""
    from fusedlayers.testing import GRAD_FACTOR, OUT_FACTOR, compare

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = fn64(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    torch_out, torch_grads = results["torch"]
    ok = {}
    for name, (out, grads) in results.items():
        comps = [compare("out", out, out64, torch_out, OUT_FACTOR)]
        comps += [compare("grad", g, g64, gt, GRAD_FACTOR) for g, g64, gt in zip(grads, grads64, torch_grads)]
        ok[name] = all(c.ok for c in comps)
        if not ok[name]:
            print(f"  {name}: " + "; ".join(str(c) for c in comps))
    return ok


def bench_attention(report: Report, quick: bool) -> None:
    import fusedlayers

    shapes = [(2, 8, 1024, 64), (1, 8, 2048, 128)] if not quick else [(2, 8, 1024, 64)]
    cases = [(dt, s, causal) for dt in (torch.float32, torch.bfloat16) for s in shapes for causal in (False, True)]
    impls = {
        "cpu (ours)": lambda q, k, v, c: fusedlayers.attention(q, k, v, causal=c, backend="cpu"),
        "torch": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
        "reference": lambda q, k, v, c: fusedlayers.attention(q, k, v, causal=c, backend="reference"),
    }
    all_impls = impls
    for dtype, (b, h, n, d), causal in cases:
        impls = {k: f for k, f in all_impls.items() if k != "reference" or (b, h, n, d) == shapes[0]}
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        dout = torch.randn(b, h, n, d, generator=gen).to(dtype)
        case = dict(dtype=str(dtype).replace("torch.", ""), B=b, H=h, N=n, D=d, causal=causal)
        outs = {}
        for name, fn in impls.items():
            out = fn(q, k, v, causal)
            outs[name] = (out, torch.autograd.grad(out, (q, k, v), dout))
        passed = _checked(outs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                          (q, k, v), dout)
        for mode in ("fwd", "fwd+bwd"):
            flops = attention_flops(b, h, n, n, d, causal, mode)
            for name, fn in impls.items():
                if not passed[name]:
                    report.results.append(Result("attention", mode, case, name, None, None, "GFLOP/s",
                                                 name.endswith("(ours)"), "WRONG vs torch"))
                    continue
                if mode == "fwd":
                    run = lambda fn=fn: fn(q.detach(), k.detach(), v.detach(), causal)  # noqa: E731
                else:
                    run = lambda fn=fn: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)  # noqa: E731
                ms = measure(run, torch.device("cpu"), quick=quick or name == "reference")
                report.results.append(Result("attention", mode, case, name, ms, flops / ms / 1e6, "GFLOP/s",
                                             name.endswith("(ours)")))
                print(f"attention {mode:8s} {case} {name:12s} {ms:9.2f} ms {flops / ms / 1e6:7.1f} GFLOP/s", flush=True)


def bench_norms(report: Report, quick: bool, copy_gbs: float) -> None:
    import fusedlayers

    shapes = [(8192, 1024), (2048, 4096)] if not quick else [(8192, 1024)]
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hidden in shapes:
            gen = torch.Generator().manual_seed(1)
            x, r = (torch.randn(rows, hidden, generator=gen).to(dtype).requires_grad_() for _ in range(2))
            w, bias = (torch.randn(hidden, generator=gen).to(dtype).requires_grad_() for _ in range(2))
            dy = torch.randn(rows, hidden, generator=gen).to(dtype)
            eb = x.element_size()
            for op, residual in (("layer_norm", False), ("add_layer_norm", True)):
                if residual:
                    impls = {"cpu (ours)": lambda: fusedlayers.add_layer_norm(x, r, w, bias, backend="cpu"),
                             "torch": lambda: F.layer_norm(x + r, (hidden,), w, bias),
                             "reference": lambda: fusedlayers.add_layer_norm(x, r, w, bias, backend="reference")}
                    leaves = (x, r, w, bias)
                else:
                    impls = {"cpu (ours)": lambda: fusedlayers.layer_norm(x, w, bias, backend="cpu"),
                             "torch": lambda: F.layer_norm(x, (hidden,), w, bias),
                             "reference": lambda: fusedlayers.layer_norm(x, w, bias, backend="reference")}
                    leaves = (x, w, bias)
                case = dict(dtype=str(dtype).replace("torch.", ""), rows=rows, hidden=hidden)
                checked = {}
                for name, fn in impls.items():
                    y = fn()
                    checked[name] = (y, torch.autograd.grad(y, leaves, dy))
                if residual:
                    fn64 = lambda x, r, w, b: F.layer_norm(x + r, (hidden,), w, b)  # noqa: E731
                else:
                    fn64 = lambda x, w, b: F.layer_norm(x, (hidden,), w, b)  # noqa: E731
                passed = _checked(checked, fn64, leaves, dy)
                for mode in ("fwd", "fwd+bwd"):
                    nbytes = norm_bytes(rows, hidden, eb, mode, residual=residual, weight_bytes=eb, bias=True)
                    for name, fn in impls.items():
                        if not passed[name]:
                            report.results.append(Result(op, mode, case, name, None, None, "GB/s",
                                                         name.endswith("(ours)"), "WRONG vs torch"))
                            continue
                        if mode == "fwd":
                            run = torch.no_grad()(fn)
                        else:
                            run = lambda fn=fn: torch.autograd.grad(fn(), leaves, dy)  # noqa: E731
                        ms = measure(run, torch.device("cpu"), quick=quick or name == "reference")
                        gbs = nbytes / ms / 1e6
                        report.results.append(Result(op, mode, case, name, ms, gbs, "GB/s", name.endswith("(ours)"),
                                                     f"{gbs / copy_gbs:.0%} of copy"))
                        print(f"{op:14s} {mode:8s} {case} {name:12s} {ms:8.3f} ms {gbs:6.1f} GB/s "
                              f"({gbs / copy_gbs:.0%} of copy)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter timing")
    parser.add_argument("--only", choices=("attention", "norm"), help="run one family")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, the core count)")
    parser.add_argument("--no-mmap", action="store_true",
                        help="rerun under MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**40: glibc serves large "
                             "outputs from its heap and keeps freed pages, so fresh outputs do not page-fault")
    parser.add_argument("--out", type=Path, help="result folder (default benchmarks/results/cpu/<threads>t-<malloc>)")
    args = parser.parse_args()
    if args.no_mmap:
        rerun_without_mmap()
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = malloc_name()
    out_dir = args.out or Path(__file__).parent / "results" / "cpu" / f"{torch.get_num_threads()}t-{malloc}"

    import fusedlayers
    from fusedlayers import _ext

    if not _ext.available():
        print(f"bench_cpu: the C++ extension is not available ({_ext.ERROR}); nothing to measure.")
        return 0
    env = environment(torch.device("cpu"))
    env["cpu_kernels"] = torch.ops.fusedlayers._cpu_kernels_info()
    env["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults"
    env["copy_GBps"] = round(copy_bandwidth(args.quick), 1)
    env["loadavg_at_start"] = os.getloadavg()
    report = Report(env)
    print(f"{env['device']}: torch {env['torch']}, {env['threads']} threads, allocator {env['allocator']}, "
          f"malloc {env['malloc_env']}, {env['cpu_kernels']}, copy {env['copy_GBps']} GB/s, "
          f"load average {env['loadavg_at_start']}", flush=True)
    if args.only in (None, "attention"):
        bench_attention(report, args.quick)
    if args.only in (None, "norm"):
        bench_norms(report, args.quick, env["copy_GBps"])
    env["loadavg_at_end"] = os.getloadavg()
    for path in report.save(out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
