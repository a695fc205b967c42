"""The torch.library ops of fusedlayers: schemas, fake implementations, autograd formulas.

Every public op runs through one of three op pairs in namespace ``fusedlayers``:

====================  ======================================================================
``attention_fwd``     (q, k, v, attn_mask?, seed?, scale, causal, bottom_right, dropout_p,
                      deterministic, backend) -> (out (B,Hq,Nq,Dv), lse (B,Hq,Nq) fp32)
``attention_bwd``     (dout, dlse, q, k, v, attn_mask?, out, lse, seed?, ..., bias_grad,
                      backend) -> (dq, dk, dv, dbias: mask's shape, or empty)
``varlen_fwd``        (q (Tq,Hq,D), k, v (Tk,Hkv,D), cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, seed?, ...) -> (out (Tq,Hq,Dv), lse (Hq,Tq))
``varlen_bwd``        -> (dq, dk, dv)
``norm_fwd``          (x (M,N), residual?, weight?, bias?, seed?, eps, dropout_p, rms, prenorm,
                      residual_in_fp32, backend) -> (y (M,N), z, mean (M,), rstd (M,))
``norm_bwd``          (dy, dz?, zin, weight?, bias?, mean, rstd, seed?, eps, dropout_p, rms,
                      x_dtype, residual_dtype?, backend) -> (dx, dresidual, dweight, dbias)
====================  ======================================================================

Conventions every backend keeps: outputs are new contiguous tensors; ``attn_mask`` is
4-D, each dim either 1 (broadcast) or full size; ``lse`` is float32, natural log, -inf on
rows that see no key; ``seed`` is a CPU int64 scalar drawn from torch's default generator
when ``dropout_p > 0`` (the backend turns it into its own keep-mask and regenerates the
same mask in backward). For the norms, ``z = dropout(x) + residual`` is the pre-norm
residual stream: it is returned (dtype float32 if ``residual_in_fp32``, else residual's,
else x's) when there is a residual, dropout or ``prenorm``, otherwise it is empty and
``zin = x``; ``mean`` is empty for RMS norm. Unneeded outputs are empty tensors, since a
custom op cannot return None.

The op bodies look up the backend in ``fusedlayers.dispatch`` by name; the backend name
is chosen before the op runs (``fusedlayers.ops``), so ``torch.compile(fullgraph=True)``
sees one opaque op per call and never a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch

_EMPTY = (0,)


def _seed(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


# ----------------------------------------------------------------------------- attention


@torch.library.custom_op("fusedlayers::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], seed: Optional[Tensor],
                  scale: float, causal: bool, bottom_right: bool, dropout_p: float, deterministic: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    impl = dispatch.implementation("attention", backend)
    return impl.forward(q, k, v, attn_mask, _seed(seed), scale, causal, bottom_right, dropout_p)


@attention_fwd.register_fake
def _(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, deterministic, backend):
    b, hq, nq = q.shape[:3]
    return q.new_empty((b, hq, nq, v.shape[3])), q.new_empty((b, hq, nq), dtype=torch.float32)


@torch.library.custom_op("fusedlayers::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                  out: Tensor, lse: Tensor, seed: Optional[Tensor], scale: float, causal: bool, bottom_right: bool,
                  dropout_p: float, deterministic: bool, bias_grad: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = dispatch.implementation("attention", backend)
    dq, dk, dv, dbias = impl.backward(dout, dlse, q, k, v, attn_mask, out, lse, _seed(seed), scale, causal,
                                      bottom_right, dropout_p, deterministic, bias_grad)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(_EMPTY)


@attention_bwd.register_fake
def _(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p, deterministic,
      bias_grad, backend):
    dbias = attn_mask.new_empty(attn_mask.shape) if bias_grad else q.new_empty(_EMPTY)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, deterministic, backend = inputs
    ctx.save_for_backward(q, k, v, attn_mask, seed, *output)
    ctx.args = (scale, causal, bottom_right, dropout_p, deterministic)
    ctx.backend = backend


def _attention_backward(ctx, dout, dlse):
    q, k, v, attn_mask, seed, out, lse = ctx.saved_tensors
    bias_grad = attn_mask is not None and ctx.needs_input_grad[3]
    scale, causal, bottom_right, dropout_p, deterministic = ctx.args
    dq, dk, dv, dbias = attention_bwd(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right,
                                      dropout_p, deterministic, bias_grad, ctx.backend)
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# ------------------------------------------------------------------- attention, varlen


@torch.library.custom_op("fusedlayers::varlen_fwd", mutates_args=())
def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
               max_seqlen_k: int, seed: Optional[Tensor], scale: float, causal: bool, bottom_right: bool,
               dropout_p: float, deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    impl = dispatch.implementation("attention", backend)
    return impl.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, _seed(seed),
                               scale, causal, bottom_right, dropout_p)


@varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, causal, bottom_right,
      dropout_p, deterministic, backend):
    tq, hq = q.shape[:2]
    return q.new_empty((tq, hq, v.shape[2])), q.new_empty((hq, tq), dtype=torch.float32)


@torch.library.custom_op("fusedlayers::varlen_bwd", mutates_args=())
def varlen_bwd(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, out: Tensor, lse: Tensor,
               seed: Optional[Tensor], scale: float, causal: bool, bottom_right: bool, dropout_p: float,
               deterministic: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = dispatch.implementation("attention", backend)
    return impl.varlen_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out,
                                lse, _seed(seed), scale, causal, bottom_right, dropout_p, deterministic)


@varlen_bwd.register_fake
def _(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, seed, scale, causal,
      bottom_right, dropout_p, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right, dropout_p, deterministic,
     backend) = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, seed, *output)
    ctx.args = (max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic)
    ctx.backend = backend


def _varlen_backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, seed, out, lse = ctx.saved_tensors
    max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic = ctx.args
    dq, dk, dv = varlen_bwd(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, seed, scale, causal,
                            bottom_right, dropout_p, deterministic, ctx.backend)
    return (dq, dk, dv) + (None,) * 11


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ---------------------------------------------------------------------------- norms


def stream_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    """dtype of z = dropout(x) + residual, the residual stream."""
    if residual_in_fp32:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def keeps_stream(x: Tensor, residual: Optional[Tensor], dropout_p: float, prenorm: bool,
                 residual_in_fp32: bool) -> bool:
    """Whether norm_fwd materialises z (otherwise z is x itself and is not stored)."""
    return (residual is not None or dropout_p > 0 or prenorm
            or stream_dtype(x, residual, residual_in_fp32) != x.dtype)


@torch.library.custom_op("fusedlayers::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
             seed: Optional[Tensor], eps: float, dropout_p: float, rms: bool, prenorm: bool, residual_in_fp32: bool,
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = dispatch.implementation("norm", backend)
    return impl.forward(x, residual, weight, bias, _seed(seed), eps, dropout_p, rms, prenorm, residual_in_fp32)


@norm_fwd.register_fake
def _(x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, backend):
    m = x.shape[0]
    keep = keeps_stream(x, residual, dropout_p, prenorm, residual_in_fp32)
    z = x.new_empty(x.shape if keep else _EMPTY, dtype=stream_dtype(x, residual, residual_in_fp32))
    mean = x.new_empty(_EMPTY if rms else (m,), dtype=torch.float32)
    return x.new_empty(x.shape), z, mean, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("fusedlayers::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, dz: Optional[Tensor], zin: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             mean: Tensor, rstd: Tensor, seed: Optional[Tensor], eps: float, dropout_p: float, rms: bool,
             x_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = dispatch.implementation("norm", backend)
    dx, dres, dw, db = impl.backward(dy, dz, zin, weight, bias, mean, rstd, _seed(seed), eps, dropout_p, rms,
                                     x_dtype, residual_dtype)
    return tuple(t if t is not None else zin.new_empty(_EMPTY) for t in (dx, dres, dw, db))


@norm_bwd.register_fake
def _(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype, residual_dtype, backend):
    dres = zin.new_empty(zin.shape if residual_dtype is not None else _EMPTY, dtype=residual_dtype or zin.dtype)
    dw = weight.new_empty(weight.shape) if weight is not None else zin.new_empty(_EMPTY)
    db = bias.new_empty(bias.shape) if bias is not None else zin.new_empty(_EMPTY)
    return zin.new_empty(zin.shape, dtype=x_dtype), dres, dw, db


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, backend = inputs
    y, z, mean, rstd = output
    ctx.save_for_backward(z if z.numel() else x, weight, bias, mean, rstd, seed)
    ctx.args = (eps, dropout_p, rms, x.dtype, residual.dtype if residual is not None else None)
    ctx.prenorm = prenorm
    ctx.backend = backend


def _norm_backward(ctx, dy, dz, dmean, drstd):
    zin, weight, bias, mean, rstd, seed = ctx.saved_tensors
    eps, dropout_p, rms, x_dtype, residual_dtype = ctx.args
    dx, dres, dw, db = norm_bwd(dy, dz if ctx.prenorm else None, zin, weight, bias, mean, rstd, seed, eps, dropout_p,
                                rms, x_dtype, residual_dtype, ctx.backend)
    return (dx, dres if residual_dtype is not None else None, dw if weight is not None else None,
            db if bias is not None else None) + (None,) * 7


norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup)
