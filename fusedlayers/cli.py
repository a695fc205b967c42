"""The ``fusedlayers`` command (also ``python -m fusedlayers``).

``fusedlayers info``            versions, device, extension (and where its binary came from),
                                and which backend serves what
``fusedlayers build``           compile the C++ extension for the installed torch now (CPU part,
                                CUDA part where nvcc is found) instead of on first use
``fusedlayers verify [--quick]``  the test method's correctness grid on this machine, every
                                available backend and dtype, one table; exit 1 on a failure;
                                writes the record that ``info`` shows
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Optional

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
    print(f"  binary: {_ext.SOURCE or 'none loaded'}")
    if _ext.IGNORED and _ext.SOURCE:
        print(f"  {_ext.IGNORED}")

    print(f"cuda kernels: {cuda_backend.status()}")
    print(f"correctness: {summary(device.type)}")
    print(f"backends for {device.type} tensors:")
    for family, call in _probe_calls(device).items():
        if _ext.PENDING:  # dispatch.select would start the first-use build: info only reports
            order = dispatch.auto_order(call.device)
            chosen = next((name for name in order if dispatch.why_not(family, name, call) is None), None)
            chosen = f"{chosen} (cpu once the first-use build has run)"
        else:
            try:
                chosen = dispatch.select(family, call)
            except dispatch.BackendError:
                chosen = None
        print(f"  {family} ({call}): auto -> {chosen}")
        for name in dispatch.BACKENDS:
            reason = dispatch.why_not(family, name, call)
            print(f"    {name:9s} {'available' if reason is None else reason}")
    return 0


def build(args) -> int:
    """Compiles the C++ extension for the installed torch into the first-use build's cache
    (the CPU part, and the CUDA part where torch is a CUDA build and nvcc is found)."""
    from . import _ext
    from . import build as build_

    want = False if args.cpu_only else True if args.cuda else None
    try:
        path = build_.build(cuda=want, force=args.force)
    except build_.BuildError as e:
        print(f"fusedlayers build: error: {e}", file=sys.stderr)
        return 1
    meta = build_.built_info(path)
    print(f"fusedlayers build: {path} ({meta.get('note', '')}; built {meta.get('built', '?')} "
          f"in {meta.get('seconds', '?')} s)")
    if _ext.SOURCE and _ext.SOURCE.startswith("prebuilt"):
        print(f"note: this process uses the {_ext.SOURCE}, which comes first; the cached build serves when that "
              "one is missing or fails to load")
    else:
        if _ext.ERROR is not None:
            _ext.load_built(path)
        print(f"extension: {_ext.INFO if _ext.ERROR is None else _ext.ERROR}")
    return 0


def _first_use_build() -> None:
    """Runs the first-use build of the C++ extension now if it is pending (commands that
    list the backends able to serve, which never call an op before deciding)."""
    from . import _ext

    if _ext.PENDING:
        _ext.ensure()


def verify(args) -> int:
    from . import verify as verify_

    if not args.backend or "cpu" in args.backend:
        _first_use_build()

    return verify_.main("quick" if args.quick else "full" if args.full else "default", args.backend)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class PlainProgress:
    """What a progress bar says, as a few plain lines, for output that is not a terminal
    (a log file or a pipe, where a bar's carriage-return updates pile up on one line): one
    line per tenth of the work (and the last), with the description and any postfix."""

    def __init__(self, total: int, desc: str = "", file=None, lines: int = 10, initial: int = 0) -> None:
        self.total, self.desc, self.file, self.n = total, desc, file or sys.stderr, initial
        self.every = max(1, -(-total // lines)) if total else 1
        self.postfix = ""

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every != before // self.every or self.n == self.total:
            pct = f" ({100 * self.n // self.total}%)" if self.total else ""
            print(f"{self.desc}: {self.n}/{self.total}{pct}" + (f"  {self.postfix}" if self.postfix else ""),
                  file=self.file, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str = "", initial: int = 0, file=None):
    """A tqdm bar on a terminal; :class:`PlainProgress` lines off one (or without tqdm)."""
    file = file or sys.stderr
    if file.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, file=file)
        except ImportError:
            pass
    return PlainProgress(total, desc, file=file, initial=initial)


def bench(args) -> int:
    from pathlib import Path

    from .benchmarks import core, suite

    unknown = [op for op in args.op or () if op not in suite.OPS]
    if unknown:
        return _usage_error("bench", f"argument --op: unknown op {unknown[0]!r} (choose from {', '.join(suite.OPS)})")
    problem = out_folder_problem(args.out) if args.out else None
    if problem:
        return _usage_error("bench", problem)
    _first_use_build()
    report = suite.run(tuple(args.op) if args.op else suite.OPS, quick=args.quick, progress_bar=progress_bar)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(args.out) if args.out else Path.cwd() / "benchmarks" / "results" / core.device_slug(device)
    print(report.markdown())
    for path in report.save(folder):
        print(f"wrote {path}")
    return 0


def out_folder_problem(out: str) -> Optional[str]:
    """Why ``out`` cannot be an output folder (an existing file, or below one; not
    writable), or None: commands check it before any work, since they write at the end."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is an existing file, not a folder"
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {out!r}: {parent!r} is a file, so the folder cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out!r}: {parent!r} is not writable"
    return None


def _usage_error(command: str, message: str) -> int:
    print(f"fusedlayers {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = _Parser(prog="fusedlayers", description="Fused Transformer kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, extension, backends").set_defaults(fn=info)
    p = sub.add_parser("build", help="compile the C++ extension for the installed torch now (else: on first use)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--cpu-only", action="store_true", help="only the CPU part (what the first-use build makes)")
    part.add_argument("--cuda", action="store_true", help="require the CUDA part (error without nvcc or CUDA torch)")
    p.add_argument("--force", action="store_true", help="rebuild even when a finished build is cached")
    p.set_defaults(fn=build)
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
