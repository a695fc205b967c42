"""The attention variants against what a user has without them, as interleaved pairs in one process.

    python benchmarks/bench_attention_variants.py                      # cpu backend, fp32, fwd
    python benchmarks/bench_attention_variants.py --mode fwd+bwd --dtype bfloat16
    python benchmarks/bench_attention_variants.py --n 4096 8192 16384 --window 256 1024 --no-dense

Rows:

* ``window``: causal sliding-window attention (``window_size=(W - 1, 0)``) at fixed W for
  growing N, against SDPA with the equivalent dense bool mask and FlexAttention with a
  sliding-window block mask (compiled; "n/a" where it does not run). Ours should grow
  linearly in N (the column ``x prev``: time over the previous N's time, 2.0 when N doubles),
  the dense mask quadratically.
* ``softcap`` and ``sinks``: ours with the variant against ours without it (the cost of the
  variant; the aim is at most 1.10).

Each pair times both sides in alternating batches (``benchmarks.core.interleaved_pair``) and
reports the median time of each and the median per-pair ratio ours / theirs (below 1: ours is
faster). Each output is checked against the competitor's before timing. Results:
benchmarks/results/<device type>/attention-variants/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedlayers  # noqa: E402
from benchmarks.core import environment, interleaved_pair  # noqa: E402
from fusedlayers import reference  # noqa: E402


def _inputs(n: int, args, grad: bool):
    g = torch.Generator().manual_seed(n)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device=args.device, dtype=args.dtype) for _ in range(3))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, torch.randn(shape, generator=g).to(device=args.device, dtype=args.dtype)


def _step(fn, q, k, v, dout, mode: str):
    """One call as a user makes it: the forward, or the forward and its backward."""
    def run():
        out = fn(q, k, v)
        if mode == "fwd+bwd":
            torch.autograd.grad(out, (q, k, v), dout)
        return out
    return run


def _flex(n: int, window: int, device):
    """FlexAttention with a causal sliding-window block mask, compiled; None where it does not run."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def sliding(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < window)

        block_mask = create_block_mask(sliding, None, None, n, n, device=str(device))
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    except Exception:  # noqa: BLE001 - a missing or failing compiler is a result ("n/a"), not an error
        return None


def _pair(ours, theirs, args, check=True) -> dict:
    if check:
        a, b = ours(), theirs()
        a = a[0] if isinstance(a, tuple) else a
        b = b[0] if isinstance(b, tuple) else b
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    return interleaved_pair(ours, theirs, pairs=args.pairs, calls=args.calls)


def window_rows(args) -> list[dict]:
    rows = []
    for w in args.window:
        prev = None
        for n in args.n:
            q, k, v, dout = _inputs(n, args, args.mode == "fwd+bwd")
            ours = _step(lambda q, k, v: fusedlayers.attention(q, k, v, causal=True, window_size=(w - 1, 0),
                                                               backend=args.backend), q, k, v, dout, args.mode)
            row = {"row": "window", "W": w, "N": n}
            if not args.no_dense:
                pos = torch.arange(n, device=args.device)
                dense = reference.visible_keys(pos, pos, causal=True, window_size=(w - 1, 0))
                theirs = _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dense), q, k, v, dout,
                               args.mode)
                r = _pair(ours, theirs, args)
                row.update(ours_ms=r["ours_us"] / 1e3, sdpa_dense_ms=r["torch_us"] / 1e3, vs_sdpa=r["ratio"])
            else:
                r = interleaved_pair(ours, ours, pairs=args.pairs, calls=args.calls)
                row.update(ours_ms=r["ours_us"] / 1e3)
            flex = _flex(n, w, args.device) if args.flex else None
            if flex is not None:
                try:
                    r = _pair(ours, _step(flex, q, k, v, dout, args.mode), args)
                    row.update(flex_ms=r["torch_us"] / 1e3, vs_flex=r["ratio"])
                except Exception as e:  # noqa: BLE001
                    row.update(flex=f"n/a ({type(e).__name__})")
            else:
                row.update(flex="n/a")
            row["x_prev"] = row["ours_ms"] / prev if prev else None
            prev = row["ours_ms"]
            rows.append(row)
            print(row, flush=True)
    return rows


def cost_rows(args) -> list[dict]:
    rows = []
    for n in args.n[:2]:
        q, k, v, dout = _inputs(n, args, args.mode == "fwd+bwd")
        sinks = torch.zeros(args.heads, device=args.device, dtype=args.dtype)
        plain = _step(lambda q, k, v: fusedlayers.attention(q, k, v, causal=True, backend=args.backend), q, k, v,
                      dout, args.mode)
        for name, kw in (("softcap", dict(softcap=30.0)), ("sinks", dict(sinks=sinks))):
            with_it = _step(lambda q, k, v, kw=kw: fusedlayers.attention(q, k, v, causal=True, backend=args.backend,
                                                                         **kw), q, k, v, dout, args.mode)
            r = interleaved_pair(with_it, plain, pairs=args.pairs, calls=args.calls)
            row = {"row": name, "N": n, "with_ms": r["ours_us"] / 1e3, "plain_ms": r["torch_us"] / 1e3,
                   "cost": r["ratio"]}
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--mode", default="fwd", choices=("fwd", "fwd+bwd"))
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--window", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--no-dense", action="store_true", help="skip SDPA with the dense mask (O(N^2) memory)")
    parser.add_argument("--flex", action="store_true", help="also FlexAttention, compiled (slow to compile)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>/...)")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    args.device = torch.device(args.device)

    rows = window_rows(args) + cost_rows(args)
    env = environment(args.device)
    out = Path(args.out or Path(__file__).parent / "results" / args.device.type / "attention-variants")
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.backend}-{str(args.dtype).replace('torch.', '')}-{args.mode.replace('+', '_')}.json"
    (out / name).write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
