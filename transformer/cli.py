"""The reference Transformer's subcommands of ``fusedlayers``: ``train``, ``probe``, ``lesson``.

``fusedlayers.cli`` only registers them (``add_subcommands``); the work is in this package.

    fusedlayers lesson attention                       # one lesson, built-in defaults
    fusedlayers lesson all --out lessons               # every lesson
    fusedlayers train translate --steps 600 --out runs/translate
    fusedlayers train mlm --text my.txt --tokenizer wordpiece --out runs/mlm
    fusedlayers train classify --init-from runs/mlm/checkpoint.safetensors --out runs/cls
    torchrun --standalone --nproc_per_node=2 -m fusedlayers train translate --out runs/ddp
    torchrun --standalone --nproc_per_node=2 -m fusedlayers train mlm --fsdp --context-parallel 2
    fusedlayers probe --checkpoint runs/mlm/checkpoint.safetensors --out runs/probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional


# ---------------------------------------------------------------------------- flag types
# argparse ``type=`` validators: a bad value ends the command at parse time, before any
# work, with one line naming the flag ("argument --steps: must be an integer >= 1, got '0'").


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _float_in(low: float, high: float, high_open: bool = True):
    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
        if not inside:
            raise argparse.ArgumentTypeError(f"must be a number in [{low}, {high}{')' if high_open else ']'}, "
                                             f"got {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _backend(text: str) -> str:
    from ..dispatch import BACKENDS

    if text != "auto" and text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; use auto or one of {', '.join(BACKENDS)}")
    return text


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:<index>")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return text


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--backend", type=_backend, default="auto", help="fusedlayers backend for every op: auto "
                   "(default), cuda, triton, cpu, reference")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=_positive, default=None, help="training steps (default: per task / lesson)")
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_subcommands(sub) -> None:
    from .lessons import LESSONS

    p = sub.add_parser("train", help="train the reference Transformer: translate, mlm or classify")
    p.add_argument("task", choices=("translate", "mlm", "classify"))
    _common(p, "runs/<task>")
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate")
    p.add_argument("--warmup", type=_non_negative, default=None)
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--d-model", type=_positive, default=64)
    p.add_argument("--heads", type=_positive, default=4)
    p.add_argument("--layers", type=_positive, default=2)
    p.add_argument("--dropout", type=_float_in(0.0, 1.0), default=0.0)
    p.add_argument("--positions", choices=("sinusoidal", "learned", "none"), default=None)
    p.add_argument("--prenorm", action="store_true", help="pre-norm instead of the papers' post-norm")
    p.add_argument("--save-every", type=_non_negative, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    p.add_argument("--init-from", type=_existing_file, default=None,
                   help="checkpoint to start from (classify: a pre-trained mlm)")
    p.add_argument("--text", type=_existing_file, default=None,
                   help="mlm: pre-train on this UTF-8 text file (one line per example)")
    p.add_argument("--tokenizer", choices=("wordpiece", "bpe"), default="wordpiece")
    p.add_argument("--vocab-size", type=_int_at_least(8), default=1000)
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) "
                        "instead of DDP; checkpoints stay one gathered file")
    p.add_argument("--context-parallel", type=_positive, default=1, metavar="N",
                   help="under torchrun, mlm task: split each sequence over N ranks (ring attention); the number "
                        "of processes must be a multiple of N")
    p.add_argument("--compare-backends", action="store_true",
                   help="train the same model from the same seed once per available backend, in this process, "
                        "and print tokens/s of each beside the reference")
    p.set_defaults(fn=train_command)

    p = sub.add_parser("probe", help="probe each layer of a pre-trained (mlm) encoder")
    _common(p, "runs/probe")
    p.add_argument("--checkpoint", type=_existing_file, default=None,
                   help="mlm checkpoint (default: train one for --steps)")
    p.set_defaults(fn=probe_command)

    p = sub.add_parser("lesson", help="run a lesson: " + ", ".join(LESSONS) + " or all")
    p.add_argument("name", choices=list(LESSONS) + ["all"])
    _common(p, "lessons")
    p.add_argument("--quick", action="store_true", help="smaller measurements (tests)")
    p.set_defaults(fn=lesson_command)


def _serving_problem(backend: str, device: str, d_model: int, heads: int) -> Optional[str]:
    """Why ``backend`` cannot serve the model's attention and norms on ``device``, or None."""
    import torch

    from .. import dispatch

    dev = torch.device(device)
    calls = {"attention": dispatch.AttentionCall(dev, torch.float32, 1, heads, heads, 16, 16, d_model // heads,
                                                 d_model // heads, "bool", False, False, 0.0, False, False),
             "norm": dispatch.NormCall(dev, torch.float32, torch.float32, torch.float32, 16, d_model, False, 0.0)}
    for family, call in calls.items():
        try:
            dispatch.select(family, call, backend)
        except dispatch.BackendError as e:
            return f"--backend {backend}: {str(e).splitlines()[0]}"
    return None


def _setup(args, d_model: int = 64, heads: int = 4) -> str:
    """Checks what the flags can only be checked against together (the output folder, the
    backend on the device, the model's shape), exiting with one line on a problem; then sets
    threads and returns the device."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..cli import out_folder_problem

    problem = out_folder_problem(args.out.replace("<task>", getattr(args, "task", "")))
    if problem is None and d_model % heads:
        problem = f"--d-model ({d_model}) must be a multiple of --heads ({heads})"
    if problem is None:
        problem = _serving_problem(args.backend, device, d_model, heads)
    if problem is not None:
        print(f"fusedlayers {args.command}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def _fail(e: Exception) -> int:
    print(f"fusedlayers: error: {e}", file=sys.stderr)
    return 2


def train_command(args) -> int:
    from . import checkpoint
    from .lessons import STEPS, TRAIN
    from .model import ModelConfig
    from .train import TASKS, TrainConfig, train

    device = _setup(args, args.d_model, args.heads)
    try:
        task = TASKS[args.task](**({"text": args.text, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size}
                                   if args.task == "mlm" and args.text else {}))
    except (OSError, ValueError) as e:
        return _fail(e)
    if args.text and args.task != "mlm":
        return _fail(ValueError("--text is for the mlm task"))
    defaults = TRAIN[args.task]
    tcfg = TrainConfig(steps=args.steps if args.steps is not None else STEPS[args.task], device=device, seed=args.seed,
                       out=args.out.replace("<task>", args.task), save_every=args.save_every, resume=args.resume,
                       init_from=args.init_from, quiet=args.quiet, amp=not args.no_amp, fsdp=args.fsdp,
                       context_parallel=args.context_parallel,
                       **{k: v for k, v in defaults.items()})
    for name in ("batch_size", "lr", "warmup"):
        if getattr(args, name) is not None:
            setattr(tcfg, name, getattr(args, name))
    mcfg = dict(d_model=args.d_model, n_heads=args.heads, d_ff=2 * args.d_model, n_layers=args.layers,
                dropout=args.dropout, prenorm=args.prenorm, backend=args.backend)
    if args.positions:
        mcfg["positions"] = args.positions
    if args.init_from:  # the pre-trained model's shape wins
        try:
            meta = checkpoint.read(args.init_from)[1]["meta"]
        except checkpoint.CheckpointError as e:
            return _fail(e)
        mcfg = {**meta.get("model_config", {}), "backend": args.backend, "n_classes": 2}
    if args.compare_backends:
        return compare_backends(task, mcfg, tcfg)
    try:
        result = train(task, ModelConfig.from_dict(mcfg) if args.init_from else ModelConfig(**mcfg), tcfg)
    except (checkpoint.CheckpointError, ValueError) as e:
        return _fail(e)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in result.items() if k not in ("model", "history")}
        summary["final_loss"] = result["history"][-1] if result["history"] else None
        print(json.dumps(summary, indent=1))
    return 0


def compare_backends(task, mcfg: dict, tcfg) -> int:
    """Tokens/s of the same training run (same model, seed, batches) on each backend that can
    serve it, in one process, the reference last; no checkpoints, no evaluation."""
    import fusedlayers

    from .model import ModelConfig
    from .train import train

    tcfg.out, tcfg.eval, tcfg.quiet = None, False, True
    rows = {}
    for backend in [b for b in fusedlayers.BACKENDS if b != "reference"] + ["reference"]:
        try:
            r = train(task, ModelConfig(**{**mcfg, "backend": backend}), tcfg)
        except fusedlayers.BackendError as e:
            print(f"{backend:10s} cannot serve this model: {str(e).splitlines()[0]}")
            continue
        rows[backend] = r
        print(f"{backend:10s} {r['tokens_per_s']:12,.0f} tokens/s   final loss {r['history'][-1]:.4f}", flush=True)
    ref = rows.get("reference")
    if ref:
        for backend, r in rows.items():
            print(f"{backend:10s} {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x the reference")
    return 0


def probe_command(args) -> int:
    from . import checkpoint, probe
    from .data import split_corpus
    from .lessons import STEPS, TRAIN
    from .model import ModelConfig
    from .train import MLMTask, TrainConfig, train

    device = _setup(args)
    task = MLMTask()
    if args.checkpoint:
        try:
            meta = checkpoint.read(args.checkpoint)[1]["meta"]
            model = task.make_model(ModelConfig.from_dict({**meta.get("model_config", {}), "backend": args.backend}))
            checkpoint.load_model(args.checkpoint, model)
        except checkpoint.CheckpointError as e:
            return _fail(e)
        model.to(device)
    else:
        model = train(task, ModelConfig(backend=args.backend),
                      TrainConfig(steps=args.steps if args.steps is not None else STEPS["mlm"], device=device, quiet=args.quiet,
                                  out=os.path.join(args.out, "mlm"), **TRAIN["mlm"]))["model"]
    train_s, test_s = split_corpus(1000, 300, seed=99)
    os.makedirs(args.out, exist_ok=True)
    res = probe.probe(model, train_s, test_s, task.vocab, device=device)
    path = os.path.join(args.out, "probe.png")
    probe.plot(res, path)
    print(json.dumps(res.__dict__, indent=1))
    print(f"figure: {path}")
    return 0


def lesson_command(args) -> int:
    from .lessons import run

    device = _setup(args)
    run(args.name, out=args.out, steps=args.steps, backend=args.backend, device=device, quiet=args.quiet,
        quick=args.quick)
    return 0
