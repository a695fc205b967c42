"""Loads the C++/CUDA extension ``fusedlayers._C``, never failing import.

Where the binary comes from, first match wins (``SOURCE`` says which):

1. prebuilt: ``fusedlayers/_C*.so``, compiled by setup.py when the package was installed
   next to an installed torch (``pip install --no-build-isolation .``, CI, developers). One
   that fails to load (an ``undefined symbol``: built against another torch) is ignored,
   and ``IGNORED`` says why;
2. cached: an earlier first-use build for this torch, python, machine and these sources
   (:mod:`fusedlayers.build`);
3. none yet: ``PENDING`` is True and the first op call on CPU tensors that the ``cpu``
   backend could serve builds it (about a minute or two, announced on stderr, with a
   progress line) and loads it: :func:`ensure`, called by ``fusedlayers.dispatch``.
   ``FUSEDLAYERS_NO_BUILD=1`` turns the first-use build off (``fusedlayers build`` still
   builds).

Importing the binary registers its ops (``torch.ops.fusedlayers.*``) with torch. Without
one, ``ERROR`` says why and the package works with the Triton and reference backends.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from typing import Callable, Optional

import torch

ERROR: Optional[str] = None  # why the extension is unavailable, None when loaded
INFO: Optional[str] = None  # what the extension was built with (from _ext_info)
# The module's eager fast path (``norm``, ``attention``: csrc/eager.cpp), None without it.
FAST = None
SOURCE: Optional[str] = None  # where the loaded binary came from (a sentence), None when none is loaded
IGNORED: Optional[str] = None  # why a prebuilt binary in the package was not used, or None
PENDING = False  # no binary loaded yet, and the first CPU op call builds one

_callbacks: list[Callable[[], None]] = []
_lock = threading.Lock()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _adopt(module, source: str) -> None:
    global FAST, INFO, ERROR, SOURCE
    FAST = module if hasattr(module, "norm") and hasattr(module, "attention") else None
    INFO = torch.ops.fusedlayers._ext_info()
    ERROR, SOURCE = None, source


def _load_file(path) -> None:
    """Imports the binary at ``path`` as ``fusedlayers._C`` (built with that module name)."""
    spec = importlib.util.spec_from_file_location("fusedlayers._C", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers the C++ ops
    sys.modules["fusedlayers._C"] = module
    _adopt(module, f"built on first use, cached at {path}")


def _start() -> None:
    global ERROR, IGNORED, PENDING
    try:
        module = importlib.import_module("fusedlayers._C")
        _adopt(module, f"prebuilt in the package ({module.__file__})")
        return
    except ModuleNotFoundError:
        prebuilt = None
    except Exception as e:  # e.g. undefined symbol: built against another torch
        prebuilt = f"{type(e).__name__}: {e}"
        IGNORED = (f"the prebuilt fusedlayers._C failed to load with torch {torch.__version__} (built against "
                   f"another torch?), ignored: {prebuilt}")
    try:
        from . import build

        cached = build.find_cached()
        if cached is not None:
            try:
                _load_file(cached)
                return
            except Exception as e:
                ERROR = (f"the cached build {cached} failed to load: {type(e).__name__}: {e}; "
                         "rebuild it with `fusedlayers build --force`")
                return
        failed = build.failed_log()
    except Exception as e:  # sources not installed, unreadable cache: no first-use build
        ERROR = f"not built, and no first-use build: {type(e).__name__}: {e}"
        return
    if IGNORED:
        ERROR = IGNORED
    if failed is not None:
        ERROR = (f"not built: the first-use build failed for torch {torch.__version__} (log: {failed}); "
                 "retry with `fusedlayers build`")
    elif _flag("FUSEDLAYERS_NO_BUILD"):
        ERROR = (ERROR + "; " if ERROR else "not built for torch " + torch.__version__ + "; ") + \
            "FUSEDLAYERS_NO_BUILD=1 turns the first-use build off: build it with `fusedlayers build`"
    else:
        PENDING = True
        ERROR = (ERROR + "; " if ERROR else "") + (
            f"not built yet for torch {torch.__version__}: the first op call on CPU tensors builds it "
            "(or now: `fusedlayers build`)")


def available() -> bool:
    return ERROR is None


def has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA part."""
    return INFO is not None and "cuda(" in INFO


def on_load(callback: Callable[[], None]) -> None:
    """Calls ``callback()`` when a first-use build is loaded later in this process (modules
    that read :func:`available` once at import refresh themselves there)."""
    _callbacks.append(callback)


@torch.compiler.disable
def ensure() -> bool:
    """Builds (or waits for another process building) and loads the extension if it is
    :data:`PENDING`; returns :func:`available`. A failed build is reported once on stderr
    and leaves ``ERROR`` saying why: the reference backend serves on."""
    global PENDING, ERROR
    if not PENDING:
        return available()
    with _lock:
        if not PENDING:
            return available()
        from . import build

        try:
            _load_file(build.build(cuda=False))
        except Exception as e:  # noqa: BLE001 - a compiler missing, a compile error, ...
            ERROR = f"not built: the first-use build failed: {e}"
            print(f"fusedlayers: {ERROR}\nfusedlayers: the reference backend serves CPU calls instead",
                  file=sys.stderr, flush=True)
        finally:
            PENDING = False
        if ERROR is None:
            for callback in _callbacks:
                callback()
    return available()


def load_built(path) -> None:
    """Loads a binary that ``fusedlayers build`` made, when none is loaded in this process."""
    global PENDING
    with _lock:
        if ERROR is None:
            return
        _load_file(path)
        PENDING = False
        for callback in _callbacks:
            callback()


_start()
