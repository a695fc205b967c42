"""Checkpoints in safetensors, written atomically and resumable bit-exactly.

One file holds the model's tensors (``model.*``), the optimizer's state (``optim.<i>.<name>``),
torch's random-number state (``rng.cpu``, ``rng.cuda``) and, as JSON in the safetensors
metadata, the step, the configs, the optimizer's hyper-parameters, the GradScaler state and
the loss history. It is written to a temporary file in the same folder, flushed to disk, and
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), and the folder is
flushed too, so that the rename itself survives a power loss: a crash mid-write leaves the
previous checkpoint intact. The temporary file is removed on any error or interrupt; one left
by a killed process is removed by the next save to the same path.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

FORMAT = "fusedlayers.transformer/1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or not a fusedlayers.transformer checkpoint."""


def save(path: str, model, optimizer=None, meta: Optional[dict] = None, scaler=None) -> None:
    """Writes ``path`` atomically. ``meta`` is any JSON-serialisable dict (step, configs, ...).
    ``model`` and ``optimizer`` are the objects or their ``state_dict()`` (a sharded run passes
    the gathered full state in that same layout)."""
    from safetensors.torch import save_file

    model_state = model if isinstance(model, dict) else model.state_dict()
    # clone(): tied weights share storage, which safetensors refuses; each key gets its own copy
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model_state.items()}
    groups = []
    if optimizer is not None:
        state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        for i, s in state["state"].items():
            for name, value in s.items():
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                tensors[f"optim.{i}.{name}"] = value.detach().cpu().clone().contiguous()
        groups = state["param_groups"]
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata = {"format": FORMAT, "meta": json.dumps(meta or {}), "param_groups": json.dumps(groups),
                "scaler": json.dumps(scaler.state_dict() if scaler is not None and scaler.is_enabled() else {})}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp."
    _remove_stale(folder, prefix)
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale(folder: str, prefix: str) -> None:
    """Removes temporary files ``<prefix><pid>`` left in ``folder`` by processes that no longer run."""
    for name in os.listdir(folder):
        pid = name[len(prefix):]
        if not name.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except (PermissionError, OSError):  # it exists (another user's), or this platform cannot tell
            continue
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass


def _fsync_folder(folder: str) -> None:
    """Flushes the folder's entry list (the rename) to disk; POSIX only (Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint; CheckpointError with the reason when unreadable."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{path!r} is not a readable safetensors checkpoint (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is a safetensors file but not a {FORMAT} checkpoint "
                              f"(format {metadata.get('format')!r})")
    missing = [key for key in ("meta", "param_groups") if key not in metadata]
    if missing:
        raise CheckpointError(f"{path!r}: its metadata lacks {', '.join(missing)} (corrupt or written by another "
                              "program?)")
    parsed = {}
    for key, value in metadata.items():
        if key == "format":
            continue
        try:
            parsed[key] = json.loads(value)
        except ValueError as e:
            raise CheckpointError(f"{path!r}: its metadata {key!r} is not valid JSON ({e})") from None
    if not isinstance(parsed["meta"], dict) or not isinstance(parsed["param_groups"], list):
        raise CheckpointError(f"{path!r}: its metadata 'meta' must be a JSON object and 'param_groups' a list")
    if "rng.cpu" not in tensors:
        raise CheckpointError(f"{path!r}: the tensor 'rng.cpu' (torch's random state) is missing")
    return tensors, parsed


def load_model(path: str, model: torch.nn.Module, strict: bool = True) -> dict:
    """Loads the model's weights from ``path``; returns the checkpoint's ``meta``.
    ``strict=False`` loads what matches (an encoder from an MLM checkpoint into a classifier)."""
    tensors, metadata = read(path)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{path!r} does not fit this model: {e}") from None
    if not strict and not set(state) & {k for k, _ in model.state_dict().items()}:
        raise CheckpointError(f"{path!r} shares no weight with this model (missing {result.missing_keys[:3]}...)")
    return metadata["meta"]


def load(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         scaler=None) -> dict:
    """Restores model, optimizer, GradScaler and torch's RNG state; returns ``meta``."""
    tensors, metadata = read(path)
    meta = load_model(path, model)
    if optimizer is not None:
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": metadata["param_groups"]})
    if scaler is not None and metadata.get("scaler"):
        scaler.load_state_dict(metadata["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
