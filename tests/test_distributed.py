"""fusedlayers.distributed and the sharded Transformer, on CPU with gloo.

Each test spawns its processes (torch.multiprocessing, OMP_NUM_THREADS=1) once and runs all
its checks inside them: ring attention forward and backward against the float64 reference
with the test method's rule (fusedlayers.testing), causal (zigzag and contiguous) and not,
GQA/MQA, key padding, fully masked rows, bf16, the reference backend, a bitwise-repeatable
deterministic backward, refusals (uneven shards, dropout, bad masks); a context-parallel
(+ FSDP2) training run whose losses match the single-process run, and a resumed sharded run
equal bit for bit to the uninterrupted one.
"""

import json
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from fusedlayers import reference, testing
from fusedlayers.testing import AttentionCase


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    """Runs fn(rank, world, port, *args) in ``world`` processes; an exception in any of them
    fails the test with its traceback."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    mp.spawn(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=True)


def _entry(rank, fn, world, port, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's threads occasionally abort it
    # ("terminate called without an active exception") after all work is done and checked.
    os._exit(0)


# ---------------------------------------------------------------------------- attention


def _check_ring(case: AttentionCase, dtype, layout: str, backend: str = "auto", empty_row: bool = False):
    """Ring attention of ``case`` (self-attention, nq == nk) against the float64 reference on
    the full tensors, by the test method's rule; every rank checks the whole gathered result."""
    from fusedlayers import distributed as fd

    q, k, v, mask, dout, dlse = testing.make_attention_inputs(case, dtype, "cpu")
    if empty_row:  # batch 1 sees no key at all: out 0, lse -inf, gradients 0
        mask = mask.clone()
        mask[1] = False
    causal = case.causal is not None

    def cut(t, dim):
        return None if t is None else fd.shard(t.detach(), dim, layout=layout)

    ql, kl, vl = (cut(t, 2).requires_grad_() for t in (q, k, v))
    out, lse = fd.context_parallel_attention(ql, kl, vl, cut(mask, 3), causal=causal, return_lse=True,
                                             backend=backend, layout=layout)
    grads = torch.autograd.grad((out, lse), (ql, kl, vl), (cut(dout, 2), cut(dlse, 2)))
    got = [fd.unshard(t, 2, layout=layout) for t in (out, lse, *grads)]

    results = {}
    for label, cast in (("ref64", lambda t: t.detach().double()), ("torch", lambda t: t.detach())):
        args = [cast(t).requires_grad_() for t in (q, k, v)]
        o, l = reference.attention(*args, mask, causal=causal)
        g = torch.autograd.grad((o, l), args, (cast(dout).to(o.dtype), cast(dlse).to(l.dtype)))
        results[label] = (o, l, *g)
    comps = [testing.compare(name, a, r, t, testing.OUT_FACTOR if name in ("out", "lse") else testing.GRAD_FACTOR)
             for name, a, r, t in zip(("out", "lse", "dq", "dk", "dv"), got, results["ref64"], results["torch"])]
    testing.assert_all_ok(comps, f"{case} {dtype} {layout} {backend}")
    if empty_row:
        assert torch.all(got[0][1] == 0) and torch.all(got[1][1] == float("-inf")) and torch.all(got[2][1] == 0)


CASE = AttentionCase(b=2, hq=4, hkv=2, nq=32, nk=32, d=16)


def _two_rank_checks(rank, world):
    from fusedlayers import distributed as fd

    for case, dtype, layout, backend in (
        (replace(CASE, mask="key_padding"), torch.float32, "zigzag", "auto"),  # non-causal, GQA, padding
        (replace(CASE, mask="key_padding", causal="top_left"), torch.float32, "zigzag", "auto"),
        (replace(CASE, hkv=1, causal="top_left"), torch.float32, "contiguous", "auto"),  # MQA
        (replace(CASE, hkv=4, causal="top_left"), torch.bfloat16, "zigzag", "auto"),
        (replace(CASE, mask="key_padding", causal="top_left"), torch.float32, "zigzag", "reference"),
    ):
        _check_ring(case, dtype, layout, backend)
    _check_ring(replace(CASE, mask="key_padding", causal="top_left"), torch.float32, "zigzag", empty_row=True)

    # deterministic=True: the backward twice, bit for bit
    q, k, v, mask, dout, _ = testing.make_attention_inputs(replace(CASE, causal="top_left"), torch.float32, "cpu")
    ql, kl, vl = (fd.shard(t.detach(), 2).requires_grad_() for t in (q, k, v))
    runs = []
    for _ in range(2):
        out = fd.context_parallel_attention(ql, kl, vl, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (ql, kl, vl), fd.shard(dout, 2)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    # shard / unshard: both layouts, zigzag as documented
    x = torch.arange(8 * world).view(1, 8 * world)
    assert torch.equal(fd.unshard(fd.shard(x, 1), 1), x)
    assert torch.equal(fd.unshard(fd.shard(x, -1, layout="contiguous"), -1, layout="contiguous"), x)
    c = 8 * world // (2 * world)  # zigzag chunk
    assert fd.shard(x, 1).tolist()[0] == list(range(rank * c, (rank + 1) * c)) + list(
        range((2 * world - 1 - rank) * c, (2 * world - rank) * c))

    # refusals: an uneven last shard, shards of different lengths on different ranks, dropout
    with pytest.raises(ValueError, match="uneven last shard"):
        fd.shard(torch.zeros(1, 1, 2 * world + 1, 4), 2)
    n = 8 if rank == 0 else 6
    with pytest.raises(ValueError, match="same shape on every rank"):
        fd.context_parallel_attention(*(torch.randn(1, 2, n, 4) for _ in range(3)))
    with pytest.raises(NotImplementedError, match="global"):
        fd.context_parallel_attention(ql, kl, vl, dropout_p=0.1)
    with pytest.raises(ValueError, match="key mask"):
        fd.context_parallel_attention(ql, kl, vl, torch.ones(2, 1, ql.shape[2], kl.shape[2], dtype=torch.bool))
    with pytest.raises(ValueError, match="layout"):
        fd.shard(q, 2, layout="striped")


def _four_rank_checks(rank, world):
    _check_ring(replace(CASE, mask="key_padding", causal="top_left"), torch.float32, "zigzag")
    _check_ring(replace(CASE, hkv=1, mask="key_padding"), torch.float32, "contiguous")


def test_ring_attention_on_four_ranks_matches_the_reference():
    _spawn(_four_rank_checks, 4)


def test_shard_needs_a_process_group():
    from fusedlayers import distributed as fd

    with pytest.raises(RuntimeError, match="process group"):
        fd.shard(torch.zeros(4, 4), 0)


# ---------------------------------------------------------------------------- training

TINY = dict(d_model=32, n_heads=2, d_ff=64, n_layers=1)


def _train(steps: int, **kw):
    from fusedlayers.transformer.model import ModelConfig
    from fusedlayers.transformer.train import MLMTask, TrainConfig, train

    return train(MLMTask(n_train=200, n_test=20), ModelConfig(**TINY),
                 TrainConfig(steps=steps, batch_size=8, eval=False, quiet=True, **kw))


def _two_ranks(rank, world, out):
    """One spawn for every two-rank check (each spawn costs seconds of imports)."""
    _two_rank_checks(rank, world)
    _sharded_training(rank, world, out)


def _sharded_training(rank, world, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    runs = {"cp_ddp": _train(4, context_parallel=2)["history"],
            "cp_fsdp": _train(4, context_parallel=2, fsdp=True)["history"]}
    folder = os.path.join(out, "run")
    _train(2, context_parallel=2, fsdp=True, out=folder, save_every=1)  # a run that stops after step 2
    resumed = _train(4, context_parallel=2, fsdp=True, out=folder, resume=True)
    runs["cp_fsdp_resumed"] = resumed["history"]
    runs["agree"] = resumed["replicas_agree"]
    if rank == 0:
        with open(os.path.join(out, "histories.json"), "w") as f:
            json.dump(runs, f)


def test_two_ranks_ring_attention_and_context_parallel_fsdp_training(tmp_path):
    """Ring attention against the reference (``_two_rank_checks``); then a context-parallel
    training run (DDP and FSDP2) whose losses match the single-process run, and a resumed
    sharded run equal bit for bit to the uninterrupted one."""
    single = _train(4)["history"]
    _spawn(_two_ranks, 2, str(tmp_path))
    runs = json.loads((tmp_path / "histories.json").read_text())
    # the same batches, the same model: the losses agree up to float32 summation order
    for name in ("cp_ddp", "cp_fsdp"):
        assert runs[name] == pytest.approx(single, rel=1e-5, abs=1e-6), (name, runs[name], single)
    assert runs["cp_fsdp_resumed"] == runs["cp_fsdp"]  # bit for bit after the resume
    assert runs["agree"] is True


def test_context_parallel_flags_are_checked_before_training():
    from fusedlayers.transformer.model import ModelConfig
    from fusedlayers.transformer.train import TrainConfig, TranslateTask, train

    with pytest.raises(ValueError, match="must divide the number of processes"):
        _train(1, context_parallel=2)
    with pytest.raises(ValueError, match="context_parallel must be an int"):
        _train(1, context_parallel=0)
    with pytest.raises(ValueError, match="mlm task"):
        train(TranslateTask(n_train=10, n_test=2), ModelConfig(**TINY), TrainConfig(steps=1, context_parallel=2))
