"""Which backend serves a call: the one table of fusedlayers.

Backends: ``cuda`` (hand-written CUDA C++, ``csrc/``), ``triton`` (``kernels/``), ``cpu``
(C++ with OpenMP and SIMD, ``csrc/``), ``reference`` (naive PyTorch,
``fusedlayers/reference.py``). ``IMPLEMENTATIONS`` says which backend implements which
op family; adding a backend for a family is one line there. ``AUTO_ORDER`` says which
backends ``backend="auto"`` tries for tensors on each device type, first match wins;
``auto_order(device)`` is that row, with ``cuda`` first on a GPU where it has been verified.

An implementation is any object (usually a module) with these members:

attention family
    ``why_not(call: AttentionCall) -> str | None``: None when it can serve the call, else
    a short reason ("head dim 300 > 256"), shown to the user.
    ``forward(q, k, v, attn_mask, seed, scale, causal, bottom_right, dropout_p)
    -> (out, lse)`` and ``backward(dout, dlse, q, k, v, attn_mask, out, lse, seed, scale,
    causal, bottom_right, dropout_p, deterministic, bias_grad) -> (dq, dk, dv, dbias)``,
    ``varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    seed, scale, causal, bottom_right, dropout_p)`` and ``varlen_backward`` likewise, and
    ``dropout_keep_mask(seed, shape, dropout_p, device) -> bool Tensor`` (its own random
    stream, so tests can check dropout against the reference). Shapes and conventions:
    ``fusedlayers.registration``. ``VARIANTS``: the score variants it serves (argument names:
    "window_size", "softcap", "alibi_slopes", "sinks"), and "dropout_layout" when its dense
    ``forward`` / ``backward`` take a ``dropout_layout`` keyword argument (the keep-mask of a
    block of a larger call, ``fusedlayers.registration``); ``why_not`` here refuses the others,
    except sinks, which ``registration.join_sinks`` adds to the (out, lse) of any backend that
    does not take them (its backward must take P from the saved lse). A call with variants
    reaches ``forward`` / ``backward`` / ``varlen_*`` with one more argument, ``mods``
    (``registration.ScoreMods``); one with a dropout layout reaches ``forward`` / ``backward``
    with the keyword argument ``dropout_layout`` ([row0, col0, rows, cols]).
norm family
    ``why_not(call: NormCall)``, ``forward``, ``backward``, ``dropout_keep_mask``, see
    ``fusedlayers.registration``.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple, Optional

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")

# (op family, backend) -> "module:attribute" implementing that family on that backend.
IMPLEMENTATIONS = {
    ("attention", "reference"): "fusedlayers.reference_backend:attention",
    ("attention", "triton"): "fusedlayers.kernels.attention",
    ("norm", "reference"): "fusedlayers.reference_backend:norm",
    ("attention", "cpu"): "fusedlayers.csrc_backend:attention",
    ("norm", "cpu"): "fusedlayers.csrc_backend:norm",
    ("norm", "triton"): "fusedlayers.kernels.layer_norm",
    ("attention", "cuda"): "fusedlayers.cuda_backend:attention",
    ("norm", "cuda"): "fusedlayers.cuda_backend:norm",
}

# Backends that backend="auto" tries, in order, by the device type of the inputs. The
# Triton interpreter is never chosen by auto on CPU: it exists for tests. The cuda backend
# is put at the front of the "cuda" row (VERIFIED_CUDA_ORDER) on a GPU where it has passed
# the correctness grid: a `fusedlayers verify` record of this GPU model and this torch
# version whose cuda rows all passed (fusedlayers.cuda_backend.promotion()); elsewhere it
# serves only calls that name it.
AUTO_ORDER = {
    "cuda": ("triton", "reference"),
    "cpu": ("cpu", "reference"),
}
VERIFIED_CUDA_ORDER = ("cuda",) + AUTO_ORDER["cuda"]


class BackendError(RuntimeError):
    """No backend can serve a call; the message gives every backend's reason."""


def _device_dtype(call) -> str:
    """The start of a call's description: ``cuda bfloat16``."""
    return f"{call.device.type} {str(call.dtype).replace('torch.', '')}"


class AttentionCall(NamedTuple):
    """What a backend needs to know to accept or refuse an attention call. A NamedTuple: built on
    every call of the Python path, and the key under which ``select`` keeps its answer."""

    device: torch.device
    dtype: torch.dtype
    batch: int  # B (number of sequences for varlen)
    heads_q: int  # Hq
    heads_kv: int  # Hkv
    seqlen_q: int  # Nq (max_seqlen_q for varlen)
    seqlen_k: int  # Nk (max_seqlen_k for varlen)
    head_dim: int  # D of q and k
    head_dim_v: int  # D of v
    mask: Optional[str]  # None, "bool" or "float"
    mask_grad: bool  # the float bias requires grad
    causal: bool
    dropout_p: float
    deterministic: bool
    varlen: bool
    window: tuple[int, int] = (-1, -1)  # window_size (left, right), -1 = unbounded side
    softcap: float = 0.0
    alibi: bool = False  # alibi_slopes given
    sinks: bool = False  # sinks given
    sinks_grad: bool = False  # the sinks require grad
    dropout_layout: bool = False  # a dropout_layout is given (the keep-mask of a block of a larger call)

    @property
    def variants(self) -> tuple[str, ...]:
        """The score variants of the call and its dropout layout, by argument name (empty for plain
    attention)."""
        return tuple(name for name, on in (("window_size", self.window != (-1, -1)), ("softcap", self.softcap > 0),
                                           ("alibi_slopes", self.alibi), ("sinks", self.sinks),
                                           ("dropout_layout", self.dropout_layout)) if on)

    def __str__(self) -> str:
        return (f"{_device_dtype(self)}, B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} "
                f"Nq={self.seqlen_q} Nk={self.seqlen_k} D={self.head_dim}"
                + (f" Dv={self.head_dim_v}" if self.head_dim_v != self.head_dim else "")
                + (f", {self.mask} mask" if self.mask else "") + (", causal" if self.causal else "")
                + (f", dropout {self.dropout_p}" if self.dropout_p else "") + (", varlen" if self.varlen else "")
                + "".join(f", {v}" for v in self.variants))


class NormCall(NamedTuple):
    """What a backend needs to know to accept or refuse a (residual-add +) norm call (a NamedTuple,
    as ``AttentionCall``)."""

    device: torch.device
    dtype: torch.dtype  # of x
    weight_dtype: Optional[torch.dtype]
    residual_dtype: Optional[torch.dtype]
    rows: int
    hidden: int
    rms: bool
    dropout_p: float

    def __str__(self) -> str:
        return (f"{_device_dtype(self)}, rows={self.rows} hidden={self.hidden}"
                + (", rms" if self.rms else "") + (", residual" if self.residual_dtype else "")
                + (f", dropout {self.dropout_p}" if self.dropout_p else ""))


def _load(path: str) -> tuple[Any, Optional[str]]:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
        return (getattr(obj, attr) if attr else obj), None
    except Exception as e:  # a broken optional backend must never break import
        return None, f"failed to load {module}: {type(e).__name__}: {e}"


# Resolved once at import, so that choosing a backend is plain attribute access (which
# torch.compile traces without a graph break).
_IMPLS: dict[tuple[str, str], tuple[Any, Optional[str]]] = {key: _load(p) for key, p in IMPLEMENTATIONS.items()}


# The "cuda" row of each GPU (by device index), decided at the first auto call on that GPU: reading
# the verification records costs file reads, so it is done once per process and GPU, never per call.
_CUDA_ORDERS: dict[int, tuple[str, ...]] = {}


@torch.compiler.assume_constant_result  # a first call inside torch.compile: run eagerly, a constant
def _decide_cuda_order(index: int) -> tuple[str, ...]:
    from . import cuda_backend

    return VERIFIED_CUDA_ORDER if cuda_backend.promotion(torch.device("cuda", index)) else AUTO_ORDER["cuda"]


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The backends that backend="auto" tries for tensors on ``device``, in order."""
    if device.type != "cuda":
        return AUTO_ORDER.get(device.type, ())
    index = device.index if device.index is not None else torch.cuda.current_device()
    order = _CUDA_ORDERS.get(index)
    if order is None:
        order = _CUDA_ORDERS[index] = _decide_cuda_order(index)
    return order


def why_not(family: str, backend: str, call) -> Optional[str]:
    """None if ``backend`` can serve ``call`` of op ``family``, else the reason."""
    impl, error = _IMPLS.get((family, backend), (None, f"no {family} implementation yet"))
    if impl is None:
        return error
    missing = [name for name in getattr(call, "variants", ())
               if name != "sinks" and name not in getattr(impl, "VARIANTS", ())]  # sinks: registration.join_sinks
    if missing:
        return f"no {', '.join(missing)} on this backend"
    return impl.why_not(call)


def implementation(family: str, backend: str):
    """The object implementing ``family`` on ``backend`` (raises if there is none)."""
    impl, error = _IMPLS.get((family, backend), (None, f"no {family} implementation yet"))
    if impl is None:
        raise BackendError(f"{family}: backend {backend!r} is unavailable: {error}")
    return impl


# select's answers by (family, backend, call): a call signature is decided once. Emptied when the
# extension loads (the cpu and cuda backends' answers change then), and when it reaches _SELECTED_MAX
# entries (shapes vary without bound).
_SELECTED: dict = {}
_SELECTED_MAX = 4096
_ext.on_load(_SELECTED.clear)


def select(family: str, call, backend: str = "auto") -> str:
    """Name of the backend that serves ``call``: the one asked for, or the first that
    accepts it in ``AUTO_ORDER``. Raises ``BackendError`` listing every backend's reason.
    The answer for a (family, backend, call) is decided once per process (outside torch.compile,
    which traces the decision instead)."""
    if _ext.PENDING and call.device.type == "cpu" and backend in ("auto", "cpu"):
        _ext.ensure()  # the first-use build of the C++ extension (fusedlayers._ext)
    if torch.compiler.is_compiling():
        return _select(family, call, backend)
    key = (family, backend, call)
    name = _SELECTED.get(key)
    if name is None:
        name = _select(family, call, backend)  # raises for a call no backend serves: nothing kept
        if len(_SELECTED) >= _SELECTED_MAX:
            _SELECTED.clear()
        _SELECTED[key] = name
    return name


def _select(family: str, call, backend: str) -> str:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        reason = why_not(family, backend, call)
        if reason is not None:
            raise BackendError(f"backend {backend!r} cannot serve this {family} call ({call}): {reason}")
        return backend
    order = auto_order(call.device)
    reasons = {}
    for name in order:
        reasons[name] = why_not(family, name, call)
        if reasons[name] is None:
            return name
    for name in BACKENDS:
        if name not in order:
            reasons[name] = f"not tried by backend='auto' for {call.device.type} tensors"
    lines = "\n".join(f"  {name}: {reasons[name]}" for name in BACKENDS)
    raise BackendError(f"no backend can serve this {family} call ({call}):\n{lines}")
