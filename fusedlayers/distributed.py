"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

When one sequence no longer fits one device, each of the W ranks of a ``ProcessGroup`` holds
a shard of the tokens, (B, H, N/W, D), and the key/value blocks travel round a ring
(ring attention; Megatron's context parallelism). Everything stands on ``torch.distributed``
(gloo on CPU, NCCL on GPUs); the local block is served by ``fusedlayers``' own attention op on
whichever backend ``fusedlayers.dispatch`` picks.

Forward, on rank r, W steps: at step t the rank holds the K/V block of rank s = (r - t) mod W,
posts the batched point-to-point send of that block to rank r + 1 and the receive of the next
block from rank r - 1 (``torch.distributed.batch_isend_irecv``), computes its queries against
the block meanwhile, and merges the partial result into the running one in float32 by lse::

    lse = logaddexp(lse_acc, lse_blk)
    out = out_acc * exp(lse_acc - lse) + out_blk * exp(lse_blk - lse)

Backward: the K/V blocks circulate again; the block backward of the op (``attention_bwd``)
takes the merged out and lse, so it recomputes the global P = exp(S - lse) of the block and
gives dQ of the local queries and dK/dV of the block; dK/dV accumulate (float32) in a buffer
that travels with the block and, after W steps, arrives home. Every sum has a fixed order
(ring order), so with ``deterministic=True`` (passed to the local op) the backward is bitwise
repeatable.

Layouts (``shard`` / ``unshard`` / ``context_parallel_attention`` take the same ``layout``):

* ``"zigzag"`` (default): the sequence is cut into 2W equal chunks and rank r holds chunks
  r and 2W-1-r, so under a causal mask every rank does the same work::

      W = 2, 8 tokens, chunks 0..3:   rank 0: tokens 0 1 | 6 7     rank 1: tokens 2 3 | 4 5

* ``"contiguous"``: W chunks in order, rank r holds chunk r (tokens r*N/W .. (r+1)*N/W - 1).
  Causal attention is right but unbalanced: rank W-1 does about W times rank 0's work.

Without a causal mask or dropout attention does not care where a key sits, so both layouts
give the same result; with either, the layout passed to ``context_parallel_attention`` must be
the one the shards were cut with.

Dropout: the keep-mask of the single-process op is a function of the seed and the global
(batch, head, query, key) position. Every block call passes the op the block's global place
(``dropout_layout`` = [first global query row, first global key column, global Nq, global
Nk], ``fusedlayers.registration``), so each rank draws exactly its part of the single-process
mask; the seed is drawn once per call from the default generator of every rank and group rank
0's is broadcast to the others. With dropout each block call of the plan is cut at its chunk
boundaries, so that each piece is one rectangle of the global mask (zigzag: up to 4 calls per
ring step instead of 1 or 2; contiguous: no cut).

Packed variable-length sequences (``context_parallel_attention_varlen``, ``shard_varlen`` /
``unshard_varlen``; ring-flash-attention's zigzag varlen, Megatron's CP with packed
sequences): tokens are packed as for ``fusedlayers.attention_varlen`` ((total, H, D), global
``cu_seqlens``), and each sequence is sharded on its own, cut into the layout's 2W or W equal
chunks, so every sequence length must be a multiple of 2W (zigzag) or W (contiguous). A rank
holds its chunks of every sequence, packed sequence after sequence; its offsets are
``cu_seqlens // W``, the same on every rank::

    cu_seqlens = [0, 8, 12], W = 2, zigzag (4 chunks a sequence):
        sequence a: a0 a1 | a2 a3 | a4 a5 | a6 a7        sequence b: b0 | b1 | b2 | b3
        rank 0: a0 a1 a6 a7 b0 b3        rank 1: a2 a3 a4 a5 b1 b2        local cu_seqlens [0, 4, 6]

The chunk relation of the local queries and a K/V block is the same for every sequence (only
the chunk sizes differ), so the block plan over chunk slots gives the calls of a ring step,
and each is one varlen call over all sequences: the rows of its slots gathered (index tensors
built once per call from ``cu_seqlens``), its own cu_seqlens, the partial (out, lse) merged
back by lse. Backward as for dense attention (dK/dV travel home; float32; fixed order). No
dropout: the single-process varlen keep-mask is drawn per sequence, and a block call's global
place (``dropout_layout``) exists only for dense calls. No mask: packed sequences have no
padding.

What it does not do: a float bias over (query, key) pairs (only a key mask, which travels
with its keys); dropout or a mask with packed sequences; a bias gradient; double backward.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import dispatch, ops, registration

__all__ = ["context_parallel_attention", "context_parallel_attention_varlen", "shard", "unshard", "shard_varlen",
           "unshard_varlen", "LAYOUTS"]

LAYOUTS = ("zigzag", "contiguous")

# A row whose finite lse reaches this size (a huge float bias such as finfo.min on every key)
# makes the cpu kernel's backward recompute the row's max and sum from the block it is given
# instead of trusting lse (see csrc/attention/attention_cpu_kernel.h, kLseExact): that is the
# block's own softmax, not the global one, so such rows are refused.
_LSE_LIMIT = 4096.0


# ---------------------------------------------------------------------------- layout


def _group_rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fusedlayers.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or launch with torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    return layout


def _chunk_ids(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """The global chunk indices rank ``rank`` holds, in its local order."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def _chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def _dim(x: Tensor, dim) -> int:
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}")
    return dim % x.dim()


def shard(x: Tensor, dim: int, group=None, *, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a new contiguous tensor).

    ``zigzag``: ``x`` is cut into 2W equal chunks along ``dim`` and rank r gets chunks r and
    2W-1-r, concatenated; ``contiguous``: W chunks, rank r gets chunk r. ``x.shape[dim]`` must
    be a multiple of the number of chunks (2W or W): an uneven last shard is refused, since
    every rank of the ring must hold blocks of one size (pad the sequence and mask the padded
    keys instead). Differentiable (a slice).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim, layout = _dim(x, dim), _check_layout(layout)
    rank, world = _group_rank_world(group)
    n, chunks = x.shape[dim], world * _chunks_per_rank(layout)
    if n % chunks:
        raise ValueError(f"shard: x.shape[{dim}] = {n} is not a multiple of the {chunks} chunks of the {layout} "
                         f"layout on {world} ranks (an uneven last shard); pad the sequence to a multiple of "
                         f"{chunks} and mask the padded keys")
    size = n // chunks
    return torch.cat([x.narrow(dim, c * size, size) for c in _chunk_ids(rank, world, layout)], dim=dim)


def unshard(x: Tensor, dim: int, group=None, *, layout: str = "zigzag") -> Tensor:
    """The full tensor from every rank's shard along ``dim`` (the inverse of :func:`shard`,
    same ``layout``); every rank gets it. A collective (``all_gather``); not differentiable.
    Every rank's shard must have the same shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim, layout = _dim(x, dim), _check_layout(layout)
    rank, world = _group_rank_world(group)
    _check_same_shape_everywhere("unshard: x", tuple(x.shape), x.device, group, world)
    per_rank = _chunks_per_rank(layout)
    if x.shape[dim] % per_rank:
        raise ValueError(f"unshard: x.shape[{dim}] = {x.shape[dim]} is odd, but a {layout} shard holds "
                         f"{per_rank} equal chunks")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    size = x.shape[dim] // per_rank
    chunks: list = [None] * (world * per_rank)
    for r, part in enumerate(parts):
        for i, c in enumerate(_chunk_ids(r, world, layout)):
            chunks[c] = part.narrow(dim, i * size, size)
    return torch.cat(chunks, dim=dim)


def _check_same_shape_everywhere(what: str, shape: tuple, device, group, world: int) -> None:
    """Raises on every rank when the ranks' shapes differ (one small all_gather)."""
    if world == 1:
        return
    mine = torch.tensor([len(shape), *shape, *([0] * (8 - len(shape)))], dtype=torch.int64,
                        device=device if device.type != "cpu" else "cpu")
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    shapes = [tuple(t[1:1 + int(t[0])].tolist()) for t in every]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{what} must have the same shape on every rank (equal shards; an uneven last shard is "
                         f"not supported), got {', '.join(f'rank {r}: {s}' for r, s in enumerate(shapes))}")


# ---------------------------------------------------------------------------- block plan


def _plan(q_chunks: tuple, k_chunks: tuple, causal: bool, q_len: int, k_len: int) -> list:
    """The attention calls of local queries (global chunks ``q_chunks``, ``q_len`` rows) against
    one K/V block (chunks ``k_chunks``, ``k_len`` keys): a list of (q slice, k slice, causal).
    Chunks are equal: chunk qc sees chunk kc fully when kc < qc, causally (top-left diagonal)
    when kc == qc, not at all when kc > qc. Adjacent pieces are fused into one call where the
    result is one rectangle (or one causal square), which covers both layouts."""
    if not causal:
        return [(slice(0, q_len), slice(0, k_len), False)]
    cq, ck = q_len // len(q_chunks), k_len // len(k_chunks)
    rel = [["full" if kc < qc else "diag" if kc == qc else "skip" for kc in k_chunks] for qc in q_chunks]
    n_q, n_k = len(q_chunks), len(k_chunks)
    if n_q == n_k and all(rel[i][j] == ("diag" if i == j else "full" if j < i else "skip")
                          for i in range(n_q) for j in range(n_k)):
        return [(slice(0, q_len), slice(0, k_len), True)]  # one causal square (the rank's own block)
    rows = [i for i in range(n_q) if any(r != "skip" for r in rel[i])]
    cols = [j for j in range(n_k) if any(rel[i][j] != "skip" for i in range(n_q))]
    if not rows:
        return []
    contiguous = rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1))
    if contiguous and all(rel[i][j] == "full" for i in rows for j in cols):
        return [(slice(rows[0] * cq, (rows[-1] + 1) * cq), slice(cols[0] * ck, (cols[-1] + 1) * ck), False)]
    return [(slice(i * cq, (i + 1) * cq), slice(j * ck, (j + 1) * ck), rel[i][j] == "diag")
            for i in range(n_q) for j in range(n_k) if rel[i][j] != "skip"]


def _global_pieces(plan: list, q_chunks: tuple, k_chunks: tuple, q_len: int, k_len: int, chunks: int) -> list:
    """``plan`` (of :func:`_plan`) cut at the chunk boundaries, each piece with its place in the
    global (Nq, Nk) = (chunks * chunk_q, chunks * chunk_k) problem: a list of (q slice, k slice,
    causal, [row0, col0, rows, cols]), the ``dropout_layout`` of the piece's block call. A piece
    of a causal call of the plan is full (below the diagonal), skipped (above) or causal (on it:
    chunks are equal, so a chunk-aligned square piece always starts on the diagonal)."""
    cq, ck = q_len // len(q_chunks), k_len // len(k_chunks)
    pieces = []
    for qs, ks, causal in plan:
        for i in range(qs.start // cq, -(-qs.stop // cq)):
            a, b = max(qs.start, i * cq), min(qs.stop, (i + 1) * cq)
            for j in range(ks.start // ck, -(-ks.stop // ck)):
                c, d = max(ks.start, j * ck), min(ks.stop, (j + 1) * ck)
                piece_causal = False
                if causal:  # visible iff key (c - ks.start) + y <= query (a - qs.start) + x, local to the call
                    qa, kc = a - qs.start, c - ks.start
                    if kc > qa + (b - a) - 1:
                        continue  # above the diagonal
                    if kc + (d - c) - 1 > qa:
                        assert qa == kc and b - a == d - c, "a causal piece off the diagonal"
                        piece_causal = True
                layout = [q_chunks[i] * cq + a - i * cq, k_chunks[j] * ck + c - j * ck, chunks * cq, chunks * ck]
                pieces.append((slice(a, b), slice(c, d), piece_causal, layout))
    return pieces


def _pieces(q_chunks: tuple, k_chunks: tuple, causal: bool, q_len: int, k_len: int, chunks: int,
            dropout: bool) -> list:
    """The block calls of local queries against one K/V block: (q slice, k slice, causal,
    dropout_layout); the layout is None without dropout (the plan's fused calls as they are)."""
    plan = _plan(q_chunks, k_chunks, causal, q_len, k_len)
    if not dropout or q_len == 0 or k_len == 0:  # an empty block call draws no mask
        return [(qs, ks, c, None) for qs, ks, c in plan]
    return _global_pieces(plan, q_chunks, k_chunks, q_len, k_len, chunks)


# ---------------------------------------------------------------------------- ring


class _Ring:
    """Point-to-point exchange with the ring neighbours: send to rank + 1, receive from rank - 1
    (both in group ranks), batched and asynchronous."""

    def __init__(self, group, rank: int, world: int):
        self.group = group
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = to_global((rank + 1) % world), to_global((rank - 1) % world)

    def start(self, tensors: list) -> tuple[list, list]:
        """Posts the sends of ``tensors`` and the receives of same-shaped ones; returns the
        receive buffers and the requests (``finish`` waits for them)."""
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in bufs]
        return bufs, dist.batch_isend_irecv(ops)

    @staticmethod
    def finish(requests: list) -> None:
        for r in requests:
            r.wait()

    @staticmethod
    def open(group) -> tuple[int, int, Optional["_Ring"]]:
        """(rank, world, ring) of ``group``; the ring is None on a group of one rank."""
        rank, world = _group_rank_world(group)
        return rank, world, _Ring(group, rank, world) if world > 1 else None


def _ring_forward(block: list, ring: Optional[_Ring], rank: int, world: int, step_fn) -> None:
    """The W forward steps of the ring. At step t the rank holds the block (K, V and the key
    mask if any) of rank src = (rank - t) mod W; it posts the send of that block to the next
    rank and the receive of the next block from the previous one, runs ``step_fn(block, src)``
    (the block calls and merges) meanwhile, then waits for the receive."""
    for step in range(world):
        src = (rank - step) % world
        pending = ring.start(block) if step + 1 < world else None
        step_fn(block, src)
        if pending is not None:
            block, requests = pending
            _Ring.finish(requests)


def _ring_backward(block: list, ring: Optional[_Ring], rank: int, world: int, step_fn) -> tuple[Tensor, Tensor]:
    """The W backward steps of the ring, with the block circulating as in :func:`_ring_forward`.
    ``step_fn(block, src)`` accumulates dQ of the local queries itself and returns (dK, dV) of
    the block in hand (float32, from this rank's queries alone); they are added to the dK/dV the
    block brought from the ranks before this one and sent on with it, so after W steps the
    rank's own block's dK/dV arrive home, summed in ring order. Returns them."""
    travelling, sent = None, None  # dK/dV of the block in hand, summed over the ranks it has visited
    for step in range(world):
        src = (rank - step) % world
        pending = ring.start(block) if step + 1 < world else None
        dk_blk, dv_blk = step_fn(block, src)
        if sent is not None:  # the block's dK/dV from the ranks before this one
            (dk_in, dv_in), requests = sent
            _Ring.finish(requests)
            dk_blk, dv_blk = dk_in.add_(dk_blk), dv_in.add_(dv_blk)
        travelling = (dk_blk, dv_blk)
        if ring is not None:
            sent = ring.start(list(travelling))  # to the next rank; the last step's send goes home
        if pending is not None:
            block, requests = pending
            _Ring.finish(requests)
    if sent is not None:
        (dk_home, dv_home), requests = sent
        _Ring.finish(requests)
        return dk_home, dv_home
    return travelling


def _check_lse_limit(lse: Tensor, op: str, cause: str, advice: str = "") -> None:
    """Refuses a backward whose lse has a finite row at or above ``_LSE_LIMIT``."""
    finite = lse[torch.isfinite(lse)]
    if finite.numel() and float(finite.abs().max()) >= _LSE_LIMIT:
        raise ValueError(f"{op}: a query row has |lse| >= {_LSE_LIMIT:g} ({cause}); the block backward cannot "
                         f"recover the global softmax of such a row{advice}")


def _merge(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """out_acc, lse_acc (float32) <- the softmax-weighted merge with a partial (out, lse)."""
    new = torch.logaddexp(lse_acc, lse)
    seen = new != float("-inf")  # both sides saw no key: keep 0, never exp(-inf - -inf) = NaN
    w_old = torch.where(seen, torch.exp(lse_acc - new), 0.0)
    w_new = torch.where(seen, torch.exp(lse - new), 0.0)
    out_acc.mul_(w_old.unsqueeze(-1)).add_(out.float() * w_new.unsqueeze(-1))
    lse_acc.copy_(new)


def _key_mask(mask: Optional[Tensor], ks: slice) -> Optional[Tensor]:
    return None if mask is None else mask[..., ks]


def _torch_block_backward(dout, dlse, q, k, v, mask, out, lse, scale, causal, dropout_p=0.0, seed=None,
                          dropout_layout=None):
    """(dq, dk, dv) of one block against the global (out, lse), in plain torch at float32 (or
    float64): the formula of ``attention_bwd`` for backends whose backward recomputes its own
    softmax instead of taking lse (the ``reference`` backend), with the reference backend's
    keep-mask Z of ``seed`` under ``dropout_layout`` when ``dropout_p > 0``::

        P = exp(S - lse), Pd = P * Z / (1 - p), dV = Pd^T dO, dP = (dO V^T) * Z / (1 - p),
        Delta = rowsum(dO * O), dS = P (dP - Delta + dlse)
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    qf, do, o = q.to(acc), dout.to(acc), out.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
    vf = v.to(acc).repeat_interleave(group, dim=1)  # (B, Hq, Nk, Dv)
    s = (qf @ kf.transpose(-2, -1)) * scale  # S: (B, Hq, Nq, Nk)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None]
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        s = s + mask.to(acc)
    row = lse.to(acc).unsqueeze(-1)
    p = torch.where(allowed & (row != float("-inf")), torch.exp(s - row), 0.0)  # P
    drop = 1.0  # Z / (1 - p), or 1 without dropout
    if dropout_p > 0:
        keep = registration.layout_keep_mask(dispatch.implementation("attention", "reference"), int(seed.item()),
                                             (b, hq, nq, nk), dropout_p, q.device, dropout_layout)
        drop = keep.to(acc) / (1.0 - dropout_p)
    dv = (p * drop).transpose(-2, -1) @ do  # dV = Pd^T dO
    dp = (do @ vf.transpose(-2, -1)) * drop  # dP
    delta = (do * o).sum(dim=-1, keepdim=True)  # Delta = rowsum(dO * O)
    ds = p * (dp - delta + dlse.to(acc).unsqueeze(-1))  # dS
    dq = (ds @ kf) * scale
    dk = ((ds.transpose(-2, -1) @ qf) * scale).view(b, hkv, group, nk, -1).sum(dim=2)
    dv = dv.view(b, hkv, group, nk, -1).sum(dim=2)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, group, causal, layout, scale, deterministic, backend, dropout_p, seed):
        rank, world, ring = _Ring.open(group)
        nq, nk = q.shape[2], k.shape[2]
        b, hq = q.shape[:2]
        out_acc = q.new_zeros((b, hq, nq, v.shape[3]), dtype=torch.float32)
        lse_acc = q.new_full((b, hq, nq), float("-inf"), dtype=torch.float32)
        mine, chunks = _chunk_ids(rank, world, layout), world * _chunks_per_rank(layout)

        def step(block, src):
            k_b, v_b, m_b = block[0], block[1], block[2] if mask is not None else None
            for qs, ks, blk_causal, drop_layout in _pieces(mine, _chunk_ids(src, world, layout), causal, nq, nk,
                                                           chunks, dropout_p > 0):
                o, l = registration.attention_fwd(q[:, :, qs], k_b[:, :, ks], v_b[:, :, ks], _key_mask(m_b, ks), seed,
                                                  scale, blk_causal, False, dropout_p, deterministic, backend,
                                                  dropout_layout=drop_layout)
                _merge(out_acc[:, :, qs], lse_acc[:, :, qs], o, l)

        _ring_forward([t.contiguous() for t in (k, v, mask) if t is not None], ring, rank, world, step)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, mask, out, lse_acc)
        ctx.args = (group, causal, layout, scale, deterministic, backend, dropout_p, seed)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        group, causal, layout, scale, deterministic, backend, dropout_p, seed = ctx.args
        _check_lse_limit(lse, "context_parallel_attention", "a huge float bias such as finfo.min on every key of "
                         "the row", ": pass a bool key mask instead")
        rank, world, ring = _Ring.open(group)
        nq, nk = q.shape[2], k.shape[2]
        dout = dout.contiguous()
        dlse = dlse.contiguous() if dlse is not None else torch.zeros_like(lse)
        dq_acc = torch.zeros_like(q, dtype=torch.float32)
        mine, chunks = _chunk_ids(rank, world, layout), world * _chunks_per_rank(layout)

        def step(block, src):
            k_b, v_b, m_b = block[0], block[1], block[2] if mask is not None else None
            dk_blk = torch.zeros_like(k_b, dtype=torch.float32)
            dv_blk = torch.zeros_like(v_b, dtype=torch.float32)
            for qs, ks, blk_causal, drop_layout in _pieces(mine, _chunk_ids(src, world, layout), causal, nq, nk,
                                                           chunks, dropout_p > 0):
                args = (dout[:, :, qs], dlse[:, :, qs], q[:, :, qs], k_b[:, :, ks], v_b[:, :, ks],
                        _key_mask(m_b, ks), out[:, :, qs], lse[:, :, qs])
                if backend == "reference":  # its backward recomputes the block's own softmax: not usable here
                    dq, dk, dv = _torch_block_backward(*args, scale, blk_causal, dropout_p, seed, drop_layout)
                else:
                    dq, dk, dv, _, _ = registration.attention_bwd(*args, seed, scale, blk_causal, False, dropout_p,
                                                               deterministic, False, backend,
                                                               dropout_layout=drop_layout)
                dq_acc[:, :, qs] += dq.float()
                dk_blk[:, :, ks] += dk.float()
                dv_blk[:, :, ks] += dv.float()
            return dk_blk, dv_blk

        dk_home, dv_home = _ring_backward([t.contiguous() for t in (k, v, mask) if t is not None], ring, rank, world,
                                          step)
        return (dq_acc.to(q.dtype), dk_home.to(k.dtype), dv_home.to(v.dtype)) + (None,) * 9


# ---------------------------------------------------------------------------- public op


def _check_qkv(q, k, v, ndim: int, dims: str) -> None:
    """q, k, v are ``ndim``-D floating-point tensors (``dims`` names their axes) of one dtype
    and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() or t.dim() != ndim:
            raise ValueError(f"{name} must be a {ndim}-D floating-point tensor {dims}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share one dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")


def _check_heads(hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of key/value heads "
                         f"({hkv})")


def _scale_of(scale, d: int) -> float:
    """The score scale: ``scale`` checked, or 1/sqrt(D) for None."""
    if scale is None:
        return 1.0 / math.sqrt(d) if d else 1.0
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return scale


def _shared_seed(dropout_p: float, device, group, world: int) -> Optional[Tensor]:
    """The dropout seed of a call (a CPU int64 scalar, None without dropout): drawn from every
    rank's default generator as ``fusedlayers.attention`` draws it (so every generator advances
    alike), group rank 0's broadcast to the group (one collective)."""
    seed = ops._draw_seed(dropout_p)
    if seed is None or world == 1:
        return seed
    buf = seed.reshape(1).to(device if device.type != "cpu" else "cpu")
    dist.broadcast(buf, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return buf[0].cpu()


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    *,
    group=None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    layout: str = "zigzag",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over a sequence sharded across the ranks of ``group``, autograd-aware.

    Every rank of the group calls it (a collective) with its own shard; the result on each
    rank is its shard of ``fusedlayers.attention`` of the full tensors.

    Args:
        q: (B, Hq, N_local, D), this rank's queries (cut by :func:`shard` with ``layout``).
        k, v: (B, Hkv, Nk_local, D / Dv), this rank's keys and values; Hq % Hkv == 0 (GQA).
            Nk_local may differ from N_local without ``causal`` (cross-attention to a sharded
            memory). Every rank's shard has the same shape (checked: an uneven last shard is
            refused).
        attn_mask: None, or a key mask of this rank's keys: bool (True = attend) or a float
            bias (q's dtype or float32, no gradient), shape (B or 1, Hq or 1, 1, Nk_local),
            e.g. a key-padding mask cut with ``shard(mask, dim=-1)``. It travels with its keys.
        group: the process group (default: the whole world).
        causal: key j visible from query i iff global position j <= i (top-left; queries and
            keys are the same sequence).
        dropout_p: probability of zeroing an attention probability, as in
            :func:`fusedlayers.attention`: the keep-mask is the single-process op's, a function
            of the seed and the global (query, key) position, so the result equals
            ``fusedlayers.attention`` of the full tensors under the same seed (same backend).
            The seed is drawn from every rank's default generator (as the single-process op
            draws it) and group rank 0's is broadcast to the group (one more collective per
            call). With dropout the layout matters even without ``causal``. Served by the
            backends that take a dropout layout (``cpu``, ``reference``; auto on a GPU picks
            ``reference`` until the GPU kernels take one).
        scale: score scale; default 1/sqrt(D).
        return_lse: also return lse (B, Hq, N_local) float32 of the full rows; differentiable.
        deterministic: bitwise-repeatable backward (the ring's sums have a fixed order; the
            local op runs deterministic).
        backend: the backend of the local blocks: "auto" or a name, as in
            :func:`fusedlayers.attention`.
        layout: "zigzag" (default) or "contiguous", the layout the shards were cut with (see
            the module docstring); it matters only with ``causal`` or dropout.

    Returns:
        out (B, Hq, N_local, Dv) in q's dtype, or ``(out, lse)``. A query row that sees no
        key anywhere gets 0 and lse -inf.

    Raises:
        ValueError / TypeError naming the argument for malformed inputs;
        ``fusedlayers.dispatch.BackendError`` when the backend asked for cannot serve the call
        (dropout on ``triton`` or ``cuda``).
    """
    _check_qkv(q, k, v, 4, "(B, H, N_local, D)")
    b, hq, nq, d = q.shape
    _, hkv, nk, dk = k.shape
    if k.shape[0] != b or v.shape[0] != b or tuple(v.shape[1:3]) != (hkv, nk) or dk != d:
        raise ValueError(f"q (B, Hq, N, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) disagree: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_heads(hq, hkv)
    layout = _check_layout(layout)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    scale = _scale_of(scale, d)
    rank, world = _group_rank_world(group)
    if causal and nq != nk:
        raise ValueError(f"causal context-parallel attention needs query and key shards of one length "
                         f"(self-attention), got N_local {nq} and Nk_local {nk}")
    per_rank = _chunks_per_rank(layout)
    for name, n in (("q", nq), ("k", nk)):
        if (causal or dropout_p > 0) and n % per_rank:
            raise ValueError(f"{name}.shape[2] = {n}: a {layout} shard holds {per_rank} equal chunks, so its length "
                             f"must be a multiple of {per_rank}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"attn_mask must be bool (True = attend) or a float bias of q's dtype ({q.dtype}) or "
                            f"float32, got {attn_mask.dtype}")
        shape = tuple(attn_mask.shape)
        if (len(shape) != 4 or shape[0] not in (1, b) or shape[1] not in (1, hq) or shape[2] != 1
                or shape[3] != nk or attn_mask.device != q.device):
            raise ValueError(f"attn_mask must be a key mask of this rank's keys, shape (B or 1, Hq or 1, 1, "
                             f"Nk_local) = ({b} or 1, {hq} or 1, 1, {nk}) on q's device, got {shape} on "
                             f"{attn_mask.device}")
        if attn_mask.requires_grad:
            raise ValueError("attn_mask: a float bias that requires grad is not supported by "
                             "context_parallel_attention (no bias gradient); detach it")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    shape = (b, hq, hkv, nq, nk, d, v.shape[3], -1 if attn_mask is None else attn_mask.shape[0])
    _check_same_shape_everywhere("context_parallel_attention: the shards (B, Hq, Hkv, N_local, Nk_local, D, Dv, "
                                 "mask B)", shape, q.device, group, world)
    call = dispatch.AttentionCall(
        device=q.device, dtype=q.dtype, batch=b, heads_q=hq, heads_kv=hkv, seqlen_q=nq, seqlen_k=nk, head_dim=d,
        head_dim_v=v.shape[3], mask=None if attn_mask is None else "bool" if attn_mask.dtype == torch.bool else "float",
        mask_grad=False, causal=bool(causal), dropout_p=dropout_p, deterministic=bool(deterministic), varlen=False,
        dropout_layout=dropout_p > 0)
    empty = q.numel() == 0 or k.numel() == 0 or v.numel() == 0
    name = "reference" if empty else dispatch.select("attention", call, backend)  # an empty call runs no kernel
    seed = _shared_seed(dropout_p, q.device, group, world)
    out, lse = _RingAttention.apply(q, k, v, attn_mask, group, bool(causal), layout, float(scale),
                                    bool(deterministic), name, dropout_p, seed)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------- packed sequences (varlen)


def _ranges(starts: Tensor, lengths: Tensor) -> Tensor:
    """The concatenation of ``arange(starts[i], starts[i] + lengths[i])`` over i (CPU int64)."""
    total = int(lengths.sum())
    shift = starts - (torch.cumsum(lengths, 0) - lengths)  # start of each range minus its place in the result
    return torch.repeat_interleave(shift, lengths, output_size=total) + torch.arange(total)


def _varlen_lengths(cu_seqlens, world: int, layout: str, total: int, what: str) -> tuple[list[int], list[int]]:
    """The global ``cu_seqlens`` and its sequence lengths as host lists (a GPU tensor
    synchronises), checked: int32 offsets from 0 to ``total`` (the global token count), each
    length a multiple of the layout's number of chunks."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or (
            cu_seqlens.numel() < 2):
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor of B + 1 >= 2 offsets, got "
                        f"{cu_seqlens.dtype if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__} "
                        f"{tuple(cu_seqlens.shape) if isinstance(cu_seqlens, Tensor) else ''}")
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0 or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu}")
    chunks = world * _chunks_per_rank(layout)
    for i, n in enumerate(lengths):
        if n % chunks:
            raise ValueError(f"cu_seqlens: sequence {i} has {n} tokens, not a multiple of the {chunks} chunks of the "
                             f"{layout} layout on {world} ranks (each sequence is sharded on its own); pad it to a "
                             f"multiple of {chunks}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at {what}, got {cu}")
    return cu, lengths


class _Packing:
    """The tokens of packed sequences under a layout: sequence i (``lengths[i]`` tokens) is cut
    into C = W x (2 or 1) chunks of ``chunk[i]`` tokens, and a rank holds its chunks ("slots": 2
    for zigzag, 1 for contiguous) of every sequence, sequence after sequence. The local packing
    is the same on every rank, local ``cu_seqlens = cu_seqlens // W``."""

    def __init__(self, lengths: list[int], world: int, layout: str, device):
        self.world, self.layout, self.device = world, layout, device
        self.slots_per_rank = _chunks_per_rank(layout)
        lens = torch.tensor(lengths, dtype=torch.int64)
        self.chunk = lens // (world * self.slots_per_rank)  # (B,) tokens per chunk
        local = lens // world
        self.local_start = torch.cumsum(local, 0) - local  # (B,) first local row of each sequence
        self.total_local = int(local.sum())
        self.max_local = int(local.max()) if len(lengths) else 0
        self._slots: dict = {}

    def slots(self, s: slice) -> tuple[Optional[Tensor], Tensor, int, list[int]]:
        """The local rows of slots ``s.start .. s.stop - 1`` of every sequence, packed: (row index
        on the device, None for all rows; their cu_seqlens (int32, on the device); their longest
        sequence; the cu_seqlens as a host list). Built once per slot range."""
        key = (s.start, s.stop)
        if key not in self._slots:
            n = (s.stop - s.start) * self.chunk  # (B,) rows of each sequence
            cu = torch.cat([n.new_zeros(1), torch.cumsum(n, 0)])
            whole = key == (0, self.slots_per_rank)
            index = None if whole else _ranges(self.local_start + s.start * self.chunk, n).to(self.device)
            self._slots[key] = (index, cu.to(device=self.device, dtype=torch.int32), int(n.max()), cu.tolist())
        return self._slots[key]

    def global_rows(self, rank: int, starts: Tensor) -> Tensor:
        """The global rows (in the full packed tensor whose sequences start at ``starts``) of
        ``rank``'s shard, in its local order (CPU int64)."""
        ids = torch.tensor(_chunk_ids(rank, self.world, self.layout), dtype=torch.int64)
        first = starts[:, None] + ids[None, :] * self.chunk[:, None]  # (B, slots)
        return _ranges(first.flatten(), self.chunk[:, None].expand_as(first).flatten())


def _rows(x: Tensor, index: Optional[Tensor], dim: int = 0) -> Tensor:
    return x if index is None else x.index_select(dim, index)


def shard_varlen(x: Tensor, cu_seqlens: Tensor, group=None, *, layout: str = "zigzag", dim: int = 0) -> Tensor:
    """This rank's shard of the packed tensor ``x`` (sequences along ``dim``, sequence i at rows
    ``cu_seqlens[i]:cu_seqlens[i+1]``), a new tensor: each sequence is cut on its own into 2W
    (``zigzag``) or W (``contiguous``) equal chunks, the rank takes its chunks of it (as
    :func:`shard` does), and the pieces are packed sequence after sequence; the shard's own
    offsets are ``cu_seqlens // W``. Every sequence length must be a multiple of the number of
    chunks. ``dim``: 0 for q / k / v / out (total, H, D), 1 for a varlen lse (H, total).
    Reads ``cu_seqlens`` (the global offsets, int32) to the host. Differentiable."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim, layout = _dim(x, dim), _check_layout(layout)
    rank, world = _group_rank_world(group)
    cu, lengths = _varlen_lengths(cu_seqlens, world, layout, x.shape[dim], f"x.shape[{dim}] = {x.shape[dim]}")
    packing = _Packing(lengths, world, layout, x.device)
    starts = torch.tensor(cu[:-1], dtype=torch.int64)
    return x.index_select(dim, packing.global_rows(rank, starts).to(x.device))


def unshard_varlen(x: Tensor, cu_seqlens: Tensor, group=None, *, layout: str = "zigzag", dim: int = 0) -> Tensor:
    """The full packed tensor from every rank's shard (the inverse of :func:`shard_varlen`, same
    ``cu_seqlens`` (global), ``layout`` and ``dim``); every rank gets it. A collective
    (``all_gather``); not differentiable. Every rank's shard must have the same shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim, layout = _dim(x, dim), _check_layout(layout)
    rank, world = _group_rank_world(group)
    _check_same_shape_everywhere("unshard_varlen: x", tuple(x.shape), x.device, group, world)
    n = x.shape[dim]
    cu, lengths = _varlen_lengths(cu_seqlens, world, layout, n * world, f"W x x.shape[{dim}] = {world} x {n}")
    packing = _Packing(lengths, world, layout, x.device)
    starts = torch.tensor(cu[:-1], dtype=torch.int64)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    rows = torch.cat([packing.global_rows(r, starts) for r in range(world)]).to(x.device)
    shape = list(x.shape)
    shape[dim] = n * world
    return x.new_empty(shape).index_copy_(dim, rows, torch.cat(parts, dim=dim))


def _torch_varlen_block_backward(dout, dlse, q, k, v, cu_q: list[int], cu_k: list[int], out, lse, scale, causal):
    """(dq, dk, dv) of one packed block call against the global (out, lse): sequence by
    sequence through :func:`_torch_block_backward` on (1, H, L, D) views (the ``reference``
    backend, whose backward recomputes its own softmax). lse, dlse: (Hq, Tq)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros_like(t, dtype=acc) for t in (q, k, v))
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        if b == a or d == c:
            continue
        dense = [t[s].transpose(0, 1).unsqueeze(0) for t, s in ((dout, slice(a, b)), (q, slice(a, b)),
                                                               (k, slice(c, d)), (v, slice(c, d)),
                                                               (out, slice(a, b)))]  # (1, H, L, D)
        g = _torch_block_backward(dense[0], dlse[:, a:b].unsqueeze(0), dense[1], dense[2], dense[3], None, dense[4],
                                  lse[:, a:b].unsqueeze(0), scale, causal)
        for grad, t, s in zip(g, (dq, dk, dv), (slice(a, b), slice(c, d), slice(c, d))):
            t[s] = grad[0].transpose(0, 1)
    return dq, dk, dv


class _RingAttentionVarlen(torch.autograd.Function):
    """The ring of :class:`_RingAttention` over packed sequences. The chunk relation of the local
    queries and a K/V block is the same for every sequence, so ``_plan`` over slots (chunks of
    size 1) gives the block calls, and each becomes one varlen call over every sequence: the
    rows of its slots gathered (``_Packing.slots``), the partial (out, lse) merged back."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, scale, deterministic, backend, packing):
        rank, world, ring = _Ring.open(group)
        t, hq = q.shape[:2]
        out_acc = q.new_zeros((t, hq, v.shape[2]), dtype=torch.float32)
        lse_acc = q.new_full((hq, t), float("-inf"), dtype=torch.float32)  # (Hq, T): varlen lse layout
        mine, slots = _chunk_ids(rank, world, layout), packing.slots_per_rank

        def step(block, src):
            k_b, v_b = block
            for qs, ks, blk_causal in _plan(mine, _chunk_ids(src, world, layout), causal, slots, slots):
                qi, cu_q, max_q, _ = packing.slots(qs)
                ki, cu_k, max_k, _ = packing.slots(ks)
                o, l = registration.varlen_fwd(_rows(q, qi), _rows(k_b, ki), _rows(v_b, ki), cu_q, cu_k, max_q,
                                               max_k, None, scale, blk_causal, False, 0.0, deterministic, backend)
                if qi is None:
                    _merge(out_acc, lse_acc.t(), o, l.t())
                else:
                    o_acc, l_acc = out_acc.index_select(0, qi), lse_acc.index_select(1, qi)
                    _merge(o_acc, l_acc.t(), o, l.t())
                    out_acc.index_copy_(0, qi, o_acc)
                    lse_acc.index_copy_(1, qi, l_acc)

        _ring_forward([k.contiguous(), v.contiguous()], ring, rank, world, step)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.args = (group, causal, layout, scale, deterministic, backend, packing)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, layout, scale, deterministic, backend, packing = ctx.args
        _check_lse_limit(lse, "context_parallel_attention_varlen", "scores that large")
        rank, world, ring = _Ring.open(group)
        dout = dout.contiguous()
        dlse = dlse.contiguous() if dlse is not None else torch.zeros_like(lse)
        dq_acc = torch.zeros_like(q, dtype=torch.float32)
        mine, slots = _chunk_ids(rank, world, layout), packing.slots_per_rank

        def step(block, src):
            k_b, v_b = block
            dk_blk = torch.zeros_like(k_b, dtype=torch.float32)
            dv_blk = torch.zeros_like(v_b, dtype=torch.float32)
            for qs, ks, blk_causal in _plan(mine, _chunk_ids(src, world, layout), causal, slots, slots):
                qi, cu_q, max_q, host_q = packing.slots(qs)
                ki, cu_k, max_k, host_k = packing.slots(ks)
                args = (_rows(dout, qi), _rows(dlse, qi, 1), _rows(q, qi), _rows(k_b, ki), _rows(v_b, ki))
                if backend == "reference":  # its backward recomputes the block's own softmax: not usable here
                    dq, dk, dv = _torch_varlen_block_backward(*args, host_q, host_k, _rows(out, qi),
                                                              _rows(lse, qi, 1), scale, blk_causal)
                else:
                    dq, dk, dv, _ = registration.varlen_bwd(*args, cu_q, cu_k, max_q, max_k, _rows(out, qi),
                                                            _rows(lse, qi, 1), None, scale, blk_causal, False, 0.0,
                                                            deterministic, backend)
                for acc, index, grad in ((dq_acc, qi, dq), (dk_blk, ki, dk), (dv_blk, ki, dv)):
                    if index is None:
                        acc.add_(grad.float())
                    else:  # each row once per call: a fixed result
                        acc.index_add_(0, index, grad.float())
            return dk_blk, dv_blk

        dk_home, dv_home = _ring_backward([k.contiguous(), v.contiguous()], ring, rank, world, step)
        return (dq_acc.to(q.dtype), dk_home.to(k.dtype), dv_home.to(v.dtype)) + (None,) * 7


def context_parallel_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    group=None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    layout: str = "zigzag",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over packed variable-length sequences, each sharded across the ranks of
    ``group``, autograd-aware: :func:`fusedlayers.attention_varlen` (self-attention, one
    ``cu_seqlens`` for queries and keys) under context parallelism.

    Every rank of the group calls it (a collective) with its own shard (cut by
    :func:`shard_varlen` with ``layout``); the result on each rank is its shard of
    ``fusedlayers.attention_varlen(q_full, k_full, v_full, cu_seqlens, cu_seqlens, max_seqlen,
    max_seqlen, causal=causal)``. Each sequence is cut on its own into 2W (zigzag) or W
    (contiguous) equal chunks, so every sequence length must be a multiple of that number
    (see the module docstring for the packing).

    Args:
        q: (total_local, Hq, D), this rank's queries, sequence after sequence.
        k, v: (total_local, Hkv, D / Dv), this rank's keys and values; Hq % Hkv == 0 (GQA).
        cu_seqlens: the GLOBAL offsets of the full packed sequences, int32 (B + 1,) from 0 to
            W x total_local, the same on every rank, on q's device (read to the host once per
            call). The local offsets are ``cu_seqlens // W``.
        max_seqlen: the longest global sequence (as ``attention_varlen``'s ``max_seqlen_q``);
            checked against ``cu_seqlens``.
        group: the process group (default: the whole world).
        causal: key j of a sequence visible from its query i iff j <= i (positions counted
            from the sequence's start, in the full sequence).
        dropout_p: must be 0: dropout is refused here. The single-process varlen keep-mask
            is drawn per sequence, and the block calls' global place (``dropout_layout``)
            exists only for dense calls, so no rank could draw its part of that mask.
        scale: score scale; default 1/sqrt(D).
        return_lse: also return lse (Hq, total_local) float32 of the full rows (the varlen
            lse layout); differentiable.
        deterministic: bitwise-repeatable backward (the ring's sums have a fixed order; the
            local op runs deterministic).
        backend: the backend of the local block calls: "auto" or a name, as in
            :func:`fusedlayers.attention_varlen`.
        layout: "zigzag" (default) or "contiguous", the layout the shards were cut with.

    Returns:
        out (total_local, Hq, Dv) in q's dtype, or ``(out, lse)``.

    Raises:
        ValueError / TypeError naming the argument for malformed inputs (a sequence whose
        length is not a multiple of the number of chunks names ``cu_seqlens`` and the
        sequence); ``fusedlayers.dispatch.BackendError`` when the backend asked for cannot
        serve the call.
    """
    if dropout_p != 0:
        raise ValueError(f"dropout_p = {dropout_p!r}: context_parallel_attention_varlen takes no dropout (the "
                         "varlen keep-mask is drawn per sequence and the block calls' dropout layout is for dense "
                         "calls); pass dropout_p=0, or pad the sequences and use context_parallel_attention")
    _check_qkv(q, k, v, 3, "(total_local, H, D)")
    t, hq, d = q.shape
    tk, hkv, dk = k.shape
    if tk != t or tuple(v.shape[:2]) != (tk, hkv) or dk != d:
        raise ValueError(f"q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv) disagree (self-attention: one token count): "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_heads(hq, hkv)
    layout = _check_layout(layout)
    scale = _scale_of(scale, d)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    rank, world = _group_rank_world(group)
    if isinstance(cu_seqlens, Tensor) and cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    cu, lengths = _varlen_lengths(cu_seqlens, world, layout, t * world, f"W x total_local = {world} x {t}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen must be an int >= the longest sequence of cu_seqlens ({max(lengths)}), got "
                         f"{max_seqlen!r}")
    fingerprint = (hq, hkv, d, v.shape[2], t, len(lengths), sum(i * c for i, c in enumerate(cu)) % (1 << 62))
    _check_same_shape_everywhere("context_parallel_attention_varlen: the shards (Hq, Hkv, D, Dv, total_local) and "
                                 "cu_seqlens (B, sum of i * cu_seqlens[i]), one cu_seqlens for the whole group,",
                                 fingerprint, q.device, group, world)
    packing = _Packing(lengths, world, layout, q.device)
    call = dispatch.AttentionCall(
        device=q.device, dtype=q.dtype, batch=len(lengths), heads_q=hq, heads_kv=hkv, seqlen_q=packing.max_local,
        seqlen_k=packing.max_local, head_dim=d, head_dim_v=v.shape[2], mask=None, mask_grad=False,
        causal=bool(causal), dropout_p=0.0, deterministic=bool(deterministic), varlen=True)
    empty = q.numel() == 0 or k.numel() == 0 or v.numel() == 0
    name = ops._serve_empty(backend) if empty else dispatch.select("attention", call, backend)
    out, lse = _RingAttentionVarlen.apply(q, k, v, group, bool(causal), layout, float(scale), bool(deterministic),
                                          name, packing)
    return (out, lse) if return_lse else out
