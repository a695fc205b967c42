"""The eager fast path of the public ops (csrc/eager.cpp, ``fusedlayers.ops.fast_norm``):
which calls it serves, that it gives bitwise the numbers and gradients of the torch.library
op path (the same kernels), that it stands for exactly the backend the dispatch table
picks, that it steps aside for every call the Python path must see (invalid arguments,
layouts, subclasses, modes, torch.compile), and double backward through its nodes."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedlayers
from fusedlayers import _ext, dispatch, ops, registration

pytestmark = pytest.mark.skipif(_ext.FAST is None, reason=f"no C++ fast path: {_ext.ERROR or 'old extension'}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _norm_via_ops(x, residual, weight, bias, eps, rms, prenorm, residual_in_fp32):
    """The same call through the torch.library op on the cpu backend."""
    n = x.shape[-1]
    y, z, _, _ = registration.norm_fwd(x.reshape(-1, n), None if residual is None else residual.reshape(-1, n),
                                       weight, bias, None, eps, 0.0, rms, prenorm, residual_in_fp32, "cpu")
    return (y.view(x.shape), z.view(x.shape)) if prenorm else y.view(x.shape)


def _leaves(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


def _run(fn, inputs, seed=0):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", (False, True))
@pytest.mark.parametrize("residual,prenorm,fp32", [(False, False, False), (True, False, False), (True, True, False),
                                                   (True, True, True), (False, True, False)])
@pytest.mark.parametrize("affine", ("wb", "w", "none"))
def test_norm_matches_op_path_bitwise(dtype, rms, residual, prenorm, fp32, affine):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True) if residual else None
    w = torch.randn(40, requires_grad=True) if affine != "none" else None
    b = torch.randn(40, requires_grad=True) if affine == "wb" and not rms else None
    fast = lambda: ops.fast_norm(x, r, w, b, 1e-5, 1, rms, prenorm, fp32, "auto")  # noqa: E731
    assert fast() is not None
    leaves = _leaves(x, r, w, b)
    outs, grads = _run(fast, leaves)
    ref_outs, ref_grads = _run(lambda: _norm_via_ops(x, r, w, b, 1e-5, rms, prenorm, fp32), leaves)
    for a, e in zip(outs + list(grads), ref_outs + list(ref_grads)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e)
    with torch.no_grad():  # no backward: the fast path stores z only for prenorm (a 16-bit z is rounded in place)
        plain, ref = fast(), _norm_via_ops(x, r, w, b, 1e-5, rms, prenorm, fp32)
    for a, e in zip(plain if prenorm else (plain,), ref if prenorm else (ref,)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("x_dtype,r_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float16), (torch.float16, torch.float32)], ids=str)
@pytest.mark.parametrize("rms", (False, True))
def test_norm_without_backward_normalises_the_rounded_stream(x_dtype, r_dtype, rms):
    # z = x + r in the residual's dtype: without a backward the fast path does not store it, and y must still be
    # the norm of z rounded to that dtype, bitwise as the op path gives (which stores z); the float64 comparison
    # checks the rounding itself (float32 x: a missed rounding is off by 2^-9 of z, far past 1e-5)
    torch.manual_seed(1)
    x, r = torch.randn(64, 300, dtype=x_dtype), torch.randn(64, 300, dtype=r_dtype) * 3
    w, b = torch.randn(300), None if rms else torch.randn(300)
    with torch.no_grad():
        y = ops.fast_norm(x, r, w, b, 1e-5, 1, rms, False, False, "auto")
        expected = _norm_via_ops(x, r, w, b, 1e-5, rms, False, False)
        assert y is not None and torch.equal(y, expected)
        z = (x.float() + r.float()).to(r_dtype).float()  # the rounded stream, normalised in float64
        ref = (F.rms_norm(z.double(), (300,), w.double()) if rms
               else F.layer_norm(z.double(), (300,), w.double(), b.double()))
        torch.testing.assert_close(y.double(), ref.to(x_dtype).double(), rtol=2e-2 if x_dtype != torch.float32
                                   else 1e-5, atol=1e-2 if x_dtype != torch.float32 else 1e-5)


def test_public_norms_and_modules_take_the_fast_path(monkeypatch):
    calls = []
    real = _ext.FAST

    class Spy:
        def norm(self, *args):
            out = real.norm(*args)
            calls.append(out is not None)
            return out

        attention = real.attention

    monkeypatch.setattr(ops, "_FAST", Spy())
    x, r, w, b = torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(32), torch.randn(32)
    fusedlayers.layer_norm(x, w, b)
    fusedlayers.rms_norm(x, w)
    fusedlayers.add_layer_norm(x, r, w, b, prenorm=True)
    fusedlayers.add_rms_norm(x, r, w)
    ln = fusedlayers.nn.LayerNorm((8, 32))  # two normalised dims: one row of 256
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8, 32), ln.weight, ln.bias))
    rms = fusedlayers.nn.RMSNorm(32)
    torch.testing.assert_close(rms(x), F.rms_norm(x, (32,), rms.weight))
    assert calls == [True] * 6
    fusedlayers.add_layer_norm(x, r, w, b, dropout_p=0.5)  # dropout: the Python path, never offered
    fusedlayers.layer_norm(x, w, b, backend="reference")
    assert len(calls) == 6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", (None, "bool", "bias", "bias_grad", "bias_f32_3d"))
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)])
def test_attention_matches_op_path_bitwise(dtype, mask, causal, bottom_right):
    torch.manual_seed(0)
    b, hq, hkv, nq, nk, d = 2, 4, 2, 9, 13, 16
    q = torch.randn(b, nq, hq, d, dtype=dtype).transpose(1, 2).requires_grad_()  # strided rows, as in a model
    # k and v: views of one packed projection (B, Nk, Hkv, D + Dv), neither dense nor contiguous
    kv = torch.randn(b, nk, hkv, d + 24, dtype=dtype, requires_grad=True)
    k, v = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, nq, nk) > 0.3
    elif mask in ("bias", "bias_grad"):
        m = torch.randn(b, 1, 1, nk, dtype=dtype, requires_grad=mask == "bias_grad")
    elif mask == "bias_f32_3d":
        m = torch.randn(hq, nq, nk, requires_grad=True)
    fast = lambda: _ext.FAST.attention(q, k, v, m, causal, bottom_right, 0.3, True)  # noqa: E731
    assert fast() is not None
    m4 = None if m is None else m.view((1,) * (4 - m.dim()) + tuple(m.shape))
    leaves = _leaves(q, k, v, m)
    outs, grads = _run(fast, leaves)
    ref_outs, ref_grads = _run(lambda: registration.attention_fwd(q, k, v, m4, None, 0.3, causal, bottom_right, 0.0,
                                                                  False, "cpu"), leaves)
    for a, e in zip(outs + list(grads), ref_outs + list(ref_grads)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e)


def test_attention_reads_broadcast_batch_and_head_dims_in_place():
    # k and v expanded along the batch (stride 0) and q a head-major slice: the kernel reads their rows as they
    # are, so the fast path serves them, bitwise as the op path, gradients summed back over the expanded dim
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 16).transpose(1, 2)[:, 1:3].requires_grad_()  # (2, 2, 9, 16), rows 64 apart
    k1 = torch.randn(1, 2, 13, 16, requires_grad=True)
    v1 = torch.randn(1, 2, 13, 16, requires_grad=True)
    k, v = k1.expand(2, -1, -1, -1), v1.expand(2, -1, -1, -1)
    fast = lambda: _ext.FAST.attention(q, k, v, None, True, False, None, False)  # noqa: E731
    assert fast() is not None
    outs, grads = _run(fast, [q, k1, v1])
    ref_outs, ref_grads = _run(lambda: registration.attention_fwd(q, k, v, None, None, 0.25, True, False, 0.0, False,
                                                                  "cpu")[0], [q, k1, v1])
    for a, e in zip(outs + list(grads), ref_outs + list(ref_grads)):
        assert a.shape == e.shape and torch.equal(a, e)


def test_fast_path_serves_only_calls_auto_gives_the_cpu_backend():
    """Every call the fast path serves is one the dispatch table gives to ``cpu``."""
    x = torch.randn(4, 16)
    for dtype in DTYPES:
        for wdtype in DTYPES:
            xs, w = x.to(dtype), torch.randn(16, dtype=wdtype)
            assert ops.fast_norm(xs, None, w, None, 1e-5, 1, False, False, False, "auto") is not None
            call = dispatch.NormCall(xs.device, dtype, wdtype, None, 4, 16, False, 0.0)
            assert dispatch.select("norm", call) == "cpu"
    assert ops._FAST_BACKENDS == ("auto", "cpu")
    assert dispatch.AUTO_ORDER["cpu"][0] == "cpu"


def test_declines_what_the_python_path_must_see():
    fast = _ext.FAST
    x, w = torch.randn(4, 16), torch.randn(16)
    q = torch.randn(1, 2, 5, 8)
    declined = [
        fast.norm(x.double(), None, None, None, 1e-5, 1, False, False, False),  # dtype the kernels lack
        fast.norm(x.t(), None, None, None, 1e-5, 1, False, False, False),  # not contiguous
        fast.norm(x, None, torch.randn(15), None, 1e-5, 1, False, False, False),  # wrong weight: Python's error
        fast.norm(x, None, w, None, float("nan"), 1, False, False, False),
        fast.norm(x, None, w, None, -1.0, 1, False, False, False),
        fast.norm(x, None, w, None, "1e-5", 1, False, False, False),
        fast.norm(x[:0], None, w, None, 1e-5, 1, False, False, False),  # empty
        fast.norm([[1.0]], None, None, None, 1e-5, 1, False, False, False),  # not a tensor
        fast.norm(x, x.t().contiguous().t(), None, None, 1e-5, 1, False, False, False),  # residual not contiguous
        fast.norm(x, None, torch.randn(32)[::2], None, 1e-5, 1, False, False, False),  # weight not contiguous
        fast.attention(torch.randn(1, 2, 1, 8).expand(1, 2, 5, 8), q, q, None, False, False, None, False),  # overlap
        fast.attention(q, q, q, torch.ones(5, 5, dtype=torch.bool).expand(2, 5, 5), False, False, None, False),
        fast.attention(q, q, q, torch.ones(5, 5, dtype=torch.int32), False, False, None, False),
        fast.attention(q, q, q, torch.ones(3, 5, 5), False, False, None, False),  # does not broadcast
        fast.attention(q, q[..., :4], q, None, False, False, None, False),  # head dims differ
        fast.attention(q, q, q, None, False, False, float("inf"), False),
        fast.attention(q.double(), q.double(), q.double(), None, False, False, None, False),
    ]
    assert all(out is None for out in declined)
    # Parameters are plain tensors to it
    assert fast.norm(x, None, torch.nn.Parameter(w), None, 1e-5, 1, False, False, False) is not None


def test_bad_arguments_still_get_the_python_errors():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="weight"):
        fusedlayers.layer_norm(x, torch.randn(15))
    with pytest.raises(ValueError, match="eps"):
        fusedlayers.layer_norm(x, eps=float("nan"))
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="head dim"):
        fusedlayers.attention(q, q[..., :4], q)
    with pytest.raises(ValueError, match="causal_align"):
        fusedlayers.attention(q, q, q, causal_align="middle")


class _CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_subclasses_see_the_library_op():
    x, w = torch.randn(4, 16), torch.randn(16)
    with _CountingMode() as mode:
        fusedlayers.layer_norm(x, w)
    assert any("fusedlayers.norm_fwd" in op for op in mode.ops), mode.ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        xf = fake.from_tensor(x)
        y = fusedlayers.layer_norm(xf, fake.from_tensor(w))
        assert y.shape == x.shape and type(y) is not torch.Tensor


def test_compile_traces_the_library_op():
    torch._dynamo.reset()
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)

    def f(x, q):
        return fusedlayers.layer_norm(x, w).sum() + fusedlayers.attention(q, q, q, causal=True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = f(x, q)
    got = compiled(x, q)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert x.grad is not None and q.grad is not None


def test_no_grad_and_inference_mode():
    x = torch.randn(4, 16, requires_grad=True)
    with torch.no_grad():
        y = fusedlayers.layer_norm(x)
    assert not y.requires_grad
    with torch.inference_mode():
        y = fusedlayers.layer_norm(torch.randn(4, 16))
        assert y.is_inference()
    y = fusedlayers.layer_norm(x)
    assert y.requires_grad and y.grad_fn is not None


@pytest.mark.parametrize("rms", (False, True))
@pytest.mark.parametrize("residual", (False, True))
def test_norm_double_backward_matches_torch(rms, residual):
    """Hessian-vector products through the fast path's node equal torch's own."""
    torch.manual_seed(0)
    x = torch.randn(6, 32, requires_grad=True)
    r = torch.randn(6, 32, requires_grad=True) if residual else None
    w = torch.randn(32, requires_grad=True)
    b = None if rms else torch.randn(32, requires_grad=True)
    dy = torch.randn(6, 32)
    leaves = _leaves(x, r, w, b)

    def hvp(norm):
        y = norm()
        grads = torch.autograd.grad((y * dy).sum(), leaves, create_graph=True)
        penalty = sum((g ** 2).sum() for g in grads)
        second = torch.autograd.grad(penalty, leaves, allow_unused=True)  # the bias's gradient is constant
        return [torch.zeros_like(t) if s is None else s for t, s in zip(leaves, second)]

    z = (lambda: x if r is None else x + r)
    torch_norm = (lambda: F.rms_norm(z(), (32,), w, 1e-5)) if rms else (lambda: F.layer_norm(z(), (32,), w, b))
    ours = (lambda: ops.fast_norm(x, r, w, b, 1e-5, 1, rms, False, False, "auto"))
    for a, e in zip(hvp(ours), hvp(torch_norm)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_attention_double_backward_matches_the_op_path():
    """create_graph=True through the fast path's node: the Python path's differentiable
    backward, so second-order gradients equal those through the torch.library op."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    bias = torch.randn(1, 1, 5, 6, requires_grad=True)

    def second_order(fn):
        out = fn()
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, bias), create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), (q, k, bias))

    fast = second_order(lambda: _ext.FAST.attention(q, k, k, bias, True, False, None, False))
    slow = second_order(lambda: registration.attention_fwd(q, k, k, bias, None, 8 ** -0.5, True, False, 0.0, False,
                                                           "cpu")[0])
    for a, e in zip(fast, slow):
        torch.testing.assert_close(a, e)


def test_residual_gradient_shared_with_x_never_aliases_the_accumulated_grads():
    """The fast path hands x and the residual one gradient tensor (same dtype, no dropout);
    autograd must still give each leaf its own .grad, right after repeated backwards."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32)
    for _ in range(2):
        fusedlayers.add_layer_norm(x, r, w, None).pow(2).sum().backward()
    assert x.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(x.grad, r.grad, rtol=0, atol=0)
    x.grad.add_(1.0)  # in-place on one leaf's grad leaves the other's alone
    assert not torch.equal(x.grad, r.grad)
    xs, rs = x.detach().requires_grad_(), r.detach().requires_grad_()
    y = _norm_via_ops(xs, rs, w, None, 1e-5, False, False, False)
    dx, dr = torch.autograd.grad(y.pow(2).sum(), (xs, rs))
    torch.testing.assert_close(r.grad, 2 * dr, rtol=0, atol=0)


def test_backward_nodes_behave_as_torch_nodes():
    """The fast path's hand-written nodes: a second backward through freed buffers, a saved input
    modified in place, hooks and saved-tensor hooks act as on torch's generated nodes."""
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    y = fusedlayers.layer_norm(x, w)
    assert y.grad_fn.name() == "fusedlayers::NormBackward"
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()

    xx = x * 1
    y = fusedlayers.layer_norm(xx, w)
    xx.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    seen = []
    y = fusedlayers.layer_norm(x, w)
    y.grad_fn.register_prehook(lambda grad_outputs: seen.append("pre"))
    y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(len(grad_inputs)))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        z = fusedlayers.attention(*(torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3)), causal=True)
    y.sum().backward()
    z.sum().backward()
    assert seen == ["pre", 4] and len(packed) >= 5  # q, k, v, out, lse

    # forward-mode AD: the Python path serves it (the nodes are reverse-mode only)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(4, 32), torch.randn(4, 32))
        assert _ext.FAST.norm(dual, None, None, None, 1e-5, 1, False, False, False) is None


@pytest.mark.parametrize("op", ("norm", "attention"))
def test_compiled_autograd_traces_the_backward_nodes(op):
    """torch.compile of a backward (compiled autograd) traces through the nodes' kernel ops (their
    Meta kernels give the shapes) and gives the eager gradients."""
    from torch._dynamo import compiled_autograd

    torch.manual_seed(0)
    if op == "norm":
        inputs = (torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True),
                  torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True))
        fn = lambda x, r, w, b: fusedlayers.add_layer_norm(x, r, w, b)  # noqa: E731
    else:
        inputs = (torch.randn(1, 2, 5, 8, requires_grad=True), torch.randn(1, 2, 6, 8, requires_grad=True),
                  torch.randn(1, 2, 6, 8, requires_grad=True), torch.randn(1, 1, 5, 6, requires_grad=True))
        fn = lambda q, k, v, bias: fusedlayers.attention(q, k, v, attn_mask=bias)  # noqa: E731
    out = fn(*inputs)
    assert out.grad_fn.name().startswith("fusedlayers::")
    expected = torch.autograd.grad(out.pow(2).sum(), inputs)
    out = fn(*inputs)
    torch._dynamo.reset()
    with compiled_autograd._enable(lambda gm: torch.compile(gm, backend="eager", fullgraph=True)):
        got = torch.autograd.grad(out.pow(2).sum(), inputs)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_forward_mode_and_functorch_grad_are_refused_not_silently_zero():
    """A torch.library op under forward-mode AD gives a zero tangent without an error; the ops refuse
    such calls (and torch.func.grad) by name, on the fast path and the Python path alike, and vmap serves."""
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(4, 32), torch.randn(4, 32)
    q = torch.randn(1, 2, 4, 8)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fusedlayers.layer_norm(dual)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fusedlayers.attention(fwAD.make_dual(q, q), q, q)
        fusedlayers.layer_norm(x)  # no tangent: served
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(fusedlayers.rms_norm, (x,), (t,))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda a: fusedlayers.attention(a, a, a).sum())(q)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(lambda a: fusedlayers.attention_varlen(a, a, a, cu, cu, 4, 4), (q[0].transpose(0, 1),),
                       (q[0].transpose(0, 1),))
    batched = torch.func.vmap(fusedlayers.layer_norm)(x.view(2, 2, 32))
    torch.testing.assert_close(batched, F.layer_norm(x.view(2, 2, 32), (32,)))
