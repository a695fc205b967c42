"""The Transformer of "Attention is all you need" (Vaswani et al. 2017) and BERT (Devlin et al.
2019), one class per box of the paper's figure, on fusedlayers' ops.

Every attention is one call of :func:`fusedlayers.attention` (as nanoGPT calls
``F.scaled_dot_product_attention``); the norms are the library's own modules,
:class:`fusedlayers.nn.LayerNorm` and, for each "Add & Norm" box,
:class:`fusedlayers.nn.AddLayerNorm` (residual add, dropout and layer norm fused). Which kernel
serves them is decided by ``fusedlayers.dispatch``: the model passes its ``backend`` string
("auto" by default) through and never branches on it.

Boxes (bottom to top of Figure 1)::

    Embeddings            token embedding * sqrt(d_model) + PositionalEncoding, dropout
    MultiHeadAttention    self- or cross-attention, with an optional KV cache for decoding
    FeedForward           Linear -> ReLU (GELU for BERT) -> Linear
    AddNorm               LayerNorm(residual + Dropout(sublayer output)); pre-norm as an option
    EncoderLayer          self-attention, AddNorm, feed-forward, AddNorm
    DecoderLayer          masked self-attention, AddNorm, cross-attention, AddNorm, FF, AddNorm
    Encoder / Decoder     N layers
    EncoderDecoder        + the output projection (tied to the embeddings), "Attention is all you need"
    BertEncoder           token + position + segment embeddings, Encoder, MLMHead, ClassifierHead

Factories: :func:`make_encoder_decoder` and :func:`make_bert`, from a :class:`ModelConfig`.
Shapes: B batch, N (Nq, Nk) sequence length, d d_model, H heads, Dh = d / H head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusedlayers
from fusedlayers import reference
from fusedlayers.nn import AddLayerNorm, LayerNorm

__all__ = [
    "ModelConfig", "PositionalEncoding", "Embeddings", "MultiHeadAttention", "FeedForward", "AddNorm",
    "EncoderLayer", "DecoderLayer", "Encoder", "Decoder", "EncoderDecoder", "BertEncoder", "MLMHead",
    "ClassifierHead", "make_encoder_decoder", "make_bert", "padding_mask",
]


@dataclass
class ModelConfig:
    """Hyper-parameters of both models. The defaults are the tiny CPU model of the lessons."""

    vocab_size: int = 64  # source (and BERT) vocabulary
    tgt_vocab_size: int = 0  # target vocabulary of EncoderDecoder; 0 = vocab_size
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    n_layers: int = 2  # per stack
    max_len: int = 64
    dropout: float = 0.0  # the papers use 0.1; the tiny models see fresh sentences and underfit with it
    positions: str = "sinusoidal"  # "sinusoidal" | "learned" | "none"
    prenorm: bool = False  # post-norm as in both papers
    residual: bool = True  # False only to show why residual connections matter
    activation: str = "relu"  # "relu" (Transformer) | "gelu" (BERT)
    share_embeddings: bool = True  # tie the output projection to the target embeddings
    n_classes: int = 2  # BERT classification head
    n_segments: int = 2  # BERT segment (token type) embeddings
    pad_id: int = 0
    backend: str = "auto"  # passed to every fusedlayers op

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.positions not in ("sinusoidal", "learned", "none"):
            raise ValueError(f"positions must be 'sinusoidal', 'learned' or 'none', got {self.positions!r}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        if self.backend != "auto" and self.backend not in fusedlayers.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use 'auto' or one of {', '.join(fusedlayers.BACKENDS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """Key-padding mask for fusedlayers.attention: (B, N) ids -> (B, 1, 1, N) bool, True = attend."""
    return (ids != pad_id)[:, None, None, :]  # (B, 1, 1, N)


# ------------------------------------------------------------------------------ boxes


class PositionalEncoding(nn.Module):
    """Adds position information: the paper's sinusoids (section 3.5), learned vectors, or none.

    PE(pos, 2i) = sin(pos / 10000^(2i/d)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
    """

    def __init__(self, d_model: int, max_len: int, kind: str = "sinusoidal"):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        else:
            self.register_buffer("table", sinusoids(max_len, d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        # x: (B, N, d); offset: index of x's first position (decoding with a KV cache)
        if self.kind == "none":
            return x
        n = x.shape[1]
        if offset + n > self.table.shape[0]:
            raise ValueError(f"sequence of length {offset + n} exceeds max_len={self.table.shape[0]}")
        return x + self.table[offset:offset + n].to(x.dtype)  # (N, d) broadcast over B


def sinusoids(max_len: int, d_model: int) -> Tensor:
    """(max_len, d_model) table of the paper's sinusoidal encodings."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)  # (d/2,)
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return table


class Embeddings(nn.Module):
    """Token embedding scaled by sqrt(d_model) (section 3.4), plus positions, then dropout."""

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(self.tokens.weight, std=cfg.d_model ** -0.5)
        self.positions = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.positions)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = math.sqrt(cfg.d_model)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        # ids: (B, N) -> (B, N, d)
        return self.dropout(self.positions(self.tokens(ids) * self.scale, offset))


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_H) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Self-attention when ``memory`` is None, cross-attention (queries from the decoder, keys and
    values from the encoder's output) otherwise. The H heads run in one call of
    :func:`fusedlayers.attention` on (B, H, N, Dh) tensors.

    KV cache (decoding): pass a dict as ``cache``. Self-attention appends this step's keys and
    values to it; cross-attention computes the memory's keys and values once and reuses them.
    With a cache, a causal self-attention has Nq (new tokens) < Nk (all tokens so far); the
    diagonal is then aligned bottom-right, so the new token sees every earlier one::

        Nq=1, Nk=4, bottom_right:  1 1 1 1
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.w_q, self.w_k, self.w_v, self.w_o = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))
        self.dropout_p = cfg.dropout
        self.backend = cfg.backend
        self.record = False  # set True to keep the attention weights of the last call
        self.weights: Optional[Tensor] = None
        # Context parallelism (transformer.train): None, or {"group": ProcessGroup, "layout": str}; then x is this
        # rank's shard of the sequence and self-attention runs over the whole sequence through the ring.
        self.context_parallel: Optional[dict] = None

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.h, self.dh).transpose(1, 2)  # (B, N, d) -> (B, H, N, Dh)

    def forward(self, x: Tensor, memory: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                causal: bool = False, cache: Optional[dict] = None) -> Tensor:
        # x: (B, Nq, d); memory: (B, Nk, d) or None; mask: bool broadcastable to (B, H, Nq, Nk)
        b, nq, d = x.shape
        q = self._heads(self.w_q(x))  # (B, H, Nq, Dh)
        if memory is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]  # the encoder memory's keys and values, computed at step 0
        else:
            src = x if memory is None else memory
            k, v = self._heads(self.w_k(src)), self._heads(self.w_v(src))  # (B, H, N, Dh)
            if cache is not None and memory is None and "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, Nk_before + Nq, Dh)
                v = torch.cat([cache["v"], v], dim=2)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        if self.context_parallel is not None and memory is None and cache is None and not self.record:
            from fusedlayers.distributed import context_parallel_attention

            out = context_parallel_attention(q, k, v, mask, causal=causal, backend=self.backend,
                                             dropout_p=self.dropout_p if self.training else 0.0,
                                             **self.context_parallel)  # (B, H, N_local, Dh)
        else:
            out = fusedlayers.attention(q, k, v, mask, causal=causal, causal_align="bottom_right",
                                        dropout_p=self.dropout_p if self.training else 0.0, backend=self.backend)
        if self.record:
            self.weights = attention_weights(q, k, mask, causal).detach()  # (B, H, Nq, Nk)
        out = out.transpose(1, 2).reshape(b, nq, d)  # (B, H, Nq, Dh) -> (B, Nq, d)
        return self.w_o(out)


def attention_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
    """The attention probabilities P = softmax(q k^T / sqrt(Dh)) of :meth:`MultiHeadAttention.forward`
    (before dropout), formed in float32 by the reference (:func:`fusedlayers.reference.attention_probs`,
    the same masking rules as the op: bool ``mask`` True = attend, causal aligned bottom-right): a
    second softmax beside the fused kernel, which never forms P. (B, H, Nq, Nk); masked entries
    and rows that see no key 0."""
    return reference.attention_probs(q.float(), k.float(), mask, causal=causal, causal_align="bottom_right")


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (section 3.3); GELU for BERT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.act(self.w_1(x))))  # (B, N, d) -> (B, N, d_ff) -> (B, N, d)


class AddNorm(AddLayerNorm):
    """The "Add & Norm" box: LayerNorm(x + Dropout(Sublayer(x))), one fused op
    (:class:`fusedlayers.nn.AddLayerNorm`; the same ``weight`` and ``bias`` parameters).

    A layer carries two tensors: ``x``, what the next sublayer reads, and ``stream``, the
    residual stream. ``forward(out, stream)`` takes the sublayer's output and returns the new
    pair:

    * post-norm (both papers): x = stream = LN(stream + dropout(out)).
    * pre-norm (``prenorm=True``): stream = stream + dropout(out) and x = LN(stream), the next
      sublayer's normalised input (or, after the last sublayer, the stack's final norm).

    ``residual=False`` drops the "+ stream" (the residual lesson): x = stream = LN(dropout(out)).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, dropout=cfg.dropout, prenorm=cfg.prenorm, backend=cfg.backend)
        self.residual = cfg.residual

    def forward(self, out: Tensor, stream: Tensor) -> tuple[Tensor, Tensor]:
        y = super().forward(out, stream if self.residual else None)
        return y if self.prenorm else (y, y)


class EncoderLayer(nn.Module):
    """Self-attention, Add & Norm, feed-forward, Add & Norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.norm_1 = MultiHeadAttention(cfg), AddNorm(cfg)
        self.ff, self.norm_2 = FeedForward(cfg), AddNorm(cfg)

    def forward(self, x: Tensor, stream: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x, stream = self.norm_1(self.self_attn(x, mask=mask), stream)
        return self.norm_2(self.ff(x), stream)


class DecoderLayer(nn.Module):
    """Masked self-attention, Add & Norm, cross-attention over the encoder output, Add & Norm,
    feed-forward, Add & Norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.norm_1 = MultiHeadAttention(cfg), AddNorm(cfg)
        self.cross_attn, self.norm_2 = MultiHeadAttention(cfg), AddNorm(cfg)
        self.ff, self.norm_3 = FeedForward(cfg), AddNorm(cfg)

    def forward(self, x: Tensor, stream: Tensor, memory: Tensor, memory_mask: Optional[Tensor],
                cache: Optional[dict] = None) -> tuple[Tensor, Tensor]:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x, stream = self.norm_1(self.self_attn(x, causal=True, cache=self_cache), stream)
        x, stream = self.norm_2(self.cross_attn(x, memory, memory_mask, cache=cross_cache), stream)
        return self.norm_3(self.ff(x), stream)


class _Stack(nn.Module):
    """N identical layers; pre-norm stacks first normalise their input (post-norm ones do not)."""

    def __init__(self, layer, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.n_layers))
        self.input_norm = LayerNorm(cfg.d_model, backend=cfg.backend) if cfg.prenorm else nn.Identity()


class Encoder(_Stack):
    """N encoder layers. ``forward`` returns the output (B, N, d); ``all_layers=True`` returns
    the list of the embeddings' and each layer's output (probing)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(EncoderLayer, cfg)

    def forward(self, h: Tensor, mask: Optional[Tensor], all_layers: bool = False):
        x, stream, outs = self.input_norm(h), h, [h]
        for layer in self.layers:
            x, stream = layer(x, stream, mask)
            outs.append(x)
        return outs if all_layers else x


class Decoder(_Stack):
    """N decoder layers; ``cache`` is a list with one dict per layer (decoding)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(DecoderLayer, cfg)

    def forward(self, h: Tensor, memory: Tensor, memory_mask: Optional[Tensor],
                cache: Optional[list] = None) -> Tensor:
        x, stream = self.input_norm(h), h
        for i, layer in enumerate(self.layers):
            x, stream = layer(x, stream, memory, memory_mask, None if cache is None else cache[i])
        return x


# ------------------------------------------------------------------------------ models


class EncoderDecoder(nn.Module):
    """The Transformer of "Attention is all you need": encode the source once, decode the target
    left to right. Output logits are the target embeddings' transpose (shared weights, 3.4)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        tgt_vocab = cfg.tgt_vocab_size or cfg.vocab_size
        self.src_embed, self.tgt_embed = Embeddings(cfg.vocab_size, cfg), Embeddings(tgt_vocab, cfg)
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.generator = nn.Linear(cfg.d_model, tgt_vocab, bias=False)  # the "Linear" box before softmax
        if cfg.share_embeddings:
            self.generator.weight = self.tgt_embed.tokens.weight

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, Ns) ids -> memory (B, Ns, d) and its key-padding mask (B, 1, 1, Ns)."""
        mask = padding_mask(src, self.cfg.pad_id)
        return self.encoder(self.src_embed(src), mask), mask

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache: Optional[list] = None,
               offset: int = 0) -> Tensor:
        """tgt (B, Nt) ids (positions offset..offset+Nt-1) -> logits (B, Nt, V_tgt)."""
        h = self.decoder(self.tgt_embed(tgt, offset), memory, memory_mask, cache)
        return self.generator(h)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, Ns), tgt_in (B, Nt) = [BOS, y1, ..., y_{Nt-1}] -> (B, Nt, V_tgt)."""
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    def new_cache(self) -> list:
        """An empty KV cache, one dict per decoder layer."""
        return [{} for _ in self.decoder.layers]


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense, GELU, layer norm, then the (tied) token embeddings."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense, self.norm = nn.Linear(cfg.d_model, cfg.d_model), LayerNorm(cfg.d_model, backend=cfg.backend)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.decoder.weight = embedding.weight

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))  # (B, N, d) -> (B, N, V)


class ClassifierHead(nn.Module):
    """BERT's sequence classifier: pooler (dense + tanh on the [CLS] vector), dropout, linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pool, self.dropout = nn.Linear(cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.dropout(torch.tanh(self.pool(h[:, 0]))))  # (B, N, d) -> [CLS] (B, d) -> (B, C)


class BertEmbeddings(nn.Module):
    """BERT's input: token + position + segment embeddings, layer norm, dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(self.tokens.weight, std=cfg.d_model ** -0.5)
        self.positions = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.positions)
        self.segments = nn.Embedding(cfg.n_segments, cfg.d_model)
        nn.init.zeros_(self.segments.weight)
        self.norm, self.dropout = LayerNorm(cfg.d_model, backend=cfg.backend), nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, segments: Optional[Tensor] = None, offset: int = 0) -> Tensor:
        # offset: position of ids[:, 0] in the sequence (a context-parallel shard)
        h = self.tokens(ids)  # (B, N, d)
        if segments is not None:
            h = h + self.segments(segments)
        return self.dropout(self.norm(self.positions(h, offset)))


class BertEncoder(nn.Module):
    """BERT: embeddings, a Transformer encoder, a masked-LM head and a classification head.

    ``forward(ids)`` returns the contextual vectors (B, N, d); ``mlm_logits`` and ``classify``
    apply the heads; ``layers(ids)`` returns every layer's output for probing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings, self.encoder = BertEmbeddings(cfg), Encoder(cfg)
        self.mlm_head = MLMHead(cfg, self.embeddings.tokens)
        self.classifier = ClassifierHead(cfg)

    def forward(self, ids: Tensor, segments: Optional[Tensor] = None, offset: int = 0) -> Tensor:
        return self.encoder(self.embeddings(ids, segments, offset), padding_mask(ids, self.cfg.pad_id))

    def layers(self, ids: Tensor) -> list[Tensor]:
        """[embeddings, layer 1, ..., layer L] outputs, each (B, N, d)."""
        return self.encoder(self.embeddings(ids), padding_mask(ids, self.cfg.pad_id), all_layers=True)

    def mlm_logits(self, ids: Tensor, offset: int = 0) -> Tensor:
        return self.mlm_head(self(ids, offset=offset))  # (B, N, V)

    def classify(self, ids: Tensor) -> Tensor:
        return self.classifier(self(ids))  # (B, C)


def _init(model: nn.Module) -> nn.Module:
    """Xavier-uniform for every weight matrix of the attention and feed-forward boxes."""
    for module in model.modules():
        if isinstance(module, (MultiHeadAttention, FeedForward)):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
    return model


def make_encoder_decoder(cfg: Optional[ModelConfig] = None, **overrides) -> EncoderDecoder:
    """The factory of the paper's model: ``make_encoder_decoder(vocab_size=.., tgt_vocab_size=..)``."""
    cfg = ModelConfig(**{**(cfg.to_dict() if cfg else {}), **overrides})
    return _init(EncoderDecoder(cfg))


def make_bert(cfg: Optional[ModelConfig] = None, **overrides) -> BertEncoder:
    """The factory of BERT (GELU, learned positions unless told otherwise)."""
    base = {"activation": "gelu", "positions": "learned"}
    cfg = ModelConfig(**{**base, **(cfg.to_dict() if cfg else {}), **overrides})
    return _init(BertEncoder(cfg))
