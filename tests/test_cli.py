"""The command line: `fusedlayers info` and `fusedlayers verify`, as a user runs them."""

import os
import subprocess
import sys

import pytest
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
    for row in ("attention  reference  float32", "varlen     reference  float16", "norm       reference  bfloat16"):
        assert row in r.stdout
    info = _run("info", cache=tmp_path)
    assert "correctness: verified on " in info.stdout and "all passed" in info.stdout


@pytest.mark.parametrize("entry,op", [("forward", "attention"), ("varlen_forward", "varlen")])
def test_verify_fails_on_a_wrong_kernel(monkeypatch, tmp_path, entry, op):
    """A kernel off by a little (32 ulps at 1.0 on one output element) must fail verification,
    dense or packed."""
    from types import SimpleNamespace

    from fusedlayers import dispatch, reference_backend, verify

    ref = reference_backend.attention

    def forward(*args):
        out, lse = getattr(ref, entry)(*args)
        out = out.clone()
        out.view(-1)[7] += 32 * torch.finfo(out.dtype).eps
        return out, lse

    broken = SimpleNamespace(**{**vars(ref), entry: forward})
    monkeypatch.setitem(dispatch._IMPLS, ("attention", "cuda"), (broken, None))
    monkeypatch.setenv("FUSEDLAYERS_CACHE", str(tmp_path))
    assert verify.main("quick", ["cuda"]) == 1
    rows = verify.read_records()["cpu"]["rows"]
    assert [r["op"] for r in rows if r["failures"]] == [op] * 3  # every dtype caught it
    assert "FAILURES" in verify.summary("cpu")


# ---------------------------------------------------------------------------- flag validation

from fusedlayers.cli import PlainProgress, main  # noqa: E402


@pytest.mark.parametrize("argv,flag", [
    (["train", "mlm", "--steps", "0"], "--steps"),
    (["train", "mlm", "--steps", "-3"], "--steps"),
    (["train", "translate", "--batch-size", "0"], "--batch-size"),
    (["lesson", "attention", "--threads", "-1"], "--threads"),
    (["train", "mlm", "--device", "tpu"], "--device"),
    (["probe", "--device", "cuda:99"], "--device"),
    (["train", "mlm", "--backend", "nope"], "--backend"),
    (["train", "mlm", "--lr", "nan"], "--lr"),
    (["train", "mlm", "--dropout", "1.0"], "--dropout"),
    (["train", "mlm", "--warmup", "x"], "--warmup"),
    (["train", "classify", "--init-from", "/nonexistent/ckpt.safetensors"], "--init-from"),
    (["probe", "--checkpoint", "/nonexistent/ckpt.safetensors"], "--checkpoint"),
    (["bench", "--op", "nope"], "--op"),
    (["verify", "--backend", "nope"], "--backend"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_a_bad_flag_is_one_line_naming_it_before_any_work(argv, flag, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", [["train", "mlm"], ["lesson", "attention"], ["probe"], ["bench", "--op",
                                                                                              "layer_norm"]])
def test_out_that_is_a_file_is_refused_before_any_work(command, tmp_path, capsys):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    for out in (existing, existing / "below"):
        try:
            code = main(command + ["--out", str(out)])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and "--out" in err and str(existing) in err, err


def test_a_backend_that_cannot_serve_the_device_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "mlm", "--backend", "cuda", "--device", "cpu", "--steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--backend cuda" in err and len(err.strip().splitlines()) == 1


def test_model_shape_flags_are_checked_together(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "mlm", "--d-model", "10", "--heads", "4"])
    assert e.value.code == 2 and "--d-model (10) must be a multiple of --heads (4)" in capsys.readouterr().err


def test_bench_suite_refuses_an_unknown_op():
    from fusedlayers.benchmarks import suite

    with pytest.raises(ValueError, match="unknown 'nope'"):
        suite.run(("layer_norm", "nope"))


def test_progress_off_a_terminal_is_a_few_plain_lines(tmp_path):
    """Piped into a log, 1,500 steps are about ten lines, with no carriage return."""
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        bar = PlainProgress(total=1500, desc="mlm", file=f)
        for step in range(1500):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        bar.close()
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("mlm: 1500/1500 (100%)")


def test_training_progress_off_a_terminal_has_no_carriage_returns(capsys):
    from fusedlayers.transformer.model import ModelConfig
    from fusedlayers.transformer.train import TrainConfig, TranslateTask, train

    train(TranslateTask(), ModelConfig(d_model=16, n_heads=2, n_layers=1),
          TrainConfig(steps=3, batch_size=2, eval=False, quiet=False))
    err = capsys.readouterr().err  # captured: not a terminal
    progress = [line for line in err.splitlines() if line.startswith("translate: ")]
    assert "\r" not in err and 3 <= len(progress) <= 11, err[-2000:]
    assert progress[-1].startswith("translate: 3/3 (100%)") and "loss=" in progress[-1]
