"""Training steps of a ``torch.nn.TransformerEncoder`` against the same model swapped onto fusedlayers.

    python benchmarks/bench_train_step.py            # d_model 256, 4 layers, 4 sequences of up to 1024 tokens
    python benchmarks/bench_train_step.py --quick    # 256 tokens, fewer pairs
    python benchmarks/bench_train_step.py --out DIR  # default benchmarks/results/cpu/train-step

Both models start from the same weights (``fusedlayers.swap`` of a copy: attention and the residual-add + layer
norms run on fusedlayers, the linear layers stay torch's); the steps are ``benchmarks.suite.encoder_step_pairs``
(forward with a key-padding mask, a loss over the non-padding positions, backward, an SGD step; float32 and bf16
autocast; interleaved pairs). The report gives the median ms per step of each and the median of the per-round
ratios torch / ours (above 1: ours is faster). ``fusedlayers bench`` runs the same comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.core import environment  # noqa: E402
from benchmarks.suite import encoder_step_pairs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 tokens, 2 pairs of 1 step")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu" / "train-step")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.pairs, args.steps = 256, 2, 1

    rows, setup = encoder_step_pairs(args.d_model, args.layers, args.seq, args.batch, args.pairs, args.steps)
    for row in rows:
        print(f"{row['dtype']:14} ours {row['ours_ms']:8.1f} ms/step  torch {row['torch_ms']:8.1f} ms/step  "
              f"speedup {row['speedup']:.2f}x")
    env = environment(torch.device("cpu"))
    shape = (f"d_model {setup['d_model']}, {setup['layers']} layers, {setup['heads']} heads, batch {setup['batch']}, "
             f"{setup['seq']} tokens (lengths {setup['lengths']})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"env": env, "setup": setup, "rows": rows}, indent=1))
    lines = [f"# Training steps, nn.TransformerEncoder swapped vs not: {env['device']}", "",
             f"{env['date']}, fusedlayers {env['fusedlayers']} ({env.get('commit')}), torch {env['torch']}, "
             f"{env['threads']} threads, allocator: {env['allocator']}", "",
             f"{shape}; SGD; {setup['pairs']} interleaved pairs of {setup['steps']} steps; medians.", "",
             "| dtype | fusedlayers ms / step | torch ms / step | speedup |", "|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['ours_ms']:.1f} | {r['torch_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
