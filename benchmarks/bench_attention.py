"""Triton attention (kernels/attention.py) against torch SDPA, forward and backward TFLOP/s.

    python benchmarks/bench_attention.py                 # bf16, D=128, N in 1k..16k, causal and not
    python benchmarks/bench_attention.py --dtype float16 --d 64 --n 4096

Every implementation runs in this process on the same inputs; its output is checked against
the float64 reference (on a slice) and against ours before it is timed; times are medians of
``triton.testing.do_bench`` (L2 flushed). FLOPs: forward 4*B*H*Nq*Nk*D, halved when causal;
backward 2.5x forward (``benchmarks.core.attention_flops``). SDPA runs with each backend it
has (flash, efficient, cudnn, math); one that refuses a case is reported as such.
On a machine without a GPU it says so and exits 0. The full suite is ``benchmarks/suite.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.core import attention_flops  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--d", type=int, default=128, help="head dim")
    parser.add_argument("--n", type=int, action="append", help="sequence length(s); default 1k..16k")
    parser.add_argument("--tokens", type=int, default=16384, help="B*N kept constant")
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU here; nothing to measure.")
        return 0

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import fusedlayers

    dtype = getattr(torch, args.dtype)
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}

    def ours(q, k, v, causal):
        return fusedlayers.attention(q, k, v, causal=causal, backend="triton")

    def theirs(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=causal)
        return run

    impls = {"triton (ours)": ours, **{name: theirs(b) for name, b in backends.items()}}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
          f"D={args.d}, H={args.heads}, B*N={args.tokens}")
    print(f"{'N':>6} {'causal':>6} {'impl':<16} {'fwd ms':>8} {'fwd TFLOP/s':>12} {'bwd ms':>8} {'bwd TFLOP/s':>12}")
    for n in args.n or [1024, 2048, 4096, 8192, 16384]:
        b = max(1, args.tokens // n)
        for causal in (False, True):
            q, k, v = (torch.randn(b, args.heads, n, args.d, device="cuda", dtype=dtype, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn_like(q)
            expected = None
            for name, fn in impls.items():
                if name == "sdpa-math" and n > 4096:
                    continue  # materialises B*H*N*N: minutes and tens of GB
                try:
                    out = fn(q, k, v, causal)
                except RuntimeError as e:
                    print(f"{n:>6} {str(causal):>6} {name:<16} refused: {str(e).splitlines()[0][:60]}")
                    continue
                if expected is None:  # ours first: check it against the float64 reference on one head
                    sl = (slice(0, 1), slice(0, 1))
                    ref, _ = fusedlayers.reference.attention(*(t[sl].detach().double() for t in (q, k, v)),
                                                             causal=causal)
                    err = (out[sl].double() - ref).abs().max().item()
                    assert err < (5e-2 if dtype == torch.bfloat16 else 1e-2), f"ours is wrong: max error {err}"
                    expected = out.detach()
                else:
                    err = (out.double() - expected.double()).abs().max().item()
                    assert err < 5e-2, f"{name} disagrees with ours by {err}"
                fwd = triton.testing.do_bench(lambda: fn(q, k, v, causal))
                out = fn(q, k, v, causal)
                bwd = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
                f_fwd = attention_flops(b, args.heads, n, n, args.d, causal, "fwd")
                f_bwd = attention_flops(b, args.heads, n, n, args.d, causal, "bwd")
                print(f"{n:>6} {str(causal):>6} {name:<16} {fwd:>8.3f} {f_fwd / fwd * 1e-9:>12.1f} {bwd:>8.3f} "
                      f"{f_bwd / bwd * 1e-9:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
