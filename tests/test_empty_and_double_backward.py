"""PyTorch's semantics at the edges: empty inputs return what torch returns (with working
autograd, opcheck and torch.compile), double backward (create_graph=True) works through
every op, a 0-d input to a norm is refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusedlayers
from fusedlayers import testing

from conftest import DEVICE, skip_unless_serves

ops = torch.ops.fusedlayers
# Empty calls never reach a kernel, so every backend name serves them (triton included, on CPU).
BACKENDS = ("auto",) + fusedlayers.BACKENDS


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_()


def _detached(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------- empty inputs

# (q, k, v) shapes: batch 0, heads 0, Nq = 0, Nk = 0, head dim 0 (with and without a Dv), Dv = 0
EMPTY_ATTENTION = [((0, 2, 3, 8), (0, 2, 4, 8), (0, 2, 4, 8)),
                   ((1, 0, 3, 8), (1, 0, 4, 8), (1, 0, 4, 8)),
                   ((1, 2, 0, 8), (1, 2, 4, 8), (1, 2, 4, 8)),
                   ((2, 4, 3, 8), (2, 2, 0, 8), (2, 2, 0, 8)),
                   ((1, 2, 3, 0), (1, 2, 4, 0), (1, 2, 4, 0)),
                   ((1, 2, 3, 0), (1, 2, 4, 0), (1, 2, 4, 5)),
                   ((1, 2, 3, 4), (1, 2, 4, 4), (1, 2, 4, 0))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", EMPTY_ATTENTION, ids=str)
def test_empty_attention_matches_sdpa(shapes, backend):
    q, k, v = (_leaf(*s) for s in shapes)
    mask = torch.randn(1, 1, shapes[0][2], shapes[1][2], device=DEVICE, requires_grad=True)
    out, lse = fusedlayers.attention(q, k, v, mask, return_lse=True, backend=backend)
    q2, k2, v2, mask2 = _detached(q, k, v, mask)
    gqa = shapes[0][1] != shapes[1][1]
    want = F.scaled_dot_product_attention(q2, k2, v2, mask2, enable_gqa=gqa,
                                          scale=None if shapes[0][3] else 1.0)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert lse.shape == shapes[0][:3] and lse.dtype == torch.float32
    torch.testing.assert_close(out, want)
    if shapes[1][2] == 0:  # no key at all: as a fully masked row
        assert bool((lse == float("-inf")).all())
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout)
    for ours, theirs in ((q, q2), (k, k2), (v, v2), (mask, mask2)):
        assert ours.grad is not None and ours.grad.shape == ours.shape
        # SDPA leaves the mask's grad None on a batch of 0; ours is zeros
        torch.testing.assert_close(ours.grad, theirs.grad if theirs.grad is not None else torch.zeros_like(ours))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_attention_varlen(backend):
    # no query token; then queries with no key token (each sequence empty on the key side)
    for tq, tk, cu_q, cu_k in ((0, 5, [0, 0, 0], [0, 2, 5]), (4, 0, [0, 1, 4], [0, 0, 0])):
        q, k, v = _leaf(tq, 2, 8), _leaf(tk, 2, 8), _leaf(tk, 2, 8)
        cq, ck = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k))
        out, lse = fusedlayers.attention_varlen(q, k, v, cq, ck, max(1, tq), max(1, tk) if tk else 0,
                                                return_lse=True, backend=backend)
        assert out.shape == (tq, 2, 8) and lse.shape == (2, tq)
        assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad.shape == t.shape and bool((t.grad == 0).all())
    with pytest.raises(ValueError, match="cu_seqlens_k"):  # values are still checked on an empty call
        fusedlayers.attention_varlen(_leaf(0, 2, 8), _leaf(3, 2, 8), _leaf(3, 2, 8),
                                     torch.tensor([0, 0], dtype=torch.int32, device=DEVICE),
                                     torch.tensor([0, 2], dtype=torch.int32, device=DEVICE), 0, 3, backend=backend)


def _torch_norm(op, x, r, w, b):
    z = x + r if r is not None else x
    y = F.rms_norm(z, (z.shape[-1],), w, 1e-6) if "rms" in op else F.layer_norm(z, (z.shape[-1],), w, b, 1e-5)
    return y, z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 8), (0,), (4, 0, 0)], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_empty_norms_match_torch(op, shape, backend):
    n = shape[-1]
    x, r, w, b = _leaf(*shape), _leaf(*shape), _leaf(n), _leaf(n)
    fn = getattr(fusedlayers, op)
    if op == "layer_norm":
        out = (fn(x, w, b, backend=backend),)
    elif op == "rms_norm":
        out = (fn(x, w, backend=backend),)
    elif op == "add_layer_norm":
        out = fn(x, r, w, b, prenorm=True, backend=backend)
    else:
        out = fn(x, r, w, prenorm=True, backend=backend)
    x2, r2, w2, b2 = _detached(x, r, w, b)
    want = _torch_norm(op, x2, r2 if op.startswith("add") else None, w2, None if "rms" in op else b2)[:len(out)]
    for o, t in zip(out, want):
        assert o.shape == t.shape and o.dtype == t.dtype
    sum(o.sum() for o in out).backward()
    sum(t.sum() for t in want).backward()
    for ours, theirs in ((x, x2), (r, r2), (w, w2), (b, b2)):
        if theirs.grad is None:
            assert ours.grad is None
            continue
        assert ours.grad is not None and ours.grad.shape == ours.shape
        torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("module", [fusedlayers.nn.LayerNorm(8), fusedlayers.nn.RMSNorm(8),
                                    fusedlayers.nn.AddLayerNorm(8)], ids=lambda m: type(m).__name__)
def test_empty_batch_through_modules(module):
    module = module.to(DEVICE)
    x = _leaf(0, 5, 8)
    y = module(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and module.weight.grad is not None and bool((module.weight.grad == 0).all())


def test_zero_dim_input_to_a_norm_names_x():
    x = torch.tensor(3.0, device=DEVICE)
    for call in (lambda: fusedlayers.layer_norm(x), lambda: fusedlayers.rms_norm(x),
                 lambda: fusedlayers.add_layer_norm(x, None, None, None), lambda: fusedlayers.add_rms_norm(x, x, None)):
        with pytest.raises(ValueError, match="x must have at least 1 dim"):
            call()
    for module in (fusedlayers.nn.LayerNorm(1), fusedlayers.nn.RMSNorm(1)):
        with pytest.raises(ValueError, match="normalized_shape"):
            module.to(DEVICE)(x)
    with pytest.raises(ValueError, match="normalized_shape must have at least one dim"):
        fusedlayers.nn.LayerNorm([]).to(DEVICE)(torch.randn(3, 4, device=DEVICE))


def test_opcheck_and_compile_on_empty_inputs():
    q, k, v = _leaf(0, 2, 3, 8), _leaf(0, 2, 4, 8), _leaf(0, 2, 4, 8)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, None, None, 0.5, False, False, 0.0, False, "reference"))
    q1, kv = _leaf(1, 2, 3, 8), _leaf(1, 2, 0, 8)
    torch.library.opcheck(ops.attention_fwd, (q1, kv, kv, None, None, 0.5, True, False, 0.0, False, "reference"))
    x, w = _leaf(0, 8), _leaf(8)
    torch.library.opcheck(ops.norm_fwd, (x, None, w, None, None, 1e-5, 0.0, False, False, False, "reference"))

    def block(q, k, v, x, w):
        return fusedlayers.attention(q, k, v).sum() + fusedlayers.layer_norm(x, w).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(q1, kv, kv, x, w)
    grads = torch.autograd.grad(out, (q1, kv, x, w))
    assert [g.shape for g in grads] == [q1.shape, kv.shape, x.shape, w.shape]


# ---------------------------------------------------------------------------- double backward


def _norm_calls(backend):
    return {
        "layer_norm": lambda x, r, w, b: fusedlayers.layer_norm(x, w, b, backend=backend),
        "rms_norm": lambda x, r, w, b: fusedlayers.rms_norm(x, w, backend=backend),
        "add_layer_norm": lambda x, r, w, b: fusedlayers.add_layer_norm(x, r, w, b, backend=backend),
        "add_layer_norm_prenorm": lambda x, r, w, b: fusedlayers.add_layer_norm(x, r, w, b, prenorm=True,
                                                                               backend=backend),
        "add_rms_norm_prenorm": lambda x, r, w, b: fusedlayers.add_rms_norm(x, r, w, prenorm=True, backend=backend),
    }


@pytest.mark.parametrize("op", list(_norm_calls("reference")))
def test_norm_gradgradcheck_float64_reference(op):
    torch.manual_seed(0)
    fn = _norm_calls("reference")[op]
    args = (_leaf(3, 6, dtype=torch.float64), _leaf(3, 6, dtype=torch.float64), _leaf(6, dtype=torch.float64),
            _leaf(6, dtype=torch.float64))
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


def test_norm_gradgradcheck_with_dropout():
    # the second derivative reuses the forward's own keep-mask
    def fn(x, r, w, b):
        torch.manual_seed(3)
        return fusedlayers.add_layer_norm(x, r, w, b, dropout_p=0.3, prenorm=True, backend="reference")

    args = tuple(_leaf(*s, dtype=torch.float64) for s in ((3, 6), (3, 6), (6,), (6,)))
    assert gradgradcheck(fn, args)


def _penalty(norm, x, r, w, b):
    """A gradient penalty: ||d sum(y^3) / d(x, r)||^2, then its gradient (double backward)."""
    y = norm(x, r, w, b)
    y = y[0] if isinstance(y, tuple) else y
    gx, gr = torch.autograd.grad((y ** 3).sum(), (x, r), create_graph=True)
    penalty = gx.square().sum() + (gr * r).sum()
    return torch.autograd.grad(penalty, (x, r, w, b), allow_unused=True)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_double_backward_matches_torch(backend, rms):
    """Our add + norm against torch's (x + r then nn.LayerNorm / nn.RMSNorm) in a gradient
    penalty, both against float64, by the test method's rule (3x torch's float32 error)."""
    skip_unless_serves("norm", backend, testing.norm_call_for(testing.NormCase(rms=rms), torch.float32, DEVICE))
    torch.manual_seed(0)
    x, r = torch.randn(4, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE)
    w, b = 0.5 + torch.rand(32, device=DEVICE), torch.randn(32, device=DEVICE)

    def theirs(x, r, w, b):
        z = x + r
        return F.rms_norm(z, (32,), w, 1e-6) if rms else F.layer_norm(z, (32,), w, b, 1e-5)

    def ours(x, r, w, b):
        if rms:
            return fusedlayers.add_rms_norm(x, r, w, 1e-6, backend=backend)
        return fusedlayers.add_layer_norm(x, r, w, b, 1e-5, backend=backend)

    def run(fn, dtype):
        args = [t.to(dtype).requires_grad_() for t in (x, r, w, b)]
        grads = _penalty(fn, *args)
        return [g if g is not None else torch.zeros_like(a) for g, a in zip(grads, args)]

    ref64, torch32, got = run(theirs, torch.float64), run(theirs, torch.float32), run(ours, torch.float32)
    comparisons = [testing.compare(name, g, r64, t32, 3.0) for name, g, r64, t32 in
                   zip(("dx", "dr", "dw", "db"), got, ref64, torch32)]
    testing.assert_all_ok(comparisons, f"double backward, {backend}, rms={rms}")


def test_attention_gradgradcheck_float64_reference():
    torch.manual_seed(0)
    q = _leaf(1, 2, 3, 4, dtype=torch.float64)
    k, v = _leaf(1, 1, 5, 4, dtype=torch.float64), _leaf(1, 1, 5, 4, dtype=torch.float64)
    bias = _leaf(1, 2, 3, 5, dtype=torch.float64)
    assert gradgradcheck(lambda q, k, v, m: fusedlayers.attention(q, k, v, m, causal=True, backend="reference"),
                         (q, k, v, bias))

    def dropped(q, k, v):
        torch.manual_seed(1)
        return fusedlayers.attention(q, k, v, dropout_p=0.3, backend="reference")

    assert gradgradcheck(dropped, (q, k, v))
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)
    packed = [_leaf(3, 2, 4, dtype=torch.float64) for _ in range(3)]
    assert gradgradcheck(lambda q, k, v: fusedlayers.attention_varlen(q, k, v, cu, cu, 2, 2, causal=True,
                                                                      backend="reference"), packed)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_attention_double_backward_matches_sdpa(backend):
    case = testing.AttentionCase(b=1, hq=2, hkv=2, nq=5, nk=7, d=8, mask="bias")
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, DEVICE))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)

    def run(fn, dtype):
        args = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*args)
        gq, gk = torch.autograd.grad(out.square().sum(), args[:2], create_graph=True)
        return torch.autograd.grad(gq.square().sum() + (gk * args[1]).sum(), args)

    def theirs(q, k, v):  # the math backend: the fused CPU one has no double backward
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours(q, k, v):
        return fusedlayers.attention(q, k, v, causal=True, backend=backend)

    ref64, torch32, got = run(theirs, torch.float64), run(theirs, torch.float32), run(ours, torch.float32)
    testing.assert_all_ok([testing.compare(n, g, r, t, 3.0) for n, g, r, t in
                           zip(("dq", "dk", "dv"), got, ref64, torch32)], f"attention double backward, {backend}")


def test_varlen_double_backward_with_dropout_names_it():
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    q = _leaf(4, 2, 8)
    out = fusedlayers.attention_varlen(q, q, q, cu, cu, 2, 2, dropout_p=0.5, backend="reference")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
