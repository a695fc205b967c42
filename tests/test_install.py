"""Where fusedlayers._C comes from: prebuilt by setup.py, a cached first-use build, or a
first-use build on the first CPU op call (fusedlayers._ext, fusedlayers.build).

Each scenario runs in a child process with its own build cache, where the prebuilt ``_C``
is hidden (or made to fail to load as a binary built against another torch does). The
compiler is replaced by a copy of this checkout's prebuilt binary (built with the same
module name), so these tests take seconds; the real compile is the slow test at the end
and the CI step that installs the package the way a user does.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fusedlayers import _ext, build

needs_prebuilt = pytest.mark.skipif(
    not (_ext.SOURCE or "").startswith("prebuilt"), reason=f"needs the prebuilt fusedlayers._C ({_ext.ERROR})")

# Child-process prelude: hide the prebuilt binary ("missing") or make it fail to load like a
# binary built against another torch ("stale"), and replace the compiler by a copy of the
# prebuilt binary that records each call (FAKE_COMPILE_LOG) and takes FAKE_COMPILE_SECONDS.
PRELUDE = """
import os, shutil, sys, time, importlib.abc
PREBUILT = {prebuilt!r}
if {mode!r} == "missing":
    sys.modules["fusedlayers._C"] = None
else:
    class _Stale(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fusedlayers._C":
                raise ImportError(PREBUILT + ": undefined symbol: _ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")
    sys.meta_path.insert(0, _Stale())
import fusedlayers.build as _build

def _fake_compile(work, env):
    time.sleep(float(os.environ.get("FAKE_COMPILE_SECONDS", "0")))
    with open(os.environ["FAKE_COMPILE_LOG"], "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    if os.environ.get("FAKE_COMPILE_FAIL"):
        (work / "build.log").write_text("error: something did not compile")
        return 1
    (work / "attention_cpu.o").write_bytes(b"")
    shutil.copy(PREBUILT, work / "_C.so")
    return 0

_build._compile = _fake_compile
_log = os.environ["FAKE_COMPILE_LOG"]
_compiles_before = len(open(_log).read().split()) if os.path.exists(_log) else 0
"""


def _run(tmp_path, body: str, mode: str = "missing", env=None, check=True):
    code = PRELUDE.format(prebuilt=sys.modules["fusedlayers._C"].__file__, mode=mode) + textwrap.dedent(body)
    script = tmp_path / f"child_{abs(hash(body))}.py"
    script.write_text(code)
    full_env = dict(os.environ, FUSEDLAYERS_BUILD_CACHE=str(tmp_path / "cache"),
                    FAKE_COMPILE_LOG=str(tmp_path / "compiles.log"), **(env or {}))
    full_env.pop("FUSEDLAYERS_NO_BUILD", None)
    full_env.update(env or {})
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=full_env, timeout=300,
                         cwd=tmp_path)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def _compiles(tmp_path) -> int:
    log = tmp_path / "compiles.log"
    return len(log.read_text().split()) if log.exists() else 0


CPU_CALL = """
import torch, fusedlayers
from fusedlayers import _ext, dispatch
from fusedlayers.testing import attention_call_for, AttentionCase
print("PENDING", _ext.PENDING)
x = torch.randn(4, 32)
y = fusedlayers.layer_norm(x)
torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (32,)))
call = attention_call_for(AttentionCase(b=1, hq=2, hkv=2, nq=8, nk=8, d=16), torch.float32, torch.device("cpu"))
print("SOURCE", _ext.SOURCE)
print("AUTO", dispatch.select("attention", call))
"""


@needs_prebuilt
def test_first_cpu_op_builds_loads_and_serves(tmp_path):
    """No binary: import and ``fusedlayers info`` build nothing; the first CPU op call
    builds (announced, with progress), loads it, and auto then picks the cpu backend. The
    next process loads the cached build without compiling."""
    first = _run(tmp_path, """
from fusedlayers import cli
cli.main(["info"])
""" + CPU_CALL)
    assert "binary: none loaded" in first.stdout and "cpu once the first-use build has run" in first.stdout
    assert "PENDING True" in first.stdout
    assert "fusedlayers: building its C++ extension for torch" in first.stderr
    assert "fusedlayers: built in" in first.stderr
    assert "SOURCE built on first use" in first.stdout and "AUTO cpu" in first.stdout
    assert _compiles(tmp_path) == 1
    second = _run(tmp_path, CPU_CALL)
    assert "PENDING False" in second.stdout and "AUTO cpu" in second.stdout
    assert "building" not in second.stderr
    assert _compiles(tmp_path) == 1
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].name.endswith("-cpu")
    meta = json.loads((entries[0] / "build.json").read_text())
    assert meta["variant"] == "cpu" and meta["torch"].startswith("torch")


@needs_prebuilt
def test_stale_prebuilt_is_ignored_with_its_reason(tmp_path):
    """A prebuilt _C that does not load (built against another torch) is ignored, the reason
    kept; with FUSEDLAYERS_NO_BUILD=1 no first-use build replaces it."""
    run = _run(tmp_path, CPU_CALL + """
print("IGNORED", _ext.IGNORED)
print("ERROR", _ext.ERROR)
""", mode="stale", env={"FUSEDLAYERS_NO_BUILD": "1"})
    assert "IGNORED the prebuilt fusedlayers._C failed to load" in run.stdout
    assert "undefined symbol" in run.stdout and "FUSEDLAYERS_NO_BUILD=1" in run.stdout
    assert "PENDING False" in run.stdout and "AUTO reference" in run.stdout
    assert _compiles(tmp_path) == 0


@needs_prebuilt
def test_concurrent_first_uses_build_once(tmp_path):
    """Four processes (the ranks of a torchrun) start the build at once: one compiles, the
    others wait on the lock and load its result."""
    # build.py alone (stdlib, torch, filelock), loaded by path: the ranks skip importing fusedlayers.
    code = PRELUDE.format(prebuilt=sys.modules["fusedlayers._C"].__file__, mode="missing")
    code = code.replace("import fusedlayers.build as _build", textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("flbuild", {build.__file__!r})
        _build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_build)
    """))
    # A barrier: every rank has started before any asks for the build.
    code += textwrap.dedent(f"""
        open(os.path.join({str(tmp_path)!r}, f"ready-{{os.getpid()}}"), "w").close()
        while len([n for n in os.listdir({str(tmp_path)!r}) if n.startswith("ready-")]) < 4:
            time.sleep(0.05)
        print('PATH', _build.build(cuda=False))
    """)
    script_env = dict(os.environ, FUSEDLAYERS_BUILD_CACHE=str(tmp_path / "cache"),
                      FAKE_COMPILE_LOG=str(tmp_path / "compiles.log"), FAKE_COMPILE_SECONDS="2")
    (tmp_path / "rank.py").write_text(code)
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=script_env, cwd=tmp_path) for _ in range(4)]
    outs = [r.communicate(timeout=300) for r in ranks]
    assert all(r.returncode == 0 for r in ranks), outs
    paths = {line for out, _ in outs for line in out.splitlines() if line.startswith("PATH")}
    assert len(paths) == 1
    assert _compiles(tmp_path) == 1
    waits = [err for _, err in outs if "waiting for another process that is building" in err]
    assert len(waits) == 3, [err for _, err in outs]  # the ranks that waited said so
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


@needs_prebuilt
def test_failed_build_is_reported_and_not_retried_on_every_start(tmp_path):
    first = _run(tmp_path, CPU_CALL, env={"FAKE_COMPILE_FAIL": "1"})
    assert "AUTO reference" in first.stdout
    assert "the first-use build failed" in first.stderr and "something did not compile" in first.stderr
    # The next process does not retry; `fusedlayers build` does (here with a compiler that works).
    second = _run(tmp_path, CPU_CALL + """
assert _compiles_before == 1
os.environ.pop("FAKE_COMPILE_FAIL")
from fusedlayers import cli
assert cli.main(["build", "--cpu-only"]) == 0
print("SOURCE", _ext.SOURCE)
print("AUTO", dispatch.select("attention", call))
""", env={"FAKE_COMPILE_FAIL": "1"})
    lines = second.stdout.splitlines()
    assert "PENDING False" in lines and lines.index("AUTO reference") < lines.index("AUTO cpu")
    assert "SOURCE built on first use" in second.stdout and _compiles(tmp_path) == 2


def test_cache_key_follows_the_sources(tmp_path):
    src = build.source_dir()
    copy = tmp_path / "csrc"
    for path in src.rglob("*"):
        if path.is_file() and path.suffix in build.SOURCE_SUFFIXES:
            target = copy / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    assert build.base_key(copy) == build.base_key(src)
    with open(copy / "ext.cpp", "a") as f:
        f.write("\n// edited\n")
    assert build.base_key(copy) != build.base_key(src)
    import torch

    assert f"torch{torch.__version__}" in build.base_key(src)


def test_build_cli_rejects_contradicting_flags(capsys):
    from fusedlayers import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["build", "--cpu-only", "--cuda"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_real_first_use_build(tmp_path):
    """The real compile (minutes): a cached build for this torch that loads and serves."""
    body = """
        import torch, fusedlayers
        from fusedlayers import _ext, build
        build._compile = _real_compile
        x = torch.randn(4, 32)
        torch.testing.assert_close(fusedlayers.layer_norm(x), torch.nn.functional.layer_norm(x, (32,)))
        print("SOURCE", _ext.SOURCE, _ext.INFO)
    """
    code = PRELUDE.replace("_build._compile = _fake_compile", "_real_compile = _build._compile")
    code = code.format(prebuilt=sys.modules["fusedlayers._C"].__file__, mode="missing") + textwrap.dedent(body)
    (tmp_path / "real.py").write_text(code)
    run = subprocess.run([sys.executable, str(tmp_path / "real.py")], capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, FUSEDLAYERS_BUILD_CACHE=str(tmp_path / "cache")), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "SOURCE built on first use" in run.stdout and "cpu; cuda: CPU part only" in run.stdout
