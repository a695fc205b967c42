"""The naive reference of every fusedlayers op: plain PyTorch, one copy.

Every kernel, test, benchmark and the ``reference`` backend measures against these
functions. They are written to be read next to the papers, not to be fast: attention
materialises the full (B, Hq, Nq, Nk) score matrix; the norms spell out mean and
variance. They compute in the dtype of their inputs, so the same function gives both the
float64 "truth" and PyTorch's own error at fp16 / bf16 / fp32 (the test method of
DESIGN.md compares a kernel's error against the latter). Everything is differentiable
with autograd; ``torch.autograd.gradcheck`` passes on each function in float64.

Semantics (shared by every backend, see README "Semantics"):

* ``attn_mask``: bool (True = attend, as in ``scaled_dot_product_attention``) or an
  additive float bias, broadcastable to (B, Hq, Nq, Nk).
* ``causal``: key j is visible from query i iff ``j <= i`` (``"top_left"``, SDPA) or
  ``j <= i + Nk - Nq`` (``"bottom_right"``, FlashAttention / KV-cache decoding).
* A query row that sees no key returns output 0, ``lse = -inf`` and gradient 0, never NaN.
* Non-finite and extreme values (this module is the truth every backend matches): a NaN
  score at an allowed position (from q, k or a float bias) makes the row's output and lse
  NaN; one at a masked-out position (bool mask, causal) is ignored. A +inf score gives lse
  +inf and a NaN output. A finite bias is the finite number it is, ``finfo.min`` included.
* Dropout drops attention probabilities after the softmax; kept entries are scaled by
  ``1 / (1 - p)``. The reference takes the keep-mask explicitly so that a kernel's own
  random stream can be checked; ``lse`` is that of the softmax before dropout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "attention",
    "attention_varlen",
    "causal_mask",
    "varlen_mask",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
]


def causal_mask(nq: int, nk: int, align: str = "top_left", device=None) -> Tensor:
    """Bool (Nq, Nk) matrix, True where query i may attend to key j.

    ``top_left``: j <= i. ``bottom_right``: j <= i + (Nk - Nq), so the last query sees
    every key (query i is token ``Nk - Nq + i`` of the key sequence)::

        Nq=2, Nk=4   top_left    bottom_right
                     1 0 0 0     1 1 1 0
                     1 1 0 0     1 1 1 1
    """
    shift = 0 if align == "top_left" else nk - nq
    i = torch.arange(nq, device=device).unsqueeze(1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    return j <= i + shift


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    causal_align: str = "top_left",
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + bias) v, naively. Returns ``(out, lse)``.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (query head h reads
    key/value head ``h // (Hq // Hkv)``). ``dropout_mask``: bool, broadcastable to
    (B, Hq, Nq, Nk), True = keep; required when ``dropout_p > 0``.
    out: (B, Hq, Nq, D) in q's dtype; lse: (B, Hq, Nq), log-sum-exp of the scaled, masked
    scores (natural log), -inf on rows that see no key.
    """
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("reference.attention: dropout_p > 0 needs an explicit dropout_mask")
    hq, hkv, nq, nk, d = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=1)  # (B, Hq, Nk, D)
    v = v.repeat_interleave(hq // hkv, dim=1)  # (B, Hq, Nk, D)

    s = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nk)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = causal_mask(nq, nk, causal_align, q.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask
    s = s.masked_fill(~allowed, float("-inf"))

    # Softmax that returns 0 (not NaN) on rows with no allowed key. A NaN score in a row makes
    # l NaN, so its p, out and lse are NaN ("seen" is l != 0, true for NaN); a +inf score gives
    # lse +inf and p = inf / inf = NaN, as torch.softmax does.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    seen = l != 0
    p = e / torch.where(seen, l, torch.ones_like(l))
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), float("-inf"))

    if dropout_p > 0:
        p = p * dropout_mask / (1.0 - dropout_p)
    out = p.to(v.dtype) @ v  # (B, Hq, Nq, D)
    out = out.masked_fill(~seen, 0.0)  # exactly 0 where no key is allowed, even if v holds NaN / inf (0 * NaN)
    return out, lse.squeeze(-1)


def varlen_mask(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, causal: bool = False,
                causal_align: str = "top_left") -> Tensor:
    """Bool (total_q, total_k) block-diagonal mask of packed sequences.

    Query token t of sequence b attends to key token u iff u belongs to sequence b (and,
    when causal, the per-sequence positions satisfy the causal rule of that sequence).
    """
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    tq, tk = int(cq[-1]), int(ck[-1])
    seq_q = torch.searchsorted(cq, torch.arange(tq, device=cq.device), right=True) - 1
    seq_k = torch.searchsorted(ck, torch.arange(tk, device=ck.device), right=True) - 1
    mask = seq_q[:, None] == seq_k[None, :]
    if causal:
        pos_q = torch.arange(tq, device=cq.device) - cq[seq_q]  # position inside its sequence
        pos_k = torch.arange(tk, device=ck.device) - ck[seq_k]
        shift = 0
        if causal_align == "bottom_right":
            shift = ((ck[1:] - ck[:-1]) - (cq[1:] - cq[:-1]))[seq_q]  # Nk_b - Nq_b per query
        mask &= pos_k[None, :] <= (pos_q + shift)[:, None]
    return mask


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    causal: bool = False,
    causal_align: str = "top_left",
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Attention over packed sequences. Returns ``(out, lse)``.

    q: (total_q, Hq, D), k/v: (total_k, Hkv, D); sequence b owns rows
    ``cu_seqlens[b]:cu_seqlens[b+1]``. out: (total_q, Hq, D); lse: (Hq, total_q) as in
    FlashAttention. ``dropout_mask``: bool (Hq, total_q, total_k). The reference runs one
    dense attention over all tokens with a block-diagonal mask: naive on purpose.
    """
    allowed = varlen_mask(cu_seqlens_q, cu_seqlens_k, causal=causal, causal_align=causal_align)
    out, lse = attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, Hq, total_q, D)
        k.transpose(0, 1).unsqueeze(0),  # (1, Hkv, total_k, D)
        v.transpose(0, 1).unsqueeze(0),
        allowed,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
        scale=scale,
    )
    return out.squeeze(0).transpose(0, 1), lse.squeeze(0)  # (total_q, Hq, D), (Hq, total_q)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim; biased variance,
    eps inside the square root: exactly ``torch.nn.functional.layer_norm``.

    Computed on the data shifted by each row's first element (the same function of x): a
    constant row then has deviations of exactly 0 and normalises to exactly 0 (bias), as in
    torch, where a plain ``x.mean()`` is off by a rounding error d and, with a small eps such as
    BERT's 1e-12, ``d / sqrt(d**2 + eps)`` is far from 0."""
    xs = x - x[..., :1].detach()
    d = xs - xs.mean(dim=-1, keepdim=True)  # x - mean(x)
    var = (d * d).mean(dim=-1, keepdim=True)
    y = d * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (``torch.nn.RMSNorm``)."""
    y = x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def add_layer_norm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    rms: bool = False,
) -> tuple[Tensor, Tensor]:
    """z = dropout(x) + residual; y = LN(z) (or RMSNorm(z) when ``rms``). Returns (y, z).

    Post-norm blocks (original Transformer, BERT) use y; pre-norm blocks (GPT) carry z on
    as the residual stream. ``dropout_mask``: bool like x, True = keep.
    """
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("reference.add_layer_norm: dropout_p > 0 needs an explicit dropout_mask")
    z = x * dropout_mask / (1.0 - dropout_p) if dropout_p > 0 else x
    if residual is not None:
        z = z + residual
    y = rms_norm(z, weight, eps) if rms else layer_norm(z, weight, bias, eps)
    return y, z
