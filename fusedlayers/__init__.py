"""fusedlayers: fused Transformer kernels for PyTorch.

Public ops (``torch.library`` ops with autograd, usable under ``torch.compile``):
:func:`attention`, :func:`attention_varlen`, :func:`layer_norm`, :func:`rms_norm`,
:func:`add_layer_norm`, :func:`add_rms_norm`; drop-in modules in :mod:`fusedlayers.nn`,
:func:`swap` / :func:`unswap` to put them into an existing model, :mod:`fusedlayers.hf`
(loaded on first use) for Hugging Face transformers, :mod:`fusedlayers.sdpa` to serve every
``scaled_dot_product_attention`` call once activated, and :mod:`fusedlayers.hub` (loaded on
first use) for the ``kernels`` package's ``kernelize``; :func:`cpu_output_cache` reports (and
bounds) the memory the ``cpu`` kernels keep for their next outputs. The naive reference
of each lives in :mod:`fusedlayers.reference`; which backend serves a call is decided in
:mod:`fusedlayers.dispatch`.
"""

from . import _ext, reference  # noqa: F401  (_ext loads the C++ extension if present)
from .dispatch import BACKENDS, BackendError
from .ops import add_layer_norm, add_rms_norm, attention, attention_varlen, layer_norm, rms_norm
from . import nn  # drop-in modules (fusedlayers.nn.LayerNorm, ...)
from .swap import swap, unswap
from .csrc_backend import output_cache as cpu_output_cache
from . import sdpa

sdpa.register()  # the name "fusedlayers" for torch.nn.attention.activate_flash_attention_impl; activates nothing

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
    "cpu_output_cache",
    "nn",
    "swap",
    "unswap",
    "hf",
    "sdpa",
    "hub",
    "distributed",
]


def __getattr__(name):
    # fusedlayers.hf is loaded on first use, so that `import fusedlayers` never imports transformers.
    if name in ("hf", "hub", "distributed"):  # fusedlayers.distributed: context-parallel attention
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
