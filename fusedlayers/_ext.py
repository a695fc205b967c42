"""Loads the optional C++/CUDA extension ``fusedlayers._C``, never failing import.

Importing ``_C`` registers its ops (``torch.ops.fusedlayers.*``) with torch. When it is
missing (installed with ``FUSEDLAYERS_NO_EXT=1``, built without torch at hand, or its
compile failed) or cannot load (built against another torch), ``ERROR`` says why and
the package still works with the Triton and reference backends.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

ERROR: Optional[str] = None  # why the extension is unavailable, None when loaded
INFO: Optional[str] = None  # what the extension was built with (from _ext_info)

try:
    importlib.import_module("fusedlayers._C")  # registers the C++ ops

    INFO = torch.ops.fusedlayers._ext_info()
except ModuleNotFoundError:
    ERROR = ("not built (installed with FUSEDLAYERS_NO_EXT=1, or without torch in the build environment, "
             "or its compile failed): reinstall with `pip install --no-build-isolation .`")
except Exception as e:  # e.g. undefined symbol: built against another torch
    ERROR = f"failed to load: {type(e).__name__}: {e}"


def available() -> bool:
    return ERROR is None


def has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA part."""
    return INFO is not None and "cuda(" in INFO
