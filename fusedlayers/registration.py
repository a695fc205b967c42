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

Empty inputs never reach a kernel: an op body answers a call with no query, no key (or no
row) itself, as torch does (empty outputs; zeros and lse = -inf for queries with no key;
zero gradients), and sends the rest of the empty calls (head dim 0) to the reference.

Double backward (``create_graph=True``): when a backward formula runs with grad mode on
and one of its inputs requires grad, it computes the gradient with differentiable torch
ops instead of the opaque backward op: the reference backward for the norms (linear
memory), the reference attention (materialised scores, O(Nq * Nk) memory) and autograd
for attention; the dropout keep-mask is the forward backend's own.

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


def _acc(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision of the differentiable backward."""
    return torch.promote_types(dtype, torch.float32)


def _create_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether a backward formula runs under ``create_graph=True`` with an input that needs
    a graph: then its result must itself be differentiable."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- attention


@torch.library.custom_op("fusedlayers::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], seed: Optional[Tensor],
                  scale: float, causal: bool, bottom_right: bool, dropout_p: float, deterministic: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0:  # no query, or no key
            b, hq, nq = q.shape[:3]
            return (q.new_zeros((b, hq, nq, v.shape[3])),
                    q.new_full((b, hq, nq), float("-inf"), dtype=torch.float32))
        backend = "reference"  # head dim 0: the scores are the mask alone
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
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0:  # the output did not depend on them
            dbias = torch.zeros_like(attn_mask) if bias_grad else q.new_empty(_EMPTY)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
        backend = "reference"
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


def attention_double_backward(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                              attn_mask: Optional[Tensor], seed: Optional[Tensor], scale: float, causal: bool,
                              bottom_right: bool, dropout_p: float, backend: str, needs_input_grad) -> tuple:
    """(dq, dk, dv, dbias) of ``attention_fwd`` as a differentiable function of (dout, dlse,
    q, k, v, attn_mask): autograd through the reference attention, recomputed with the
    forward backend's keep-mask; None where ``needs_input_grad`` (4 flags) says no. For any
    autograd node of attention whose backward runs under ``create_graph=True``."""
    from . import reference

    b, hq, nq = q.shape[:3]
    keep = None
    if dropout_p > 0:
        keep = dispatch.implementation("attention", backend).dropout_keep_mask(
            _seed(seed), (b, hq, nq, k.shape[2]), dropout_p, q.device)
    acc = _acc(q.dtype)
    mask = attn_mask.to(acc) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out, lse = reference.attention(q.to(acc), k.to(acc), v.to(acc), mask, causal=causal,
                                   causal_align="bottom_right" if bottom_right else "top_left", dropout_p=dropout_p,
                                   dropout_mask=keep, scale=scale)
    wanted = [i for i in range(4) if needs_input_grad[i] and (q, k, v, attn_mask)[i] is not None]
    grads = torch.autograd.grad((out, lse), [(q, k, v, attn_mask)[i] for i in wanted],
                                (dout.to(acc), dlse.to(acc)), create_graph=True, allow_unused=True)
    result = [None] * 4
    for i, g in zip(wanted, grads):
        t = (q, k, v, attn_mask)[i]
        result[i] = torch.zeros_like(t) if g is None else g.to(t.dtype)
    return tuple(result)


def _attention_backward(ctx, dout, dlse):
    q, k, v, attn_mask, seed, out, lse = ctx.saved_tensors
    if _create_graph(dout, dlse, q, k, v, attn_mask):
        scale, causal, bottom_right, dropout_p, _ = ctx.args
        return attention_double_backward(dout, dlse, q, k, v, attn_mask, seed, scale, causal, bottom_right,
                                         dropout_p, ctx.backend, ctx.needs_input_grad[:4]) + (None,) * 7
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
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] == 0 or k.shape[0] == 0:  # no query, or no key
            from .ops import check_cu_seqlens_values

            check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
            tq, hq = q.shape[:2]
            return (q.new_zeros((tq, hq, v.shape[2])),
                    q.new_full((hq, tq), float("-inf"), dtype=torch.float32))
        backend = "reference"  # head dim 0: the scores are the mask alone
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
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        if q.shape[0] * q.shape[1] == 0 or k.shape[0] == 0:  # the output did not depend on them
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        backend = "reference"
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


def _varlen_double_backward(ctx, dout, dlse, q, k, v, cu_q, cu_k):
    """As :func:`attention_double_backward`, through the reference varlen attention."""
    from . import reference

    max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic = ctx.args
    if dropout_p > 0:
        raise NotImplementedError("fusedlayers.attention_varlen: double backward (create_graph=True) is not "
                                  "supported with dropout_p > 0")
    acc = _acc(q.dtype)
    out, lse = reference.attention_varlen(q.to(acc), k.to(acc), v.to(acc), cu_q, cu_k, causal=causal,
                                          causal_align="bottom_right" if bottom_right else "top_left", scale=scale)
    wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
    grads = torch.autograd.grad((out, lse), [(q, k, v)[i] for i in wanted], (dout.to(acc), dlse.to(acc)),
                                create_graph=True, allow_unused=True)
    result = [None] * 3
    for i, g in zip(wanted, grads):
        t = (q, k, v)[i]
        result[i] = torch.zeros_like(t) if g is None else g.to(t.dtype)
    return tuple(result) + (None,) * 11


def _varlen_backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, seed, out, lse = ctx.saved_tensors
    if _create_graph(dout, dlse, q, k, v):
        return _varlen_double_backward(ctx, dout, dlse, q, k, v, cu_q, cu_k)
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
    if x.numel() == 0:  # no row, or rows of 0 elements: nothing to normalise
        m = x.shape[0]
        keep = keeps_stream(x, residual, dropout_p, prenorm, residual_in_fp32)
        z = x.new_empty(x.shape if keep else _EMPTY, dtype=stream_dtype(x, residual, residual_in_fp32))
        mean = x.new_zeros(_EMPTY if rms else (m,), dtype=torch.float32)
        return x.new_empty(x.shape), z, mean, x.new_zeros((m,), dtype=torch.float32)
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
    if zin.numel() == 0:  # weight and bias got no contribution
        dres = zin.new_empty(zin.shape, dtype=residual_dtype) if residual_dtype is not None else None
        dw = torch.zeros_like(weight) if weight is not None else None
        db = torch.zeros_like(bias) if bias is not None else None
        dx, dres, dw, db = zin.new_empty(zin.shape, dtype=x_dtype), dres, dw, db
    else:
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
    ctx.backend = backend
    # Unused outputs get None, not zeros: dz is None unless z is used (prenorm, or a double
    # backward through a saved z), dy is None when only z is used.
    ctx.set_materialize_grads(False)


def norm_double_backward(dy: Tensor, dz: Optional[Tensor], zin: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], mean: Tensor, rstd: Tensor, seed: Optional[Tensor], eps: float,
                         dropout_p: float, rms: bool, x_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
                         backend: str) -> tuple:
    """(dx, dresidual, dweight, dbias) of ``norm_fwd`` (arguments as ``norm_bwd``'s) as a
    differentiable function of (dy, dz, zin, weight, bias): the reference backward (plain
    torch ops) with the forward backend's dropout keep-mask. For any autograd node of a
    norm whose backward runs under ``create_graph=True``."""
    acc = _acc(zin.dtype)
    reference = dispatch.implementation("norm", "reference")
    # without dropout, its dx is the gradient of z (dzin), here in the accumulation dtype
    dzin, _, dw, db = reference.backward(dy, dz, zin, weight, bias, mean, rstd, 0, eps, 0.0, rms, acc, None)
    dx = dzin
    if dropout_p > 0:
        keep = dispatch.implementation("norm", backend).dropout_keep_mask(_seed(seed), zin.shape, dropout_p,
                                                                          zin.device)
        dx = dzin * keep / (1.0 - dropout_p)
    return dx.to(x_dtype), dzin.to(residual_dtype) if residual_dtype is not None else None, dw, db


def _norm_backward(ctx, dy, dz, dmean, drstd):
    zin, weight, bias, mean, rstd, seed = ctx.saved_tensors
    eps, dropout_p, rms, x_dtype, residual_dtype = ctx.args
    if dy is None:  # only z was used
        dy = zin.new_zeros(zin.shape, dtype=x_dtype)
    if dz is not None and dz.shape != zin.shape:  # z was not kept (an empty output): no gradient
        dz = None
    if _create_graph(dy, dz, zin, weight, bias):
        return norm_double_backward(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype,
                                    residual_dtype, ctx.backend) + (None,) * 7
    dx, dres, dw, db = norm_bwd(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype,
                                residual_dtype, ctx.backend)
    return (dx, dres if residual_dtype is not None else None, dw if weight is not None else None,
            db if bias is not None else None) + (None,) * 7


norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup)
