"""``swap(model)``: put fusedlayers' modules into an existing model, in place; ``unswap`` undoes it.

What is replaced, found by a small table:

* ``torch.nn`` modules, by exact type: ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``,
  ``TransformerEncoderLayer``, ``TransformerDecoderLayer`` -> the ``fusedlayers.nn``
  namesake, which takes the module's state over (the same Parameter, buffer and hook
  objects, its train/eval mode; so its device and dtype).
* Hugging Face norm modules, by class name (``HF_NORMS``): RMS norms whose arithmetic was
  read in transformers' source (Llama's family; T5's, which is RMS without mean
  subtraction; Olmo2's) -> :class:`HFRMSNorm`, which returns the dtype the original
  returns. Each is checked on a random input against the original before it is
  swapped; a mismatch leaves it in place. The attention of Hugging Face models is not
  a module to replace: ``fusedlayers.hf.register()`` and ``attn_implementation``.

A subclass of a ``torch.nn`` type (its forward may differ), a module whose ``forward``
was patched on the instance (accelerate hooks), and any other module whose class name
says norm or attention are left, and the report says why. Nothing in torch or
transformers is patched; nothing changes at import.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from . import nn as fl_nn
from .nn import _check_backend

__all__ = ["swap", "unswap", "SwapReport", "HFRMSNorm", "TORCH_MODULES", "HF_NORMS"]

# torch.nn type -> fusedlayers.nn drop-in (exact type match).
TORCH_MODULES = {
    torch.nn.LayerNorm: fl_nn.LayerNorm,
    torch.nn.RMSNorm: fl_nn.RMSNorm,
    torch.nn.MultiheadAttention: fl_nn.MultiheadAttention,
    torch.nn.TransformerEncoderLayer: fl_nn.TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: fl_nn.TransformerDecoderLayer,
}

# Hugging Face norm class name -> output dtype rule, for classes holding one `weight`
# (hidden,) and `variance_epsilon`, computing x * rsqrt(mean(x^2) + eps) * weight in float32
# (checked in transformers 5.24's modeling files):
#   "promote": Llama's `weight * y.to(input_dtype)`, dtype promote(input, weight)
#   "t5": T5's, weight's dtype if it is float16/bfloat16, else promote(input, weight)
#   "input": Olmo2's `(weight * y).to(input_dtype)`, the input's dtype
HF_NORMS = {
    **dict.fromkeys(("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "MinistralRMSNorm", "Ministral3RMSNorm",
                     "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm",
                     "GraniteRMSNorm", "DeepseekV3RMSNorm", "OlmoeRMSNorm", "SmolLM3RMSNorm", "MllamaTextRMSNorm",
                     "GlmRMSNorm"), "promote"),
    **dict.fromkeys(("T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm", "LongT5LayerNorm",
                     "SwitchTransformersLayerNorm"), "t5"),
    "Olmo2RMSNorm": "input",
}

_HALF = (torch.float16, torch.bfloat16)
_ORIGINAL = "_fusedlayers_original"  # instance attribute of a swapped module (not a submodule)


class HFRMSNorm(fl_nn.RMSNorm):
    """:class:`fusedlayers.nn.RMSNorm` in place of a Hugging Face RMS norm (``HF_NORMS``):
    the same ``weight`` Parameter, ``variance_epsilon`` as an alias of ``eps``, and the
    original's output dtype (``dtype_rule``)."""

    def __init__(self, hidden_size: int, eps: float, dtype_rule: str, *, backend: str = "auto", device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, eps, device=device, dtype=dtype, backend=backend)
        self.dtype_rule = dtype_rule

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        w = self.weight.dtype
        if self.dtype_rule == "input":
            return y
        if self.dtype_rule == "t5" and w in _HALF:
            return y.to(w)
        return y.to(torch.promote_types(x.dtype, w))


# ---------------------------------------------------------------------------- report


@dataclass
class SwapEntry:
    name: str  # qualified name in the model
    old: str  # class before
    new: Optional[str] = None  # class after (None: left)
    reason: str = ""  # why it was left


@dataclass
class SwapReport:
    """What ``swap`` (or ``unswap``) did: ``swapped`` and ``left`` entries, and a readable str."""

    action: str = "swapped"
    swapped: list[SwapEntry] = field(default_factory=list)
    left: list[SwapEntry] = field(default_factory=list)

    def __str__(self) -> str:
        """One line per kind of change: count, classes, reason and the first names."""
        groups: dict[tuple, list[str]] = {}
        for e in self.swapped:
            groups.setdefault((self.action, f"{e.old} -> {e.new}"), []).append(e.name)
        for e in self.left:
            groups.setdefault(("left", f"{e.old}: {e.reason}"), []).append(e.name)
        lines = [f"fusedlayers: {len(self.swapped)} module(s) {self.action}, {len(self.left)} left"]
        for (what, desc), names in groups.items():
            shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
            lines.append(f"  {what:8} {len(names):3} x {desc}   [{shown}]")
        return "\n".join(lines)



def _qualname(cls: type) -> str:
    """torch.nn.LayerNorm, fusedlayers.nn.LayerNorm, transformers.LlamaRMSNorm."""
    module = cls.__module__
    if module.startswith("torch.nn.modules."):
        module = "torch.nn"
    elif module.startswith("transformers."):
        module = "transformers"
    return f"{module}.{cls.__qualname__}"


# ---------------------------------------------------------------------------- selection

Pattern = Union[str, type]


def _matches(patterns: Iterable[Pattern], name: str, module: torch.nn.Module) -> bool:
    """A str pattern matches the class name or the qualified module name (fnmatch); a
    type matches instances of exactly that type."""
    cls = type(module)
    return any((p is cls) if isinstance(p, type) else
               (fnmatch.fnmatchcase(cls.__name__, p) or fnmatch.fnmatchcase(name, p)) for p in patterns)


def _patterns(arg, label: str) -> Optional[tuple]:
    if arg is None:
        return None
    kinds = "a class name, a module name pattern, a torch.nn.Module subclass, or a list of them"
    if isinstance(arg, (str, type)):
        arg = (arg,)
    elif isinstance(arg, torch.nn.Module):
        raise TypeError(f"{label} must be {kinds}, got a {type(arg).__qualname__} instance (pass its class)")
    elif isinstance(arg, (bytes, dict)) or not hasattr(arg, "__iter__"):
        raise TypeError(f"{label} must be {kinds}, got {type(arg).__name__} {arg!r:.80}")
    arg = tuple(arg)
    for p in arg:
        if isinstance(p, type) and not issubclass(p, torch.nn.Module):
            raise TypeError(f"{label}: {p.__qualname__} is not a torch.nn.Module subclass")
        if not isinstance(p, (str, type)):
            raise TypeError(f"{label} must be {kinds}, got an element {p!r:.80} ({type(p).__name__})")
        if p == "":
            raise ValueError(f"{label}: an empty pattern matches no module")
    return arg


def _check_model(model, fn: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}(model): model must be a torch.nn.Module, got {type(model).__qualname__}")


def _left_reason(module: torch.nn.Module) -> Optional[str]:
    """Why a module outside the tables is worth a line in the report, or None."""
    cls = type(module)
    if cls.__module__.startswith("fusedlayers."):
        return None
    for base, drop_in in TORCH_MODULES.items():
        if isinstance(module, base):
            return (f"subclass of {_qualname(base)}: its forward may differ, not swapped "
                    f"(use fusedlayers.nn.{drop_in.__name__} in its definition)")
    name = cls.__name__
    if cls.__module__.startswith("transformers.") and name.endswith("Attention"):
        if any(type(c).__name__.endswith("Attention") for c in module.children()):
            return None  # a wrapper (BertAttention around BertSelfAttention): the inner one is reported
        hf = sys.modules.get("fusedlayers.hf")
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if hf is not None and implementation in hf.REGISTERED:
            return None  # already runs on fusedlayers' attention
        return "Hugging Face attention: use fusedlayers.hf.register() and attn_implementation='fusedlayers'"
    if "Norm" in name or "Attention" in name:
        return "no fusedlayers drop-in for this class"
    return None


# ---------------------------------------------------------------------------- conversion


def _hf_rule(module: torch.nn.Module) -> Optional[str]:
    cls = type(module)
    return HF_NORMS.get(cls.__name__) if cls.__module__.startswith("transformers.") else None


def _hf_norm(module: torch.nn.Module, rule: str, backend: str) -> Union[HFRMSNorm, str]:
    """The HFRMSNorm for a Hugging Face norm, or the reason it cannot be swapped."""
    weight = module._parameters.get("weight")
    eps = getattr(module, "variance_epsilon", None)
    if set(module._parameters) != {"weight"} or module._buffers or weight is None or weight.dim() != 1:
        return "unexpected parameters or buffers for its class: not swapped"
    if not isinstance(eps, (int, float)):
        return "no float variance_epsilon: not swapped"
    new = HFRMSNorm(weight.shape[0], float(eps), rule, backend=backend, device="meta")
    for key, value in module.__dict__.items():  # the same weight and hooks, the same mode
        if key in ("_parameters", "training") or "hook" in key:
            new.__dict__[key] = value
    if weight.device.type != "meta":  # the arithmetic on a random input (own generator; hooks not run)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, weight.shape[0], generator=gen).to(weight.device, weight.dtype)
        with torch.no_grad():
            want, got = module.forward(x), new.forward(x)
        tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
        if want.dtype != got.dtype or want.shape != got.shape or not torch.allclose(got.float(), want.float(),
                                                                                   rtol=tol, atol=tol):
            return "its output on a random input differs from the fused RMS norm's: not swapped"
    return new


def _convert(module: torch.nn.Module, backend: str) -> Union[torch.nn.Module, str]:
    """The replacement of a candidate module, or the reason it cannot be replaced."""
    if "forward" in module.__dict__:
        return "its forward is patched on the instance (accelerate or another hook library): not swapped"
    drop_in = TORCH_MODULES.get(type(module))
    return drop_in.from_torch(module, backend) if drop_in is not None else _hf_norm(module, _hf_rule(module), backend)


def _is_candidate(module: torch.nn.Module) -> bool:
    return type(module) in TORCH_MODULES or _hf_rule(module) is not None


def swap(model: torch.nn.Module, *, include=None, exclude=None, backend: str = "auto") -> SwapReport:
    """Replaces, in place, the modules of ``model`` that fusedlayers has drop-ins for.

    Args:
        model: any ``torch.nn.Module``; its descendants are replaced (the root itself
            cannot be: wrap it, or build it from ``fusedlayers.nn``).
        include: None (everything in the tables) or class names, qualified module
            names (``fnmatch`` patterns such as ``"encoder.layers.*"``) or types; a
            module is swapped when it matches one.
        exclude: the same kinds of patterns; a matching module is left (its children
            may still be swapped).
        backend: the ``backend`` of every new module ("auto" or a backend name).

    Returns:
        a :class:`SwapReport` (``print`` it): what was swapped, what was left and why.

    Weights are shared, not copied (the same Parameter objects), so an optimizer built
    before the swap still updates the model, and ``state_dict`` keys are unchanged. A
    module that appears at several places is replaced by one new module everywhere.
    """
    _check_model(model, "swap")
    _check_backend(backend)
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    report = SwapReport()
    done: dict[int, torch.nn.Module] = {}

    if _is_candidate(model):
        report.left.append(SwapEntry("(root)", _qualname(type(model)), reason="the root module cannot be replaced "
                                     "in place: swap its parent, or build it from fusedlayers.nn"))

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if id(child) in done:  # shared module: one replacement everywhere
                setattr(parent, key, done[id(child)])
                continue
            visit(child, name)  # children first: a layer's attention and norms are swapped on their own
            if include is not None and not _matches(include, name, child):
                continue
            entry = SwapEntry(name, _qualname(type(child)))
            if not _is_candidate(child):
                entry.reason = _left_reason(child)
                if entry.reason is not None:
                    report.left.append(entry)
                continue
            result = "excluded" if exclude is not None and _matches(exclude, name, child) else _convert(child, backend)
            if isinstance(result, str):
                entry.reason = result
                report.left.append(entry)
                continue
            result.__dict__[_ORIGINAL] = child  # kept for unswap; not a submodule (no state_dict entry)
            done[id(child)] = result
            setattr(parent, key, result)
            entry.new = _qualname(type(result))
            report.swapped.append(entry)

    visit(model, "")
    return report


def unswap(model: torch.nn.Module) -> SwapReport:
    """Puts back the modules ``swap`` replaced (the original objects), in place. They get
    the swapped modules' current Parameter and buffer objects and train/eval mode, so
    training or ``load_state_dict`` done in between is kept."""
    _check_model(model, "unswap")
    report = SwapReport(action="restored")
    done: dict[int, torch.nn.Module] = {}

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if id(child) in done:
                setattr(parent, key, done[id(child)])
                continue
            original = child.__dict__.get(_ORIGINAL)
            if original is not None:
                for attr in ("_parameters", "_buffers"):
                    for pname, value in getattr(child, attr).items():
                        if pname in getattr(original, attr):
                            getattr(original, attr)[pname] = value
                original.training = child.training
                done[id(child)] = original
                setattr(parent, key, original)
                report.swapped.append(SwapEntry(name, _qualname(type(child)), _qualname(type(original))))
                child = original
            visit(child, name)

    visit(model, "")
    return report
