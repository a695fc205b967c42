"""Training: the three tasks (translate, mlm, classify) and one loop for all of them.

The loop is the paper's recipe (section 5.3): AdamW (beta2 = 0.98, eps = 1e-9), linear warm-up
then inverse-square-root decay of the learning rate, label smoothing, gradient clipping; mixed
precision on GPU (bfloat16 autocast, or float16 with a GradScaler where bf16 is missing); a
tqdm bar with the loss and tokens/s; checkpoints (``transformer.checkpoint``) every
``save_every`` steps and at the end, resumable bit-exactly: the batch of step t is drawn from a
generator seeded by (seed, t, rank), and the checkpoint holds torch's RNG state for dropout.

Several processes: launch with ``torchrun --nproc_per_node=N -m fusedlayers train ...``; the
loop sees WORLD_SIZE > 1, joins the process group (gloo on CPU, NCCL on GPU) and wraps the
model in DistributedDataParallel. Each rank draws its own batches; rank 0 writes checkpoints
and the summary; at the end the ranks check that their weights are bit-identical.

Typical::

    task = TranslateTask()
    result = train(task, ModelConfig(), TrainConfig(steps=1500, out="runs/translate"))
    result["metrics"]  # {"exact_match": ..., ...}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .data import (BOS, CLS, EOS, PAD, SEP, Grammar, TextTokenizer, WordVocab, flip_agreement, load_text,
                   mask_tokens, pad_batch, split_corpus, step_generator)
from .generate import greedy
from .model import ModelConfig, make_bert, make_encoder_decoder

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3  # peak learning rate, reached at the end of warm-up
    warmup: int = 100
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # mixed precision on GPU (ignored on CPU)
    out: Optional[str] = None  # folder for checkpoint.safetensors and summary.json
    save_every: int = 0  # 0: only at the end
    resume: bool = False  # continue from out/checkpoint.safetensors if it exists
    init_from: Optional[str] = None  # load matching weights (e.g. a pre-trained encoder) first
    eval: bool = True
    quiet: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The paper's schedule, lrate = d^-0.5 * min(step^-0.5, step * warmup^-1.5), written with
    its peak as the parameter: lr * min(step / warmup, sqrt(warmup / step)); step counts from 1."""
    step = max(step, 1)
    warmup = max(cfg.warmup, 1)
    return cfg.lr * min(step / warmup, math.sqrt(warmup / step))


# ------------------------------------------------------------------------------ tasks


class TranslateTask:
    """Synthetic source language -> target language with another lexicon and word order.
    Metric: exact match of greedy decoding on held-out sentences."""

    name = "translate"

    def __init__(self, n_train: int = 20000, n_test: int = 200, seed: int = 0, grammar: Optional[Grammar] = None):
        self.src_vocab, self.tgt_vocab = WordVocab.source(), WordVocab.target()
        self.train_set, self.test_set = split_corpus(n_train, n_test, seed, grammar)

    def make_model(self, cfg: ModelConfig):
        return make_encoder_decoder(cfg, vocab_size=len(self.src_vocab), tgt_vocab_size=len(self.tgt_vocab))

    def encode(self, sentences) -> dict:
        src = pad_batch([self.src_vocab.encode(s.words) for s in sentences])  # (B, Ns)
        tgt = pad_batch([[BOS] + self.tgt_vocab.encode(s.target) + [EOS] for s in sentences])  # (B, Nt + 1)
        return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}

    def batch(self, gen: torch.Generator, size: int) -> dict:
        idx = torch.randint(len(self.train_set), (size,), generator=gen).tolist()
        return self.encode([self.train_set[i] for i in idx])

    def loss(self, model, batch: dict, label_smoothing: float) -> tuple[Tensor, int]:
        logits = model(batch["src"], batch["tgt_in"])  # (B, Nt, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(), ignore_index=PAD,
                               label_smoothing=label_smoothing)
        return loss, int((batch["src"] != PAD).sum() + (batch["tgt_out"] != PAD).sum())

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int = 100) -> dict:
        exact, tokens, total = 0, 0, 0
        for i in range(0, len(self.test_set), batch_size):
            chunk = self.test_set[i:i + batch_size]
            b = self.encode(chunk)
            ids, _ = greedy(model, b["src"].to(device), max_len=b["tgt_out"].shape[1] + 2)
            for s, row in zip(chunk, ids.tolist()):
                hyp = self.tgt_vocab.decode(row[:row.index(EOS)] if EOS in row else row)
                exact += hyp == s.target
                tokens += sum(h == r for h, r in zip(hyp, s.target))
                total += len(s.target)
        return {"exact_match": exact / len(self.test_set), "token_accuracy": tokens / total}


class MLMTask:
    """Masked-language-model pre-training (BERT), on the synthetic language or on a user's text
    (``text=path``: a WordPiece or BPE vocabulary is trained on it first). Metric: accuracy on
    the masked tokens of held-out sentences."""

    name = "mlm"

    def __init__(self, n_train: int = 20000, n_test: int = 500, seed: int = 0, text: Optional[str] = None,
                 tokenizer: str = "wordpiece", vocab_size: int = 1000, max_len: int = 64):
        if text is None:
            self.vocab = WordVocab.source()
            train, test = split_corpus(n_train, n_test, seed)
            self.train_set = [self.vocab.encode(s.words) for s in train]
            self.test_set = [self.vocab.encode(s.words) for s in test]
        else:
            lines = load_text(text)
            self.vocab = TextTokenizer.train(lines, tokenizer, vocab_size)
            seqs = [ids[:max_len - 2] for ids in map(self.vocab.encode, lines) if ids]
            n_test = min(n_test, max(1, len(seqs) // 10))
            self.train_set, self.test_set = seqs[n_test:] or seqs, seqs[:n_test]
        self.max_len = max_len

    def make_model(self, cfg: ModelConfig):
        return make_bert(cfg, vocab_size=len(self.vocab), max_len=max(cfg.max_len, self.max_len))

    def encode(self, seqs, gen: torch.Generator) -> dict:
        ids = pad_batch([[CLS] + s + [SEP] for s in seqs])  # (B, N)
        inputs, labels = mask_tokens(ids, len(self.vocab), gen, first_regular=self.vocab.first_regular)
        return {"ids": inputs, "labels": labels}

    def batch(self, gen: torch.Generator, size: int) -> dict:
        idx = torch.randint(len(self.train_set), (size,), generator=gen).tolist()
        return self.encode([self.train_set[i] for i in idx], gen)

    def loss(self, model, batch: dict, label_smoothing: float) -> tuple[Tensor, int]:
        logits = model.mlm_logits(batch["ids"])  # (B, N, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)
        return loss, int((batch["ids"] != PAD).sum())

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int = 250) -> dict:
        model.eval()
        gen = torch.Generator().manual_seed(12345)  # the same masks every evaluation
        right = total = 0
        for i in range(0, len(self.test_set), batch_size):
            b = self.encode(self.test_set[i:i + batch_size], gen)
            pred = model.mlm_logits(b["ids"].to(device)).argmax(-1).cpu()
            chosen = b["labels"] != -100
            right += int((pred[chosen] == b["labels"][chosen]).sum())
            total += int(chosen.sum())
        return {"masked_accuracy": right / total}


class ClassifyTask:
    """Sentence classification built from the corpus: is the sentence grammatical, i.e. does
    the main verb agree with its subject ("the dog near the cats chases" vs "... chase")?
    Half of the examples have the verb's number flipped. ``n_train`` labelled examples only:
    the setting where pre-training pays. Metric: accuracy on held-out sentences."""

    name = "classify"

    def __init__(self, n_train: int = 500, n_test: int = 500, seed: int = 0):
        self.vocab = WordVocab.source()
        train, test = split_corpus(n_train, n_test, seed + 7)
        self.train_set, self.test_set = self._label(train), self._label(test)

    def _label(self, sentences) -> list:
        out = []
        for i, s in enumerate(sentences):
            ok = i % 2 == 0
            out.append(([CLS] + self.vocab.encode((s if ok else flip_agreement(s)).words) + [SEP], int(ok)))
        return out

    def make_model(self, cfg: ModelConfig):
        return make_bert(cfg, vocab_size=len(self.vocab), n_classes=2)

    def encode(self, examples) -> dict:
        return {"ids": pad_batch([e[0] for e in examples]), "labels": torch.tensor([e[1] for e in examples])}

    def batch(self, gen: torch.Generator, size: int) -> dict:
        idx = torch.randint(len(self.train_set), (size,), generator=gen).tolist()
        return self.encode([self.train_set[i] for i in idx])

    def loss(self, model, batch: dict, label_smoothing: float) -> tuple[Tensor, int]:
        logits = model.classify(batch["ids"])  # (B, 2)
        return F.cross_entropy(logits.float(), batch["labels"]), int((batch["ids"] != PAD).sum())

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int = 250) -> dict:
        model.eval()
        right = 0
        for i in range(0, len(self.test_set), batch_size):
            b = self.encode(self.test_set[i:i + batch_size])
            right += int((model.classify(b["ids"].to(device)).argmax(-1).cpu() == b["labels"]).sum())
        return {"accuracy": right / len(self.test_set)}


TASKS = {"translate": TranslateTask, "mlm": MLMTask, "classify": ClassifyTask}


class _Objective(nn.Module):
    """model + task loss in one forward, the module DistributedDataParallel wraps."""

    def __init__(self, model: nn.Module, task, label_smoothing: float):
        super().__init__()
        self.model, self.task, self.label_smoothing = model, task, label_smoothing

    def forward(self, batch: dict):
        return self.task.loss(self.model, batch, self.label_smoothing)


# ------------------------------------------------------------------------------ the loop


def _distributed(device: str):
    """(rank, world size, device) from torchrun's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def _param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on weight matrices only (not on biases, norms, position vectors)."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _amp(device: torch.device, enabled: bool):
    """(autocast context factory, GradScaler): bf16 where supported, else fp16 with scaling."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(task, model_cfg: Optional[ModelConfig] = None, cfg: Optional[TrainConfig] = None,
          model: Optional[nn.Module] = None) -> dict:
    """Trains ``task`` and returns ``{"model", "history" (loss per step), "metrics",
    "tokens_per_s", "seconds", "step", ...}``; writes ``out/summary.json`` when ``out`` is set.

    ``model`` may be given (already built); else ``task.make_model(model_cfg)``, seeded by
    ``cfg.seed``, so every rank starts from the same weights.
    """
    model_cfg, cfg = model_cfg or ModelConfig(), cfg or TrainConfig()
    rank, world, device = _distributed(cfg.device)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = task.make_model(model_cfg)
    model.to(device)
    if cfg.init_from:
        checkpoint.load_model(cfg.init_from, model, strict=False)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    autocast, scaler = _amp(device, cfg.amp)
    path = os.path.join(cfg.out, CHECKPOINT) if cfg.out else None
    start, history = 0, []
    if cfg.resume and path and os.path.exists(path):
        meta = checkpoint.load(path, model, optimizer, scaler)
        start, history = meta["step"], meta["history"]
    if start == 0:
        torch.manual_seed(cfg.seed + 1 + rank)  # the dropout stream; a resumed run restored it above

    objective = _Objective(model, task, cfg.label_smoothing)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)

    def meta(step):
        return {"step": step, "task": task.name, "model_config": model.cfg.to_dict(), "train_config": asdict(cfg),
                "history": history, "init_from": cfg.init_from}

    bar = None
    if not cfg.quiet and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{task.name}", dynamic_ncols=True, file=sys.stderr)
    tokens, timed = 0, 0.0
    model.train()

    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step + 1, cfg)
        batch = _to(task.batch(step_generator(cfg.seed, step, rank), cfg.batch_size), device)
        with autocast():
            loss, n_tokens = objective(batch)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())  # .item() synchronises, so the time below is real
        dt = time.perf_counter() - t0
        if step > start:  # the first step warms up allocators and caches
            tokens, timed = tokens + n_tokens * world, timed + dt
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{tokens / timed:,.0f}" if timed else "-")
        if path and rank == 0 and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save(path, model, optimizer, meta(step + 1), scaler)
    if bar is not None:
        bar.close()
    if path and rank == 0 and cfg.steps > start:
        checkpoint.save(path, model, optimizer, meta(cfg.steps), scaler)

    result = {"task": task.name, "step": cfg.steps, "history": history, "tokens_per_s": tokens / timed if timed else None,
              "seconds": timed, "world_size": world, "device": str(device), "backend": model.cfg.backend,
              "metrics": {}}
    if world > 1:
        result["replicas_agree"] = _replicas_agree(model)
    if cfg.eval and rank == 0:
        result["metrics"] = task.evaluate(model, device)
        model.train()
    if cfg.out and rank == 0:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump({k: v for k, v in result.items()}, f, indent=1)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    result["model"] = model
    return result


def _replicas_agree(model: nn.Module) -> bool:
    """All ranks hold bit-identical weights (DDP's promise), checked by gathering them."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat) if dist.get_backend() == "gloo" else None
    if dist.get_backend() != "gloo":  # NCCL gathers CUDA tensors
        on = flat.to(next(model.parameters()).device)
        g = [torch.empty_like(on) for _ in gathered]
        dist.all_gather(g, on)
        gathered = [t.cpu() for t in g]
    return all(torch.equal(gathered[0], t) for t in gathered[1:])
