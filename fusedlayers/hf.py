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
silently wrong. The mask function is transformers' own ``sdpa_mask`` (a 4-D bool mask,
True = attend, fusedlayers' convention, or None where ``is_causal`` alone says it all),
with one difference: for a causal sliding-window layer with no padding whose last query
is the last key (prefill, decoding), it returns None where ``sdpa_mask`` forms the
(Nq, Nk) window, once it has checked on sample rows that the mask function is that
window, and the attention function passes the window to the kernel as ``window_size``:
O(N·W) work, no N×N mask. Padded batches, packed sequences, chunked attention and every
other pattern stay in the mask.

Variants transformers passes by keyword: ``softcap`` (Gemma 2), ``s_aux`` (attention
sinks, (Hq,), gpt-oss; its gradient flows), ``sliding_window``. Arguments that change the
arithmetic in ways fusedlayers' attention does not have (per-token sinks, the sparse key
selections ``indices`` / ``block_indices``) raise ``NotImplementedError``.

transformers is imported only by ``register`` (``pip install fusedlayers[hf]``);
``import fusedlayers`` never imports it. Checked with transformers 5.24.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import ops
from .nn import _check_backend, materialized_attention

__all__ = ["register", "attention_forward", "sliding_window_mask", "NAME", "REGISTERED"]

NAME = "fusedlayers"
REGISTERED: set[str] = set()  # the names register() has filed in this process

# Keyword arguments that change the arithmetic in ways fusedlayers' attention does not have.
_UNSUPPORTED = {
    "indices": "sparse attention over the keys an indexer selects",
    "block_indices": "block-sparse attention over the key blocks an indexer selects",
}

# id(config) -> (weakref to the config, window): the configs whose sliding-window mask
# sliding_window_mask skipped, for the attention modules that name no window of their own.
_SKIPPED_WINDOWS: dict[int, tuple[Any, int]] = {}


def _as_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """transformers' 4-D mask in fusedlayers' convention: bool stays (True = attend); a
    float mask (one the caller prepared) is an additive bias, in the queries' dtype."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask.to(dtype)
    return mask.bool()


def _sinks(module: torch.nn.Module, kwargs: dict, heads: int) -> Optional[Tensor]:
    """The attention sinks transformers passes (``s_aux``, or ``sinks``) as fusedlayers'
    (Hq,) ``sinks``; the tensor itself, so that its gradient reaches the parameter."""
    given = [(name, kwargs[name]) for name in ("s_aux", "sinks") if kwargs.get(name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"attention got both s_aux= and sinks= (from {type(module).__name__}): pass one")
    name, sinks = given[0]
    if not isinstance(sinks, Tensor) or tuple(sinks.shape) != (heads,):
        shape = tuple(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__
        raise NotImplementedError(f"fusedlayers attention takes one sink logit per query head, ({heads},); "
                                  f"{name}= from {type(module).__name__} is {shape}: load this model with "
                                  "attn_implementation='eager'")
    return sinks


def _window(module: torch.nn.Module, kwargs: dict) -> Optional[int]:
    """The layer's sliding window (transformers' size: a query sees itself and the
    ``window - 1`` keys before it): the ``sliding_window`` argument; else the module's
    ``sliding_window``; else, for a module whose model's sliding-window mask
    :func:`sliding_window_mask` skipped, the window of that mask when the config says the
    layer is a sliding one (all layers, without ``layer_types``)."""
    if "sliding_window" in kwargs:
        return kwargs["sliding_window"]
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    entry = _SKIPPED_WINDOWS.get(id(config)) if config is not None else None
    if entry is None or entry[0]() is not config:
        return None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return entry[1]
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise NotImplementedError(f"{type(module).__name__} names neither its sliding window nor its layer_idx: "
                                  "fusedlayers cannot tell whether it is a sliding-window layer")
    return entry[1] if layer_types[layer] == "sliding_attention" else None


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[Tensor] = None, *,
                      backend: str = "auto", **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-function signature on :func:`fusedlayers.attention`.

    Args:
        module: the calling attention module (``is_causal`` is read from it when not given).
        query: (B, Hq, Nq, D); key, value: (B, Hkv, Nk, D), grouped KV heads passed as
            they are (Hq % Hkv == 0).
        attention_mask: None, a bool (B, 1, Nq, Nk) mask (True = attend) from the mask
            function, or a float additive mask a caller prepared.
        dropout, scaling: attention dropout (0 in eval) and score scale (None: 1/sqrt(D)).
        is_causal: as in transformers' sdpa integration: causal only when there is more
            than one query and no mask (the mask function folds causality into the mask
            otherwise), aligned top-left.
        position_bias: T5's relative-position bias, (1 or B, H, Nq, Nk), added to the
            scores (and given its gradient).
        backend: "auto" or a backend name (``register`` binds it).
        kwargs: ``softcap`` (None or a float: logit soft-capping); ``s_aux`` or ``sinks``,
            (Hq,) attention sinks (other shapes raise ``NotImplementedError``);
            ``sliding_window`` (None or the window W: with no mask, the kernel gets
            ``window_size=(W - 1, W - 1)``, transformers' flash-attention convention, aligned
            bottom-right for one query, top-left otherwise; a mask already holds the
            window); ``deterministic``; ``output_attentions=True`` also returns the weights,
            from the materialised path; ``indices`` / ``block_indices`` (sparse attention)
            raise ``NotImplementedError``; the rest (cache positions, ...) concern other
            implementations.

    Returns:
        ``(out (B, Nq, Hq, D), weights (B, Hq, Nq, Nk) or None)``.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fusedlayers attention has no {what} ({name}=, from "
                                      f"{type(module).__name__}): load this model with attn_implementation='eager'")
    softcap = kwargs.get("softcap")
    sinks = _sinks(module, kwargs, query.shape[1])
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    window, align = None, "top_left"
    if attention_mask is None:  # a mask holds the window already
        size = _window(module, kwargs)
        if size is not None:
            window = (int(size) - 1, int(size) - 1)
            align = "bottom_right" if query.shape[2] == 1 else "top_left"  # one query: the last key's position
    mask = _as_mask(attention_mask, query.dtype)
    if position_bias is not None:  # one additive bias: T5's position bias, -inf where the mask masks
        bias = position_bias.to(query.dtype)
        if mask is None:
            mask = bias
        else:
            mask = torch.where(mask, bias, float("-inf")) if mask.dtype == torch.bool else bias + mask
    variants = dict(causal=causal, causal_align=align, scale=scaling, window_size=window,
                    softcap=float(softcap) if softcap else 0.0, sinks=sinks)
    if kwargs.get("output_attentions"):
        out, weights = materialized_attention(query, key, value, mask, dropout_p=dropout, **variants)
    else:
        out, weights = ops.attention(query, key, value, mask, dropout_p=dropout, backend=backend,
                                     deterministic=bool(kwargs.get("deterministic")), **variants), None
    return out.transpose(1, 2).contiguous(), weights  # (B, Hq, Nq, D) -> (B, Nq, Hq, D)


def _probe_rows(q_length: int, window: int) -> list[int]:
    """The query rows :func:`sliding_window_mask` checks: both ends, a consecutive pair in
    the middle and around the first full window."""
    last, mid = q_length - 1, q_length // 2
    return sorted({r for r in (0, 1, mid, mid + 1, window - 1, window, last - 1, last) if 0 <= r <= last})


def _is_causal_window(mask_function: Callable, batch_size: int, q_rows: Tensor, kv: Tensor, window: int) -> bool:
    """Whether ``mask_function`` (transformers' index convention) gives, on the query
    positions ``q_rows`` against the key positions ``kv``, the causal sliding window
    ``q - window < kv <= q`` in every batch row."""
    b = torch.arange(batch_size, device=kv.device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=kv.device)[None, :, None, None]
    q, k = q_rows[None, None, :, None], kv[None, None, None, :]
    got = torch.as_tensor(mask_function(b, h, q, k), device=kv.device)
    want = (k <= q) & (k > q - window)
    return got.dtype == torch.bool and bool(torch.equal(got.expand(batch_size, 1, *want.shape[2:]),
                                                        want.expand(batch_size, 1, *want.shape[2:])))


def sliding_window_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                        mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None,
                        local_size: Optional[int] = None, allow_is_causal_skip: bool = True,
                        use_vmap: bool = False, device="cpu", **kwargs) -> Optional[Tensor]:
    """transformers' ``sdpa_mask`` (same signature), except that it returns None for a
    causal sliding-window mask the attention function can run as ``window_size``: when
    ``allow_is_causal_skip`` and sdpa's own skip conditions hold (no export or tracing, no
    padding, one query or as many queries as keys), the last query is the last key, and
    ``mask_function`` gives ``q - local_size < kv <= q`` on the rows of
    :func:`_probe_rows`. Otherwise (and on any error in the check) ``sdpa_mask``'s mask.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap,
                device=device, **kwargs)
    if local_size is not None and allow_is_causal_skip and not use_vmap and _can_skip_window(**args):
        config = kwargs.get("config")
        if config is not None:
            key = id(config)
            if key not in _SKIPPED_WINDOWS or _SKIPPED_WINDOWS[key][0]() is not config:
                weakref.finalize(config, _SKIPPED_WINDOWS.pop, key, None)
            _SKIPPED_WINDOWS[key] = (weakref.ref(config), int(local_size))
        return None
    return sdpa_mask(**args)


def _can_skip_window(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     local_size, device, **_) -> bool:
    try:
        from transformers.masking_utils import _ignore_causal_mask_sdpa, prepare_padding_mask

        if torch.compiler.is_compiling():  # the probe reads tensor values: sdpa_mask's mask under compile
            return False
        if isinstance(q_offset, Tensor) or isinstance(kv_offset, Tensor) or q_length < 1 or local_size < 1:
            return False
        if q_offset + q_length != kv_offset + kv_length:  # the last query is not the last key
            return False
        # sdpa's own checks with no window: export and tracing, padding, one query or Nq == Nk
        padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if not (q_length in (1, kv_length) and _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length,
                                                                       q_offset, kv_offset, None)):
            return False
        rows = torch.tensor(_probe_rows(q_length, local_size), device=device) + q_offset
        kv = torch.arange(kv_length, device=device) + kv_offset
        return _is_causal_window(mask_function, batch_size, rows, kv, local_size)
    except Exception:  # a mask function the probe cannot evaluate: sdpa_mask forms the mask
        return False


def register(name: str = NAME, backend: str = "auto") -> str:
    """Registers fusedlayers' attention with transformers under ``name``: the attention
    function with ``AttentionInterface`` and :func:`sliding_window_mask` (``sdpa_mask`` that
    leaves causal sliding windows to the kernel) with ``AttentionMaskInterface``. Then
    ``attn_implementation=name`` (``from_pretrained``, ``from_config``) or
    ``model.set_attn_implementation(name)`` selects it. Returns ``name``.

    Args:
        name: the implementation name (registering again under a name replaces it).
        backend: the ``backend`` every call uses ("auto" or a backend name).
    """
    _check_backend(backend)
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask  # noqa: F401  (the mask sliding_window_mask wraps)
    except ImportError as e:
        raise ImportError("fusedlayers.hf.register needs transformers: pip install 'fusedlayers[hf]'") from e

    def fusedlayers_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    AttentionInterface.register(name, fusedlayers_attention)
    AttentionMaskInterface.register(name, sliding_window_mask)
    REGISTERED.add(name)
    return name
