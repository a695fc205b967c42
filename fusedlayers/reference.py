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
* Variants: ``window_size=(left, right)`` lets the query at key position p(i) (see
  ``causal_align``) see keys ``p(i) - left <= j <= p(i) + right``; ``softcap`` caps the scaled
  score as ``softcap * tanh(s / softcap)`` before any bias; ``alibi_slopes`` add
  ``-slope * |p(i) - j|``; ``sinks`` add one logit per head to each row's denominator (no
  value): a row that sees no key then returns 0 with ``lse = sink``.
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
    "attention_backward",
    "attention_probs",
    "attention_varlen",
    "causal_mask",
    "query_positions",
    "softmax_lse",
    "varlen_mask",
    "visible_keys",
    "window_bounds",
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
    return visible_keys(query_positions(nq, nk, align, device), torch.arange(nk, device=device), causal=True)


def query_positions(nq: int, nk: int, align: str = "top_left", device=None) -> Tensor:
    """The key position p(i) each query row sits at: ``i`` (``top_left``) or ``i + Nk - Nq``
    (``bottom_right``). Causal masking, the sliding window and ALiBi all measure from it."""
    return torch.arange(nq, device=device) + (nk - nq if align == "bottom_right" else 0)


def window_bounds(window_size) -> tuple[int, int]:
    """``window_size`` as (left, right) with -1 for an unbounded side (None and -1 both mean
    unbounded; so does a side of 2**32 or more, which reaches every key of sequences of fewer
    than 2**31 tokens and would overflow position arithmetic). The one normalisation every
    backend uses."""
    if window_size is None:
        return -1, -1
    return tuple(-1 if w is None or int(w) >= 2**32 else int(w) for w in window_size)


def visible_keys(pos_q: Tensor, pos_k: Tensor, *, causal: bool = False, window_size=None) -> Tensor:
    """Bool (Nq, Nk): True where the query at key position ``pos_q[i]`` sees key ``pos_k[j]``:
    ``j <= p(i)`` when causal, and ``p(i) - left <= j <= p(i) + right`` inside the window
    (an unbounded side of it does not constrain). Masks combine by AND."""
    p, j = pos_q[:, None], pos_k[None, :]
    ok = torch.ones(p.shape[0], j.shape[1], dtype=torch.bool, device=pos_q.device)
    left, right = window_bounds(window_size)
    if causal:
        ok &= j <= p
    if left >= 0:
        ok &= j >= p - left
    if right >= 0:
        ok &= j <= p + right
    return ok


def _scores(q, k, attn_mask, allowed, pos_q, pos_k, scale, softcap, alibi_slopes):
    """The scores every variant defines, for the forward and the explicit backward.

    Returns ``(s, cap_grad)``: s (B, Hq, Nq, Nk) is q k^T * scale, soft-capped
    (``softcap * tanh(s / softcap)``), plus ALiBi's ``-slope * |p(i) - j|`` and the float bias,
    -inf where ``allowed`` (bool, broadcastable) is False; ``cap_grad`` is d(capped)/d(s) (None
    without a softcap). k is already expanded to Hq heads."""
    s = (q @ k.transpose(-2, -1)) * scale
    cap_grad = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s, cap_grad = softcap * t, 1 - t * t
    if alibi_slopes is not None:
        dist = (pos_q[:, None] - pos_k[None, :]).abs().to(s.dtype)  # (Nq, Nk)
        slopes = alibi_slopes.to(s.dtype)
        if slopes.dim() == 1:  # (Hq,)
            slopes = slopes.view(1, -1, 1, 1)
        elif slopes.dim() == 2:  # (B, Hq); the varlen reference passes (1, Hq, Tq, 1)
            slopes = slopes.view(*slopes.shape, 1, 1)
        s = s - slopes * dist
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s, cap_grad


def softmax_lse(s: Tensor, sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over the last dim that is 0 (not NaN) on a row with no key. The one copy of it.

    s: scores, -inf where masked. ``sinks``: one logit per head (dim -3 of s), joining each
    row's denominator and carrying no value: ``P_ij = exp(s_ij) / (exp(sink) + sum_j
    exp(s_ij))``. Returns ``(p, lse, has_key)``: p like s; lse (..., Nq), the natural-log
    sum-exp of the row (sink included), -inf on a row with no key and no sink; has_key
    (..., Nq, 1) True where some key has weight. A NaN score in a row makes its p and lse
    NaN; a +inf score gives lse +inf and p NaN, as ``torch.softmax`` does.
    """
    m = s.amax(dim=-1, keepdim=True)
    sink = None
    if sinks is not None:
        sink = sinks.to(s.dtype).view(-1, 1, 1).expand(*s.shape[:-1], 1)
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    l_keys = e.sum(dim=-1, keepdim=True)
    l = l_keys + torch.exp(sink - m) if sink is not None else l_keys
    seen = l != 0
    p = e / torch.where(seen, l, torch.ones_like(l))
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), float("-inf"))
    return p, lse.squeeze(-1), l_keys != 0


def _expand_heads(t: Tensor, hq: int) -> Tensor:
    """(B, Hkv, N, D) -> (B, Hq, N, D): query head h reads KV head ``h // (Hq // Hkv)``."""
    return t.repeat_interleave(hq // t.shape[1], dim=1)


def _attention(q, k, v, attn_mask, allowed, pos_q, pos_k, *, scale, softcap, alibi_slopes, sinks, dropout_p,
               dropout_mask):
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("reference.attention: dropout_p > 0 needs an explicit dropout_mask")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])  # (B, Hq, Nk, D)
    s, _ = _scores(q, k, attn_mask, allowed, pos_q, pos_k, scale, softcap, alibi_slopes)
    p, lse, has_key = softmax_lse(s, sinks)
    if dropout_p > 0:
        p = p * dropout_mask / (1.0 - dropout_p)
    out = p.to(v.dtype) @ v  # (B, Hq, Nq, D)
    out = out.masked_fill(~has_key, 0.0)  # exactly 0 where no key is allowed, even if v holds NaN / inf (0 * NaN)
    return out, lse


def _dense_layout(q, k, attn_mask, causal, causal_align, window_size):
    """(pos_q, pos_k, allowed) of a dense call: the query positions p(i), the key positions and
    the keys each query sees (causal, window and a bool mask, ANDed)."""
    nq, nk = q.shape[2], k.shape[2]
    pos_q, pos_k = query_positions(nq, nk, causal_align, q.device), torch.arange(nk, device=q.device)
    allowed = visible_keys(pos_q, pos_k, causal=causal, window_size=window_size)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    return pos_q, pos_k, allowed


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
    window_size=None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + bias) v, naively. Returns ``(out, lse)``.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (query head h reads
    key/value head ``h // (Hq // Hkv)``). ``dropout_mask``: bool, broadcastable to
    (B, Hq, Nq, Nk), True = keep; required when ``dropout_p > 0``.
    Variants (see :func:`visible_keys`, :func:`softmax_lse`): ``window_size=(left, right)``
    local attention; ``softcap > 0`` caps ``s = q k^T * scale`` as ``softcap * tanh(s /
    softcap)`` before any bias; ``alibi_slopes`` (Hq,) or (B, Hq) adds ``-slope * |p(i) - j|``;
    ``sinks`` (Hq,) one extra logit per head in each row's denominator.
    out: (B, Hq, Nq, D) in q's dtype; lse: (B, Hq, Nq), log-sum-exp of the scaled, masked
    scores (natural log, sink included), -inf on rows that see no key and have no sink.
    """
    pos_q, pos_k, allowed = _dense_layout(q, k, attn_mask, causal, causal_align, window_size)
    return _attention(q, k, v, attn_mask, allowed, pos_q, pos_k, scale=scale, softcap=softcap,
                      alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, dropout_mask=dropout_mask)


def attention_probs(
    q: Tensor,
    k: Tensor,
    attn_mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    causal_align: str = "top_left",
    scale: Optional[float] = None,
    window_size=None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """The attention weights P (B, Hq, Nq, Nk) of :func:`attention` (before dropout), 0 where a
    key is masked and on rows that see no key. Arguments as :func:`attention`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pos_q, pos_k, allowed = _dense_layout(q, k, attn_mask, causal, causal_align, window_size)
    s, _ = _scores(q, _expand_heads(k, q.shape[1]), attn_mask, allowed, pos_q, pos_k, scale, softcap, alibi_slopes)
    return softmax_lse(s, sinks)[0]


def attention_backward(
    dout: Tensor,
    dlse: Optional[Tensor],
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
    window_size=None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    allowed: Optional[Tensor] = None,
    positions: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The gradient of :func:`attention`, spelled out with the score matrix, in the names the
    kernels use (P, dP, Delta, dS). Computes in the dtype of its inputs.

    Arguments as :func:`attention`, plus ``dout`` (like out) and ``dlse`` (like lse, or None).
    ``allowed`` and ``positions`` (pos_q, pos_k) replace the dense visibility rule (the varlen
    reference passes its block-diagonal ones). Returns ``(dq, dk, dv, dS, dsinks)``: dS is the
    gradient of the score after the softcap (that of a float bias, before summing over its
    broadcast dims); dsinks (Hq,) or None.

        dV = (P * keep / (1 - p))^T dO        dP = dO V^T * keep / (1 - p)
        Delta_i = sum_j P_ij dP_ij            dS = P * (dP - Delta + dlse)
        dQ = dS' K * scale, dK = dS'^T Q * scale, dS' = dS * d(softcap)/ds
        dsink_h = sum_i P_sink,i * (dlse_i - Delta_i),   P_sink,i = exp(sink_h - lse_i)
    """
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf, vf = _expand_heads(k, hq), _expand_heads(v, hq)  # (B, Hq, Nk, D)
    if positions is None or allowed is None:  # the dense rule (the varlen reference passes both)
        pos_q, pos_k, dense = _dense_layout(q, k, attn_mask, causal, causal_align, window_size)
        positions = (pos_q, pos_k) if positions is None else positions
        allowed = dense if allowed is None else allowed
    s, cap_grad = _scores(q, kf, attn_mask, allowed, *positions, scale, softcap, alibi_slopes)
    p, lse, _ = softmax_lse(s, sinks)  # P again at the input precision
    drop = dropout_mask / (1.0 - dropout_p) if dropout_p > 0 else 1.0

    dv = (p * drop).transpose(-2, -1) @ dout  # dV
    dp = (dout @ vf.transpose(-2, -1)) * drop  # dP
    delta = (p * dp).sum(dim=-1, keepdim=True)  # Delta_i = sum_j P_ij dP_ij (= rowsum(dO * O))
    dl = dlse.unsqueeze(-1) if dlse is not None else torch.zeros_like(delta)
    ds = p * (dp - delta + dl)  # dS; lse's own gradient adds P * dlse
    dsr = ds * cap_grad if cap_grad is not None else ds
    dq = (dsr @ kf) * scale
    dk = (dsr.transpose(-2, -1) @ q) * scale
    dk = dk.view(b, hkv, group, nk, -1).sum(dim=2)  # GQA: a KV head's gradient sums over its query heads
    dv = dv.view(b, hkv, group, nk, -1).sum(dim=2)
    dsinks = None
    if sinks is not None:
        p_sink = torch.exp(sinks.to(lse.dtype).view(-1, 1) - lse)  # (B, Hq, Nq)
        p_sink = torch.where(lse == float("-inf"), 0.0, p_sink)  # a -inf sink on a row with no key
        dsinks = (p_sink * (dl - delta).squeeze(-1)).sum(dim=(0, 2))
    return dq, dk, dv, ds, dsinks


def _varlen_layout(cu_seqlens_q, cu_seqlens_k, causal, causal_align, window_size):
    """Packed sequences as one dense problem: (allowed (Tq, Tk) block-diagonal, pos_q, pos_k,
    seq_q) with positions inside each sequence (pos_q already aligned)."""
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    tq, tk = int(cq[-1]), int(ck[-1])
    seq_q = torch.searchsorted(cq, torch.arange(tq, device=cq.device), right=True) - 1
    seq_k = torch.searchsorted(ck, torch.arange(tk, device=ck.device), right=True) - 1
    pos_q = torch.arange(tq, device=cq.device) - cq[seq_q]  # position inside its sequence
    pos_k = torch.arange(tk, device=ck.device) - ck[seq_k]
    if causal_align == "bottom_right":
        pos_q = pos_q + ((ck[1:] - ck[:-1]) - (cq[1:] - cq[:-1]))[seq_q]  # + Nk_b - Nq_b
    allowed = (seq_q[:, None] == seq_k[None, :]) & visible_keys(pos_q, pos_k, causal=causal, window_size=window_size)
    return allowed, pos_q, pos_k, seq_q


def varlen_mask(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, causal: bool = False,
                causal_align: str = "top_left", window_size=None) -> Tensor:
    """Bool (total_q, total_k) block-diagonal mask of packed sequences.

    Query token t of sequence b attends to key token u iff u belongs to sequence b (and,
    when causal or windowed, the per-sequence positions satisfy that rule)."""
    return _varlen_layout(cu_seqlens_q, cu_seqlens_k, causal, causal_align, window_size)[0]


def _varlen_slopes(alibi_slopes, seq_q):
    """(B, Hq) slopes as one row per packed query token, broadcastable to (1, Hq, Tq, 1)."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[seq_q].transpose(0, 1)[None, :, :, None]


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
    window_size=None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Attention over packed sequences. Returns ``(out, lse)``.

    q: (total_q, Hq, D), k/v: (total_k, Hkv, D); sequence b owns rows
    ``cu_seqlens[b]:cu_seqlens[b+1]``. out: (total_q, Hq, D); lse: (Hq, total_q) as in
    FlashAttention. ``dropout_mask``: bool (Hq, total_q, total_k). Variants as
    :func:`attention`, positions counted inside each sequence (``alibi_slopes`` (B, Hq) per
    sequence). The reference runs one dense attention over all tokens with a block-diagonal
    mask: naive on purpose.
    """
    allowed, pos_q, pos_k, seq_q = _varlen_layout(cu_seqlens_q, cu_seqlens_k, causal, causal_align, window_size)
    out, lse = _attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, Hq, total_q, D)
        k.transpose(0, 1).unsqueeze(0),  # (1, Hkv, total_k, D)
        v.transpose(0, 1).unsqueeze(0),
        None, allowed, pos_q, pos_k, scale=scale, softcap=softcap,
        alibi_slopes=_varlen_slopes(alibi_slopes, seq_q), sinks=sinks, dropout_p=dropout_p,
        dropout_mask=dropout_mask,
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
