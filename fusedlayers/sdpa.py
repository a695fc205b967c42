"""fusedlayers as PyTorch's flash attention implementation: every SDPA call, unchanged.

``import fusedlayers`` registers the name ``"fusedlayers"`` with
``torch.nn.attention.register_flash_attention_impl`` (torch 2.14+); nothing changes until
the user activates it::

    import fusedlayers
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    activate_flash_attention_impl("fusedlayers")  # or fusedlayers.sdpa.activate()
    ...  # every F.scaled_dot_product_attention call that takes the flash path runs fusedlayers
    restore_flash_attention_impl()  # or fusedlayers.sdpa.deactivate(): aten's kernels again

Activation overrides, through ``torch.library``, the aten ops that SDPA's flash path
dispatches to, forward and backward:

* CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``
  (SDPA's CPU flash path: float32/bfloat16/float16 inputs, with or without a mask);
* CUDA: ``aten::_scaled_dot_product_flash_attention`` and its ``_backward``.

Each override calls :func:`fusedlayers.attention` with ``return_lse`` (aten's autograd
formula saves ``out`` and ``lse``) and the backward calls fusedlayers' registered backward
op with those external ``out`` / ``lse``; ``backend="auto"`` picks the kernel, as for any
fusedlayers call. SDPA's own choice of path is unchanged: calls that SDPA sends to its
math or memory-efficient path stay there. On CUDA, dropout is supported (the dropout seed
travels in the op's ``rng_state`` output to the backward); the CPU flash path of aten has
no dropout, and neither does the override. ``calls`` counts what the overrides ran, by
(pass, backend).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Optional

import torch
from torch import Tensor

NAME = "fusedlayers"
calls: Counter = Counter()  # ("forward" | "backward", backend name) -> number of calls


def _mask4(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """SDPA's mask (broadcastable to (B, H, Nq, Nk), any number of leading dims) as 4-D."""
    if attn_mask is None or attn_mask.dim() == 4:
        return attn_mask
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def _backend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, dropout_p: float) -> str:
    from . import dispatch

    call = dispatch.AttentionCall(
        device=q.device, dtype=q.dtype, batch=q.shape[0], heads_q=q.shape[1], heads_kv=k.shape[1],
        seqlen_q=q.shape[2], seqlen_k=k.shape[2], head_dim=q.shape[3], head_dim_v=v.shape[3],
        mask=None if mask is None else "bool" if mask.dtype == torch.bool else "float", mask_grad=False,
        causal=bool(causal), dropout_p=float(dropout_p), deterministic=torch.are_deterministic_algorithms_enabled(),
        varlen=False)
    return dispatch.select("attention", call)


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed=None):
    """(out, lse) of fusedlayers for SDPA's (B, H, N, D) inputs; ``seed`` for dropout."""
    from . import ops, registration

    mask = _mask4(attn_mask)
    name = _backend(q, k, v, mask, is_causal, dropout_p)
    calls["forward", name] += 1
    if dropout_p == 0:
        return ops.attention(q, k, v, mask, causal=bool(is_causal), scale=scale, return_lse=True, backend=name)
    return registration.attention_fwd(q, k, v, mask, seed, _scale(q, scale), bool(is_causal), False,
                                      float(dropout_p), torch.are_deterministic_algorithms_enabled(), name)


def _backward(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed=None):
    from . import registration

    mask = _mask4(attn_mask)
    name = _backend(q, k, v, mask, is_causal, dropout_p)
    calls["backward", name] += 1
    if lse.dtype != torch.float32 or lse.shape != q.shape[:3]:
        raise RuntimeError(f"fusedlayers SDPA backward: lse must be float32 of shape {tuple(q.shape[:3])}, got "
                           f"{lse.dtype} {tuple(lse.shape)} (was the forward run by another implementation?)")
    dq, dk, dv, _, _ = registration.attention_bwd(
        grad_out.contiguous(), torch.zeros_like(lse), q, k, v, mask, out, lse.contiguous(), seed, _scale(q, scale),
        bool(is_causal), False, float(dropout_p), torch.are_deterministic_algorithms_enabled(), False, name)
    return dq, dk, dv


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in the memory layout of ``ref`` (``empty_like``): aten's meta kernels give the
    overridden ops' output strides, and torch.compile checks them."""
    return torch.empty_like(ref).copy_(t) if t.shape == ref.shape and t.stride() != ref.stride() else t


def _permuted(t: Tensor) -> Tensor:
    """``t`` laid out as (B, N, H, D) in memory, the CPU flash backward's gradient layout."""
    out = torch.empty_permuted(t.shape, (0, 2, 1, 3), dtype=t.dtype, device=t.device)
    return out.copy_(t)


# ------------------------------------------------------------------------- CPU flash path


def _cpu_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    if dropout_p != 0:
        raise RuntimeError("fusedlayers SDPA on CPU: dropout_p must be 0 (as for aten's CPU flash attention)")
    out, lse = _forward(query, key, value, attn_mask, 0.0, is_causal, scale)
    b, h, n = lse.shape
    return _like(out, query), torch.empty((b, n, h), dtype=lse.dtype).transpose(1, 2).copy_(lse)


def _cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                  scale=None):
    if dropout_p != 0:
        raise RuntimeError("fusedlayers SDPA on CPU: dropout_p must be 0 (as for aten's CPU flash attention)")
    grads = _backward(grad_out, query, key, value, out, logsumexp, attn_mask, 0.0, is_causal, scale)
    return tuple(_permuted(g) for g in grads)


# ------------------------------------------------------------------------ CUDA flash path


def _cuda_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    if return_debug_mask:
        raise RuntimeError("fusedlayers SDPA: return_debug_mask is not supported")
    from .ops import _draw_seed

    seed = _draw_seed(dropout_p)  # torch's default generator, as fusedlayers' ops draw it
    out, lse = _forward(query, key, value, None, dropout_p, is_causal, scale, seed)
    out, lse = _like(out, query), lse.contiguous()
    # rng_state carries the dropout seed to the backward (philox_seed there); unused is empty.
    rng_state = torch.zeros((2,), dtype=torch.uint64, device=query.device)
    if seed is not None:
        rng_state[0] = int(seed)
    unused = torch.zeros((), dtype=torch.uint64, device=query.device)
    debug = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, lse, None, None, query.shape[2], key.shape[2], rng_state, unused, debug


def _cuda_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, philox_seed, philox_offset, *, scale=None):
    seed = None
    if dropout_p > 0:
        seed = torch.tensor(int(philox_seed.reshape(-1)[0].item()), dtype=torch.int64)
    grads = _backward(grad_out, query, key, value, out, logsumexp, None, dropout_p, is_causal, scale, seed)
    return tuple(_like(g, t) for g, t in zip(grads, (query, key, value)))


# ------------------------------------------------------------------------- (de)activation


class Handle:
    """What ``activate_flash_attention_impl`` keeps: the ``torch.library`` registrations;
    ``remove()`` drops them, which restores aten's kernels."""

    def __init__(self, libraries):
        self.libraries = libraries

    def remove(self) -> None:
        for lib in self.libraries:
            lib._destroy()
        self.libraries = []


def _register() -> Handle:
    cpu = torch.library.Library("aten", "IMPL", "CPU")
    cuda = torch.library.Library("aten", "IMPL", "CUDA")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": the point of it
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        cpu.impl("_scaled_dot_product_flash_attention_for_cpu", _cpu_forward, "CPU")
        cpu.impl("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_backward, "CPU")
        cuda.impl("_scaled_dot_product_flash_attention", _cuda_forward, "CUDA")
        cuda.impl("_scaled_dot_product_flash_attention_backward", _cuda_backward, "CUDA")
    return Handle([cpu, cuda])


def register() -> bool:
    """Makes ``"fusedlayers"`` known to ``torch.nn.attention`` (activates nothing); False
    where torch has no flash attention registry (before 2.14)."""
    try:
        from torch.nn.attention import register_flash_attention_impl
    except ImportError:
        return False
    register_flash_attention_impl(NAME, register_fn=_register)
    return True


def activate() -> None:
    """``torch.nn.attention.activate_flash_attention_impl("fusedlayers")``."""
    try:
        from torch.nn.attention import activate_flash_attention_impl
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no flash attention registry (torch 2.14+ has)") from e
    register()
    activate_flash_attention_impl(NAME)


def deactivate() -> None:
    """Restores aten's flash attention kernels if fusedlayers' are active."""
    from torch.nn.attention import current_flash_attention_impl, restore_flash_attention_impl

    if current_flash_attention_impl() == NAME:
        restore_flash_attention_impl()


def active() -> bool:
    try:
        from torch.nn.attention import current_flash_attention_impl
    except ImportError:
        return False
    return current_flash_attention_impl() == NAME
