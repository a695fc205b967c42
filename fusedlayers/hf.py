"""Hugging Face transformers on fusedlayers' attention: ``register()``, then ``attn_implementation``.

::

    import fusedlayers
    fusedlayers.hf.register()                                   # once per process
    model = AutoModel.from_pretrained(name, attn_implementation="fusedlayers")
    # or: model.set_attn_implementation("fusedlayers")
    fusedlayers.swap(model)                                     # the norms too

``register`` files two functions under one name: the attention function with
``transformers.AttentionInterface`` and a mask function with
``transformers.AttentionMaskInterface``. Both are needed: without the mask function,
transformers hands the attention function ``attention_mask=None`` and a padded batch is
silently wrong. The mask function is transformers' own ``sdpa_mask``: a 4-D bool mask,
True = attend (fusedlayers' convention), or None where ``is_causal`` alone (or no mask)
says it all, exactly what the ``sdpa`` implementation receives. Sliding windows,
packed sequences and chunked attention are therefore in the mask.

transformers is imported only by ``register`` (``pip install fusedlayers[hf]``);
``import fusedlayers`` never imports it. Checked with transformers 5.24.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .nn import _check_backend, materialized_attention

__all__ = ["register", "attention_forward", "NAME", "REGISTERED"]

NAME = "fusedlayers"
REGISTERED: set[str] = set()  # the names register() has filed in this process

# Keyword arguments that change the arithmetic in ways fusedlayers' attention does not have.
_UNSUPPORTED = {
    "softcap": "logit soft-capping (Gemma 2)",
    "s_aux": "attention sinks (gpt-oss)",
    "sinks": "attention sinks",
}


def _as_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """transformers' 4-D mask in fusedlayers' convention: bool stays (True = attend); a
    float mask (one the caller prepared) is an additive bias, in the queries' dtype."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask.to(dtype)
    return mask.bool()


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[Tensor] = None, *,
                      backend: str = "auto", **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-function signature on :func:`fusedlayers.attention`.

    Args:
        module: the calling attention module (``is_causal`` is read from it when not given).
        query: (B, Hq, Nq, D); key, value: (B, Hkv, Nk, D), grouped KV heads passed as
            they are (Hq % Hkv == 0).
        attention_mask: None, a bool (B, 1, Nq, Nk) mask (True = attend) from ``sdpa_mask``,
            or a float additive mask a caller prepared.
        dropout, scaling: attention dropout (0 in eval) and score scale (None: 1/sqrt(D)).
        is_causal: as in transformers' sdpa integration: causal only when there is more
            than one query and no mask (the mask function folds causality into the mask
            otherwise), aligned top-left.
        position_bias: T5's relative-position bias, (1 or B, H, Nq, Nk), added to the
            scores (and given its gradient).
        backend: "auto" or a backend name (``register`` binds it).
        kwargs: ``output_attentions=True`` also returns the weights, from the materialised
            path; softcap and attention sinks raise ``NotImplementedError``; the rest
            (cache positions, ...) concern other implementations.

    Returns:
        ``(out (B, Nq, Hq, D), weights (B, Hq, Nq, Nk) or None)``.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fusedlayers attention has no {what} ({name}=, from "
                                      f"{type(module).__name__}): load this model with attn_implementation='eager'")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    mask = _as_mask(attention_mask, query.dtype)
    if position_bias is not None:  # one additive bias: T5's position bias, -inf where the mask masks
        bias = position_bias.to(query.dtype)
        if mask is None:
            mask = bias
        else:
            mask = torch.where(mask, bias, float("-inf")) if mask.dtype == torch.bool else bias + mask
    if kwargs.get("output_attentions"):
        out, weights = materialized_attention(query, key, value, mask, causal=causal, scale=scaling,
                                              dropout_p=dropout)
    else:
        out, weights = ops.attention(query, key, value, mask, causal=causal, dropout_p=dropout, scale=scaling,
                                     backend=backend), None
    return out.transpose(1, 2).contiguous(), weights  # (B, Hq, Nq, D) -> (B, Nq, Hq, D)


def register(name: str = NAME, backend: str = "auto") -> str:
    """Registers fusedlayers' attention with transformers under ``name``: the attention
    function with ``AttentionInterface`` and ``sdpa_mask`` with ``AttentionMaskInterface``.
    Then ``attn_implementation=name`` (``from_pretrained``, ``from_config``) or
    ``model.set_attn_implementation(name)`` selects it. Returns ``name``.

    Args:
        name: the implementation name (registering again under a name replaces it).
        backend: the ``backend`` every call uses ("auto" or a backend name).
    """
    _check_backend(backend)
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as e:
        raise ImportError("fusedlayers.hf.register needs transformers: pip install 'fusedlayers[hf]'") from e

    def fusedlayers_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    AttentionInterface.register(name, fusedlayers_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    REGISTERED.add(name)
    return name
