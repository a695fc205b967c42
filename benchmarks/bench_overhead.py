"""Host overhead per call: fusedlayers against torch's own op, on tiny inputs.

    python benchmarks/bench_overhead.py                # every row, about a minute
    python benchmarks/bench_overhead.py --quick        # fewer pairs
    python benchmarks/bench_overhead.py --out DIR      # default benchmarks/results/cpu/overhead
    python benchmarks/bench_overhead.py --triton-host  # the Python path a GPU call takes (below)

On tensors this small the kernels cost next to nothing, so the time of a call is what the
host spends on it: argument checks, the backend choice, the autograd node, the op
dispatch. On a GPU that time is all that separates a 10-25 µs norm or decode step from
torch's, so the goal is at most 1.5x torch's equivalent op (DESIGN.md, "Host overhead").

Each row times ``ours`` and ``torch`` in interleaved pairs in this process (a batch of calls
of one, then of the other, repeated), and reports the median time per call of each and the
median of the per-pair ratios ours / torch (below 1: faster than torch). Modes: ``fwd``
(inputs without requires_grad), ``fwd-grad`` (the forward alone with inputs that require
grad: the autograd node is built) and ``fwd+bwd`` (forward and ``backward()``).

Competitors: ``F.layer_norm``, ``F.rms_norm``, ``F.layer_norm(x + r)`` /
``F.rms_norm(x + r)`` for the fused residual-add variants, ``F.scaled_dot_product_attention``,
and the ``torch.nn`` modules against their ``fusedlayers.nn`` drop-ins.

``--triton-host``: the host path of a GPU call, measured on the CPU. A call on CUDA tensors is
served by the ``triton`` backend through the Python path (checks, backend choice, the eager
``autograd.Function``, the backend's allocations and launch configuration); the C++ eager path
serves CPU tensors only. Under ``TRITON_INTERPRET=1`` the ``triton`` backend takes CPU tensors, and
with every Triton kernel launch replaced by a no-op what is timed is that Python path, up to
Triton's own launcher (not included: it needs a GPU driver). Rows: ours with ``backend="triton"``
against torch's op on the CPU; results in ``benchmarks/results/cpu/overhead-triton-host``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.core import environment, interleaved_pair  # noqa: E402
from benchmarks.suite import OVERHEAD_GOAL as GOAL, overhead_cases  # noqa: E402


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_launches() -> None:
    """Replaces every Triton kernel of the kernel modules by a no-op launch (``--triton-host``)."""
    from fusedlayers.kernels import attention, layer_norm

    for module in (attention, layer_norm):
        for name, obj in vars(module).copy().items():
            if hasattr(obj, "arg_names") and hasattr(obj, "fn"):  # a JITFunction / InterpretedFunction
                setattr(module, name, _NoLaunch())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--triton-host", action="store_true",
                        help="time the Python path of the triton backend, kernel launches stubbed (see above)")
    args = parser.parse_args(argv)
    if args.triton_host and os.environ.get("TRITON_INTERPRET") != "1":  # read when Triton is imported: restart
        os.execvpe(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
                   {**os.environ, "TRITON_INTERPRET": "1"})
    if args.out is None:
        args.out = Path(__file__).parent / "results" / "cpu" / ("overhead-triton-host" if args.triton_host
                                                                else "overhead")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    pairs, calls = (7, 300) if args.quick else (21, 1000)

    backend = "auto"
    if args.triton_host:
        stub_triton_launches()
        backend = "triton"
    env = environment(torch.device("cpu"))
    rows = []
    print(f"{'op':26} {'mode':10} {'ours µs':>8} {'torch µs':>9} {'ours/torch':>11}")
    for name, mode, ours, theirs in overhead_cases(backend):
        row = {"op": name, "mode": mode, **interleaved_pair(ours, theirs, pairs, calls)}
        rows.append(row)
        flag = "" if row["ratio"] <= GOAL else f"  (over {GOAL}x)"
        print(f"{name:26} {mode:10} {row['ours_us']:8.2f} {row['torch_us']:9.2f} {row['ratio']:10.2f}x{flag}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"env": env, "goal": GOAL, "rows": rows}, indent=1))
    lines = [f"# Host overhead per call: {env['device']}", "",
             f"{env['date']}, fusedlayers {env['fusedlayers']} ({env.get('commit')}), torch {env['torch']}, "
             f"python {env['python']}, {env['threads']} threads, allocator: {env['allocator']}", "",
             "Tiny inputs (norms (4, 64), attention (1, 1, 4, 16), the attention modules (1, 4, 32) with trainable "
             "parameters); medians of interleaved pairs; "
             f"goal: ours / torch <= {GOAL}."
             + (" Ours: backend='triton' under TRITON_INTERPRET=1 with every kernel launch a no-op (the Python "
                "path of a GPU call, Triton's launcher not included); torch: its op on the CPU."
                if args.triton_host else ""), "",
             "| op | mode | fusedlayers µs | torch µs | ours / torch |", "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['mode']} | {r['ours_us']:.2f} | {r['torch_us']:.2f} | {r['ratio']:.2f}x |"
              for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
