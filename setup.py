"""Build script of fusedlayers: the package layout and the optional C++/CUDA extension.

Package layout: ``fusedlayers/`` is the public API; the top-level folders ``kernels/`` and
``transformer/`` install as ``fusedlayers.kernels`` and ``fusedlayers.transformer``
(``package_dir``); no top-level ``kernels`` or ``transformer`` module is installed.

Extension: one module, ``fusedlayers._C``, built from ``csrc/`` with torch's
``BuildExtension`` (ninja when available). Its ops are registered with the dispatcher
(``torch.ops.fusedlayers.*``); the module itself is empty. Sources are found by globbing:

* ``csrc/**/*.cpp`` except ``*_cuda.cpp``: the CPU part, always built (g++, ``-O3 -fopenmp``).
* ``csrc/**/*.cu`` and ``csrc/**/*_cuda.cpp``: the CUDA part, built when torch is a CUDA
  build and nvcc is found, or always with ``FUSEDLAYERS_FORCE_CUDA=1``.

The extension is optional here: when it cannot be built (no torch in the build
environment, a compiler error, ...) the install still succeeds without ``_C`` and the
reason is printed (pip shows it only with ``-v``). Torch is not a build requirement in
``pyproject.toml``, so an isolated build (``pip install .``, ``python -m build``) has no
torch and builds no extension: the package then compiles the same sources on first use
against whatever torch is installed (``fusedlayers/build.py``). The sources ship in every
wheel and sdist as ``fusedlayers/_csrc`` for that. ``pip install --no-build-isolation .``
next to an installed torch builds ``_C`` here, ahead of time (CI and developers).

What was built is baked into the binary as C macros and reported by
``torch.ops.fusedlayers._ext_info()``, e.g. ``"cpu,cuda(archs=8.0)"`` or
``"cpu; cuda: nvcc not found"``.

Environment variables:

``FUSEDLAYERS_NO_EXT=1``
    Build no extension at all (pure-Python install).
``FUSEDLAYERS_NO_CUDA=1``
    Build only the CPU part of the extension (fast: one C++ translation unit).
``FUSEDLAYERS_FORCE_CUDA=1``
    Build the CUDA part even when torch sees no GPU; failing to find nvcc / CUDA_HOME, or
    failing to compile, is then an error.
``FUSEDLAYERS_REQUIRE_EXT=1``
    Failing to build the extension is an error (instead of installing without ``_C``).
``FUSEDLAYERS_PTXAS_VERBOSE=1``
    Pass ``-Xptxas -v`` to nvcc (registers, spills, shared memory of each kernel).
``CUDA_HOME`` / ``CUDA_PATH``
    The CUDA toolkit root (the folder holding ``bin/nvcc`` and ``lib64/libcudart.so``).
    When unset, torch's guess (the parent of the folder of the ``nvcc`` on ``PATH``) is
    used if it holds both; else the root that the ``nvcc`` on ``PATH`` reports (it may be a
    wrapper script); else ``/usr/local/cuda``.
``TORCH_CUDA_ARCH_LIST``
    Architectures to compile for; default ``"8.0"`` (sm_80 code also runs on sm_90).
``MAX_JOBS``
    Parallel compile jobs of ninja (torch's default: CPU count + 2).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_namespace_packages, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Import package -> source folder (relative to this file, as setuptools requires).
PACKAGE_DIR = {
    "fusedlayers": "fusedlayers",
    "fusedlayers.kernels": "kernels",
    "fusedlayers.transformer": "transformer",
    "fusedlayers.benchmarks": "benchmarks",
    # The C++/CUDA sources as package data, for the first-use build (fusedlayers/build.py).
    "fusedlayers._csrc": "csrc",
}
PACKAGE_DATA = {"fusedlayers._csrc": ["*.cpp", "*.h", "**/*.cpp", "**/*.cu", "**/*.h", "**/*.cuh"]}

DEFAULT_CUDA_ARCHS = "8.0"
EXT_NAME = "fusedlayers._C"


def _packages() -> list[str]:
    """The mapped packages plus every subpackage found below their folders."""
    packages = []
    for package, folder in PACKAGE_DIR.items():
        packages.append(package)
        # The source folders (no __init__.py) are data packages: listed, so setuptools ships them.
        find = find_namespace_packages if package in PACKAGE_DATA else find_packages
        for sub in find(where=os.path.join(ROOT, folder)):
            packages.append(f"{package}.{sub}")
    return sorted(set(packages))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(message: str) -> None:
    # stderr: pip shows it with -v (and always when the build fails).
    print(f"fusedlayers setup: {message}", file=sys.stderr, flush=True)


def _c_string(text: str) -> str:
    """``text`` as a C string literal that survives every layer of quoting on the way to
    the compiler: torch's shlex.quote, ninja (where ``$`` is special), /bin/sh, and the
    plain argv of the non-ninja path. Characters outside a safe set become ``_``."""
    return '"' + re.sub(r"[^A-Za-z0-9 _.,;:=()+/\-]", "_", text) + '"'


def _sources(cuda: bool) -> list[str]:
    """Sources relative to this file, sorted; ``cuda`` selects the CUDA-only ones."""
    paths = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    paths += glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    out = []
    for path in sorted(paths):
        is_cuda = path.endswith(".cu") or path.endswith("_cuda.cpp")
        if is_cuda == cuda:
            out.append(os.path.relpath(path, ROOT))
    return out


# --------------------------------------------------------------------------- CUDA_HOME


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "lib64", "libcudart.so")
    )


def _toolkit_of_nvcc_on_path() -> str | None:
    """The toolkit root the ``nvcc`` on PATH really uses (it may be a wrapper script, so
    torch's ``dirname(dirname(which nvcc))`` can be wrong): ``TOP=`` of a dry run."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(match.group(1).strip()) if match else None


def _resolve_cuda_home() -> tuple[str | None, str]:
    """(CUDA_HOME or None, how it was found or why not). Does not import cpp_extension."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if os.path.isfile(os.path.join(home, "bin", "nvcc")):
                return home, f"{var}={home}"
            return None, f"{var}={home} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    torch_guess = os.path.dirname(os.path.dirname(nvcc)) if nvcc else "/usr/local/cuda"
    if _is_toolkit(torch_guess):
        return torch_guess, f"torch's guess {torch_guess}"
    top = _toolkit_of_nvcc_on_path()
    if _is_toolkit(top):
        return top, f"root reported by {nvcc} (torch would guess {torch_guess})"
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", f"/usr/local/cuda (torch would guess {torch_guess})"
    if nvcc is None:
        return None, "nvcc not found"
    return None, f"nvcc at {nvcc} but no toolkit with bin/nvcc and lib64/libcudart.so; set CUDA_HOME"


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


# --------------------------------------------------------------------------- extension


class _Skip(Exception):
    """The extension (or its CUDA part) is not built; the message says why."""


def _fail(message: str) -> None:
    raise SystemExit(f"fusedlayers setup: error: {message}")


def _cuda_plan(torch) -> tuple[str | None, str]:
    """(CUDA_HOME to build the CUDA part with, or None; why / how)."""
    forced = _env_flag("FUSEDLAYERS_FORCE_CUDA")
    if _env_flag("FUSEDLAYERS_NO_CUDA"):
        if forced:
            _fail("FUSEDLAYERS_NO_CUDA=1 and FUSEDLAYERS_FORCE_CUDA=1 contradict each other")
        return None, "FUSEDLAYERS_NO_CUDA=1"
    if getattr(torch.version, "hip", None):
        reason = f"torch {torch.__version__} is a ROCm build"
        if forced:
            _fail(f"FUSEDLAYERS_FORCE_CUDA=1 but {reason}")
        return None, reason
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
        if forced:
            _fail(f"FUSEDLAYERS_FORCE_CUDA=1 but {reason}")
        return None, reason
    cuda_home, how = _resolve_cuda_home()
    if cuda_home is None:
        if forced:
            _fail(f"FUSEDLAYERS_FORCE_CUDA=1 but no CUDA toolkit: {how}")
        return None, how
    nvcc_version = _nvcc_version(cuda_home)
    if nvcc_version and nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0] and not forced:
        # torch's BuildExtension would raise on this before building anything.
        return None, f"nvcc {nvcc_version} in {cuda_home} vs torch CUDA {torch.version.cuda}"
    return cuda_home, f"CUDA_HOME from {how}, nvcc {nvcc_version}"


def _extension():
    """(ext_modules, cmdclass) for setup(); empty when no extension is built."""
    require = _env_flag("FUSEDLAYERS_REQUIRE_EXT") or _env_flag("FUSEDLAYERS_FORCE_CUDA")
    if _env_flag("FUSEDLAYERS_NO_EXT"):
        if require:
            _fail("FUSEDLAYERS_NO_EXT=1 contradicts FUSEDLAYERS_REQUIRE_EXT/FORCE_CUDA")
        _say("FUSEDLAYERS_NO_EXT=1: building no C++/CUDA extension")
        return [], {}
    try:
        import torch
    except ImportError as exc:
        reason = (
            f"torch is not importable in the build environment ({exc}); fusedlayers compiles its "
            "extension on first use instead (or: install torch first and use pip's --no-build-isolation)"
        )
        if require:
            _fail(reason)
        _say(f"building no C++/CUDA extension: {reason}")
        return [], {}

    cuda_home, cuda_note = _cuda_plan(torch)
    archs = None
    if cuda_home is not None:
        # torch.utils.cpp_extension reads both at import time / build time.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch.utils.cpp_extension as cpp  # only now: it freezes CUDA_HOME on import

    def make(cuda_home, cuda_note):
        cxx = ["-O3", "-fopenmp"]
        nvcc = ["-O3"]
        macros = [("FUSEDLAYERS_WITH_CUDA", "1" if cuda_home else "0")]
        # String macros go to the C++ compiler only (ext.cpp reads them). The quotes survive
        # torch's shlex.quote + ninja + /bin/sh, and the plain argv of the non-ninja path;
        # _c_string keeps out what ninja or C would interpret ($, backslash, quotes).
        if cuda_home:
            cxx.append(f"-DFUSEDLAYERS_CUDA_ARCHS={_c_string(archs)}")
        else:
            cxx.append(f"-DFUSEDLAYERS_NO_CUDA_REASON={_c_string(cuda_note)}")
        if _env_flag("FUSEDLAYERS_PTXAS_VERBOSE"):
            nvcc += ["-Xptxas", "-v"]
        common = dict(
            name=EXT_NAME,
            define_macros=macros,
            extra_link_args=["-fopenmp"],
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
        if cuda_home:
            return cpp.CUDAExtension(
                sources=_sources(cuda=False) + _sources(cuda=True),
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                **common,
            )
        return cpp.CppExtension(sources=_sources(cuda=False), extra_compile_args={"cxx": cxx}, **common)

    ext = make(cuda_home, cuda_note)
    if cuda_home:
        _say(f"building {EXT_NAME} with CUDA ({cuda_note}, TORCH_CUDA_ARCH_LIST={archs})")
    else:
        _say(f"building {EXT_NAME} CPU-only: {cuda_note}")
    # setuptools skips a failed optional extension; _BuildExt makes that also hold for
    # torch's errors (ninja raises RuntimeError, which setuptools does not filter). A failed
    # optional CUDA build is retried once CPU-only before giving up on _C.
    ext.optional = not require
    if cuda_home and ext.optional:
        ext.cpu_fallback = make(None, "the CUDA part failed to compile")
        ext.cpu_fallback.optional = True
    return [ext], {"build_ext": _build_ext_class(cpp.BuildExtension)}


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else "..." + text[-2000:]


def _build_ext_class(base):
    class BuildExt(base):
        """torch's BuildExtension, where a failing optional extension is skipped."""

        def build_extensions(self):
            try:
                super().build_extensions()
                return
            except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, OSError, ...
                if not all(ext.optional for ext in self.extensions):
                    raise
                error = exc
            fallback = [getattr(ext, "cpu_fallback", None) for ext in self.extensions]
            if all(fallback):
                _say(f"building with CUDA failed ({_short(error)}); retrying CPU-only")
                for ext, cpu in zip(self.extensions, fallback):
                    # Mutate in place: build_ext.finalize_options put private state on ext.
                    del ext.cpu_fallback
                    for attr, value in vars(cpu).items():
                        if not attr.startswith("_"):
                            setattr(ext, attr, value)
                # Undo torch's monkey-patching of the compiler before it patches again.
                for attr in ("compile", "_compile"):
                    self.compiler.__dict__.pop(attr, None)
                try:
                    super().build_extensions()
                    return
                except Exception as exc:  # noqa: BLE001
                    error = exc
            for ext in self.extensions:
                self._remove_stale(ext)
            _say(
                f"building the optional extension failed, installing without it: {_short(error)}"
                "\n(set FUSEDLAYERS_REQUIRE_EXT=1 to make this an error)"
            )

        def _remove_stale(self, ext):
            # A _C left by an earlier successful build must not be installed, nor stay in
            # the source tree of an editable install, beside sources it was not built from.
            paths = [self.get_ext_fullpath(ext.name)]
            if getattr(self, "editable_mode", False):
                build_py = self.get_finalized_command("build_py")
                package = ".".join(ext.name.split(".")[:-1])
                filename = os.path.basename(self.get_ext_filename(ext.name))
                paths.append(os.path.join(build_py.get_package_dir(package), filename))
            for path in paths:
                if os.path.isfile(path):
                    _say(f"removing stale {path}")
                    os.remove(path)

    return BuildExt


ext_modules, cmdclass = _extension()

setup(
    packages=_packages(),
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
