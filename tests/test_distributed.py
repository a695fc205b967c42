"""fusedlayers.distributed and the sharded Transformer, on CPU with gloo.

Each test spawns its processes (torch.multiprocessing, OMP_NUM_THREADS=1) once and runs all
its checks inside them: ring attention forward and backward against the float64 reference
with the test method's rule (fusedlayers.testing), causal (zigzag and contiguous) and not,
GQA/MQA, key padding, fully masked rows, bf16, the reference backend, dropout (the
single-process keep-mask, from a seed that group rank 0 draws), a bitwise-repeatable
deterministic backward, refusals (uneven shards, dropout on a backend without a dropout
layout, bad masks); packed variable-length sequences (context_parallel_attention_varlen
against the single-process attention_varlen, shard_varlen's packing, its refusals); the
dropout layout of the block calls in one process; a context-parallel (+ FSDP2) training run
whose losses match the single-process run, and a resumed sharded run equal bit for bit to the
uninterrupted one.
"""

import json
import math
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from fusedlayers import dispatch, reference, registration, testing
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


def _check_ring(case: AttentionCase, dtype, layout: str, backend: str = "auto", empty_row: bool = False,
                rng_seed: int = 0):
    """Ring attention of ``case`` (self-attention, nq == nk) against the float64 reference on
    the full tensors, by the test method's rule; every rank checks the whole gathered result.
    With ``case.dropout_p``: rank r's default generator is seeded with ``rng_seed + r`` and the
    reference takes the keep-mask of the single-process ``fusedlayers.attention`` on the same
    backend called right after ``torch.manual_seed(rng_seed)`` (group rank 0's seed, broadcast
    by the op): the result is the single-process op's."""
    from fusedlayers import distributed as fd

    q, k, v, mask, dout, dlse = testing.make_attention_inputs(case, dtype, "cpu")
    if empty_row:  # batch 1 sees no key at all: out 0, lse -inf, gradients 0
        mask = mask.clone()
        mask[1] = False
    causal = case.causal is not None

    def cut(t, dim):
        return None if t is None else fd.shard(t.detach(), dim, layout=layout)

    ql, kl, vl = (cut(t, 2).requires_grad_() for t in (q, k, v))
    torch.manual_seed(rng_seed + torch.distributed.get_rank())  # different generators: the op shares rank 0's seed
    out, lse = fd.context_parallel_attention(ql, kl, vl, cut(mask, 3), causal=causal, return_lse=True,
                                             backend=backend, layout=layout, dropout_p=case.dropout_p)
    grads = torch.autograd.grad((out, lse), (ql, kl, vl), (cut(dout, 2), cut(dlse, 2)))
    got = [fd.unshard(t, 2, layout=layout) for t in (out, lse, *grads)]

    served = "cpu" if backend == "auto" else backend
    keep = testing._dropout_keep("attention", served, case.dropout_p, (case.b, case.hq, case.nq, case.nk), "cpu",
                                 rng_seed)
    results = {}
    for label, cast in (("ref64", lambda t: t.detach().double()), ("torch", lambda t: t.detach())):
        args = [cast(t).requires_grad_() for t in (q, k, v)]
        o, l = reference.attention(*args, mask, causal=causal, dropout_p=case.dropout_p, dropout_mask=keep)
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
        (replace(CASE, causal="top_left", dropout_p=0.2), torch.float32, "zigzag", "auto"),  # dropout, GQA
        (replace(CASE, mask="key_padding", dropout_p=0.3), torch.float32, "zigzag", "auto"),  # non-causal
        (replace(CASE, hkv=1, causal="top_left", dropout_p=0.2), torch.float32, "contiguous", "auto"),
        (replace(CASE, causal="top_left", dropout_p=0.2), torch.bfloat16, "zigzag", "auto"),
        (replace(CASE, mask="key_padding", causal="top_left", dropout_p=0.2), torch.float32, "zigzag", "reference"),
    ):
        _check_ring(case, dtype, layout, backend, rng_seed=3)
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

    # refusals: an uneven last shard, shards of different lengths on different ranks, dropout on a
    # backend whose kernels take no dropout layout, an odd zigzag shard with dropout
    with pytest.raises(ValueError, match="uneven last shard"):
        fd.shard(torch.zeros(1, 1, 2 * world + 1, 4), 2)
    n = 8 if rank == 0 else 6
    with pytest.raises(ValueError, match="same shape on every rank"):
        fd.context_parallel_attention(*(torch.randn(1, 2, n, 4) for _ in range(3)))
    with pytest.raises(dispatch.BackendError, match="dropout_layout"):
        fd.context_parallel_attention(ql, kl, vl, dropout_p=0.1, backend="triton")
    with pytest.raises(ValueError, match="multiple of 2"):
        fd.context_parallel_attention(*(torch.randn(1, 2, 5, 4) for _ in range(3)), dropout_p=0.1)
    with pytest.raises(ValueError, match="key mask"):
        fd.context_parallel_attention(ql, kl, vl, torch.ones(2, 1, ql.shape[2], kl.shape[2], dtype=torch.bool))
    with pytest.raises(ValueError, match="layout"):
        fd.shard(q, 2, layout="striped")
    _varlen_checks(rank, world)


def _check_ring_varlen(lens, hq: int, hkv: int, causal: bool, layout: str, backend: str = "auto",
                       dtype=torch.float32, d: int = 16):
    """Packed ring attention (``context_parallel_attention_varlen``) of sequences of lengths
    ``lens`` against the single-process ``fusedlayers.attention_varlen`` of the full packed
    tensors, by the test method's rule: the truth is the op in float64 on the reference backend,
    PyTorch's error that of the packed reference in ``dtype``; out, lse and the gradients through
    both (dq, dk, dv), every rank checking the whole gathered result."""
    import fusedlayers
    from fusedlayers import distributed as fd

    gen = torch.Generator().manual_seed(sum(lens) * 31 + hq * 7 + hkv + int(causal))
    t = sum(lens)
    q, k, v, dout = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                     for shape in ((t, hq, d), (t, hkv, d), (t, hkv, d), (t, hq, d)))
    dlse = torch.randn((hq, t), generator=gen)
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)

    ql, kl, vl = (fd.shard_varlen(x, cu, layout=layout).requires_grad_() for x in (q, k, v))
    out, lse = fd.context_parallel_attention_varlen(ql, kl, vl, cu, max(lens), causal=causal, return_lse=True,
                                                    backend=backend, layout=layout)
    assert lse.shape == (hq, ql.shape[0]) and lse.dtype == torch.float32
    grads = torch.autograd.grad((out, lse), (ql, kl, vl), (fd.shard_varlen(dout, cu, layout=layout),
                                                           fd.shard_varlen(dlse, cu, layout=layout, dim=1)))
    got = [fd.unshard_varlen(x, cu, layout=layout, dim=dim) for x, dim in zip((out, lse, *grads), (0, 1, 0, 0, 0))]

    results = {}
    for label, cast, run in (
            ("ref64", lambda x: x.detach().double(),
             lambda *a: fusedlayers.attention_varlen(*a, cu, cu, max(lens), max(lens), causal=causal, return_lse=True,
                                                     backend="reference")),
            ("torch", lambda x: x.detach(), lambda *a: reference.attention_varlen(*a, cu, cu, causal=causal))):
        args = [cast(x).requires_grad_() for x in (q, k, v)]
        o, l = run(*args)
        results[label] = (o, l, *torch.autograd.grad((o, l), args, (cast(dout).to(o.dtype), dlse.to(l.dtype))))
    comps = [testing.compare(name, a, r, s, testing.OUT_FACTOR if name in ("out", "lse") else testing.GRAD_FACTOR)
             for name, a, r, s in zip(("out", "lse", "dq", "dk", "dv"), got, results["ref64"], results["torch"])]
    testing.assert_all_ok(comps, f"varlen {lens} Hq={hq} Hkv={hkv} causal={causal} {layout} {backend} {dtype}")


def _varlen_checks(rank, world):
    """Packed ring attention on ``world`` ranks: both layouts, causal and not, GQA / MQA, a
    sequence of exactly 2W tokens (one token per zigzag chunk) and an empty one, the reference
    backend; a bitwise-repeatable deterministic backward; shard_varlen's packing; the refusals."""
    from fusedlayers import distributed as fd

    c = 2 * world  # zigzag chunks per sequence
    lens = (3 * c, c, 0, 2 * c)
    _check_ring_varlen(lens, 4, 2, True, "zigzag")
    _check_ring_varlen(lens, 4, 1, True, "contiguous")
    _check_ring_varlen((2 * c, c), 2, 2, False, "zigzag")
    if world == 2:
        _check_ring_varlen((c, 2 * c), 4, 2, True, "zigzag", backend="reference")
        _check_ring_varlen(lens, 4, 2, True, "zigzag", dtype=torch.bfloat16)

    # deterministic=True: the backward twice, bit for bit
    cu = torch.tensor([0, 3 * c, 4 * c], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (fd.shard_varlen(torch.randn(4 * c, *shape, generator=gen), cu).requires_grad_()
                     for shape in ((4, 8), (2, 8), (2, 8), (4, 8)))
    runs = []
    for _ in range(2):
        out = fd.context_parallel_attention_varlen(q, k, v, cu, 3 * c, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    # shard_varlen: each sequence cut on its own, the rank's chunks packed sequence after sequence
    x = torch.arange(4 * c)
    size = (3, 1)  # tokens per zigzag chunk of the two sequences
    want = []
    for start, n in zip((0, 3 * c), size):
        for chunk in (rank, c - 1 - rank):
            want += list(range(start + chunk * n, start + (chunk + 1) * n))
    assert fd.shard_varlen(x, cu).tolist() == want
    assert torch.equal(fd.unshard_varlen(fd.shard_varlen(x, cu, layout="contiguous"), cu, layout="contiguous"), x)

    # refusals: a sequence whose length is not a multiple of the chunks, dropout, wrong shapes
    bad = torch.tensor([0, c, 2 * c + world], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens: sequence 1 has"):
        fd.shard_varlen(torch.zeros(2 * c + world), bad)
    with pytest.raises(ValueError, match="cu_seqlens: sequence 1 has"):
        fd.context_parallel_attention_varlen(*(torch.zeros(5, 2, 4) for _ in range(3)), bad, 2 * c)
    with pytest.raises(ValueError, match="dropout"):
        fd.context_parallel_attention_varlen(q, k, v, cu, 3 * c, dropout_p=0.1)
    with pytest.raises(ValueError, match="end at W x total_local"):
        fd.context_parallel_attention_varlen(q, k, v, torch.tensor([0, 4 * c + c], dtype=torch.int32), 5 * c)
    with pytest.raises(ValueError, match="max_seqlen"):
        fd.context_parallel_attention_varlen(q, k, v, cu, c)


def _four_rank_checks(rank, world):
    _check_ring(replace(CASE, mask="key_padding", causal="top_left"), torch.float32, "zigzag")
    _check_ring(replace(CASE, hkv=1, mask="key_padding"), torch.float32, "contiguous")
    _check_ring(replace(CASE, mask="key_padding", causal="top_left", dropout_p=0.2), torch.float32, "zigzag",
                rng_seed=5)
    _check_ring(replace(CASE, dropout_p=0.3), torch.float32, "zigzag", "reference", rng_seed=6)
    _varlen_checks(rank, world)


def test_ring_attention_on_four_ranks_matches_the_reference():
    _spawn(_four_rank_checks, 4)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dropout_layout_draws_the_block_of_the_full_keep_mask(backend):
    """Query-row blocks of one call, each with its dropout_layout [row0, 0, Nq, Nk], give the
    full call's result: out / lse / dq row by row, dk / dv summed over the blocks, by the test
    method's rule against the float64 reference with the full call's keep-mask; the double
    backward (create_graph=True) draws the same block of the mask."""
    case = AttentionCase(b=2, hq=4, hkv=2, nq=24, nk=20, d=16, mask="key_padding", dropout_p=0.3)
    q, k, v, mask, dout, dlse = testing.make_attention_inputs(case, torch.float32, "cpu")
    seed, scale = torch.tensor(987654321), 0.25
    impl = dispatch.implementation("attention", backend)
    keep = impl.dropout_keep_mask(int(seed), (case.b, case.hq, case.nq, case.nk), case.dropout_p, "cpu")
    rows = [slice(0, 8), slice(8, 20), slice(20, 24)]
    outs, lses, dqs, dk, dv = [], [], [], 0, 0
    for rs in rows:
        qb = q.detach()[:, :, rs].requires_grad_()
        kb, vb = k.detach().requires_grad_(), v.detach().requires_grad_()
        layout = [rs.start, 0, case.nq, case.nk]
        o, l = registration.attention_fwd(qb, kb, vb, mask, seed, scale, False, False, case.dropout_p, False, backend,
                                          dropout_layout=layout)
        g = torch.autograd.grad((o, l), (qb, kb, vb), (dout[:, :, rs], dlse[:, :, rs]), create_graph=True)
        o2, l2 = registration.attention_fwd(qb, kb, vb, mask, seed, scale, False, False, case.dropout_p, False,
                                            backend, dropout_layout=layout)
        g2 = torch.autograd.grad((o2, l2), (qb, kb, vb), (dout[:, :, rs], dlse[:, :, rs]))
        for a, b in zip(g, g2):  # the differentiable backward and the op's backward agree
            torch.testing.assert_close(a, b)
        outs.append(o.detach()), lses.append(l.detach()), dqs.append(g2[0])
        dk, dv = dk + g2[1], dv + g2[2]
    got = (torch.cat(outs, 2), torch.cat(lses, 2), torch.cat(dqs, 2), dk, dv)
    results = {}
    for label, cast in (("ref64", lambda t: t.detach().double()), ("torch", lambda t: t.detach())):
        args = [cast(t).requires_grad_() for t in (q, k, v)]
        o, l = reference.attention(*args, mask, dropout_p=case.dropout_p, dropout_mask=keep, scale=scale)
        results[label] = (o, l, *torch.autograd.grad((o, l), args, (cast(dout), cast(dlse))))
    comps = [testing.compare(name, a, r, t, testing.OUT_FACTOR if name in ("out", "lse") else testing.GRAD_FACTOR)
             for name, a, r, t in zip(("out", "lse", "dq", "dk", "dv"), got, results["ref64"], results["torch"])]
    testing.assert_all_ok(comps, f"{case} {backend}")

    with pytest.raises((ValueError, RuntimeError), match="dropout_layout"):
        registration.attention_fwd(q, k, v, None, seed, scale, False, False, 0.3, False, backend,
                                   dropout_layout=[1, 0, case.nq, case.nk])  # rows 1..24 do not fit in 24


def test_dropout_layout_is_refused_where_it_is_not_served():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="takes no dropout layout"):
        registration.attention_fwd(q, q, q, None, torch.tensor(1), 0.5, False, False, 0.1, False, "triton",
                                   dropout_layout=[0, 0, 8, 8])
    call = testing.attention_call_for(AttentionCase(b=1, hq=2, hkv=2, nq=8, nk=8, d=4, dropout_p=0.1),
                                      torch.float32, torch.device("cpu"))
    call = call._replace(dropout_layout=True)
    for backend in ("triton", "cuda"):
        assert "no dropout_layout" in dispatch.why_not("attention", backend, call)
    for backend in ("cpu", "reference"):
        assert dispatch.why_not("attention", backend, call) is None
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dropout_layout is not supported with cu_seqlens"):
        torch.ops.fusedlayers.attention_fwd_kernel(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1),
                                                   None, cu, cu, 8, 8, 1, 0.5, False, False, 0.1, -1, -1, 0.0, None,
                                                   [0, 0, 8, 8])


def test_shard_needs_a_process_group():
    from fusedlayers import distributed as fd

    with pytest.raises(RuntimeError, match="process group"):
        fd.shard(torch.zeros(4, 4), 0)


# ---------------------------------------------------------------------------- training

TINY = dict(d_model=32, n_heads=2, d_ff=64, n_layers=1)


def _train(steps: int, dropout: float = 0.0, **kw):
    from fusedlayers.transformer.model import ModelConfig
    from fusedlayers.transformer.train import MLMTask, TrainConfig, train

    return train(MLMTask(n_train=200, n_test=20), ModelConfig(**TINY, dropout=dropout),
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
    with_dropout = _train(2, dropout=0.1, context_parallel=2)  # attention dropout through the ring
    runs["cp_dropout"], runs["cp_dropout_agree"] = with_dropout["history"], with_dropout["replicas_agree"]
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
    assert all(math.isfinite(x) for x in runs["cp_dropout"]) and runs["cp_dropout_agree"] is True


def test_context_parallel_flags_are_checked_before_training():
    from fusedlayers.transformer.model import ModelConfig
    from fusedlayers.transformer.train import TrainConfig, TranslateTask, train

    with pytest.raises(ValueError, match="must divide the number of processes"):
        _train(1, context_parallel=2)
    with pytest.raises(ValueError, match="context_parallel must be an int"):
        _train(1, context_parallel=0)
    with pytest.raises(ValueError, match="mlm task"):
        train(TranslateTask(n_train=10, n_test=2), ModelConfig(**TINY), TrainConfig(steps=1, context_parallel=2))
