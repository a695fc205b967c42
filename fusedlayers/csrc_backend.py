"""The ``cpu`` backend (and, once CUDA impls of the same ops are registered, the ``cuda``
one): a thin adapter from the backend interface of ``fusedlayers.dispatch`` to the C++
kernel ops of ``fusedlayers._C`` (``csrc/``).

The ops (schemas in ``csrc/ext.cpp``) are device-neutral and dispatch on the device of
their tensors: ``attention_fwd_kernel`` / ``attention_bwd_kernel`` (dense and varlen),
``norm_fwd_kernel`` / ``norm_bwd_kernel`` and ``dropout_keep_mask_kernel`` (the kernels'
own Philox-4x32 keep-mask of a seed, ``csrc/common/philox.h``). Conventions:
``fusedlayers.registration``; kernels: ``csrc/attention/attention_cpu_kernel.h``,
``csrc/layer_norm/layer_norm_cpu_kernel.h``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import _ext

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_OPS = ("attention_fwd_kernel", "norm_fwd_kernel")

def _has_kernels() -> dict:
    """Which devices the built extension has kernels for: the CPU kernels today, CUDA ones
    when the CUDA backend registers impls of the same schemas."""
    return {
        (op, device): _ext.available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedlayers::{op}", key)
        for op in _OPS for device, key in _DISPATCH_KEYS.items()
    }


# Read at import and again when a first-use build is loaded (plain dict lookups per call,
# which torch.compile traces).
_HAS_KERNEL = _has_kernels()
_ext.on_load(lambda: _HAS_KERNEL.update(_has_kernels()))  # a first-use build loaded later


def _why_not(device: torch.device, dtype: torch.dtype, op: str, serves: str = "cpu") -> Optional[str]:
    """Reason the ``serves`` device's backend cannot run ``op`` (None: it can). The ``cpu``
    backend refuses other devices even where the built extension has their kernels: those
    belong to the backend of that device (a CUDA backend may reuse this adapter with
    ``serves="cuda"``)."""
    if not _ext.available():
        return f"extension not available: {_ext.ERROR}"
    if device.type != serves:
        return f"not a {_DISPATCH_KEYS.get(serves, serves)} tensor"
    if not _HAS_KERNEL.get((op, device.type), False):
        return f"fusedlayers._C was built without {_DISPATCH_KEYS.get(serves, serves)} kernels for {op}"
    if dtype not in DTYPES:
        return f"dtype {str(dtype).replace('torch.', '')} is not supported (float32, float16, bfloat16 only)"
    return None


def _ops():
    return torch.ops.fusedlayers


def output_cache(limit_mb: Optional[int] = None, reuse_ms: Optional[float] = None) -> dict:
    """The cache of the ``cpu`` kernels' large outputs (``csrc/cpu/output_cache.cpp``): the
    norms' and attention's.

    A freed output of 128 KB or more is kept for the next output of about its size (at most
    1/8 larger), whose pages its former owner wrote are then mapped and do not page-fault
    again; the bytes kept are bounded by a limit: 256 MB, or ``FUSEDLAYERS_CPU_CACHE_MB`` read
    when the extension loads (0 turns the cache off; a value that is not a whole number of MB
    >= 0 warns and keeps 256). A kept block under 32 MB is reused only within ``reuse_ms``
    (2 ms) of its free; an older one has likely left the CPU's caches, and goes back to glibc,
    whose recently freed memory is warmer and which, below 32 MB, serves it from its heap.
    ``limit_mb`` (>= 0) sets the limit now and returns kept blocks beyond it to the system (0
    returns them all and turns the cache off); ``reuse_ms`` (>= 0) sets the reuse time.

    Returns ``{"held_bytes", "limit_bytes", "hits", "misses", "held_blocks", "live_bytes",
    "reuse_ms", "expired"}``: bytes kept for reuse, the limit, blocks served from kept ones and
    new ones, bytes of the blocks in use now (page-rounded; ``resize_`` and copy-on-write copies
    of an output count too), the reuse time, and kept blocks given back for their age. Builds
    the extension first where it is built on first use. Raises ``RuntimeError`` when the
    extension is not available and ``ValueError`` for a ``limit_mb`` that is not a whole number
    of MB in [0, 2**40) or a ``reuse_ms`` that is not a number in [0, 1e9].
    """
    if limit_mb is not None and (isinstance(limit_mb, bool) or not isinstance(limit_mb, int)
                                 or not 0 <= limit_mb < 2**40):
        raise ValueError(f"fusedlayers.cpu_output_cache: limit_mb must be a whole number of MB in [0, 2**40) "
                         f"or None, got {limit_mb!r}")
    if reuse_ms is not None and (isinstance(reuse_ms, bool) or not isinstance(reuse_ms, (int, float))
                                 or not 0 <= reuse_ms <= 1e9):
        raise ValueError(f"fusedlayers.cpu_output_cache: reuse_ms must be a number of milliseconds in [0, 1e9] "
                         f"or None, got {reuse_ms!r}")
    if not _ext.ensure():
        raise RuntimeError(f"fusedlayers: the cpu output cache needs the C++ extension: {_ext.ERROR}")
    values = _ops()._cpu_output_cache(-1 if limit_mb is None else limit_mb << 20,
                                      -1 if reuse_ms is None else round(reuse_ms * 1000))
    out = dict(zip(("held_bytes", "limit_bytes", "hits", "misses", "held_blocks", "live_bytes", "reuse_ms",
                    "expired"), values))
    out["reuse_ms"] = out["reuse_ms"] / 1000
    return out


def _keep_mask(seed: int, shape, dropout_p: float, device) -> Tensor:
    """Bool keep-mask (True = keep) of the kernels' Philox stream: element i of the
    flattened shape is mask element index i (the index the kernels use)."""
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    _ops().dropout_keep_mask_kernel(keep, int(seed), float(dropout_p))
    return keep


# ----------------------------------------------------------------------------- attention


def _attention_why_not(call) -> Optional[str]:
    return _why_not(call.device, call.dtype, "attention_fwd_kernel")


def _mods_args(mods) -> tuple:
    """The trailing variant arguments of the kernel ops (window_left, window_right, softcap,
    alibi_slopes) of a call's ``ScoreMods`` (None: plain attention). Sinks never reach this
    backend (``registration.join_sinks``)."""
    if mods is None:
        return -1, -1, 0.0, None
    assert mods.sinks is None, "the cpu backend does not take sinks itself"
    return mods.window_left, mods.window_right, float(mods.softcap), mods.alibi_slopes


def _attention_forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p, mods=None,
                       dropout_layout=None):
    return _ops().attention_fwd_kernel(q, k, v, attn_mask, None, None, 0, 0, seed, scale, causal, bottom_right,
                                       dropout_p, *_mods_args(mods), dropout_layout)


def _attention_backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale, causal, bottom_right, dropout_p,
                        deterministic, bias_grad, mods=None, dropout_layout=None):
    # deterministic by construction: every element of dq, dk, dv, dbias has one writer
    dq, dk, dv, dbias = _ops().attention_bwd_kernel(dout, dlse, q, k, v, attn_mask, None, None, 0, 0, out, lse, seed,
                                                    scale, causal, bottom_right, dropout_p, bias_grad,
                                                    *_mods_args(mods), dropout_layout)
    return dq, dk, dv, dbias if bias_grad else None


def _varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, seed, scale, causal, bottom_right, dropout_p, mods=None):
    from .ops import check_cu_seqlens_values  # the op body runs eagerly: values can be read

    check_cu_seqlens_values(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    return _ops().attention_fwd_kernel(q, k, v, None, cu_q.contiguous(), cu_k.contiguous(), max_q, max_k, seed,
                                       scale, causal, bottom_right, dropout_p, *_mods_args(mods))


def _varlen_backward(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, seed, scale, causal, bottom_right,
                     dropout_p, deterministic, mods=None):
    from .ops import check_cu_seqlens_values

    check_cu_seqlens_values(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    dq, dk, dv, _ = _ops().attention_bwd_kernel(dout, dlse, q, k, v, None, cu_q.contiguous(), cu_k.contiguous(),
                                                max_q, max_k, out, lse, seed, scale, causal, bottom_right, dropout_p,
                                                False, *_mods_args(mods))
    return dq, dk, dv


attention = SimpleNamespace(
    VARIANTS=frozenset({"window_size", "softcap", "alibi_slopes", "dropout_layout"}),
    why_not=_attention_why_not,
    forward=_attention_forward,
    backward=_attention_backward,
    varlen_forward=_varlen_forward,
    varlen_backward=_varlen_backward,
    dropout_keep_mask=_keep_mask,
)


# ---------------------------------------------------------------------------- norms


def _norm_why_not(call) -> Optional[str]:
    reason = _why_not(call.device, call.dtype, "norm_fwd_kernel")
    if reason is None:
        for name, dt in (("weight", call.weight_dtype), ("residual", call.residual_dtype)):
            if dt is not None and dt not in DTYPES:
                return f"{name} dtype {str(dt).replace('torch.', '')} is not supported (float32, float16, bfloat16 only)"
    return reason


def _norm_forward(x, residual, weight, bias, seed, eps, dropout_p, rms, prenorm, residual_in_fp32, needs_grad=True):
    from .registration import keeps_stream, stream_dtype

    return _ops().norm_fwd_kernel(x, residual, weight, bias, seed, eps, dropout_p, rms,
                                  keeps_stream(x, residual, dropout_p, prenorm, residual_in_fp32, needs_grad),
                                  stream_dtype(x, residual, residual_in_fp32))


def _norm_backward(dy, dz, zin, weight, bias, mean, rstd, seed, eps, dropout_p, rms, x_dtype, residual_dtype):
    dx, dres, dw, db = _ops().norm_bwd_kernel(dy, dz, zin, weight, bias, mean, rstd, seed, dropout_p, rms, x_dtype,
                                              residual_dtype)
    return (dx, dres if residual_dtype is not None else None, dw if weight is not None else None,
            db if bias is not None else None)


norm = SimpleNamespace(
    why_not=_norm_why_not,
    forward=_norm_forward,
    backward=_norm_backward,
    dropout_keep_mask=_keep_mask,
)
