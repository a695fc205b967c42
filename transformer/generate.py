"""Decoding an EncoderDecoder: greedy and beam search, both with a KV cache.

The source is encoded once. Each step feeds only the newest target token (Nq = 1) to the
decoder; every self-attention appends its key and value to the layer's cache and attends to
all cached keys through ``fusedlayers.attention(..., causal=True, causal_align="bottom_right")``
(with Nq = 1 the bottom-right diagonal lets the token see every earlier one); cross-attention
reuses the encoder memory's keys and values computed at step 0. ``use_cache=False`` recomputes
the whole prefix each step instead (the slow path, kept to check the cache against).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .data import BOS, EOS, PAD
from .model import EncoderDecoder


def _reorder(cache: list, index: Tensor) -> None:
    """Keeps the cache rows of the surviving beams (index into the batch dim)."""
    for layer in cache:
        for part in layer.values():
            for key in ("k", "v"):
                if key in part:
                    part[key] = part[key].index_select(0, index)


def _never_pad_or_bos(logits: Tensor) -> Tensor:
    """float32 logits with PAD and BOS ruled out: the decoder never writes them."""
    logits = logits.float().clone()
    logits[..., [PAD, BOS]] = float("-inf")
    return logits


@torch.no_grad()
def greedy(model: EncoderDecoder, src: Tensor, max_len: int = 32, use_cache: bool = True,
           top_k: int = 0) -> tuple[Tensor, list]:
    """Greedy decoding of a batch. src (B, Ns) -> (ids (B, <= max_len) without BOS, padded with
    PAD after EOS; per step, the top_k (token, probability) candidates of sentence 0)."""
    model.eval()
    memory, mask = model.encode(src)
    b = src.shape[0]
    out = torch.full((b, 1), BOS, dtype=torch.long, device=src.device)  # (B, 1)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    cache = model.new_cache() if use_cache else None
    steps = []
    for t in range(max_len):
        if use_cache:
            logits = model.decode(out[:, -1:], memory, mask, cache, offset=t)[:, -1]  # (B, V)
        else:
            logits = model.decode(out, memory, mask)[:, -1]  # (B, V)
        probs = _never_pad_or_bos(logits).softmax(-1)
        if top_k:
            p, i = probs[0].topk(top_k)
            steps.append(list(zip(i.tolist(), p.tolist())))
        nxt = probs.argmax(-1).masked_fill(done, PAD)  # (B,)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return out[:, 1:], steps


@dataclass
class Beam:
    ids: list[int]
    logp: float
    steps: list = field(default_factory=list)  # the top candidates at each step of this hypothesis


@torch.no_grad()
def beam_search(model: EncoderDecoder, src: Tensor, beam: int = 4, max_len: int = 32, alpha: float = 0.6,
                top_k: int = 3) -> list[Beam]:
    """Beam search for one source sentence src (1, Ns), with the KV cache (beams are the batch).

    Scores are length-normalised log-probabilities, lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al.
    2016, as in the paper). Returns the finished hypotheses, best first.
    """
    model.eval()
    if src.shape[0] != 1:
        raise ValueError(f"beam_search decodes one sentence: src must be (1, Ns), got {tuple(src.shape)}")
    memory, mask = model.encode(src)
    cache = model.new_cache()
    beams = [Beam([BOS], 0.0)]
    finished: list[Beam] = []

    def score(b: Beam) -> float:
        return b.logp / (((5 + len(b.ids) - 1) / 6) ** alpha)

    for t in range(max_len):
        k = len(beams)
        last = torch.tensor([[b.ids[-1]] for b in beams], device=src.device)  # (K, 1)
        logits = model.decode(last, memory.expand(k, -1, -1), mask.expand(k, -1, -1, -1), cache, offset=t)
        logp = _never_pad_or_bos(logits[:, -1]).log_softmax(-1)  # (K, V)
        total = logp + torch.tensor([b.logp for b in beams], device=src.device)[:, None]  # (K, V)
        top = total.view(-1).topk(min(2 * beam, total.numel()))
        candidates, keep = [], []
        for value, flat in zip(top.values.tolist(), top.indices.tolist()):
            i, tok = divmod(flat, logp.shape[1])
            cand = logp[i].topk(top_k)
            step = list(zip(cand.indices.tolist(), cand.values.exp().tolist()))
            b = Beam(beams[i].ids + [tok], value, beams[i].steps + [step])
            if tok == EOS:
                finished.append(b)
            elif len(candidates) < beam:
                candidates.append(b)
                keep.append(i)
        if len(finished) >= beam or not candidates:
            break
        beams = candidates
        _reorder(cache, torch.tensor(keep, device=src.device))
    finished = sorted(finished or beams, key=score, reverse=True)
    for b in finished:
        b.ids = [i for i in b.ids[1:] if i != EOS]
    return finished
