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

What it does not do: a float bias over (query, key) pairs (only a key mask, which travels
with its keys); packed variable-length sequences (pad them and pass a key mask); a bias
gradient; double backward.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import dispatch, ops, registration

__all__ = ["context_parallel_attention", "shard", "unshard", "LAYOUTS"]

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
        rank, world = _group_rank_world(group)
        ring = _Ring(group, rank, world) if world > 1 else None
        nq, nk = q.shape[2], k.shape[2]
        b, hq = q.shape[:2]
        out_acc = q.new_zeros((b, hq, nq, v.shape[3]), dtype=torch.float32)
        lse_acc = q.new_full((b, hq, nq), float("-inf"), dtype=torch.float32)
        block = [t.contiguous() for t in (k, v, mask) if t is not None]
        mine, chunks = _chunk_ids(rank, world, layout), world * _chunks_per_rank(layout)
        for step in range(world):
            src = (rank - step) % world
            pending = ring.start(block) if step + 1 < world else None
            k_b, v_b, m_b = block[0], block[1], block[2] if mask is not None else None
            for qs, ks, blk_causal, drop_layout in _pieces(mine, _chunk_ids(src, world, layout), causal, nq, nk,
                                                           chunks, dropout_p > 0):
                o, l = registration.attention_fwd(q[:, :, qs], k_b[:, :, ks], v_b[:, :, ks], _key_mask(m_b, ks), seed,
                                                  scale, blk_causal, False, dropout_p, deterministic, backend,
                                                  dropout_layout=drop_layout)
                _merge(out_acc[:, :, qs], lse_acc[:, :, qs], o, l)
            if pending is not None:
                block, requests = pending
                _Ring.finish(requests)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, mask, out, lse_acc)
        ctx.args = (group, causal, layout, scale, deterministic, backend, dropout_p, seed)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        group, causal, layout, scale, deterministic, backend, dropout_p, seed = ctx.args
        finite = lse[torch.isfinite(lse)]
        if finite.numel() and float(finite.abs().max()) >= _LSE_LIMIT:
            raise ValueError(f"context_parallel_attention: a query row has |lse| >= {_LSE_LIMIT:g} (a huge float "
                             "bias such as finfo.min on every key of the row); the block backward cannot recover "
                             "the global softmax of such a row: pass a bool key mask instead")
        rank, world = _group_rank_world(group)
        ring = _Ring(group, rank, world) if world > 1 else None
        nq, nk = q.shape[2], k.shape[2]
        dout = dout.contiguous()
        dlse = dlse.contiguous() if dlse is not None else torch.zeros_like(lse)
        dq_acc = torch.zeros_like(q, dtype=torch.float32)
        block = [t.contiguous() for t in (k, v, mask) if t is not None]
        mine, chunks = _chunk_ids(rank, world, layout), world * _chunks_per_rank(layout)
        travelling, sent = None, None  # dK/dV of the block in hand, summed over the ranks it has visited
        for step in range(world):
            src = (rank - step) % world
            pending = ring.start(block) if step + 1 < world else None
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
        else:
            dk_home, dv_home = travelling
        return (dq_acc.to(q.dtype), dk_home.to(k.dtype), dv_home.to(v.dtype)) + (None,) * 9


# ---------------------------------------------------------------------------- public op


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
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D floating-point tensor (B, H, N_local, D), got {t.dtype} "
                             f"{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share one dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    b, hq, nq, d = q.shape
    _, hkv, nk, dk = k.shape
    if k.shape[0] != b or v.shape[0] != b or tuple(v.shape[1:3]) != (hkv, nk) or dk != d:
        raise ValueError(f"q (B, Hq, N, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) disagree: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of key/value heads "
                         f"({hkv})")
    layout = _check_layout(layout)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
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
