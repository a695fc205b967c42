"""The benchmark suite: its work formulas, and a quick run that writes its files."""

import json

import pytest
import torch

from fusedlayers.benchmarks import core, suite


def test_attention_flops():
    # 4·B·H·Nq·Nk·D forward: QKᵀ and PV are 2·Nq·Nk·D each
    assert core.attention_flops(1, 1, 1024, 1024, 64, False, "fwd") == 4 * 1024 * 1024 * 64
    assert core.attention_flops(2, 3, 5, 7, 11, True, "fwd") == 2 * 2 * 3 * 5 * 7 * 11
    assert core.attention_flops(2, 3, 5, 7, 11, False, "bwd") == 2.5 * 4 * 2 * 3 * 5 * 7 * 11
    assert core.attention_flops(2, 3, 5, 7, 11, False, "fwd+bwd") == 3.5 * 4 * 2 * 3 * 5 * 7 * 11


def test_norm_bytes():
    m, n = 8, 16
    # layer_norm fwd: read x, write y (2 bytes each), read w and b, write mean and rstd
    assert core.norm_bytes(m, n, 2, "fwd", weight_bytes=2, bias=True) == 2 * m * n * 2 + 2 * n * 2 + 8 * m
    # add + prenorm fwd: read x and r, write y and z
    assert core.norm_bytes(m, n, 2, "fwd", residual=True, prenorm=True) == 4 * m * n * 2 + 8 * m
    # bwd: read dy, saved input; write dx; (+ dz read, dresidual write with prenorm and residual)
    assert core.norm_bytes(m, n, 4, "bwd") == 3 * m * n * 4 + 8 * m
    assert core.norm_bytes(m, n, 4, "bwd", residual=True, prenorm=True) == 5 * m * n * 4 + 8 * m
    assert core.norm_bytes(m, n, 4, "fwd+bwd") == core.norm_bytes(m, n, 4, "fwd") + core.norm_bytes(m, n, 4, "bwd")


def test_quick_run_checks_times_and_writes_files(tmp_path):
    report = suite.run(("attention", "layer_norm"), quick=True, device=torch.device("cpu"))
    timed = [r for r in report.results if r.ms is not None]
    assert {r.op for r in timed} == {"attention", "layer_norm"}
    assert {r.impl for r in timed} >= {"fusedlayers[reference]", "torch.sdpa[math]", "torch"}
    assert all(r.rate > 0 and not r.note for r in timed)
    paths = report.save(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["env"]["threads"] == torch.get_num_threads() and data["env"]["torch"] == torch.__version__
    assert "| case |" in (tmp_path / "results.md").read_text()
    if pytest.importorskip("matplotlib"):
        assert any(p.suffix == ".png" for p in paths)


def test_measure_all_interleaves_the_competitors():
    """One call of each per round, the first of a round rotating, and a median per name."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = core.measure_all(fns, torch.device("cpu"), quick=True)
    assert set(times) == set("abc") and all(t >= 0 for t in times.values())
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(calls) % 3 == 0 and len(rounds) >= 3
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds[:3]] == ["a", "b", "c"]


def test_a_wrong_implementation_is_reported_not_timed():
    impl = suite.Impl("broken", True, lambda x, r, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],)) + 0.1)
    report = core.Report({})
    x = torch.randn(4, 8, requires_grad=True)
    suite._time_modes(report, "layer_norm", {"rows": 4}, torch.float32, [impl],
                      lambda: ((x, None, None, None), torch.randn(4, 8)),
                      lambda x, r, w, b: torch.nn.functional.layer_norm(x, (8,)), lambda mode: 1.0, "GB/s",
                      torch.device("cpu"), True, ("fwd",), None)
    (result,) = report.results
    assert result.ms is None and result.note.startswith("WRONG")


def test_encoder_step_pairs_compares_a_swapped_encoder():
    """The training-step comparison checks the swapped encoder against torch's before it times anything."""
    rows, setup = suite.encoder_step_pairs(d_model=64, layers=1, seq=24, batch=2, pairs=1, steps=1)
    assert [r["dtype"] for r in rows] == ["float32", "bf16 autocast"]
    assert all(r["ours_ms"] > 0 and r["torch_ms"] > 0 for r in rows)
    assert setup["lengths"] == [24, 21] and setup["swapped"], setup
