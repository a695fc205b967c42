"""Context-parallel attention: memory per rank and time per step against sequence length,
for 1, 2 and 4 processes.

    python benchmarks/bench_distributed.py                        # CPU, gloo, 1/2/4 ranks
    python benchmarks/bench_distributed.py --backend nccl --device cuda --dtype bfloat16 \\
        --seqlens 8192 16384 32768 65536 --heads 16 --dim 128 --world 1 2 4 8   # GPUs

One step is forward + backward of self-attention on a sequence of N tokens, (B, H, N, D),
causal by default: with 1 process ``fusedlayers.attention`` on the whole sequence, with W
processes ``fusedlayers.distributed.context_parallel_attention`` on each rank's zigzag shard of
N/W tokens (the K/V blocks travel round the ring). Every rank checks its forward against the
single-process op on the same full inputs before timing (max abs difference printed).
Time per step: the median over ``--steps`` after a warm-up, the slowest rank's (a barrier
closes every step). Memory per rank: on CUDA the peak of torch's allocator during the steps;
on CPU the growth of the process's peak resident set (ru_maxrss) over its size before the
first step (includes allocator slack; the attention state itself is O(B*H*N/W*D)).
CPU figures are honest, not flattering: gloo moves the blocks through the loopback TCP
stack and every rank shares the same few cores, so more ranks on one machine does not make
a step faster; the memory column is the point there. Results: JSON and Markdown in
``benchmarks/results/<device>/distributed/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    import torch.distributed as dist

    import fusedlayers
    from fusedlayers import distributed as fd

    if args.device == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    rows, checks = [], []
    for n in args.seqlens:  # ascending: the CPU peak (ru_maxrss) of each length exceeds the last one's
        gen = torch.Generator().manual_seed(n)
        q, k, v, dout = (torch.randn(args.batch, args.heads, n, args.dim, generator=gen).to(device, dtype)
                         for _ in range(4))
        if world > 1:
            ql, kl, vl, dl = (fd.shard(t, 2) for t in (q, k, v, dout))
            ql.requires_grad_(), kl.requires_grad_(), vl.requires_grad_()

            def step():
                out = fd.context_parallel_attention(ql, kl, vl, causal=args.causal)
                torch.autograd.backward(out, dl)
                return out
        else:
            ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))

            def step():
                out = fusedlayers.attention(ql, kl, vl, causal=args.causal)
                torch.autograd.backward(out, dout)
                return out
        if world > 1:
            del q, k, v  # each rank keeps its shard only; the check below draws the inputs again
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = _rss_kib()
        times = []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, 0) / 1024
        mine = torch.tensor([statistics.median(times), mem], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine.to(device))  # NCCL gathers on the GPU
        out = step().detach()
        checks.append(fd.unshard(out, 2) if world > 1 else out)
        rows.append({"world": world, "seqlen": n, "step_ms": max(float(t[0]) for t in every) * 1e3,
                     "mem_mib_per_rank": max(float(t[1]) for t in every)})
    for row, got in zip(rows, checks):  # after the timings: the full-size reference must not set the CPU peak
        n = row["seqlen"]
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, generator=gen).to(device, dtype) for _ in range(3))
        ref = fusedlayers.attention(q, k, v, causal=args.causal)
        row["max_abs_diff_vs_1_process"] = float((got.float() - ref.float()).abs().max())
        if rank == 0:
            print(f"  W={world} N={n:6d}  {row['step_ms']:9.1f} ms/step  {row['mem_mib_per_rank']:8.1f} MiB/rank  "
                  f"(max diff vs 1 process {row['max_abs_diff_vs_1_process']:.1e})", flush=True)
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown (gloo's threads occasionally abort it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="torch.distributed backend")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/distributed)")
    args = p.parse_args(argv)
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    if args.device == "cuda" and max(args.world) > torch.cuda.device_count():
        p.error(f"--world {max(args.world)} needs as many GPUs; torch sees {torch.cuda.device_count()}")
    for n in args.seqlens:
        for w in args.world:
            if n % (2 * w):
                p.error(f"--seqlens {n} is not a multiple of 2 x {w} (the zigzag chunks of {w} ranks)")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the spawned ranks
    rows = []
    ctx = mp.get_context("spawn")
    for world in args.world:
        print(f"{world} process(es), {args.backend}, {args.device} {args.dtype}, B={args.batch} H={args.heads} "
              f"D={args.dim}{' causal' if args.causal else ''}", flush=True)
        queue = ctx.SimpleQueue()
        mp.spawn(_rank, args=(world, _free_port(), args, queue), nprocs=world, join=True)
        rows += queue.get()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads_per_rank": args.threads, **{k: v for k, v in vars(args).items() if k not in ("out",)}}
    out = Path(args.out) if args.out else ROOT / "results" / args.device / "distributed"
    out.mkdir(parents=True, exist_ok=True)
    (out / "context_parallel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Context-parallel attention, {args.device} ({args.backend})", "",
             f"{meta['date']}, torch {meta['torch']}, {meta['cpus']} CPUs, {args.threads} thread(s) per rank; "
             f"B={args.batch} H={args.heads} D={args.dim} {args.dtype}, {'causal' if args.causal else 'non-causal'}, "
             f"forward + backward; median of {args.steps} steps, slowest rank.", "",
             "| N | processes | ms / step | MiB / rank | max diff vs 1 process |", "|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["seqlen"], r["world"])):
        lines.append(f"| {r['seqlen']} | {r['world']} | {r['step_ms']:.1f} | {r['mem_mib_per_rank']:.1f} | "
                     f"{r['max_abs_diff_vs_1_process']:.1e} |")
    (out / "context_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
