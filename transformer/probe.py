"""Probing what each layer learned (Tenney, Das and Pavlick 2019, "BERT rediscovers the
classical NLP pipeline"), on the synthetic language's gold annotations.

The encoder is frozen. For each layer l (0 = embeddings) and each task, a linear classifier
(softmax regression) is trained on the token vectors h_l to predict the token's label; its
held-out accuracy says how linearly available that information is at layer l. Tasks:

    pos        part of speech (DET ADJ NOUN VERB ADP REL): mostly the word itself
    depth      depth of the word in the phrase-structure tree: needs the context
    agreement  number (sg/pl) of the main-clause subject, predicted at every word: the
               feature the main verb must agree with, carried across the sentence

Scalar mix: one probe per task reads sum_l softmax(s)_l h_l with the weights s learned
jointly; Tenney's *expected layer* is E[l] = sum_l l * softmax(s)_l, where in the stack the
task's information is drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import CLS, NUMBERS, POS_TAGS, SEP, Sentence, WordVocab, pad_batch

TASKS = ("pos", "depth", "agreement")
MAX_DEPTH = 4  # deeper words share the last class


def labels(s: Sentence, task: str) -> list[int]:
    """Gold label of every word of ``s`` for ``task``."""
    if task == "pos":
        return [POS_TAGS.index(p) for p in s.pos]
    if task == "depth":
        return [min(d, MAX_DEPTH) - 1 for d in s.depths]
    if task == "agreement":
        return [NUMBERS.index(s.subject_number)] * len(s.tokens)
    raise ValueError(f"unknown probing task {task!r}; choose from {TASKS}")


def n_classes(task: str) -> int:
    return {"pos": len(POS_TAGS), "depth": MAX_DEPTH, "agreement": len(NUMBERS)}[task]


@torch.no_grad()
def layer_features(model, sentences: list[Sentence], vocab: WordVocab, device="cpu",
                   batch_size: int = 250) -> Tensor:
    """Frozen word vectors of every layer: (L + 1, T, d) for the T words of ``sentences``
    (the [CLS]/[SEP]/padding positions dropped)."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i:i + batch_size]
        ids = pad_batch([[CLS] + vocab.encode(s.words) + [SEP] for s in chunk]).to(device)  # (B, N)
        layers = torch.stack(model.layers(ids)).float().cpu()  # (L + 1, B, N, d)
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        for j, s in enumerate(chunk):
            keep[j, 1:1 + len(s.tokens)] = True
        out.append(layers[:, keep])  # (L + 1, T_chunk, d)
    return torch.cat(out, dim=1)


def _fit(x: Tensor, y: Tensor, classes: int, mix: bool, steps: int, lr: float = 0.05, seed: int = 0):
    """Softmax regression (optionally on a scalar mix of the layers x: (L + 1, T, d)); returns
    a predict function and the mix weights."""
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[-1]
    w = (torch.randn(d, classes, generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    s = torch.zeros(x.shape[0], requires_grad=True)  # scalar-mix logits
    gamma = torch.ones((), requires_grad=True)
    params = [w, b] + ([s, gamma] if mix else [])
    opt = torch.optim.Adam(params, lr=lr)

    def features(x):
        return gamma * torch.einsum("l,ltd->td", s.softmax(0), x) if mix else x

    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(features(x) @ w + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        opt.step()
    return (lambda x: (features(x) @ w + b).argmax(-1)), s.detach().softmax(0)


@dataclass
class ProbeResult:
    accuracy: dict  # task -> [accuracy of layer 0 .. L]
    majority: dict  # task -> accuracy of always answering the most frequent label
    mix_accuracy: dict  # task -> accuracy of the scalar-mix probe
    mix_weights: dict  # task -> [softmax(s)_l]
    expected_layer: dict  # task -> E[l]


def probe(model, train: list[Sentence], test: list[Sentence], vocab: WordVocab, tasks=TASKS, device="cpu",
          steps: int = 200) -> ProbeResult:
    """Trains and scores a linear probe per layer and per task, and a scalar-mix probe per task."""
    xtr, xte = layer_features(model, train, vocab, device), layer_features(model, test, vocab, device)
    mean, std = xtr.mean(1, keepdim=True), xtr.std(1, keepdim=True) + 1e-5  # standardise per layer
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    acc, majority, mix_acc, mix_w, expected = {}, {}, {}, {}, {}
    for task in tasks:
        ytr = torch.tensor([l for s in train for l in labels(s, task)])
        yte = torch.tensor([l for s in test for l in labels(s, task)])
        c = n_classes(task)
        majority[task] = float((yte == torch.bincount(ytr, minlength=c).argmax()).float().mean())
        acc[task] = []
        for layer in range(xtr.shape[0]):
            predict, _ = _fit(xtr[layer], ytr, c, mix=False, steps=steps)
            acc[task].append(float((predict(xte[layer]) == yte).float().mean()))
        predict, weights = _fit(xtr, ytr, c, mix=True, steps=steps)
        mix_acc[task] = float((predict(xte) == yte).float().mean())
        mix_w[task] = weights.tolist()
        expected[task] = float((weights * torch.arange(len(weights))).sum())
    return ProbeResult(acc, majority, mix_acc, mix_w, expected)


def plot(result: ProbeResult, path: str, title: str = "") -> None:
    """Accuracy by layer per task (left) and the scalar-mix weights with the expected layer (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for task, accs in result.accuracy.items():
        line, = a.plot(range(len(accs)), accs, marker="o", label=task)
        a.axhline(result.majority[task], color=line.get_color(), ls=":", lw=1)
    a.set_xlabel("layer (0 = embeddings)")
    a.set_ylabel("held-out probe accuracy")
    a.set_title("linear probe per layer (dotted: majority class)")
    a.set_xticks(range(len(next(iter(result.accuracy.values())))))
    a.legend()
    tasks = list(result.mix_weights)
    n = len(result.mix_weights[tasks[0]])
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        b.bar([l + i * width for l in range(n)], result.mix_weights[task], width,
              label=f"{task}: E[layer] = {result.expected_layer[task]:.2f}")
    b.set_xticks([l + 0.4 - width / 2 for l in range(n)], [str(l) for l in range(n)])
    b.set_xlabel("layer")
    b.set_ylabel("scalar-mix weight softmax(s)")
    b.set_title("Tenney's scalar mix and expected layer")
    b.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
