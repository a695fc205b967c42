"""Drop-in modules: ``torch.nn`` layers that run on fusedlayers' ops.

============================  ==========================================================
``LayerNorm``                 ``torch.nn.LayerNorm`` on :func:`fusedlayers.layer_norm`
``RMSNorm``                   ``torch.nn.RMSNorm`` on :func:`fusedlayers.rms_norm`
``AddLayerNorm``              new: ``LN(dropout(x) + residual)`` in one pass
                              (:func:`fusedlayers.add_layer_norm`), post- or pre-norm
``MultiheadAttention``        ``torch.nn.MultiheadAttention`` on :func:`fusedlayers.attention`
``TransformerEncoderLayer``   ``torch.nn.TransformerEncoderLayer``: the above, with each
                              residual add fused into the norm that follows it
``TransformerDecoderLayer``   ``torch.nn.TransformerDecoderLayer``, likewise
============================  ==========================================================

Each class subclasses its ``torch.nn`` namesake: the same constructor arguments and
defaults (plus a keyword ``backend="auto"``), the same parameters, ``state_dict`` keys
and initialisation (under one seed both draw the same weights), so checkpoints load
either way and ``isinstance(m, torch.nn.LayerNorm)`` stays true. ``from_torch(module)``
turns an existing ``torch.nn`` module into ours, sharing its Parameter objects
(``fusedlayers.swap`` does that for a whole model).

Semantics that differ from ``torch.nn``, on purpose:

* a query that may see no key (every key masked) gets output 0 (torch 2.14: 0 through SDPA,
  NaN where it forms the weights, ``need_weights=True``);
* ``is_causal=True`` without ``attn_mask`` applies the causal mask (torch raises); with
  an ``attn_mask`` it is the same hint as in torch: the mask is taken to be the causal
  mask and the kernel applies causality itself;
* dropout draws from fusedlayers' own random stream (same keep rate, other masks).

``need_weights=True`` (``nn.MultiheadAttention``'s default) needs the attention matrix,
which a fused kernel never forms: that call runs on a materialised path (plain PyTorch,
the same arithmetic as torch's own), so it is correct but not fast. Pass
``need_weights=False``, as ``torch.nn.TransformerEncoderLayer`` does, to get the kernel.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference
from .dispatch import BACKENDS

_compiling = torch.compiler.is_compiling

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "AddLayerNorm",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
]


def _check_backend(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def _adopt(cls, module: torch.nn.Module, backend: str):
    """An instance of ``cls`` (a subclass of ``type(module)``) that takes ``module`` over:
    the same Parameter, buffer and hook objects (shared dicts), configuration and
    train/eval mode. Only the dict of child modules is a copy, so that replacing a child
    of the new module leaves ``module`` as it was."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__["_modules"] = module._modules.copy()
    new.backend = _check_backend(backend)
    return new


class _FromTorch:
    """``from_torch`` for the drop-ins that subclass their ``torch.nn`` namesake."""

    _torch_class: type

    @classmethod
    def from_torch(cls, module: torch.nn.Module, backend: str = "auto"):
        """This class in place of ``module`` (exactly a ``torch.nn`` instance of the
        namesake), sharing its parameters, buffers and hooks. Child modules are not
        converted: see ``fusedlayers.swap`` for whole models."""
        if type(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__}.from_torch expects a {cls._torch_class.__module__}."
                            f"{cls._torch_class.__qualname__}, got {type(module).__qualname__}")
        return _adopt(cls, module, backend)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.backend == "auto":
            return base
        return f"{base}, backend={self.backend!r}" if base else f"backend={self.backend!r}"


# ---------------------------------------------------------------------------- norms


def _flatten_trailing(x: Tensor, shape: tuple) -> Tensor:
    """(..., *shape) -> (..., prod(shape)): a multi-dim ``normalized_shape`` as one row."""
    k = len(shape)
    if k == 0:
        raise ValueError("normalized_shape must have at least one dim, got []")
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != tuple(shape):
        raise ValueError(f"expected input with trailing dims normalized_shape={list(shape)}, got {tuple(x.shape)}")
    return x if k == 1 else x.flatten(-k)


def _flat(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.reshape(-1)


def _autocast_fp32(x: Tensor, rms: bool = False) -> bool:
    """Whether torch's layer_norm (``rms``: rms_norm) would run in float32 here. Under CUDA
    autocast layer_norm is on autocast's float32 list (its output is float32); rms_norm is
    on it in some torch versions only (not in 2.11), so torch is asked once. Under CPU
    autocast neither is."""
    if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return False
    return _cuda_autocast_rms_norm_fp32() if rms else True


@functools.lru_cache(maxsize=None)
def _cuda_autocast_rms_norm_fp32() -> bool:
    """Whether this torch's CUDA autocast runs rms_norm in float32 (one tiny call)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return torch.rms_norm(torch.ones(1, 1, device="cuda", dtype=torch.bfloat16), (1,)).dtype == torch.float32


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


class LayerNorm(_FromTorch, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True,
    bias=True, device=None, dtype=None)`` on :func:`fusedlayers.layer_norm`.

    A multi-dim ``normalized_shape`` normalises the flattened trailing dims as one row
    (the same numbers as torch). Extra keyword: ``backend``.
    """

    _torch_class = torch.nn.LayerNorm

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = _check_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        fast = ops._FAST  # ops.fast_norm written out: a call frame is a tenth of this module's host time
        if fast is not None and self.backend in ops._FAST_BACKENDS and not _compiling():
            # CPU tensors only, where autocast keeps the dtypes
            y = fast.norm(input, None, self.weight, self.bias, self.eps, len(self.normalized_shape), False, False,
                          False)
            if y is not None:
                return y
        x = _flatten_trailing(input, self.normalized_shape)
        weight, bias = _flat(self.weight), _flat(self.bias)
        if _autocast_fp32(x):  # as torch: float32 inputs and output under CUDA autocast
            x, weight, bias = x.float(), _f32(weight), _f32(bias)
        y = ops.layer_norm(x, weight, bias, self.eps, backend=self.backend)
        return y.view(input.shape)


class RMSNorm(_FromTorch, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True,
    device=None, dtype=None)`` on :func:`fusedlayers.rms_norm`; ``eps=None`` means
    ``torch.finfo(input.dtype).eps``, as in torch. Extra keyword: ``backend``."""

    _torch_class = torch.nn.RMSNorm

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = _check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        if self.eps is not None or x.dtype.is_floating_point:
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            fast = ops._FAST  # ops.fast_norm written out, as in LayerNorm
            if fast is not None and self.backend in ops._FAST_BACKENDS and not _compiling():
                y = fast.norm(x, None, self.weight, None, eps, len(self.normalized_shape), True, False, False)
                if y is not None:
                    return y
        rows, weight = _flatten_trailing(x, self.normalized_shape), _flat(self.weight)
        if _autocast_fp32(rows, rms=True):  # as torch: float32 inputs and output under autocast
            rows, weight = rows.float(), _f32(weight)
        eps = self.eps if self.eps is not None else torch.finfo(rows.dtype).eps
        y = ops.rms_norm(rows, weight, eps, backend=self.backend)
        return y.view(x.shape)


class AddLayerNorm(torch.nn.Module):
    """Residual add and layer norm in one pass: ``z = dropout(x) + residual; y = LN(z)``.

    The parameters are those of ``torch.nn.LayerNorm(normalized_shape, eps,
    elementwise_affine, bias)`` (``weight``, ``bias``: a LayerNorm's state_dict loads
    into it). ``forward(x, residual=None)`` returns ``y``, or ``(y, z)`` with
    ``prenorm=True`` (z is the new residual stream of a pre-norm block)::

        post-norm (BERT):  h = add_ln(sublayer(h), h)
        pre-norm  (GPT):   y, stream = add_ln(sublayer_out, stream); next sublayer reads y

    Args:
        dropout: dropout probability on ``x`` before the add, in training mode only.
        prenorm: also return z.
        residual_in_fp32: keep z in float32 under float16 / bfloat16 activations.
        backend: "auto" or a backend name.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dropout: float = 0.0, prenorm: bool = False, residual_in_fp32: bool = False, device=None,
                 dtype=None, *, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.dropout = dropout
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        self.backend = _check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", torch.nn.Parameter(torch.ones(self.normalized_shape, **factory))
                                if elementwise_affine else None)
        self.register_parameter("bias", torch.nn.Parameter(torch.zeros(self.normalized_shape, **factory))
                                if elementwise_affine and bias else None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        shape = self.normalized_shape
        out = ops.add_layer_norm(_flatten_trailing(x, shape),
                                 None if residual is None else _flatten_trailing(residual, shape),
                                 _flat(self.weight), _flat(self.bias), self.eps,
                                 dropout_p=self.dropout if self.training else 0.0, prenorm=self.prenorm,
                                 residual_in_fp32=self.residual_in_fp32, backend=self.backend)
        if self.prenorm:
            return out[0].view(x.shape), out[1].view(x.shape)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"dropout={self.dropout}, prenorm={self.prenorm}"
                + (", residual_in_fp32=True" if self.residual_in_fp32 else "")
                + ("" if self.backend == "auto" else f", backend={self.backend!r}"))


# ---------------------------------------------------------------------------- attention


def materialized_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, *,
                           causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0,
                           **variants) -> tuple[Tensor, Tensor]:
    """Attention that also returns its weights: the score matrix is formed, as in
    ``torch.nn.MultiheadAttention``'s ``need_weights=True`` path (the reference's softmax,
    :func:`fusedlayers.reference.attention_probs`, then dropout on the weights with
    ``torch.nn.functional.dropout``, then ``weights @ v``).

    Arguments and conventions as :func:`fusedlayers.attention` (bool mask True =
    attend, GQA, top-left causal, a fully masked row gives 0); ``variants``: the reference's
    ``causal_align``, ``window_size``, ``softcap``, ``alibi_slopes``, ``sinks``. Returns
    ``(out (B, Hq, Nq, Dv), weights (B, Hq, Nq, Nk))``, weights after dropout. Differentiable
    by autograd.
    """
    p = reference.attention_probs(q, k, attn_mask, causal=causal, scale=scale, **variants)  # (B, Hq, Nq, Nk)
    if dropout_p > 0:
        p = F.dropout(p, p=dropout_p)
    return p @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1), p  # v: (B, Hkv, Nk, Dv) -> (B, Hq, Nk, Dv)


def _as_allowed(mask: Tensor, name: str) -> Tensor:
    """A torch.nn mask (bool True = masked out, or additive float) in fusedlayers'
    convention (bool True = attend, or additive float)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask


def _merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], b: int, h: int, nq: int,
                 nk: int, dtype: torch.dtype) -> Optional[Tensor]:
    """``nn.MultiheadAttention``'s attn_mask ((Nq, Nk) or (B*H, Nq, Nk)) and
    key_padding_mask ((B, Nk)) as one mask of fusedlayers' convention, 4-D, broadcastable
    to (B, H, Nq, Nk): bool (True = attend) when both are bool, else an additive float
    bias in ``dtype`` (a bool mask becoming -inf where it masks)."""
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (nq, nk):
            masks.append(_as_allowed(attn_mask, "attn_mask").view(1, 1, nq, nk))
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (b * h, nq, nk):
            masks.append(_as_allowed(attn_mask, "attn_mask").view(b, h, nq, nk))  # row = batch * H + head
        else:
            raise ValueError(f"attn_mask must have shape (L, S) = {(nq, nk)} or (N*num_heads, L, S) = "
                             f"{(b * h, nq, nk)}, got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(f"key_padding_mask must have shape (N, S) = {(b, nk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        masks.append(_as_allowed(key_padding_mask, "key_padding_mask").view(b, 1, 1, nk))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        return masks[0] if len(masks) == 1 else masks[0] & masks[1]
    zero = torch.zeros((), dtype=dtype, device=masks[0].device)
    bias = [m.to(dtype) if m.is_floating_point() else torch.where(m, zero, float("-inf")) for m in masks]
    return bias[0] if len(bias) == 1 else bias[0] + bias[1]


def _pad_keys(mask: Optional[Tensor], extra: int) -> Optional[Tensor]:
    """Extends a mask over ``extra`` appended keys that every query may see."""
    if mask is None or extra == 0:
        return mask
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([mask, fill((*mask.shape[:-1], extra), dtype=mask.dtype, device=mask.device)], dim=-1)


class MultiheadAttention(_FromTorch, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True,
    add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None, batch_first=False,
    device=None, dtype=None)`` on :func:`fusedlayers.attention`. Extra keyword: ``backend``.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` as in torch:

    * ``batch_first`` both ways, unbatched (2-D) inputs, ``kdim`` / ``vdim``
      (separate ``q/k/v_proj_weight``), ``add_bias_kv``, ``add_zero_attn``;
    * ``key_padding_mask`` (N, S): bool, True = ignore that key (torch's convention,
      the opposite of :func:`fusedlayers.attention`'s), or an additive float;
    * ``attn_mask`` (L, S) or (N*num_heads, L, S): bool, True = NOT allowed, or additive
      float;
    * ``need_weights=True`` returns the weights ((N, L, S) averaged over heads, or (N,
      num_heads, L, S)) from the materialised path; ``need_weights=False`` runs the kernel.

    A query that sees no key returns 0 (torch: 0 with ``need_weights=False``, NaN with
    ``need_weights=True``). Under autocast, ``bias_k`` / ``bias_v`` join the keys and
    values in the projections' dtype, as torch's concatenation gives.
    """

    _torch_class = torch.nn.MultiheadAttention

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.backend = _check_backend(backend)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input projections, one matmul for self-attention (query is key is value)."""
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wk, wv = w.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"{query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        seq = 1 if self.batch_first else 0  # sequence dim of batched inputs
        if not batched:  # (L, E): one sequence, given a batch dim of 1
            self_attention = query is key and key is value
            query = query.unsqueeze(1 - seq)
            key, value = (query, query) if self_attention else (key.unsqueeze(1 - seq), value.unsqueeze(1 - seq))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        b, nq, nk = query.shape[1 - seq], query.shape[seq], key.shape[seq]
        h, d = self.num_heads, self.head_dim
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got {tuple(query.shape)}")

        q, k, v = self._project(query, key, value)  # (B, L, E) or (L, B, E)
        # (B, L, E) -> (B, L, H, D) -> (B, H, L, D); (L, B, E) -> (L, B, H, D) -> (B, H, L, D)
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) if self.batch_first
                   else t.unflatten(-1, (h, d)).permute(1, 2, 0, 3) for t in (q, k, v))

        # Keys every query may see, appended after the sequence: bias_k / bias_v, then zeros.
        extra = []
        if self.bias_k is not None:
            extra.append((self.bias_k.view(1, h, 1, d), self.bias_v.view(1, h, 1, d)))
        if self.add_zero_attn:
            zeros = q.new_zeros(1, h, 1, d)
            extra.append((zeros, zeros))
        if extra:  # in k's and v's dtype (under autocast the projections are float16/bfloat16, bias_k is not)
            k = torch.cat([k] + [ek.to(k.dtype).expand(b, h, 1, d) for ek, _ in extra], dim=2)  # (B, H, S + extra, D)
            v = torch.cat([v] + [ev.to(v.dtype).expand(b, h, 1, d) for _, ev in extra], dim=2)

        # is_causal is a hint that attn_mask is the causal mask: the kernel applies causality
        # itself, unless appended keys or the weights need the mask as given.
        causal = bool(is_causal) and not extra and (attn_mask is None or not need_weights)
        if causal:
            attn_mask = None
        elif is_causal and attn_mask is None:  # appended keys: causal over the sequence only (True = masked)
            attn_mask = ~reference.causal_mask(nq, nk, device=q.device)
        mask = _pad_keys(_merge_masks(attn_mask, key_padding_mask, b, h, nq, nk, q.dtype), len(extra))
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            out, weights = materialized_attention(q, k, v, mask, causal=causal, dropout_p=dropout_p)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = ops.attention(q, k, v, mask, causal=causal, dropout_p=dropout_p, backend=self.backend)
            weights = None
        # (B, H, L, D) -> (B, L, H*D) or (L, B, H*D)
        out = out.transpose(1, 2).flatten(2) if self.batch_first else out.permute(2, 0, 1, 3).flatten(2)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1 - seq)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


# ---------------------------------------------------------------------------- layers


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(len(getattr(module, name, ())) for name in ("_forward_hooks", "_forward_pre_hooks"))


def _add_norm(x: Tensor, residual: Tensor, dropout: torch.nn.Module, norm: torch.nn.Module, prenorm: bool = False):
    """``norm(residual + dropout(x))`` (and the sum, with ``prenorm``), fused into one
    :func:`fusedlayers.add_layer_norm` when ``norm`` is our LayerNorm over the last dim,
    ``dropout`` a plain ``nn.Dropout`` and neither carries hooks; else module by module."""
    if (isinstance(norm, LayerNorm) and len(norm.normalized_shape) == 1 and type(dropout) is torch.nn.Dropout
            and not _has_hooks(norm) and not _has_hooks(dropout)):
        # torch's dtypes: residual + x promotes (a float32 stream plus a bfloat16 sublayer
        # output under autocast is float32), and LayerNorm runs in float32 under CUDA autocast
        fp32, stream = _autocast_fp32(x), torch.promote_types(x.dtype, residual.dtype)
        weight, bias = (_f32(norm.weight), _f32(norm.bias)) if fp32 else (norm.weight, norm.bias)
        x, residual = x.to(torch.float32 if fp32 else stream), residual.to(stream)  # y: x's dtype; z: residual's
        return ops.add_layer_norm(x, residual, weight, bias, norm.eps,
                                  dropout_p=dropout.p if dropout.training else 0.0, prenorm=prenorm,
                                  backend=norm.backend)
    z = residual + dropout(x)
    return (norm(z), z) if prenorm else norm(z)


def _adopt_children(layer: torch.nn.Module, backend: str, attentions: tuple, norms: tuple) -> None:
    """Turns a torch Transformer layer's attention and norm children into ours (sharing
    their parameters) and sets its ``backend``."""
    layer.backend = _check_backend(backend)
    for name in attentions:
        setattr(layer, name, MultiheadAttention.from_torch(getattr(layer, name), backend))
    for name in norms:
        setattr(layer, name, LayerNorm.from_torch(getattr(layer, name), backend))


def _feed_forward(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """The feed-forward block of torch's Transformer layers: linear2(dropout(activation(linear1(x))))."""
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


class TransformerEncoderLayer(_FromTorch, torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=relu, layer_norm_eps=1e-5, batch_first=False,
    norm_first=False, bias=True, device=None, dtype=None)`` with our
    ``MultiheadAttention`` and ``LayerNorm``, each residual add fused into the norm after
    it (post-norm: ``norm1(x + dropout1(sa(x)))`` is one op; pre-norm: ``x + dropout1(sa)``
    and ``norm2`` of it are one op). Extra keyword: ``backend``.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` as in
    torch; a nested-tensor ``src`` (what ``torch.nn.TransformerEncoder`` passes in eval
    mode with a padding mask) is run padded and returned nested.
    """

    _torch_class = torch.nn.TransformerEncoderLayer

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _adopt_children(self, backend, ("self_attn",), ("norm1", "norm2"))

    def _sa(self, x, attn_mask, key_padding_mask, is_causal):
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                              is_causal=is_causal)[0]

    _ff = _feed_forward

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:
            return self._forward_nested(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            a = self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            y, x = _add_norm(a, x, self.dropout1, self.norm2, prenorm=True)  # y = norm2(x + dropout1(a))
            return x + self.dropout2(self._ff(y))
        x = _add_norm(self._sa(x, src_mask, src_key_padding_mask, is_causal), x, self.dropout1, self.norm1)
        return _add_norm(self._ff(x), x, self.dropout2, self.norm2)

    def _forward_nested(self, src, src_mask, src_key_padding_mask, is_causal):
        if src_mask is not None or src_key_padding_mask is not None:
            raise ValueError("a nested-tensor src takes neither src_mask nor src_key_padding_mask")
        if not self.self_attn.batch_first:
            raise ValueError("a nested-tensor src needs batch_first=True")
        lengths = [t.shape[0] for t in src.unbind()]
        padded = src.to_padded_tensor(0.0)  # (B, S, E)
        pad = torch.arange(padded.shape[1], device=padded.device)[None, :] >= torch.tensor(
            lengths, device=padded.device)[:, None]  # (B, S), True = padding (torch's convention)
        out = self.forward(padded, None, pad, is_causal)
        return torch.nested.as_nested_tensor([out[i, :n] for i, n in enumerate(lengths)])


class TransformerDecoderLayer(_FromTorch, torch.nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=relu, layer_norm_eps=1e-5, batch_first=False,
    norm_first=False, bias=True, device=None, dtype=None)`` with our attention and norms,
    residual adds fused into the norms as in :class:`TransformerEncoderLayer`. Extra
    keyword: ``backend``. ``forward`` as in torch."""

    _torch_class = torch.nn.TransformerDecoderLayer

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        _adopt_children(self, backend, ("self_attn", "multihead_attn"), ("norm1", "norm2", "norm3"))

    _ff = _feed_forward

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        def sa(x):
            return self.self_attn(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                  need_weights=False, is_causal=tgt_is_causal)[0]

        def mha(x):
            return self.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                                       key_padding_mask=memory_key_padding_mask, need_weights=False,
                                       is_causal=memory_is_causal)[0]

        x = tgt
        if self.norm_first:
            y, x = _add_norm(sa(self.norm1(x)), x, self.dropout1, self.norm2, prenorm=True)
            y, x = _add_norm(mha(y), x, self.dropout2, self.norm3, prenorm=True)
            return x + self.dropout3(self._ff(y))
        x = _add_norm(sa(x), x, self.dropout1, self.norm1)
        x = _add_norm(mha(x), x, self.dropout2, self.norm2)
        return _add_norm(self._ff(x), x, self.dropout3, self.norm3)
