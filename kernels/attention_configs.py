"""Tile tables of the Triton attention kernels (kernels/attention.py) and the list of their compile targets.

``_config`` in kernels/attention.py picks a (BLOCK_M, BLOCK_N, num_warps, num_stages) entry from these
tables per launch; ``compile_targets()`` lists every configuration the launchers may pick, for
benchmarks/resource_check.py (registers, spills and shared memory on sm_80 and sm_90a, no GPU needed):

    python benchmarks/resource_check.py --module fusedlayers.kernels.attention_configs --jobs 2
    python benchmarks/retune_attention_tiles.py --write   # rewrites _CONFIGS / _FP32_CONFIGS below
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .launch import next_power_of_2

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, dtype class, dropout on or off, mask tile read or
# not (a bool mask or an additive bias: one more tile per block, and dbias in backward), and head-dim
# bucket. Each entry is the largest tile of a short FlashAttention-2 / Triton tutorial 06 style list
# that compiles with 0 spill bytes (Triton 3.8, its ptxas with the flags triton.compile passes) for
# every variant of compile_targets() that uses it, on sm_80 and sm_90a alike; where no tile of the list
# was clean on both, the entry is _ARCH(sm_80 tile, sm_90 tile); None (or None in _ARCH) where no tile
# was clean at all: kernels.attention.why_not refuses such calls with that reason. Register use sits near 255 for many
# entries and ptxas is neither monotonic in tile size nor stable under small source changes (moving
# one statement turned clean fp32 entries into 8-96 B spills): re-run benchmarks/resource_check.py
# (CI does) after touching a kernel or Triton; benchmarks/retune_attention_tiles.py --write replaces
# the entries that started spilling. Expect these to change when tuned on a GPU. Under the
# interpreter: one configuration, blocks of 64. An entry measured faster on a GPU that spills only with the
# score variants on is _BY_MODS(plain tile, tile with the window, softcap or ALiBi on).

_BUCKETS = (16, 32, 64, 128, 256, 512)


def _ARCH(sm80: Optional[tuple], sm90: Optional[tuple]) -> dict:
    """A table entry that differs between sm_80 and sm_90 (ptxas allocates registers differently: no
    tile of the list was clean on both)."""
    return {8: sm80, 9: sm90}


class _BY_MODS(NamedTuple):
    """A table entry whose calls with a score variant (window, softcap, ALiBi: constexprs that add registers)
    take another tile than plain calls; each side a tile, an _ARCH entry or None."""

    plain: Any
    mods: Any


_CONFIGS = {  # fp16 and bf16
    # (pass, dropout, mask):  d <= 16          d 17..32         d 33..64         d 65..128        d 129..256        d 257..512
    ("fwd", False, False):    ((128, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                               (64, 64, 4, 3), _BY_MODS((32, 64, 8, 2), (64, 32, 8, 3)), (32, 16, 8, 1)),
    ("fwd", False, True):     ((128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3),  (32, 64, 8, 2),  (32, 16, 8, 1)),
    ("fwd", True, False):     ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 3),  (32, 64, 8, 1),  (32, 16, 8, 1)),
    ("fwd", True, True):      (_BY_MODS((128, 64, 8, 3), (128, 32, 8, 3)), (128, 32, 8, 3), (128, 64, 8, 3),
                               (64, 32, 8, 3), (32, 32, 8, 1), (32, 16, 8, 1)),
    ("decode", False, False): ((16, 64, 4, 3),  (16, 64, 4, 3),  (16, 32, 4, 2),
                               _BY_MODS((16, 64, 4, 3), (16, 32, 4, 2)), (16, 32, 4, 2), (16, 32, 8, 1)),
    ("decode", False, True):  ((16, 64, 4, 2),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 32, 4, 2),  (16, 32, 8, 1)),
    ("decode", True, False):  ((16, 32, 4, 2),  (16, 32, 4, 2),  (16, 64, 4, 3),  (16, 32, 8, 2),  (16, 32, 8, 2),  (16, 32, 8, 1)),
    ("decode", True, True):   ((16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 32, 4, 2),  (16, 32, 8, 1)),
    ("dkdv", False, False):   ((32, 64, 8, 3),  (32, 64, 8, 3),  (32, 64, 8, 3),  (32, 64, 8, 2),  (32, 64, 8, 1),  (32, 16, 8, 1)),
    ("dkdv", False, True):    ((32, 64, 8, 1),  (32, 64, 8, 1),  (32, 64, 8, 1),  (16, 64, 8, 2),  (32, 32, 8, 1),  (16, 16, 8, 1)),
    ("dkdv", True, False):    ((32, 64, 8, 1),  (16, 64, 4, 2),  (32, 64, 8, 3),  (16, 32, 8, 2),  (32, 32, 8, 1),  (16, 32, 8, 2)),
    ("dkdv", True, True):     ((32, 32, 8, 2),  (32, 32, 8, 1),  (32, 32, 8, 2),  (16, 32, 8, 2),  (16, 32, 8, 2),  (16, 16, 8, 1)),
    ("dq", False, False):     ((128, 32, 4, 3), (128, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 2), (32, 16, 8, 1),  (32, 16, 8, 1)),
    ("dq", False, True):      ((128, 32, 8, 2), (128, 32, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3),  (32, 32, 8, 1),  (32, 16, 8, 1)),
    ("dq", True, False):      ((64, 32, 4, 3),  (64, 32, 4, 3),  _BY_MODS((64, 32, 4, 3), (128, 32, 8, 2)),
                               (64, 32, 8, 2), (32, 32, 8, 1), (32, 16, 8, 1)),
    ("dq", True, True):       ((64, 32, 4, 3),  (64, 32, 4, 3),  (64, 32, 4, 3),
                               (32, 32, 8, 1), (32, 32, 8, 1), _ARCH(None, (16, 16, 8, 2))),
}


_FP32_CONFIGS = {  # fp32: FMA dots (no TF32), fp64 dP in backward: smaller tiles
    # (pass, dropout, mask):  d <= 16          d 17..32         d 33..64         d 65..128        d 129..256        d 257..512
    ("fwd", False, False):    (_BY_MODS((128, 32, 4, 2), (128, 64, 8, 3)), (128, 32, 8, 3), (32, 64, 8, 2),
                               _BY_MODS((16, 16, 4, 1), (32, 64, 8, 1)), (32, 32, 8, 1), (32, 16, 8, 1)),
    ("fwd", False, True):     ((64, 32, 4, 2),  (32, 64, 8, 1),  (32, 64, 8, 2),  (32, 32, 8, 1),  (32, 32, 8, 1),  (32, 16, 8, 1)),
    ("fwd", True, False):     ((128, 32, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3),  (16, 16, 4, 1),  (16, 32, 4, 1),  (32, 16, 8, 1)),
    ("fwd", True, True):      ((64, 64, 8, 3),  (32, 32, 8, 1),  (32, 32, 4, 1),
                               (32, 32, 8, 1), _BY_MODS((32, 32, 8, 1), (32, 16, 8, 1)), (32, 16, 8, 1)),
    ("decode", False, False): ((16, 64, 4, 2),  (16, 32, 4, 2),  (16, 32, 4, 2),
                               _BY_MODS((16, 16, 4, 1), (16, 32, 4, 1)), _BY_MODS((16, 32, 4, 1), (16, 32, 8, 2)), (16, 32, 8, 1)),
    ("decode", False, True):  ((16, 64, 4, 2),  (16, 32, 4, 2),  (16, 32, 4, 1),  (16, 32, 4, 1),  (16, 32, 4, 1),  (16, 32, 8, 1)),
    ("decode", True, False):  ((16, 64, 4, 3),  (16, 32, 4, 2),  (16, 32, 4, 1),  (16, 16, 4, 1),  (16, 32, 4, 1),  (16, 32, 8, 1)),
    ("decode", True, True):   ((16, 32, 4, 2),  (16, 32, 4, 2),  (16, 64, 4, 3),  (16, 32, 4, 1),  (16, 32, 4, 1),  (16, 32, 8, 1)),
    ("dkdv", False, False):   ((16, 64, 8, 2),  (16, 64, 8, 2),  (32, 64, 8, 1),  (16, 64, 8, 2),  (16, 32, 8, 2),  (16, 16, 8, 1)),
    ("dkdv", False, True):    ((16, 64, 8, 2),  _BY_MODS((16, 64, 8, 2), (32, 64, 8, 1)), (16, 64, 8, 1),
                               (32, 16, 8, 1), (32, 16, 8, 1), None),
    ("dkdv", True, False):    ((16, 64, 8, 2),  (16, 64, 8, 2),  (32, 64, 8, 1),
                               _ARCH((16, 64, 8, 1), (16, 64, 8, 2)), (16, 16, 8, 2), None),
    ("dkdv", True, True):     ((16, 64, 8, 1),  _BY_MODS((16, 32, 8, 2), (32, 16, 8, 1)), _BY_MODS(_ARCH((32, 32, 8, 1), (16, 16, 4, 1)), (16, 64, 8, 1)),
                               (16, 16, 8, 1), (16, 32, 8, 1), None),
    ("dq", False, False):     ((32, 32, 4, 1),  (32, 32, 4, 1),  (16, 32, 4, 1),  (16, 16, 4, 1),  (16, 32, 8, 1),  (32, 16, 8, 1)),
    ("dq", False, True):      ((32, 32, 4, 1),  (128, 32, 8, 2), (16, 32, 4, 1),  (16, 32, 4, 1),  (32, 32, 8, 1),  (16, 16, 4, 1)),
    ("dq", True, False):      ((32, 32, 4, 1),  (128, 32, 8, 2), (16, 32, 4, 1),  (16, 32, 8, 1),  (16, 32, 8, 1),  (16, 16, 8, 1)),
    ("dq", True, True):       ((32, 32, 4, 1),  (32, 32, 4, 1),  (16, 32, 4, 1),  (16, 16, 4, 1),  (32, 32, 8, 1),  (16, 16, 8, 1)),
}

# Calls whose strides are not all multiples of 16 (a head dim such as 72): Triton compiles them without its
# divisibility hints, where some table tiles spill (Triton 3.8; the bf16 d65-128 forward's (64, 64, 4, 3) by 480-656
# bytes). (pass, 16-bit, head-dim bucket, dropout, mask, score variant) -> a tile clean in every build of that entry
# (bf16 and fp16, or fp32) on sm_80 and sm_90a (a dict: per GPU generation); an entry not listed takes the table's
# tile, clean there too. compile_targets' *_unaligned builds check both.
_UNALIGNED = {
    # pass, 16-bit, bucket, dropout, mask, mods
    ("fwd", True ,  64, False, True , False): (128, 32, 8, 3),
    ("fwd", True ,  64, False, True , True ): (128, 32, 8, 3),
    ("fwd", True ,  64, True , True , False): (128, 32, 8, 3),
    ("fwd", True ,  64, True , True , True ): (128, 32, 8, 3),
    ("fwd", True , 128, False, False, False): (64, 64, 8, 3),
    ("fwd", True , 128, False, False, True ): (64, 64, 8, 3),
    ("fwd", True , 128, False, True , False): (64, 32, 8, 3),
    ("fwd", True , 128, False, True , True ): (64, 32, 8, 3),
    ("fwd", False,  64, True , False, False): (32, 64, 8, 2),
    ("fwd", False,  64, True , False, True ): (32, 64, 8, 2),
    ("fwd", False,  64, True , True , False): (64, 32, 8, 3),
    ("fwd", False, 128, False, False, True ): (16, 16, 4, 1),
    ("fwd", False, 128, False, True , False): (32, 16, 8, 1),
    ("decode", True ,  64, False, True , True ): (16, 64, 4, 2),
    ("decode", True ,  64, True , False, True ): (16, 32, 8, 2),
    ("decode", True , 128, False, False, False): (16, 32, 4, 2),
    ("decode", True , 128, False, True , False): (16, 32, 8, 2),
    ("decode", True , 128, False, True , True ): (16, 32, 8, 2),
    ("decode", True , 128, True , True , False): (16, 32, 8, 2),
    ("decode", True , 128, True , True , True ): (16, 32, 8, 2),
    ("decode", False,  64, False, False, False): (16, 32, 4, 1),
    ("dkdv", True , 128, False, False, False): (32, 64, 8, 1),
    ("dkdv", True , 128, False, False, True ): (32, 32, 8, 2),
    ("dkdv", False,  64, False, False, True ): (16, 64, 8, 1),
    ("dkdv", False,  64, False, True , False): (16, 64, 8, 1),
    ("dkdv", False,  64, False, True , True ): (16, 32, 4, 1),
    ("dkdv", False,  64, True , False, False): (16, 64, 8, 1),
    ("dkdv", False,  64, True , False, True ): (32, 64, 8, 1),
    ("dkdv", False,  64, True , True , False): (16, 64, 8, 1),
    ("dkdv", False,  64, True , True , True ): (16, 64, 8, 1),
    ("dkdv", False, 128, False, False, True ): (32, 32, 8, 1),
    ("dkdv", False, 128, False, True , False): (16, 16, 8, 2),
    ("dkdv", False, 128, False, True , True ): (16, 32, 8, 1),
    ("dkdv", False, 128, True , False, False): (16, 32, 8, 1),
    ("dkdv", False, 128, True , False, True ): (32, 32, 8, 1),
    ("dkdv", False, 128, True , True , False): {8: (16, 16, 4, 1), 9: (32, 16, 8, 1)},
    ("dkdv", False, 128, True , True , True ): (32, 32, 8, 1),
    ("dq", True ,  64, False, False, True ): (128, 32, 8, 2),
    ("dq", True ,  64, True , True , False): (64, 32, 8, 2),
    ("dq", True , 128, False, False, True ): (64, 32, 4, 3),
}

_INTERPRETER_CONFIG = (64, 64, 4, 1)
# _bwd_row_stats (BLOCK_M, BLOCK_N, num_warps) per head-dim bucket, every dtype; one stage
_ROW_STATS_CONFIGS = ((32, 32, 4), (32, 32, 4), (32, 32, 4), (32, 32, 4), (32, 16, 8), (16, 16, 4))
# rows per program of the row kernels on a GPU, per head-dim bucket: the largest of 32, 16, 8 that compiles with 0
# spills on sm_80 and sm_90a in every dtype with the runtime's hints (head dim divisible by 16); the combine
# spilled 8 bytes at 32 rows of head dim 16 and at 16 rows of head dim 512. The interpreter costs per program: 64.
_ROWS_BLOCKS = {"preprocess": (32, 32, 32, 32, 32, 16), "combine": (16, 32, 32, 32, 32, 8)}
_ROWS_BLOCK_INTERPRET = 64
# dropout_keep_mask: scores per program. 1024 over 4 warps is 8 per thread (Philox gives 4 per call); the
# interpreter costs per program, not per element, so it takes whole 64 K blocks.
_KEEP_MASK_BLOCK = 1024
_KEEP_MASK_WARPS = 4
_KEEP_MASK_BLOCK_INTERPRET = 1 << 16


def _bucket(d: int) -> int:
    """The head-dim bucket of d: the power of two >= d, at least 16."""
    return max(16, next_power_of_2(d))


def _rows_block(kernel: str, bucket: int) -> int:
    """Rows per program of a row kernel ("preprocess": _bwd_preprocess, "combine": _split_combine) on a GPU."""
    return _ROWS_BLOCKS[kernel][_BUCKETS.index(bucket)]


def _atomic_dq(bucket: int, dtype: torch.dtype, mods: bool = False) -> bool:
    """Whether the non-deterministic backward may add dQ with atomics inside _bwd_dkdv (on a GPU). Not for
    16-bit head dims > 128: dK/dV with bias, dropout and the atomic dQ of 256-wide rows spills on sm_80 at
    every tile tried, and atomics of (BLOCK_M, 256) fp32 per key block of 16-32 keys cost more than the
    separate _bwd_dq pass. fp32 keeps them up to head dim 256 (past it dK/dV with the atomic dQ spills at
    every tile tried), except with a score variant (``mods``: window, softcap or ALiBi) at d >= 128, where
    dK/dV with the atomic dQ spills on sm_80 at every tile tried (bias and dropout at 128, packed sequences and
    dropout at 256) and _bwd_dq, which the deterministic backward compiles at every head dim anyway, takes dQ."""
    if dtype == torch.float32:
        return bucket <= 256 and not (mods and bucket >= 128)
    return bucket <= 128


# ----------------------------------------------------------------------------- compile targets


def compile_targets() -> list[tuple]:
    """Every GPU block configuration the launchers may pick, for ``benchmarks/resource_check.py``:
    (name, jit function, signature, constexprs, options, attrs, archs) (attrs: ``ASTSource``'s divisibility
    hints; archs: the architectures that pick it, None for all).

    Each table entry (pass, head-dim bucket, dtype, dropout, mask) is compiled in the variant that
    turns on every feature of that entry (``_VARIANT_ENTRY``), and again with the sliding window, the
    softcap and ALiBi on (``<variant>_mods``: the score variants pick no table entry of their own), in
    bf16, fp16 and fp32: fp16 and bf16
    share their tiles but not their code (ptxas allocates registers differently for the two MMA
    types, one fp16 kernel spilled where its bf16 twin did not). The row kernels (Delta, split-KV
    combine) once per bucket and dtype. Triton's runtime specialisation is mirrored for the common case
    (``_signature``, ``_aligned``): the head-dim strides, a mask's key stride, lse's row stride and ALiBi's head
    stride are the constant 1; pointers, the other strides, the head dim and the split-KV bounds are hinted
    16-divisible; the dropout seed is an i64 that no hint applies to (odd, above 2**31); and the builds of
    strides that are not 16-divisible (``<kind>_<variant>_unaligned``: every variant at head-dim buckets 64 and
    128, every dtype, with the tiles ``_gpu_config(..., aligned=False)`` picks)."""
    from .attention import _bwd_preprocess, _keep_mask_kernel, _split_combine

    targets = {}  # name -> [target tuple, GPU generations that pick it]
    for major in (8, 9):
        for tdt, dt in _DTYPES.items():
            for bucket in _BUCKETS:
                for kind in ("fwd", "decode", "dkdv", "dq"):
                    for variant in _variants(kind, tdt, bucket):
                        tile = _gpu_config(kind, bucket, dt, major, *_VARIANT_ENTRY[variant],
                                           mods=variant.endswith("_mods"))
                        if tile is None:  # not served on this generation: kernels.attention.why_not refuses it
                            continue
                        bm, bn, warps, stages = tile
                        name = f"attn_{kind}_{variant}_{tdt}_d{bucket}_BM{bm}_BN{bn}_w{warps}_s{stages}"
                        if name not in targets:
                            fn, signature, constexprs = _target(kind, variant, tdt, bucket, bm, bn)
                            targets[name] = [(name, fn, signature, constexprs,
                                              {"num_warps": warps, "num_stages": stages}, _aligned(fn, signature)),
                                             set()]
                        targets[name][1].add(major)
            for bucket in _BUCKETS:
                for fn, tag in ((_bwd_preprocess, "preprocess"), (_split_combine, "combine")):
                    name = f"attn_{tag}_{tdt}_d{bucket}"
                    signature, constexprs = _row_target(fn, tag, tdt, bucket)
                    targets[name] = [(name, fn, signature, constexprs, {"num_warps": 4}, _aligned(fn, signature)),
                                     {8, 9}]
            for bucket, (bm, bn, warps) in zip(_BUCKETS, _ROW_STATS_CONFIGS):
                for variant in ("all", "varlen", "all_mods"):  # causal with an fp32 bias; causal, packed; + mods
                    name = f"attn_rowstats_{variant}_{tdt}_d{bucket}_BM{bm}_BN{bn}_w{warps}"
                    fn, signature, constexprs = _target("rowstats", variant, tdt, bucket, bm, bn)
                    targets[name] = [(name, fn, signature, constexprs, {"num_warps": warps, "num_stages": 1},
                                      _aligned(fn, signature)), {8, 9}]
    # Head dims and row strides that are not multiples of 16 (d = 72, a slice of a packed layout): Triton then does
    # not specialise the strides as 16-divisible, a build of its own, compiled here for every variant of the
    # buckets such head dims fall in (33-64, 65-128), in every dtype, pointers still 16-byte aligned.
    for major in (8, 9):
        for tdt in _DTYPES:
            for bucket in (64, 128):
                for kind in ("fwd", "decode", "dkdv", "dq"):
                    for variant in _variants(kind, tdt, bucket):
                        tile = _gpu_config(kind, bucket, _DTYPES[tdt], major, *_VARIANT_ENTRY[variant],
                                           mods=variant.endswith("_mods"), aligned=False)
                        if tile is None:
                            continue
                        bm, bn, warps, stages = tile
                        name = f"attn_{kind}_{variant}_unaligned_{tdt}_d{bucket}_BM{bm}_BN{bn}_w{warps}_s{stages}"
                        if name in targets:
                            targets[name][1].add(major)
                            continue
                        fn, signature, constexprs = _target(kind, variant, tdt, bucket, bm, bn)
                        targets[name] = [(name, fn, signature, constexprs,
                                          {"num_warps": warps, "num_stages": stages},
                                          _aligned(fn, signature, strides=False)), {major}]
    # dropout_keep_mask's kernel; numel as i64 (past 2**31 scores Triton specialises it so; i32 is no heavier)
    name = f"attn_keep_mask_BLOCK{_KEEP_MASK_BLOCK}_w{_KEEP_MASK_WARPS}"
    signature = {"Keep": "*u8", "numel": "i64", "seed": "i64", "dropout_p": "fp32", "BLOCK": "constexpr"}
    targets[name] = [(name, _keep_mask_kernel, signature, {"BLOCK": _KEEP_MASK_BLOCK},
                      {"num_warps": _KEEP_MASK_WARPS, "num_stages": 1}, _aligned(_keep_mask_kernel, signature)), {8, 9}]
    # A configuration only one generation picks (an _ARCH entry) is checked for that architecture only.
    return [t + ((None if majors == {8, 9} else ["sm_80" if 8 in majors else "sm_90a"]),)
            for t, majors in targets.values()]


# Variants compiled per pass, and the table entry (dropout, mask) each one checks. all: fp32 additive bias
# (+ dbias) + causal + dropout; mask: the same without dropout; varlen: causal + dropout, packed; none:
# no feature; deterministic (dK/dV): all, without the dQ atomics; <variant>_mods: that variant with the
# sliding window, the softcap and ALiBi (constexprs WINDOW, SOFTCAP, ALIBI). Decode serves varlen calls
# with max_seqlen_q <= 16 too (never split).
_BASE_VARIANTS = {"fwd": ("all", "mask", "none", "varlen"), "decode": ("all", "mask", "none", "varlen"),
                  "dkdv": ("all", "mask", "none", "varlen", "deterministic"), "dq": ("all", "mask", "none", "varlen")}
_MODS = ("all", "mask", "none", "varlen")  # the variants compiled again with the score variants
_VARIANTS = {kind: base + tuple(f"{v}_mods" for v in base if v in _MODS) for kind, base in _BASE_VARIANTS.items()}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_VARIANT_ENTRY = {"all": (True, True), "deterministic": (True, True), "mask": (False, True),
                  "varlen": (True, False), "none": (False, False)}
_VARIANT_ENTRY.update({f"{v}_mods": _VARIANT_ENTRY[v] for v in _MODS})


def _variants(kind: str, tdt: str, bucket: int) -> tuple:
    """_VARIANTS[kind], less "deterministic" where dK/dV never uses atomics (it would compile "all" again)."""
    if kind == "dkdv" and not _atomic_dq(bucket, _DTYPES[tdt]):
        return tuple(v for v in _VARIANTS[kind] if v != "deterministic")
    return _VARIANTS[kind]


def _aligned(fn, signature: dict, strides: bool = True) -> dict:
    """Triton's runtime specialisation of 16-aligned pointers, strides divisible by 16 and the int arguments that
    are (the common case: head dims and sequence lengths multiples of 16, fresh allocations), as ASTSource attrs:
    keyed (argument,) or, for a field of an argument group, (argument, field). ``strides=False``: a call whose
    strides are not multiples of 16 (a head dim such as 72): the pointers' and the split bounds' alone."""
    attrs = {}
    hint = [["tt.divisibility", 16]]
    for i, arg in enumerate(fn.arg_names):
        ty = signature[arg]
        if isinstance(ty, tuple):
            if not strides:
                continue
            attrs.update({(i, j): hint for j, (field, t) in enumerate(zip(ty._fields, ty))
                          if t not in ("constexpr", "fp32") and field not in _NOT_STRIDES})
        elif ty.startswith("*") or arg in _DIVISIBLE_INTS or (strides and arg in _DIVISIBLE_WHEN_ALIGNED):
            attrs[(i,)] = hint
    return attrs


def _unaligned_key(kind: str, bucket: int, dtype: torch.dtype, dropout: bool, masked: bool, mods: bool) -> tuple:
    return kind, dtype != torch.float32, bucket, bool(dropout), bool(masked), bool(mods)


def _has_unaligned_tile(kind: str, bucket: int, dtype: torch.dtype, dropout: bool, masked: bool,
                        mods: bool = False) -> bool:
    """Whether a call of this pass takes a tile of its own (_UNALIGNED) when its strides are not all multiples of
    16."""
    return _unaligned_key(kind, bucket, dtype, dropout, masked, mods) in _UNALIGNED


def _gpu_config(kind: str, bucket: int, dtype: torch.dtype, major: int, dropout: bool,
                masked: bool, mods: bool = False, aligned: bool = True) -> Optional[tuple[int, int, int, int]]:
    """The table's entry for a GPU of compute capability ``major``.x (8: sm_80 tiles, 9: sm_90), for a call with a
    score variant (``mods``: window, softcap or ALiBi) or without; None where no tile compiles without spills (the
    call is refused). ``aligned``: every stride and pointer of the call is a multiple of 16 (elements / bytes), so
    Triton's build with its divisibility hints runs; otherwise the call takes its ``_UNALIGNED`` tile where
    there is one."""
    if not aligned and _has_unaligned_tile(kind, bucket, dtype, dropout, masked, mods):
        tile = _UNALIGNED[_unaligned_key(kind, bucket, dtype, dropout, masked, mods)]
        return tile[major] if isinstance(tile, dict) else tile
    table = _FP32_CONFIGS if dtype == torch.float32 else _CONFIGS
    entry = table[kind, bool(dropout), bool(masked)][_BUCKETS.index(bucket)]
    if isinstance(entry, _BY_MODS):
        entry = entry.mods if mods else entry.plain
    return entry[major] if isinstance(entry, dict) else entry


def _target(kind: str, variant: str, tdt: str, bucket: int, bm: int, bn: int):
    """(jit function, signature, constexprs) of one variant of a pass, in dtype ``tdt``, with a (bm, bn) tile."""
    from . import attention as A

    fn = {"fwd": A._attn_fwd, "decode": A._attn_fwd, "dkdv": A._bwd_dkdv, "dq": A._bwd_dq,
          "rowstats": A._bwd_row_stats}[kind]
    mods = variant.endswith("_mods")
    variant = variant.removesuffix("_mods")
    on = variant in ("all", "deterministic", "mask")
    varlen = variant == "varlen"
    dropout = variant != "mask" and (on or varlen)
    types = {"Mask": "*fp32" if on else "*" + tdt,
             "Out": "*fp32" if kind == "decode" and on else "*" + tdt,  # split-KV partials are fp32
             "DQ": "*fp32" if kind == "dkdv" or tdt == "fp32" else "*" + tdt}
    types.update({arg: "*" + tdt for arg in ("Q", "K", "V", "DO", "DK", "DV")})
    types.update({arg: "*i32" if varlen else "*" + tdt for arg in ("CuQ", "CuK")})
    types["qk_scale"] = "fp32"
    signature, constexprs = _signature(fn, tdt, types, mods)
    mask_kind = A.MASK_BIAS if on and not varlen else A.MASK_NONE
    constexprs.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bucket, MASK_KIND=mask_kind.value,
                      CAUSAL=on or varlen, DROPOUT=dropout, VARLEN=varlen, WINDOW=mods, SOFTCAP=mods, ALIBI=mods,
                      UPCAST=False, IEEE=tdt == "fp32")
    if kind == "dkdv":
        constexprs.update(ATOMIC_DQ=variant != "deterministic" and _atomic_dq(bucket, _DTYPES[tdt], mods), DBIAS=on)
    return fn, signature, {k: v for k, v in constexprs.items() if not isinstance(k, str) or k in fn.arg_names}


# The fields of the kernels' argument groups (kernels/attention.py) that are not i32 at run time: the dropout
# seed (fusedlayers.ops._draw_seed: odd, above 2**31) i64, the probabilities and softcap fp32. The dropout
# strides are i32 up to Hq * Nq * Nk < 2**31 (Triton types a Python int by its value; past that it runs an i64
# build of its own, which the resource check does not compile).
_FIELD_TYPES = {"Dropout": {"seed": "i64", "p": "fp32", "inv_keep": "fp32"}, "Mods": {"softcap": "fp32"}}
# Fields equal to 1 in every call, which Triton turns into the constant 1 at run time: a mask's key stride (unless
# the mask broadcasts keys), the row stride of lse and of its gradient (the kernels lay them out (B, H, N)), and the
# head stride of ALiBi slopes ((Hq,) or (B, Hq) float32, when ALiBi is on).
_UNIT_FIELDS = {"MaskStrides": ("k",), "l_str": ("n",), "g_str": ("n",)}
_UNIT_FIELDS_MODS = {"Mods": ("alibi_h",)}
# Fields that are not strides (no divisibility hint).
_NOT_STRIDES = {"seed", "p", "inv_keep", "win_left", "win_right", "softcap"}
# Int arguments that are multiples of 16 in every call (split bounds: multiples of BLOCK_N), and those that are in
# a call whose strides are (the head dim): Triton hints them divisible by 16 at run time.
_DIVISIBLE_INTS = ("split_lo", "keys_per_split")
_DIVISIBLE_WHEN_ALIGNED = ("D",)


def _signature(fn, tdt: str, types: dict, mods: bool = False) -> tuple[dict, dict]:
    """(Triton signature, constexprs of argument-group fields) of ``fn`` in dtype ``tdt``: ``types`` for the
    arguments it names; the fp32 row tensors; Delta fp64 for fp32 inputs, else fp32; ``tl.constexpr``
    parameters; an argument group (a NamedTuple annotation) as that tuple of its fields' types (_FIELD_TYPES,
    else i32; the constant 1 for _UNIT_FIELDS, and _UNIT_FIELDS_MODS with the score variants on, ``mods``); i32
    for the rest (sizes)."""
    signature, constexprs = {}, {}
    params = inspect.signature(fn.fn).parameters
    for i, arg in enumerate(fn.arg_names):
        group = params[arg].annotation
        if arg in types:
            signature[arg] = types[arg]
        elif hasattr(group, "_fields"):
            field_types = _FIELD_TYPES.get(group.__name__, {})
            units = _UNIT_FIELDS.get(arg, ()) + _UNIT_FIELDS.get(group.__name__, ()) + (
                _UNIT_FIELDS_MODS.get(group.__name__, ()) if mods else ())
            signature[arg] = group(*("constexpr" if f in units else field_types.get(f, "i32")
                                     for f in group._fields))
            constexprs.update({(i, j): 1 for j, f in enumerate(group._fields) if f in units})
        elif arg in ("Delta", "Delta_out"):
            signature[arg] = "*fp64" if tdt == "fp32" else "*fp32"
        elif arg in ("Lse", "RowM", "RowC", "DB", "Alibi", "DLse", "OPart", "LPart"):
            signature[arg] = "*fp32"
        elif arg in _constexpr_args(fn):
            signature[arg] = "constexpr"
        else:
            signature[arg] = "i32"
    return signature, constexprs


def _constexpr_args(fn) -> set:
    """Parameters annotated ``tl.constexpr`` (works on JIT and interpreted functions alike)."""
    params = inspect.signature(fn.fn).parameters
    return {name for name, p in params.items() if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}


def _row_target(fn, kernel: str, tdt: str, bucket: int):
    """(signature, constexprs) of a row kernel (_bwd_preprocess "preprocess", _split_combine "combine") in dtype
    ``tdt``."""
    signature, constexprs = _signature(fn, tdt, {arg: "*" + tdt for arg in ("O", "DO", "Out")})
    constexprs.update(BLOCK_M=_rows_block(kernel, bucket), BLOCK_D=bucket)
    return signature, constexprs

