"""Find spill-free tiles for the Triton attention table entries that spill, without a GPU.

ptxas is not stable under small kernel changes: after an edit of kernels/attention.py,
``benchmarks/resource_check.py`` may report spills in a few entries of ``_CONFIGS`` /
``_FP32_CONFIGS`` that were clean before. This script compiles every attention target
(as resource_check does), and for each table entry with a spilling target tries a list of
candidate tiles, largest first, until one compiles with 0 spills and within the shared
memory limit for every variant and dtype that uses the entry, on sm_80 and sm_90a. Where
no candidate is clean on both, it proposes ``_ARCH(sm_80 tile, sm_90 tile)``.

    python benchmarks/retune_attention_tiles.py           # print the proposed entries
    python benchmarks/retune_attention_tiles.py --write   # and rewrite the tables in kernels/attention_configs.py

Clean tiles are not fast tiles: this only restores the 0-spill property; speed is tuned
on a GPU (benchmarks/bench_attention.py). Re-run resource_check.py afterwards (CI does).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resource_check as rc  # noqa: E402  (turns the Triton interpreter off before the kernels import)

from fusedlayers.kernels import attention_configs as A  # noqa: E402

MODULE = "fusedlayers.kernels.attention_configs"
ARCHS = ("sm_80", "sm_90a")
# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, in order of preference.
CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3),
            (64, 32, 8, 3), (64, 32, 4, 2), (64, 64, 4, 2), (32, 64, 8, 2), (32, 64, 8, 1), (32, 32, 8, 1),
            (32, 32, 4, 1), (32, 16, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
    "decode": [(16, 64, 4, 3), (16, 64, 4, 2), (16, 32, 4, 2), (16, 32, 4, 1), (16, 64, 8, 2), (16, 32, 8, 2),
               (16, 32, 8, 1), (16, 16, 4, 1)],
    "dkdv": [(32, 64, 8, 3), (32, 64, 8, 2), (32, 64, 8, 1), (16, 64, 8, 2), (32, 32, 8, 2), (32, 32, 8, 1),
             (32, 32, 4, 1), (16, 64, 8, 1), (16, 32, 8, 2), (16, 32, 8, 1), (16, 32, 4, 1), (32, 16, 8, 1),
             (16, 16, 8, 2), (16, 16, 8, 1), (16, 16, 4, 1)],
    "dq": [(128, 32, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 8, 1),
           (32, 32, 4, 1), (16, 32, 8, 1), (16, 32, 4, 1), (32, 16, 8, 1), (16, 16, 8, 2), (16, 16, 8, 1),
           (16, 16, 4, 1)],
}
# Tiles whose q/k/v/accumulator tiles would need more than this many bytes per thread are not tried:
# they spill anyway, and an fp32 one at head dim 256 takes minutes to compile (FMA dots, fully unrolled).
MAX_TILE_BYTES_PER_THREAD = 1024
_NAME = re.compile(r"attn_(fwd|decode|dkdv|dq)_([a-z_]+?)_(bf16|fp16|fp32)_d(\d+)_")


def clean(kind: str, variant: str, tdt: str, bucket: int, tile: tuple, arch: str) -> bool:
    """Whether one variant compiles with this tile for ``arch`` with 0 spills and within the shared-memory limit."""
    bm, bn, warps, stages = tile
    fn, signature, constexprs = A._target(kind, variant, tdt, bucket, bm, bn)
    try:
        compiled = rc.triton.compile(rc.ASTSource(fn, signature, constexprs, A._aligned(fn, signature)),
                                     target=rc.ARCHS[arch][0], options={"num_warps": warps, "num_stages": stages})
        _, spill_st, spill_ld = rc.ptxas_usage(compiled.asm["ptx"], arch)
    except Exception:  # a tile that does not compile is not a candidate
        return False
    return spill_st == 0 and spill_ld == 0 and compiled.metadata.shared <= rc.ARCHS[arch][1]


def spilling_entries(pool) -> set:
    """(kind, dropout, masked, fp32, bucket) of every table entry with a failing target today."""
    jobs = [(MODULE, name, arch) for name, (_, _, archs) in rc._module_targets(MODULE).items()
            for arch in ARCHS if archs is None or arch in archs]
    entries = set()
    for (_, name, _), (_, _, failures) in zip(jobs, pool.map(rc.check, *zip(*jobs))):
        m = _NAME.match(name)
        if failures and m:
            kind, variant, tdt, bucket = m.groups()
            entries.add((kind, *A._VARIANT_ENTRY[variant], tdt == "fp32", int(bucket)))
    return entries


def retune(entry: tuple, pool):
    """A clean tile for every user of ``entry`` on both archs, else {8: tile or None, 9: tile or None}, else None."""
    kind, dropout, masked, fp32, bucket = entry
    users = [(v, tdt) for tdt in (("fp32",) if fp32 else ("bf16", "fp16"))
             for v in A._variants(kind, tdt, bucket) if A._VARIANT_ENTRY[v] == (dropout, masked)]
    per_arch = {}
    elem = 4 if fp32 else 2
    for tile in CANDIDATES[kind]:
        bm, bn, warps, _ = tile
        if (2 * bm + 2 * bn) * bucket * elem > MAX_TILE_BYTES_PER_THREAD * 32 * warps:
            continue
        jobs = [(kind, v, tdt, bucket, tile, arch) for v, tdt in users for arch in ARCHS]
        ok = list(pool.map(clean, *zip(*jobs)))
        arch_ok = {arch: all(o for j, o in zip(jobs, ok) if j[5] == arch) for arch in ARCHS}
        if all(arch_ok.values()):
            return tile
        for arch in ARCHS:
            if arch_ok[arch]:
                per_arch.setdefault(arch, tile)
    # clean on one architecture only: _ARCH with None for the other (its calls are refused)
    return {8: per_arch.get("sm_80"), 9: per_arch.get("sm_90a")} if per_arch else None


def _cell(entry) -> str:
    if isinstance(entry, A._BY_MODS):
        return f"_BY_MODS({_cell(entry.plain)}, {_cell(entry.mods)})"
    if isinstance(entry, dict):
        return f"_ARCH({entry[8]}, {entry[9]})"
    return str(entry if entry is None else tuple(entry))


def write_tables(path: str, proposals: dict) -> None:
    """Rewrite the _CONFIGS / _FP32_CONFIGS literals of ``path`` with ``proposals`` applied."""
    src = open(path).read()
    for name, table, fp32 in (("_CONFIGS", A._CONFIGS, False), ("_FP32_CONFIGS", A._FP32_CONFIGS, True)):
        start = src.index(f"\n{name} = {{") + 1
        end = src.index("\n}\n", start) + 3
        lines = src[start:end].split("\n")[:2]  # the assignment line and the column header comment
        for key, row in table.items():
            cells = [_cell(proposals.get((*key, fp32, bucket), row[i])) for i, bucket in enumerate(A._BUCKETS)]
            padded = [(c + ", ").ljust(17) for c in cells[:-1]]
            head = f"    {key!r}:".replace("'", '"').ljust(30) + "("
            line = head + "".join(padded) + cells[-1] + "),"
            if len(line) > 140:
                line = (head + "".join(padded[:3])).rstrip() + "\n" + " " * 31 + " ".join(
                    p.strip() for p in padded[3:]) + " " + cells[-1] + "),"
            lines.append(line)
        src = src[:start] + "\n".join(lines) + "\n}\n" + src[end:]
    with open(path, "w") as f:
        f.write(src)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables in kernels/attention_configs.py")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        entries = sorted(spilling_entries(pool))
        print(f"{len(entries)} table entries with a spilling or failing target")
        proposals = {}
        for entry in entries:
            tile = retune(entry, pool)
            kind, dropout, masked, fp32, bucket = entry
            print(f"  {'_FP32_CONFIGS' if fp32 else '_CONFIGS'}[{kind!r}, {dropout}, {masked}] d{bucket}: "
                  f"{_cell(tile) if tile else 'no clean candidate: needs a kernel change'}", flush=True)
            if tile:
                proposals[entry] = tile
    if args.write and proposals:
        write_tables(A.__file__, proposals)
        print(f"rewrote the tables in {A.__file__}; now run benchmarks/resource_check.py")
    return 0 if len(proposals) == len(entries) else 1


if __name__ == "__main__":
    sys.exit(main())
