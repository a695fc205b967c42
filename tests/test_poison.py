"""Poisoned inputs (xformers' trick): every tensor a kernel reads is a view into a larger buffer
filled with NaN outside the valid region (an offset start, every stride but the last one larger
than its tight value), so a kernel that reads past its data, or through the wrong stride, picks up
NaN. Each backend's every path (attention forward and backward, decode, varlen with a strided
cu_seqlens, norms with residual, prenorm, dropout and the fp32 residual stream) must give finite
results equal to its own run on contiguous copies.
"""

from __future__ import annotations

import pytest
import torch

from fusedlayers import dispatch, ops

from conftest import DEVICE

NAN = float("nan")


def poisoned(t: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """t's values in a view of a NaN-filled buffer padded by `pad` on every side of every dim."""
    buf = torch.full([s + 2 * pad for s in t.shape], NAN, dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(pad, pad + s) for s in t.shape)]
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


def _serves(family, backend, **call):
    cls = dispatch.AttentionCall if family == "attention" else dispatch.NormCall
    return dispatch.why_not(family, backend, cls(device=torch.device(DEVICE), **call)) is None


def _close(a, b, what):
    assert torch.isfinite(a).all(), f"{what}: non-finite values: a kernel read outside its data"
    eps = torch.finfo(b.dtype).eps
    torch.testing.assert_close(a, b, rtol=16 * eps, atol=16 * eps * max(1.0, float(b.abs().max())), msg=what)


def _attention_backends(**call):
    base = dict(dtype=torch.float32, batch=2, heads_q=4, heads_kv=2, seqlen_q=9, seqlen_k=9, head_dim=8,
                head_dim_v=8, mask="float", mask_grad=True, causal=True, dropout_p=0.0, deterministic=False,
                varlen=False)
    base.update(call)
    return [b for b in ("reference", "cpu", "triton", "cuda") if _serves("attention", b, **base)]


def _grads(fn, inputs, seed_grads):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, wrt, grad_outputs=seed_grads(outs))
    return list(outs) + list(grads)


def _compare(fn, inputs, seed, what):
    """fn on poisoned views of the inputs (and of the gradient seeds) vs on contiguous copies."""
    gen = torch.Generator().manual_seed(0)
    seeds = {}

    def seed_grads(outs, poison):
        if not seeds:
            seeds["g"] = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
        return [poisoned(g) if poison else g.clone() for g in seeds["g"]]

    flat = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    torch.manual_seed(seed)
    expect = _grads(fn, flat, lambda outs: seed_grads(outs, False))
    pois = [poisoned(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    torch.manual_seed(seed)
    got = _grads(fn, pois, lambda outs: seed_grads(outs, True))
    for i, (a, b) in enumerate(zip(got, expect)):
        _close(a, b, f"{what}: output {i}")


@pytest.mark.parametrize("backend", _attention_backends())
def test_attention_forward_backward_poisoned(backend):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 9, 8, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 9, 8, generator=gen).requires_grad_()
    bias = torch.randn(2, 1, 9, 9, generator=gen).requires_grad_()
    _compare(lambda q, k, v, m: ops.attention(q, k, v, m, causal=True, return_lse=True, backend=backend),
             [q, k, v, bias], 0, f"{backend} attention")


@pytest.mark.parametrize("backend", _attention_backends(mask="bool", mask_grad=False, dropout_p=0.2))
def test_attention_bool_mask_dropout_poisoned(backend):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 9, 8, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 9, 8, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 9, 8, generator=gen).requires_grad_()
    keep = torch.rand(2, 1, 1, 9, generator=gen) < 0.8
    buf = torch.zeros(2, 3, 3, 12, dtype=torch.bool)  # a strided bool mask (garbage False around it)
    buf[:, 1:2, 1:2, 1:10] = keep
    mask = buf[:, 1:2, 1:2, 1:10]
    _compare(lambda q, k, v: ops.attention(q, k, v, mask, dropout_p=0.2, backend=backend), [q, k, v], 3,
             f"{backend} attention with bool mask and dropout")


@pytest.mark.parametrize("backend", _attention_backends(seqlen_q=1, seqlen_k=300, mask=None, mask_grad=False,
                                                        causal=False))
def test_decode_poisoned(backend):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 1, 8, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 300, 8, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 300, 8, generator=gen).requires_grad_()
    _compare(lambda q, k, v: ops.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True,
                                           backend=backend), [q, k, v], 0, f"{backend} decode")


@pytest.mark.parametrize("backend", _attention_backends(varlen=True, mask=None, mask_grad=False))
def test_varlen_poisoned_with_strided_cu_seqlens(backend):
    """cu_seqlens as every other element of a larger tensor, garbage in between: the kernels must read
    the offsets, not raw memory."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(12, 4, 8, generator=gen).requires_grad_()
    k = torch.randn(15, 2, 8, generator=gen).requires_grad_()
    v = torch.randn(15, 2, 8, generator=gen).requires_grad_()
    cu_q = torch.tensor([0, 10**6, 5, -7, 12, 99], dtype=torch.int32)[::2]
    cu_k = torch.tensor([0, -1, 9, 2**30, 15, 3], dtype=torch.int32)[::2]
    assert not cu_q.is_contiguous()
    _compare(lambda q, k, v: ops.attention_varlen(q, k, v, cu_q, cu_k, 7, 9, causal=True, return_lse=True,
                                                  backend=backend), [q, k, v], 0, f"{backend} varlen")
    # and the contiguous cu_seqlens give the same answer
    torch.manual_seed(0)
    a = ops.attention_varlen(q, k, v, cu_q, cu_k, 7, 9, causal=True, backend=backend)
    b = ops.attention_varlen(q, k, v, cu_q.contiguous(), cu_k.contiguous(), 7, 9, causal=True, backend=backend)
    _close(a.detach(), b.detach(), f"{backend} varlen: strided vs contiguous cu_seqlens")


def _norm_backends(**call):
    base = dict(dtype=torch.float32, weight_dtype=torch.float32, residual_dtype=torch.float32, rows=15, hidden=40,
                rms=False, dropout_p=0.1)
    base.update(call)
    return [b for b in ("reference", "cpu", "triton", "cuda") if _serves("norm", b, **base)]


@pytest.mark.parametrize("backend", _norm_backends())
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_norms_poisoned(backend, rms, prenorm, dropout_p):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 40, generator=gen).requires_grad_()
    residual = torch.randn(3, 5, 40, generator=gen).requires_grad_()
    w = torch.randn(40, generator=gen).requires_grad_()
    b = torch.randn(40, generator=gen).requires_grad_()
    if rms:
        def fn(x, r, w):
            return ops.add_rms_norm(x, r, w, 1e-6, dropout_p=dropout_p, prenorm=prenorm, backend=backend)
        inputs = [x, residual, w]
    else:
        def fn(x, r, w, b):
            return ops.add_layer_norm(x, r, w, b, 1e-5, dropout_p=dropout_p, prenorm=prenorm, backend=backend)
        inputs = [x, residual, w, b]
    _compare(fn, inputs, 7, f"{backend} {'rms' if rms else 'layer'} norm prenorm={prenorm} dropout={dropout_p}")


@pytest.mark.parametrize("backend", _norm_backends(dtype=torch.float16, residual_dtype=torch.float16, dropout_p=0.0))
def test_plain_norms_and_fp32_stream_poisoned(backend):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 40, generator=gen).half().requires_grad_()
    w = torch.randn(40, generator=gen).requires_grad_()
    b = torch.randn(40, generator=gen).requires_grad_()
    _compare(lambda x, w, b: ops.layer_norm(x, w, b, backend=backend), [x, w, b], 0, f"{backend} layer_norm")
    _compare(lambda x, w: ops.rms_norm(x, w, backend=backend), [x, w], 0, f"{backend} rms_norm")
    r = torch.randn(7, 40, generator=gen).half().requires_grad_()
    _compare(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, prenorm=True, residual_in_fp32=True, backend=backend),
             [x, r, w, b], 0, f"{backend} add_layer_norm residual_in_fp32")
