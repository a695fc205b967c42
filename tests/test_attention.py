"""fusedlayers.attention / attention_varlen on every backend, against the float64 reference
with the test method's tolerance rule (fusedlayers.testing)."""

import pytest
import torch

import fusedlayers
from fusedlayers import dispatch, reference, testing
from fusedlayers.testing import AttentionCase

from conftest import DEVICE, skip_unless_serves

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(x):
    return str(x).replace("torch.", "")


def _run(case, dtype, backend):
    skip_unless_serves("attention", backend, testing.attention_call_for(case, dtype, DEVICE))
    testing.assert_all_ok(testing.check_attention(case, dtype, DEVICE, backend), f"{backend} {case} {dtype}")


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", testing.attention_grid("default"), ids=str)
def test_grid(case, dtype, backend):
    _run(case, dtype, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_full_grid(full_attention_case, dtype, backend):
    _run(full_attention_case, dtype, backend)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grad(backend):
    case = AttentionCase(b=1, hq=2, hkv=2, nq=17, nk=64, d=32, mask="bool")
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, DEVICE))
    q, k, v, mask, dout, _ = testing.make_attention_inputs(case, torch.float32, DEVICE)
    mask = mask.clone()
    mask[..., 5, :] = False  # row 5 of every head sees nothing, row 0 already sees nothing
    out, lse = fusedlayers.attention(q, k, v, mask, return_lse=True, backend=backend)
    (out * dout).sum().backward()
    for row in (0, 5):
        assert torch.all(out[:, :, row] == 0) and torch.all(lse[:, :, row] == float("-inf"))
        assert torch.all(q.grad[:, :, row] == 0)
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_bottom_right_with_more_queries_than_keys(backend):
    # Nq > Nk, bottom-right: the first Nq - Nk query rows see no key at all.
    case = AttentionCase(b=1, hq=2, hkv=1, nq=40, nk=16, d=16, causal="bottom_right")
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, DEVICE))
    q, k, v, _, _, _ = testing.make_attention_inputs(case, torch.float32, DEVICE)
    out = fusedlayers.attention(q, k, v, causal=True, causal_align="bottom_right", backend=backend)
    assert torch.all(out[:, :, :24] == 0) and torch.all(out[:, :, 24:].abs().sum(-1) > 0)
    testing.assert_all_ok(testing.check_attention(case, torch.float32, DEVICE, backend))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_dropout_is_reproducible_and_keeps_the_right_fraction(backend):
    case = AttentionCase(b=2, hq=4, hkv=2, nq=64, nk=128, d=32, dropout_p=0.25)
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, DEVICE))
    q, k, v, _, _, _ = testing.make_attention_inputs(case, torch.float32, DEVICE)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(fusedlayers.attention(q, k, v, dropout_p=0.25, backend=backend))
    assert torch.equal(outs[0], outs[1]), "same torch seed must give the same dropout mask"
    assert not torch.equal(outs[0], outs[2]), "another torch seed must give another dropout mask"
    impl = dispatch.implementation("attention", backend)
    keep = impl.dropout_keep_mask(12345, (4, 8, 256, 256), 0.25, DEVICE)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5, rate  # 5 sigma of a binomial
    assert torch.equal(keep, impl.dropout_keep_mask(12345, (4, 8, 256, 256), 0.25, DEVICE))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible(backend):
    case = AttentionCase(b=2, hq=4, hkv=1, nq=113, nk=128, d=64, mask="bias", causal="top_left")
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float16, DEVICE))
    q, k, v, mask, dout, _ = testing.make_attention_inputs(case, torch.float16, DEVICE)
    runs = []
    for _ in range(2):
        out = fusedlayers.attention(q, k, v, mask, causal=True, deterministic=True, backend=backend)
        runs.append(torch.autograd.grad(out, (q, k, v, mask), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# v with its own head dim (MLA-style 192/128 scaled down): wider and narrower than q's, with the
# features that touch the value side (bias gradient, dropout, GQA, causal).
VALUE_HEAD_DIM_CASES = [
    AttentionCase(b=2, hq=4, hkv=2, nq=70, nk=96, d=48, dv=32, mask="bias", causal="bottom_right"),
    AttentionCase(b=1, hq=2, hkv=1, nq=33, nk=64, d=16, dv=40, dropout_p=0.2, mask="key_padding"),
]


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("case", VALUE_HEAD_DIM_CASES, ids=str)
def test_value_head_dim_differs(case, dtype, backend):
    _run(case, dtype, backend)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_matches_torch_sdpa(backend):
    # The drop-in claim: same layout, same mask convention, same answer as SDPA.
    case = AttentionCase(b=2, hq=4, hkv=4, nq=64, nk=64, d=32, mask="key_padding")
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, DEVICE))
    q, k, v, mask, _, _ = testing.make_attention_inputs(case, torch.float32, DEVICE)
    for causal in (False, True):
        m = None if causal else mask  # SDPA refuses a mask together with is_causal
        ours = fusedlayers.attention(q, k, v, m, causal=causal, backend=backend)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, m, is_causal=causal)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


VARLEN_CASES = [
    dict(lens_q=[17, 1, 64], lens_k=[17, 1, 64], causal=None),
    dict(lens_q=[5, 40, 13], lens_k=[30, 40, 7], causal="bottom_right"),
    dict(lens_q=[5, 40, 13], lens_k=[30, 40, 7], causal="top_left", dropout_p=0.2),
    dict(lens_q=[5, 40, 13], lens_k=[30, 40, 7], causal="bottom_right", dv=48),  # v's own head dim
]


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("spec", VARLEN_CASES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_varlen_matches_dense_per_sequence(spec, dtype, backend):
    """Packed attention equals, sequence by sequence, the float64 dense reference."""
    hq, hkv, d, p, dv = 4, 2, 32, spec.get("dropout_p", 0.0), spec.get("dv", 32)
    lens_q, lens_k, causal = spec["lens_q"], spec["lens_k"], spec["causal"]
    call = dispatch.AttentionCall(torch.device(DEVICE), dtype, len(lens_q), hq, hkv, max(lens_q), max(lens_k), d, dv,
                                  None, False, causal is not None, p, False, True)
    skip_unless_serves("attention", backend, call)
    gen = torch.Generator().manual_seed(3)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
               for shape in ((tq, hq, d), (tk, hkv, d), (tk, hkv, dv)))
    cu = lambda lens: torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    torch.manual_seed(0)
    out, lse = fusedlayers.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal is not None,
                                            causal_align=causal or "top_left", dropout_p=p, return_lse=True,
                                            backend=backend)
    assert out.shape == (tq, hq, dv) and lse.shape == (hq, tq)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = None
    if p:
        torch.manual_seed(0)
        seed = int(fusedlayers.ops._draw_seed(p))
        keep = dispatch.implementation("attention", backend).dropout_keep_mask(seed, (hq, tq, tk), p, DEVICE).cpu()
    # float64 truth, one sequence at a time through the dense reference
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    outs, lses = [], []
    for b in range(len(lens_q)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, l = reference.attention(q64[sq].transpose(0, 1)[None], k64[sk].transpose(0, 1)[None],
                                   v64[sk].transpose(0, 1)[None], causal=causal is not None,
                                   causal_align=causal or "top_left", dropout_p=p,
                                   dropout_mask=keep[:, sq, sk][None] if keep is not None else None)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    out64, lse64 = torch.cat(outs), torch.cat(lses, dim=1)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.cpu().double())
    # PyTorch's own error at this dtype: the packed reference run in the dtype
    qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
    o_t, l_t = reference.attention_varlen(qt, kt, vt, cu_q, cu_k, causal=causal is not None,
                                          causal_align=causal or "top_left", dropout_p=p,
                                          dropout_mask=keep.to(DEVICE) if keep is not None else None)
    grads_t = torch.autograd.grad(o_t, (qt, kt, vt), dout)
    comps = [testing.compare("out", out, out64, o_t, testing.OUT_FACTOR),
             testing.compare("lse", lse, lse64, l_t.float(), testing.OUT_FACTOR)]
    for name, g, g64, gt in zip(("dq", "dk", "dv"), grads, grads64, grads_t):
        comps.append(testing.compare(name, g, g64, gt, testing.GRAD_FACTOR))
    testing.assert_all_ok(comps, f"{backend} varlen {spec} {dtype}")
