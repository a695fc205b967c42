"""The lessons: ``fusedlayers lesson <name>``, one chapter of the story each, run on our kernels.

Each lesson trains what it needs (a tiny model, d_model 64, on the synthetic language; trained
models are kept under ``<out>/models/`` and reused by later lessons with the same settings),
prints a short explanation with the numbers it measured, writes ``<out>/<name>.png`` and
returns its numbers as a dict. The lesson called ``<name>`` is the function ``lesson_<name>``
(``-`` as ``_``), listed in :data:`LESSONS`.

    attention          self- and cross-attention maps of a trained translator
    parallel           a Transformer layer vs a recurrent layer over growing lengths
    order              position encodings, and the reordering task with and without them
    residual           training curves with and without residual connections
    generate           a translation decoded step by step, with the candidates; beam search
    mlm                fill in the blanks: top-k predictions for masked words
    pretrain-finetune  fine-tuning a pre-trained vs a randomly initialised encoder
    probe              what each layer knows: linear probes and the scalar mix
"""

from __future__ import annotations

import json
import os
import statistics
import textwrap
import time
from typing import Callable, Optional

import torch

from . import checkpoint, probe
from .data import CLS, EOS, MASK, SEP, split_corpus
from .generate import beam_search, greedy
from .model import EncoderDecoder, ModelConfig
from .train import ClassifyTask, MLMTask, TrainConfig, TranslateTask, train

# Default training steps of each model a lesson trains (CPU, one or two threads: seconds each).
STEPS = {"translate": 600, "mlm": 1500, "classify": 300}
TRAIN = {"translate": dict(batch_size=64, lr=3e-3, warmup=100), "mlm": dict(batch_size=64, lr=2e-3, warmup=100),
         "classify": dict(batch_size=32, lr=1e-3, warmup=30, label_smoothing=0.0)}


class Lesson:
    """What every lesson gets: where to write, how long to train, which backend and device."""

    def __init__(self, out: str = "lessons", steps: Optional[int] = None, backend: str = "auto",
                 device: str = "cpu", quiet: bool = False, quick: bool = False):
        self.out, self.steps, self.backend, self.device = out, steps, backend, device
        self.quiet, self.quick = quiet, quick
        os.makedirs(out, exist_ok=True)

    def say(self, text: str) -> None:
        """Prints a lesson's text (written indented by 4 in the source)."""
        lines = [line[4:] if line.startswith("    ") else line for line in text.strip("\n").splitlines()]
        print("\n".join(lines) + "\n", flush=True)

    def figure(self, name: str) -> str:
        return os.path.join(self.out, f"{name}.png")

    def trained(self, task, tag: str, init_from: Optional[str] = None, **model_overrides) -> dict:
        """Trains ``task`` (or reuses ``<out>/models/<tag>`` trained with the same settings)."""
        steps = self.steps or STEPS[task.name]
        mcfg = ModelConfig(backend=self.backend, **model_overrides)
        tcfg = TrainConfig(steps=steps, device=self.device, out=os.path.join(self.out, "models", tag),
                           quiet=self.quiet, init_from=init_from, **TRAIN[task.name])
        summary = os.path.join(tcfg.out, "summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                done = json.load(f)
            ckpt = os.path.join(tcfg.out, "checkpoint.safetensors")
            meta = checkpoint.read(ckpt)[1]["meta"] if os.path.exists(ckpt) else {}
            if meta.get("model_config") == mcfg.to_dict() and meta.get("train_config") == _jsonable(tcfg):
                torch.manual_seed(0)
                model = task.make_model(mcfg)
                checkpoint.load_model(ckpt, model)
                done["model"] = model.to(self.device)
                return done
        return train(task, mcfg, tcfg)


def _rows(items) -> str:
    """Lines to put in a lesson's text on a line of their own, indented by 2."""
    return "\n    ".join("  " + item for item in items)


def _jsonable(cfg) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg)))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------ attention


def lesson_attention(L: Lesson) -> dict:
    task = TranslateTask()
    r = L.trained(task, "translate")
    model: EncoderDecoder = r["model"].eval()
    sentence = next((s for s in task.test_set if len(s.tokens) >= 8 and "REL" not in s.pos and "ADP" in s.pos),
                    task.test_set[0])
    b = task.encode([sentence])
    modules = [m for m in model.modules() if hasattr(m, "record")]
    for m in modules:
        m.record = True
    with torch.no_grad():
        model(b["src"].to(L.device), b["tgt_in"].to(L.device))
    for m in modules:
        m.record = False
    enc = model.encoder.layers[-1].self_attn.weights[0].mean(0).cpu()  # (Ns, Ns), heads averaged
    # cross-attention of the layer whose argmax best follows the gold alignment
    hits = []
    for layer in model.decoder.layers:
        w = layer.cross_attn.weights[0].cpu()  # (H, Nt, Ns): row j = input position j predicts word j
        per_head = [float((w[h, :len(sentence.target)].argmax(-1) == torch.tensor(sentence.alignment))
                          .float().mean()) for h in range(w.shape[0])]
        hits.append((max(per_head), per_head.index(max(per_head)), w))
    best = max(range(len(hits)), key=lambda i: hits[i][0])
    hit, head, w = hits[best]
    cross = w[head, :len(sentence.target)]
    # over the test set: how often does that head point at the aligned source word?
    tot = right = 0
    for i in range(0, len(task.test_set), 100):
        chunk = task.test_set[i:i + 100]
        bb = task.encode(chunk)
        model.decoder.layers[best].cross_attn.record = True
        with torch.no_grad():
            model(bb["src"].to(L.device), bb["tgt_in"].to(L.device))
        ww = model.decoder.layers[best].cross_attn.weights[:, head].cpu()  # (B, Nt, Ns)
        model.decoder.layers[best].cross_attn.record = False
        for j, s in enumerate(chunk):
            pred = ww[j, :len(s.target)].argmax(-1)
            right += int((pred == torch.tensor(s.alignment)).sum())
            tot += len(s.target)
    plt = _plt()
    fig, (a, c) = plt.subplots(1, 2, figsize=(12, 5))
    src_words, tgt_words = sentence.words, sentence.target
    a.imshow(enc.numpy(), cmap="viridis")
    a.set_xticks(range(len(src_words)), src_words, rotation=60)
    a.set_yticks(range(len(src_words)), src_words)
    a.set_title(f"encoder self-attention, layer {len(model.encoder.layers)} (heads averaged)")
    c.imshow(cross.numpy(), cmap="viridis")
    c.set_xticks(range(len(src_words)), src_words, rotation=60)
    c.set_yticks(range(len(tgt_words)), ["<bos>"] + tgt_words[:-1])
    c.set_ylabel("decoder input (predicts the next target word)")
    c.set_title(f"cross-attention, decoder layer {best + 1}, head {head + 1}")
    fig.tight_layout()
    fig.savefig(L.figure("attention"), dpi=110)
    plt.close(fig)
    res = {"exact_match": r["metrics"].get("exact_match"), "alignment_hit_rate": right / tot,
           "sentence": str(sentence), "translation": " ".join(sentence.target)}
    L.say(f"""
    Attention: every word looks at every other word and takes a weighted average of their values.
    A tiny translator ({len(model.encoder.layers)}+{len(model.decoder.layers)} layers, d_model 64), trained {r['step']} steps,
    translates held-out sentences exactly {res['exact_match']:.0%} of the time. The target language orders
    words differently (subject-object-verb, noun before adjectives, determiner last), so
    the decoder must look far back into the source: its cross-attention is the learned word alignment.
      source: {sentence}
      target: {' '.join(sentence.target)}
    Decoder layer {best + 1}, head {head + 1}, points its strongest attention at the aligned source word for
    {right / tot:.0%} of the target words of the test set (chance is about {1 / 8:.0%}).
    Figure: {L.figure('attention')}
    """)
    return res


# ------------------------------------------------------------------------------ parallel


def lesson_parallel(L: Lesson) -> dict:
    from torch import nn

    from .model import EncoderLayer

    d, batch = 128, 8
    cfg = ModelConfig(d_model=d, n_heads=4, d_ff=4 * d, backend=L.backend)
    layer, rnn = EncoderLayer(cfg).eval().to(L.device), nn.GRU(d, d, batch_first=True).eval().to(L.device)
    lengths = [16, 32, 64] if L.quick else [16, 32, 64, 128, 256, 512]
    rows = []

    def timed(fn, repeat: int) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            if L.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.no_grad():
        for n in lengths:
            x = torch.randn(batch, n, d, device=L.device)
            t_tr = timed(lambda: layer(x, x, None), 3 if L.quick else 7)
            t_rnn = timed(lambda: rnn(x), 3 if L.quick else 7)
            rows.append({"length": n, "transformer_us_per_token": 1e6 * t_tr / (batch * n),
                         "rnn_us_per_token": 1e6 * t_rnn / (batch * n), "transformer_sequential_steps": 1,
                         "rnn_sequential_steps": n})
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(lengths, [r["transformer_us_per_token"] for r in rows], "o-", label="Transformer encoder layer")
    a.plot(lengths, [r["rnn_us_per_token"] for r in rows], "s-", label="GRU layer")
    a.set_xscale("log", base=2)
    a.set_xlabel("sequence length N")
    a.set_ylabel("forward time per token (µs)")
    a.set_title(f"measured on {L.device}, batch {batch}, d {d}")
    a.legend()
    b.plot(lengths, [1] * len(lengths), "o-", label="Transformer: 1 (all positions at once)")
    b.plot(lengths, lengths, "s-", label="RNN: N (one position after another)")
    b.set_xscale("log", base=2)
    b.set_yscale("log", base=2)
    b.set_xlabel("sequence length N")
    b.set_ylabel("sequential steps per layer")
    b.legend()
    fig.tight_layout()
    fig.savefig(L.figure("parallel"), dpi=110)
    plt.close(fig)
    table = _rows(f"N={r['length']:4d}   Transformer {r['transformer_us_per_token']:7.2f} µs/token   "
                      f"GRU {r['rnn_us_per_token']:7.2f} µs/token" for r in rows)
    L.say(f"""
    Parallel: a recurrent layer must read position t before position t+1: N sequential steps per layer.
    A Transformer layer computes all N positions at once (matrix products and one attention call), one
    step whatever N is, at the price of N^2 attention scores. Measured here (forward, batch {batch}, d {d},
    {torch.get_num_threads()} CPU threads on {L.device}):
    {table}
    On a GPU the parallel layer keeps thousands of cores busy while the recurrence waits on itself;
    on a small CPU both are bound by arithmetic, and the Transformer's cost per token grows with N.
    Figure: {L.figure('parallel')}
    """)
    return {"rows": rows}


# ------------------------------------------------------------------------------ order


def lesson_order(L: Lesson) -> dict:
    from .model import sinusoids

    task = TranslateTask()
    results = {}
    for kind in ("sinusoidal", "learned", "none"):
        results[kind] = L.trained(task, "translate" if kind == "sinusoidal" else f"translate-{kind}",
                                  positions=kind)
    table = sinusoids(48, 64)
    plt = _plt()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    a.imshow(table.T.numpy(), aspect="auto", cmap="RdBu")
    a.set_xlabel("position")
    a.set_ylabel("dimension")
    a.set_title("sinusoidal position encodings PE(pos, i)")
    unit = table / table.norm(dim=1, keepdim=True)
    b.imshow((unit @ unit.T).numpy(), cmap="viridis")
    b.set_title("cosine similarity between positions")
    b.set_xlabel("position")
    b.set_ylabel("position")
    names = list(results)
    c.bar(names, [results[k]["metrics"]["exact_match"] for k in names], color=["C0", "C1", "C3"])
    c.set_ylim(0, 1)
    c.set_ylabel("exact-match translation accuracy")
    c.set_title("reordering translation, held-out")
    fig.tight_layout()
    fig.savefig(L.figure("order"), dpi=110)
    plt.close(fig)
    em = {k: v["metrics"]["exact_match"] for k, v in results.items()}
    L.say(f"""
    Order: attention is a weighted average, blind to order: without position information "the dog
    chases the cat" and "the cat chases the dog" are the same bag of words to the encoder. The paper adds
    sinusoids of geometrically spaced frequencies to the embeddings (left: each position a unique
    pattern; middle: nearby positions look alike). Trained the same way ({results['none']['step']} steps), the
    translator of the reordering task reaches exact-match accuracy
      sinusoidal positions {em['sinusoidal']:.0%}   learned positions {em['learned']:.0%}   none {em['none']:.0%}
    Figure: {L.figure('order')}
    """)
    return {"exact_match": em}


# ------------------------------------------------------------------------------ residual


def lesson_residual(L: Lesson) -> dict:
    task = TranslateTask()
    layers = 2 if L.quick else 6
    runs = {flag: L.trained(task, f"translate-{layers}l-{'res' if flag else 'nores'}", n_layers=layers, residual=flag)
            for flag in (True, False)}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))

    def smooth(h, k=20):
        return [sum(h[max(0, i - k):i + 1]) / len(h[max(0, i - k):i + 1]) for i in range(len(h))]

    for flag, r in runs.items():
        ax.plot(smooth(r["history"]), label=f"{'with' if flag else 'without'} residual connections "
                                            f"(exact match {r['metrics']['exact_match']:.0%})")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"{layers}+{layers}-layer translator, post-norm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(L.figure("residual"), dpi=110)
    plt.close(fig)
    res = {flag: {"final_loss": sum(r["history"][-20:]) / len(r["history"][-20:]),
                  "exact_match": r["metrics"]["exact_match"]} for flag, r in runs.items()}
    L.say(f"""
    Residual connections: each sublayer adds its output to its input, x + Sublayer(x), so the identity
    is the default and the gradient reaches the lowest layers along the "+" without passing through every
    sublayer. The same {layers}+{layers}-layer translator trained {runs[True]['step']} steps:
      with residuals:    final loss {res[True]['final_loss']:.3f}, exact match {res[True]['exact_match']:.0%}
      without residuals: final loss {res[False]['final_loss']:.3f}, exact match {res[False]['exact_match']:.0%}
    (Here the residual add and the layer norm are one fused op, fusedlayers.add_layer_norm; "without" passes
    residual=None to it.)
    Figure: {L.figure('residual')}
    """)
    return {"with": res[True], "without": res[False]}


# ------------------------------------------------------------------------------ generate


def lesson_generate(L: Lesson) -> dict:
    task = TranslateTask()
    r = L.trained(task, "translate")
    model: EncoderDecoder = r["model"].eval()
    sentence = next((s for s in task.test_set if len(s.tokens) >= 7), task.test_set[0])
    src = task.encode([sentence])["src"].to(L.device)
    ids, steps = greedy(model, src, max_len=len(sentence.target) + 3, top_k=3)
    ids_nc, _ = greedy(model, src, max_len=len(sentence.target) + 3, use_cache=False)
    beams = beam_search(model, src, beam=4, max_len=len(sentence.target) + 3)
    words = task.tgt_vocab.decode([i for i in ids[0].tolist() if i != EOS])
    # speed of the KV cache on a batch of test sentences
    b = task.encode(task.test_set[:100])["src"].to(L.device)
    times = {}
    for cache in (True, False):
        t = time.perf_counter()
        greedy(model, b, max_len=b.shape[1] + 4, use_cache=cache)
        times[cache] = time.perf_counter() - t
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(steps) + 1.2))
    ax.axis("off")
    cells = [[f"{task.tgt_vocab.itos[i]}  {p:.2f}" for i, p in step] for step in steps]
    colours = [[plt.cm.Greens(0.15 + 0.7 * p) for _, p in step] for step in steps]
    tab = ax.table(cellText=cells, cellColours=colours, rowLabels=[f"step {t + 1}" for t in range(len(steps))],
                   colLabels=["1st candidate", "2nd", "3rd"], loc="center")
    tab.scale(1, 1.3)
    ax.set_title(f"greedy decoding of \"{sentence}\"")
    fig.tight_layout()
    fig.savefig(L.figure("generate"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    lines = _rows(f"step {t + 1}: " + "   ".join(f"{task.tgt_vocab.itos[i]} {p:.2f}" for i, p in step)
                      for t, step in enumerate(steps))
    beam_lines = _rows(f"{' '.join(task.tgt_vocab.decode(bm.ids))}  (log p {bm.logp:.3f})" for bm in beams[:3])
    res = {"greedy": " ".join(words), "reference": " ".join(sentence.target), "cache_matches": torch.equal(ids, ids_nc),
           "beam": " ".join(task.tgt_vocab.decode(beams[0].ids)), "seconds_with_cache": times[True],
           "seconds_without_cache": times[False]}
    L.say(f"""
    Generation: the decoder writes the translation one word at a time, each step reading the source
    (cross-attention) and the words written so far (masked self-attention), and turning its last vector
    into a probability for every word of the target vocabulary.
      source:    {sentence}
      reference: {res['reference']}
    Greedy decoding takes the most probable word at each step (top 3 candidates shown):
    {lines}
      -> {res['greedy']}
    Beam search keeps the 4 best partial translations at each step; its best finished ones:
    {beam_lines}
    The KV cache keeps each layer's keys and values so that a step feeds only the newest word (the attention
    op with causal_align="bottom_right" and one query row). Same output with and without it:
    {res['cache_matches']}. 100 sentences decoded in {times[True]:.2f} s with the cache, {times[False]:.2f} s recomputing
    the prefix at every step.
    Figure: {L.figure('generate')}
    """)
    return res


# ------------------------------------------------------------------------------ mlm


def lesson_mlm(L: Lesson) -> dict:
    task = MLMTask()
    r = L.trained(task, "mlm")
    model = r["model"].eval()
    _, test = split_corpus(0, 200, seed=0)
    # four blanks: a main verb after an attractor (agreement), a determiner, a noun, a relative pronoun
    picks = []
    s = next((s for s in test if "ADP" in s.pos[:s.main_verb]), test[0])  # "the dog near the cats ___"
    picks.append((s, s.main_verb))
    for pos in ("DET", "NOUN", "REL"):
        s = next(s for s in test[10:] if pos in s.pos)
        picks.append((s, s.pos.index(pos)))
    examples = []
    with torch.no_grad():
        for s, j in picks:
            ids = [CLS] + task.vocab.encode(s.words) + [SEP]
            ids[j + 1] = MASK
            probs = model.mlm_logits(torch.tensor([ids], device=L.device))[0, j + 1].float().softmax(-1)
            p, i = probs.topk(5)
            shown = " ".join("___" if k == j else w for k, w in enumerate(s.words))
            examples.append({"sentence": shown, "answer": s.words[j],
                             "top5": [(task.vocab.itos[a], float(b)) for a, b in zip(i.tolist(), p.tolist())]})
    agree = _agreement_with_attractors(model, task.vocab, split_corpus(0, 400 if L.quick else 2000, seed=5)[1],
                                       L.device)
    agree_note = ("Agreement across an attractor is the hard case (Linzen et al. 2016): this tiny model has not "
                  "learned it yet; train longer (--steps) and measure again." if agree["accuracy"] < 0.75 else
                  "The model looks past the nearer noun to the subject.")
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 6))
    for ax, ex in zip(axes.flat, examples):
        words, ps = zip(*ex["top5"][::-1])
        ax.barh(words, ps, color=["C2" if w == ex["answer"] else "C0" for w in words])
        ax.set_xlim(0, 1)
        ax.set_title(textwrap.fill(ex["sentence"], 50), fontsize=9)
    fig.suptitle(f"masked-word predictions (green: the hidden word); masked-token accuracy "
                 f"{r['metrics']['masked_accuracy']:.0%}")
    fig.tight_layout()
    fig.savefig(L.figure("mlm"), dpi=110)
    plt.close(fig)
    lines = _rows(f"{ex['sentence']}\n        -> " + ", ".join(f"{w} {p:.2f}" for w, p in ex["top5"])
                      + f"   (hidden: {ex['answer']})" for ex in examples)
    L.say(f"""
    Masked-word prediction (BERT's pre-training): hide 15% of the words and train the encoder to guess them
    from both sides. No labels needed: the text is its own supervision. A {r['model'].cfg.n_layers}-layer encoder trained
    {r['step']} steps on the synthetic language guesses {r['metrics']['masked_accuracy']:.0%} of held-out masked words
    (many blanks have several right answers: any noun fits "the ___ runs").
    Its top 5 guesses:
    {lines}
    The first blank is a main verb after an attractor, a noun of the other number between it and its subject
    ("the dog near the cats ___"). Over the {agree['n']} held-out sentences with one, the singular and plural
    verbs' total probability favours the subject's number in {agree['accuracy']:.0%} of them (50% is chance;
    always following the nearest noun gives 0%). {agree_note}
    Figure: {L.figure('mlm')}
    """)
    return {"masked_accuracy": r["metrics"]["masked_accuracy"], "examples": examples,
            "agreement_with_attractor": agree["accuracy"]}


@torch.no_grad()
def _agreement_with_attractors(model, vocab, sentences, device) -> dict:
    """Masks the main verb of sentences whose last noun before it has the other number than
    the subject; how often is the probability of singular vs plural verbs on the subject's side?"""
    from .data import INTRANSITIVE, TRANSITIVE

    sg = [vocab.stoi[f[0]] for t in (TRANSITIVE, INTRANSITIVE) for f in t.values()]
    pl = [vocab.stoi[f[1]] for t in (TRANSITIVE, INTRANSITIVE) for f in t.values()]
    right = n = 0
    for s in sentences:
        nouns = [t for t in s.tokens[:s.main_verb] if t.pos == "NOUN"]
        attractor_number = "sg" if nouns[-1].word in {f[0] for f in _nouns()} else "pl"
        if len(nouns) < 2 or attractor_number == s.subject_number:
            continue
        ids = [CLS] + vocab.encode(s.words) + [SEP]
        ids[s.main_verb + 1] = MASK
        p = model.mlm_logits(torch.tensor([ids], device=device))[0, s.main_verb + 1].float().softmax(-1)
        says_pl = float(p[pl].sum()) > float(p[sg].sum())
        right += says_pl == (s.subject_number == "pl")
        n += 1
    return {"n": n, "accuracy": right / max(n, 1)}


def _nouns():
    from .data import NOUNS

    return NOUNS.values()


# ------------------------------------------------------------------------------ pretrain-finetune


def lesson_pretrain_finetune(L: Lesson) -> dict:
    pre = L.trained(MLMTask(), "mlm")
    ckpt = os.path.join(L.out, "models", "mlm", "checkpoint.safetensors")
    task = ClassifyTask()
    runs = {"pre-trained": L.trained(task, "classify-pretrained", init_from=ckpt),
            "random init": L.trained(task, "classify-scratch")}
    acc = {k: r["metrics"]["accuracy"] for k, r in runs.items()}
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in runs.items():
        h = r["history"]
        a.plot([sum(h[max(0, i - 10):i + 1]) / len(h[max(0, i - 10):i + 1]) for i in range(len(h))], label=k)
    a.set_xlabel("fine-tuning step")
    a.set_ylabel("training loss (smoothed)")
    a.legend()
    b.bar(list(acc), list(acc.values()), color=["C0", "C1"])
    b.axhline(0.5, color="gray", ls=":")
    b.set_ylim(0, 1)
    b.set_ylabel("held-out accuracy")
    b.set_title(f"grammaticality (agreement), {len(task.train_set)} labelled examples")
    fig.tight_layout()
    fig.savefig(L.figure("pretrain-finetune"), dpi=110)
    plt.close(fig)
    L.say(f"""
    Pre-training then fine-tuning: the classification task is "is this sentence grammatical?", where half
    the sentences have the main verb in the wrong number ("the dog near the cats chase a bird"). Only
    {len(task.train_set)} labelled sentences. The same encoder, fine-tuned {runs['random init']['step']} steps:
      from the masked-LM pre-trained weights ({pre['step']} steps, no labels): {acc['pre-trained']:.1%}
      from random initialisation:                                  {acc['random init']:.1%}   (chance 50%)
    Predicting masked words taught the encoder the language's structure, agreement included; fine-tuning
    only has to read it out, where 500 labels are too few to learn it from scratch.
    Figure: {L.figure('pretrain-finetune')}
    """)
    return {"accuracy": acc}


# ------------------------------------------------------------------------------ probe


def lesson_probe(L: Lesson) -> dict:
    task = MLMTask()
    r = L.trained(task, "mlm")
    n_train, n_test = (200, 100) if L.quick else (1000, 300)
    train_s, test_s = split_corpus(n_train, n_test, seed=99)
    res = probe.probe(r["model"], train_s, test_s, task.vocab, device=L.device, steps=60 if L.quick else 200)
    probe.plot(res, L.figure("probe"), title=f"probing a {r['model'].cfg.n_layers}-layer MLM encoder")
    acc, ex = res.accuracy, res.expected_layer
    lines = _rows(f"{t:10s} " + "  ".join(f"{a:.2f}" for a in res.accuracy[t])
                      + f"   (majority {res.majority[t]:.2f}; scalar mix {res.mix_accuracy[t]:.2f},"
                        f" expected layer {res.expected_layer[t]:.2f})" for t in res.accuracy)
    L.say(f"""
    Probing: freeze the pre-trained encoder, and for each layer train a linear classifier on its word vectors
    to read out a linguistic property. Held-out accuracy by layer (0 = embeddings, then layers 1..{len(res.accuracy['pos']) - 1}):
    {lines}
    Part of speech is in the word itself (embeddings: {acc['pos'][0]:.0%}); tree depth and the subject's number
    need the context: from the embeddings to the top layer, depth {acc['depth'][0]:.0%} -> {acc['depth'][-1]:.0%},
    agreement {acc['agreement'][0]:.0%} -> {acc['agreement'][-1]:.0%}. The scalar mix draws each task from its own
    depth of the stack (expected layer: pos {ex['pos']:.2f}, depth {ex['depth']:.2f}, agreement {ex['agreement']:.2f}):
    lexical information low, contextual higher, as Tenney et al. (2019) found in BERT.
    Figure: {L.figure('probe')}
    """)
    return {"accuracy": res.accuracy, "majority": res.majority, "expected_layer": res.expected_layer,
            "mix_accuracy": res.mix_accuracy}


LESSONS: dict[str, Callable[[Lesson], dict]] = {
    "attention": lesson_attention, "parallel": lesson_parallel, "order": lesson_order, "residual": lesson_residual,
    "generate": lesson_generate, "mlm": lesson_mlm, "pretrain-finetune": lesson_pretrain_finetune,
    "probe": lesson_probe,
}


def run(name: str, **kwargs) -> dict:
    """Runs lesson ``name`` ("all" for every one); kwargs as :class:`Lesson`."""
    if name != "all" and name not in LESSONS:
        raise ValueError(f"unknown lesson {name!r}; choose from {', '.join(LESSONS)} or 'all'")
    lesson = Lesson(**kwargs)
    names = list(LESSONS) if name == "all" else [name]
    return {n: LESSONS[n](lesson) for n in names}
