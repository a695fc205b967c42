"""fusedlayers for Hugging Face's kernel hub (the ``kernels`` package's ``kernelize``), from
the local install: no hub repository, no download.

``kernelize`` replaces the ``forward`` of every layer class decorated with
``use_kernel_forward_from_hub(name)`` (transformers decorates its RMS norms with
``"RMSNorm"``) by the ``forward`` of the layer class that the registered mapping gives for
that name, device and mode. This module provides both halves:

* the layer classes, :class:`RMSNorm` and :class:`LayerNorm` (also as ``layers.RMSNorm``,
  ``layers.LayerNorm``, where ``kernels`` looks for a kernel's layers). They follow the
  hub's contract: stateless ``nn.Module`` subclasses whose ``forward`` reads the replaced
  layer's own attributes (``weight``, ``variance_epsilon`` or ``eps``; ``bias``,
  ``normalized_shape``), with ``has_backward`` and ``can_torch_compile`` set;
* :class:`Repository`, which ``load()``\\ s those classes from this package, and
  :func:`mapping`, the mapping for ``kernels.register_kernel_mapping`` /
  ``kernels.use_kernel_mapping`` (or transformers' ``KernelConfig``)::

      from kernels import Mode, kernelize, use_kernel_mapping
      import fusedlayers.hub

      with use_kernel_mapping(fusedlayers.hub.mapping()):
          model = kernelize(model, mode=Mode.TRAINING, device="cpu")

The layers call :func:`fusedlayers.rms_norm` / :func:`fusedlayers.layer_norm` with
``backend="auto"``: the ``cpu`` C++ kernels on CPU, Triton on CUDA. Attention is not a hub
layer in transformers: route it with :mod:`fusedlayers.sdpa` or :mod:`fusedlayers.hf`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

__all__ = ["RMSNorm", "LayerNorm", "layers", "Repository", "mapping", "LAYER_NAMES"]


class RMSNorm(nn.Module):
    """``forward`` for a hub ``"RMSNorm"`` layer (transformers' ``LlamaRMSNorm`` and the
    other norms decorated with that name): ``weight * x / sqrt(mean(x^2) + eps)``, in the
    dtype Llama's returns (``promote(input, weight)``)."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        eps = getattr(self, "variance_epsilon", None)
        if eps is None:
            eps = getattr(self, "eps", 1e-6)
        weight = getattr(self, "weight", None)
        y = ops.rms_norm(hidden_states, weight, float(eps))
        return y if weight is None else y.to(torch.promote_types(hidden_states.dtype, weight.dtype))


class LayerNorm(nn.Module):
    """``forward`` for a hub ``"LayerNorm"`` layer shaped like ``torch.nn.LayerNorm``
    (``normalized_shape``, ``eps``, ``weight``, ``bias``); a norm over more than the last
    dimension is left to ``torch.nn.functional.layer_norm``."""

    has_backward = True
    can_torch_compile = True

    def forward(self, input: Tensor) -> Tensor:
        shape = tuple(getattr(self, "normalized_shape", (input.shape[-1],)))
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        eps = float(getattr(self, "eps", 1e-5))
        if len(shape) != 1:
            return F.layer_norm(input, shape, weight, bias, eps)
        return ops.layer_norm(input, weight, bias, eps)


# Where the ``kernels`` package looks for a kernel's layer classes (``kernel.layers.<name>``).
layers = SimpleNamespace(RMSNorm=RMSNorm, LayerNorm=LayerNorm)
LAYER_NAMES = ("RMSNorm", "LayerNorm")


class Repository:
    """A kernel repository for ``kernels``' mappings, served from this package: ``load()``
    returns the layer class named ``layer_name`` (no hub, no network)."""

    def __init__(self, layer_name: str) -> None:
        if layer_name not in LAYER_NAMES:
            raise ValueError(f"layer_name must be one of {', '.join(LAYER_NAMES)}, got {layer_name!r}")
        self.layer_name = layer_name

    def load(self) -> type:
        return getattr(layers, self.layer_name)

    def __eq__(self, other) -> bool:
        return isinstance(other, Repository) and other.layer_name == self.layer_name

    def __hash__(self) -> int:
        return hash(("fusedlayers", self.layer_name))

    def __str__(self) -> str:
        return f"fusedlayers (local install), layer `{self.layer_name}`"

    __repr__ = __str__


def mapping(devices=("cpu", "cuda"), names=LAYER_NAMES) -> dict:
    """``{layer name: {device: Repository}}`` for ``kernels.register_kernel_mapping`` or
    ``kernels.use_kernel_mapping``: every mode (the layers have a backward and compile)."""
    for device in devices:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"devices must be 'cpu' and/or 'cuda' (fusedlayers' devices), got {device!r}")
    return {name: {device: Repository(name) for device in devices} for name in names}
