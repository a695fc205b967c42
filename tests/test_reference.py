"""The naive reference itself: gradcheck in float64, and its semantics against PyTorch's own
functions (SDPA, layer_norm, rms_norm) and against first principles."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fusedlayers import reference

f64 = dict(dtype=torch.float64)


def _qkv(b=2, hq=4, hkv=2, nq=5, nk=7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, **f64).requires_grad_()
            for shape in ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d))]


MASK_KINDS = ["none", "bool", "bias", "bias_inf"]


def _mask(kind, b=2, hq=4, nq=5, nk=7):
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    if kind == "bool":
        m = torch.rand(b, 1, nq, nk, generator=g) < 0.7
        m[:, :, 2] = False  # a fully masked row
        return m
    bias = torch.randn(1, hq, nq, nk, generator=g, **f64)
    if kind == "bias_inf":
        bias[..., 1, :3] = float("-inf")
        bias[..., 2, :] = float("-inf")  # a fully masked row
    return bias.requires_grad_()


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_attention_gradcheck(mask, causal):
    q, k, v = _qkv()
    m = _mask(mask)

    def fn(q, k, v, *bias):
        out, lse = reference.attention(q, k, v, bias[0] if bias else m, causal=causal is not None,
                                       causal_align=causal or "top_left")
        return out, torch.where(torch.isfinite(lse), lse, 0)

    extra = (m,) if m is not None and m.requires_grad else ()
    assert gradcheck(fn, (q, k, v, *extra))


def test_attention_gradcheck_with_dropout_mask():
    q, k, v = _qkv()
    keep = torch.rand(2, 4, 5, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    assert gradcheck(lambda q, k, v: reference.attention(q, k, v, dropout_p=0.3, dropout_mask=keep)[0], (q, k, v))


def test_varlen_gradcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, **f64).requires_grad_() for shape in ((6, 2, 3), (8, 1, 3), (8, 1, 3)))
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 5, 8], dtype=torch.int32)
    assert gradcheck(lambda q, k, v: reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True,
                                                                causal_align="bottom_right")[0], (q, k, v))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_gradcheck(rms, residual):
    g = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(shape, generator=g, **f64).requires_grad_() for shape in ((3, 6), (3, 6), (6,), (6,)))
    keep = torch.rand(3, 6, generator=g) > 0.2
    args = (x, r, w) + (() if rms else (b,))

    def fn(x, r, w, b=None):
        return reference.add_layer_norm(x, r if residual else None, w, b, 1e-5, dropout_p=0.2, dropout_mask=keep,
                                        rms=rms)

    assert gradcheck(fn, args)
    assert gradcheck(lambda x, w, *b: (reference.rms_norm(x, w) if rms else reference.layer_norm(x, w, b[0])),
                     (x, w) + (() if rms else (b,)))


@pytest.mark.parametrize("mask", ["none", "bool", "bias"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(mask, causal):
    q, k, v = _qkv(hkv=4, nq=7, nk=7)
    m = _mask(mask, nq=7, nk=7)
    if m is not None and m.dtype == torch.bool:
        m[:, :, 2] = True  # SDPA returns NaN on fully masked rows; compare the rest
    if causal and m is not None:
        m = m & reference.causal_mask(7, 7) if m.dtype == torch.bool else m.masked_fill(~reference.causal_mask(7, 7),
                                                                                         float("-inf"))
    ours, _ = reference.attention(q, k, v, m, causal=causal and m is None)
    theirs = F.scaled_dot_product_attention(q, k, v, m, is_causal=causal and m is None)
    torch.testing.assert_close(ours, theirs)


def test_gqa_is_repeat_of_kv_heads():
    q, k, v = _qkv(hq=6, hkv=2)
    ours, _ = reference.attention(q, k, v)
    expanded, _ = reference.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(ours, expanded)
    # query head 4 belongs to KV head 4 // 3 = 1
    alone, _ = reference.attention(q[:, 4:5], k[:, 1:2], v[:, 1:2])
    torch.testing.assert_close(ours[:, 4:5], alone)


def test_causal_alignments():
    assert reference.causal_mask(2, 4).tolist() == [[True, False, False, False], [True, True, False, False]]
    assert reference.causal_mask(2, 4, "bottom_right").tolist() == [[True, True, True, False], [True, True, True, True]]
    assert reference.causal_mask(3, 2, "bottom_right").tolist() == [[False, False], [True, False], [True, True]]
    # bottom-right with one query (decoding) sees every key
    q, k, v = _qkv(nq=1, nk=9)
    ours, _ = reference.attention(q, k, v, causal=True, causal_align="bottom_right")
    torch.testing.assert_close(ours, reference.attention(q, k, v)[0])


def test_fully_masked_rows_give_zero_and_minus_inf_and_zero_grad():
    q, k, v = _qkv()
    m = torch.ones(2, 4, 5, 7, dtype=torch.bool)
    m[:, :, 3] = False
    out, lse = reference.attention(q, k, v, m)
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad[:, :, 3] == 0) and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # causal top-left with Nq > Nk never empties a row; bottom-right does
    _, lse = reference.attention(*_qkv(nq=7, nk=4), causal=True, causal_align="bottom_right")
    assert torch.all(lse[:, :, :3] == float("-inf")) and torch.isfinite(lse[:, :, 3:]).all()


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = _qkv(hkv=4)
    _, lse = reference.attention(q, k, v, scale=0.7)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.7, dim=-1))


def test_dropout_mask_scales_kept_probabilities():
    q, k, v = _qkv(hkv=4)
    keep = torch.rand(2, 4, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.5
    out, _ = reference.attention(q, k, v, dropout_p=0.5, dropout_mask=keep)
    p = torch.softmax(q @ k.transpose(-1, -2) / 3**0.5, dim=-1)
    torch.testing.assert_close(out, (p * keep * 2) @ v)
    with pytest.raises(ValueError, match="dropout_mask"):
        reference.attention(q, k, v, dropout_p=0.5)


def test_varlen_is_per_sequence_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, **f64) for shape in ((6, 2, 3), (9, 2, 3), (9, 2, 3)))
    cu_q, cu_k = torch.tensor([0, 2, 6]), torch.tensor([0, 5, 9])
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, causal_align="bottom_right")
    for (a, b), (c, d) in (((0, 2), (0, 5)), ((2, 6), (5, 9))):
        o, l = reference.attention(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                                   v[c:d].transpose(0, 1)[None], causal=True, causal_align="bottom_right")
        torch.testing.assert_close(out[a:b], o[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, a:b], l[0])


def test_norms_match_torch():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=g, **f64) for shape in ((4, 10), (10,), (10,)))
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (10,), w, b, 1e-5))
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6), F.rms_norm(x, (10,), w, 1e-6))
    y, z = reference.add_layer_norm(x, 2 * x, w, b)
    torch.testing.assert_close(z, 3 * x)
    torch.testing.assert_close(y, F.layer_norm(3 * x, (10,), w, b))


def test_public_ops_gradcheck_in_float64_on_the_reference_backend():
    import fusedlayers

    q, k, v = _qkv()
    m = _mask("bias")
    assert gradcheck(lambda q, k, v, m: fusedlayers.attention(q, k, v, m, causal=True, causal_align="bottom_right",
                                                              backend="reference"), (q, k, v, m))
    g = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(shape, generator=g, **f64).requires_grad_() for shape in ((3, 6), (3, 6), (6,), (6,)))
    assert gradcheck(lambda x, r, w, b: fusedlayers.add_layer_norm(x, r, w, b, prenorm=True, backend="reference"),
                     (x, r, w, b))
