"""Fused scaled-dot-product attention in Triton: the ``triton`` backend of fusedlayers.

What it computes (FlashAttention-2, tiled, nothing N x N ever stored):
    S = Q K^T * scale + bias  (masked entries -inf),  P = softmax(S),  O = dropout(P) V,
    lse = logsumexp(S) (natural log, -inf on a row that sees no key).
Forward: online softmax over key blocks in base 2 (log2(e) folded into the scale), fp32
accumulation, causal block skipping (top-left and bottom-right alignments), bool / additive
masks read through their broadcast strides (a (B,1,1,Nk) key-padding mask costs no B*H*N*N
memory), GQA/MQA by index (query head h reads KV head h // (Hq // Hkv)), Nq != Nk, dropout
from Triton's Philox ``tl.rand(seed, offset)`` with offset = the linear index of the score in
(B, Hq, Nq, Nk) (varlen: in (Hq, total_q, total_k)), so backward and ``dropout_keep_mask``
regenerate the same mask. Head dims 1..256 are padded to a power-of-two block >= 16 with
masked loads: one kernel source serves every head dim. When v's head dim Dv differs from q's, the
launchers zero-pad the narrower side to the wider (a copy; see _run_forward).
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
      atomics anywhere, bitwise reproducible; also 16-bit head dims > 128 on a GPU, see _atomic_dq).
    * d(bias): ``_bwd_dkdv`` writes each dS tile once into an fp32 (B, Hq, Nq, Nk) buffer (or
      straight into the gradient when the bias is full size and fp32); torch then sums it over
      the bias's broadcast dims. Deterministic, and it costs what autograd of an expanded bias
      costs; an in-kernel reduction needs atomics (not reproducible) or a second pass.
Decode (Nq <= 16 against Nk >= 1024 on a GPU that the (B*Hq) programs would not fill): split-KV,
each split writes a normalised partial output and its lse, ``_split_combine`` merges them.
varlen: packed (total, H, D) tensors with cu_seqlens; programs past a sequence's end exit.

Dtypes fp16/bf16 (native MMA, fp32 accumulation) and fp32 (``input_precision="ieee"``, no TF32).
Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors, tests only) dot operands are
upcast to fp32 (constexpr ``UPCAST``: the interpreter's bf16 arithmetic is broken) and one
block configuration is used.

Check:      python -m pytest -q tests/test_attention.py tests/test_triton_attention.py -k triton
Benchmark:  python benchmarks/bench_attention.py          (GPU; TFLOP/s beside torch SDPA)
Resources:  compile_targets() lists every (kernel, signature, constexprs) the launchers may pick,
            for benchmarks/resource_check.py (registers, spills, shared memory for sm_80/sm_90a).
Measured:   no GPU was available while writing this file: no speed figure yet.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Decided once at import, as @triton.jit decides it (see /work/shared/CPU-TESTING.md).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): natural lse = base-2 lse * LN2
MAX_HEAD_DIM = 256
MASK_NONE, MASK_BOOL, MASK_BIAS = 0, 1, 2
# |lse| from which the backward recomputes a row's max and sum (_bwd_row_stats): past 4096 the float32 lse
# = m + log(l) keeps log(l) to at most ~2**-11 absolutely, and under a huge bias (finfo.min) not at all
LSE_EXACT = tl.constexpr(4096.0)


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
def _keep(seed, drop_base, offs_m, offs_n, drop_sm, dropout_p):
    """Dropout keep-mask of a (BLOCK_M, BLOCK_N) tile: rand(seed, linear score index) >= p."""
    offs = drop_base + offs_m[:, None].to(tl.int64) * drop_sm + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, shift, mask_base, stride_mm, stride_mn, qk_scale,
            MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, CHECK_CAUSAL: tl.constexpr, CHECK_KEYS: tl.constexpr,
            IEEE: tl.constexpr):
    """S of a (BLOCK_M, BLOCK_N) tile: q k^T * scale + bias (qk_scale = scale), -inf where not allowed.

    Natural units: the callers subtract the row max (or lse) before scaling by log2(e) for exp2, so an
    extreme finite bias (finfo.min, Hugging Face's padding) never overflows to -inf."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if MASK_KIND != 0:
        in_bounds = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
        mvals = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, mask=in_bounds,
                        other=0)
        if MASK_KIND == 1:
            s = tl.where(mvals != 0, s, float("-inf"))
        else:
            s += mvals.to(tl.float32)
    if CHECK_KEYS:
        s = tl.where(offs_n[None, :] < seqlen_k, s, float("-inf"))
    if CAUSAL and CHECK_CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + shift, s, float("-inf"))
    return s


@triton.jit
def _seq_bounds(CuQ, CuK, b, Nq, Nk, VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence b: packed offsets for varlen, else (0, Nq, 0, Nk)."""
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
    return q_start, seqlen_q, k_start, seqlen_k


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd, mask_base, stride_mm, stride_mn,
               seed, drop_base, drop_sm, dropout_p, offs_m, offs_d, D, lo, hi, seqlen_q, seqlen_k, shift, qk_scale,
               BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               CHECK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax over key blocks [lo, hi); CHECK: this range holds the causal diagonal / the last partial block."""
    d_ok = offs_d[None, :] < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = d_ok & (offs_n[:, None] < seqlen_k) if CHECK else d_ok
        k = tl.load(Kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        v = tl.load(Vb + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, shift, mask_base, stride_mm, stride_mn, qk_scale,
                    MASK_KIND, CAUSAL, CHECK, CHECK, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN from -inf - -inf
        p = tl.math.exp2((s - m_safe[:, None]) * 1.4426950408889634)  # a NaN score: p, then l, NaN
        alpha = tl.math.exp2((m_i - m_safe) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        if DROPOUT:
            p = tl.where(_keep(seed, drop_base, offs_m, offs_n, drop_sm, dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V,  # q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D), any strides; varlen: (total, H, D) with batch stride 0
    Mask,  # bool (as uint8) or float bias read through broadcast strides (stride 0 on size-1 dims); unused if none
    Out,  # output (B, Hq, Nq, D) in q's dtype, or the fp32 partial outputs (splits, B, Hq, Nq, D) of split-KV
    Lse,  # lse (B, Hq, Nq) fp32 natural log (varlen (Hq, total_q)), or per-split partial lse
    CuQ, CuK,  # int32 cu_seqlens (B + 1) of varlen; unused otherwise
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q in elements (varlen: stride_qb = 0)
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_mb, stride_mh, stride_mm, stride_mn,  # strides of Mask, 0 on broadcast dims
    stride_ob, stride_oh, stride_on, stride_os,  # strides of Out (the head-dim stride is 1); os: per split
    stride_lb, stride_lh, stride_ln, stride_ls,  # strides of Lse; ls: per split
    drop_sb, drop_sh, drop_sm,  # dropout offset = b*drop_sb + h*drop_sh + (q_start+i)*drop_sm + (k_start+j)
    Hq, GROUP,  # query heads, query heads per KV head (Hq // Hkv)
    Nq, Nk, D,  # sequence lengths (varlen: unused, read from cu_seqlens), head dim (<= BLOCK_D)
    qk_scale,  # the score scale (scores stay in natural units until the max is subtracted)
    bottom_right,  # 1: causal diagonal aligned to the bottom-right corner (shift Nk - Nq), 0: top-left
    seed, dropout_p, inv_keep,  # Philox seed, dropout probability, 1 / (1 - dropout_p)
    keys_per_split,  # keys per split-KV program (a multiple of BLOCK_N); >= Nk when not split
    num_m_blocks,  # query blocks per (sequence, head): grid axis 0 runs over (split, query block)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes; BLOCK_D = pow2 >= D
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool, 2 additive bias
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: fp32 dot operands (its bf16 arithmetic is broken)
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots, no TF32
):
    # grid (splits * query blocks, Hq, B): axes 1 and 2 (<= 65535 each) hold the head and the sequence, so
    # B * Hq is not bounded by one axis' limit
    pid_m = tl.program_id(0) % num_m_blocks
    split = tl.program_id(0) // num_m_blocks
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CuQ, CuK, b, Nq, Nk, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:  # varlen: past this sequence's end
        return
    shift = (seqlen_k - seqlen_q) * bottom_right
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < D

    Qb = Q + b * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qn
    q = tl.load(Qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    Kb = K + b * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kn
    Vb = V + b * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = Mask + b * stride_mb + h * stride_mh
    drop_base = b * drop_sb + h * drop_sh + q_start.to(tl.int64) * drop_sm + k_start

    # Keys of this program: its split, cut at the causal diagonal of its last row.
    lo = split * keys_per_split
    hi = tl.minimum(seqlen_k, lo + keys_per_split)
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + shift)
        mid = tl.minimum(hi, start_m + 1 + shift)  # keys every row of the block sees
    else:
        mid = hi
    mid = tl.maximum(lo, (tl.maximum(mid, 0) // BLOCK_N) * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd, mask_base,
                               stride_mm, stride_mn, seed, drop_base, drop_sm, dropout_p, offs_m, offs_d, D, lo, mid,
                               seqlen_q, seqlen_k, shift, qk_scale, BLOCK_N, MASK_KIND, CAUSAL, DROPOUT, False, UPCAST,
                               IEEE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_kd, stride_vn, stride_vd, mask_base,
                               stride_mm, stride_mn, seed, drop_base, drop_sm, dropout_p, offs_m, offs_d, D, mid, hi,
                               seqlen_q, seqlen_k, shift, qk_scale, BLOCK_N, MASK_KIND, CAUSAL, DROPOUT, True, UPCAST,
                               IEEE)

    seen = l_i != 0.0  # a row that saw no key: output exactly 0 (even past a NaN of v), lse -inf; l NaN: NaN
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    if DROPOUT:
        out = out * inv_keep
    # m + log(l) in fp64 (per row, cheap); a +inf score gives lse +inf (and a NaN output)
    lse = tl.where(seen, (m_i.to(tl.float64) + tl.math.log2(l_safe).to(tl.float64) * 0.6931471805599453
                          ).to(tl.float32), float("-inf"))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    rows = (q_start + offs_m).to(tl.int64)
    Ob = Out + split * stride_os + b * stride_ob + h * stride_oh
    st_row = _lt(offs_m, seqlen_q)  # row_ok and d_ok, recomputed (see _lt)
    tl.store(Ob + rows[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=st_row[:, None] & _lt(offs_d[None, :], D))
    tl.store(Lse + split * stride_ls + b * stride_lb + h * stride_lh + rows * stride_ln, lse, mask=st_row)


@triton.jit
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


@triton.jit
def _bwd_preprocess(
    O, DO,  # output and its gradient, (B, H, N, D) by strides (varlen: B = 1, N = total_q)
    DLse,  # gradient of lse (B, H, N) by strides
    Delta_out,  # output laid out like lse (fp64 for fp32 inputs, else fp32): Delta = rowsum(dO * O) - dlse
    stride_ob, stride_oh, stride_on, stride_od,
    stride_db, stride_dh, stride_dn, stride_dd,  # strides of DO
    stride_gb, stride_gh, stride_gn,  # strides of DLse
    stride_lb, stride_lh, stride_ln,  # strides of Delta (those of lse)
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)  # grid (row blocks, H, B)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd,
                 mask=ok, other=0.0).to(tl.float32)
    dlse = tl.load(DLse + b * stride_gb + h * stride_gh + offs_m * stride_gn, mask=row_ok, other=0.0)
    # fp64 row sums (O(N*D) work, negligible): the dP - Delta of dS cancels as well as dP's own rounding allows
    Delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1) - dlse.to(tl.float64)
    tl.store(Delta_out + b * stride_lb + h * stride_lh + offs_m * stride_ln, Delta.to(Delta_out.dtype.element_ty),
             mask=row_ok)


@triton.jit
def _bwd_row_stats(
    Q, K, Mask,  # as in _attn_fwd
    Lse,  # (B, Hq, Nq) fp32 natural lse of the forward
    RowM, RowC,  # outputs laid out like Lse: the backward's P = exp((S - row_m) - row_c)
    CuQ, CuK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh, stride_ln,  # strides of Lse, RowM and RowC
    GROUP, Nq, Nk, D, qk_scale, bottom_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """(row_m, row_c) = (lse, 0), or (row max, log(row sum)) on a row with |lse| >= LSE_EXACT: there the float32
    lse = m + log(l) has lost log(l) (every visible key carries a huge bias, e.g. finfo.min), so m and l are
    recomputed from the scores (keys as in _attn_fwd, no dropout: l counts dropped entries too). Only a block
    holding such a row reads Q and K."""
    pid_m = tl.program_id(0)  # grid (query blocks, Hq, B)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CuQ, CuK, b, Nq, Nk, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seqlen_q
    rows = (q_start + offs_m).to(tl.int64)
    lse_off = b * stride_lb + h * stride_lh + rows * stride_ln
    lse = tl.load(Lse + lse_off, mask=row_ok, other=0.0)
    # an lse of -inf (no key), +inf (a +inf score) or NaN stays row_m (_bwd_tile handles it)
    exact = (tl.abs(lse) >= LSE_EXACT) & (tl.abs(lse) < float("inf"))
    row_m = lse
    row_c = tl.zeros([BLOCK_M], tl.float32)
    if tl.max(exact.to(tl.int32), 0) > 0:
        shift = (seqlen_k - seqlen_q) * bottom_right
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        Kb = K + b * stride_kb + (h // GROUP) * stride_kh + k_start.to(tl.int64) * stride_kn
        mask_base = Mask + b * stride_mb + h * stride_mh
        hi = seqlen_k
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M + shift)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(Kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=(offs_n[:, None] < seqlen_k) & d_ok, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = _scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, shift, mask_base, stride_mm, stride_mn, qk_scale,
                        MASK_KIND, CAUSAL, True, True, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = (l_i * tl.math.exp2((m_i - m_safe) * 1.4426950408889634)
                   + tl.sum(tl.math.exp2((s - m_safe[:, None]) * 1.4426950408889634), 1))
            m_i = m_new
        row_m = tl.where(exact, m_i, lse)
        row_c = tl.where(exact, tl.math.log2(l_i) * 0.6931471805599453, 0.0)
    tl.store(RowM + lse_off, row_m, mask=row_ok)
    tl.store(RowC + lse_off, row_c, mask=row_ok)


@triton.jit
def _bwd_dp(do, v, do_rows, stride_dd, v_rows, stride_vd, do_ok, v_ok, D, IEEE: tl.constexpr):
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
                a = tl.load(do_rows[:, None] + cols[None, :] * stride_dd, mask=do_ok[:, None] & (cols[None, :] < D),
                            other=0.0)
                b = tl.load(v_rows[:, None] + cols[None, :] * stride_vd, mask=v_ok[:, None] & (cols[None, :] < D),
                            other=0.0)
                dP += tl.dot(a.to(tl.float64), tl.trans(b).to(tl.float64))
        else:
            dP = tl.dot(do.to(tl.float64), tl.trans(v).to(tl.float64))
    else:
        dP = _dot(do, tl.trans(v), IEEE)
    return dP


@triton.jit
def _bwd_tile(q, k, v, do, do_rows, stride_dd, v_rows, stride_vd, D, row_m, row_c, Delta_i, offs_m, offs_n, seqlen_q,
              seqlen_k, shift, mask_base, stride_mm, stride_mn, qk_scale, seed, drop_base, drop_sm, dropout_p, inv_keep,
              MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, CHECK: tl.constexpr,
              IEEE: tl.constexpr):
    """P (dropped and rescaled, for dV) and dS of one (BLOCK_M, BLOCK_N) tile (dP = dO V^T by _bwd_dp);
    P = exp((S - row_m) - row_c), (row_m, row_c) from _bwd_row_stats ((lse, 0) on an ordinary row).

    Keys past the sequence end need no mask here: their K and V rows load as 0 (so they add nothing
    to dQ), their dK/dV/dbias are never stored, and P = exp2(min(S - row_m - row_c, 0)) stays finite."""
    s = _scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, shift, mask_base, stride_mm, stride_mn, qk_scale,
                MASK_KIND, CAUSAL, CHECK, False, IEEE)
    m_safe = tl.where(row_m == float("-inf"), float("inf"), row_m)  # a row that saw no key: P = 0
    # S - row_m before the log2(e) scaling (no overflow for an extreme finite bias); NaN propagates
    P = tl.math.exp2(tl.minimum(((s - m_safe[:, None]) - row_c[:, None]) * 1.4426950408889634, 0.0,
                                propagate_nan=tl.PropagateNan.ALL))
    dP = _bwd_dp(do, v, do_rows, stride_dd, v_rows, stride_vd, offs_m < seqlen_q, offs_n < seqlen_k, D, IEEE)
    if DROPOUT:
        keep = _keep(seed, drop_base, offs_m, offs_n, drop_sm, dropout_p)
        P_drop = tl.where(keep, P * inv_keep, 0.0)
        dP = tl.where(keep, dP * inv_keep, 0.0)
    else:
        P_drop = P
    dS = (P * (dP - Delta_i[:, None])).to(tl.float32)
    return P_drop, dS


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, v_rows, stride_vd, Qb, DOb, RowMb, RowCb, Deltab, DQb, DBb, mask_base, stride_qn,
                    stride_qd, stride_dn, stride_dd, stride_ln, stride_dqn, stride_dqd, stride_bm, stride_bn, stride_mm,
                    stride_mn, offs_n, offs_d, D, lo, hi, seqlen_q, seqlen_k, shift, qk_scale, sm_scale, seed,
                    drop_base, drop_sm, dropout_p, inv_keep, BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr,
                    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DBIAS: tl.constexpr,
                    CHECK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dK, dV of one key block accumulated over query blocks [lo, hi) of one query head."""
    d_ok = offs_d[None, :] < D
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        ok = row_ok[:, None] & d_ok
        q = tl.load(Qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=ok, other=0.0)
        do = tl.load(DOb + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
        row_m = tl.load(RowMb + offs_m * stride_ln, mask=row_ok, other=float("-inf"))
        row_c = tl.load(RowCb + offs_m * stride_ln, mask=row_ok, other=0.0)
        Delta_i = tl.load(Deltab + offs_m * stride_ln, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        P_drop, dS = _bwd_tile(q, k, v, do, DOb + offs_m * stride_dn, stride_dd, v_rows, stride_vd, D, row_m,
                               row_c, Delta_i, offs_m, offs_n, seqlen_q, seqlen_k, shift, mask_base, stride_mm,
                               stride_mn, qk_scale, seed, drop_base, drop_sm, dropout_p, inv_keep, MASK_KIND, CAUSAL,
                               DROPOUT, CHECK, IEEE)
        dv += _dot(tl.trans(P_drop.to(do.dtype)), do, IEEE)  # dV += P_drop^T dO
        dk += _dot(tl.trans(dS.to(q.dtype)), q, IEEE)  # dK += dS^T Q (times scale at the end)
        if DBIAS:
            tl.store(DBb + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, dS,
                     mask=row_ok[:, None] & (offs_n[None, :] < seqlen_k))
        if ATOMIC_DQ:
            dq = _dot(dS.to(k.dtype), k, IEEE) * sm_scale  # dQ += dS K * scale
            tl.atomic_add(DQb + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq, mask=ok)
    return dk, dv


@triton.jit
def _bwd_dkdv(
    Q, K, V, Mask, DO,  # as in _attn_fwd; DO: gradient of the output, any strides
    RowM, RowC, Delta,  # (B, Hq, Nq) fp32 row_m, row_c (_bwd_row_stats), Delta (fp64 for fp32 inputs), same strides
    DQ,  # fp32 dQ accumulator (zeros) when ATOMIC_DQ; unused otherwise
    DK, DV,  # outputs, k's / v's dtype
    DB,  # fp32 dS per (b, h): the bias gradient before its broadcast reduction, when DBIAS
    CuQ, CuK,  # varlen cu_seqlens
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_db, stride_dh, stride_dn, stride_dd,  # strides of DO
    stride_lb, stride_lh, stride_ln,  # strides of RowM, RowC and Delta
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,  # strides of DQ
    stride_dkb, stride_dkh, stride_dkn,  # strides of DK and DV (head-dim stride 1)
    stride_bb, stride_bh, stride_bm, stride_bn,  # strides of DB
    drop_sb, drop_sh, drop_sm,  # dropout offsets, as in _attn_fwd
    Hq, GROUP, Nq, Nk, D,
    qk_scale, sm_scale,  # the score scale (both: scores in natural units, see _scores)
    bottom_right, seed, dropout_p, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_N keys per program
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also accumulate dQ with fp32 atomics (the non-deterministic path)
    DBIAS: tl.constexpr,  # write dS to DB
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)  # grid (key blocks, Hkv, B)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CuQ, CuK, b, Nq, Nk, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    shift = (seqlen_k - seqlen_q) * bottom_right
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < D)
    k_rows = (k_start + offs_n).to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + k_rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)
    v_rows = V + b * stride_vb + hk * stride_vh + k_rows * stride_vn
    v = tl.load(v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Query blocks that see this key block: from the first row on or below the diagonal; from
    # m_mid on, every row sees every key of the block (no causal test needed).
    if CAUSAL:
        m_lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        m_mid = tl.minimum(((tl.maximum(start_n + BLOCK_N - 1 - shift, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M,
                           seqlen_q)
        m_mid = tl.maximum(m_mid, m_lo)
    else:
        m_lo = 0
        m_mid = 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_off = q_start.to(tl.int64)
    for g in range(GROUP):
        h = hk * GROUP + g
        Qb = Q + b * stride_qb + h * stride_qh + q_off * stride_qn
        DOb = DO + b * stride_db + h * stride_dh + q_off * stride_dn
        RowMb = RowM + b * stride_lb + h * stride_lh + q_off * stride_ln
        RowCb = RowC + b * stride_lb + h * stride_lh + q_off * stride_ln
        Deltab = Delta + b * stride_lb + h * stride_lh + q_off * stride_ln
        DQb = DQ + b * stride_dqb + h * stride_dqh + q_off * stride_dqn
        DBb = DB + b * stride_bb + h * stride_bh
        mask_base = Mask + b * stride_mb + h * stride_mh
        drop_base = b * drop_sb + h * drop_sh + q_off * drop_sm + k_start
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, v_rows, stride_vd, Qb, DOb, RowMb, RowCb, Deltab, DQb, DBb,
                                 mask_base, stride_qn, stride_qd, stride_dn, stride_dd, stride_ln, stride_dqn,
                                 stride_dqd, stride_bm, stride_bn, stride_mm, stride_mn, offs_n, offs_d, D, m_lo, m_mid,
                                 seqlen_q, seqlen_k, shift, qk_scale, sm_scale, seed, drop_base, drop_sm, dropout_p,
                                 inv_keep, BLOCK_M, MASK_KIND, CAUSAL, DROPOUT, ATOMIC_DQ, DBIAS, True, UPCAST, IEEE)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, v_rows, stride_vd, Qb, DOb, RowMb, RowCb, Deltab, DQb, DBb,
                                 mask_base, stride_qn, stride_qd, stride_dn, stride_dd, stride_ln, stride_dqn,
                                 stride_dqd, stride_bm, stride_bn, stride_mm, stride_mn, offs_n, offs_d, D, m_mid,
                                 seqlen_q, seqlen_q, seqlen_k, shift, qk_scale, sm_scale, seed, drop_base, drop_sm,
                                 dropout_p, inv_keep, BLOCK_M, MASK_KIND, CAUSAL, DROPOUT, ATOMIC_DQ, DBIAS, False,
                                 UPCAST, IEEE)
    out_off = b * stride_dkb + hk * stride_dkh + k_rows[:, None] * stride_dkn + offs_d[None, :]
    st_ok = _lt(offs_n[:, None], seqlen_k) & _lt(offs_d[None, :], D)  # kv_ok, recomputed (see _lt)
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=st_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=st_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, do_rows, stride_dd, row_m, row_c, Delta_i, Kb, Vb, stride_kn, stride_kd, stride_vn,
                  stride_vd, mask_base, stride_mm, stride_mn, offs_m, offs_d, D, lo, hi, seqlen_q, seqlen_k, shift,
                  qk_scale, seed, drop_base, drop_sm, dropout_p, inv_keep, BLOCK_N: tl.constexpr,
                  MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, CHECK: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dQ of one query block accumulated over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < D)
        k = tl.load(Kb + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        v = tl.load(Vb + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        P_drop, dS = _bwd_tile(q, k, v, do, do_rows, stride_dd, Vb + offs_n * stride_vn, stride_vd, D, row_m,
                               row_c, Delta_i, offs_m, offs_n, seqlen_q, seqlen_k, shift, mask_base, stride_mm,
                               stride_mn, qk_scale, seed, drop_base, drop_sm, dropout_p, inv_keep, MASK_KIND, CAUSAL,
                               DROPOUT, CHECK, IEEE)
        dq += _dot(dS.to(k.dtype), k, IEEE)  # dQ += dS K
    return dq


@triton.jit
def _bwd_dq(
    Q, K, V, Mask, DO, RowM, RowC, Delta,  # as in _bwd_dkdv
    DQ,  # output in q's dtype
    CuQ, CuK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_db, stride_dh, stride_dn, stride_dd,  # strides of DO
    stride_lb, stride_lh, stride_ln,  # strides of RowM, RowC and Delta
    stride_dqb, stride_dqh, stride_dqn,  # strides of DQ (head-dim stride 1)
    drop_sb, drop_sh, drop_sm,
    Hq, GROUP, Nq, Nk, D,
    qk_scale, sm_scale, bottom_right, seed, dropout_p, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_M queries per program
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)  # grid (query blocks, Hq, B)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CuQ, CuK, b, Nq, Nk, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    shift = (seqlen_k - seqlen_q) * bottom_right
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=ok, other=0.0)
    do_rows = DO + b * stride_db + h * stride_dh + q_rows * stride_dn
    do = tl.load(do_rows[:, None] + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
    row_m = tl.load(RowM + b * stride_lb + h * stride_lh + q_rows * stride_ln, mask=row_ok, other=float("-inf"))
    row_c = tl.load(RowC + b * stride_lb + h * stride_lh + q_rows * stride_ln, mask=row_ok, other=0.0)
    Delta_i = tl.load(Delta + b * stride_lb + h * stride_lh + q_rows * stride_ln, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    Kb = K + b * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kn
    Vb = V + b * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_base = Mask + b * stride_mb + h * stride_mh
    drop_base = b * drop_sb + h * drop_sh + q_start.to(tl.int64) * drop_sm + k_start
    hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + shift)
        mid = (tl.maximum(tl.minimum(hi, start_m + 1 + shift), 0) // BLOCK_N) * BLOCK_N
    else:
        mid = hi
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, do_rows, stride_dd, row_m, row_c, Delta_i, Kb, Vb, stride_kn, stride_kd,
                       stride_vn, stride_vd, mask_base, stride_mm, stride_mn, offs_m, offs_d, D, 0, mid, seqlen_q,
                       seqlen_k, shift, qk_scale, seed, drop_base, drop_sm, dropout_p, inv_keep, BLOCK_N, MASK_KIND,
                       CAUSAL, DROPOUT, False, UPCAST, IEEE)
    dq = _bwd_dq_inner(dq, q, do, do_rows, stride_dd, row_m, row_c, Delta_i, Kb, Vb, stride_kn, stride_kd,
                       stride_vn, stride_vd, mask_base, stride_mm, stride_mn, offs_m, offs_d, D, mid, hi, seqlen_q,
                       seqlen_k, shift, qk_scale, seed, drop_base, drop_sm, dropout_p, inv_keep, BLOCK_N, MASK_KIND,
                       CAUSAL, DROPOUT, True, UPCAST, IEEE)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=_lt(offs_m[:, None], seqlen_q) & _lt(offs_d[None, :], D))


# ----------------------------------------------------------------------------- configurations
#
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, dtype class, dropout on or off, mask tile read or
# not (a bool mask or an additive bias: one more tile per block, and dbias in backward), and head-dim
# bucket. Each entry is the largest tile of a short FlashAttention-2 / Triton tutorial 06 style list
# that compiles with 0 spill bytes (Triton 3.8, its ptxas with the flags triton.compile passes) for
# every variant of compile_targets() that uses it, on sm_80 and sm_90a alike; where no tile of the list
# was clean on both, the entry is _ARCH(sm_80 tile, sm_90 tile). Register use sits near 255 for many
# entries and ptxas is neither monotonic in tile size nor stable under small source changes (moving
# one statement turned clean fp32 entries into 8-96 B spills): re-run benchmarks/resource_check.py
# (CI does) after touching a kernel or Triton; benchmarks/retune_attention_tiles.py --write replaces
# the entries that started spilling. Expect these to change when tuned on a GPU. Under the
# interpreter: one configuration, blocks of 64.

_BUCKETS = (16, 32, 64, 128, 256)

_CONFIGS = {  # fp16 and bf16
    # (pass, dropout, mask):  d <= 16          d 17..32         d 33..64         d 65..128        d 129..256
    ("fwd", False, False):    ((128, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2)),
    ("fwd", False, True):     ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3),  (32, 64, 8, 2)),
    ("fwd", True, False):     ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 3),  (32, 64, 8, 1)),
    ("fwd", True, True):      ((128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 8, 3),  (32, 64, 8, 2)),
    ("decode", False, False): ((16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 32, 4, 2)),
    ("decode", False, True):  ((16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 32, 4, 2)),
    ("decode", True, False):  ((16, 32, 4, 2),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 8, 2)),
    ("decode", True, True):   ((16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 64, 4, 3),  (16, 32, 4, 2)),
    ("dkdv", False, False):   ((32, 64, 8, 3),  (32, 64, 8, 3),  (32, 64, 8, 3),  (32, 64, 8, 2),  (32, 64, 8, 1)),
    ("dkdv", False, True):    ((32, 64, 8, 2),  (32, 64, 8, 1),  (32, 64, 8, 1),  (16, 64, 8, 2),  (16, 64, 8, 2)),
    ("dkdv", True, False):    ((32, 64, 8, 1),  (16, 64, 4, 2),  (32, 64, 8, 3),  (16, 32, 8, 2),  (32, 32, 8, 1)),
    ("dkdv", True, True):     ((32, 32, 8, 2),  (16, 32, 8, 1),  (32, 32, 4, 1),  (16, 32, 8, 2),  (16, 32, 8, 2)),
    ("dq", False, False):     ((128, 32, 4, 3), (128, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 2), (32, 32, 8, 1)),
    ("dq", False, True):      ((128, 32, 4, 3), (128, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 2), (32, 32, 8, 1)),
    ("dq", True, False):      ((64, 32, 4, 3),  (64, 32, 4, 3),  (64, 32, 4, 3),  (64, 32, 8, 2),  (32, 32, 8, 1)),
    ("dq", True, True):       ((64, 32, 4, 3),  (64, 32, 4, 3),  (64, 32, 4, 3),  (64, 32, 8, 2),  (32, 32, 8, 1)),
}


def _ARCH(sm80: tuple, sm90: tuple) -> dict:
    """A table entry that differs between sm_80 and sm_90 (ptxas allocates registers differently: no
    tile of the list was clean on both)."""
    return {8: sm80, 9: sm90}


_FP32_CONFIGS = {  # fp32: FMA dots (no TF32), fp64 dP in backward: smaller tiles
    # (pass, dropout, mask):  d <= 16          d 17..32         d 33..64         d 65..128        d 129..256
    ("fwd", False, False):    ((128, 32, 4, 2), (64, 32, 4, 2),  (32, 32, 4, 1),  (16, 16, 4, 1),  (32, 32, 8, 1)),
    ("fwd", False, True):     ((64, 32, 4, 2),  (64, 32, 8, 3),  (32, 32, 4, 1),  (32, 32, 8, 1),  (32, 32, 8, 1)),
    ("fwd", True, False):     ((128, 32, 4, 2), (128, 32, 8, 3), (64, 32, 8, 3),  (16, 16, 4, 1),  (32, 32, 8, 1)),
    ("fwd", True, True):      ((128, 32, 8, 3), (64, 32, 8, 3),  (32, 32, 4, 1),  (32, 32, 8, 1),  (32, 32, 8, 1)),
    ("decode", False, False): ((16, 32, 4, 2),  (16, 32, 4, 2),  (16, 32, 4, 2),  (16, 16, 4, 1),  (16, 32, 4, 1)),
    ("decode", False, True):  ((16, 32, 4, 2),  (16, 32, 4, 2),  (16, 32, 4, 1),  (16, 32, 4, 1),  (16, 32, 4, 1)),
    ("decode", True, False):  ((16, 32, 4, 2),  (16, 32, 4, 2),  (16, 32, 4, 1),  (16, 16, 4, 1),  (16, 32, 4, 1)),
    ("decode", True, True):   ((16, 32, 4, 2),  (16, 32, 4, 2),  (16, 32, 4, 1),  (16, 32, 4, 1),  (16, 32, 4, 1)),
    ("dkdv", False, False):   ((32, 16, 4, 1),  (32, 32, 8, 1),  (32, 32, 8, 1),  (16, 64, 8, 2),  (16, 16, 4, 1)),
    ("dkdv", False, True):    ((32, 32, 8, 1),  (16, 64, 8, 2),  (32, 32, 8, 1),  (32, 32, 8, 1),  (16, 16, 8, 1)),
    ("dkdv", True, False):    ((32, 64, 8, 1),  (32, 64, 8, 1),  (32, 32, 8, 1),  (16, 32, 8, 2),  (16, 16, 8, 1)),
    ("dkdv", True, True):     ((32, 32, 8, 1),  (16, 64, 8, 1),  (16, 16, 4, 1),
                               (32, 32, 8, 1), _ARCH((16, 32, 8, 1), (16, 16, 8, 1))),
    ("dq", False, False):     ((32, 32, 4, 1),  (32, 32, 4, 1),  (16, 32, 4, 1),  (16, 16, 4, 1),  (16, 32, 8, 1)),
    ("dq", False, True):      ((32, 32, 4, 1),  (32, 32, 4, 1),  (16, 32, 4, 1),  (64, 32, 8, 2),  (16, 32, 8, 1)),
    ("dq", True, False):      ((32, 32, 4, 1),  (32, 32, 4, 1),  (16, 32, 4, 1),  (16, 16, 4, 1),  (16, 32, 8, 1)),
    ("dq", True, True):       ((32, 32, 4, 1),  (32, 32, 4, 1),  (16, 32, 4, 1),  (16, 16, 4, 1),  (16, 32, 8, 1)),
}

_INTERPRETER_CONFIG = (64, 64, 4, 1)
# _bwd_row_stats (BLOCK_M, BLOCK_N, num_warps) per head-dim bucket, every dtype; one stage
_ROW_STATS_CONFIGS = ((32, 32, 4), (32, 32, 4), (32, 32, 4), (32, 32, 4), (32, 16, 8))
_ROWS_BLOCK = 64 if INTERPRET else 32  # rows per program of the row kernels (preprocess, combine); 16 spills
# dropout_keep_mask: scores per program. 1024 over 4 warps is 8 per thread (Philox gives 4 per call); the
# interpreter costs per program, not per element, so it takes whole 64 K blocks.
_KEEP_MASK_BLOCK = 1024
_KEEP_MASK_WARPS = 4
_KEEP_MASK_BLOCK_INTERPRET = 1 << 16


def _bucket(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _atomic_dq(bucket: int, dtype: torch.dtype) -> bool:
    """Whether the non-deterministic backward may add dQ with atomics inside _bwd_dkdv (on a GPU). Not for
    16-bit head dims > 128: dK/dV with bias, dropout and the atomic dQ of 256-wide rows spills on sm_80 at
    every tile tried, and atomics of (BLOCK_M, 256) fp32 per key block of 16-32 keys cost more than the
    separate _bwd_dq pass. fp32 keeps them at every head dim (_bwd_dq does not fit the registers at d > 128)."""
    return dtype == torch.float32 or bucket <= 128


def _config(kind: str, d: int, dtype: torch.dtype, device: torch.device, dropout: bool,
            masked: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a pass on this device."""
    if INTERPRET:
        return _INTERPRETER_CONFIG
    major = 9 if torch.cuda.get_device_capability(device)[0] >= 9 else 8
    return _gpu_config(kind, _bucket(d), dtype, major, dropout, masked)


def _row_stats_config(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of _bwd_row_stats (its key loop runs only on rows with a huge lse)."""
    if INTERPRET:
        return _INTERPRETER_CONFIG[:3]
    return _ROW_STATS_CONFIGS[_BUCKETS.index(_bucket(d))]


def _launch_options(warps: int, stages: int) -> dict:
    return {} if INTERPRET else {"num_warps": warps, "num_stages": stages}


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (tensors on cuda:1 while the
    current device is 0 would otherwise be read by a kernel running on device 0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the backend interface


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
    if call.heads_q > 65535 or call.batch > 65535:
        return f"Hq = {call.heads_q}, B = {call.batch}: each must be <= 65535 (CUDA grid axes 1 and 2)"
    return None


def _mask_args(attn_mask: Optional[torch.Tensor], like: torch.Tensor):
    """(tensor, 4 strides with 0 on broadcast dims, kind) of a 4-D mask; never expanded or copied."""
    if attn_mask is None:
        return like, (0, 0, 0, 0), MASK_NONE
    strides = tuple(0 if attn_mask.shape[i] == 1 else attn_mask.stride(i) for i in range(4))
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8), strides, MASK_BOOL
    return attn_mask, strides, MASK_BIAS


def _dense_strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())  # (B, H, N, D)


def _packed_strides(t: torch.Tensor) -> tuple:
    return (0, t.stride(1), t.stride(0), t.stride(2))  # (total, H, D) seen as (B=·, H, N, D), batch via cu_seqlens


def _num_splits(b: int, hq: int, nq: int, nk: int, block_m: int, block_n: int, device) -> int:
    """Split-KV count for decode: enough programs to fill the GPU, each split >= 4 key blocks."""
    if INTERPRET or nq > 16 or nk < 1024:
        return 1
    programs = b * hq * triton.cdiv(nq, block_m)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), nk // (4 * block_n), 128))


def _pad_head_dim(t: torch.Tensor, width: int) -> torch.Tensor:
    """t with its last dim zero-padded to ``width`` (a copy), or t itself."""
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _run_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, *, varlen, cu_q=None, cu_k=None,
                 max_q=None, max_k=None, num_splits=None):
    """Launches the forward kernel (and the split-KV combine); returns (out, lse).

    The kernels take one head dim for q, k and v. When v's differs, the narrower side is zero-padded
    to the wider (a copy): zero columns add nothing to q k^T, and zero columns of v give zero output
    columns, cut off here. The scale is the caller's (from q's own head dim)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv:
        w = max(d, dv)
        out, lse = _run_forward(_pad_head_dim(q, w), _pad_head_dim(k, w), _pad_head_dim(v, w), attn_mask, seed, scale,
                                causal, bottom_right, dropout_p, varlen=varlen, cu_q=cu_q, cu_k=cu_k, max_q=max_q,
                                max_k=max_k, num_splits=num_splits)
        return out[..., :dv].contiguous(), lse
    if varlen:
        tq, hq, d = q.shape
        hkv = k.shape[1]
        b, nq, nk = cu_q.numel() - 1, max_q, max_k
        out = q.new_empty(q.shape)
        lse = q.new_empty((hq, tq), dtype=torch.float32)
        qs, ks, vs = _packed_strides(q), _packed_strides(k), _packed_strides(v)
        os_ = (0, out.stride(1), out.stride(0), 0)
        ls = (0, lse.stride(0), lse.stride(1), 0)
        drop = (0, tq * k.shape[0], k.shape[0])
    else:
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        out = q.new_empty(q.shape)
        lse = q.new_empty((b, hq, nq), dtype=torch.float32)
        qs, ks, vs = _dense_strides(q), _dense_strides(k), _dense_strides(v)
        os_ = (out.stride(0), out.stride(1), out.stride(2), 0)
        ls = (lse.stride(0), lse.stride(1), lse.stride(2), 0)
        drop = (hq * nq * nk, nq * nk, nk)
        cu_q = cu_k = q  # unused
    kind = "decode" if (nq <= 16 and not INTERPRET) else "fwd"
    bm, bn, warps, stages = _config(kind, d, q.dtype, q.device, dropout_p > 0, attn_mask is not None)
    if num_splits is None:
        num_splits = 1 if varlen else _num_splits(b, hq, nq, nk, bm, bn, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(nk, num_splits), bn) * bn
    num_splits = triton.cdiv(nk, keys_per_split)
    o_dst, l_dst = out, lse
    if num_splits > 1:
        assert not varlen, "split-KV serves dense calls"
        o_dst = q.new_empty((num_splits, b, hq, nq, d), dtype=torch.float32)
        l_dst = q.new_empty((num_splits, b, hq, nq), dtype=torch.float32)
        os_ = tuple(o_dst.stride()[1:4]) + (o_dst.stride(0),)
        ls = tuple(l_dst.stride()[1:4]) + (l_dst.stride(0),)
    mask, ms, mask_kind = _mask_args(attn_mask, q)
    num_m_blocks = triton.cdiv(nq, bm)
    _attn_fwd[(num_m_blocks * num_splits, hq, b)](
        q, k, v, mask, o_dst, l_dst, cu_q, cu_k, *qs, *ks, *vs, *ms, *os_, *ls, *drop,
        hq, hq // hkv, nq, nk, d, scale, int(bottom_right), seed, dropout_p, 1.0 / (1.0 - dropout_p),
        keys_per_split, num_m_blocks,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_bucket(d), MASK_KIND=mask_kind, CAUSAL=bool(causal),
        DROPOUT=dropout_p > 0, VARLEN=varlen, UPCAST=INTERPRET, IEEE=q.dtype == torch.float32,
        **_launch_options(warps, stages))
    if num_splits > 1:
        rows = b * hq * nq
        _split_combine[(triton.cdiv(rows, _ROWS_BLOCK),)](o_dst, l_dst, out, lse, rows, d, num_splits,
                                                          BLOCK_M=_ROWS_BLOCK, BLOCK_D=_bucket(d))
    return out, lse


def forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p):
    """(out (B, Hq, Nq, Dv), lse (B, Hq, Nq) fp32) of ``fusedlayers.attention``."""
    with _on(q.device):
        return _run_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, varlen=False)


def forward_split_kv(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, num_splits: int):
    """forward() with an explicit split-KV count (tests the decode path where the heuristic would not split)."""
    with _on(q.device):
        return _run_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, varlen=False,
                            num_splits=num_splits)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, causal,
                   bottom_right, dropout_p):
    """(out (total_q, Hq, Dv), lse (Hq, total_q)) of ``fusedlayers.attention_varlen``."""
    from fusedlayers.ops import check_cu_seqlens_values  # the op body runs eagerly: values can be read

    check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    with _on(q.device):
        return _run_forward(q, k, v, None, seed, scale, causal, bottom_right, dropout_p, varlen=True,
                            cu_q=cu_seqlens_q.contiguous(), cu_k=cu_seqlens_k.contiguous(), max_q=max_seqlen_q,
                            max_k=max_seqlen_k)  # the kernels read cu_seqlens[b] at offset b


def _run_backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p,
                  deterministic, bias_grad, *, varlen, cu_q=None, cu_k=None, max_q=None, max_k=None):
    lse = lse.contiguous()  # Delta is allocated like lse and written through lse's strides
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv:  # as in _run_forward: the padded out and dout have zero columns, so Delta is unchanged
        w = max(d, dv)
        grads = _run_backward(_pad_head_dim(dout, w), dlse, _pad_head_dim(q, w), _pad_head_dim(k, w),
                              _pad_head_dim(v, w), attn_mask, _pad_head_dim(out, w), lse, seed, scale, causal,
                              bottom_right, dropout_p, deterministic, bias_grad, varlen=varlen, cu_q=cu_q, cu_k=cu_k,
                              max_q=max_q, max_k=max_k)
        return (grads[0][..., :d].contiguous(), grads[1][..., :d].contiguous(), grads[2][..., :dv].contiguous(),
                grads[3])
    if varlen:
        tq, hq, d = q.shape
        hkv = k.shape[1]
        b, nq, nk = cu_q.numel() - 1, max_q, max_k
        strides = _packed_strides
        ls = (0, lse.stride(0), lse.stride(1))
        gs = (0, dlse.stride(0), dlse.stride(1))
        drop = (0, tq * k.shape[0], k.shape[0])
        pre_b, pre_n = 1, tq  # Delta's rows are independent: one (H, total_q) problem
    else:
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        strides = _dense_strides
        ls = tuple(lse.stride())
        gs = tuple(dlse.stride())
        drop = (hq * nq * nk, nq * nk, nk)
        pre_b, pre_n = b, nq
        cu_q = cu_k = q
    group = hq // hkv
    # Delta = rowsum(dO * O) - dlse, laid out like lse; fp64 for fp32 inputs (see _bwd_tile)
    Delta = torch.empty_like(lse, dtype=torch.float64 if q.dtype == torch.float32 else torch.float32)
    _bwd_preprocess[(triton.cdiv(pre_n, _ROWS_BLOCK), hq, pre_b)](
        out, dout, dlse, Delta, *strides(out), *strides(dout), *gs, *ls, pre_n, d,
        BLOCK_M=_ROWS_BLOCK, BLOCK_D=_bucket(d))
    # P = exp((S - row_m) - row_c), laid out like lse: (lse, 0), or the exact (max, log(sum)) of a row whose
    # float32 lse is too coarse (|lse| >= LSE_EXACT; see _bwd_row_stats)
    mask, ms, mask_kind = _mask_args(attn_mask, q)
    row_m, row_c = torch.empty_like(lse), torch.empty_like(lse)
    bm, bn, warps = _row_stats_config(d)
    _bwd_row_stats[(triton.cdiv(nq, bm), hq, b)](
        q, k, mask, lse, row_m, row_c, cu_q, cu_k, *strides(q), *strides(k), *ms, *ls, group, nq, nk, d, scale,
        int(bottom_right), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_bucket(d), MASK_KIND=mask_kind, CAUSAL=bool(causal),
        VARLEN=varlen, UPCAST=INTERPRET, IEEE=q.dtype == torch.float32, **_launch_options(warps, 1))

    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    dk_s = strides(dk)[:3]
    dbias = db_buf = None
    db_s = (0, 0, 0, 0)
    if bias_grad:
        # dS per (b, h), zero where causal skipping writes nothing; summed over the bias's broadcast dims below
        db_buf = torch.zeros((b, hq, nq, nk), device=q.device, dtype=torch.float32)
        if tuple(attn_mask.shape) == (b, hq, nq, nk) and attn_mask.dtype == torch.float32:
            dbias = db_buf
        db_s = tuple(db_buf.stride())
    atomic = not deterministic and (INTERPRET or _atomic_dq(_bucket(d), q.dtype))
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else q.new_empty(q.shape)
    common = dict(MASK_KIND=mask_kind, CAUSAL=bool(causal), DROPOUT=dropout_p > 0, VARLEN=varlen, UPCAST=INTERPRET,
                  IEEE=q.dtype == torch.float32)
    tail = (hq, group, nq, nk, d, scale, scale, int(bottom_right), seed, dropout_p, 1.0 / (1.0 - dropout_p))

    bm, bn, warps, stages = _config("dkdv", d, q.dtype, q.device, dropout_p > 0, attn_mask is not None)
    _bwd_dkdv[(triton.cdiv(nk, bn), hkv, b)](
        q, k, v, mask, dout, row_m, row_c, Delta, dq_acc, dk, dv, db_buf if db_buf is not None else dq_acc, cu_q, cu_k,
        *strides(q), *strides(k), *strides(v), *ms, *strides(dout), *ls, *strides(dq_acc), *dk_s, *db_s, *drop,
        *tail, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_bucket(d), ATOMIC_DQ=atomic, DBIAS=bias_grad, **common,
        **_launch_options(warps, stages))
    if atomic:
        dq = dq_acc.to(q.dtype)
    else:
        dq = dq_acc
        bm, bn, warps, stages = _config("dq", d, q.dtype, q.device, dropout_p > 0, attn_mask is not None)
        _bwd_dq[(triton.cdiv(nq, bm), hq, b)](
            q, k, v, mask, dout, row_m, row_c, Delta, dq, cu_q, cu_k, *strides(q), *strides(k), *strides(v), *ms,
            *strides(dout), *ls, *strides(dq)[:3], *drop, *tail, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_bucket(d),
            **common, **_launch_options(warps, stages))
    if bias_grad and dbias is None:
        dims = [i for i in range(4) if attn_mask.shape[i] == 1]
        dbias = (db_buf.sum(dim=dims, keepdim=True) if dims else db_buf).to(attn_mask.dtype)
    return dq, dk, dv, dbias


def backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p, deterministic,
             bias_grad):
    """(dq, dk, dv, dbias or None) of ``fusedlayers.attention``."""
    with _on(q.device):
        return _run_backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p,
                             deterministic, bias_grad, varlen=False)


def varlen_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, seed,
                    scale, causal, bottom_right, dropout_p, deterministic):
    """(dq, dk, dv) of ``fusedlayers.attention_varlen``."""
    from fusedlayers.ops import check_cu_seqlens_values  # the op body runs eagerly: values can be read

    check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    with _on(q.device):
        dq, dk, dv, _ = _run_backward(dout, dlse, q, k, v, None, out, lse, seed, scale, causal, bottom_right,
                                      dropout_p, deterministic, False, varlen=True, cu_q=cu_seqlens_q.contiguous(),
                                      cu_k=cu_seqlens_k.contiguous(), max_q=max_seqlen_q, max_k=max_seqlen_k)
    return dq, dk, dv


def dropout_keep_mask(seed: int, shape, dropout_p: float, device) -> torch.Tensor:
    """Bool keep-mask (True = keep) these kernels use: ``shape`` is (B, Hq, Nq, Nk), or (Hq, total_q,
    total_k) for varlen; element at linear index i is ``tl.rand(seed, i) >= dropout_p``."""
    numel = math.prod(shape)
    keep = torch.empty(numel, dtype=torch.uint8, device=device)
    block = _KEEP_MASK_BLOCK_INTERPRET if INTERPRET else _KEEP_MASK_BLOCK
    with _on(keep.device):
        _keep_mask_kernel[(triton.cdiv(numel, block),)](keep, numel, seed, dropout_p, BLOCK=block,
                                                        **_launch_options(_KEEP_MASK_WARPS, 1))
    return keep.view(torch.bool).view(tuple(shape))


# ----------------------------------------------------------------------------- resource check


def compile_targets() -> list[tuple]:
    """Every GPU block configuration the launchers may pick, for ``benchmarks/resource_check.py``:
    (name, jit function, signature, constexprs, options, attrs, archs) (attrs: ``ASTSource``'s divisibility
    hints; archs: the architectures that pick it, None for all).

    Each table entry (pass, head-dim bucket, dtype, dropout, mask) is compiled in the variant that
    turns on every feature of that entry (``_VARIANT_ENTRY``), in bf16, fp16 and fp32: fp16 and bf16
    share their tiles but not their code (ptxas allocates registers differently for the two MMA
    types, one fp16 kernel spilled where its bf16 twin did not). The row kernels (Delta, split-KV
    combine) once per bucket and dtype. Runtime specialisation is mirrored for the common case: the
    head-dim strides are 1 (constexpr), pointers and other strides 16-divisible."""
    targets = {}  # name -> [target tuple, GPU generations that pick it]
    for major in (8, 9):
        for tdt, dt in _DTYPES.items():
            for bucket in _BUCKETS:
                for kind in ("fwd", "decode", "dkdv", "dq"):
                    for variant in _variants(kind, tdt, bucket):
                        bm, bn, warps, stages = _gpu_config(kind, bucket, dt, major, *_VARIANT_ENTRY[variant])
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
                    signature, constexprs = _row_target(fn, tdt, bucket)
                    targets[name] = [(name, fn, signature, constexprs, {"num_warps": 4}, _aligned(fn, signature)),
                                     {8, 9}]
            for bucket, (bm, bn, warps) in zip(_BUCKETS, _ROW_STATS_CONFIGS):
                for variant in ("all", "varlen"):  # causal with an fp32 bias; causal, packed
                    name = f"attn_rowstats_{variant}_{tdt}_d{bucket}_BM{bm}_BN{bn}_w{warps}"
                    fn, signature, constexprs = _target("rowstats", variant, tdt, bucket, bm, bn)
                    targets[name] = [(name, fn, signature, constexprs, {"num_warps": warps, "num_stages": 1},
                                      _aligned(fn, signature)), {8, 9}]
    # dropout_keep_mask's kernel; numel as i64 (past 2**31 scores Triton specialises it so; i32 is no heavier)
    name = f"attn_keep_mask_BLOCK{_KEEP_MASK_BLOCK}_w{_KEEP_MASK_WARPS}"
    signature = {"Keep": "*u8", "numel": "i64", "seed": "i64", "dropout_p": "fp32", "BLOCK": "constexpr"}
    targets[name] = [(name, _keep_mask_kernel, signature, {"BLOCK": _KEEP_MASK_BLOCK},
                      {"num_warps": _KEEP_MASK_WARPS, "num_stages": 1}, _aligned(_keep_mask_kernel, signature)), {8, 9}]
    # A configuration only one generation picks (an _ARCH entry) is checked for that architecture only.
    return [t + ((None if majors == {8, 9} else ["sm_80" if 8 in majors else "sm_90a"]),)
            for t, majors in targets.values()]
    return targets


# Variants compiled per pass, and the table entry (dropout, mask) each one checks. all: fp32 additive bias
# (+ dbias) + causal + dropout; mask: the same without dropout; varlen: causal + dropout, packed; none:
# no feature; deterministic (dK/dV): all, without the dQ atomics. Decode serves varlen calls with
# max_seqlen_q <= 16 too (never split).
_VARIANTS = {"fwd": ("all", "mask", "none", "varlen"), "decode": ("all", "mask", "none", "varlen"),
             "dkdv": ("all", "mask", "none", "varlen", "deterministic"), "dq": ("all", "mask", "none", "varlen")}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_VARIANT_ENTRY = {"all": (True, True), "deterministic": (True, True), "mask": (False, True),
                  "varlen": (True, False), "none": (False, False)}


def _variants(kind: str, tdt: str, bucket: int) -> tuple:
    """_VARIANTS[kind], less "deterministic" where dK/dV never uses atomics (it would compile "all" again)."""
    if kind == "dkdv" and not _atomic_dq(bucket, _DTYPES[tdt]):
        return tuple(v for v in _VARIANTS[kind] if v != "deterministic")
    return _VARIANTS[kind]


def _aligned(fn, signature: dict) -> dict:
    """Triton's runtime specialisation of 16-aligned pointers and strides divisible by 16 (the common
    case: power-of-two head dims, fresh allocations), as ASTSource attrs."""
    return {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
            if signature[arg].startswith("*") or (arg.startswith("stride") and signature[arg] != "constexpr")}


def _gpu_config(kind: str, bucket: int, dtype: torch.dtype, major: int, dropout: bool,
                masked: bool) -> tuple[int, int, int, int]:
    """The table's entry for a GPU of compute capability ``major``.x (8: sm_80 tiles, 9: sm_90)."""
    table = _FP32_CONFIGS if dtype == torch.float32 else _CONFIGS
    entry = table[kind, bool(dropout), bool(masked)][_BUCKETS.index(bucket)]
    return entry[major] if isinstance(entry, dict) else entry


def _target(kind: str, variant: str, tdt: str, bucket: int, bm: int, bn: int):
    fn = {"fwd": _attn_fwd, "decode": _attn_fwd, "dkdv": _bwd_dkdv, "dq": _bwd_dq, "rowstats": _bwd_row_stats}[kind]
    on = variant in ("all", "deterministic", "mask")
    varlen = variant == "varlen"
    dropout = variant != "mask" and (on or varlen)
    signature, constexprs = {}, {}
    for arg in fn.arg_names:
        if arg in ("Q", "K", "V", "DO", "DK", "DV"):
            signature[arg] = "*" + tdt
        elif arg == "Mask":
            signature[arg] = "*fp32" if on else "*" + tdt
        elif arg == "Out":
            signature[arg] = "*fp32" if kind == "decode" and on else "*" + tdt  # split-KV partials are fp32
        elif arg == "DQ":
            signature[arg] = "*fp32" if kind == "dkdv" or tdt == "fp32" else "*" + tdt
        elif arg in ("Lse", "RowM", "RowC", "DB"):
            signature[arg] = "*fp32"
        elif arg == "Delta":
            signature[arg] = "*fp64" if tdt == "fp32" else "*fp32"
        elif arg in ("CuQ", "CuK"):
            signature[arg] = "*i32" if varlen else "*" + tdt
        elif arg in ("stride_qd", "stride_kd", "stride_vd", "stride_dd", "stride_dqd", "stride_mn", "stride_bn"):
            signature[arg], constexprs[arg] = "constexpr", 1
        elif arg in ("qk_scale", "sm_scale", "dropout_p", "inv_keep"):
            signature[arg] = "fp32"
        elif arg in ("seed", "drop_sb", "drop_sh", "drop_sm"):
            signature[arg] = "i64"
        elif arg in _constexpr_args(fn):
            signature[arg] = "constexpr"
        else:
            signature[arg] = "i32"
    constexprs.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bucket, MASK_KIND=MASK_BIAS if on and not varlen else MASK_NONE,
                      CAUSAL=on or varlen, DROPOUT=dropout, VARLEN=varlen, UPCAST=False, IEEE=tdt == "fp32")
    if kind == "dkdv":
        constexprs.update(ATOMIC_DQ=variant != "deterministic" and _atomic_dq(bucket, _DTYPES[tdt]), DBIAS=on)
    return fn, signature, {k: v for k, v in constexprs.items() if k in fn.arg_names}


def _constexpr_args(fn) -> set:
    """Parameters annotated ``tl.constexpr`` (works on JIT and interpreted functions alike)."""
    params = inspect.signature(fn.fn).parameters
    return {name for name, p in params.items() if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}


def _row_target(fn, tdt: str, bucket: int):
    signature, constexprs = {}, {}
    for arg in fn.arg_names:
        if arg in ("O", "DO", "Out"):
            signature[arg] = "*" + tdt
        elif arg == "Delta_out":
            signature[arg] = "*fp64" if tdt == "fp32" else "*fp32"
        elif arg in ("DLse", "OPart", "LPart", "Lse"):
            signature[arg] = "*fp32"
        elif arg in ("stride_od", "stride_dd"):
            signature[arg], constexprs[arg] = "constexpr", 1
        elif arg in _constexpr_args(fn):
            signature[arg] = "constexpr"
        else:
            signature[arg] = "i32"
    constexprs.update(BLOCK_M=_ROWS_BLOCK, BLOCK_D=bucket)
    return signature, constexprs
