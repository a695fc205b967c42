"""The ``cuda`` backend: the hand-written CUDA kernels of ``fusedlayers._C`` (``csrc/``).

The same thin adapter as the ``cpu`` backend (``fusedlayers.csrc_backend``): the C++ kernel
ops ``torch.ops.fusedlayers.*_kernel`` are device-neutral and dispatch on their tensors'
device, so forward / backward / dropout_keep_mask are csrc_backend's. Only ``why_not``
differs: what the CUDA kernels refuse (float32 attention: they are fp16 / bf16 tensor-core
kernels; head dims over 256), and whether the extension was built with its CUDA part.

``status()`` says whether the CUDA kernels have passed the correctness grid on a GPU: a
``fusedlayers verify`` record (this machine's, or one committed under
``benchmarks/results/<device>/verify.json``) whose ``cuda`` rows all passed. Until then
the backend serves calls that ask for it but reports "built, not verified on a GPU".
``promotion(device)`` is the stricter rule by which ``backend="auto"`` tries ``cuda`` first
on a GPU (``fusedlayers.dispatch.auto_order``): such a record of the same GPU model and the
same torch version, from a ``default`` or ``full`` grid (not ``--quick``), with passing cuda
rows for every op family the backend implements.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from . import _ext, csrc_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_GRID = 65535  # heads and sequences per launch (gridDim.y / gridDim.z)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _why_not(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "not a CUDA tensor"
    if not _ext.available():
        return f"extension not available: {_ext.ERROR}"
    if not _ext.has_cuda():
        return f"fusedlayers._C was built without its CUDA part ({_ext.INFO})"
    return None


def _attention_why_not(call) -> Optional[str]:
    reason = _why_not(call.device)
    if reason is not None:
        return reason
    if call.dtype not in ATTENTION_DTYPES:
        return f"dtype {_dt(call.dtype)}: the CUDA attention kernels are float16 / bfloat16 tensor-core kernels"
    if max(call.head_dim, call.head_dim_v) > MAX_HEAD_DIM:
        return f"head dim {max(call.head_dim, call.head_dim_v)} > {MAX_HEAD_DIM}"
    if call.heads_q > MAX_GRID or call.batch > MAX_GRID:
        return f"more than {MAX_GRID} heads or sequences"
    d = max(call.head_dim, call.head_dim_v)
    need = smem_bytes(d)
    limit = _smem_limit(call.device)
    if limit is not None and need > limit:
        return f"head dim {d} needs {need} bytes of shared memory per block, this GPU allows {limit}"
    return None


def smem_bytes(head_dim: int) -> int:
    """Shared memory per block (bytes) the CUDA attention kernels of this head dim (max of D and
    Dv, 1..256) need, forward or backward: the extension's own figure (``_attention_cuda_smem``,
    no GPU needed), so an extension built with the CUDA part is required. Over 99 KB for head dims
    over 64: sm_80 / sm_90 have it, sm_86 / sm_89 do not."""
    return int(torch.ops.fusedlayers._attention_cuda_smem(int(head_dim)))


def _smem_limit(device: torch.device) -> Optional[int]:
    try:
        props = torch.cuda.get_device_properties(device)
    except Exception:  # no GPU here: the launch would say so
        return None
    return getattr(props, "shared_memory_per_block_optin", None)


def _norm_why_not(call) -> Optional[str]:
    reason = _why_not(call.device)
    if reason is not None:
        return reason
    for name, dt in (("x", call.dtype), ("weight", call.weight_dtype), ("residual", call.residual_dtype)):
        if dt is not None and dt not in DTYPES:
            return f"{name} dtype {_dt(dt)} is not supported (float32, float16, bfloat16 only)"
    return None


attention = SimpleNamespace(
    why_not=_attention_why_not,
    forward=csrc_backend.attention.forward,
    backward=csrc_backend.attention.backward,
    varlen_forward=csrc_backend.attention.varlen_forward,
    varlen_backward=csrc_backend.attention.varlen_backward,
    dropout_keep_mask=csrc_backend.attention.dropout_keep_mask,
)

norm = SimpleNamespace(
    why_not=_norm_why_not,
    forward=csrc_backend.norm.forward,
    backward=csrc_backend.norm.backward,
    dropout_keep_mask=csrc_backend.norm.dropout_keep_mask,
)


# ------------------------------------------------------------------- verification status


def _committed_records() -> list[dict]:
    """Verification records committed under benchmarks/results/<device>/verify.json."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    records = []
    for path in sorted(results.glob("*/verify.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rec = data.get("cuda") if isinstance(data, dict) else None
        if isinstance(rec, dict):
            records.append(dict(rec, source=str(path)))
    return records


FAMILIES = ("attention", "norm")  # the op families this backend implements


def _passing_records() -> list[dict]:
    """Verification records (this machine's ``fusedlayers verify`` record, then the committed
    ones) in which the ``cuda`` backend ran and every one of its rows passed."""
    from . import verify

    candidates = []
    local = verify.read_records().get("cuda")
    if isinstance(local, dict):
        candidates.append(dict(local, source=str(verify.record_path())))
    candidates += _committed_records()
    passing = []
    for rec in candidates:
        rows = [r for r in rec.get("rows", []) if isinstance(r, dict) and r.get("backend") == "cuda"]
        if rows and all(not r.get("failures") for r in rows):
            passing.append(dict(rec, cuda_families=sorted({r.get("op") for r in rows})))
    return passing


def verification() -> Optional[dict]:
    """The newest verification record in which the ``cuda`` backend ran and every one of
    its rows passed (this machine's ``fusedlayers verify`` record first), or None."""
    passing = _passing_records()
    return max(passing, key=lambda r: r.get("date", "")) if passing else None


def verified() -> bool:
    return verification() is not None


def promotion(device: torch.device) -> Optional[dict]:
    """The record that makes ``backend="auto"`` try ``cuda`` first on ``device``, or None: a
    passing record (see ``verification``) of this GPU model (``fusedlayers.verify.device_name``),
    this torch version, a ``default`` or ``full`` grid, with cuda rows for every op family."""
    from . import verify

    if device.type != "cuda":
        return None
    passing = _passing_records()
    if not passing:  # no GPU query without a record to compare with
        return None
    try:
        name = verify.device_name(device)
    except Exception:  # no usable GPU: nothing to promote on
        return None
    matching = [r for r in passing
                if r.get("device") == name and (r.get("versions") or {}).get("torch") == torch.__version__
                and r.get("level") in ("default", "full") and set(FAMILIES) <= set(r["cuda_families"])]
    return max(matching, key=lambda r: r.get("date", "")) if matching else None


def status(device: Optional[torch.device] = None) -> str:
    """One line for ``fusedlayers info``: built or not, verified on a GPU or not, and whether
    ``backend="auto"`` tries it first on ``device`` (default: the current GPU, if any)."""
    if not _ext.available():
        return f"not available: {_ext.ERROR}"
    if not _ext.has_cuda():
        return f"not built (extension: {_ext.INFO})"
    rec = verification()
    if rec is None:
        return "built, not verified on a GPU (run benchmarks/gpu_session.sh on a GPU machine)"
    text = (f"built, verified on {rec.get('device', '?')} with torch {(rec.get('versions') or {}).get('torch', '?')} "
            f"at {rec.get('date', '?')} ({rec.get('source', '')})")
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is None:
        return text + "; no GPU here"
    if promotion(device) is not None:
        return text + "; backend='auto' tries it first on this GPU"
    return text + ("; backend='auto' does not choose it here: no passing default/full-grid record of this GPU "
                   f"and torch {torch.__version__}")
