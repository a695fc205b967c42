"""The command line: `fusedlayers info` and `fusedlayers verify`, as a user runs them."""

import os
import subprocess
import sys

import torch

import fusedlayers


def _run(*args, cache="/nonexistent-fusedlayers-cache"):
    env = {**os.environ, "FUSEDLAYERS_CACHE": str(cache)}  # never the user's own record
    return subprocess.run([sys.executable, "-m", "fusedlayers", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def test_info_lists_versions_extension_and_every_backend():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert f"fusedlayers {fusedlayers.__version__}" in r.stdout and "torch " in r.stdout
    assert "extension fusedlayers._C:" in r.stdout
    for name in fusedlayers.BACKENDS:
        assert f"    {name}" in r.stdout
    assert "auto -> " in r.stdout


def test_verify_quick_passes_and_prints_a_table(tmp_path):
    r = _run("verify", "--quick", "--backend", "reference", cache=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all passed" in r.stdout
    assert "attention  reference  float32" in r.stdout and "norm       reference  bfloat16" in r.stdout
    info = _run("info", cache=tmp_path)
    assert "correctness: verified on " in info.stdout and "all passed" in info.stdout


def test_verify_fails_on_a_wrong_kernel(monkeypatch, tmp_path):
    """A kernel off by a little (32 ulps at 1.0 on one output element) must fail verification."""
    from types import SimpleNamespace

    from fusedlayers import dispatch, reference_backend, verify

    ref = reference_backend.attention

    def forward(*args):
        out, lse = ref.forward(*args)
        out = out.clone()
        out.view(-1)[7] += 32 * torch.finfo(out.dtype).eps
        return out, lse

    broken = SimpleNamespace(**{**vars(ref), "forward": forward})
    monkeypatch.setitem(dispatch._IMPLS, ("attention", "cuda"), (broken, None))
    monkeypatch.setenv("FUSEDLAYERS_CACHE", str(tmp_path))
    assert verify.main("quick", ["cuda"]) == 1
    rows = verify.read_records()["cpu"]["rows"]
    assert [r["op"] for r in rows if r["failures"]] == ["attention"] * 3  # every dtype caught it
    assert "FAILURES" in verify.summary("cpu")
