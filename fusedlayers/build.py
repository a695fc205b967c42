"""Builds ``fusedlayers._C`` on this machine, against the torch that is installed.

A wheel made without torch at hand (``pip install .`` with build isolation, ``python -m
build``) holds no compiled code: it ships the C++/CUDA sources (``fusedlayers/_csrc``) and
this module compiles them on first use, with torch's ``cpp_extension`` and ninja, into a
cache keyed by everything the binary depends on::

    $FUSEDLAYERS_BUILD_CACHE or $XDG_CACHE_HOME/fusedlayers/build (default ~/.cache/...)
        torch2.14.1+cu130-cuda13.0-cp311-x86_64-<sources hash>-cpu/_C.so
        torch2.14.1+cu130-cuda13.0-cp311-x86_64-<sources hash>-cuda-sm80/_C.so

so switching torch (``pip install torch==<another>``) or editing a source gives a new
entry and never loads a binary built for something else. A build runs in a child process
(the parent loads only the finished binary: torch's ops must be registered once per
process), into a temporary folder renamed into place when it has compiled and loaded; a
file lock per entry makes concurrent first uses (the ranks of a ``torchrun``) wait for one
build instead of racing. A failed build leaves ``failed.log`` in the entry, so later
processes do not retry it on every start; ``fusedlayers build`` retries.

Only the standard library is imported at module level: ``python .../build.py --worker``
is the child process, which must not import fusedlayers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

# Bump when the build recipe (flags, layout) changes: part of the cache key.
RECIPE = "1"
DEFAULT_CUDA_ARCHS = "8.0"
LIB = "_C.so"  # the name cpp_extension gives a module built with name="_C" on Linux
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


class BuildError(RuntimeError):
    """A first-use or ahead-of-time build failed; the message says why and where the log is."""


# ------------------------------------------------------------------------------- sources


def source_dir() -> Path:
    """The C++/CUDA sources: ``fusedlayers/_csrc`` in an installed wheel, ``csrc/`` of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "ext.cpp").is_file():
            return candidate
    raise BuildError(f"the C++ sources of fusedlayers are not installed (no {here / '_csrc'}/ext.cpp): "
                     "reinstall fusedlayers")


def sources(root: Path, cuda: bool) -> list[str]:
    """Translation units below ``root``, sorted: the CPU part, plus the CUDA part when ``cuda``
    (``*.cu`` and ``*_cuda.cpp``); the same split as setup.py."""
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".cpp", ".cu"):
            continue
        is_cuda = path.suffix == ".cu" or path.name.endswith("_cuda.cpp")
        if not is_cuda or cuda:
            out.append(str(path))
    return out


def source_hash(root: Path) -> str:
    """Hash of every source and header below ``root`` (names and contents) and the recipe."""
    h = hashlib.sha256(f"recipe {RECIPE}\n".encode())
    for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- cache key


def cache_root() -> Path:
    root = os.environ.get("FUSEDLAYERS_BUILD_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "fusedlayers" / "build"


def _torch_tag() -> str:
    import torch

    cuda = f"cuda{torch.version.cuda}" if torch.version.cuda else "cpu"
    if getattr(torch.version, "hip", None):
        cuda = f"rocm{torch.version.hip}"
    return f"torch{torch.__version__}-{cuda}"


def base_key(root: Optional[Path] = None) -> str:
    """Everything a binary depends on except its variant: torch (version and CUDA), python,
    the machine's architecture and the sources."""
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    key = f"{_torch_tag()}-{py}-{platform.machine()}-{source_hash(root or source_dir())}"
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", key)


def _arch_tag(archs: str) -> str:
    return "sm" + "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in re.split(r"[ ;,]+", archs.strip()) if a)


def entry(variant: str, root: Optional[Path] = None) -> Path:
    """The cache folder of one build: ``variant`` is ``"cpu"`` or ``"cuda-sm80..."``."""
    return cache_root() / f"{base_key(root)}-{variant}"


def find_cached(root: Optional[Path] = None) -> Optional[Path]:
    """The binary of a finished build for this torch and these sources (the one with the
    CUDA part first), or None. Cheap: a few stat calls and hashing the sources."""
    base = cache_root()
    if not base.is_dir():
        return None
    prefix = base_key(root) + "-"
    done = [p for p in base.iterdir() if p.name.startswith(prefix) and (p / "build.json").is_file()
            and (p / LIB).is_file()]
    done.sort(key=lambda p: (not p.name[len(prefix):].startswith("cuda"), p.name))
    return done[0] / LIB if done else None


def failed_log(root: Optional[Path] = None) -> Optional[Path]:
    """The log of an earlier failed CPU build for this torch and these sources, or None."""
    log = entry("cpu", root) / "failed.log"
    return log if log.is_file() else None


# ------------------------------------------------------------------------------- planning


def _cuda_plan(want_cuda: Optional[bool]) -> tuple[Optional[str], Optional[str], str]:
    """(CUDA_HOME, TORCH_CUDA_ARCH_LIST, note): the CUDA part is built when asked for
    (``want_cuda``: True forces, None means "where nvcc is found", False never) and torch
    is a CUDA build and nvcc is found; else CUDA_HOME is None and ``note`` says why."""
    import torch

    if want_cuda is False:
        return None, None, "CPU part only"
    reason = None
    if getattr(torch.version, "hip", None):
        reason = f"torch {torch.__version__} is a ROCm build"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    home = None
    if reason is None:
        candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
        nvcc = shutil.which("nvcc")
        if nvcc:
            candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append("/usr/local/cuda")
        # A toolkit root holds bin/nvcc and the headers (an nvcc on PATH may be a wrapper script
        # outside the toolkit, whose parent folder is no root).
        home = next((c for c in candidates if c and os.path.isfile(os.path.join(c, "bin", "nvcc"))
                     and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))), None)
        if home is None:
            reason = "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    if reason is not None:
        if want_cuda:
            raise BuildError(f"cannot build the CUDA part: {reason}")
        return None, None, reason
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}) \
            if torch.cuda.is_available() else []
        archs = ";".join(f"{a}.{b}" for a, b in caps) or DEFAULT_CUDA_ARCHS
    return home, archs, f"CUDA part with nvcc from {home}, archs {archs}"


def _c_string(text: str) -> str:
    """A C string literal for a -D flag, through ninja and /bin/sh (cpp_extension's JIT
    path quotes nothing): characters outside a safe set become ``_``."""
    return "'\"" + re.sub(r"[^A-Za-z0-9 _.,;:=()+/\-]", "_", text) + "\"'"


def typical_seconds(cuda: bool) -> str:
    """What the build usually takes, for the announcement (measured: 2 cores, g++ 13)."""
    cores = os.cpu_count() or 1
    if cuda:
        return "10-30 minutes"
    return "about 1-2 minutes" if cores >= 4 else "about 2-4 minutes"


# --------------------------------------------------------------------------------- build


def _progress(stop: threading.Event, folder: Path, total: int, started: float, file) -> None:
    """Compiled/total sources and the elapsed time, until ``stop``: one updating line on a
    terminal, a line every 15 s otherwise."""
    tty = hasattr(file, "isatty") and file.isatty()
    spinner, i, last_line = "|/-\\", 0, 0.0
    while not stop.wait(0.5 if tty else 1.0):
        done = sum(1 for p in folder.glob("*.o")) if folder.is_dir() else 0
        elapsed = time.monotonic() - started
        text = f"fusedlayers: compiling {min(done, total)}/{total} sources, {elapsed:.0f} s"
        if tty:
            i += 1
            print(f"\r{spinner[i % 4]} {text}  ", end="", file=file, flush=True)
        elif elapsed - last_line >= 15:
            last_line = elapsed
            print(text, file=file, flush=True)
    if tty:
        print("\r" + " " * 60 + "\r", end="", file=file, flush=True)


def build(cuda: Optional[bool] = False, force: bool = False, file=None) -> Path:
    """Compiles the extension for the installed torch into the cache (unless a finished
    build is there) and returns the path of its binary. ``cuda``: False builds the CPU part
    only (the first-use build), None adds the CUDA part where nvcc is found, True requires
    it. ``force`` rebuilds even a finished entry. Announces itself and shows progress on
    ``file`` (stderr). Raises :class:`BuildError` with the compiler's last lines."""
    from filelock import FileLock, Timeout  # a dependency of torch

    file = file or sys.stderr
    root = source_dir()
    cuda_home, archs, note = _cuda_plan(cuda)
    variant = "cpu" if cuda_home is None else f"cuda-{_arch_tag(archs)}"
    final = entry(variant, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"fusedlayers: waiting for another process that is building the C++ extension into {final}",
              file=file, flush=True)
        lock.acquire()
    try:
        if (final / "build.json").is_file() and (final / LIB).is_file() and not force:
            return final / LIB
        srcs = sources(root, cuda=cuda_home is not None)
        import torch

        print(f"fusedlayers: building its C++ extension for torch {torch.__version__} ({note}; "
              f"{len(srcs)} sources, {typical_seconds(cuda_home is not None)}, once per torch version) "
              f"into {final}", file=file, flush=True)
        work = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        env = dict(os.environ)
        # ninja and the compiler must be found even when the venv is not activated.
        bindirs = [os.path.dirname(sys.executable)]
        try:
            import ninja  # the ninja wheel, a dependency of fusedlayers

            bindirs.insert(0, ninja.BIN_DIR)
        except (ImportError, AttributeError):
            pass
        env["PATH"] = os.pathsep.join(bindirs + [env.get("PATH", "")])
        if cuda_home:
            env["CUDA_HOME"], env["TORCH_CUDA_ARCH_LIST"] = cuda_home, archs
        spec = {"sources": srcs, "include": str(root), "cuda": cuda_home is not None, "archs": archs or "",
                "note": note}
        (work / "spec.json").write_text(json.dumps(spec))
        started = time.monotonic()
        stop = threading.Event()
        ticker = threading.Thread(target=_progress, args=(stop, work, len(srcs), started, file), daemon=True)
        ticker.start()
        try:
            rc = _compile(work, env)
        except BaseException:  # Ctrl-C, ...: no half-built folder left behind
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            stop.set()
            ticker.join()
        seconds = time.monotonic() - started
        if rc != 0 or not (work / LIB).is_file():
            text = (work / "build.log").read_text(errors="replace")
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            final.mkdir(parents=True, exist_ok=True)
            (final / "failed.log").write_text(text)
            shutil.rmtree(work, ignore_errors=True)
            tail = "\n".join(text.strip().splitlines()[-25:])
            raise BuildError(f"building fusedlayers' C++ extension failed after {seconds:.0f} s "
                             f"(log: {final / 'failed.log'}):\n{tail}")
        (work / "build.json").write_text(json.dumps({
            "torch": _torch_tag(), "python": platform.python_version(), "machine": platform.machine(),
            "variant": variant, "note": note, "seconds": round(seconds, 1), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        }, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)  # atomic: a reader sees no entry or a finished one
        print(f"fusedlayers: built in {seconds:.0f} s", file=file, flush=True)
        return final / LIB
    finally:
        lock.release()


def _compile(work: Path, env: dict) -> int:
    """Runs the worker (a child process) that compiles ``work/_C.so`` from ``work/spec.json``,
    its output into ``work/build.log``; returns its exit status."""
    with open(work / "build.log", "w") as log:
        # Run as a file, not `-m fusedlayers.build` (which would import fusedlayers and load
        # a binary), and through -c so that this file's folder is not on sys.path.
        code = ("import runpy, sys; sys.argv = ['build.py', '--worker', sys.argv[1]]; "
                f"runpy.run_path({os.path.abspath(__file__)!r}, run_name='__main__')")
        return subprocess.call([sys.executable, "-c", code, str(work)], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=str(work))


def built_info(binary: Path) -> dict:
    try:
        return json.loads((binary.parent / "build.json").read_text())
    except (OSError, ValueError):
        return {}


# -------------------------------------------------------------------------------- worker


def _worker(work: Path) -> int:
    """The child process: compiles and links ``work/_C.so`` with torch's cpp_extension, and
    loads it once (a binary that does not load is a failed build)."""
    spec = json.loads((work / "spec.json").read_text())
    from torch.utils import cpp_extension

    cxx = ["-O3", "-fopenmp", f"-DFUSEDLAYERS_WITH_CUDA={1 if spec['cuda'] else 0}"]
    if spec["cuda"]:
        cxx.append(f"-DFUSEDLAYERS_CUDA_ARCHS={_c_string(spec['archs'])}")
    else:
        cxx.append(f"-DFUSEDLAYERS_NO_CUDA_REASON={_c_string(spec['note'] + ' (built on first use)')}")
    cpp_extension.load(
        name="_C",
        sources=spec["sources"],
        extra_cflags=cxx,
        extra_cuda_cflags=["-O3", f"-DFUSEDLAYERS_WITH_CUDA={1 if spec['cuda'] else 0}"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[spec["include"]],
        build_directory=str(work),
        with_cuda=spec["cuda"],
        is_python_module=True,
        verbose=True,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(Path(sys.argv[2])))
    sys.exit("usage: fusedlayers build (this file is run by it with --worker)")
