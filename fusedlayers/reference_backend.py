"""The ``reference`` backend: the naive reference (``fusedlayers.reference``) behind the
backend interface of ``fusedlayers.dispatch``.

Forward runs ``reference.attention``; backward runs ``reference.attention_backward``, the
textbook gradient spelled out with the score matrix (autograd is off inside a custom op's
body), itself tested against autograd through the float64 reference. Dropout keep-masks come from a ``torch.Generator`` on the inputs' device seeded with the
op's seed, so backward regenerates exactly the forward's mask.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import reference


def _keep_mask(seed: int, shape, dropout_p: float, device) -> Tensor:
    """Bool keep-mask (True = keep) of the reference backend's random stream."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _attention_keep_mask(seed: int, q, k, dropout_p: float, dropout_layout) -> Optional[Tensor]:
    """The keep-mask (B, Hq, Nq, Nk) of a dense call, or None without dropout: the block at
    (row0, col0) of the (B, Hq, rows, cols) mask under ``dropout_layout`` (see
    ``fusedlayers.registration``)."""
    if dropout_p <= 0:
        return None
    b, hq, nq = q.shape[:3]
    nk = k.shape[2]
    if dropout_layout is None:
        return _keep_mask(seed, (b, hq, nq, nk), dropout_p, q.device)
    row0, col0, rows, cols = dropout_layout
    return _keep_mask(seed, (b, hq, rows, cols), dropout_p, q.device)[..., row0:row0 + nq, col0:col0 + nk]


def _align(bottom_right: bool) -> str:
    return "bottom_right" if bottom_right else "top_left"


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the backward: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sums t over the dims where ``shape`` broadcasts (size 1)."""
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _contiguous(*tensors):
    return tuple(t.contiguous() if t is not None else None for t in tensors)


# ----------------------------------------------------------------------------- attention


def _attention_why_not(call) -> Optional[str]:
    return None


def _mods_kwargs(mods, acc):
    """The reference's keyword arguments of the call's score variants, at precision ``acc``."""
    if mods is None:
        return {}
    kw = mods.reference_kwargs()
    for name in ("alibi_slopes", "sinks"):
        if kw[name] is not None:
            kw[name] = kw[name].to(acc)
    return kw


def _attention_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, mods=None,
                       dropout_layout=None):
    acc = _acc(q.dtype)  # float32 accumulation, as every backend promises
    keep = _attention_keep_mask(seed, q, k, dropout_p, dropout_layout)
    mask = attn_mask.to(acc) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out, lse = reference.attention(q.to(acc), k.to(acc), v.to(acc), mask, causal=causal,
                                   causal_align=_align(bottom_right), dropout_p=dropout_p, dropout_mask=keep,
                                   scale=scale, **_mods_kwargs(mods, acc))
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def _attention_backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p,
                        deterministic, bias_grad, mods=None, dropout_layout=None):
    # P again at the accumulation precision (the saved lse is float32, which would cap a float64 gradient at ~1e-7)
    acc = _acc(q.dtype)
    keep = _attention_keep_mask(seed, q, k, dropout_p, dropout_layout)
    mask = attn_mask.to(acc) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    dq, dk, dv, ds, _ = reference.attention_backward(
        dout.to(acc), dlse.to(acc), q.to(acc), k.to(acc), v.to(acc), mask, causal=causal,
        causal_align=_align(bottom_right), dropout_p=dropout_p, dropout_mask=keep, scale=scale,
        **_mods_kwargs(mods, acc))
    dbias = _sum_to(ds, attn_mask.shape).to(attn_mask.dtype) if bias_grad else None
    return _contiguous(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias)


def _varlen_as_dense(q, k, v, cu_q, cu_k, causal, bottom_right, mods):
    """Packed (T, H, D) inputs as one dense (1, H, T, D) problem with a block-diagonal mask, the
    positions inside each sequence and ALiBi's per-sequence slopes as one row per query."""
    window = (mods.window_left, mods.window_right) if mods is not None else None
    allowed, pos_q, pos_k, seq_q = reference._varlen_layout(cu_q, cu_k, causal, _align(bottom_right), window)
    dense = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    slopes = reference._varlen_slopes(mods.alibi_slopes, seq_q) if mods is not None else None
    return dense, allowed, (pos_q, pos_k), slopes


def _varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right, dropout_p, mods=None):
    from .ops import check_cu_seqlens_values  # the op body runs eagerly: values can be read

    check_cu_seqlens_values(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    acc = _acc(q.dtype)
    keep = _keep_mask(seed, (1, q.shape[1], q.shape[0], k.shape[0]), dropout_p, q.device) if dropout_p > 0 else None
    out, lse = reference.attention_varlen(q.to(acc), k.to(acc), v.to(acc), cu_q, cu_k, causal=causal,
                                          causal_align=_align(bottom_right), dropout_p=dropout_p,
                                          dropout_mask=keep[0] if keep is not None else None, scale=scale,
                                          **_mods_kwargs(mods, acc))
    return out.to(q.dtype).contiguous(), lse.float().contiguous()  # (Tq, Hq, Dv), (Hq, Tq)


def _varlen_backward(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, seed, scale, causal, bottom_right,
                     dropout_p, deterministic, mods=None):
    from .ops import check_cu_seqlens_values

    check_cu_seqlens_values(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    acc = _acc(q.dtype)
    (qd, kd, vd), allowed, positions, slopes = _varlen_as_dense(q, k, v, cu_q, cu_k, causal, bottom_right, mods)
    keep = _keep_mask(seed, (1, q.shape[1], q.shape[0], k.shape[0]), dropout_p, q.device) if dropout_p > 0 else None
    kw = _mods_kwargs(mods, acc)
    kw.pop("window_size", None)  # in `allowed`
    kw["alibi_slopes"] = slopes.to(acc) if slopes is not None else None
    dq, dk, dv, _, _ = reference.attention_backward(
        dout.transpose(0, 1).unsqueeze(0).to(acc), dlse.unsqueeze(0).to(acc), qd.to(acc), kd.to(acc), vd.to(acc),
        None, dropout_p=dropout_p, dropout_mask=keep, scale=scale, allowed=allowed, positions=positions, **kw)
    return _contiguous(*(t[0].transpose(0, 1).to(x.dtype) for t, x in ((dq, q), (dk, k), (dv, v))))


attention = SimpleNamespace(
    VARIANTS=frozenset({"window_size", "softcap", "alibi_slopes", "sinks", "dropout_layout"}),
    why_not=_attention_why_not,
    forward=_attention_forward,
    backward=_attention_backward,
    varlen_forward=_varlen_forward,
    varlen_backward=_varlen_backward,
    dropout_keep_mask=_keep_mask,
)


# ---------------------------------------------------------------------------- norms


def _shifted_mean(z: Tensor) -> Tensor:
    """Row means of z (M, N) taken on the data shifted by each row's first element: exact (the
    value itself) for a constant row, so its deviations are exactly 0 (see reference.layer_norm)."""
    if z.shape[-1] == 0:
        return z.mean(dim=-1)
    return z[:, 0] + (z - z[:, :1]).mean(dim=-1)


def _norm_why_not(call) -> Optional[str]:
    return None


def _normalize(z: Tensor, weight, bias, eps, rms):
    return reference.rms_norm(z, weight, eps) if rms else reference.layer_norm(z, weight, bias, eps)


def _norm_forward(x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, needs_grad=True):
    from .registration import keeps_stream, stream_dtype

    acc = _acc(x.dtype)  # float32 accumulation, as every backend promises
    z = x.to(acc)
    if dropout_p > 0:
        z = z * _keep_mask(seed, x.shape, dropout_p, x.device) / (1.0 - dropout_p)
    if residual is not None:
        z = z + residual.to(acc)
    y = _normalize(z, *(t.to(acc) if t is not None else None for t in (weight, bias)), eps, rms)
    mean = _shifted_mean(z)
    rstd = torch.rsqrt((z * z if rms else (z - mean[:, None]) ** 2).mean(dim=-1) + eps)
    empty = x.new_empty(0, dtype=torch.float32)
    z_dtype = stream_dtype(x, residual, residual_in_fp32)
    z_out = z.to(z_dtype, copy=True) if keeps_stream(
        x, residual, dropout_p, prenorm, residual_in_fp32, needs_grad) else x.new_empty(0, dtype=z_dtype)
    return y.to(x.dtype).contiguous(), z_out.contiguous(), empty if rms else mean.float(), rstd.float()


def _norm_backward(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype, residual_dtype):
    acc = _acc(zin.dtype)
    z, g = zin.to(acc), dy.to(acc)
    # mean and rstd again, at the accumulation precision (the saved ones are float32)
    mu = torch.zeros_like(z[:, :1]) if rms else _shifted_mean(z)[:, None]
    rstd = torch.rsqrt(((z - mu) ** 2).mean(dim=-1, keepdim=True) + eps)
    xhat = (z - mu) * rstd  # x-hat, the normalised input
    wdy = g * weight.to(acc) if weight is not None else g  # dL/d(x-hat)
    c1 = (xhat * wdy).mean(dim=-1, keepdim=True)
    c2 = 0 if rms else wdy.mean(dim=-1, keepdim=True)
    dzin = (wdy - xhat * c1 - c2) * rstd  # dz = rstd * (wdy - mean(wdy) - xhat * mean(xhat * wdy))
    if dz is not None:
        dzin = dzin + dz.to(acc)  # the residual stream's own gradient (prenorm)
    dw = (g * xhat).sum(dim=0).to(weight.dtype) if weight is not None else None
    db = g.sum(dim=0).to(bias.dtype) if bias is not None else None
    dx = dzin
    if dropout_p > 0:
        dx = dzin * _keep_mask(seed, zin.shape, dropout_p, zin.device) / (1.0 - dropout_p)
    dres = dzin.to(residual_dtype, copy=True) if residual_dtype is not None else None
    return _contiguous(dx.to(x_dtype), dres, dw, db)


norm = SimpleNamespace(
    why_not=_norm_why_not,
    forward=_norm_forward,
    backward=_norm_backward,
    dropout_keep_mask=_keep_mask,
)
