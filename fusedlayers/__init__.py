"""fusedlayers: fused Transformer kernels for PyTorch.

Public ops (``torch.library`` ops with autograd, usable under ``torch.compile``):
:func:`attention`, :func:`attention_varlen`, :func:`layer_norm`, :func:`rms_norm`,
:func:`add_layer_norm`, :func:`add_rms_norm`; drop-in modules in :mod:`fusedlayers.nn`,
:func:`swap` / :func:`unswap` to put them into an existing model, and :mod:`fusedlayers.hf`
(loaded on first use) for Hugging Face transformers. The naive reference of each lives in
:mod:`fusedlayers.reference`; which backend serves a call is decided in
:mod:`fusedlayers.dispatch`.
"""

from . import _ext, reference  # noqa: F401  (_ext loads the C++ extension if present)
from .dispatch import BACKENDS, BackendError
from .ops import add_layer_norm, add_rms_norm, attention, attention_varlen, layer_norm, rms_norm
from . import nn  # drop-in modules (fusedlayers.nn.LayerNorm, ...)
from .swap import swap, unswap

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
    "nn",
    "swap",
    "unswap",
    "hf",
]


def __getattr__(name):
    # fusedlayers.hf is loaded on first use, so that `import fusedlayers` never imports transformers.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
