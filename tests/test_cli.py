"""The command line: `fusedlayers info` and `fusedlayers verify`, as a user runs them."""

import subprocess
import sys

import fusedlayers


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fusedlayers", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_versions_extension_and_every_backend():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert f"fusedlayers {fusedlayers.__version__}" in r.stdout and "torch " in r.stdout
    assert "extension fusedlayers._C:" in r.stdout
    for name in fusedlayers.BACKENDS:
        assert f"    {name}" in r.stdout
    assert "auto -> " in r.stdout


def test_verify_quick_passes_and_prints_a_table():
    r = _run("verify", "--quick", "--backend", "reference")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all passed" in r.stdout
    assert "attention  reference  float32" in r.stdout and "norm       reference  bfloat16" in r.stdout
