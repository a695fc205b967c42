"""Public functional ops of fusedlayers: validate, choose a backend, call the registered op.

Each function checks its inputs before any kernel runs (a bad argument raises a
``ValueError`` or ``TypeError`` naming it), asks ``fusedlayers.dispatch`` for a backend,
and calls the ``torch.library`` op of ``fusedlayers.registration``, which carries the
autograd formula and the fake implementation for ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _ext, dispatch, reference, registration
from .dispatch import AttentionCall, NormCall

__all__ = ["attention", "attention_varlen", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]

_ALIGNS = ("top_left", "bottom_right")

# The eager fast path (csrc/eager.cpp): validation, the cpu backend's kernel call and the
# autograd node in C++, for the calls it can serve (plain CPU tensors in the kernels' dtypes
# and layouts, no dropout; it answers None for any other call). It stands for the ``cpu``
# backend, so it serves backend="auto" only while the dispatch table puts ``cpu`` first for
# CPU tensors. torch.compile never takes it: it traces the torch.library ops.
_FAST = _ext.FAST
_FAST_BACKENDS = ("auto", "cpu") if dispatch.AUTO_ORDER.get("cpu", ("",))[0] == "cpu" else ("cpu",)
_compiling = torch.compiler.is_compiling


def _refresh_fast() -> None:  # a first-use build loaded the extension in this process
    global _FAST
    _FAST = _ext.FAST


_ext.on_load(_refresh_fast)


def fast_norm(x, residual, weight, bias, eps, norm_ndim, rms, prenorm, residual_in_fp32, backend):
    """The fast path's answer to a norm call with no dropout (``y`` or ``(y, z)``), or None
    when the call is for the Python path. ``norm_ndim``: how many trailing dims of x form
    one normalised row (``normalized_shape``'s length)."""
    if _FAST is None or backend not in _FAST_BACKENDS or _compiling():
        return None
    return _FAST.norm(x, residual, weight, bias, eps, norm_ndim, rms, bool(prenorm), bool(residual_in_fp32))


# ---------------------------------------------------------------------------- checks


def _tensor(name: str, t, dims: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32), got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def _serve_empty(backend: str) -> str:
    """The backend name for a call with an empty tensor: no kernel runs (the op bodies of
    ``fusedlayers.registration`` answer it, as torch does, with empty or zero outputs), so
    any valid name serves it; ``reference`` computes the few empty calls whose output is
    not empty (head dim 0)."""
    if backend != "auto" and backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, dispatch.BACKENDS))}, "
                         f"got {backend!r}")
    return "reference"


def _same(names: str, tensors, what: str) -> None:
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values):
        listing = ", ".join(f"{n}: {v}" for n, v in zip(names.split(), values))
        raise ValueError(f"{' '.join(names.split())} must share one {what} ({listing})")


def _probability(name: str, p) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def _check_mask(attn_mask, q: Tensor, full: tuple) -> Optional[Tensor]:
    """Validates attn_mask against the (B, Hq, Nq, Nk) scores; returns it as a 4-D view."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"attn_mask must be bool (True = attend) or a float bias of q's dtype ({q.dtype}) or "
                        f"float32, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(m not in (1, f) for m, f in zip(shape[::-1], full[::-1])):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to the scores (B, Hq, Nq, Nk) = {full}: "
                         "each dim must be 1 or full size")
    return attn_mask.reshape((1,) * (4 - len(shape)) + shape)


def _check_attention_args(q, causal_align, dropout_p, scale):
    if causal_align not in _ALIGNS:
        raise ValueError(f"causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}")
    dropout_p = _probability("dropout_p", dropout_p)
    if scale is None:  # head dim 0: every score is 0 whatever the scale
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return dropout_p, float(scale)


def _check_mods(q: Tensor, window_size, softcap, alibi_slopes, sinks, batch: int, heads_q: int):
    """Validates the score variants; returns them as ``registration.ScoreMods``."""
    left = right = -1
    if window_size is not None:
        if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or any(
                w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < -1) for w in window_size):
            raise ValueError(f"window_size must be None or a pair (left, right) of ints >= 0, or -1 / None for an "
                             f"unbounded side, got {window_size!r}")
        left, right = reference.window_bounds(window_size)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (softcap >= 0 and
                                                                                  math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    for name, t, shapes in (("alibi_slopes", alibi_slopes, ((heads_q,), (batch, heads_q))),
                            ("sinks", sinks, ((heads_q,),))):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor or None, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(str(x) for x in shapes)} (Hq = {heads_q}), "
                             f"got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if alibi_slopes is not None and alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (as in FlashAttention), got {alibi_slopes.dtype}")
    if alibi_slopes is not None and alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes are constants: no gradient is computed for them (detach them)")
    return registration.ScoreMods(left, right, float(softcap), alibi_slopes, sinks)


def _call_variants(mods) -> dict:
    """The AttentionCall fields of the score variants."""
    return dict(window=(mods.window_left, mods.window_right), softcap=mods.softcap,
                alibi=mods.alibi_slopes is not None, sinks=mods.sinks is not None,
                sinks_grad=mods.sinks is not None and mods.sinks.requires_grad)


def _draw_seed(dropout_p: float) -> Optional[Tensor]:
    """Dropout seed from torch's default (CPU) generator: torch.manual_seed reproduces it. Odd: Triton specialises
    an int argument divisible by 16 (or equal to 1) into a build of its own, so an odd seed above 2**31 keeps every
    dropout call in the one build the resource check compiles."""
    if dropout_p == 0:
        return None
    return torch.randint(2**30, 2**61, (), dtype=torch.int64) * 2 + 1


def check_cu_seqlens_values(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, total_k: int,
                            max_seqlen_q: int, max_seqlen_k: int) -> None:
    """Checks the values of cu_seqlens (reads them, so a GPU tensor synchronises): called by
    backends inside their op body, where reading is allowed."""
    if cu_seqlens_q.device != cu_seqlens_k.device or cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must be on one device and hold the same number of offsets, "
                         f"got {cu_seqlens_q.numel()} on {cu_seqlens_q.device} and {cu_seqlens_k.numel()} on "
                         f"{cu_seqlens_k.device}")
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise TypeError(f"{name} must be a 1-D int32 tensor of B + 1 >= 2 offsets, got {cu.dtype} "
                            f"{tuple(cu.shape)}")
        vals = cu.tolist()
        lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
        if vals[0] != 0 or vals[-1] != total or min(lengths) < 0:
            raise ValueError(f"{name} must start at 0, never decrease and end at the token count {total}, got {vals}")
        if max(lengths) > max_len:
            raise ValueError(f"max_seqlen_{name[-1]}={max_len} is less than the longest sequence in {name} "
                             f"({max(lengths)})")


# ---------------------------------------------------------------------------- attention


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    causal_align: str = "top_left",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    window_size: Optional[tuple[Optional[int], Optional[int]]] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, fused.

    Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same layout and
    mask convention), with grouped KV heads, both causal alignments, dropout, a bias
    gradient and ``lse``.

    Args:
        q: (B, Hq, Nq, D) queries. float16, bfloat16 or float32 (float64 on the reference
            backend); accumulation is in float32 at least.
        k, v: (B, Hkv, Nk, D) keys and values (v may have its own head dim Dv). Hq must
            be a multiple of Hkv: query head h reads KV head ``h // (Hq // Hkv)``
            (GQA; Hkv = 1 is MQA). Nq != Nk is allowed.
        attn_mask: None, a bool mask (True = attend) or an additive float bias (q's dtype
            or float32), broadcastable to (B, Hq, Nq, Nk): a key-padding mask (B, 1, 1, Nk)
            costs no B*H*N*N memory. A float bias that requires grad gets its gradient,
            summed over its broadcast dims.
        causal: also mask keys after the query; combined with attn_mask by AND.
        causal_align: which corner the causal diagonal starts from when Nq != Nk
            (Nq=2, Nk=4, 1 = attend)::

                top_left (SDPA)   bottom_right (FlashAttention, KV-cache decoding)
                1 0 0 0           1 1 1 0
                1 1 0 0           1 1 1 1

        dropout_p: probability of zeroing an attention probability (kept ones scaled by
            1/(1-p)); the mask comes from a seed drawn from torch's default generator, so
            ``torch.manual_seed`` reproduces it, and backward regenerates it.
        scale: score scale; default ``1/sqrt(D)``.
        return_lse: also return lse, (B, Hq, Nq) float32, log-sum-exp of the scaled,
            masked scores (before dropout); differentiable.
        deterministic: bitwise-reproducible backward (no atomics), possibly slower.
        backend: "auto" (fastest that can serve the call) or one of "cuda", "triton",
            "cpu", "reference".
        window_size: ``(left, right)``, local (sliding-window) attention: the query at key
            position p(i) (``i``, or ``i + Nk - Nq`` with ``causal_align="bottom_right"``)
            sees key j only when ``p(i) - left <= j <= p(i) + right``; None, -1 or a side of
            2**32 or more leaves it unbounded. Combines with ``causal`` and the mask by AND.
        softcap: when > 0, scores become ``softcap * tanh(s / softcap)``, s = q k^T * scale,
            before any bias (Gemma 2).
        alibi_slopes: float32 (Hq,) or (B, Hq): adds ``-slope * |p(i) - j|`` to the score
            (after softcap); no bias tensor is formed.
        sinks: (Hq,) one logit per query head that joins each row's softmax denominator and
            carries no value (gpt-oss); gets its gradient when it requires grad. lse includes
            it; a row that sees no key returns 0 with lse = sink.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or ``(out, lse)`` with ``return_lse``. A query
        row that sees no key (fully masked) gets output 0, lse -inf (the sink with
        ``sinks``) and gradient 0.

    Raises:
        TypeError / ValueError naming the argument for malformed inputs;
        ``fusedlayers.BackendError`` listing every backend's reason when none can serve.
    """
    if (_FAST is not None and dropout_p == 0 and causal_align in _ALIGNS and backend in _FAST_BACKENDS
            and window_size is None and not softcap and alibi_slopes is None and sinks is None and not _compiling()):
        out = _FAST.attention(q, k, v, attn_mask, bool(causal), causal_align == "bottom_right", scale,
                              bool(return_lse))
        if out is not None:
            return out
    _tensor("q", q, dims=4), _tensor("k", k, dims=4), _tensor("v", v, dims=4)
    if not q.dtype == k.dtype == v.dtype:
        _same("q k v", (q, k, v), "dtype")
    if not q.device == k.device == v.device:
        _same("q k v", (q, k, v), "device")
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(f"q, k, v must share the batch size B, got {b}, {bk}, {v.shape[0]}")
    if tuple(v.shape[1:3]) != (hkv, nk):
        raise ValueError(f"k and v must have the same (Hkv, Nk), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if dk != d:
        raise ValueError(f"q and k must have the same head dim D, got {d} and {dk}")
    if (hq % hkv if hkv else hq) != 0:
        raise ValueError(f"the number of query heads (q.shape[1] = {hq}) must be a multiple of the number of "
                         f"key/value heads (k.shape[1] = {hkv})")
    mask = _check_mask(attn_mask, q, (b, hq, nq, nk))
    dropout_p, scale = _check_attention_args(q, causal_align, dropout_p, scale)
    # no score variant: softcap exactly an int or float 0 (anything else goes through _check_mods' checks)
    plain = window_size is None and type(softcap) in (int, float) and softcap == 0 and alibi_slopes is None \
        and sinks is None
    mods = registration.NO_MODS if plain else _check_mods(q, window_size, softcap, alibi_slopes, sinks, b, hq)
    empty = q.numel() == 0 or k.numel() == 0 or v.numel() == 0

    call = AttentionCall(
        device=q.device, dtype=q.dtype, batch=b, heads_q=hq, heads_kv=hkv, seqlen_q=nq, seqlen_k=nk,
        head_dim=d, head_dim_v=v.shape[3], mask=None if mask is None else "bool" if mask.dtype == torch.bool else "float",
        mask_grad=mask is not None and mask.requires_grad, causal=bool(causal), dropout_p=dropout_p,
        deterministic=bool(deterministic), varlen=False, **({} if plain else _call_variants(mods)))
    name = _serve_empty(backend) if empty else dispatch.select("attention", call, backend)
    out, lse = registration.attention(q, k, v, mask, _draw_seed(dropout_p), scale, bool(causal),
                                      causal_align == "bottom_right", dropout_p, bool(deterministic), name, *mods)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    causal_align: str = "top_left",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    window_size: Optional[tuple[Optional[int], Optional[int]]] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over variable-length sequences packed without padding.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D). Sequence b owns query rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows likewise; it attends only
            to its own keys.
        cu_seqlens_q, cu_seqlens_k: int32, (B + 1,), cumulative sequence lengths starting
            at 0 and ending at total_q / total_k, on q's device.
        max_seqlen_q, max_seqlen_k: the longest sequence (sizes the kernel grid).
        causal, causal_align, dropout_p, scale, return_lse, deterministic, backend,
            window_size, softcap, alibi_slopes, sinks: as in :func:`attention`, applied per
            sequence (positions count from each sequence's start; ``alibi_slopes`` (B, Hq)
            gives each sequence its row).

    Returns:
        out (total_q, Hq, Dv), or ``(out, lse)`` with lse (Hq, total_q) float32 (the
        layout of FlashAttention's varlen lse).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, dims=3)
    _same("q k v", (q, k, v), "dtype")
    _same("q k v", (q, k, v), "device")
    tq, hq, d = q.shape
    tk, hkv, dk = k.shape
    if tuple(v.shape[:2]) != (tk, hkv):
        raise ValueError(f"k and v must have the same (total_k, Hkv), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if dk != d:
        raise ValueError(f"q and k must have the same head dim D, got {d} and {dk}")
    if (hq % hkv if hkv else hq) != 0:
        raise ValueError(f"the number of query heads (q.shape[1] = {hq}) must be a multiple of the number of "
                         f"key/value heads (k.shape[1] = {hkv})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise TypeError(f"{name} must be a 1-D int32 tensor of B + 1 >= 2 offsets, got "
                            f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__} "
                            f"{tuple(cu.shape) if isinstance(cu, Tensor) else ''}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}, q on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    for name, n, total in (("max_seqlen_q", max_seqlen_q, tq), ("max_seqlen_k", max_seqlen_k, tk)):
        if not isinstance(n, int) or n < (1 if total else 0):
            raise ValueError(f"{name} must be a positive int (0 allowed when there are no tokens), got {n!r}")
    dropout_p, scale = _check_attention_args(q, causal_align, dropout_p, scale)
    mods = _check_mods(q, window_size, softcap, alibi_slopes, sinks, cu_seqlens_q.numel() - 1, hq)
    empty = q.numel() == 0 or k.numel() == 0 or v.numel() == 0

    call = AttentionCall(
        device=q.device, dtype=q.dtype, batch=cu_seqlens_q.numel() - 1, heads_q=hq, heads_kv=hkv,
        seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k, head_dim=d, head_dim_v=v.shape[2], mask=None, mask_grad=False,
        causal=bool(causal), dropout_p=dropout_p, deterministic=bool(deterministic), varlen=True,
        **_call_variants(mods))
    name = _serve_empty(backend) if empty else dispatch.select("attention", call, backend)
    registration.refuse_unsupported_autodiff("attention_varlen", q, k, v, *mods)
    out, lse = registration.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       _draw_seed(dropout_p), scale, bool(causal), causal_align == "bottom_right",
                                       dropout_p, bool(deterministic), name, *mods)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------- norms


def _norm(x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, rms, backend):
    if dropout_p == 0:
        out = fast_norm(x, residual, weight, bias, eps, 1, rms, prenorm, residual_in_fp32, backend)
        if out is not None:
            return out
    _tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (the last dim is normalised), got a 0-d tensor")
    n = x.shape[-1]
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _tensor(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) (the last dim of x), got {tuple(t.shape)}")
    if not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    dropout_p = _probability("dropout_p", dropout_p)

    flat = x.dim() == 2  # (M, N) already (reshape would add a view to the autograd graph)
    if flat:
        x2, r2 = x, residual
    else:
        m = -1 if n else math.prod(x.shape[:-1])  # -1 cannot be inferred for N = 0
        x2 = x.reshape(m, n)  # (M, N): a view whenever the rows allow one
        r2 = residual.reshape(m, n) if residual is not None else None
    call = NormCall(device=x.device, dtype=x.dtype, weight_dtype=weight.dtype if weight is not None else None,
                    residual_dtype=residual.dtype if residual is not None else None, rows=x2.shape[0], hidden=n,
                    rms=rms, dropout_p=dropout_p)
    name = _serve_empty(backend) if x2.numel() == 0 else dispatch.select("norm", call, backend)
    needs_grad = registration.records_grad(x, residual, weight, bias)
    y, z, _, _ = registration.norm(x2, r2, weight, bias, _draw_seed(dropout_p), float(eps), dropout_p, rms,
                                   bool(prenorm), bool(residual_in_fp32), name, needs_grad)
    if not flat:
        y, z = y.view(x.shape), z.view(x.shape) if prenorm else z
    return (y, z) if prenorm else y


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               backend: str = "auto") -> Tensor:
    """Layer norm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Exactly ``torch.nn.functional.layer_norm(x, (N,), weight, bias, eps)`` (biased
    variance, eps inside the square root), with mean and variance in float32.

    Args:
        x: (..., N), float16 / bfloat16 / float32 (float64 on the reference backend).
        weight, bias: (N,) or None; their dtype may differ from x's (float32 master
            weights under fp16 activations).
        eps: added to the variance.
        backend: "auto" or a backend name.

    Returns:
        y, x's shape and dtype.
    """
    return _norm(x, None, weight, bias, eps, 0.0, False, False, False, backend)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """RMS norm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight`` (``torch.nn.RMSNorm``).

    Args and returns as :func:`layer_norm`, without bias.
    """
    return _norm(x, None, weight, None, eps, 0.0, False, False, True, backend)


def add_layer_norm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Residual add and layer norm in one pass: ``z = dropout(x) + residual; y = LN(z)``.

    Post-norm (original Transformer, BERT): ``h = add_layer_norm(sublayer(h), h, w, b)``.
    Pre-norm (GPT): ``y, stream = add_layer_norm(sublayer_out, stream, w, b, prenorm=True)``,
    then the next sublayer reads y and the residual stream continues as ``stream``.

    Args:
        x: (..., N) the sublayer's output.
        residual: x's shape, or None (then z = dropout(x)); its dtype may differ from x's.
        weight, bias: (N,) or None.
        eps: added to the variance.
        dropout_p: dropout on x before the add (seeded from torch's default generator;
            the same mask is regenerated in backward).
        prenorm: also return z, the new residual stream.
        residual_in_fp32: keep z in float32 under float16 / bfloat16 activations.
        backend: "auto" or a backend name.

    Returns:
        y (x's shape and dtype), or ``(y, z)`` with ``prenorm``; z has residual's dtype
        (float32 with ``residual_in_fp32``, x's dtype when there is no residual).
    """
    return _norm(x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, False, backend)


def add_rms_norm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    eps: float = 1e-6,
    *,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``z = dropout(x) + residual; y = RMSNorm(z)``: :func:`add_layer_norm` for RMS norm
    (pre-norm Llama-style blocks)."""
    return _norm(x, residual, weight, None, eps, dropout_p, prenorm, residual_in_fp32, True, backend)
