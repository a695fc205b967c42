"""fusedlayers: fused Transformer kernels for PyTorch.

Public ops (``torch.library`` ops with autograd, usable under ``torch.compile``):
:func:`attention`, :func:`attention_varlen`, :func:`layer_norm`, :func:`rms_norm`,
:func:`add_layer_norm`, :func:`add_rms_norm`. The naive reference of each lives in
:mod:`fusedlayers.reference`; which backend serves a call is decided in
:mod:`fusedlayers.dispatch`.
"""

from . import _ext, reference  # noqa: F401  (_ext loads the C++ extension if present)
from .dispatch import BACKENDS, BackendError
from .ops import add_layer_norm, add_rms_norm, attention, attention_varlen, layer_norm, rms_norm

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_varlen",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "reference",
    "BackendError",
    "BACKENDS",
]
