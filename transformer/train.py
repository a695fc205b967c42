"""Training: the three tasks (translate, mlm, classify) and one loop for all of them.

The loop is the paper's recipe (section 5.3): AdamW (beta2 = 0.98, eps = 1e-9), linear warm-up
then inverse-square-root decay of the learning rate, label smoothing, gradient clipping; mixed
precision on GPU (bfloat16 autocast, or float16 with a GradScaler where bf16 is missing); a
progress bar with the loss and tokens/s (tqdm on a terminal, a few plain lines in a log); checkpoints (``transformer.checkpoint``) every
``save_every`` steps and at the end, resumable bit-exactly: the batch of step t is drawn from a
generator seeded by (seed, t, rank), and the checkpoint holds torch's RNG state for dropout.

Several processes: launch with ``torchrun --nproc_per_node=N -m fusedlayers train ...``; the
loop sees WORLD_SIZE > 1, joins the process group (gloo on CPU, NCCL on GPU) and wraps the
model in DistributedDataParallel. Each rank draws its own batches; rank 0 writes checkpoints
and the summary; at the end the ranks check that their weights are bit-identical.

``fsdp=True`` shards parameters, gradients and optimizer state with FSDP2
(``torch.distributed.fsdp.fully_shard``, each encoder/decoder layer and then the whole) instead
of replicating them; checkpoints are gathered into the same single safetensors file as
without it (so a run resumes with or without FSDP), and the returned model is a full copy.

``context_parallel=C`` (mlm task) splits each sequence over C ranks: consecutive ranks form a
context-parallel group that draws one batch, each rank embeds its contiguous shard of the
tokens, and self-attention runs over the whole sequence with
``fusedlayers.distributed.context_parallel_attention``. WORLD_SIZE / C groups train data-parallel
(DDP or FSDP over all ranks); each rank's loss is its share of its group's token-mean loss,
times C, so that the gradient average over the world is the data-parallel mean of the groups'
full gradients.

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
    fsdp: bool = False  # several processes: FSDP2 (fully_shard) instead of DistributedDataParallel
    context_parallel: int = 1  # ranks per sequence (mlm task); WORLD_SIZE must be a multiple
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
    """model + task loss in one forward, the module DistributedDataParallel (or FSDP) wraps.
    Returns (loss to differentiate, loss of the whole batch to report, tokens)."""

    def __init__(self, model: nn.Module, task, label_smoothing: float, cp_group=None, cp_size: int = 1):
        super().__init__()
        self.model, self.task, self.label_smoothing = model, task, label_smoothing
        self.cp_group, self.cp_size = cp_group, cp_size

    def forward(self, batch: dict):
        if self.cp_size == 1:
            loss, n_tokens = self.task.loss(self.model, batch, self.label_smoothing)
            return loss, loss.detach(), n_tokens
        return self._context_parallel_loss(batch)

    def _context_parallel_loss(self, batch: dict):
        """The mlm loss on this rank's contiguous shard of the sequence: the sum of its tokens'
        losses over the whole batch's count of labelled tokens (so the group's shares add up to
        the mean); the padding added to reach a multiple of cp_size is masked and unlabelled."""
        import torch.distributed as dist

        from fusedlayers.distributed import shard

        ids, labels = batch["ids"], batch["labels"]  # (B, N), the same on every rank of the group
        extra = -ids.shape[1] % self.cp_size
        ids, labels = F.pad(ids, (0, extra), value=PAD), F.pad(labels, (0, extra), value=-100)
        n_local = ids.shape[1] // self.cp_size
        ids_local = shard(ids, 1, self.cp_group, layout="contiguous")  # (B, N / C)
        labels_local = shard(labels, 1, self.cp_group, layout="contiguous")
        offset = dist.get_rank(self.cp_group) * n_local
        logits = self.model.mlm_logits(ids_local, offset=offset)  # (B, N / C, V)
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels_local.flatten(), ignore_index=-100,
                                label_smoothing=self.label_smoothing, reduction="sum")
        share = total / max(int((labels != -100).sum()), 1)
        whole = share.detach().clone()
        dist.all_reduce(whole, group=self.cp_group)  # the group's loss: the mean over the whole sequence
        return share * self.cp_size, whole, int((ids != PAD).sum())


# ------------------------------------------------------------------------------ the loop


def _context_parallel_groups(rank: int, world: int, size: int):
    """(this rank's context-parallel group, its data-parallel index): groups of ``size``
    consecutive ranks. Every rank creates every group (torch.distributed's rule)."""
    import torch.distributed as dist

    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine, rank // size


def _set_context_parallel(model: nn.Module, group) -> None:
    """Routes every self-attention of ``model`` through the ring (group None: back to the local op)."""
    from .model import MultiHeadAttention

    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.context_parallel = None if group is None else {"group": group, "layout": "contiguous"}


def _fully_shard(objective: nn.Module, model: nn.Module) -> None:
    """FSDP2: each layer of the model's stacks is one unit, the rest (embeddings, heads) the root's."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    fully_shard(objective)


def _full_state(objective: nn.Module, optimizer) -> tuple[dict, dict]:
    """The gathered (model state, optimizer state) of an FSDP run, in the layout of
    ``model.state_dict()`` and ``optimizer.state_dict()`` without FSDP (parameters numbered in
    the optimizer's order). A collective: every rank calls it, every rank gets the full state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    model_sd = get_model_state_dict(objective, options=options)
    optim_sd = get_optimizer_state_dict(objective, optimizer, options=options)
    order = [name for group in optim_sd["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, at = [], 0
    for group in optim_sd["param_groups"]:
        groups.append({**group, "params": list(range(at, at + len(group["params"])))})
        at += len(group["params"])
    state = {index[name]: value for name, value in optim_sd["state"].items()}
    model_sd = {k[len("model."):]: v for k, v in model_sd.items() if k.startswith("model.")}
    return model_sd, {"state": state, "param_groups": groups}


def _load_full_state(objective: nn.Module, optimizer, model: nn.Module, path: str, scaler) -> dict:
    """Resumes an FSDP run from a gathered checkpoint: every rank reads the file and keeps its
    shards of the model and the optimizer state. Returns the checkpoint's ``meta``."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    tensors, metadata = checkpoint.read(path)
    options = StateDictOptions(full_state_dict=True)
    model_sd = {f"model.{k[len('model.'):]}": v for k, v in tensors.items() if k.startswith("model.")}
    set_model_state_dict(objective, model_sd, options=options)
    names = [f"model.{n}" for n, _ in _named_unique_parameters(model)]
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(names[int(i)], {})[name] = value
    groups, at = [], 0
    for group in metadata["param_groups"]:
        groups.append({**group, "params": names[at:at + len(group["params"])]})
        at += len(group["params"])
    # strict=False: a parameter that never got a gradient (an unused head) has no optimizer state, as without FSDP
    set_optimizer_state_dict(objective, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    if scaler is not None and metadata.get("scaler"):
        scaler.load_state_dict(metadata["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    return metadata["meta"]


def _named_unique_parameters(model: nn.Module) -> list:
    """(name, parameter) in the optimizer's order: _param_groups' decay group, then no-decay."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append((name, p))
    return decay + no_decay


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
    named = _named_unique_parameters(model)
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
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
    for name, low in (("steps", 0), ("batch_size", 1), ("save_every", 0), ("warmup", 0)):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):  # before the work, not at the save
        raise ValueError(f"TrainConfig.out {cfg.out!r} is an existing file, not a folder")
    cp = cfg.context_parallel
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        raise ValueError(f"TrainConfig.context_parallel must be an int >= 1, got {cp!r}")
    if cp > 1 and task.name != "mlm":
        raise ValueError(f"TrainConfig.context_parallel > 1 is implemented for the mlm task (a bidirectional "
                         f"encoder over one sequence), not {task.name!r}")
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env % cp:
        raise ValueError(f"TrainConfig.context_parallel ({cp}) must divide the number of processes "
                         f"(WORLD_SIZE = {world_env}); launch with torchrun --nproc_per_node=<a multiple of {cp}>")
    rank, world, device = _distributed(cfg.device)
    fsdp = cfg.fsdp and world > 1
    cp_group, dp_rank = _context_parallel_groups(rank, world, cp) if cp > 1 else (None, rank)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = task.make_model(model_cfg)
    model.to(device)
    if cfg.init_from:
        checkpoint.load_model(cfg.init_from, model, strict=False)
    if cp > 1:
        _set_context_parallel(model, cp_group)
    objective = _Objective(model, task, cfg.label_smoothing, cp_group, cp)
    if fsdp:
        _fully_shard(objective, model)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    autocast, scaler = _amp(device, cfg.amp)
    path = os.path.join(cfg.out, CHECKPOINT) if cfg.out else None
    start, history = 0, []
    if cfg.resume and path and os.path.exists(path):
        if fsdp:
            meta = _load_full_state(objective, optimizer, model, path, scaler)
        else:
            meta = checkpoint.load(path, model, optimizer, scaler)
        start, history = meta["step"], meta["history"]
    if start == 0:
        torch.manual_seed(cfg.seed + 1 + rank)  # the dropout stream; a resumed run restored it above

    if world > 1 and not fsdp:
        objective = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)

    def save(step):
        state = _full_state(objective, optimizer) if fsdp else (model, optimizer)  # FSDP: every rank gathers
        if rank == 0:
            checkpoint.save(path, *state, meta(step), scaler)

    def meta(step):
        return {"step": step, "task": task.name, "model_config": model.cfg.to_dict(), "train_config": asdict(cfg),
                "history": history, "init_from": cfg.init_from}

    bar = None
    if not cfg.quiet and rank == 0:
        from ..cli import progress_bar  # a bar on a terminal, a few plain lines in a log

        bar = progress_bar(total=cfg.steps, initial=start, desc=f"{task.name}", file=sys.stderr)
    tokens, timed = 0, 0.0
    model.train()

    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step + 1, cfg)
        batch = _to(task.batch(step_generator(cfg.seed, step, dp_rank), cfg.batch_size), device)
        with autocast():
            loss, whole, n_tokens = objective(batch)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        history.append(whole.item())  # .item() synchronises, so the time below is real
        dt = time.perf_counter() - t0
        if step > start:  # the first step warms up allocators and caches
            tokens, timed = tokens + n_tokens * (world // cp), timed + dt
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{tokens / timed:,.0f}" if timed else "-")
        if path and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    if bar is not None:
        bar.close()
    if path and cfg.steps > start:
        save(cfg.steps)
    if fsdp or cp > 1:  # from here on a plain full model: evaluation and the caller see one module
        model = _plain_copy(task, model, objective, optimizer) if fsdp else model
        _set_context_parallel(model, None)

    result = {"task": task.name, "step": cfg.steps, "history": history, "tokens_per_s": tokens / timed if timed else None,
              "seconds": timed, "world_size": world, "device": str(device), "backend": model.cfg.backend,
              "fsdp": fsdp, "context_parallel": cp, "metrics": {}}
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


def _plain_copy(task, model: nn.Module, objective: nn.Module, optimizer) -> nn.Module:
    """A full, unsharded copy of an FSDP-trained model on every rank (a collective)."""
    state, _ = _full_state(objective, optimizer)
    plain = task.make_model(model.cfg).to(next(iter(state.values())).device)
    plain.load_state_dict(state)
    return plain


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
