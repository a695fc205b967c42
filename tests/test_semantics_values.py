"""Non-finite and extreme values: every backend against the float64 reference.

The policy (README "Semantics"): the float64 reference (``fusedlayers.reference``) is the truth.
A NaN score at an allowed position (from q, k or a float bias) makes that query row's output and
lse NaN, and its gradients NaN where the reference's are; a NaN at a masked-out position (bool
mask, causal) changes nothing. A +inf score gives lse +inf and a NaN output. A finite bias is the
finite number it is: a row whose bias is ``finfo(float32).min`` everywhere (Hugging Face's
padding value) attends uniformly, as in float64, and a key padded with it gets weight 0. A row
with no allowed key returns output 0, lse -inf and gradient 0. A layer norm of a constant row
is exactly 0 (the bias), whatever eps.

Each case checks: the NaN pattern of out, lse and every gradient equals the reference's, and
the finite elements pass the test method's rule (``fusedlayers.testing.compare``).
"""

from __future__ import annotations

import pytest
import torch

from fusedlayers import dispatch, ops, reference, testing

from conftest import DEVICE

FMIN = torch.finfo(torch.float32).min
NAN, INF = float("nan"), float("inf")


def _backends():
    out = []
    for b in ("reference", "cpu", "triton", "cuda"):
        call = dispatch.AttentionCall(device=torch.device(DEVICE), dtype=torch.float32, batch=2, heads_q=2, heads_kv=2,
                                      seqlen_q=8, seqlen_k=8, head_dim=8, head_dim_v=8, mask="float", mask_grad=True,
                                      causal=True, dropout_p=0.0, deterministic=False, varlen=False)
        if dispatch.why_not("attention", b, call) is None:
            out.append(b)
    return out


BACKENDS = _backends()


def _run(q, k, v, mask, causal, backend, dtype, grad_out, grad_lse):
    """out, lse and the gradients (q, k, v, mask if float) of one backend (or the reference in `dtype`)."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = None
    if mask is not None:
        m = mask.detach().to(dtype).requires_grad_() if mask.is_floating_point() else mask
    if backend is None:
        out, lse = reference.attention(*ins, m, causal=causal)
    else:
        out, lse = ops.attention(*ins, m, causal=causal, backend=backend, return_lse=True)
    # the reference's own lse of a NaN row is NaN: keep NaN out of the gradient seeds
    loss = (out * grad_out.to(out.dtype)).sum() + (torch.nan_to_num(lse, 0.0, 0.0, 0.0) * grad_lse.to(lse.dtype)).sum()
    wrt = ins + ([m] if m is not None and m.is_floating_point() else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [out, lse] + [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


NAMES = ["out", "lse", "dq", "dk", "dv", "dbias"]


def check_values(q, k, v, mask=None, causal=False, backend="reference", tainted=None):
    """Checks one backend against the float64 reference. out and lse: the same NaN pattern, the
    finite elements within the rule. Gradients: likewise, except in the (batch, head) slices of
    ``tainted`` (bool (B, Hq), the heads a NaN input reaches), where only the elements finite in
    both are compared: there a 0 * NaN inside a matrix product (a masked score's zero gradient
    times a NaN of q or k) gives NaN or not depending on which blocks a kernel multiplies."""
    gen = torch.Generator().manual_seed(0)
    b, hq, nq, _ = q.shape
    grad_out = torch.randn(b, hq, nq, v.shape[-1], generator=gen)
    grad_lse = torch.randn(b, hq, nq, generator=gen)
    ref = _run(q, k, v, mask, causal, None, torch.float64, grad_out, grad_lse)
    same = _run(q, k, v, mask, causal, None, torch.float32, grad_out, grad_lse)
    got = _run(q, k, v, mask, causal, backend, torch.float32, grad_out, grad_lse)
    comparisons = []
    for name, g, r, s in zip(NAMES, got, ref, same):
        nan_g, nan_r = torch.isnan(g.detach()).cpu(), torch.isnan(r.detach()).cpu()
        free = torch.zeros_like(nan_r)
        if tainted is not None and name not in ("out", "lse", "dbias"):
            h = 1 if name == "dq" else k.shape[1]
            free = tainted.view(tainted.shape[0], -1, h).any(dim=-1)
            free = free.view(*free.shape, *([1] * (g.dim() - 2))).expand_as(nan_r)
        elif tainted is not None and name == "dbias":
            free = torch.ones_like(nan_r)
        assert torch.equal(nan_g & ~free, nan_r & ~free), (
            f"{backend}: NaN pattern of {name} differs from the float64 reference: NaN at "
            f"{(nan_g & ~free).nonzero().tolist()[:8]} vs {(nan_r & ~free).nonzero().tolist()[:8]}")
        keep = ~(nan_r | nan_g)
        factor = testing.OUT_FACTOR if name in ("out", "lse") else testing.GRAD_FACTOR
        comparisons.append(testing.compare(name, g.detach().cpu()[keep], r.detach()[keep], s.detach().cpu()[keep],
                                           factor))
    testing.assert_all_ok(comparisons, f"backend {backend}")
    return got


def _heads(*bh, b=2, h=2):
    t = torch.zeros(b, h, dtype=torch.bool)
    for i, j in bh:
        t[i, j] = True
    return t


def _qkv(b=2, h=2, nq=6, nk=7, d=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=gen), torch.randn(b, h, nk, d, generator=gen),
            torch.randn(b, h, nk, d, generator=gen))


def _bias(b, nq, nk, seed=2):
    return torch.randn(b, 1, nq, nk, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- extreme finite biases


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_min_bias_row_attends_uniformly(backend):
    """A row whose bias is finfo.min everywhere: in float64 (and float32) the bias absorbs q k^T, so the
    row attends uniformly; the gradient must not be Nk times too large (an lse that lost log(l))."""
    q, k, v = _qkv()
    bias = _bias(2, 6, 7)
    bias[0, 0, 2, :] = FMIN
    out = check_values(q, k, v, bias, backend=backend)[0]
    torch.testing.assert_close(out[0, :, 2].double(), v[0].double().mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [1e4, -3e5, 1e30])
def test_large_bias_row(backend, value):
    """A row biased by a large constant: lse is large and coarse in float32, the gradient still exact."""
    q, k, v = _qkv()
    bias = _bias(2, 6, 7)
    bias[1, 0, 1, :] += value
    check_values(q, k, v, bias, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_min_bias_row_forward(backend):
    """The forward of the all-min row on its own (the Triton forward once scaled the bias by log2(e)
    before subtracting the max: finfo.min overflowed to -inf and the row came out 0)."""
    q, k, v = _qkv()
    bias = _bias(2, 6, 7)
    bias[:, :, 3, :] = FMIN
    out = ops.attention(q, k, v, bias, backend=backend)
    torch.testing.assert_close(out[:, :, 3].double(), v.double().mean(dim=2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_with_finfo_min(backend):
    """Hugging Face's left padding: (B, 1, 1, Nk) with finfo.min on the padded keys, under causal (the
    first rows of a padded sequence see only padded keys: all-min rows)."""
    q, k, v = _qkv(nq=7, nk=7)
    bias = torch.zeros(2, 1, 1, 7)
    bias[0, ..., :3] = FMIN
    bias[1, ..., :1] = FMIN
    check_values(q, k, v, bias, causal=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_extreme_bias(backend):
    """finfo.min, -inf, large and ordinary values in one bias, a fully -inf row among them."""
    q, k, v = _qkv()
    bias = _bias(2, 6, 7) * 3
    gen = torch.Generator().manual_seed(5)
    pick = torch.rand(bias.shape, generator=gen)
    bias = torch.where(pick < 0.2, torch.full_like(bias, FMIN), bias)
    bias = torch.where((pick > 0.2) & (pick < 0.3), torch.full_like(bias, -INF), bias)
    bias[1, 0, 4, :] = -INF
    bias[0, 0, 1, :] = 30.0
    out = check_values(q, k, v, bias, backend=backend)
    assert torch.equal(out[0][1, :, 4], torch.zeros_like(out[0][1, :, 4]))
    assert bool((out[1][1, :, 4] == -INF).all())


# ----------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_attended_query_row(backend, causal):
    """A NaN query row: that row's out and lse are NaN (never 0 / -inf as if masked); others are exact."""
    q, k, v = _qkv()
    q[0, 1, 2, 3] = NAN
    got = check_values(q, k, v, causal=causal, backend=backend, tainted=_heads((0, 1)))
    assert bool(got[1][0, 1, 2].isnan()) and bool(got[0][0, 1, 2].isnan().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_query_row_that_sees_no_key(backend):
    """A NaN query row that a bool mask hides from every key: out 0, lse -inf, no NaN anywhere."""
    q, k, v = _qkv()
    q[0, 0, 1, :] = NAN
    mask = torch.ones(2, 2, 6, 7, dtype=torch.bool)
    mask[0, 0, 1, :] = False
    got = check_values(q, k, v, mask, backend=backend, tainted=_heads((0, 0)))
    assert not (bool(got[0].isnan().any()) or bool(got[1].isnan().any()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_key_under_causal(backend):
    """A NaN key row: rows that see it are NaN, rows that the causal rule hides it from are exact."""
    q, k, v = _qkv(nq=7, nk=7)
    k[1, 0, 4, 0] = NAN
    got = check_values(q, k, v, causal=True, backend=backend, tainted=_heads((1, 0)))
    assert not bool(got[0][1, 0, :4].isnan().any()) and bool(got[0][1, 0, 4:].isnan().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_key_masked_for_every_row(backend):
    """A NaN key that a key-padding bool mask hides from every query changes nothing."""
    q, k, v = _qkv()
    k[0, 1, 6, :] = NAN
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 6] = False
    got = check_values(q, k, v, mask, backend=backend, tainted=_heads((0, 1)))
    assert not (bool(got[0].isnan().any()) or bool(got[1].isnan().any()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_value_row(backend):
    """A NaN value row attended by every query: every output row of that head is NaN."""
    q, k, v = _qkv()
    v[1, 1, 3, 2] = NAN
    got = check_values(q, k, v, backend=backend, tainted=_heads((1, 1)))
    assert bool(got[0][1, 1, :, 2].isnan().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_value_and_fully_masked_row(backend):
    """A row with no allowed key stays exactly 0 even when v holds NaN (no 0 * NaN leaks)."""
    q, k, v = _qkv()
    v[0, 0, 5, :] = NAN
    bias = _bias(2, 6, 7)
    bias[0, 0, 2, :] = -INF
    out = ops.attention(q, k, v, bias, backend=backend)
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["attended", "causally_hidden"])
def test_nan_in_bias(backend, where):
    """A NaN bias entry: NaN in its row when the position is allowed, ignored when causal hides it."""
    q, k, v = _qkv(nq=7, nk=7)
    bias = _bias(2, 7, 7)
    if where == "attended":
        bias[0, 0, 5, 2] = NAN
    else:
        bias[0, 0, 2, 5] = NAN
    got = check_values(q, k, v, bias, causal=True, backend=backend, tainted=_heads((0, 0), (0, 1)))
    assert bool(got[0][0, :, 5 if where == "attended" else 2].isnan().any()) == (where == "attended")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_bias(backend):
    """+inf bias: lse +inf, output NaN in that row; -inf: a masked key; a fully -inf row: 0, lse -inf."""
    q, k, v = _qkv()
    bias = _bias(2, 6, 7)
    bias[1, 0, 3, 4] = INF
    bias[0, 0, 1, 2] = -INF
    bias[0, 0, 4, :] = -INF
    got = check_values(q, k, v, bias, backend=backend, tainted=_heads((1, 0), (1, 1)))
    assert bool((got[1][1, :, 3] == INF).all()) and bool(got[0][1, :, 3].isnan().all())
