"""The cpu backend's own tests (csrc/, backend "cpu"), beyond the shared grids: the tile
math of csrc/common/ on the host, the Philox dropout stream, determinism, varlen against
dense, every SIMD level, and native-speed sizes (N = 2048, head dim 256) the shared default
grid leaves to --slow."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import fusedlayers
from fusedlayers import _ext, dispatch, testing
from fusedlayers.testing import AttentionCase, NormCase, VarlenCase

from conftest import skip_unless_serves, torch_threads

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension unavailable: {_ext.ERROR}")

ops = torch.ops.fusedlayers


# ------------------------------------------------------------------ csrc/common on the host


@pytest.mark.parametrize("ctr_key, expected", [
    # Random123 known-answer vectors of philox4x32-10: counter c0..c3, key k0 k1 -> output
    ([0, 0, 0, 0, 0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 6, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_known_answers(ctr_key, expected):
    assert ops._philox4x32(torch.tensor(ctr_key, dtype=torch.int64)).tolist() == expected


def test_online_softmax_update_and_merge():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 300, generator=gen) * 4
    s[1, 100:] = float("-inf")  # the second half of row 1 masked: one merge side is empty
    s[2, :] = float("-inf")  # a row that sees nothing
    s[3, ::3] = float("-inf")
    for block in (1, 7, 64, 300):
        out = ops._online_softmax_test(s, block)
        lse = torch.logsumexp(s.double(), dim=-1)
        seen = torch.isfinite(lse)
        for col in (0, 1):
            torch.testing.assert_close(out[seen, col].double(), lse[seen], atol=2e-6, rtol=2e-6)
            assert torch.all(out[~seen, col] == float("-inf"))
        inv_sum = torch.where(seen, 1 / torch.exp(s.double() - s.double().amax(-1, keepdim=True)).sum(-1), 0)
        torch.testing.assert_close(out[:, 2].double(), inv_sum, atol=1e-6, rtol=2e-6)


def test_mean_var_welford_and_merge():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1000, generator=gen) * 3 + 100  # offset: naive sum-of-squares would lose digits
    var, mean = torch.var_mean(x.double(), dim=-1, unbiased=False)
    for block in (1, 3, 64, 1000):
        out = ops._mean_var_test(x, block).double()
        for m, v in ((out[:, 0], out[:, 1]), (out[:, 2], out[:, 3])):
            torch.testing.assert_close(m, mean, atol=1e-4, rtol=1e-6)
            torch.testing.assert_close(v, var, atol=0, rtol=1e-4)


# ------------------------------------------------------------------ dropout stream


def test_keep_mask_is_indexed_by_flat_position_and_keeps_1_minus_p():
    impl = dispatch.implementation("attention", "cpu")
    a = impl.dropout_keep_mask(77, (3, 5, 7, 11), 0.4, "cpu")
    b = impl.dropout_keep_mask(77, (3 * 5 * 7 * 11,), 0.4, "cpu")
    assert torch.equal(a.flatten(), b)
    assert torch.equal(a, dispatch.implementation("norm", "cpu").dropout_keep_mask(77, a.shape, 0.4, "cpu"))
    keep = impl.dropout_keep_mask(2**61 + 5, (1 << 22,), 0.1, "cpu")
    rate = keep.float().mean().item()
    assert abs(rate - 0.9) < 5 * (0.9 * 0.1 / keep.numel()) ** 0.5
    assert not torch.equal(keep, impl.dropout_keep_mask(2**61 + 6, (1 << 22,), 0.1, "cpu"))


def test_attention_dropout_uses_the_keep_mask():
    # out = (P * keep / (1 - p)) V with P from the undropped softmax: checked exactly in float64 terms.
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    torch.manual_seed(5)
    out = fusedlayers.attention(q, k, v, dropout_p=0.3, backend="cpu")
    torch.manual_seed(5)
    seed = int(fusedlayers.ops._draw_seed(0.3))
    keep = dispatch.implementation("attention", "cpu").dropout_keep_mask(seed, (1, 2, 33, 33), 0.3, "cpu")
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4, dim=-1)
    torch.testing.assert_close(out.double(), (p * keep / 0.7) @ v.double(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ determinism, varlen


def _attention_grads(case, dtype, **kw):
    q, k, v, mask, dout, dlse = testing.make_attention_inputs(case, dtype, "cpu")
    torch.manual_seed(11)
    out, lse = fusedlayers.attention(q, k, v, mask, causal=case.causal is not None, dropout_p=case.dropout_p,
                                     return_lse=True, backend="cpu", **kw)
    leaves = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    return [out, lse, *torch.autograd.grad((out, lse), leaves, (dout, dlse))]


def test_backward_is_bitwise_identical_across_runs_and_thread_counts():
    case = AttentionCase(b=2, hq=4, hkv=2, nq=200, nk=300, d=48, mask="bias", causal="top_left", dropout_p=0.2)
    runs = [_attention_grads(case, torch.bfloat16, deterministic=True) for _ in range(2)]
    with torch_threads(1):
        runs.append(_attention_grads(case, torch.bfloat16, deterministic=True))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_norm_backward_is_bitwise_reproducible():
    x, r, w, b = (torch.randn(*s, requires_grad=True) for s in ((300, 520), (300, 520), (520,), (520,)))
    dy = torch.randn(300, 520)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        y = fusedlayers.add_layer_norm(x, r, w, b, dropout_p=0.1, backend="cpu")
        runs.append(torch.autograd.grad(y, (x, r, w, b), dy))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_varlen_equals_dense_per_sequence(causal):
    gen = torch.Generator().manual_seed(4)
    lens_q, lens_k = [300, 1, 130], [260, 77, 130]
    hq, hkv, d = 4, 2, 40
    q = torch.randn(sum(lens_q), hq, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), hkv, d, generator=gen, requires_grad=True) for _ in range(2))
    cu = lambda lens: torch.tensor([0] + lens).cumsum(0).to(torch.int32)  # noqa: E731
    kw = dict(causal=causal is not None, causal_align=causal or "top_left", backend="cpu")
    out, lse = fusedlayers.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                            return_lse=True, **kw)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    for i in range(len(lens_q)):
        sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        qd, kd, vd = (t[s].detach().transpose(0, 1)[None].requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        o, l = fusedlayers.attention(qd, kd, vd, return_lse=True, **kw)
        g = torch.autograd.grad(o, (qd, kd, vd), dout[sq].transpose(0, 1)[None])
        torch.testing.assert_close(out[sq], o[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse[:, sq], l[0], atol=1e-6, rtol=1e-5)
        for packed, dense, s in zip(grads, g, (sq, sk, sk)):
            torch.testing.assert_close(packed[s], dense[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ score variants


def test_window_reads_only_the_keys_of_its_window():
    # Keys no query's window reaches hold NaN in k and v: a kernel that touched their blocks would get
    # 0 * NaN = NaN in P V (forward) and dP = dO V^T (backward). The windowed kernel skips them, and
    # matches the reference on the same problem with those keys finite.
    gen = torch.Generator().manual_seed(6)
    nq, nk, left, hq, d = 300, 6000, 700, 2, 32
    q = torch.randn(1, hq, nq, d, generator=gen)
    k, v = (torch.randn(1, 1, nk, d, generator=gen) for _ in range(2))
    dout = torch.randn(1, hq, nq, d, generator=gen)
    first = nk - nq - left  # the first key any query sees (bottom_right: query i sits at key nk - nq + i)
    kw = dict(causal=True, causal_align="bottom_right", window_size=(left, 0), softcap=4.0,
              alibi_slopes=torch.tensor([0.01, 0.002]))
    results = {}
    for backend in ("cpu", "reference"):
        kb, vb = k.clone(), v.clone()
        if backend == "cpu":
            kb[:, :, :first], vb[:, :, :first] = float("nan"), float("nan")
        leaves = [t.clone().requires_grad_() for t in (q, kb, vb)]
        out = fusedlayers.attention(*leaves, backend=backend, **kw)
        results[backend] = (out, *torch.autograd.grad(out, leaves, dout))
    (out, dq, dk, dv), (out_r, dq_r, dk_r, dv_r) = results["cpu"], results["reference"]
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
    assert torch.equal(dk[:, :, :first], torch.zeros_like(dk[:, :, :first]))
    assert torch.equal(dv[:, :, :first], torch.zeros_like(dv[:, :, :first]))
    for a, r in ((out, out_r), (dq, dq_r), (dk, dk_r), (dv, dv_r)):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def _assert_within_rule(inputs: tuple, dout, dlse, kw: dict, context: str, check_lse=None, backend="cpu") -> None:
    """The backend's out, lse and the gradients of ``inputs`` (q, k, v[, mask]) under the test rule:
    against the float64 reference, with the reference run in float32 as PyTorch's error."""
    out, lse = fusedlayers.attention(*inputs, return_lse=True, backend=backend, **kw)
    if check_lse is not None:
        assert check_lse(lse)
    grads = torch.autograd.grad((out, lse), inputs, (dout, dlse))
    refs = {}
    for label, cast in (("ref64", lambda t: t.detach().double().requires_grad_()),
                        ("torch", lambda t: t.detach().requires_grad_())):
        args = [cast(t) for t in inputs]
        o, l = fusedlayers.reference.attention(*args, **kw)
        refs[label] = (o, l, *torch.autograd.grad((o, l), args, (dout.to(o.dtype), dlse.to(l.dtype))))
    comps = [testing.compare(name, a, r, t, testing.OUT_FACTOR if name in ("out", "lse") else testing.GRAD_FACTOR)
             for name, a, r, t in zip(("out", "lse", "dq", "dk", "dv", "dbias"), (out, lse, *grads), refs["ref64"],
                                      refs["torch"])]
    testing.assert_all_ok(comps, context)


def test_variants_on_rows_of_huge_lse():
    # A +5000 bias on some query rows: |lse| >= 4096, where the backward recomputes the rows' max and
    # sum from the scores (kLseExact) and must apply softcap, ALiBi and the window there too.
    case = AttentionCase(b=1, hq=2, hkv=1, nq=40, nk=70, d=16, mask="bias", causal="bottom_right", window=(9, 3),
                         softcap=2.5, alibi=True)
    dtype = torch.float32
    q, k, v, mask, dout, dlse = testing.make_attention_inputs(case, dtype, "cpu")
    mask = (mask.detach() + torch.where(torch.arange(case.nq) % 3 == 0, 5000.0, 0.0)[:, None]).requires_grad_()
    variants = testing.make_variants(case, case.b, dtype, "cpu")
    kw = dict(causal=True, causal_align="bottom_right", **variants)
    _assert_within_rule((q, k, v, mask), dout, dlse, kw, str(case), check_lse=lambda lse: lse[0, 0, 0] > 4096)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_softcap_on_saturated_scores(softcap, backend):
    # Scores of 20 standard deviations: s / softcap spans the whole range of tanh, its slope 1 - tanh^2 down
    # to where tanh rounds to +-1 in float32; the kernel's tanh and slope must hold the rule there too.
    case = AttentionCase(b=1, hq=2, hkv=2, nq=150, nk=150, d=64, causal="top_left", softcap=softcap)
    skip_unless_serves("attention", backend, testing.attention_call_for(case, torch.float32, "cpu"))
    q, k, v, _, dout, dlse = testing.make_attention_inputs(case, torch.float32, "cpu")
    q = (q.detach() * 20).requires_grad_()
    _assert_within_rule((q, k, v), dout, dlse, dict(causal=True, softcap=softcap), f"{backend} softcap {softcap}",
                        backend=backend)


def test_softcap_rows_mixing_scores_inside_and_past_the_polynomial_range():
    # The cpu softcap takes the 16-score vectors whose every |s / c| < 0.625 in a first loop (a polynomial) and
    # the rest in a second (with exp), found again by the same test: rows of keys alternating, 16 at a time,
    # between small and large scores, with a partial last vector (77 keys), must land every score once, with its
    # derivative, in both loops.
    case = AttentionCase(b=1, hq=2, hkv=2, nq=40, nk=77, d=32, softcap=4.0)
    q, k, v, _, dout, dlse = testing.make_attention_inputs(case, torch.float32, "cpu")
    big = (torch.arange(case.nk) // 16) % 2 == 1  # keys 16-31 and 48-63: |s / c| mostly past 0.625
    k = (k.detach() * torch.where(big, 8.0, 0.05)[:, None]).requires_grad_()
    _assert_within_rule((q, k, v), dout, dlse, dict(softcap=4.0), str(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_non_finite_scores_where_the_product_gives_the_row_max(dtype):
    # K and V packed (two query blocks of 32) and no mask: the product's epilogue gives each row's max (a
    # lane-wise max that may drop a NaN) and the exponentials take the polynomial exp (fp16: MKL's products, the
    # row max read from the row, the polynomial exp straight to fp16). Rows as the float64
    # reference has them: a NaN query element (NaN row); a row whose scores are -inf but one NaN (+inf times k's
    # negative first column, and times 0 at key 550 of the second key block); a row with +inf scores (lse +inf,
    # NaN out); a NaN key element (head 2: every row NaN, though its max is finite); every other row within the
    # rule.
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 3, n, 32, generator=gen) for n in (64, 600, 600))
    q[0, 0, 3, 5] = float("nan")
    k[0, 0, :, 0] = -k[0, 0, :, 0].abs() - 0.5
    k[0, 0, 550, 0] = 0.0
    q[0, 0, 40, 0] = float("inf")
    q[0, 1, 10, 0] = float("inf")
    k[0, 2, 100, 7] = float("nan")
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, lse = fusedlayers.attention(q, k, v, return_lse=True, backend="cpu")
    ref_out, ref_lse = fusedlayers.reference.attention(q.double(), k.double(), v.double())
    same_out, same_lse = fusedlayers.reference.attention(q, k, v)
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())
    assert bool(out[0, 0, 3].isnan().all()) and bool(out[0, 0, 40].isnan().all()) and bool(lse[0, 0, 40].isnan())
    assert lse[0, 1, 10] == float("inf") and bool(out[0, 1, 10].isnan().all()) and bool(out[0, 2].isnan().all())
    finite = torch.ones(3, 64, dtype=torch.bool)
    finite[0, 3] = finite[0, 40] = finite[1, 10] = False
    finite[2] = False
    testing.assert_all_ok([testing.compare("out", out[0][finite], ref_out[0][finite], same_out[0][finite],
                                           testing.OUT_FACTOR),
                           testing.compare("lse", lse[0][finite], ref_lse[0][finite], same_lse[0][finite],
                                           testing.OUT_FACTOR)], f"{dtype} non-finite scores")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rows_of_huge_scores_in_every_dtype(dtype):
    # Rows biased by finfo.min on every key (Hugging Face's padding: the scores, and the row max, near finfo.min), by
    # +1e6 and by -3.3e5 (3e4 and -1e4 in fp16): the softmax's exp works on s - m, so such a row attends as in
    # float64, forward and backward (|lse| >= 4096: the backward recomputes the row's max and sum); near float32's
    # finfo.min (fp32, bf16) that is uniformly.
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen) for n in (64, 600, 600))
    bias = torch.randn(1, 1, 64, 600, generator=gen)
    big = 3e4 if dtype == torch.float16 else 1e6  # (fp16 ends at 65504)
    bias[..., 3, :] = torch.finfo(dtype).min
    bias[..., 7, :] += big
    bias[..., 9, :] -= big / 3
    q, k, v, bias = (t.to(dtype).requires_grad_() for t in (q, k, v, bias))
    gen_out = torch.Generator().manual_seed(7)
    dout, dlse = torch.randn(1, 2, 64, 32, generator=gen_out).to(dtype), torch.randn(1, 2, 64, generator=gen_out)
    if dtype != torch.float16:  # near float32's finfo.min the bias absorbs the scores: the row attends uniformly
        out = fusedlayers.attention(q, k, v, bias, backend="cpu")
        torch.testing.assert_close(out[0, :, 3].double(), v[0].double().mean(dim=1), rtol=0,
                                   atol=4 * torch.finfo(dtype).eps)
    _assert_within_rule((q, k, v, bias), dout, dlse, {}, f"{dtype} huge scores")


# ------------------------------------------------------------------ native-speed sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    AttentionCase(b=1, hq=2, hkv=1, nq=2048, nk=2048, d=256),
    AttentionCase(b=1, hq=2, hkv=2, nq=2048, nk=2048, d=64, causal="bottom_right", mask="key_padding", strided=True),
    # window edges inside key blocks of 512, several blocks per query block, softcap and ALiBi
    AttentionCase(b=1, hq=2, hkv=1, nq=2048, nk=2048, d=64, mask="bias", window=(700, 300), softcap=5.0,
                  alibi=True),
], ids=str)
def test_large_attention_within_the_rule(case, dtype):
    testing.assert_all_ok(testing.check_attention(case, dtype, "cpu", "cpu"), f"cpu {case} {dtype}")


@pytest.mark.parametrize("case", [NormCase(rows=512, hidden=8192, residual=True, prenorm=True, dropout_p=0.1),
                                  NormCase(rows=3, hidden=70000, rms=True, bias=False)], ids=str)
def test_large_norm_within_the_rule(case):
    testing.assert_all_ok(testing.check_norm(case, torch.bfloat16, "cpu", "cpu"), f"cpu {case}")


def _rows_for_the_moments(n: int, reps: int) -> torch.Tensor:
    """Rows for the one-pass mean / variance of the cpu norm forward: first elements far from the rest (the shift,
    the mean of the first 64 or 32, is then 3 to 11 standard deviations from the mean: the exact second pass must
    take over), a large offset with unit spread (the shift within a deviation: one pass), constant rows, and
    normal rows."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(reps):
        far = torch.randn(n, generator=g, dtype=torch.float64)
        far[:64] += 1e3
        rows += [far, 1e4 + torch.randn(n, generator=g, dtype=torch.float64),
                 torch.full((n,), 3.7, dtype=torch.float64), torch.full((n,), -1e5, dtype=torch.float64),
                 torch.randn(n, generator=g, dtype=torch.float64) * 1e-3 + 0.5]
    return torch.stack(rows)


@pytest.mark.parametrize("prenorm", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("n,reps", [(7, 2), (768, 2), (773, 2), (8192, 2), (773, 560)], ids=str)  # 560: z past 8 MB
def test_norm_moments_of_rows_far_from_their_first_vector(n, reps, prenorm):
    z64 = _rows_for_the_moments(n, reps)
    r64 = torch.randn(z64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x64 = z64 - r64  # x + r is z64 up to rounding
    w = torch.randn(n, generator=torch.Generator().manual_seed(7))
    b = torch.randn(n, generator=torch.Generator().manual_seed(8))
    x, r = x64.float(), r64.float()
    zf = x + r  # the float32 sum the kernel normalises
    for name, ours, z_ours in (
            ("layer_norm", fusedlayers.layer_norm(zf, w, b), None),
            ("add_layer_norm", *((lambda o: o if prenorm else (o, None))(
                fusedlayers.add_layer_norm(x, r, w, b, prenorm=prenorm))))):
        ref = torch.nn.functional.layer_norm(zf.double(), (n,), w.double(), b.double())
        same = torch.nn.functional.layer_norm(zf, (n,), w, b)
        # each kind of row on its own: the rows of large offset set torch's error far above the others'
        testing.assert_all_ok([testing.compare(f"y, rows {kind}::5", ours[kind::5], ref[kind::5], same[kind::5],
                                               testing.OUT_FACTOR) for kind in range(5)], f"{name} n={n}")
        if z_ours is not None:
            assert torch.equal(z_ours, zf)
    # a constant row normalises to exactly 0: y is the bias (the constant rows of z64 are exact in float32)
    for y in (fusedlayers.layer_norm(z64.float(), w, b), fusedlayers.add_layer_norm(z64.float(), 0 * r, w, b)):
        assert torch.equal(y[2::5], b.expand_as(y[2::5])) and torch.equal(y[3::5], b.expand_as(y[3::5]))


def test_norm_of_rows_whose_variance_overflows_float32():
    # sum (z - shift)^2 overflows to inf (sigma 1e19 over 1024 elements): rstd is 0 and y the bias, as torch gives
    torch.manual_seed(0)
    x, r, w, b = torch.randn(4, 1024) * 1e19, torch.randn(4, 1024) * 1e19, torch.randn(1024), torch.randn(1024)
    F = torch.nn.functional
    assert torch.equal(fusedlayers.layer_norm(x, w, b), F.layer_norm(x, (1024,), w, b))
    assert torch.equal(fusedlayers.add_layer_norm(x, r, w, b), F.layer_norm(x + r, (1024,), w, b))


@pytest.mark.parametrize("x_dtype,stream", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16)], ids=str)
def test_norm_kernel_rounds_an_unkept_16bit_stream(x_dtype, stream):
    # dropout without a kept z (the kernel op called directly with keep_stream=False): y is still the norm of the
    # stream rounded to its dtype, bitwise as with the stream kept (stored, then read back)
    torch.manual_seed(2)
    x, w, b = torch.randn(40, 300, dtype=x_dtype) * 3, torch.randn(300), torch.randn(300)
    kernel = torch.ops.fusedlayers.norm_fwd_kernel
    y_kept, z, _, _ = kernel(x, None, w, b, 11, 1e-5, 0.3, False, True, stream)
    y, z_none, _, _ = kernel(x, None, w, b, 11, 1e-5, 0.3, False, False, stream)
    assert z.shape == x.shape and z_none.numel() == 0 and torch.equal(y, y_kept)
    ref = torch.nn.functional.layer_norm(z.double(), (300,), w.double(), b.double())
    torch.testing.assert_close(y.double(), ref.to(x_dtype).double(), rtol=1e-5 if x_dtype == torch.float32 else 1e-2,
                               atol=1e-5 if x_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("hidden", [1024, 1000])
def test_norm_16bit_is_the_float32_kernel_rounded(dtype, op, hidden):
    # A 16-bit row is converted to float32 as it is read and every output rounded to nearest even as it is written
    # (AVX512-BF16's conversion where the CPU has it): the outputs and gradients are bitwise the float32 kernel's
    # on the same values, rounded (hidden 1000: vectors and a scalar tail)
    torch.manual_seed(3)
    x, r, dy = (torch.randn(64, hidden).to(dtype) for _ in range(3))
    w, b = (torch.randn(hidden).to(dtype) for _ in range(2))

    def run(op, x, r, w, b, dy):
        x, r, w, b = (t.clone().requires_grad_() for t in (x, r, w, b))
        if op == "layer_norm":  # r takes no part: no gradient
            y = fusedlayers.layer_norm(x, w, b, backend="cpu")
        elif op == "rms_norm":
            y = fusedlayers.rms_norm(x, w, backend="cpu")
        else:
            y = fusedlayers.add_layer_norm(x, r, w, b, backend="cpu")
        y.backward(dy)
        return [y] + [t.grad for t in (x, r, w, b) if t.grad is not None]

    low = run(op, x, r, w, b, dy)
    if op == "add_layer_norm":  # the float32 layer norm of the stream z = x + r rounded to the dtype
        z = (x.float() + r.float()).to(dtype).float()
        y, dz, dw, db = run("layer_norm", z, z, w.float(), b.float(), dy.float())  # (r unused)
        ref = [y, dz, dz, dw, db]  # the residual's gradient is dx
    else:
        ref = run(op, x.float(), r.float(), w.float(), b.float(), dy.float())
    assert len(low) == len(ref)
    for a, e in zip(low, ref):
        assert torch.equal(a, e.to(dtype))


@pytest.mark.parametrize("hidden", [64, 40])
def test_bf16_rounding_keeps_subnormals(hidden):
    # The hardware bf16 rounding reads a float32 subnormal as 0; vectors holding one round in software, so a
    # subnormal stream z = x + 0 comes back as x in every lane, vector or tail, as torch rounds it
    torch.manual_seed(4)
    x = (torch.randn(4, hidden) * 1e-39).to(torch.bfloat16)
    assert (x.float().abs() < torch.finfo(torch.float32).tiny).all() and (x != 0).any()
    r, w, b = torch.zeros_like(x), torch.ones(hidden), torch.zeros(hidden)
    y, z = fusedlayers.add_layer_norm(x, r, w, b, prenorm=True, backend="cpu")
    assert torch.equal(z, x)


_SMALL_TEAM_SCRIPT = r"""
import torch, fusedlayers
from fusedlayers import testing
from fusedlayers.testing import NormCase
torch.set_num_threads(2)
for case in (NormCase(rows=300, hidden=520), NormCase(rows=97, hidden=533, residual=True, prenorm=True)):
    testing.assert_all_ok(testing.check_norm(case, torch.float32, "cpu", "cpu"), str(case))
print("ok")
"""


def test_norm_backward_when_openmp_gives_fewer_threads():
    """OMP_THREAD_LIMIT=1 under torch.set_num_threads(2): the kernels ask for two threads and get one; the
    dweight / dbias partial of the thread that never ran is not read."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    run = subprocess.run([sys.executable, "-c", _SMALL_TEAM_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


# ------------------------------------------------------------------ every SIMD level

_LEVEL_SCRIPT = r"""
import torch, fusedlayers
from fusedlayers import testing
from fusedlayers.testing import AttentionCase, NormCase, VarlenCase
print(torch.ops.fusedlayers._cpu_kernels_info())
for dtype in (torch.float32, torch.bfloat16):
    for case in (AttentionCase(b=1, hq=2, hkv=1, nq=70, nk=300, d=40, mask="bias", causal="bottom_right"),
                 AttentionCase(b=2, hq=2, hkv=2, nq=33, nk=17, d=64, mask="key_padding", dropout_p=0.2)):
        testing.assert_all_ok(testing.check_attention(case, dtype, "cpu", "cpu"), str(case))
    for case in (NormCase(rows=7, hidden=1000, residual=True, prenorm=True, dropout_p=0.1),
                 NormCase(rows=5, hidden=37, rms=True, bias=False)):
        testing.assert_all_ok(testing.check_norm(case, dtype, "cpu", "cpu"), str(case))
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    # decode (Nq <= 16): the query heads of a KV head stacked into one task, the keys split across threads
    # (with 2 threads: 4 splits wanted for one (sequence, KV head), capped at the 3 key blocks of 512)
    AttentionCase(b=1, hq=4, hkv=1, nq=1, nk=1200, d=64),
    AttentionCase(b=1, hq=8, hkv=2, nq=5, nk=1100, d=40, causal="bottom_right", mask="key_padding"),
    AttentionCase(b=2, hq=4, hkv=2, nq=16, nk=600, d=64, mask="bias", dropout_p=0.1),
    AttentionCase(b=1, hq=2, hkv=2, nq=3, nk=1500, d=32, mask="bool"),  # no GQA: one head per task, split
    # rows of K and V apart (B, N, H, D), every other one starting off a cache line (40 floats, 160 bytes): the
    # next block's prefetch (which cannot change a result: this checks it leaves them alone)
    AttentionCase(b=1, hq=4, hkv=2, nq=9, nk=1700, d=40, strided=True),
    replace(AttentionCase(b=1, hq=6, hkv=2, nq=7, nk=1300, d=64, causal="bottom_right"), window=(700, 0),
            softcap=30.0, alibi=True, sinks=True),
], ids=str)
def test_decode(case, dtype):
    """Decode shapes through the split-KV merge, with every feature that reads a row's head or position."""
    with torch_threads(2):
        testing.assert_all_ok(testing.check_attention(case, dtype, "cpu", "cpu"), str(case))


@pytest.mark.parametrize("nq", [1, 300])  # decode and the query-block path
def test_kernel_op_on_an_empty_batch(nq):
    """The kernel op itself (no Python short cut) on zero sequences: empty outputs dense, a clear error packed."""
    q, k, v = torch.randn(0, 4, nq, 64), torch.randn(0, 2, 100, 64), torch.randn(0, 2, 100, 64)
    out, lse = ops.attention_fwd_kernel(q, k, v, None, None, None, 0, 0, 0, 0.125, False, False, 0.0)
    assert out.shape == (0, 4, nq, 64) and lse.shape == (0, 4, nq)
    cu = torch.zeros(1, dtype=torch.int32)
    q, k, v = torch.randn(0, 4, 64), torch.randn(0, 2, 64), torch.randn(0, 2, 64)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q and cu_seqlens_k must hold B \+ 1 >= 2"):
        ops.attention_fwd_kernel(q, k, v, None, cu, cu, nq, 100, 0, 0.125, True, True, 0.0)


@pytest.mark.parametrize("case", [
    VarlenCase(lens_q=(1, 16, 4), lens_k=(700, 1100, 3), hq=8, hkv=2, d=64, causal="bottom_right"),
    replace(VarlenCase(lens_q=(2, 0, 9), lens_k=(1030, 5, 600), hq=4, hkv=1, d=32), window=(500, 0)),
], ids=str)
def test_decode_varlen(case):
    with torch_threads(2):
        testing.assert_all_ok(testing.check_attention_varlen(case, torch.float32, "cpu", "cpu"), str(case))


@pytest.mark.parametrize("level", ["default", "avx2"])
def test_lower_simd_levels(level):
    """The kernels compiled for lower SIMD levels pass too (ATen's ATEN_CPU_CAPABILITY picks them)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level)
    res = subprocess.run([sys.executable, "-c", _LEVEL_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"simd={level.upper()}" in res.stdout, res.stdout


def test_gemms_through_torchs_blas():
    """Attention and norms with every GEMM in torch's BLAS, as on a CPU without AVX-512 / AVX512-BF16."""
    env = dict(os.environ, FUSEDLAYERS_CPU_GEMM="blas")
    res = subprocess.run([sys.executable, "-c", _LEVEL_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "vdpbf16ps" not in res.stdout and "tiles" not in res.stdout, res.stdout


@pytest.mark.parametrize("case", [
    # a GEMM depth past one pass of 128 (d = 300), a causal diagonal, packed K and V; odd head dims, a bias
    AttentionCase(b=1, hq=2, hkv=1, nq=600, nk=700, d=300, causal="bottom_right"),
    AttentionCase(b=2, hq=2, hkv=2, nq=300, nk=45, d=20, dv=37, mask="bias", strided=True),
    # decoding: products of 4 to 8 rows (a GQA group) read V in place (Dv whole panels of 16, strided rows, a
    # depth past 128 keys); Dv = 48 mixes a 32- and a 16-column tile
    AttentionCase(b=2, hq=8, hkv=2, nq=1, nk=300, d=64, dv=48, strided=True),
    AttentionCase(b=1, hq=6, hkv=1, nq=1, nk=200, d=32, dv=64, causal="bottom_right"),
    AttentionCase(b=1, hq=4, hkv=1, nq=2, nk=150, d=40, dv=32, mask="key_padding"),
], ids=str)
def test_fp32_tiles(case):
    """float32 attention on our AVX-512 tiles (the default where the CPU has AVX-512)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("no AVX-512 here")
    if os.environ.get("FUSEDLAYERS_CPU_GEMM") != "blas":
        assert "fp32: AVX-512 tiles" in ops._cpu_kernels_info()
    testing.assert_all_ok(testing.check_attention(case, torch.float32, "cpu", "cpu"), str(case))


@pytest.mark.parametrize("hq, nq, d", [(1, 1, 64), (2, 1, 40), (2, 1, 512), (3, 1, 128), (4, 1, 128), (2, 2, 96)])
def test_backward_recomputes_the_forwards_scores(hq, nq, d):
    """One key per query: P is exactly 1 only when the backward's S = Q K^T is the forward's bit for bit, whatever
    the rows per product (decoding stacks a GQA group's 1-3 rows, the backward takes one head at a time). Then
    out = v, and dV is the sum of dO over the group's rows: each head's rows (at most 2, one rounding), then the
    heads in order, in float32."""
    gen = torch.Generator().manual_seed(d)
    q = (3 * torch.randn(1, hq, nq, d, generator=gen)).requires_grad_()
    k = (3 * torch.randn(1, 1, 1, d, generator=gen)).requires_grad_()
    v = torch.randn(1, 1, 1, d, generator=gen).requires_grad_()
    with torch_threads(2):
        out = fusedlayers.attention(q, k, v, backend="cpu")
        assert torch.equal(out, v.detach().expand_as(out))
        dout = torch.randn(out.shape, generator=gen)
        dv = torch.autograd.grad(out, v, dout)[0]
    expected = torch.zeros(d)
    for h in range(hq):
        expected = expected + dout[0, h].sum(0)
    assert torch.equal(dv[0, 0, 0], expected)


_BF16_EDGES = [
    # odd head dims (an odd GEMM depth in S = Q K^T and dQ), odd key and query counts (P V, dK, dV), rows
    # and columns off the 8 x 32 tile, strided inputs, GQA, dropout, a float bias with its gradient
    AttentionCase(b=1, hq=2, hkv=1, nq=37, nk=29, d=33, causal="bottom_right"),
    AttentionCase(b=2, hq=2, hkv=2, nq=9, nk=47, d=17, dv=31, mask="bias", strided=True),
    AttentionCase(b=1, hq=4, hkv=2, nq=130, nk=67, d=80, mask="key_padding", dropout_p=0.1),
    # AMX: depths of whole 32-steps with a remainder (d 80 = 64 + 16, P V over 600 keys = 512 + 88, dK / dV's
    # depth of 200 query rows = 192 + 8), rows of 16 and of fewer (200 = 6 x 32 + 8: a last block of one partial
    # tile), a GQA group stacking rows, strided inputs; a block of 17-31 rows (two tiles, the second partial)
    AttentionCase(b=1, hq=4, hkv=2, nq=200, nk=600, d=80, dv=48, causal="bottom_right", strided=True),
    AttentionCase(b=1, hq=1, hkv=1, nq=27, nk=96, d=128),
    # K and V packed once (several query blocks), head dim 64: on AMX, S stored unscaled and each row scaled with
    # its max (raw blocks), or scaled alone (the causal edge), or with a softcap on the max
    AttentionCase(b=1, hq=2, hkv=1, nq=300, nk=700, d=64, causal="bottom_right"),
    replace(AttentionCase(b=1, hq=2, hkv=2, nq=300, nk=600, d=64), softcap=30.0),
]


@pytest.mark.parametrize("case", _BF16_EDGES, ids=str)
def test_bf16_gemm_edges(case):
    """The bf16 GEMMs (AMX or AVX512-BF16, where the CPU has them) on every remainder of their tiles."""
    testing.assert_all_ok(testing.check_attention(case, torch.bfloat16, "cpu", "cpu"), str(case))


def test_bf16_gemm_edges_without_amx():
    """Where the CPU has AMX, the same cases on the AVX512-BF16 tiles alone (FUSEDLAYERS_CPU_GEMM=avx512), so that
    both paths stay tested on such a machine."""
    if "AMX" not in ops._cpu_kernels_info():
        pytest.skip("bf16 does not run on AMX here: test_bf16_gemm_edges covers the tiles it runs on")
    script = ("import torch\nfrom fusedlayers import testing\nfrom fusedlayers.testing import AttentionCase\n"
              "print(torch.ops.fusedlayers._cpu_kernels_info())\n"
              f"for case in {_BF16_EDGES!r}:\n"
              "    testing.assert_all_ok(testing.check_attention(case, torch.bfloat16, 'cpu', 'cpu'), str(case))\n")
    env = dict(os.environ, FUSEDLAYERS_CPU_GEMM="avx512")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bf16: AVX512-BF16 (vdpbf16ps)" in res.stdout, res.stdout


def test_amx_alongside_torchs_own_amx_kernels():
    """Where bf16 runs on AMX, calls of ours between torch's AMX kernels (SDPA's flash kernel, oneDNN's matmul) on the
    same threads leave every result as it was: each product loads its own tile configuration and releases it, and
    resets torch's record of the configuration it last loaded (torch skips reloading one it believes current)."""
    if "AMX" not in ops._cpu_kernels_info():
        pytest.skip("bf16 does not run on AMX here")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=gen).bfloat16() for _ in range(3))
    a, b = torch.randn(256, 256, generator=gen).bfloat16(), torch.randn(256, 256, generator=gen).bfloat16()
    with torch_threads(2):
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        ours = fusedlayers.attention(q, k, v, backend="cpu")
        mm = a @ b
        for _ in range(3):
            assert torch.equal(fusedlayers.attention(q, k, v, backend="cpu"), ours)
            assert torch.equal(torch.nn.functional.scaled_dot_product_attention(q, k, v), sdpa)
            assert torch.equal(fusedlayers.attention(q, k, v, backend="cpu"), ours)
            assert torch.equal(a @ b, mm)


# ------------------------------------------------------------------ the outputs' cache (csrc/cpu/output_cache.cpp)


@pytest.fixture
def cache_limit():
    """Sets the cpu output cache's limit (MB) for the test and restores the former one and its
    reuse time; garbage of earlier tests is collected first, so that no output of theirs is
    freed midway, and kept blocks are reused however long a step of the test takes."""
    import gc

    gc.collect()
    before = fusedlayers.cpu_output_cache()
    fusedlayers.cpu_output_cache(reuse_ms=1e6)
    yield lambda mb: fusedlayers.cpu_output_cache(mb)
    fusedlayers.cpu_output_cache(before["limit_bytes"] >> 20, reuse_ms=before["reuse_ms"])


def _ln(x, w, b=None):
    return fusedlayers.layer_norm(x, w, b, backend="cpu")


def test_output_cache_reuses_a_freed_output_and_never_a_live_one(cache_limit):
    cache_limit(0)  # empties it
    cache_limit(64)
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(512, 768, generator=gen), torch.randn(768, generator=gen), torch.randn(768, generator=gen)
    want = torch.nn.functional.layer_norm(x, (768,), w, b)
    y1, y2 = _ln(x, w, b), _ln(x, w, b)  # 1.5 MB each, both alive
    lo1, lo2 = y1.data_ptr(), y2.data_ptr()
    stats = fusedlayers.cpu_output_cache()
    assert stats["live_bytes"] >= 2 * y1.nbytes and stats["held_blocks"] == 0
    del y1
    stats = fusedlayers.cpu_output_cache()
    assert stats["held_bytes"] >= 512 * 768 * 4 and stats["held_blocks"] == 1
    y3 = _ln(x * 2, w, b)
    assert y3.data_ptr() == lo1, "the freed output's block was not reused"
    after = fusedlayers.cpu_output_cache()
    assert after["hits"] == stats["hits"] + 1
    assert after["held_blocks"] == 0 and after["held_bytes"] == 0, "a block handed out is still kept"
    y4 = _ln(x * 3, w, b)  # y2 and y3 alive: a new block
    assert y4.data_ptr() not in (lo1, lo2)
    for y, scale in ((y2, 1), (y3, 2), (y4, 3)):
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x * scale, (768,), w, b))
    # a block much larger than the request is not handed out (at most 1/8 more bytes)
    del y2, y3, y4
    small = _ln(x[:256], w, b)
    assert small.data_ptr() not in (lo1, lo2)
    torch.testing.assert_close(small, want[:256])


def test_attention_outputs_and_gradients_come_from_the_cache(cache_limit):
    """The cpu attention's out and its dq, dk, dv are the cache's blocks, reused once freed, and hold what
    the same kernels write into plain tensors (the cache off)."""
    q, k, v = (torch.randn(1, 4, 256, 64, requires_grad=True) for _ in range(3))  # 256 KB each
    dout = torch.randn(1, 4, 256, 64)

    def run():
        out = fusedlayers.attention(q, k, v, backend="cpu")
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    cache_limit(0)
    plain = run()
    cache_limit(64)
    cached = run()
    stats = fusedlayers.cpu_output_cache()
    assert stats["live_bytes"] >= 4 * q.nbytes
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    del cached
    before = fusedlayers.cpu_output_cache()
    assert before["held_blocks"] >= 4
    again = run()
    assert fusedlayers.cpu_output_cache()["hits"] >= before["hits"] + 4
    assert all(torch.equal(a, b) for a, b in zip(plain, again))


def test_output_cache_holds_at_most_its_limit_and_zero_turns_it_off(cache_limit):
    x, w = torch.randn(512, 768), torch.randn(768)
    cache_limit(0)
    cache_limit(1)  # below one output: nothing is kept
    y = _ln(x, w)
    del y
    assert fusedlayers.cpu_output_cache()["held_blocks"] == 0
    cache_limit(4)  # two outputs of 1.5 MB: the third freed evicts the oldest
    a, b, c = _ln(x, w), _ln(x, w), _ln(x, w)
    pb, pc = b.data_ptr(), c.data_ptr()
    del a, b, c
    stats = fusedlayers.cpu_output_cache()
    assert stats["held_bytes"] <= 4 << 20 and stats["held_blocks"] == 2
    again = [_ln(x, w), _ln(x, w)]
    assert {t.data_ptr() for t in again} == {pb, pc}, "not the oldest block evicted"
    del again
    cache_limit(0)
    stats = fusedlayers.cpu_output_cache()
    assert stats["held_bytes"] == 0 and stats["held_blocks"] == 0 and stats["limit_bytes"] == 0
    y = _ln(x, w)
    after = fusedlayers.cpu_output_cache()
    assert (after["hits"], after["misses"]) == (stats["hits"], stats["misses"]), "served by the cache while off"
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (768,), w))
    for bad in (-1, 2**40, 1.5, True):
        with pytest.raises(ValueError, match="limit_mb"):
            fusedlayers.cpu_output_cache(bad)
    for bad in (-1, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="reuse_ms"):
            fusedlayers.cpu_output_cache(reuse_ms=bad)


def test_output_cache_gives_blocks_kept_past_the_reuse_time_back_under_32_mb(cache_limit):
    """A block under 32 MB kept longer than reuse_ms goes back to glibc (a new block serves, allocated
    before the old one is freed); one of 32 MB or more is reused however old."""
    import time

    cache_limit(0)
    cache_limit(256)
    x, w = torch.randn(512, 768), torch.randn(768)
    y = _ln(x, w)
    old = y.data_ptr()
    del y
    assert fusedlayers.cpu_output_cache(reuse_ms=0.5)["reuse_ms"] == 0.5
    time.sleep(0.01)
    before = fusedlayers.cpu_output_cache()
    y = _ln(x, w)
    after = fusedlayers.cpu_output_cache()
    assert y.data_ptr() != old
    assert after["expired"] == before["expired"] + 1 and after["hits"] == before["hits"]
    assert after["held_blocks"] == 0 and after["held_bytes"] == 0
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (768,), w))
    fusedlayers.cpu_output_cache(reuse_ms=1e6)
    del y
    y = _ln(x, w)  # within the reuse time: reused
    assert fusedlayers.cpu_output_cache()["hits"] == after["hits"] + 1
    # of two fitting blocks, the one past the reuse time is passed over for the other, however smaller
    a, b = _ln(x, w), _ln(torch.randn(512 + 32, 768), w)  # b: 1/16 larger
    pa, pb = a.data_ptr(), b.data_ptr()
    del y, a
    time.sleep(0.05)
    fusedlayers.cpu_output_cache(reuse_ms=20)  # a and y's blocks past it, b's freed just now within it
    del b
    mark = fusedlayers.cpu_output_cache()
    y = _ln(x, w)
    assert y.data_ptr() == pb and fusedlayers.cpu_output_cache()["hits"] == mark["hits"] + 1
    assert pa != pb
    big, w_big = torch.randn(8192, 1024), torch.randn(1024)  # 32 MB
    y_big = _ln(big, w_big)
    old_big = y_big.data_ptr()
    del y_big
    time.sleep(0.01)
    y_big = _ln(big, w_big)
    assert y_big.data_ptr() == old_big, "a block of 32 MB was not reused"
    torch.testing.assert_close(y_big, torch.nn.functional.layer_norm(big, (1024,), w_big))


def test_output_cache_hands_out_the_block_freed_last_of_equal_ones(cache_limit):
    # the warmest in cache (the oldest may be one that streaming stores evicted from it)
    cache_limit(0)
    cache_limit(64)
    x, w = torch.randn(512, 768), torch.randn(768)
    a, b = _ln(x, w), _ln(x, w)
    pb = b.data_ptr()
    del a
    del b
    assert _ln(x, w).data_ptr() == pb


def test_output_cache_keeps_at_most_64_blocks(cache_limit):
    cache_limit(0)
    cache_limit(256)
    x, w = torch.randn(128, 512), torch.randn(512)  # 256 KB outputs
    outs = [_ln(x, w) for _ in range(70)]
    del outs
    stats = fusedlayers.cpu_output_cache()
    assert stats["held_blocks"] == 64 and stats["held_bytes"] == 64 * 128 * 512 * 4


def test_output_cache_blocks_resize_and_free_from_any_thread(cache_limit):
    import threading

    cache_limit(0)
    cache_limit(64)
    x, w = torch.randn(512, 768), torch.randn(768)
    y = _ln(x, w)
    want = y.clone()
    y.resize_(1024, 768)  # the storage grows through the cache's allocator and keeps its contents
    torch.testing.assert_close(y[:512], want)
    box = [y]
    del y
    thread = threading.Thread(target=box.clear)  # the last reference dies on another thread
    thread.start()
    thread.join()
    assert fusedlayers.cpu_output_cache()["held_bytes"] >= 1024 * 768 * 4
    # the reused memory is written in full: nothing of the old contents leaks into a new output
    z_in = torch.zeros(1024, 768) + torch.arange(768.0)
    torch.testing.assert_close(_ln(z_in, w), torch.nn.functional.layer_norm(z_in, (768,), w))


_CACHE_THREADS_AND_FORK_SCRIPT = """
import os, threading, torch, fusedlayers
x, w = torch.randn(256, 768), torch.randn(768)
want = torch.nn.functional.layer_norm(x, (768,), w)
fusedlayers.cpu_output_cache(4)  # a small limit: blocks are evicted and freed all the time
stop, bad = threading.Event(), []
def churn():
    while not stop.is_set():
        outs = [fusedlayers.layer_norm(x, w, backend="cpu") for _ in range(3)]
        if not all(torch.equal(o, outs[0]) for o in outs):
            bad.append(1)
threads = [threading.Thread(target=churn) for _ in range(3)]
for t in threads:
    t.start()
for _ in range(20):
    pid = os.fork()
    if pid == 0:  # the child: the cache's lock must not be left held by a thread that is gone
        ok = torch.allclose(fusedlayers.layer_norm(x, w, backend="cpu"), want, atol=1e-5)
        os._exit(0 if ok else 3)
    assert os.waitpid(pid, 0)[1] == 0
stop.set()
for t in threads:
    t.join()
assert not bad
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_output_cache_under_threads_and_fork():
    run = subprocess.run([sys.executable, "-c", _CACHE_THREADS_AND_FORK_SCRIPT], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


_CACHE_ENV_SCRIPT = """
import torch, fusedlayers
x, w = torch.randn(512, 768), torch.randn(768)
y = fusedlayers.layer_norm(x, w, backend="cpu")
del y
s = fusedlayers.cpu_output_cache()
print(s["limit_bytes"], s["held_bytes"], s["misses"])
"""


@pytest.mark.parametrize("value, expected", [("0", "0 0 0"), ("3", f"{3 << 20} {512 * 768 * 4} 1"),
                                             ("lots", f"{256 << 20} {512 * 768 * 4} 1"),
                                             ("-2", f"{256 << 20} {512 * 768 * 4} 1")])
def test_output_cache_limit_from_the_environment(value, expected):
    env = dict(os.environ, FUSEDLAYERS_CPU_CACHE_MB=value)
    run = subprocess.run([sys.executable, "-c", _CACHE_ENV_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected, run.stdout
    if value in ("lots", "-2"):  # a warning naming the variable, and the default limit
        assert "FUSEDLAYERS_CPU_CACHE_MB" in run.stderr, run.stderr
