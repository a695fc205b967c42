"""fusedlayers.attention / attention_varlen on every backend, against the float64 reference
with the test method's tolerance rule (fusedlayers.testing)."""

import os

import pytest
import torch

import fusedlayers
from fusedlayers import dispatch, testing
from fusedlayers.testing import AttentionCase

from conftest import DEVICE, dtype_id, skip_unless_serves

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _served_inputs(case, dtype, backend):
    """The case's inputs (testing.make_attention_inputs); skips where ``backend`` cannot serve it."""
    skip_unless_serves("attention", backend, testing.attention_call_for(case, dtype, DEVICE))
    return testing.make_attention_inputs(case, dtype, DEVICE)


def _run(case, dtype, backend):
    skip_unless_serves("attention", backend, testing.attention_call_for(case, dtype, DEVICE))
    testing.assert_all_ok(testing.check_attention(case, dtype, DEVICE, backend), f"{backend} {case} {dtype}")


def _numpy_blas_haswell() -> bool:
    """Whether numpy's OpenBLAS runs its Haswell (AVX2) float32 kernels: forced by OPENBLAS_CORETYPE, or chosen
    for an AMD CPU when unset."""
    coretype = os.environ.get("OPENBLAS_CORETYPE", "").lower()
    if coretype:
        return coretype == "haswell"
    try:
        with open("/proc/cpuinfo") as f:
            return "AuthenticAMD" in f.read()
    except OSError:
        return False


# Known failure, open: the interpreted Triton kernels run tl.dot through numpy, and with OpenBLAS's Haswell float32
# kernels this case's forward out errs by up to 1.1e-6 (torch: 6.8e-7), which the sinks' gradient, a sum of
# rowsum(dO * O) over all 80 rows of a head, turns into 7.3e-6 against a bound of 4.3e-6. With its SkylakeX kernels
# (Intel AVX-512 hosts) it passes; not strict, so there it reports XPASS.
_HASWELL_XFAIL = {("hkv2-nq40-nk64-d512-causalbottom_right-dv320-window(9, 0)-softcap4.0-sinksTrue", torch.float32,
                   "triton")}


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", testing.attention_grid("default"), ids=str)
def test_grid(case, dtype, backend, request):
    if (str(case), dtype, backend) in _HASWELL_XFAIL and DEVICE == "cpu" and _numpy_blas_haswell():
        request.applymarker(pytest.mark.xfail(reason="dsinks over its bound with numpy's Haswell BLAS kernels "
                                                     "(README, Tests: known failures)", strict=False))
    _run(case, dtype, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_full_grid(full_attention_case, dtype, backend):
    _run(full_attention_case, dtype, backend)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grad(backend):
    case = AttentionCase(b=1, hq=2, hkv=2, nq=17, nk=64, d=32, mask="bool")
    q, k, v, mask, dout, _ = _served_inputs(case, torch.float32, backend)
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
    q, k, v, _, _, _ = _served_inputs(case, torch.float32, backend)
    out = fusedlayers.attention(q, k, v, causal=True, causal_align="bottom_right", backend=backend)
    assert torch.all(out[:, :, :24] == 0) and torch.all(out[:, :, 24:].abs().sum(-1) > 0)
    testing.assert_all_ok(testing.check_attention(case, torch.float32, DEVICE, backend))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_dropout_is_reproducible_and_keeps_the_right_fraction(backend):
    case = AttentionCase(b=2, hq=4, hkv=2, nq=64, nk=128, d=32, dropout_p=0.25)
    q, k, v, _, _, _ = _served_inputs(case, torch.float32, backend)
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
    q, k, v, mask, dout, _ = _served_inputs(case, torch.float16, backend)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", VALUE_HEAD_DIM_CASES, ids=str)
def test_value_head_dim_differs(case, dtype, backend):
    _run(case, dtype, backend)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_matches_torch_sdpa(backend):
    # The drop-in claim: same layout, same mask convention, same answer as SDPA.
    case = AttentionCase(b=2, hq=4, hkv=4, nq=64, nk=64, d=32, mask="key_padding")
    q, k, v, mask, _, _ = _served_inputs(case, torch.float32, backend)
    for causal in (False, True):
        m = None if causal else mask  # SDPA refuses a mask together with is_causal
        ours = fusedlayers.attention(q, k, v, m, causal=causal, backend=backend)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, m, is_causal=causal)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", testing.varlen_grid("default"), ids=str)
def test_varlen_matches_dense_per_sequence(case, dtype, backend):
    """Packed attention equals, sequence by sequence, the float64 dense reference."""
    skip_unless_serves("attention", backend, testing.varlen_call_for(case, dtype, DEVICE))
    testing.assert_all_ok(testing.check_attention_varlen(case, dtype, DEVICE, backend),
                          f"{backend} varlen {case} {dtype}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_minus_inf_sink_on_a_row_with_no_key(backend):
    """A -inf sink is no sink: a row that sees no key gives 0 and lse -inf (not NaN), and the
    backward serves it (the |sink| limit of joined sinks does not refuse -inf)."""
    q, k, v = (torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, :] = False
    sinks = torch.tensor([float("-inf"), 0.5], requires_grad=True)
    out, lse = fusedlayers.attention(q, k, v, mask, sinks=sinks, return_lse=True, backend=backend)
    assert torch.all(out[0, :, 0] == 0) and lse[0, 0, 0] == float("-inf") and lse[0, 1, 0] == 0.5
    out64, lse64 = fusedlayers.reference.attention(q.double(), k.double(), v.double(), mask, sinks=sinks.double())
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), sinks)
    assert torch.isfinite(grad).all() and grad[0] == 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_window_side_past_every_key_is_unbounded(backend):
    """window_size sides of 2**32 and more (up to int64's limit) mean unbounded: no overflow in
    the position arithmetic of the kernels or of the reference."""
    q, k, v = (torch.randn(1, 1, 4 if i == 0 else 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = fusedlayers.attention(q, k, v, window_size=(0, None), return_lse=True, backend=backend)
    for right in (2**32, 2**62, 2**63 - 1):
        got = fusedlayers.attention(q, k, v, window_size=(0, right), return_lse=True, backend=backend)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
