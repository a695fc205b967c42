"""Every bad input raises a clear error naming the argument, before any kernel runs; when no
backend can serve a call, one error lists every backend and its reason."""

import re

import pytest
import torch

import fusedlayers
from fusedlayers import ops
from fusedlayers import BackendError, dispatch

q = torch.randn(2, 4, 8, 16)


@pytest.mark.parametrize("args, kwargs, exc, pattern", [
    ((q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)), {}, ValueError, r"query heads.*q\.shape\[1\] = 4.*k\.shape\[1\] = 3"),
    ((q[0], q, q), {}, ValueError, r"q must be 4-D"),
    ((q, q, q.half()), {}, ValueError, r"q k v must share one dtype"),
    ((q, q, q.to(torch.int64)), {}, TypeError, r"v must be a floating-point tensor"),
    ((q, [1], q), {}, TypeError, r"k must be a torch.Tensor"),
    ((q, torch.randn(3, 4, 8, 16), q), {}, ValueError, r"batch size"),
    ((q, q, torch.randn(2, 4, 9, 16)), {}, ValueError, r"k and v must have the same \(Hkv, Nk\)"),
    ((q, torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)), {}, ValueError, r"head dim"),
    ((q, torch.randn(2, 0, 8, 16), torch.randn(2, 0, 8, 16)), {}, ValueError, r"query heads.*k\.shape\[1\] = 0"),
    ((q, q, q, torch.ones(2, 4, 8, 7, dtype=torch.bool)), {}, ValueError, r"attn_mask of shape \(2, 4, 8, 7\)"),
    ((q, q, q, torch.ones(8, 8, dtype=torch.int32)), {}, TypeError, r"attn_mask must be bool"),
    ((q, q, q, torch.ones(1, 1, 2, 4, 8, 8, dtype=torch.bool)), {}, ValueError, r"attn_mask"),
    ((q, q, q), {"causal_align": "top"}, ValueError, r"causal_align"),
    ((q, q, q), {"dropout_p": 1.0}, ValueError, r"dropout_p"),
    ((q, q, q), {"dropout_p": -0.1}, ValueError, r"dropout_p"),
    ((q, q, q), {"scale": float("nan")}, ValueError, r"scale"),
    ((q, q, q), {"backend": "flash"}, ValueError, r"backend must be 'auto' or one of"),
])
def test_attention_rejects(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fusedlayers.attention(*args, **kwargs)


def test_varlen_rejects():
    t = torch.randn(10, 4, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D int32"):
        fusedlayers.attention_varlen(t, t, t, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="same number of sequences"):
        fusedlayers.attention_varlen(t, t, t, cu, torch.tensor([0, 10], dtype=torch.int32), 6, 10)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        fusedlayers.attention_varlen(t, t, t, cu, cu, 6, 0)
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is less than the longest sequence"):
        fusedlayers.attention_varlen(t, t, t, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0.*end at the token count 10"):
        fusedlayers.attention_varlen(t, t, t, cu, torch.tensor([0, 4, 9], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="q must be 3-D"):
        fusedlayers.attention_varlen(q, t, t, cu, cu, 6, 6)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: fusedlayers.layer_norm(torch.randn(4, 8), torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
    (lambda: fusedlayers.layer_norm(torch.randn(4, 8), None, torch.randn(8, 1)), ValueError, r"bias must have shape"),
    (lambda: fusedlayers.layer_norm(torch.tensor(1.0)), ValueError, r"x must have at least 1 dim"),
    (lambda: fusedlayers.layer_norm(torch.arange(8)), TypeError, r"x must be a floating-point"),
    (lambda: fusedlayers.layer_norm(torch.randn(4, 8), eps=-1.0), ValueError, r"eps"),
    (lambda: fusedlayers.rms_norm("x"), TypeError, r"x must be a torch.Tensor"),
    (lambda: fusedlayers.add_layer_norm(torch.randn(4, 8), torch.randn(4, 9), None, None), ValueError,
     r"residual must have x's shape"),
    (lambda: fusedlayers.add_layer_norm(torch.randn(4, 8), None, None, None, dropout_p=2.0), ValueError, r"dropout_p"),
])
def test_norm_rejects(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_unservable_call_lists_every_backend(monkeypatch):
    # Make every loaded backend refuse, the way a kernel refuses an unsupported head dim. The
    # C++ fast path applies the cpu backend's fixed rule itself (tests/test_fast_path.py checks
    # that the two agree), so with the rules replaced here the call must take the Python path.
    monkeypatch.setattr(ops, "_FAST", None)
    for (family, name), (impl, _) in dispatch._IMPLS.items():
        if family == "attention" and impl is not None:
            monkeypatch.setattr(impl, "why_not", lambda call, _n=name: f"{_n} says head dim {call.head_dim} > 8")
    with pytest.raises(BackendError) as info:
        fusedlayers.attention(q, q, q)
    message = str(info.value)
    for name in dispatch.BACKENDS:
        assert re.search(rf"^  {name}: \S", message, re.M), message
    assert "reference: reference says head dim 16 > 8" in message


def test_explicit_backend_that_cannot_serve_says_why():
    with pytest.raises(BackendError, match=r"backend 'cuda' cannot serve this attention call .*: "):
        fusedlayers.attention(q, q, q, backend="cuda")


def test_backend_choice_is_decided_once_per_call_signature(monkeypatch):
    # select asks the backends once for a call signature and keeps the answer; a refusal is not kept (the
    # next call asks again); a new signature (here a different size) is decided afresh; loading the C++
    # extension empties what was kept.
    impl = dispatch.implementation("norm", "reference")
    asked = []
    answer = {"reason": "not today"}
    monkeypatch.setattr(impl, "why_not", lambda call: asked.append(call.rows) or answer["reason"])
    call = dispatch.NormCall(device=torch.device("cpu"), dtype=torch.float32, weight_dtype=None, residual_dtype=None,
                             rows=4, hidden=8, rms=False, dropout_p=0.0)
    for _ in range(2):
        with pytest.raises(BackendError, match="not today"):
            dispatch.select("norm", call, "reference")
    assert asked == [4, 4]
    answer["reason"] = None
    assert [dispatch.select("norm", call, "reference") for _ in range(3)] == ["reference"] * 3
    assert asked == [4, 4, 4]
    assert dispatch.select("norm", call._replace(rows=5), "reference") == "reference"
    assert asked == [4, 4, 4, 5]
    assert dispatch._SELECTED.clear in fusedlayers._ext._callbacks  # what a first-use build's load calls
    dispatch._SELECTED.clear()
    dispatch.select("norm", call, "reference")
    assert asked == [4, 4, 4, 5, 4]
