"""The ``fusedlayers`` command (also ``python -m fusedlayers``).

``fusedlayers info``            versions, device, extension, and which backend serves what
``fusedlayers verify [--quick]``  the test method's correctness grid on this machine, every
                                available backend and dtype, one table; exit 1 on a failure
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _probe_calls(device: torch.device, dtype: torch.dtype = torch.float16):
    """A typical call of each op family, to ask every backend whether it serves this device."""
    from . import testing

    dtype = dtype if device.type == "cuda" else torch.float32
    return {
        "attention": testing.attention_call_for(testing.AttentionCase(b=2, hq=8, hkv=8, nq=128, nk=128, d=64), dtype,
                                                device),
        "norm": testing.norm_call_for(testing.NormCase(rows=128, hidden=1024, residual=True), dtype, device),
    }


def info(args) -> int:
    import fusedlayers
    from . import _ext, dispatch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # triton is optional off Linux
        triton_version = f"unavailable ({type(e).__name__}: {e})"
    device = _device()
    print(f"fusedlayers {fusedlayers.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}"
          f" (CUDA {torch.version.cuda or 'none: CPU build'}), triton {triton_version}")
    print(f"device: {_device_name(device)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter (slow; for tests)")
    print(f"extension fusedlayers._C: {'built: ' + _ext.INFO if _ext.ERROR is None else _ext.ERROR}")
    print(f"backends for {device.type} tensors:")
    for family, call in _probe_calls(device).items():
        try:
            chosen = dispatch.select(family, call)
        except dispatch.BackendError:
            chosen = None
        print(f"  {family} ({call}): auto -> {chosen}")
        for name in dispatch.BACKENDS:
            reason = dispatch.why_not(family, name, call)
            print(f"    {name:9s} {'available' if reason is None else reason}")
    return 0


def verify(args) -> int:
    from . import dispatch, testing

    device = _device()
    level = "quick" if args.quick else "full" if args.full else "default"
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    families = {
        "attention": (testing.attention_grid(level), testing.attention_call_for, testing.check_attention),
        "norm": (testing.norm_grid(level), testing.norm_call_for, testing.check_norm),
    }
    backends = args.backend or list(dispatch.BACKENDS)
    print(f"fusedlayers verify ({level} grid) on {_device_name(device)}")
    print(f"{'op':10s} {'backend':10s} {'dtype':9s} {'cases':>6s} {'worst error / bound':>22s}  result")
    failures, start = 0, time.perf_counter()
    for family, (grid, call_for, check) in families.items():
        for backend in backends:
            for dtype in dtypes:
                served = [c for c in grid if dispatch.why_not(family, backend, call_for(c, dtype, device)) is None]
                if not served:
                    continue
                worst, worst_text, failed = -1.0, "", []
                for case in served:
                    for comp in check(case, dtype, device, backend):
                        ratio = comp.error / comp.bound if comp.bound > 0 else float("inf")
                        if ratio > worst:
                            worst, worst_text = ratio, f"{comp.error:.2e} / {comp.bound:.2e}"
                        if not comp.ok:
                            failed.append(f"{case} {comp}")
                failures += len(failed)
                dt = str(dtype).replace("torch.", "")
                print(f"{family:10s} {backend:10s} {dt:9s} {len(served):6d} {worst_text:>22s}  "
                      f"{'pass' if not failed else 'FAIL'}")
                for line in failed[:5]:
                    print(f"    {line}")
    print(f"{'all passed' if failures == 0 else f'{failures} FAILED'} in {time.perf_counter() - start:.1f} s")
    return 0 if failures == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedlayers", description="Fused Transformer kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, extension, backends").set_defaults(fn=info)
    p = sub.add_parser("verify", help="check every available backend against the float64 reference")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a handful of cases per op (seconds)")
    size.add_argument("--full", action="store_true", help="the full grid of the test method (long)")
    p.add_argument("--backend", action="append", choices=None, help="only this backend (repeatable)")
    p.set_defaults(fn=verify)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
