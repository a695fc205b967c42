"""Triton layer norm, RMS norm and fused residual-add (+ dropout) + norm, forward and backward.

What it computes (the ``norm`` family of ``fusedlayers.registration``, row by row over
x (M, N)):

    z    = dropout(x) + residual          # the residual stream; keep-mask from tl.rand
    mean = z0 + sum(z - z0) / N           # fp32, z0 = the row's first element; not for RMS norm
    rstd = 1 / sqrt(sum((z - mean)^2) / N + eps)    # biased variance, eps inside the sqrt
    y    = (z - mean) * rstd * weight + bias         # RMS: z * rstd * weight

z is rounded to its dtype before the statistics, whether or not this call writes it,
so y, mean and rstd are those of the stream returned, which backward reads back (otherwise xhat
in backward would disagree with the forward's by the rounding of z, amplified by rstd), and y
does not depend on needs_grad.

Backward (the reference backend's names; xhat from the saved mean and rstd):

    xhat = (zin - mean) * rstd            # RMS: zin * rstd
    wdy  = weight * dy                    # dL/dxhat
    c1   = sum(xhat * wdy) / N
    c2   = sum(wdy) / N                   # RMS: 0
    dz   = (wdy - (xhat * c1 + c2)) * rstd + dz_stream   # dresidual = dz (prenorm adds dz_stream)
    dx   = dz * keep / (1 - p)
    dweight = sum over rows of dy * xhat, dbias = sum over rows of dy: program (g, j) sums
        row group g (<= 16 tiles) of column block j in registers and stores it to row g of
        an fp32 (n_groups, N) buffer; torch sums the buffer (no locks, no atomics:
        deterministic for a given launch).

Variants, constexpr flags of the same kernels: residual or not, dropout or not, z stored
or not (in its own dtype, fp32 with residual_in_fp32), weight / bias or not (any dtype),
RMS or layer norm, and SINGLE_BLOCK. A row that fits one column block (forward N <= 8192,
backward N <= 4096) is held in registers and read once. A wider row loops over column
blocks, so there is no cap on the hidden size: the forward computes its statistics block
by block (Chan's pairwise update of mean and M2) and then normalises in a second pass
over the inputs; the backward computes c1, c2 per row in a first kernel
(``_norm_bwd_c_kernel``) and dx over (row group, column block) programs in the main one.
Tiles are BLOCK_M rows by BLOCK_N columns: several rows per program for narrow rows. All
arithmetic is in fp32: loads are upcast, stores round to the output dtype.

Dropout keep-mask: ``tl.rand(seed, row * N + col) >= p``: it depends on (seed, row, col)
only, not on the block size, so backward and ``dropout_keep_mask`` regenerate it.

On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, tests only),
unchanged: the kernel bodies never test for it. The two conversions the interpreter gets
wrong for bf16 (its fp32 -> bf16 cast truncates instead of rounding to nearest even, its
bf16 -> fp32 cast misreads subnormals) go through ``to_f32`` and ``to_dtype`` of
``kernels/interpreter.py``, used by ``_load`` and ``_store``/``_stream`` here. What runs
only under the interpreter is therefore just those two helpers' bf16 branches (the bit
manipulation that widens bf16 by a shift and rounds fp32 to bf16 by hand); what only a
GPU runs is their other side, the native casts ``v.to(tl.float32)`` of a loaded bf16
value and ``v.to(tl.bfloat16)`` of an fp32 result. Every other kernel line is the same code
on both. What differs besides is host-side: the launch configuration under the interpreter
(bigger row tiles, fewer programs, one warp: ``_config``, ``_tiles_per_group``).

Check:     python -m pytest -q tests/test_norm.py tests/test_triton_norm.py -k triton
           (on CPU through the interpreter; the same tests run unchanged on a GPU)
Benchmark: python benchmarks/bench_norm.py          (GPU; forward/backward GB/s vs torch)
Resources: python benchmarks/resource_check.py      (registers/spills/shared, sm_80 and sm_90a)
Measured:  correctness on CPU (interpreter) only. Every GPU configuration compiles for
           sm_80 and sm_90a with 0 spills (at most 123 registers in the backward, 89 in the
           forward). No GPU timing yet.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedlayers.kernels.interpreter import INTERPRET, to_dtype, to_f32
from fusedlayers.kernels.launch import cdiv, gpu_facts, next_power_of_2, on_device
from fusedlayers.registration import keeps_stream, stream_dtype

FWD_BLOCK_CAP = 8192  # widest column block of the forward; wider rows loop over blocks
BWD_BLOCK_CAP = 4096  # of the backward (it holds more per element: 8192 would spill)
MIN_BLOCK = 16  # narrowest column block
GPU_TILE = 1024  # elements per tile for narrow rows on a GPU (BLOCK_M = GPU_TILE // BLOCK_N)
FWD_ELEMS_PER_THREAD = 16  # GPU: num_warps = tile / (32 * this), clamped to [4, 16]
BWD_ELEMS_PER_THREAD = 8
MAX_TILES_PER_GROUP = 16  # backward row group on a GPU: fp32 partial sums of <= 16 tiles
INTERPRET_TILE = 1 << 17  # elements per tile under the interpreter: few, wide programs,
INTERPRET_ROWS = 32  # but at most this many rows (numpy sums a tile's rows one after another)
INTERPRET_GROUP_ROWS = 64  # backward row group under the interpreter
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _keep(seed, offsets, dropout_p):
    """Dropout keep-mask (True = keep) at element offsets row * N + col."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _load(ptrs, mask):
    """Loads ptrs' values as fp32 (0 outside ``mask``)."""
    return to_f32(tl.load(ptrs, mask=mask, other=0.0))


@triton.jit
def _store(ptrs, v, mask):
    """Stores fp32 v into ptrs' dtype, rounding to nearest even."""
    tl.store(ptrs, to_dtype(v, ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _stream(X, R, Z, rows, row_ok, cols, stride_x, stride_r, N, dropout_p, keep_scale, seed,
            HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, Z_DTYPE: tl.constexpr, WRITE_Z: tl.constexpr):
    """(z, mask): z = dropout(x) + residual of the (BLOCK_M, BLOCK_N) tile at rows x cols,
    fp32, 0 outside ``mask``, rounded to the stream's dtype Z_DTYPE, so that y, mean
    and rstd are those of the stream the op returns or backward reads, whether or not Z is
    written; WRITE_Z also stores it to Z."""
    mask = row_ok[:, None] & (cols[None, :] < N)
    z = _load(X + rows[:, None] * stride_x + cols[None, :], mask)
    if HAS_DROPOUT:
        z = tl.where(_keep(seed, rows[:, None] * N + cols[None, :], dropout_p), z * keep_scale, 0.0)
    if HAS_RESIDUAL:
        z += _load(R + rows[:, None] * stride_r + cols[None, :], mask)
    if Z_DTYPE != tl.float32:
        z = to_f32(to_dtype(z, Z_DTYPE))
    if WRITE_Z:
        _store(Z + rows[:, None] * N + cols[None, :], z, mask)
    return z, mask


@triton.jit
def _write_y(Y, W, B, y, rows, cols, mask, N, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Stores y * weight + bias of one tile (y: the normalised values, fp32)."""
    if HAS_WEIGHT:
        y *= _load(W + cols, cols < N)[None, :]
    if HAS_BIAS:
        y += _load(B + cols, cols < N)[None, :]
    _store(Y + rows[:, None] * N + cols[None, :], y, mask)


@triton.jit(do_not_specialize=["M"])  # one row, one tile a group: no build of their own
def _norm_fwd_kernel(
    X,  # x (M, N), row stride stride_x, unit column stride; any float dtype
    R,  # residual (M, N), row stride stride_r (HAS_RESIDUAL)
    W,  # weight (N,) (HAS_WEIGHT), any float dtype
    B,  # bias (N,) (HAS_BIAS)
    Y,  # out: y (M, N) contiguous, x's dtype
    Z,  # out: z = dropout(x) + residual (M, N) contiguous, Z_DTYPE (STORE_Z)
    MEAN,  # out: mean (M,) fp32 (layer norm only)
    RSTD,  # out: rstd (M,) fp32
    stride_x, stride_r,  # row strides of x and residual, in elements
    M, N,  # rows, hidden size
    eps,  # inside the square root
    dropout_p,  # drop probability (HAS_DROPOUT)
    keep_scale,  # 1 / (1 - dropout_p)
    seed,  # dropout seed (HAS_DROPOUT)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per block (a power of two)
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_Z: tl.constexpr,  # write z to Z
    Z_DTYPE: tl.constexpr,  # the stream's dtype: the statistics and y are taken from z rounded to it
    RMS: tl.constexpr,  # RMS norm: no mean, no bias
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: one pass over the row, held in registers
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)  # M * N may exceed 2**31
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        z, mask = _stream(X, R, Z, rows, row_ok, cols, stride_x, stride_r, N, dropout_p, keep_scale, seed,
                          HAS_RESIDUAL, HAS_DROPOUT, Z_DTYPE, STORE_Z)
        if RMS:
            zc = z
        else:
            # mean of the data shifted by each row's first element: exact for a constant row, whose
            # deviations are then exactly 0 (a plain sum / N is off by a rounding error d, and with a
            # small eps d / sqrt(d^2 + eps) is far from 0)
            first = tl.sum(tl.where(cols[None, :] == 0, z, 0.0), axis=1)
            mean = first + tl.sum(tl.where(mask, z - first[:, None], 0.0), axis=1) / N
            zc = tl.where(mask, z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(zc * zc, axis=1) / N + eps)
        _write_y(Y, W, B, zc * rstd[:, None], rows, cols, mask, N, HAS_WEIGHT, HAS_BIAS)
    else:
        # pass 1: statistics, block by block (Chan et al.'s pairwise update of mean and M2)
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum of squared deviations (RMS: of squares)
        for start in range(0, N, BLOCK_N):
            z, mask = _stream(X, R, Z, rows, row_ok, start + cols, stride_x, stride_r, N, dropout_p, keep_scale,
                              seed, HAS_RESIDUAL, HAS_DROPOUT, Z_DTYPE, STORE_Z)
            if RMS:
                m2 += tl.sum(z * z, axis=1)
            else:
                n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)  # elements in this block
                n_a = start * 1.0  # elements before it (fp32)
                first = tl.sum(tl.where(cols[None, :] == 0, z, 0.0), axis=1)  # shifted, as above
                mean_b = first + tl.sum(tl.where(mask, z - first[:, None], 0.0), axis=1) / n_b
                zc = tl.where(mask, z - mean_b[:, None], 0.0)
                delta = mean_b - mean
                mean += delta * (n_b / (n_a + n_b))
                m2 += tl.sum(zc * zc, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
        rstd = 1.0 / tl.sqrt_rn(m2 / N + eps)
        # pass 2: normalise (z recomputed from the inputs, not read back)
        for start in range(0, N, BLOCK_N):
            z, mask = _stream(X, R, Z, rows, row_ok, start + cols, stride_x, stride_r, N, dropout_p, keep_scale,
                              seed, HAS_RESIDUAL, HAS_DROPOUT, Z_DTYPE, False)
            if RMS:
                y = z * rstd[:, None]
            else:
                y = (z - mean[:, None]) * rstd[:, None]
            _write_y(Y, W, B, y, rows, start + cols, mask, N, HAS_WEIGHT, HAS_BIAS)
    if not RMS:
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _xhat_wdy(DY, ZIN, w, rows, cols, mask, mean, rstd, stride_dy, stride_zin,
              HAS_WEIGHT: tl.constexpr, RMS: tl.constexpr):
    """dy, xhat and wdy of one tile (fp32, 0 outside ``mask``)."""
    dy = _load(DY + rows[:, None] * stride_dy + cols[None, :], mask)
    zin = _load(ZIN + rows[:, None] * stride_zin + cols[None, :], mask)
    xhat = zin * rstd[:, None] if RMS else (zin - mean[:, None]) * rstd[:, None]
    xhat = tl.where(mask, xhat, 0.0)
    wdy = dy * w[None, :] if HAS_WEIGHT else dy
    return dy, xhat, wdy


@triton.jit(do_not_specialize=["M"])  # one row, one tile a group: no build of their own
def _norm_bwd_c_kernel(
    DY,  # dL/dy (M, N), row stride stride_dy
    ZIN,  # the normalised input (M, N), row stride stride_zin
    W,  # weight (N,) (HAS_WEIGHT)
    MEAN, RSTD,  # saved (M,) fp32 (MEAN: layer norm only)
    C1, C2,  # out: (M,) fp32 c1 = sum(xhat * wdy) / N, c2 = sum(wdy) / N (layer norm only)
    stride_dy, stride_zin,  # row strides, in elements
    M, N,  # rows, hidden size
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile: rows x columns (a loop over N)
    HAS_WEIGHT: tl.constexpr, RMS: tl.constexpr,
):
    """Rows wider than one block: the row constants c1, c2 of the backward, in a loop over
    column blocks (the main kernel then runs over (row group, column block) programs)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    mean = rstd  # unused for RMS
    if not RMS:
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + tl.arange(0, BLOCK_N)
        w = _load(W + c, c < N) if HAS_WEIGHT else c
        dy, xhat, wdy = _xhat_wdy(DY, ZIN, w, rows, c, row_ok[:, None] & (c[None, :] < N), mean, rstd,
                                  stride_dy, stride_zin, HAS_WEIGHT, RMS)
        s1 += tl.sum(xhat * wdy, axis=1)
        s2 += tl.sum(wdy, axis=1)
    tl.store(C1 + rows, s1 / N, mask=row_ok)
    if not RMS:
        tl.store(C2 + rows, s2 / N, mask=row_ok)


@triton.jit(do_not_specialize=["M", "tiles_per_group"])  # one row, one tile a group: no build of their own
def _norm_bwd_kernel(
    DY,  # dL/dy (M, N), row stride stride_dy
    DZ,  # dL/dz from the stream's own consumers (M, N), row stride stride_dz (HAS_DZ: prenorm)
    ZIN,  # the normalised input z (or x when z was not stored) (M, N), row stride stride_zin
    W,  # weight (N,) (HAS_WEIGHT)
    MEAN,  # saved mean (M,) fp32 (layer norm only)
    RSTD,  # saved rstd (M,) fp32
    C1, C2,  # c1, c2 (M,) fp32 from _norm_bwd_c_kernel (not SINGLE_BLOCK; C2: layer norm only)
    DX,  # out: dL/dx (M, N) contiguous, x's dtype
    DRES,  # out: dL/dresidual = dz (M, N) contiguous, residual's dtype (STORE_DRES)
    DW_PART,  # out: (n_groups, N) fp32, row g = sum of dy * xhat over row group g (HAS_WEIGHT)
    DB_PART,  # out: (n_groups, N) fp32, row g = sum of dy over row group g (HAS_BIAS)
    stride_dy, stride_dz, stride_zin,  # row strides, in elements
    M, N,  # rows, hidden size
    tiles_per_group,  # row tiles (of BLOCK_M rows) per program: its row group
    dropout_p, keep_scale, seed,  # dropout as in the forward
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile: rows x columns
    HAS_DZ: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_DRES: tl.constexpr, RMS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: c1, c2 computed here, in registers
):
    """Program (g, j): rows of group g, columns of block j. dx (and dresidual) of each
    tile; the group's dweight/dbias sums in registers, stored once to row g of the partials."""
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = _load(W + cols, col_ok) if HAS_WEIGHT else cols
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = group * tiles_per_group
    for tile in range(first, tl.minimum(first + tiles_per_group, tl.cdiv(M, BLOCK_M))):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        mean = rstd  # unused for RMS
        if not RMS:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        dy, xhat, wdy = _xhat_wdy(DY, ZIN, w, rows, cols, mask, mean, rstd, stride_dy, stride_zin, HAS_WEIGHT, RMS)
        if SINGLE_BLOCK:
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
        else:
            c1 = tl.load(C1 + rows, mask=row_ok, other=0.0)
            c2 = c1  # unused for RMS
            if not RMS:
                c2 = tl.load(C2 + rows, mask=row_ok, other=0.0)
        if RMS:
            dz = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            dz = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DZ:
            dz += _load(DZ + rows[:, None] * stride_dz + cols[None, :], mask)
        if STORE_DRES:
            _store(DRES + rows[:, None] * N + cols[None, :], dz, mask)
        dx = dz
        if HAS_DROPOUT:
            dx = tl.where(_keep(seed, rows[:, None] * N + cols[None, :], dropout_p), dz * keep_scale, 0.0)
        _store(DX + rows[:, None] * N + cols[None, :], dx, mask)
        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)
    part = group.to(tl.int64) * N + cols
    if HAS_WEIGHT:
        tl.store(DW_PART + part, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + part, db_acc, mask=col_ok)


@triton.jit
def _keep_mask_kernel(
    KEEP,  # out: (M, N) uint8, 1 = kept
    M, N,  # the shape of x
    dropout_p, seed,  # as in the forward
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile of program (i, j): rows i, columns j
):
    """The keep-mask the kernels use, for tests (``dropout_keep_mask``)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None] * N + cols[None, :]
    tl.store(KEEP + offsets, _keep(seed, offsets, dropout_p).to(tl.uint8), mask=mask)


# ----------------------------------------------------------------------------- launch config


@functools.lru_cache(maxsize=4096)
def _config(m: int, n: int, backward: bool = False, interpret: bool = bool(INTERPRET)) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward (or backward) kernel for x (m, n)."""
    cap = BWD_BLOCK_CAP if backward else FWD_BLOCK_CAP
    block_n = min(max(next_power_of_2(n), MIN_BLOCK), cap)
    if interpret:
        return min(next_power_of_2(m), INTERPRET_ROWS, max(1, INTERPRET_TILE // block_n)), block_n, 1
    block_m = max(1, GPU_TILE // block_n)
    per_thread = BWD_ELEMS_PER_THREAD if backward else FWD_ELEMS_PER_THREAD
    return block_m, block_n, min(16, max(4, block_m * block_n // (32 * per_thread)))


def _gpu_configs(backward: bool) -> list[tuple[int, int, int, bool]]:
    """Every (BLOCK_M, BLOCK_N, num_warps, SINGLE_BLOCK) that _config may pick on a GPU."""
    cap = BWD_BLOCK_CAP if backward else FWD_BLOCK_CAP
    widths = [MIN_BLOCK << i for i in range((cap // MIN_BLOCK).bit_length())]  # every block width
    return ([(*_config(1, n, backward, interpret=False), True) for n in widths]
            + [(*_config(1, cap + 1, backward, interpret=False), False)])


def _tiles_per_group(n_tiles: int, n_col_blocks: int, block_m: int, num_warps: int, device: torch.device) -> int:
    """Row tiles per backward program. Each program sums dweight/dbias over its row group
    in fp32, so groups are kept short (<= MAX_TILES_PER_GROUP tiles: the sums stay accurate
    to a few ulp, and torch adds the groups' partial rows); they are made longer than one
    tile only while there are more than a full GPU of programs."""
    if device.type == "cuda" and not INTERPRET:
        resident = gpu_facts(device)[1]
        resident *= max(1, 32 // num_warps)  # programs per SM at 32 resident warps
        return max(1, min(cdiv(n_tiles * n_col_blocks, resident), MAX_TILES_PER_GROUP))
    return max(1, INTERPRET_GROUP_ROWS // block_m)


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """t with unit column stride (row stride free), as the kernels index it."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _row_stride(t: Optional[Tensor]) -> int:
    return t.stride(0) if t is not None else 0


# ----------------------------------------------------------------------------- interface


@functools.lru_cache(maxsize=None)
def _driver_error() -> Optional[str]:
    """None if Triton has a working GPU driver, else why not."""
    try:
        triton.runtime.driver.active.get_current_target()
        return None
    except Exception as e:  # no driver, wrong toolkit, ...
        return f"Triton cannot use the GPU: {type(e).__name__}: {e}"


def why_not(call) -> Optional[str]:
    """None when the Triton kernels can serve this NormCall, else the reason."""
    if call.dtype == torch.float64:
        return "float64 is not supported (fp16, bf16, fp32 only; use the reference backend)"
    for what, dtype in (("x", call.dtype), ("weight", call.weight_dtype), ("residual", call.residual_dtype)):
        if dtype is not None and dtype not in DTYPES:
            return f"{what} dtype {dtype} is not supported (fp16, bf16, fp32)"
    if call.rows < 1 or call.hidden < 1:
        return "empty input"
    if call.device.type == "cuda":
        return None if INTERPRET else _driver_error()
    if call.device.type == "cpu":
        return None if INTERPRET else (
            "not a CUDA tensor (Triton runs on CPU only under TRITON_INTERPRET=1, for tests)")
    return f"not a CUDA tensor ({call.device.type})"


def forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], seed: int,
            eps: float, dropout_p: float, rms: bool, prenorm: bool, residual_in_fp32: bool, needs_grad: bool = True):
    """(y, z, mean, rstd) as ``fusedlayers.registration.norm_fwd`` defines them."""
    m, n = x.shape
    store_z = keeps_stream(x, residual, dropout_p, prenorm, residual_in_fp32, needs_grad)
    # y is taken from z rounded to the stream's dtype, stored or not (exact where z is x in that dtype)
    z_dtype = stream_dtype(x, residual, residual_in_fp32)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    z = x.new_empty((m, n) if store_z else (0,), dtype=z_dtype)
    mean = x.new_empty((0,) if rms else (m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    x, residual, weight, bias = (_rows(t) for t in (x, residual, weight, bias))
    block_m, block_n, num_warps = _config(m, n)
    with on_device(x.device):
        _norm_fwd_kernel[(cdiv(m, block_m),)](
            x, residual, weight, bias, y, z if store_z else None, None if rms else mean, rstd,
            _row_stride(x), _row_stride(residual), m, n, eps, dropout_p, 1.0 / (1.0 - dropout_p), seed,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None and not rms, HAS_DROPOUT=dropout_p > 0, STORE_Z=store_z,
            Z_DTYPE=_TL_DTYPES[z_dtype], RMS=rms,
            SINGLE_BLOCK=n <= block_n, num_warps=num_warps)
    return y, z, mean, rstd


def backward(dy: Tensor, dz: Optional[Tensor], zin: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             mean: Tensor, rstd: Tensor, seed: int, eps: float, dropout_p: float, rms: bool, x_dtype: torch.dtype,
             residual_dtype: Optional[torch.dtype]):
    """(dx, dresidual, dweight, dbias) as ``fusedlayers.registration.norm_bwd`` defines them."""
    m, n = zin.shape
    dx = zin.new_empty((m, n), dtype=x_dtype)
    dres = zin.new_empty((m, n), dtype=residual_dtype) if residual_dtype is not None else None
    dy, dz, zin, weight = (_rows(t) for t in (dy, dz, zin, weight))
    block_m, block_n, num_warps = _config(m, n, backward=True)
    single = n <= block_n
    n_tiles, n_col_blocks = cdiv(m, block_m), cdiv(n, block_n)
    per = _tiles_per_group(n_tiles, n_col_blocks, block_m, num_warps, zin.device)
    n_groups = cdiv(n_tiles, per)
    has_bias = bias is not None and not rms
    dw_part = rstd.new_empty((n_groups, n)) if weight is not None else None  # one row per row group
    db_part = rstd.new_empty((n_groups, n)) if has_bias else None
    c1 = c2 = None
    with on_device(zin.device):
        if not single:  # rows wider than a block: the row constants first
            c1 = rstd.new_empty((m,))
            c2 = None if rms else rstd.new_empty((m,))
            _norm_bwd_c_kernel[(n_tiles,)](
                dy, zin, weight, None if rms else mean, rstd, c1, c2, _row_stride(dy), _row_stride(zin), m, n,
                BLOCK_M=block_m, BLOCK_N=block_n, HAS_WEIGHT=weight is not None, RMS=rms, num_warps=num_warps)
        _norm_bwd_kernel[(n_groups, n_col_blocks)](
            dy, dz, zin, weight, None if rms else mean, rstd, c1, c2, dx, dres, dw_part, db_part,
            _row_stride(dy), _row_stride(dz), _row_stride(zin), m, n, per, dropout_p, 1.0 / (1.0 - dropout_p),
            seed, BLOCK_M=block_m, BLOCK_N=block_n, HAS_DZ=dz is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0, STORE_DRES=dres is not None, RMS=rms,
            SINGLE_BLOCK=single, num_warps=num_warps)
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    db = db_part.sum(0).to(bias.dtype) if has_bias else None
    return dx, dres, dw, db


def dropout_keep_mask(seed: int, shape, dropout_p: float, device) -> Tensor:
    """The bool keep-mask (True = keep) that the kernels use for an x of ``shape`` (M, N)."""
    m, n = shape
    keep = torch.empty((m, n), dtype=torch.uint8, device=device)
    block_m, block_n, num_warps = _config(m, n)
    with on_device(keep.device):
        _keep_mask_kernel[(cdiv(m, block_m), cdiv(n, block_n))](
            keep, m, n, dropout_p, seed, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return keep.bool()


# ----------------------------------------------------------------------------- CI resource check


def compile_targets() -> list[tuple]:
    """Every GPU launch configuration of the kernels, for ``benchmarks/resource_check.py``:
    (name, jit function, signature, constexprs, options, attrs). Each (BLOCK_M, BLOCK_N,
    num_warps, SINGLE_BLOCK) that ``_config`` may pick is compiled twice: with every feature
    on (residual, dropout, weight, bias, stored z / dresidual, layer norm; the flags only
    remove work) in the widest dtype mix (bf16 activations, fp32 stream and weights), and
    with every feature off in fp16. Arguments carry the usual runtime specialisation
    (16-byte aligned pointers, hidden size and row strides multiples of 16); the every-feature build
    also without it for the hidden size and row strides (``_unaligned``: a hidden size such as 100,
    or rows of a slice)."""
    heavy = {"X": "*bf16", "R": "*fp32", "W": "*fp32", "B": "*fp32", "Y": "*bf16", "Z": "*fp32",
             "DY": "*bf16", "DZ": "*fp32", "ZIN": "*fp32", "DX": "*bf16", "DRES": "*fp32"}
    fp32_ptrs = ("MEAN", "RSTD", "C1", "C2", "DW_PART", "DB_PART")
    optional = {"R", "W", "B", "Z", "DZ", "DRES", "DW_PART", "DB_PART"}  # None when the feature is off
    scalars = {"stride_x": "i32", "stride_r": "i32", "stride_dy": "i32", "stride_dz": "i32", "stride_zin": "i32",
               "M": "i32", "N": "i32", "tiles_per_group": "i32", "eps": "fp32", "dropout_p": "fp32",
               "keep_scale": "fp32", "seed": "i64"}
    aligned = {"N", "stride_x", "stride_r", "stride_dy", "stride_dz", "stride_zin"}

    def target(name, fn, constexprs, features, num_warps, rows_aligned=True):
        signature, attrs = {}, {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in scalars:
                signature[arg] = scalars[arg]
                if arg in aligned and rows_aligned:
                    attrs[arg] = [["tt.divisibility", 16]]
            elif (not features and arg in optional) or (constexprs.get("RMS") and arg in ("MEAN", "C2")) or (
                    constexprs.get("SINGLE_BLOCK") and arg in ("C1", "C2")):
                signature[arg], constexprs[arg] = "constexpr", None  # a None argument
            else:
                signature[arg] = ("*fp32" if arg in fp32_ptrs else "*u8" if arg == "KEEP"
                                  else heavy[arg] if features else "*fp16")
                attrs[arg] = [["tt.divisibility", 16]]
        return name, fn, signature, constexprs, {"num_warps": num_warps}, attrs

    targets = []
    for backward in (False, True):
        for block_m, block_n, num_warps, single in _gpu_configs(backward):
            shape = f"BM{block_m}_BN{block_n}_w{num_warps}_{'single' if single else 'loop'}"
            if not backward:
                targets.append(target(f"keep_mask_{shape}", _keep_mask_kernel,
                                      dict(BLOCK_M=block_m, BLOCK_N=block_n), True, num_warps))
            for features, rows_aligned in ((True, True), (False, True), (True, False)):
                tag = f"{shape}_{'all' if features else 'none'}{'' if rows_aligned else '_unaligned'}"
                flags = dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_WEIGHT=features, RMS=False)
                if not backward:
                    targets.append(target(f"norm_fwd_{tag}", _norm_fwd_kernel, dict(
                        flags, HAS_RESIDUAL=features, HAS_BIAS=features, HAS_DROPOUT=features, STORE_Z=features,
                        Z_DTYPE=tl.float32,
                        SINGLE_BLOCK=single), features, num_warps, rows_aligned))
                    continue
                if not single:
                    targets.append(target(f"norm_bwd_c_{tag}", _norm_bwd_c_kernel, dict(flags), features,
                                          num_warps, rows_aligned))
                targets.append(target(f"norm_bwd_{tag}", _norm_bwd_kernel, dict(
                    flags, HAS_DZ=features, HAS_BIAS=features, HAS_DROPOUT=features, STORE_DRES=features,
                    SINGLE_BLOCK=single), features, num_warps, rows_aligned))
    return targets
