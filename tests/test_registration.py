"""The torch.library registration: opcheck (schema, fake tensor, autograd, aot dispatch,
with non-contiguous samples) and torch.compile(fullgraph=True) forward + backward without a
graph break, for every op on every backend that serves the device."""

import pytest
import torch

import fusedlayers
from fusedlayers import dispatch, registration, testing
from fusedlayers.testing import AttentionCase, NormCase

from conftest import DEVICE, skip_unless_serves

ops = torch.ops.fusedlayers


def _attention_samples(backend):
    samples = []
    for case in (AttentionCase(b=1, hq=4, hkv=2, nq=17, nk=32, d=16, strided=True, mask="bias", causal="top_left"),
                 AttentionCase(b=2, hq=2, hkv=2, nq=32, nk=17, d=8, mask="key_padding", dropout_p=0.1)):
        skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, DEVICE))
        q, k, v, mask, dout, dlse = testing.make_attention_inputs(case, torch.float32, DEVICE)
        seed = torch.tensor(5, dtype=torch.int64) if case.dropout_p else None
        samples.append((q, k, v, mask, seed, 0.3, case.causal is not None, False, case.dropout_p, False, backend))
    return samples


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_opcheck_attention(backend):
    for args in _attention_samples(backend):
        torch.library.opcheck(ops.attention_fwd, args)
        q, k, v, mask, seed, scale, causal, bottom_right, p, det, name = args
        out, lse = ops.attention_fwd(*args)
        # the backward op has no double-backward formula: check it on detached inputs
        q, k, v, mask, out, lse = (t.detach() if t is not None else None for t in (q, k, v, mask, out, lse))
        torch.library.opcheck(ops.attention_bwd, (torch.randn_like(out), torch.randn_like(lse), q, k, v, mask, out,
                                                  lse, seed, scale, causal, bottom_right, p, det,
                                                  mask is not None and mask.dtype != torch.bool, name))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_opcheck_varlen(backend):
    call = dispatch.AttentionCall(torch.device(DEVICE), torch.float32, 2, 4, 2, 9, 9, 16, 16, None, False, True, 0.0,
                                  False, True)
    skip_unless_serves("attention", backend, call)
    q = torch.randn(16, 4, 16, device=DEVICE).requires_grad_()
    k = torch.randn(2, 16, 2, 16, device=DEVICE)[0].requires_grad_()  # a view, not the start of its storage
    v = torch.randn(16, 2, 16, device=DEVICE).requires_grad_()
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(ops.varlen_fwd, (q, k, v, cu, cu, 9, 9, None, 0.25, True, True, 0.0, False, backend))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("case", [NormCase(rows=5, hidden=24, residual=True, prenorm=True, strided=True),
                                  NormCase(rows=5, hidden=24, rms=True, bias=False, dropout_p=0.2),
                                  NormCase(rows=3, hidden=16, weight=False, bias=False),
                                  NormCase(rows=3, hidden=16, residual=True, residual_in_fp32=True)], ids=str)
def test_opcheck_norm(case, backend):
    skip_unless_serves("norm", backend, testing.norm_call_for(case, torch.float32, DEVICE))
    x, residual, weight, bias, dy, _ = testing.make_norm_inputs(case, torch.float32, DEVICE)
    seed = torch.tensor(9, dtype=torch.int64) if case.dropout_p else None
    args = (x, residual, weight, bias, seed, 1e-5, case.dropout_p, case.rms, case.prenorm, case.residual_in_fp32,
            backend)
    torch.library.opcheck(ops.norm_fwd, args)
    y, z, mean, rstd = ops.norm_fwd(*args)
    zin = z if z.numel() else x
    weight, bias = (t.detach() if t is not None else None for t in (weight, bias))
    torch.library.opcheck(ops.norm_bwd, (dy, None, zin.detach(), weight, bias, mean.detach(), rstd.detach(), seed, 1e-5,
                                         case.dropout_p, case.rms, x.dtype,
                                         residual.dtype if residual is not None else None, backend))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_norm_without_backward_keeps_no_stream(backend):
    case = NormCase(rows=6, hidden=24, residual=True)
    skip_unless_serves("norm", backend, testing.norm_call_for(case, torch.float32, DEVICE))
    x, residual, weight, bias = (t.detach() for t in testing.make_norm_inputs(case, torch.float32, DEVICE)[:4])
    args = (x, residual, weight, bias, None, 1e-5, 0.0, False, False, False, backend)
    torch.library.opcheck(ops.norm_fwd, args + (False,))
    # the empty z of a stream left out has the stream's dtype, as the fake op says: bf16 beside float32 x, float32
    # beside bf16 x
    torch.library.opcheck(ops.norm_fwd, (x, residual.bfloat16(), *args[2:], False))
    torch.library.opcheck(ops.norm_fwd, (x.bfloat16(), residual, weight, bias, None, 1e-5, 0.0, False, False, True,
                                         backend, False))
    with torch.no_grad():
        y_kept, z_kept, _, _ = ops.norm_fwd(*args)
        y, z, _, _ = ops.norm_fwd(*args, False)
        assert z_kept.shape == x.shape and z.numel() == 0 and torch.equal(y, y_kept)
        # nor a 16-bit one, and y is still the norm of z rounded to the stream's dtype; prenorm's z is kept
        seed = torch.tensor(9, dtype=torch.int64)
        for args16 in ((x, residual.bfloat16(), *args[2:]),  # a bf16 stream beside float32 x
                       (x.half(), residual.half(), weight.half(), bias.half(), seed, 1e-5, 0.1, *args[7:])):
            y_kept, z_kept, _, _ = ops.norm_fwd(*args16)
            y16, z16, _, _ = ops.norm_fwd(*args16, False)
            assert z_kept.shape == x.shape and z16.numel() == 0 and torch.equal(y16, y_kept)
        assert ops.norm_fwd(*args[:8], True, *args[9:], False)[1].shape == x.shape
        # the public ops ask for no z without grad, and get the same y
        torch.testing.assert_close(fusedlayers.add_layer_norm(x, residual, weight, bias, backend=backend), y,
                                   rtol=0, atol=0)
    # a caller that says no backward will run, then runs one, gets an error rather than a wrong gradient
    xg = x.detach().requires_grad_()
    y, _, _, _ = ops.norm_fwd(xg, *args[1:], False)
    with pytest.raises(RuntimeError, match="needs_grad=False"):
        y.sum().backward()


def _compiled_matches_eager(fn, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    results = []
    for f in (fn, compiled):
        torch.manual_seed(0)
        out = f(*inputs)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        results.append((out, grads))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_compile_fullgraph_attention(backend):
    case = AttentionCase(b=2, hq=4, hkv=2, nq=17, nk=32, d=16, mask="bias", causal="bottom_right")
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, DEVICE))
    q, k, v, mask, _, _ = testing.make_attention_inputs(case, torch.float32, DEVICE)

    def block(q, k, v, mask):
        out, lse = fusedlayers.attention(q * 1.5, k, v, mask, causal=True, causal_align="bottom_right",
                                         dropout_p=0.1, return_lse=True, backend=backend)
        return out.sum(-1) + lse

    _compiled_matches_eager(block, (q, k, v, mask))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_compile_fullgraph_varlen(backend):
    call = dispatch.AttentionCall(torch.device(DEVICE), torch.float32, 2, 2, 2, 9, 9, 8, 8, None, False, True, 0.0,
                                  False, True)
    skip_unless_serves("attention", backend, call)
    q, k, v = (torch.randn(16, 2, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=DEVICE)

    def fn(q, k, v):
        return fusedlayers.attention_varlen(q, k, v, cu, cu, 9, 9, causal=True, backend=backend) * 2

    _compiled_matches_eager(fn, (q, k, v))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_compile_fullgraph_norms(backend):
    skip_unless_serves("norm", backend, testing.norm_call_for(NormCase(), torch.float32, DEVICE))
    x, r = (torch.randn(3, 5, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(32, device=DEVICE, requires_grad=True) for _ in range(2))

    def block(x, r, w, b):
        y, stream = fusedlayers.add_layer_norm(x, r, w, b, dropout_p=0.1, prenorm=True, backend=backend)
        h = fusedlayers.layer_norm(y * 2, w, b, backend=backend) + fusedlayers.rms_norm(y, w, backend=backend)
        return fusedlayers.add_rms_norm(h, stream, w, backend=backend)

    _compiled_matches_eager(block, (x, r, w, b))


def test_fake_outputs_match_real_strides():
    # The fake implementation must describe what the backend really returns.
    q = torch.randn(2, 8, 4, 16).transpose(1, 2)  # non-contiguous (B, H, N, D)
    real = ops.attention_fwd(q, q, q, None, None, 0.25, False, False, 0.0, False, "reference")
    with torch._subclasses.FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        fake = ops.attention_fwd(fq, fq, fq, None, None, 0.25, False, False, 0.0, False, "reference")
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


def test_every_op_is_in_the_fusedlayers_namespace():
    for name in ("attention_fwd", "attention_bwd", "varlen_fwd", "varlen_bwd", "norm_fwd", "norm_bwd"):
        assert hasattr(ops, name), name
    assert registration.attention_fwd._qualname == "fusedlayers::attention_fwd"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_eager_path_equals_the_op(backend, monkeypatch):
    """registration.norm / registration.attention skip the torch.library op in eager mode (an
    autograd.Function over the op's own body): outputs and gradients are bitwise those of the op,
    and under a dispatch mode (what opcheck and fake tensors use) the op itself runs."""
    skip_unless_serves("norm", backend, testing.norm_call_for(NormCase(rows=6, hidden=32, residual=True, dropout_p=0.1),
                                                              torch.float32, DEVICE))
    gen = torch.Generator().manual_seed(3)

    def leaves(*shapes):
        return [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]

    x, r, w, b = leaves((6, 32), (6, 32), (32,), (32,))
    q, k, v = leaves((1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16))
    seed = torch.tensor(5)
    runs = {}
    for path in ("eager", "op"):
        if path == "op":
            monkeypatch.setattr(registration, "eager", lambda *t: False)
        for t in (x, r, w, b, q, k, v):
            t.grad = None
        y, z, _, _ = registration.norm(x, r, w, b, seed, 1e-5, 0.1, False, True, False, backend)
        (y.square().sum() + z.sum()).backward()
        o, lse = registration.attention(q, k, v, None, seed, 0.25, True, False, 0.0, False, backend)
        (o.square().sum() + lse.sum()).backward()
        runs[path] = [t.detach().clone() for t in (y, z, o, lse)] + [t.grad.clone() for t in (x, r, w, b, q, k, v)]
    for got, want in zip(runs["eager"], runs["op"]):
        assert torch.equal(got, want)
    monkeypatch.undo()
    assert registration.eager(x) and not registration.eager(x.detach().as_subclass(_Sub))
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        registration.norm(x.detach(), None, None, None, None, 1e-5, 0.0, False, False, False, backend, False)
    assert any("fusedlayers.norm_fwd" in o for o in mode.ops), mode.ops


class _Sub(torch.Tensor):
    pass
