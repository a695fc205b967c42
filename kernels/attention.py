"""Fused scaled-dot-product attention in Triton: the ``triton`` backend of fusedlayers.

What it computes (FlashAttention-2, tiled, nothing N x N ever stored):
    S = Q K^T * scale + bias  (masked entries -inf),  P = softmax(S),  O = dropout(P) V,
    lse = logsumexp(S) (natural log, -inf on a row that sees no key).
Forward: online softmax over key blocks in base 2 (exp2 of (S - max) * LOG2E), fp32 accumulation,
causal block skipping (top-left and bottom-right alignments), bool / additive masks read through
their broadcast strides (a (B,1,1,Nk) key-padding mask costs no B*H*N*N memory), GQA/MQA by index
(query head h reads KV head h // (Hq // Hkv)), Nq != Nk, dropout from Triton's Philox
``tl.rand(seed, offset)`` with offset = the linear index of the score in (B, Hq, Nq, Nk) (varlen: in
(Hq, total_q, total_k)), so backward and ``dropout_keep_mask`` regenerate the same mask. Head dims
1..512 are padded to a power-of-two block >= 16 with masked loads: one kernel source serves every head
dim. When v's head dim Dv differs from q's, the launchers zero-pad the narrower side to the wider (a
copy; see _run_forward).
Backward (same names as ``fusedlayers.reference_backend``): P = exp((S - row_m) - row_c) recomputed,
with (row_m, row_c) = (lse, 0), or (row max, log(row sum)) recomputed from the scores on a row with
|lse| >= 4096 (a huge bias on every visible key, e.g. finfo.min: the float32 lse has lost log(l)),
dP = dO V^T (times the dropout keep-mask / (1-p)), Delta = rowsum(dO * O) - dlse, dS = P * (dP -
Delta), dV = P_dropped^T dO, dK = dS^T Q * scale, dQ = dS K * scale, d(bias) = dS.
    * ``_bwd_preprocess`` computes Delta, ``_bwd_row_stats`` (row_m, row_c) (it reads Q and K only in a
      query block holding a row with |lse| >= 4096); ``_bwd_dkdv`` owns one key block of one KV head and
      loops over the query blocks of every query head of its group (dK, dV in registers, no
      atomics); dQ is either atomically added into an fp32 buffer by the same kernel (default)
      or computed by ``_bwd_dq``, one query block per program (``deterministic=True``: no
      atomics anywhere, bitwise reproducible; also 16-bit head dims > 128 and
      fp32 d >= 128 with a score variant on a GPU, see _atomic_dq).
    * d(bias): ``_bwd_dkdv`` writes each dS tile once into an fp32 (B, Hq, Nq, Nk) buffer (or
      straight into the gradient when the bias is full size and fp32); torch then sums it over
      the bias's broadcast dims. Deterministic, and it costs what autograd of an expanded bias
      costs; an in-kernel reduction needs atomics (not reproducible) or a second pass.
Decode (Nq <= 16 against Nk >= 1024 on a GPU that the (B*Hq) programs would not fill): split-KV,
each split writes a normalised partial output and its lse, ``_split_combine`` merges them.
varlen: packed (total, H, D) tensors with cu_seqlens; programs past a sequence's end exit.

Structure (as Triton's fused-attention tutorial): each kernel offsets its base pointers to its
(sequence, head) and calls its inner loop twice, STAGE 1 over the blocks every row of the tile sees
whole, STAGE 2 over the rest (the causal diagonal, the sliding window's edges, the partial last
block), which alone tests positions. One function each decides what the variants change: ``_scores``
(scale, softcap, ALiBi, mask / bias, causal, window and key-bound tests) for the forward and both
backward passes, ``_key_range`` (the key blocks of a query block, forward, dQ and the row statistics)
and its mirror ``_query_range`` (the query blocks of a key block, dK/dV); blocks outside the window
are never visited. The variants are constexprs (WINDOW, SOFTCAP, ALIBI): a call without one runs no
code of it. Softcap backward: dS (the bias gradient) times 1 - tanh^2 gives dQ and dK. Layouts: the
head-dim stride is 1 everywhere; q and dout share one stride set, k and v another (the launchers copy
only a pair whose strides differ); the outputs (out, dq, dk, dv) are allocated contiguous, one stride
set per side. Arguments that belong together travel as one named tuple (the argument groups below: a
tensor's strides, the dropout stream, the variants' scalars; inside the kernels a program's sequence, Seq).

Dtypes fp16/bf16 (native MMA, fp32 accumulation) and fp32 (``input_precision="ieee"``, no TF32).
Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors, tests only) dot operands are
upcast to fp32 (constexpr ``UPCAST``: the interpreter's bf16 arithmetic is broken) and one
block configuration is used.

Check:      python -m pytest -q tests/test_attention.py tests/test_triton_attention.py -k triton
Benchmark:  python benchmarks/bench_attention.py          (GPU; TFLOP/s beside torch SDPA)
Resources:  python benchmarks/resource_check.py --module fusedlayers.kernels.attention_configs
            (kernels/attention_configs.py holds the tile tables and compile_targets()).
Measured:   no speed figure on a GPU yet; registers and spills per configuration: the resource check.
"""

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .attention_configs import (_BUCKETS, _INTERPRETER_CONFIG, _KEEP_MASK_BLOCK, _KEEP_MASK_BLOCK_INTERPRET,
                                _KEEP_MASK_WARPS, _ROW_STATS_CONFIGS, _ROWS_BLOCK_INTERPRET,
                                _atomic_dq, _bucket, _gpu_config, _has_unaligned_tile, _rows_block)
from .launch import cdiv, gpu_facts, on_device

# Decided once at import, as @triton.jit decides it (from TRITON_INTERPRET).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): natural lse = base-2 lse * LN2
MAX_HEAD_DIM = 512
MASK_NONE, MASK_BOOL, MASK_BIAS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # MASK_KIND
# |lse| from which the backward recomputes a row's max and sum (_bwd_row_stats): past 4096 the float32 lse
# = m + log(l) keeps log(l) to at most ~2**-11 absolutely, and under a huge bias (finfo.min) not at all
LSE_EXACT = tl.constexpr(4096.0)


# ----------------------------------------------------------------------------- argument groups
# The kernels take these as tuples (Triton passes a named tuple as its fields; a kernel reads x.field). The
# launchers lay each side out alike, so that one stride set serves every tensor of a side: q and dout, k and v,
# dk and dv.


class Strides(NamedTuple):
    """Element strides of a (B, H, N[, D]) tensor's batch, head and row; the head-dim stride is 1. Packed
    (total, H, D) varlen tensors (and (H, total) row tensors): batch stride 0 (a sequence starts at its
    cu_seqlens row)."""
    b: int
    h: int
    n: int


class SplitStrides(NamedTuple):
    """Strides of the forward's output or lse: batch, head, row, and split (split-KV partials; 0 otherwise)."""
    b: int
    h: int
    n: int
    split: int


class MaskStrides(NamedTuple):
    """Strides of a 4-D mask or bias (batch, head, query, key), 0 on its broadcast dims: never expanded."""
    b: int
    h: int
    q: int
    k: int


class Dropout(NamedTuple):
    """The dropout stream: score (b, h, i, j) is kept when rand(seed, b * b_stride + h * h_stride + i * n_stride + j)
    >= p (the linear index of a contiguous (B, Hq, Nq, Nk) score tensor; varlen (Hq, total_q, total_k)), and a kept
    value is scaled by inv_keep = 1 / (1 - p). The bias gradient's dS buffer has the same layout."""
    seed: int
    p: float
    inv_keep: float
    b_stride: int
    h_stride: int
    n_stride: int


class Mods(NamedTuple):
    """The score variants' scalars: ALiBi slope of (b, h) at b * alibi_b + h * alibi_h; the sliding window, keys
    p(i) - win_left .. p(i) + win_right (an unbounded side as Nq + Nk); softcap. Constexprs WINDOW, SOFTCAP and
    ALIBI say which are used."""
    alibi_b: int
    alibi_h: int
    win_left: int
    win_right: int
    softcap: float


class Seq(NamedTuple):
    """A program's sequence (built in the kernels by _sequence): its first query and key rows in the packed
    tensors (0 unless varlen), lengths, and shift = len_k - len_q under the bottom-right causal alignment, else 0
    (query row i sits at key position i + shift)."""
    q_start: int
    len_q: int
    k_start: int
    len_k: int
    shift: int


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands without TF32 when IEEE."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _lt(a, b):
    """a < b, written a - b < 0 (no overflow: both lie in [0, 2**31) here). For the store masks after a loop:
    the compiler cannot merge this with the same test made before the loop (the load masks), so no predicate
    stays live across the loop, where ptxas would spill it (a few bytes, but the resource check counts them)."""
    return (a - b) < 0


@triton.jit
def _keep(drop, drop_base, offs_m, offs_n):
    """Dropout keep-mask of a (BLOCK_M, BLOCK_N) tile, rows offs_m and keys offs_n of the sequence whose score
    (0, 0) has the linear index drop_base (see Dropout)."""
    offs = drop_base + offs_m[:, None].to(tl.int64) * drop.n_stride + offs_n[None, :].to(tl.int64)
    return tl.rand(drop.seed, offs) >= drop.p


@triton.jit
def _sequence(CuQ, CuK, Nq, Nk, bottom_right, VARLEN: tl.constexpr):
    """(h, b, Seq) of this program: its head h and sequence b (grid axes 1 and 2: each <= 65535, so B * H is not
    bounded by one axis' limit); Seq holds the packed offsets of sequence b for varlen, else Seq(0, Nq, 0, Nk,
    shift)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:
        q_start = tl.load(CuQ + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        seqlen_k = tl.load(CuK + b + 1) - k_start
    else:
        q_start = 0
        seqlen_q = Nq
        k_start = 0
        seqlen_k = Nk
    return h, b, Seq(q_start, seqlen_q, k_start, seqlen_k, (seqlen_k - seqlen_q) * bottom_right)


@triton.jit
def _stages(v_lo, v_hi, f_lo, f_hi, BLOCK: tl.constexpr):
    """Blocks of BLOCK positions along one axis (keys, or queries for dK/dV): [v_lo, v_hi) the positions some
    row (column) of the tile sees, [f_lo, f_hi) those every one sees (f_hi <= the sequence end). Returns (lo,
    s1_lo, s1_hi, hi): STAGE 1 the whole blocks [s1_lo, s1_hi) inside [f_lo, f_hi) (no position test), STAGE 2
    the blocks of [lo, s1_lo) and [s1_hi, hi) (lo = v_lo rounded down to a block; the window's far edge and
    the causal diagonal or the sequence end), each visited once."""
    v_lo = tl.maximum(v_lo, 0)
    lo = (v_lo // BLOCK) * BLOCK
    hi = tl.where(v_hi > v_lo, v_hi, lo)  # v_hi <= v_lo: nothing seen (e.g. a window starting past the end)
    s1_lo = tl.minimum(tl.maximum(((tl.maximum(f_lo, 0) + BLOCK - 1) // BLOCK) * BLOCK, lo), hi)
    s1_hi = tl.maximum(tl.minimum((tl.maximum(f_hi, 0) // BLOCK) * BLOCK, hi), s1_lo)
    return lo, s1_lo, s1_hi, hi


@triton.jit
def _stage_blocks(lo, s1_lo, s1_hi, hi, BLOCK: tl.constexpr, STAGE: tl.constexpr, WINDOW: tl.constexpr,
                  KEYS: tl.constexpr):
    """(first, count, n_lo, jump) of the blocks of STAGE (see _stages): block i starts at first + i * BLOCK, plus
    jump from block n_lo on, the first of [s1_hi, hi) (STAGE 2 runs over its two ranges in one loop). Without
    WINDOW one of them is empty and the jump is not made: [lo, s1_lo) on the key axis (KEYS: _key_range), [s1_hi,
    hi) on the query axis (_query_range)."""
    if STAGE == 1:
        first = s1_lo
        count = (s1_hi - s1_lo + BLOCK - 1) // BLOCK
        n_lo = count
    elif not WINDOW:
        if KEYS:
            first = s1_hi
            count = (hi - s1_hi + BLOCK - 1) // BLOCK
        else:
            first = lo
            count = (s1_lo - lo + BLOCK - 1) // BLOCK
        n_lo = count
    else:
        first = lo
        n_lo = (s1_lo - lo + BLOCK - 1) // BLOCK  # s1_lo is block aligned unless [s1_hi, hi) is empty
        count = n_lo + (hi - s1_hi + BLOCK - 1) // BLOCK
    return first, count, n_lo, s1_hi - s1_lo


@triton.jit
def _block_start(first, i, n_lo, jump, BLOCK: tl.constexpr, STAGE: tl.constexpr, WINDOW: tl.constexpr):
    """Where block i of a stage from _stage_blocks starts."""
    start = first + i * BLOCK
    if WINDOW and STAGE == 2:
        start += tl.where(i >= n_lo, jump, 0)
    return start


@triton.jit
def _key_range(start_m, lo, hi, seq, mods, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """_stages of the keys of the query block at start_m within the keys [lo, hi) given (a split; block aligned).

    Query row i sits at key position p(i) = i + seq.shift and sees keys p(i) - win_left <= j <= p(i) +
    win_right (mods.win_left, mods.win_right; j <= p(i) when causal, j < seq.len_k); the launchers pass an
    unbounded window side as Nq + Nk, which no position difference reaches. The block's rows see keys from
    p(first row) - win_left to p(last row) + win_right (or p(last row) when causal); every row sees those from
    p(last row) - win_left to p(first row) + win_right (or p(first row)). So a window of W keys visits O(W) key
    blocks per query block. Without WINDOW (a constexpr: no window code in the kernels of calls without one)
    the window bounds are ignored."""
    p_first = start_m + seq.shift
    p_last = start_m + BLOCK_M - 1 + seq.shift
    v_lo = lo
    f_lo = lo
    v_hi = tl.minimum(hi, seq.len_k)
    f_hi = v_hi
    if WINDOW:
        v_lo = tl.maximum(lo, p_first - mods.win_left)
        f_lo = tl.maximum(lo, p_last - mods.win_left)
        v_hi = tl.minimum(v_hi, p_last + mods.win_right + 1)
        f_hi = tl.minimum(f_hi, p_first + mods.win_right + 1)
    if CAUSAL:
        v_hi = tl.minimum(v_hi, p_last + 1)
        f_hi = tl.minimum(f_hi, p_first + 1)
    return _stages(v_lo, v_hi, f_lo, f_hi, BLOCK_N)


@triton.jit
def _query_range(start_n, seq, mods, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr):
    """_stages of the queries that see the key block at start_n, the mirror of _key_range: query i sees key j
    iff j - win_right <= i + seq.shift <= j + win_left (and j <= i + seq.shift when causal); STAGE 1 the query
    blocks whose every row sees every key of the block, STAGE 2 the rest of those that see one."""
    n_first = start_n - seq.shift
    n_last = start_n + BLOCK_N - 1 - seq.shift
    v_lo = 0
    f_lo = 0
    v_hi = seq.len_q
    f_hi = seq.len_q
    if WINDOW:
        v_lo = n_first - mods.win_right
        f_lo = n_last - mods.win_right
        v_hi = tl.minimum(seq.len_q, n_last + mods.win_left + 1)
        f_hi = tl.minimum(seq.len_q, n_first + mods.win_left + 1)
    if CAUSAL:
        v_lo = tl.maximum(v_lo, n_first)
        f_lo = tl.maximum(f_lo, n_last)
    lo, s1_lo, s1_hi, hi = _stages(v_lo, v_hi, f_lo, f_hi, BLOCK_M)
    if not WINDOW:  # query rows are always load-checked: STAGE 1 may end at the sequence end, unaligned
        s1_hi = hi
    return lo, s1_lo, s1_hi, hi


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (no libdevice, so the interpreter runs it): sign(x) (1 - e) / (1 + e) with
    e = exp(-2|x|) in (0, 1]; absolute error a few fp32 ulps of 1; +-inf -> +-1, NaN -> NaN."""
    e = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(q, k, offs_m, offs_n, seq, Mb, m_str, qk_scale, mods, slope, MASK_KIND: tl.constexpr,
            CAUSAL: tl.constexpr, CHECK_POS: tl.constexpr, CHECK_KEYS: tl.constexpr, WINDOW: tl.constexpr,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, IEEE: tl.constexpr):
    """(S, cap_grad) of a (BLOCK_M, BLOCK_N) tile: S = q k^T * scale, soft-capped (softcap * tanh(S / softcap),
    SOFTCAP), minus slope * |p(i) - j| (ALIBI), plus the bias, -inf where not allowed (rows offs_m, keys offs_n
    of the sequence seq; Mb the mask of this (sequence, head), read through m_str); cap_grad = d(capped)/d(S)
    = 1 - tanh^2 (1.0 without SOFTCAP). CHECK_POS: the tile may cross the causal diagonal or a window edge
    (WINDOW; see _key_range); CHECK_KEYS: it may hold keys past the sequence end.

    Natural units: the callers subtract the row max (or lse) before scaling by LOG2E for exp2, so an
    extreme finite bias (finfo.min, Hugging Face's padding) never overflows to -inf."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if SOFTCAP:
        t = _tanh(s * (1.0 / mods.softcap))
        s = mods.softcap * t
        cap_grad = 1.0 - t * t
    else:
        cap_grad = 1.0
    if ALIBI or (CHECK_POS and WINDOW):
        dist = offs_n[None, :] - (offs_m[:, None] + seq.shift)  # j - p(i)
    if ALIBI:
        s -= slope * tl.abs(dist).to(tl.float32)
    if MASK_KIND != MASK_NONE:
        in_bounds = (offs_m[:, None] < seq.len_q) & (offs_n[None, :] < seq.len_k)
        mvals = tl.load(Mb + offs_m[:, None] * m_str.q + offs_n[None, :] * m_str.k, mask=in_bounds, other=0)
        if MASK_KIND == MASK_BOOL:
            s = tl.where(mvals != 0, s, float("-inf"))
        else:
            s += mvals.to(tl.float32)
    if CHECK_KEYS:
        s = tl.where(offs_n[None, :] < seq.len_k, s, float("-inf"))
    if CHECK_POS and WINDOW:
        ok = (dist >= -mods.win_left) & (dist <= mods.win_right)
        if CAUSAL:
            ok = ok & (dist <= 0)
        s = tl.where(ok, s, float("-inf"))
    elif CHECK_POS and CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + seq.shift, s, float("-inf"))
    return s, cap_grad


@triton.jit
def _softmax_step(m_i, s):
    """One online-softmax step over a score tile s: (m_new, p = exp(s - m_new), alpha = exp(m_i - m_new))."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN from -inf - -inf
    p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)  # a NaN score: p, then l, NaN
    alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
    return m_new, p, alpha


@triton.jit
def _load_rows(Xb, offs, offs_d, stride_n, seqlen, D, CHECK: tl.constexpr, UPCAST: tl.constexpr):
    """The (len(offs), BLOCK_D) tile of rows offs of a (seqlen, D) matrix at Xb (head-dim stride 1); rows past
    seqlen (CHECK) and columns past D read 0."""
    ok = offs_d[None, :] < D
    if CHECK:
        ok = ok & (offs[:, None] < seqlen)
    x = tl.load(Xb + offs[:, None] * stride_n + offs_d[None, :], mask=ok, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_block(Kb, Vb, kv_str, first, i, n_lo, jump, offs_d, seq, D, BLOCK_N: tl.constexpr, STAGE: tl.constexpr,
               WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    """(offs_n, k, v) of key block i of STAGE (see _stage_blocks); keys past len_k read 0 in STAGE 2."""
    offs_n = _block_start(first, i, n_lo, jump, BLOCK_N, STAGE, WINDOW) + tl.arange(0, BLOCK_N)
    k = _load_rows(Kb, offs_n, offs_d, kv_str.n, seq.len_k, D, STAGE == 2, UPCAST)
    v = _load_rows(Vb, offs_n, offs_d, kv_str.n, seq.len_k, D, STAGE == 2, UPCAST)
    return offs_n, k, v


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, Kb, Vb, Mb, kv_str, m_str, drop, drop_base, mods, slope, qk_scale, start_m,
                    offs_m, offs_d, lo, hi, seq, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGE: tl.constexpr,
                    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of one query block over its key blocks of STAGE (see _key_range) within keys [lo, hi)."""
    lo, s1_lo, s1_hi, hi = _key_range(start_m, lo, hi, seq, mods, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    first, count, n_lo, jump = _stage_blocks(lo, s1_lo, s1_hi, hi, BLOCK_N, STAGE, WINDOW, True)
    for i in range(0, count):
        offs_n, k, v = _key_block(Kb, Vb, kv_str, first, i, n_lo, jump, offs_d, seq, D, BLOCK_N, STAGE, WINDOW, UPCAST)
        s, _ = _scores(q, k, offs_m, offs_n, seq, Mb, m_str, qk_scale, mods, slope, MASK_KIND, CAUSAL, STAGE == 2,
                       STAGE == 2, WINDOW, SOFTCAP, ALIBI, IEEE)
        m_i, p, alpha = _softmax_step(m_i, s)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        if DROPOUT:
            p = tl.where(_keep(drop, drop_base, offs_m, offs_n), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_i


# Triton makes an int argument equal to 1 a compile-time constant (and marks one divisible by 16): MHA (GROUP = 1),
# decoding (Nq = 1), bottom-right causal calls and queries of one row block (num_m_blocks = 1) would each run a
# build of their own, which the resource check (benchmarks/resource_check.py, from compile_targets()) never
# compiles. These arguments stay plain ints, so what runs is what the check compiled; they only bound loops and
# masks, where a constant saves little.
_NOT_SPECIALIZED = ("GROUP", "Nq", "Nk", "bottom_right", "num_m_blocks")


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_fwd(
    Q, K, V,  # q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D); varlen: (total, H, D) read with batch stride 0
    Mask,  # bool (as uint8) or float bias read through broadcast strides (stride 0 on size-1 dims); unused if none
    Out,  # output (B, Hq, Nq, D) in q's dtype, or the fp32 partial outputs (splits, B, Hq, Nq, D) of split-KV
    Lse,  # lse (B, Hq, Nq) fp32 natural log (varlen (Hq, total_q)), or per-split partial lse
    CuQ, CuK,  # int32 cu_seqlens (B + 1) of varlen; unused otherwise
    Alibi,  # fp32 ALiBi slopes (Hq,) or (B, Hq), read through mods; if ALIBI
    q_str: Strides, kv_str: Strides,  # of Q; of K and V (one layout for both)
    o_str: SplitStrides, m_str: MaskStrides, l_str: SplitStrides,  # of Out, Mask, Lse
    drop: Dropout, mods: Mods,
    GROUP,  # query heads per KV head (Hq // Hkv)
    Nq, Nk, D,  # sequence lengths (varlen: unused, read from cu_seqlens), head dim (<= BLOCK_D)
    qk_scale,  # the score scale (scores stay in natural units until the max is subtracted)
    bottom_right,  # 1: causal diagonal aligned to the bottom-right corner (shift Nk - Nq), 0: top-left
    split_lo,  # first key of split 0 (a multiple of BLOCK_N): the window's first key block; 0 when not split
    keys_per_split,  # keys per split-KV program (a multiple of BLOCK_N); >= Nk when not split
    num_m_blocks,  # query blocks per (sequence, head): grid axis 0 runs over (split, query block)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes; BLOCK_D = pow2 >= D
    MASK_KIND: tl.constexpr,  # MASK_NONE, MASK_BOOL or MASK_BIAS
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,  # the variants in mods
    UPCAST: tl.constexpr,  # interpreter only: fp32 dot operands (its bf16 arithmetic is broken)
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots, no TF32
):
    # grid (splits * query blocks, Hq, B)
    start_m = (tl.program_id(0) % num_m_blocks) * BLOCK_M
    split = tl.program_id(0) // num_m_blocks
    h, b, seq = _sequence(CuQ, CuK, Nq, Nk, bottom_right, VARLEN)
    if start_m >= seq.len_q:  # varlen: past this sequence's end
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_start = seq.q_start.to(tl.int64)
    q = _load_rows(Q + b * q_str.b + h * q_str.h + q_start * q_str.n, offs_m, offs_d, q_str.n, seq.len_q, D, True,
                   UPCAST)
    kv_off = b * kv_str.b + (h // GROUP) * kv_str.h + seq.k_start.to(tl.int64) * kv_str.n
    Mb = Mask + b * m_str.b + h * m_str.h
    drop_base = b * drop.b_stride + h * drop.h_stride + q_start * drop.n_stride + seq.k_start
    lo = split_lo + split * keys_per_split  # this program's keys: its split
    hi = lo + keys_per_split
    slope = tl.load(Alibi + b * mods.alibi_b + h * mods.alibi_h) if ALIBI else 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for stage in tl.static_range(1, 3):  # the key blocks every row sees whole, then the diagonal / window edges
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K + kv_off, V + kv_off, Mb, kv_str, m_str, drop, drop_base,
                                        mods, slope, qk_scale, start_m, offs_m, offs_d, lo, hi, seq, D, BLOCK_M,
                                        BLOCK_N, stage, MASK_KIND, CAUSAL, DROPOUT, WINDOW, SOFTCAP, ALIBI, UPCAST,
                                        IEEE)

    seen = l_i != 0.0  # a row that saw no key: output exactly 0 (even past a NaN of v), lse -inf; l NaN: NaN
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    if DROPOUT:
        out = out * drop.inv_keep
    # m + log(l) in fp64 (per row, cheap); a +inf score gives lse +inf (and a NaN output)
    lse = tl.where(seen, (m_i.to(tl.float64) + tl.math.log2(l_safe).to(tl.float64) * LN2).to(tl.float32),
                   float("-inf"))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    rows = (seq.q_start + offs_m).to(tl.int64)
    Ob = Out + split * o_str.split + b * o_str.b + h * o_str.h
    st_row = _lt(offs_m, seq.len_q)  # the load mask of q, recomputed (see _lt)
    tl.store(Ob + rows[:, None] * o_str.n + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=st_row[:, None] & _lt(offs_d[None, :], D))
    tl.store(Lse + split * l_str.split + b * l_str.b + h * l_str.h + rows * l_str.n, lse, mask=st_row)


@triton.jit(do_not_specialize=("R", "num_splits"))  # one build whatever the row and split counts
def _split_combine(
    OPart,  # fp32 (splits, R, D) normalised partial outputs, R = B*Hq*Nq rows
    LPart,  # fp32 (splits, R) partial lse (natural log, -inf where a split saw no key)
    Out,  # (R, D) output in q's dtype
    Lse,  # (R,) fp32 lse
    R, D, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) * out_s, lse = log(sum_s exp(lse_s)): exact merge of split-KV partials."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(LPart + s * R + rows, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(num_splits):
        w = tl.exp(tl.load(LPart + s * R + rows, mask=row_ok, other=float("-inf")) - m_safe)
        l += w
        acc += w[:, None] * tl.load(OPart + s * R * D + rows[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    seen = l > 0.0
    l_safe = tl.where(seen, l, 1.0)
    tl.store(Out + rows[:, None] * D + offs_d[None, :], (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=ok)
    tl.store(Lse + rows, tl.where(seen, m_safe + tl.log(l_safe), float("-inf")), mask=row_ok)


@triton.jit
def _keep_mask_kernel(
    Keep,  # uint8 (numel,) output: 1 = keep
    numel, seed, dropout_p,
    BLOCK: tl.constexpr,
):
    """The attention kernels' dropout stream over linear score indices 0..numel-1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    keep = tl.rand(seed, offs) >= dropout_p
    tl.store(Keep + offs, keep.to(tl.uint8), mask=offs < numel)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=("N",))  # one build whatever the row count (1 in decoding)
def _bwd_preprocess(
    O, DO,  # output and its gradient, (B, H, N, D) by strides, head-dim stride 1 (varlen: B = 1, N = total_q)
    DLse,  # gradient of lse (B, H, N) by strides
    Delta_out,  # output laid out like lse (fp64 for fp32 inputs, else fp32): Delta = rowsum(dO * O) - dlse
    o_str: Strides, do_str: Strides, g_str: Strides, l_str: Strides,  # of O, DO, DLse, Delta (those of lse)
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)  # grid (row blocks, H, B)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    o = _load_rows(O + b * o_str.b + h * o_str.h, offs_m, offs_d, o_str.n, N, D, True, True)
    do = _load_rows(DO + b * do_str.b + h * do_str.h, offs_m, offs_d, do_str.n, N, D, True, True)
    dlse = tl.load(DLse + b * g_str.b + h * g_str.h + offs_m * g_str.n, mask=row_ok, other=0.0)
    # fp64 row sums (O(N*D) work, negligible): the dP - Delta of dS cancels as well as dP's own rounding allows
    Delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1) - dlse.to(tl.float64)
    tl.store(Delta_out + b * l_str.b + h * l_str.h + offs_m * l_str.n, Delta.to(Delta_out.dtype.element_ty),
             mask=row_ok)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _bwd_row_stats(
    Q, K, Mask,  # as in _attn_fwd
    Lse,  # (B, Hq, Nq) fp32 natural lse of the forward
    RowM, RowC,  # outputs laid out like Lse: the backward's P = exp((S - row_m) - row_c)
    CuQ, CuK, Alibi,
    q_str: Strides, kv_str: Strides, m_str: MaskStrides,  # of Q, K, Mask
    l_str: Strides,  # of Lse, RowM and RowC
    mods: Mods,
    GROUP, Nq, Nk, D, qk_scale, bottom_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """(row_m, row_c) = (lse, 0), or (row max, log(row sum)) on a row with |lse| >= LSE_EXACT: there the float32
    lse = m + log(l) has lost log(l) (every visible key carries a huge bias, e.g. finfo.min), so m and l are
    recomputed from the scores (keys as in _attn_fwd, no dropout: l counts dropped entries too). Only a block
    holding such a row reads Q and K."""
    start_m = tl.program_id(0) * BLOCK_M  # grid (query blocks, Hq, B)
    h, b, seq = _sequence(CuQ, CuK, Nq, Nk, bottom_right, VARLEN)
    if start_m >= seq.len_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seq.len_q
    rows = (seq.q_start + offs_m).to(tl.int64)
    lse_off = b * l_str.b + h * l_str.h + rows * l_str.n
    lse = tl.load(Lse + lse_off, mask=row_ok, other=0.0)
    # an lse of -inf (no key), +inf (a +inf score) or NaN stays row_m (_bwd_tile handles it)
    exact = (tl.abs(lse) >= LSE_EXACT) & (tl.abs(lse) < float("inf"))
    row_m = lse
    row_c = tl.zeros([BLOCK_M], tl.float32)
    if tl.max(exact.to(tl.int32), 0) > 0:
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + b * q_str.b + h * q_str.h + seq.q_start.to(tl.int64) * q_str.n, offs_m, offs_d, q_str.n,
                       seq.len_q, D, True, UPCAST)
        Kb = K + b * kv_str.b + (h // GROUP) * kv_str.h + seq.k_start.to(tl.int64) * kv_str.n
        Mb = Mask + b * m_str.b + h * m_str.h
        lo, _, _, hi = _key_range(start_m, 0, seq.len_k, seq, mods, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        slope = tl.load(Alibi + b * mods.alibi_b + h * mods.alibi_h) if ALIBI else 0.0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):  # both stages, every tile tested
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(Kb, offs_n, offs_d, kv_str.n, seq.len_k, D, True, UPCAST)
            s, _cap_grad = _scores(q, k, offs_m, offs_n, seq, Mb, m_str, qk_scale, mods, slope, MASK_KIND, CAUSAL, True,
                                   True, WINDOW, SOFTCAP, ALIBI, IEEE)
            m_i, p, alpha = _softmax_step(m_i, s)
            l_i = l_i * alpha + tl.sum(p, 1)
        row_m = tl.where(exact, m_i, lse)
        row_c = tl.where(exact, tl.math.log2(l_i) * LN2, 0.0)
    tl.store(RowM + lse_off, row_m, mask=row_ok)
    tl.store(RowC + lse_off, row_c, mask=row_ok)


@triton.jit
def _bwd_dp(do, v, do_rows, v_rows, do_ok, v_ok, D, IEEE: tl.constexpr):
    """dP = dO V^T of a (BLOCK_M, BLOCK_N) tile; ``do``/``v`` the loaded tiles, ``do_rows``/``v_rows`` pointers to
    their rows (with ``do_ok``/``v_ok`` the rows in bounds). 16-bit inputs: one MMA dot. fp32 (IEEE): in fp64,
    so that dP - Delta of a one-hot row cancels to -dlse as in torch's fp32 (Delta is fp64 too). Past a head
    dim of 64 the fp64 sum runs over 64-column chunks re-read from memory (L1/L2 hits): whole 128- or
    256-long fp64 rows in registers spill hundreds of bytes (benchmarks/resource_check.py)."""
    if IEEE:
        if do.shape[1] > 64:
            dP = tl.zeros([do.shape[0], v.shape[0]], tl.float64)
            for c in range(0, do.shape[1], 64):
                cols = c + tl.arange(0, 64)
                a = tl.load(do_rows[:, None] + cols[None, :], mask=do_ok[:, None] & (cols[None, :] < D), other=0.0)
                b = tl.load(v_rows[:, None] + cols[None, :], mask=v_ok[:, None] & (cols[None, :] < D), other=0.0)
                dP += tl.dot(a.to(tl.float64), tl.trans(b).to(tl.float64))
        else:
            dP = tl.dot(do.to(tl.float64), tl.trans(v).to(tl.float64))
    else:
        dP = _dot(do, tl.trans(v), IEEE)
    return dP


@triton.jit
def _bwd_tile(q, k, v, do, DOb, Vb, q_str, kv_str, D, row_m, row_c, Delta_i, offs_m, offs_n, seq, Mb, m_str, qk_scale,
              mods, slope, drop, drop_base, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              STAGE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              IEEE: tl.constexpr):
    """P (dropped and rescaled, for dV), dS (the bias gradient) and dS_qk (dS times the softcap's derivative,
    for dQ and dK) of one (BLOCK_M, BLOCK_N) tile, rows offs_m and keys offs_n of the tiles q, do (at DOb) and
    k, v (at Vb); P = exp((S - row_m) - row_c), (row_m, row_c) from _bwd_row_stats ((lse, 0) on an ordinary
    row), dP = dO V^T by _bwd_dp. STAGE as in _stages.

    Keys past the sequence end need no mask here: their K and V rows load as 0 (so they add nothing
    to dQ), their dK/dV/dbias are never stored, and P = exp2(min(S - row_m - row_c, 0)) stays finite."""
    s, cap_grad = _scores(q, k, offs_m, offs_n, seq, Mb, m_str, qk_scale, mods, slope, MASK_KIND, CAUSAL, STAGE == 2,
                          False, WINDOW, SOFTCAP, ALIBI, IEEE)
    m_safe = tl.where(row_m == float("-inf"), float("inf"), row_m)  # a row that saw no key: P = 0
    # S - row_m before the LOG2E scaling (no overflow for an extreme finite bias); NaN propagates
    P = tl.math.exp2(tl.minimum(((s - m_safe[:, None]) - row_c[:, None]) * LOG2E, 0.0,
                                propagate_nan=tl.PropagateNan.ALL))
    dP = _bwd_dp(do, v, DOb + offs_m * q_str.n, Vb + offs_n * kv_str.n, offs_m < seq.len_q, offs_n < seq.len_k, D,
                 IEEE)
    if DROPOUT:
        keep = _keep(drop, drop_base, offs_m, offs_n)
        P_drop = tl.where(keep, P * drop.inv_keep, 0.0)
        dP = tl.where(keep, dP * drop.inv_keep, 0.0)
    else:
        P_drop = P
    dS = (P * (dP - Delta_i[:, None])).to(tl.float32)
    if SOFTCAP:
        dS_qk = dS * cap_grad
    else:
        dS_qk = dS
    return P_drop, dS, dS_qk


@triton.jit
def _load_q_side(Qb, DOb, RowMb, RowCb, Deltab, offs_m, offs_d, q_str, l_str, seq, D, UPCAST: tl.constexpr):
    """The tiles of query rows offs_m the backward needs: q, do, row_m, row_c, Delta."""
    row_ok = offs_m < seq.len_q
    q = _load_rows(Qb, offs_m, offs_d, q_str.n, seq.len_q, D, True, UPCAST)
    do = _load_rows(DOb, offs_m, offs_d, q_str.n, seq.len_q, D, True, UPCAST)
    row_m = tl.load(RowMb + offs_m * l_str.n, mask=row_ok, other=float("-inf"))
    row_c = tl.load(RowCb + offs_m * l_str.n, mask=row_ok, other=0.0)
    Delta_i = tl.load(Deltab + offs_m * l_str.n, mask=row_ok, other=0.0)
    return q, do, row_m, row_c, Delta_i


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Qb, DOb, RowMb, RowCb, Deltab, DQb, DBb, Vb, Mb, q_str, kv_str, dq_str, l_str, m_str,
                    drop, drop_base, mods, slope, qk_scale, start_n, offs_n, offs_d, seq, D, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, STAGE: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DBIAS: tl.constexpr, WINDOW: tl.constexpr,
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dK, dV of the key block at start_n accumulated over the query blocks of one query head that see it in
    STAGE (see _query_range); base pointers offset to this (sequence, head)."""
    lo, s1_lo, s1_hi, hi = _query_range(start_n, seq, mods, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    first, count, n_lo, jump = _stage_blocks(lo, s1_lo, s1_hi, hi, BLOCK_M, STAGE, WINDOW, False)
    for i in range(0, count):
        start_m = _block_start(first, i, n_lo, jump, BLOCK_M, STAGE, WINDOW)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, row_m, row_c, Delta_i = _load_q_side(Qb, DOb, RowMb, RowCb, Deltab, offs_m, offs_d, q_str, l_str, seq,
                                                    D, UPCAST)
        P_drop, dS, dS_qk = _bwd_tile(q, k, v, do, DOb, Vb, q_str, kv_str, D, row_m, row_c, Delta_i, offs_m, offs_n,
                                      seq, Mb, m_str, qk_scale, mods, slope, drop, drop_base, MASK_KIND, CAUSAL,
                                      DROPOUT, STAGE, WINDOW, SOFTCAP, ALIBI, IEEE)
        dv += _dot(tl.trans(P_drop.to(do.dtype)), do, IEEE)  # dV += P_drop^T dO
        dk += _dot(tl.trans(dS_qk.to(q.dtype)), q, IEEE)  # dK += dS'^T Q (times scale at the end)
        if DBIAS:  # DB is laid out as the dropout offsets: (B, Hq, Nq, Nk) contiguous
            tl.store(DBb + offs_m[:, None] * drop.n_stride + offs_n[None, :], dS,
                     mask=(offs_m[:, None] < seq.len_q) & (offs_n[None, :] < seq.len_k))
        if ATOMIC_DQ:
            dq = _dot(dS_qk.to(k.dtype), k, IEEE) * qk_scale  # dQ += dS' K * scale
            tl.atomic_add(DQb + offs_m[:, None] * dq_str.n + offs_d[None, :], dq,
                          mask=(offs_m[:, None] < seq.len_q) & (offs_d[None, :] < D))
    return dk, dv


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _bwd_dkdv(
    Q, K, V, Mask, DO,  # as in _attn_fwd; DO: gradient of the output, laid out as Q
    RowM, RowC, Delta,  # (B, Hq, Nq) fp32 row_m, row_c (_bwd_row_stats), Delta (fp64 for fp32 inputs), same strides
    DQ,  # fp32 dQ accumulator (zeros) when ATOMIC_DQ; unused otherwise
    DK, DV,  # outputs, k's / v's dtype
    DB,  # fp32 (B, Hq, Nq, Nk) contiguous dS: the bias gradient before its broadcast reduction, when DBIAS
    CuQ, CuK,  # varlen cu_seqlens
    Alibi,  # ALiBi slopes, as in _attn_fwd
    q_str: Strides, kv_str: Strides, m_str: MaskStrides,  # of Q and DO; of K and V; of Mask
    l_str: Strides, dq_str: Strides, dk_str: Strides,  # of RowM, RowC and Delta; of DQ; of DK and DV
    drop: Dropout, mods: Mods,  # the dropout stream (its strides also DB's), the variants
    GROUP, Nq, Nk, D,
    qk_scale,  # the score scale, also the factor of dK and dQ (scores in natural units, see _scores)
    bottom_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_N keys per program
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also accumulate dQ with fp32 atomics (the non-deterministic path)
    DBIAS: tl.constexpr,  # write dS to DB
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N  # grid (key blocks, Hkv, B)
    hk, b, seq = _sequence(CuQ, CuK, Nq, Nk, bottom_right, VARLEN)
    if start_n >= seq.len_k:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = b * kv_str.b + hk * kv_str.h + seq.k_start.to(tl.int64) * kv_str.n
    k = _load_rows(K + kv_off, offs_n, offs_d, kv_str.n, seq.len_k, D, True, UPCAST)
    v = _load_rows(V + kv_off, offs_n, offs_d, kv_str.n, seq.len_k, D, True, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_start = seq.q_start.to(tl.int64)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_side = b * q_str.b + h * q_str.h + q_start * q_str.n
        l_side = b * l_str.b + h * l_str.h + q_start * l_str.n
        DQb = DQ + b * dq_str.b + h * dq_str.h + q_start * dq_str.n
        Mb = Mask + b * m_str.b + h * m_str.h
        drop_base = b * drop.b_stride + h * drop.h_stride + q_start * drop.n_stride + seq.k_start
        slope = tl.load(Alibi + b * mods.alibi_b + h * mods.alibi_h) if ALIBI else 0.0
        # the diagonal and window-edge blocks first, then those every row of which sees the whole key block
        for stage in tl.static_range(2, 0, -1):
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q + q_side, DO + q_side, RowM + l_side, RowC + l_side,
                                     Delta + l_side, DQb, DB + drop_base, V + kv_off, Mb, q_str, kv_str, dq_str, l_str,
                                     m_str, drop, drop_base, mods, slope, qk_scale, start_n, offs_n, offs_d, seq, D,
                                     BLOCK_M, BLOCK_N, stage, MASK_KIND, CAUSAL, DROPOUT, ATOMIC_DQ, DBIAS, WINDOW,
                                     SOFTCAP, ALIBI, UPCAST, IEEE)
    out_off = b * dk_str.b + hk * dk_str.h + (seq.k_start + offs_n).to(tl.int64)[:, None] * dk_str.n + offs_d[None, :]
    st_ok = _lt(offs_n[:, None], seq.len_k) & _lt(offs_d[None, :], D)  # the load mask of k, recomputed (see _lt)
    tl.store(DK + out_off, (dk * qk_scale).to(DK.dtype.element_ty), mask=st_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=st_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, row_m, row_c, Delta_i, DOb, Kb, Vb, Mb, q_str, kv_str, m_str, drop, drop_base, mods, slope,
                  qk_scale, start_m, offs_m, offs_d, seq, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  STAGE: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, UPCAST: tl.constexpr,
                  IEEE: tl.constexpr):
    """dQ of one query block accumulated over its key blocks of STAGE (see _key_range)."""
    lo, s1_lo, s1_hi, hi = _key_range(start_m, 0, seq.len_k, seq, mods, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    first, count, n_lo, jump = _stage_blocks(lo, s1_lo, s1_hi, hi, BLOCK_N, STAGE, WINDOW, True)
    for i in range(0, count):
        offs_n, k, v = _key_block(Kb, Vb, kv_str, first, i, n_lo, jump, offs_d, seq, D, BLOCK_N, STAGE, WINDOW, UPCAST)
        _, _, dS_qk = _bwd_tile(q, k, v, do, DOb, Vb, q_str, kv_str, D, row_m, row_c, Delta_i, offs_m, offs_n, seq, Mb,
                                m_str, qk_scale, mods, slope, drop, drop_base, MASK_KIND, CAUSAL, DROPOUT, STAGE,
                                WINDOW, SOFTCAP, ALIBI, IEEE)
        dq += _dot(dS_qk.to(k.dtype), k, IEEE)  # dQ += dS' K
    return dq


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _bwd_dq(
    Q, K, V, Mask, DO, RowM, RowC, Delta,  # as in _bwd_dkdv
    DQ,  # output in q's dtype
    CuQ, CuK, Alibi,
    q_str: Strides, kv_str: Strides, m_str: MaskStrides, l_str: Strides, dq_str: Strides,  # as in _bwd_dkdv
    drop: Dropout, mods: Mods,
    GROUP, Nq, Nk, D, qk_scale, bottom_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_M queries per program
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M  # grid (query blocks, Hq, B)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    h, b, seq = _sequence(CuQ, CuK, Nq, Nk, bottom_right, VARLEN)
    if start_m >= seq.len_q:
        return
    offs_d = tl.arange(0, BLOCK_D)
    q_start = seq.q_start.to(tl.int64)
    q_side = b * q_str.b + h * q_str.h + q_start * q_str.n
    l_side = b * l_str.b + h * l_str.h + q_start * l_str.n
    q, do, row_m, row_c, Delta_i = _load_q_side(Q + q_side, DO + q_side, RowM + l_side, RowC + l_side,
                                                Delta + l_side, offs_m, offs_d, q_str, l_str, seq, D, UPCAST)
    kv_off = b * kv_str.b + (h // GROUP) * kv_str.h + seq.k_start.to(tl.int64) * kv_str.n
    Mb = Mask + b * m_str.b + h * m_str.h
    drop_base = b * drop.b_stride + h * drop.h_stride + q_start * drop.n_stride + seq.k_start
    slope = tl.load(Alibi + b * mods.alibi_b + h * mods.alibi_h) if ALIBI else 0.0
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for stage in tl.static_range(1, 3):
        dq = _bwd_dq_inner(dq, q, do, row_m, row_c, Delta_i, DO + q_side, K + kv_off, V + kv_off, Mb, q_str, kv_str,
                           m_str, drop, drop_base, mods, slope, qk_scale, start_m, offs_m, offs_d, seq, D, BLOCK_M,
                           BLOCK_N, stage, MASK_KIND, CAUSAL, DROPOUT, WINDOW, SOFTCAP, ALIBI, UPCAST, IEEE)
    rows = (seq.q_start + offs_m).to(tl.int64)
    tl.store(DQ + b * dq_str.b + h * dq_str.h + rows[:, None] * dq_str.n + offs_d[None, :],
             (dq * qk_scale).to(DQ.dtype.element_ty), mask=_lt(offs_m[:, None], seq.len_q) & _lt(offs_d[None, :], D))


# ----------------------------------------------------------------------------- configurations


def _config(kind: str, d: int, dtype: torch.dtype, device: torch.device, dropout: bool,
            masked: bool, mods: bool = False, operands: tuple[torch.Tensor, ...] = ()) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a pass on this device (``mods``: a score variant is on).
    ``operands``: the call's tensors, whose alignment (_strides_aligned) is read only where the pass has a tile of
    its own for unaligned calls."""
    if INTERPRET:
        return _INTERPRETER_CONFIG
    bucket = _bucket(d)
    unaligned_tile = _has_unaligned_tile(kind, bucket, dtype, dropout, masked, mods)
    assert operands or not unaligned_tile, f"the {kind} pass needs its operands to choose its tile"
    aligned = not unaligned_tile or _strides_aligned(*operands)
    return _gpu_config(kind, bucket, dtype, _generation(device), dropout, masked, mods, aligned)


def _strides_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every stride (but the unit last one) and data pointer of ``tensors`` is a multiple of 16 (elements,
    bytes): Triton then runs its build with the divisibility hints that the tile tables are checked in."""
    return all(t.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _generation(device: torch.device) -> int:
    """The tile tables' GPU generation: 9 from sm_90 on, else 8."""
    return 9 if gpu_facts(device)[0] >= 9 else 8


def _rows(kernel: str, d: int) -> int:
    """Rows per program of a row kernel ("preprocess": _bwd_preprocess, "combine": _split_combine)."""
    return _ROWS_BLOCK_INTERPRET if INTERPRET else _rows_block(kernel, _bucket(d))


def _row_stats_config(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of _bwd_row_stats (its key loop runs only on rows with a huge lse)."""
    if INTERPRET:
        return _INTERPRETER_CONFIG[:3]
    return _ROW_STATS_CONFIGS[_BUCKETS.index(_bucket(d))]


def _launch_options(warps: int, stages: int) -> dict:
    return {} if INTERPRET else {"num_warps": warps, "num_stages": stages}


# ----------------------------------------------------------------------------- the backend interface


# The score variants these kernels serve (dispatch.why_not refuses the others); sinks are joined to (out, lse)
# outside them (registration.join_sinks), their backward taking P from the saved lse.
VARIANTS = frozenset({"window_size", "softcap", "alibi_slopes"})


def why_not(call) -> Optional[str]:
    """None when these kernels can serve ``call`` (a ``dispatch.AttentionCall``), else why not."""
    if call.device.type == "cpu":
        if not INTERPRET:
            return "not a CUDA tensor (Triton runs on CPU only under TRITON_INTERPRET=1, for tests)"
    elif call.device.type != "cuda":
        return f"not a CUDA tensor ({call.device.type})"
    if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {str(call.dtype).replace('torch.', '')} is not supported (float16, bfloat16, float32)"
    if max(call.head_dim, call.head_dim_v) > MAX_HEAD_DIM:
        return f"head dim {max(call.head_dim, call.head_dim_v)} > {MAX_HEAD_DIM}"
    if call.device.type == "cuda" and not INTERPRET:
        major = _generation(call.device)
        d, dropout, masked = max(call.head_dim, call.head_dim_v), call.dropout_p > 0, call.mask is not None
        with_ = " and ".join(f for f, on in (("dropout", dropout), ("a mask", masked)) if on)
        # the backward's passes too: the backend that runs the forward runs the backward
        mods = call.window != (-1, -1) or call.softcap > 0 or call.alibi
        for kind in ("fwd", "decode", "dkdv", "dq"):
            if _gpu_config(kind, _bucket(d), call.dtype, major, dropout, masked, mods) is None:
                return (f"head dim {d} in {str(call.dtype).replace('torch.', '')}" + (f" with {with_}" if with_ else "")
                        + f": no {kind} tile compiles without register spills on sm_{major}0")
        if call.deterministic and call.dtype != torch.float32 and _bucket(d) == 128:
            # seen on an H200 with Triton 3.6: dK off by 2.5x the test rule's bound at B=4, H=16, N=4096, d=128
            # (bf16, MHA, no mask, dK/dV tile (32, 64, 8, 2) without the dQ atomics); it passed at B=1 with GQA
            # (Hq=4, Hkv=2) and at N=129, so neither GQA nor small sizes are known to be safe
            return ("deterministic backward of 16-bit head dims 65-128: wrong dK seen on a GPU (H200, Triton "
                    "3.6); refused until fixed (deterministic=False, or the reference backend)")
    if call.heads_q > 65535 or call.batch > 65535:
        return f"Hq = {call.heads_q}, B = {call.batch}: each must be <= 65535 (CUDA grid axes 1 and 2)"
    return None


def _mask_args(attn_mask: Optional[torch.Tensor], like: torch.Tensor):
    """(tensor, MaskStrides with 0 on broadcast dims, kind) of a 4-D mask; never expanded or copied."""
    if attn_mask is None:
        return like, MaskStrides(0, 0, 0, 0), MASK_NONE.value
    strides = MaskStrides(*(0 if attn_mask.shape[i] == 1 else attn_mask.stride(i) for i in range(4)))
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8), strides, MASK_BOOL.value
    return attn_mask, strides, MASK_BIAS.value


def _strides(t: torch.Tensor, varlen: bool) -> Strides:
    """Strides of (B, H, N, D) as is; of packed (total, H, D) with batch stride 0 (cu_seqlens)."""
    s = t.stride()
    return Strides(0, s[1], s[0]) if varlen else Strides(*s[:3])


def _one_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) when they share strides with a unit head-dim stride (the kernels read both through one stride
    set), else contiguous copies of both. Only strides of size-1 dims may still differ: never used."""
    if a.stride() == b.stride() and a.stride(-1) == 1:
        return a, b
    return a.contiguous(), b.contiguous()


class _Mods:
    """The kernels' arguments of the score variants (``registration.ScoreMods`` or None): ``alibi`` the slopes
    tensor (or any tensor, unused), ``args`` the kernels' ``Mods`` (an unbounded window side as ``unbounded`` =
    Nq + Nk, which no |p(i) - j| reaches), ``flags`` the constexprs."""

    def __init__(self, mods, b: int, hq: int, unbounded: int, like: torch.Tensor):
        if mods is None:  # plain attention
            self.left = self.right = unbounded
            self.alibi, self.args, self.flags = like, Mods(0, 0, unbounded, unbounded, 0.0), _NO_MOD_FLAGS
            return
        left, right = mods.window_left, mods.window_right
        self.left = unbounded if left < 0 else min(left, unbounded)
        self.right = unbounded if right < 0 else min(right, unbounded)
        softcap = float(mods.softcap)
        slopes = mods.alibi_slopes
        if slopes is None:
            self.alibi, alibi_strides = like, (0, 0)
        else:
            if slopes.dtype != torch.float32 or slopes.device != like.device or slopes.shape not in ((hq,), (b, hq)):
                raise ValueError(f"alibi_slopes: expected float32 ({hq},) or ({b}, {hq}) on {like.device}, got "
                                 f"{str(slopes.dtype).replace('torch.', '')} {tuple(slopes.shape)} on {slopes.device}")
            self.alibi = slopes
            alibi_strides = (0, slopes.stride(0)) if slopes.dim() == 1 else tuple(slopes.stride())
        self.args = Mods(*alibi_strides, self.left, self.right, softcap)
        self.flags = dict(WINDOW=left >= 0 or right >= 0, SOFTCAP=softcap > 0, ALIBI=slopes is not None)


_NO_MOD_FLAGS = {"WINDOW": False, "SOFTCAP": False, "ALIBI": False}


def _dropout(seed: int, p: float, b: int, h: int, n: int) -> Dropout:
    """The kernels' Dropout: the stream of (seed, p) over scores laid out with strides (b, h, n)."""
    return Dropout(seed, p, 1.0 / (1.0 - p), b, h, n)


def _key_span(nq: int, nk: int, causal: bool, bottom_right: bool, left: int, right: int) -> tuple[int, int]:
    """Keys [lo, hi) that some query of a dense call sees (before any mask): the causal and window bounds of
    the first and last query (left / right as _Mods normalises them). hi == lo when no query sees a key."""
    shift = nk - nq if bottom_right else 0
    lo = max(0, shift - left)
    hi = min(nk, nq - 1 + shift + right + 1)
    if causal:
        hi = min(hi, nq + shift)
    return lo, max(lo, hi)


def _num_splits(b: int, hq: int, nq: int, nk: int, block_m: int, block_n: int, device) -> int:
    """Split-KV count for decode: enough programs to fill the GPU, each split >= 4 key blocks. ``nk``: the keys
    the queries see (inside a sliding window, its span)."""
    if INTERPRET or nq > 16 or nk < 1024:
        return 1
    programs = b * hq * cdiv(nq, block_m)
    sms = gpu_facts(device)[1]
    if programs >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, programs), nk // (4 * block_n), 128))


def _pad_head_dim(t: torch.Tensor, width: int) -> torch.Tensor:
    """t with its last dim zero-padded to ``width`` (a copy), or t itself."""
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _run_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, *, varlen, cu_q=None, cu_k=None,
                 max_q=None, max_k=None, num_splits=None, mods=None):
    """Launches the forward kernel (and the split-KV combine); returns (out, lse).

    The kernels take one head dim for q, k and v. When v's differs, the narrower side is zero-padded
    to the wider (a copy): zero columns add nothing to q k^T, and zero columns of v give zero output
    columns, cut off here. The scale is the caller's (from q's own head dim)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv:
        w = max(d, dv)
        out, lse = _run_forward(_pad_head_dim(q, w), _pad_head_dim(k, w), _pad_head_dim(v, w), attn_mask, seed, scale,
                                causal, bottom_right, dropout_p, varlen=varlen, cu_q=cu_q, cu_k=cu_k, max_q=max_q,
                                max_k=max_k, num_splits=num_splits, mods=mods)
        return out[..., :dv].contiguous(), lse
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = _one_layout(k, v)
    out = q.new_empty(q.shape)
    if varlen:
        tq, hq, d = q.shape
        hkv = k.shape[1]
        b, nq, nk = cu_q.numel() - 1, max_q, max_k
        lse = q.new_empty((hq, tq), dtype=torch.float32)
        ls = SplitStrides(0, lse.stride(0), lse.stride(1), 0)
        drop = _dropout(seed, dropout_p, 0, tq * k.shape[0], k.shape[0])
    else:
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        lse = q.new_empty((b, hq, nq), dtype=torch.float32)
        ls = SplitStrides(*lse.stride(), 0)
        drop = _dropout(seed, dropout_p, hq * nq * nk, nq * nk, nk)
        cu_q = cu_k = q  # unused
    os_ = SplitStrides(*_strides(out, varlen), 0)
    kind = "decode" if (nq <= 16 and not INTERPRET) else "fwd"
    vm = _Mods(mods, b, hq, nq + nk, q)
    bm, bn, warps, stages = _config(kind, d, q.dtype, q.device, dropout_p > 0, attn_mask is not None,
                                    any(vm.flags.values()), (q, k, v, out))
    # the keys the queries see (varlen: every key of the longest sequence), split-KV over these alone
    key_lo, key_hi = (0, nk) if varlen else _key_span(nq, nk, causal, bottom_right, vm.left, vm.right)
    split_lo = (key_lo // bn) * bn
    span = max(key_hi - split_lo, 1)
    if num_splits is None:
        num_splits = 1 if varlen else _num_splits(b, hq, nq, span, bm, bn, q.device)
    keys_per_split = cdiv(cdiv(span, num_splits), bn) * bn
    num_splits = cdiv(span, keys_per_split)
    o_dst, l_dst = out, lse
    if num_splits > 1:
        assert not varlen, "split-KV serves dense calls"
        o_dst = q.new_empty((num_splits, b, hq, nq, d), dtype=torch.float32)
        l_dst = q.new_empty((num_splits, b, hq, nq), dtype=torch.float32)
        os_ = SplitStrides(*o_dst.stride()[1:4], o_dst.stride(0))
        ls = SplitStrides(*l_dst.stride()[1:4], l_dst.stride(0))
    mask, ms, mask_kind = _mask_args(attn_mask, q)
    num_m_blocks = cdiv(nq, bm)
    _attn_fwd[(num_m_blocks * num_splits, hq, b)](
        q, k, v, mask, o_dst, l_dst, cu_q, cu_k, vm.alibi, _strides(q, varlen), _strides(k, varlen), os_, ms, ls, drop,
        vm.args, hq // hkv, nq, nk, d, scale, int(bottom_right), split_lo, keys_per_split, num_m_blocks,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_bucket(d), MASK_KIND=mask_kind, CAUSAL=bool(causal),
        DROPOUT=dropout_p > 0, VARLEN=varlen, **vm.flags, UPCAST=INTERPRET, IEEE=q.dtype == torch.float32,
        **_launch_options(warps, stages))
    if num_splits > 1:
        rows, block = b * hq * nq, _rows("combine", d)
        _split_combine[(cdiv(rows, block),)](o_dst, l_dst, out, lse, rows, d, num_splits, BLOCK_M=block,
                                             BLOCK_D=_bucket(d))
    return out, lse


def forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, mods=None):
    """(out (B, Hq, Nq, Dv), lse (B, Hq, Nq) fp32) of ``fusedlayers.attention``; ``mods``: the score variants
    (``registration.ScoreMods``; sinks are not taken here)."""
    with on_device(q.device):
        return _run_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, varlen=False,
                            mods=mods)


def forward_split_kv(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, num_splits: int, mods=None):
    """forward() with an explicit split-KV count over the keys the queries see (tests the decode path where
    the heuristic would not split)."""
    with on_device(q.device):
        return _run_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, varlen=False,
                            num_splits=num_splits, mods=mods)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, causal,
                   bottom_right, dropout_p, mods=None):
    """(out (total_q, Hq, Dv), lse (Hq, total_q)) of ``fusedlayers.attention_varlen``."""
    from fusedlayers.ops import check_cu_seqlens_values  # the op body runs eagerly: values can be read

    check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    with on_device(q.device):
        return _run_forward(q, k, v, None, seed, scale, causal, bottom_right, dropout_p, varlen=True,
                            cu_q=cu_seqlens_q.contiguous(), cu_k=cu_seqlens_k.contiguous(), max_q=max_seqlen_q,
                            max_k=max_seqlen_k, mods=mods)  # the kernels read cu_seqlens[b] at offset b


def _run_backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p,
                  deterministic, bias_grad, *, varlen, cu_q=None, cu_k=None, max_q=None, max_k=None, mods=None):
    lse = lse.contiguous()  # Delta is allocated like lse and written through lse's strides
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv:  # as in _run_forward: the padded out and dout have zero columns, so Delta is unchanged
        w = max(d, dv)
        grads = _run_backward(_pad_head_dim(dout, w), dlse, _pad_head_dim(q, w), _pad_head_dim(k, w),
                              _pad_head_dim(v, w), attn_mask, _pad_head_dim(out, w), lse, seed, scale, causal,
                              bottom_right, dropout_p, deterministic, bias_grad, varlen=varlen, cu_q=cu_q, cu_k=cu_k,
                              max_q=max_q, max_k=max_k, mods=mods)
        return (grads[0][..., :d].contiguous(), grads[1][..., :d].contiguous(), grads[2][..., :dv].contiguous(),
                grads[3])
    q, dout = _one_layout(q, dout)  # the q side: one stride set
    k, v = _one_layout(k, v)  # the kv side
    out = out if out.stride(-1) == 1 else out.contiguous()
    if varlen:
        tq, hq, d = q.shape
        hkv = k.shape[1]
        b, nq, nk = cu_q.numel() - 1, max_q, max_k
        ls = Strides(0, lse.stride(0), lse.stride(1))
        gs = Strides(0, dlse.stride(0), dlse.stride(1))
        drop = _dropout(seed, dropout_p, 0, tq * k.shape[0], k.shape[0])
        pre_b, pre_n = 1, tq  # Delta's rows are independent: one (H, total_q) problem
    else:
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        ls = Strides(*lse.stride())
        gs = Strides(*dlse.stride())
        drop = _dropout(seed, dropout_p, hq * nq * nk, nq * nk, nk)  # its strides: also the bias gradient's dS
        pre_b, pre_n = b, nq
        cu_q = cu_k = q
    qs, ks = _strides(q, varlen), _strides(k, varlen)
    group = hq // hkv
    vm = _Mods(mods, b, hq, nq + nk, q)
    # Delta = rowsum(dO * O) - dlse, laid out like lse; fp64 for fp32 inputs (see _bwd_tile)
    Delta = torch.empty_like(lse, dtype=torch.float64 if q.dtype == torch.float32 else torch.float32)
    block = _rows("preprocess", d)
    _bwd_preprocess[(cdiv(pre_n, block), hq, pre_b)](
        out, dout, dlse, Delta, _strides(out, varlen), qs, gs, ls, pre_n, d, BLOCK_M=block, BLOCK_D=_bucket(d))
    # P = exp((S - row_m) - row_c), laid out like lse: (lse, 0), or the exact (max, log(sum)) of a row whose
    # float32 lse is too coarse (|lse| >= LSE_EXACT; see _bwd_row_stats)
    mask, ms, mask_kind = _mask_args(attn_mask, q)
    row_m, row_c = torch.empty_like(lse), torch.empty_like(lse)
    bm, bn, warps = _row_stats_config(d)
    _bwd_row_stats[(cdiv(nq, bm), hq, b)](
        q, k, mask, lse, row_m, row_c, cu_q, cu_k, vm.alibi, qs, ks, ms, ls, vm.args, group, nq, nk, d, scale,
        int(bottom_right), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_bucket(d), MASK_KIND=mask_kind,
        CAUSAL=bool(causal), VARLEN=varlen, **vm.flags, UPCAST=INTERPRET, IEEE=q.dtype == torch.float32,
        **_launch_options(warps, 1))

    dk = k.new_empty(k.shape)  # contiguous, as dv
    dv = v.new_empty(v.shape)
    dbias = db_buf = None
    if bias_grad:
        # dS per (b, h), zero where causal skipping writes nothing; summed over the bias's broadcast dims below
        db_buf = torch.zeros((b, hq, nq, nk), device=q.device, dtype=torch.float32)
        if tuple(attn_mask.shape) == (b, hq, nq, nk) and attn_mask.dtype == torch.float32:
            dbias = db_buf
    has_mods = any(vm.flags.values())
    atomic = not deterministic and (INTERPRET or _atomic_dq(_bucket(d), q.dtype, has_mods))
    # contiguous: the fp32 accumulator of the atomic path, or dq itself
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else q.new_empty(q.shape)
    common = dict(MASK_KIND=mask_kind, CAUSAL=bool(causal), DROPOUT=dropout_p > 0, VARLEN=varlen, **vm.flags,
                  UPCAST=INTERPRET, IEEE=q.dtype == torch.float32)
    tail = (drop, vm.args, group, nq, nk, d, scale, int(bottom_right))

    bm, bn, warps, stages = _config("dkdv", d, q.dtype, q.device, dropout_p > 0, attn_mask is not None, has_mods,
                                    (q, k, v, dout, dk))
    _bwd_dkdv[(cdiv(nk, bn), hkv, b)](
        q, k, v, mask, dout, row_m, row_c, Delta, dq_acc, dk, dv, db_buf if db_buf is not None else dq_acc, cu_q, cu_k,
        vm.alibi, qs, ks, ms, ls, _strides(dq_acc, varlen), _strides(dk, varlen), *tail, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=_bucket(d), ATOMIC_DQ=atomic, DBIAS=bias_grad, **common, **_launch_options(warps, stages))
    if atomic:
        dq = dq_acc.to(q.dtype)
    else:
        dq = dq_acc
        bm, bn, warps, stages = _config("dq", d, q.dtype, q.device, dropout_p > 0, attn_mask is not None,
                                        has_mods, (q, k, v, dout, dq))
        _bwd_dq[(cdiv(nq, bm), hq, b)](
            q, k, v, mask, dout, row_m, row_c, Delta, dq, cu_q, cu_k, vm.alibi, qs, ks, ms, ls, _strides(dq, varlen),
            *tail, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_bucket(d), **common, **_launch_options(warps, stages))
    if bias_grad and dbias is None:
        dims = [i for i in range(4) if attn_mask.shape[i] == 1]
        dbias = (db_buf.sum(dim=dims, keepdim=True) if dims else db_buf).to(attn_mask.dtype)
    return dq, dk, dv, dbias


def backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p, deterministic,
             bias_grad, mods=None):
    """(dq, dk, dv, dbias or None) of ``fusedlayers.attention``."""
    with on_device(q.device):
        return _run_backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p,
                             deterministic, bias_grad, varlen=False, mods=mods)


def varlen_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, seed,
                    scale, causal, bottom_right, dropout_p, deterministic, mods=None):
    """(dq, dk, dv) of ``fusedlayers.attention_varlen``."""
    from fusedlayers.ops import check_cu_seqlens_values  # the op body runs eagerly: values can be read

    check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    with on_device(q.device):
        dq, dk, dv, _ = _run_backward(dout, dlse, q, k, v, None, out, lse, seed, scale, causal, bottom_right,
                                      dropout_p, deterministic, False, varlen=True, cu_q=cu_seqlens_q.contiguous(),
                                      cu_k=cu_seqlens_k.contiguous(), max_q=max_seqlen_q, max_k=max_seqlen_k,
                                      mods=mods)
    return dq, dk, dv


def dropout_keep_mask(seed: int, shape, dropout_p: float, device) -> torch.Tensor:
    """Bool keep-mask (True = keep) these kernels use: ``shape`` is (B, Hq, Nq, Nk), or (Hq, total_q,
    total_k) for varlen; element at linear index i is ``tl.rand(seed, i) >= dropout_p``."""
    numel = math.prod(shape)
    keep = torch.empty(numel, dtype=torch.uint8, device=device)
    block = _KEEP_MASK_BLOCK_INTERPRET if INTERPRET else _KEEP_MASK_BLOCK
    with on_device(keep.device):
        _keep_mask_kernel[(cdiv(numel, block),)](keep, numel, seed, dropout_p, BLOCK=block,
                                                        **_launch_options(_KEEP_MASK_WARPS, 1))
    return keep.view(torch.bool).view(tuple(shape))

