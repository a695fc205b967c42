"""Layer norm and residual-add + layer norm on a GPU: GB/s of the Triton kernels beside
PyTorch (and Liger-Kernel when installed), forward and backward, same process, same inputs.

    python benchmarks/bench_norm.py                      # bf16, a few shapes of 32M elements
    python benchmarks/bench_norm.py --dtype float16 --shapes 8192x1024 4096x8192 1024x70000

GB/s counts the bytes a fused kernel must move, each tensor read or written once (the
formula: ``fusedlayers.benchmarks.core.norm_bytes``), so competitors doing the same work
are compared at the same count. Timing: median of ``triton.testing.do_bench`` (L2 flushed
between runs, ``core.measure``). Each competitor's outputs and gradients are checked
against ours before anything is timed. Without a GPU it says so and exits 0. The full
suite with result files is ``fusedlayers bench``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import fusedlayers
from fusedlayers.benchmarks.core import measure, norm_bytes


def competitors(residual: bool):
    """name -> f(x, r, w, b) returning (output, tensors whose gradient flows back)."""
    eps = 1e-5
    if not residual:
        out = {"triton": lambda x, r, w, b: fusedlayers.layer_norm(x, w, b, eps, backend="triton"),
               "torch": lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b, eps)}
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            out["liger"] = lambda x, r, w, b: LigerLayerNormFunction.apply(x, w, b, eps)
        except ImportError:
            pass
        return out

    def ours(x, r, w, b):
        y, z = fusedlayers.add_layer_norm(x, r, w, b, eps, prenorm=True, backend="triton")
        return y, z

    def torch_unfused(x, r, w, b):
        z = x + r
        return F.layer_norm(z, z.shape[-1:], w, b, eps), z

    return {"triton": ours, "torch x+r, layer_norm": torch_unfused}


def bench(m: int, n: int, dtype: torch.dtype, residual: bool) -> list[tuple]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    r = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen, requires_grad=True) if residual else None
    w = torch.randn(n, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    leaves = [t for t in (x, r, w, b) if t is not None]
    grads_out = [torch.randn(m, n, device="cuda", dtype=dtype, generator=gen) for _ in range(2 if residual else 1)]
    size = dtype.itemsize
    rows, reference = [], None
    for name, fn in competitors(residual).items():
        outs = fn(x, r, w, b)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad(outs, leaves, grads_out, retain_graph=True)
        if reference is None:
            reference = (outs, grads)
        else:  # check before timing
            for got, ref in zip((*outs, *grads), (*reference[0], *reference[1])):
                torch.testing.assert_close(got.float(), ref.float(), atol=0.1, rtol=0.05)  # mixed-dtype sums
        t_fwd = measure(lambda: fn(x, r, w, b), x.device)  # ms
        t_bwd = measure(lambda: torch.autograd.grad(outs, leaves, grads_out, retain_graph=True), x.device)
        moved = {mode: norm_bytes(m, n, size, mode, residual=residual, prenorm=residual, weight_bytes=size, bias=True)
                 for mode in ("fwd", "bwd")}
        rows.append((name, moved["fwd"] / t_fwd * 1e-6, moved["bwd"] / t_bwd * 1e-6, t_fwd, t_bwd))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--shapes", nargs="*", default=["32768x1024", "8192x4096", "4096x8192", "1024x32768"],
                        help="MxN (rows x hidden)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_norm: no GPU here, nothing to measure (the kernels are checked by the tests on CPU)")
        return 0
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; GB/s of bytes moved\n")
    print("| op | M x N | competitor | fwd GB/s | bwd GB/s | fwd ms | bwd ms | ours faster fwd | bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        m, n = map(int, shape.split("x"))
        for residual in (False, True):
            rows = bench(m, n, dtype, residual)
            ours = rows[0]
            for name, gf, gb, tf, tb in rows:
                print(f"| {'add_layer_norm' if residual else 'layer_norm'} | {m}x{n} | {name} | {gf:.0f} | {gb:.0f} "
                      f"| {tf:.3f} | {tb:.3f} | {tf / ours[3]:.2f}x | {tb / ours[4]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
