"""Training the reference Transformer on CPU, short: the stated accuracies, pre-training pays,
bit-exact resume, DDP on gloo with torchrun, and clear errors for bad checkpoints and text.

Stated accuracies (tiny model: d_model 64, 2 layers, CPU, about a minute of training in all):
translation exact match >= 0.70 after 300 steps (about 0.9 measured); masked-token accuracy
>= 0.20 after 400 steps (always guessing the most frequent word: 0.09); fine-tuning the
grammaticality classifier from that pre-trained encoder beats random initialisation by >= 0.2
(about 0.95 vs 0.5 measured).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fusedlayers.transformer import checkpoint
from fusedlayers.transformer.data import TextTokenizer, load_text
from fusedlayers.transformer.model import ModelConfig
from fusedlayers.transformer.train import ClassifyTask, MLMTask, TrainConfig, TranslateTask, train

from conftest import torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")


def test_translation_reaches_stated_exact_match():
    r = train(TranslateTask(n_train=5000), ModelConfig(),
              TrainConfig(steps=300, batch_size=64, lr=3e-3, warmup=100, quiet=True))
    assert r["history"][-1] < r["history"][0] / 3
    assert r["metrics"]["exact_match"] >= 0.70, r["metrics"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mlm"))
    with torch_threads(1):  # a module fixture: set up before the tests' own one_thread
        r = train(MLMTask(n_train=5000), ModelConfig(),
                  TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup=100, quiet=True, out=out))
    return r, os.path.join(out, "checkpoint.safetensors")


def test_mlm_reaches_stated_masked_accuracy(pretrained):
    r, _ = pretrained
    assert r["metrics"]["masked_accuracy"] >= 0.20, r["metrics"]


def test_finetuning_from_pretrained_beats_scratch(pretrained):
    _, ckpt = pretrained
    cfg = dict(steps=100, batch_size=32, lr=1e-3, warmup=30, quiet=True, label_smoothing=0.0)
    task = ClassifyTask()
    scratch = train(task, ModelConfig(), TrainConfig(**cfg))["metrics"]["accuracy"]
    tuned = train(task, ModelConfig(), TrainConfig(init_from=ckpt, **cfg))["metrics"]["accuracy"]
    assert tuned >= scratch + 0.2, (tuned, scratch)


@pytest.mark.parametrize("task_cls", [TranslateTask, MLMTask])
def test_resume_is_bit_exact(tmp_path, task_cls):
    """6 steps straight == 3 steps, checkpoint, a fresh process state, 3 more: same weights bit
    for bit, same losses, same optimizer state. Dropout on, so the RNG state must be restored."""
    task = task_cls(n_train=500, n_test=10)
    mcfg = ModelConfig(dropout=0.1, d_model=32, n_heads=2, d_ff=48)

    def cfg(steps, out, resume=False):
        return TrainConfig(steps=steps, batch_size=8, warmup=2, quiet=True, eval=False, out=str(out), resume=resume,
                           save_every=2)

    straight = train(task, mcfg, cfg(6, tmp_path / "a"))
    train(task, mcfg, cfg(3, tmp_path / "b"))
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    resumed = train(task, mcfg, cfg(6, tmp_path / "b", resume=True))
    assert resumed["history"] == straight["history"]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta, _ = checkpoint.read(str(tmp_path / "a" / "checkpoint.safetensors"))
    tb, _ = checkpoint.read(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_checkpoint_is_written_atomically(tmp_path):
    r = train(TranslateTask(n_train=200, n_test=5), ModelConfig(d_model=32, n_heads=2),
              TrainConfig(steps=2, batch_size=4, quiet=True, eval=False, out=str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.safetensors", "summary.json"]  # no temp file left
    tensors, meta = checkpoint.read(str(tmp_path / "checkpoint.safetensors"))
    assert meta["meta"]["step"] == 2 and "rng.cpu" in tensors and any(k.startswith("optim.") for k in tensors)
    assert r["tokens_per_s"] > 0


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    model = TranslateTask(n_train=10, n_test=2).make_model(ModelConfig(d_model=32, n_heads=2))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):
        checkpoint.load(str(tmp_path / "nope.safetensors"), model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(str(bad), model)
    good = tmp_path / "good.safetensors"
    checkpoint.save(str(good), model)
    good.write_bytes(good.read_bytes()[:-100])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(str(good), model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="not a fusedlayers.transformer"):
        checkpoint.load(str(tmp_path / "other.safetensors"), model)


def test_text_loading_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="contains no text"):
        load_text(str(empty))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8.*0xe9 at offset 3"):
        load_text(str(latin))


def test_mlm_on_user_text_with_a_locally_trained_wordpiece(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the {a} cat sat on the {b} mat number {i}." for i, (a, b) in
                              enumerate([("black", "red"), ("white", "blue"), ("small", "old")] * 40)))
    tok = TextTokenizer.train(load_text(str(text)), "wordpiece", vocab_size=120)
    assert tok.encode("the cat")[:1] != [1] and tok.mask_id == 4
    tok_bpe = TextTokenizer.train(load_text(str(text)), "bpe", vocab_size=120)
    assert tok_bpe.vocab_size <= 120
    r = train(MLMTask(text=str(text), vocab_size=120), ModelConfig(d_model=32, n_heads=2),
              TrainConfig(steps=30, batch_size=16, quiet=True, out=str(tmp_path / "run")))
    assert r["history"][-1] < r["history"][0]
    assert 0.0 <= r["metrics"]["masked_accuracy"] <= 1.0


def test_cli_train_errors_are_clear(tmp_path, capsys):
    from fusedlayers.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "mlm", "--backend", "nope", "--steps", "1", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown backend 'nope'" in capsys.readouterr().err
    bad = tmp_path / "x.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    assert main(["train", "mlm", "--text", str(bad), "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "classify", "--init-from", str(tmp_path / "none.safetensors"), "--steps", "1"])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    not_ours = tmp_path / "other.safetensors"  # a safetensors file whose metadata is not ours
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(not_ours), metadata={"format": "fusedlayers.transformer/1", "meta": "{"})
    assert main(["train", "classify", "--init-from", str(not_ours), "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "other.safetensors" in capsys.readouterr().err


def test_ddp_two_processes_on_gloo_train_and_agree(tmp_path):
    """torchrun --standalone --nproc_per_node=2 on CPU: gloo, DDP; the replicas end bit-identical."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fusedlayers", "train", "translate", "--steps", "30", "--batch-size", "16",
                        "--device", "cpu", "--quiet", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_agree"] is True
    assert summary["history"][-1] < summary["history"][0]


def _tiny_checkpoint(path):
    model = torch.nn.Linear(3, 2)
    checkpoint.save(str(path), model, torch.optim.AdamW(model.parameters()), {"step": 1})
    return model


@pytest.mark.parametrize("metadata,says", [
    ({"format": checkpoint.FORMAT}, "lacks meta, param_groups"),
    ({"format": checkpoint.FORMAT, "meta": "{not json", "param_groups": "[]"}, "'meta' is not valid JSON"),
    ({"format": checkpoint.FORMAT, "meta": "[]", "param_groups": "[]"}, "must be a JSON object"),
])
def test_checkpoint_with_bad_metadata_raises_checkpoint_error_naming_the_file(tmp_path, metadata, says):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"rng.cpu": torch.get_rng_state(), "model.weight": torch.zeros(2, 3)}, str(path), metadata=metadata)
    for call in (checkpoint.read, lambda p: checkpoint.load_model(p, torch.nn.Linear(3, 2, bias=False))):
        with pytest.raises(checkpoint.CheckpointError, match=says) as e:
            call(str(path))
        assert "bad.safetensors" in str(e.value)


def test_checkpoint_interrupted_mid_write_leaves_no_temp_file_and_the_old_one_intact(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "ckpt.safetensors"
    _tiny_checkpoint(path)
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(path), torch.nn.Linear(3, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    assert path.read_bytes() == before


def test_checkpoint_save_removes_a_temp_file_left_by_a_killed_process(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt.safetensors.tmp.{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    _tiny_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    assert checkpoint.read(str(path))[1]["meta"] == {"step": 1}


def test_checkpoint_save_flushes_the_folder_after_the_rename(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to tell a folder's descriptor from a file's")
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync-dir" if os.path.isdir(
        f"/proc/self/fd/{fd}") else "fsync-file"), real_fsync(fd))[1])
    _tiny_checkpoint(tmp_path / "ckpt.safetensors")
    assert calls == ["fsync-file", "replace", "fsync-dir"]


def test_train_refuses_an_out_that_is_a_file_before_training(tmp_path):
    out = tmp_path / "a_file"
    out.write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        train(TranslateTask(), ModelConfig(d_model=16, n_heads=2), TrainConfig(steps=5, out=str(out), quiet=True))
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        train(TranslateTask(), ModelConfig(d_model=16, n_heads=2), TrainConfig(steps=-1, quiet=True))


def test_context_parallel_flag_outside_torchrun_ends_with_one_line(tmp_path, capsys):
    """--context-parallel 2 in one process: exit status 2 and the reason, before any training."""
    from fusedlayers.cli import main

    assert main(["train", "mlm", "--context-parallel", "2", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "must divide the number of processes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "mlm", "--context-parallel", "0", "--steps", "1", "--out", str(tmp_path)])
    assert e.value.code == 2
