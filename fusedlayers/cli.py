"""The ``fusedlayers`` command (also ``python -m fusedlayers``).

``fusedlayers info``            versions, device, extension, and which backend serves what
``fusedlayers verify [--quick]``  the test method's correctness grid on this machine, every
                                available backend and dtype, one table; exit 1 on a failure;
                                writes the record that ``info`` shows
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from .dispatch import BACKENDS


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    from . import _ext, cuda_backend, dispatch
    from .verify import device_name, summary

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # triton is optional off Linux
        triton_version = f"unavailable ({type(e).__name__}: {e})"
    device = _device()
    print(f"fusedlayers {fusedlayers.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}"
          f" (CUDA {torch.version.cuda or 'none: CPU build'}), triton {triton_version}")
    print(f"device: {device_name(device)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter (slow; for tests)")
    print(f"extension fusedlayers._C: {'built: ' + _ext.INFO if _ext.ERROR is None else _ext.ERROR}")

    print(f"cuda kernels: {cuda_backend.status()}")
    print(f"correctness: {summary(device.type)}")
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
    from . import verify as verify_

    return verify_.main("quick" if args.quick else "full" if args.full else "default", args.backend)


def bench(args) -> int:
    from pathlib import Path

    from .benchmarks import core, suite

    try:
        from tqdm import tqdm as bar
    except ImportError:
        bar = None
    report = suite.run(tuple(args.op) if args.op else suite.OPS, quick=args.quick, progress_bar=bar)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(args.out) if args.out else Path.cwd() / "benchmarks" / "results" / core.device_slug(device)
    print(report.markdown())
    for path in report.save(folder):
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedlayers", description="Fused Transformer kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, extension, backends").set_defaults(fn=info)
    p = sub.add_parser("verify", help="check every available backend against the float64 reference")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a handful of cases per op (seconds)")
    size.add_argument("--full", action="store_true", help="the full grid of the test method (long)")
    p.add_argument("--backend", action="append", choices=BACKENDS, help="only this backend (repeatable)")
    p.set_defaults(fn=verify)
    p = sub.add_parser("bench", help="time every available backend beside the best alternatives")
    p.add_argument("--quick", action="store_true", help="a small preset (about a minute on CPU)")
    p.add_argument("--op", action="append", help="only this op (repeatable): attention, decode, layer_norm, "
                                                  "add_layer_norm, rms_norm")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<device>/ under the current folder)")
    p.set_defaults(fn=bench)
    from .transformer.cli import add_subcommands  # train, probe, lesson: the reference Transformer

    add_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
