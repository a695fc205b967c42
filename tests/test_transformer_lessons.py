"""Every lesson runs end to end on tiny settings, prints its explanation and writes its figure.

The lessons share one output folder, so the trained models are reused the way a user running
them in a row reuses them (translate: attention, order, generate; mlm: mlm, pretrain-finetune,
probe). One lesson also runs through the command line.
"""

import pytest

from fusedlayers.transformer import lessons


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("lessons")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(lessons.LESSONS))
def test_lesson_runs_and_writes_its_figure(name, out, capsys):
    result = lessons.run(name, out=str(out), steps=15, quiet=True, quick=True)
    text = capsys.readouterr().out
    figure = out / f"{name}.png"
    assert figure.exists() and figure.stat().st_size > 5000
    assert f"Figure: {figure}" in text and len(text.splitlines()) >= 5
    assert result[name]


def test_lesson_command_line(tmp_path, capsys):
    from fusedlayers.cli import main

    assert main(["lesson", "parallel", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert "Parallel:" in capsys.readouterr().out and (tmp_path / "parallel.png").exists()
    with pytest.raises(SystemExit):
        main(["lesson", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_unknown_lesson_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown lesson 'nope'"):
        lessons.run("nope")


def test_probe_command_on_a_checkpoint(out, tmp_path, capsys):
    """``fusedlayers probe --checkpoint``: after the lessons above, out/models/mlm holds one."""
    from fusedlayers.cli import main

    ckpt = out / "models" / "mlm" / "checkpoint.safetensors"
    if not ckpt.exists():
        lessons.run("mlm", out=str(out), steps=15, quiet=True)
    assert main(["probe", "--checkpoint", str(ckpt), "--out", str(tmp_path), "--threads", "1"]) == 0
    assert '"expected_layer"' in capsys.readouterr().out and (tmp_path / "probe.png").exists()
