"""Each drop-in of fusedlayers.nn beside its torch.nn original, on the cases PyTorch's own
module tests use (``module_inputs_torch_nn_*`` of torch/testing/_internal/common_modules.py,
test/nn/test_multihead_attention.py, test/test_transformers.py), re-expressed here:
the same constructor arguments and inputs to both, the same outputs, weights and gradients.

Deliberate differences (README, "Use it in your model"): a query that sees no key gives 0
where ``need_weights=True`` gives NaN in torch; dropout masks differ (own random stream)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fusedlayers
from fusedlayers import nn as fl_nn

from conftest import DEVICE

BACKENDS = ("cpu", "reference")
F64 = torch.float64  # the reference backend computes in float64: outputs match torch's to rounding


def _pair(torch_cls, fl_cls, *args, backend="reference", dtype=F64, **kwargs):
    """(torch module, drop-in) with the same weights, built from the same arguments."""
    torch.manual_seed(0)
    theirs = torch_cls(*args, **kwargs).to(DEVICE, dtype)
    ours = fl_cls(*args, **kwargs, backend=backend).to(DEVICE, dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(*shapes, dtype=F64):
    return [torch.randn(*s, dtype=dtype, device=DEVICE, requires_grad=True) for s in shapes]


def _outputs_and_grads(module, inputs, call):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = call(module, *inputs)
    out = out if isinstance(out, tuple) else (out,)
    first = out[0]
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(first.square().sum(), inputs + params, allow_unused=True) if first.numel() else []
    return [o for o in out if o is not None], list(grads)


def _assert_same(theirs, ours, inputs, call, **tol):
    t_out, t_grads = _outputs_and_grads(theirs, inputs, call)
    o_out, o_grads = _outputs_and_grads(ours, inputs, call)
    assert len(t_out) == len(o_out)
    for a, b in zip(o_out, t_out):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(o_grads, t_grads):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **tol)


# ---------------------------------------------------------------------------- norms

# (constructor args, input shape) of module_inputs_torch_nn_LayerNorm / _RMSNorm
NORM_CASES = [(([5], 1e-3), (4, 5, 5)), (([5], 1e-3), (128, 5, 5)), (([5], 1e-3, False), (4, 5, 5)),
              (([2, 2, 5], 1e-3), (4, 2, 2, 5)), (([2, 2, 5], 1e-3, False), (4, 2, 2, 5)), (([5], 1e-3), (0, 5)),
              ((5,), (5,)), (((3, 4),), (3, 4))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args,shape", NORM_CASES, ids=str)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_norm_modules_match_torch(kind, args, shape, backend):
    dtype = F64 if backend == "reference" else torch.float32
    theirs, ours = _pair(getattr(torch.nn, kind), getattr(fl_nn, kind), *args, backend=backend, dtype=dtype)
    if theirs.weight is not None:  # not the init values, so that a dropped weight would show
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if getattr(theirs, "bias", None) is not None:
                theirs.bias.normal_()
        ours.load_state_dict(theirs.state_dict())
    _assert_same(theirs, ours, _inputs(shape, dtype=dtype), lambda m, x: m(x))


@pytest.mark.parametrize("kwargs", [dict(bias=False), dict(elementwise_affine=False), dict(eps=1e-12)], ids=str)
def test_layer_norm_options_match_torch(kwargs):
    theirs, ours = _pair(torch.nn.LayerNorm, fl_nn.LayerNorm, [2, 2, 5], **kwargs)
    assert (ours.bias is None) == (theirs.bias is None) and (ours.weight is None) == (theirs.weight is None)
    _assert_same(theirs, ours, _inputs((4, 2, 2, 5)), lambda m, x: m(x))


def test_rms_norm_eps_none_uses_the_input_dtype():
    theirs, ours = _pair(torch.nn.RMSNorm, fl_nn.RMSNorm, 16, None, dtype=torch.float32)
    x = torch.full((2, 16), 1e-4, device=DEVICE)  # mean(x^2) = 1e-8, below float32's eps: eps matters
    torch.testing.assert_close(ours(x), theirs(x))


def test_norm_modules_eval_train_and_state_dict_roundtrip():
    theirs, ours = _pair(torch.nn.LayerNorm, fl_nn.LayerNorm, 8)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for mode in (True, False):
        theirs.train(mode)
        ours.train(mode)
        _assert_same(theirs, ours, _inputs((3, 8)), lambda m, x: m(x))


# ---------------------------------------------------------------------------- MultiheadAttention


def _mha_call(need_weights, key_padding_mask, attn_mask, average=True, is_causal=False):
    def call(m, q, k, v):
        return m(q, k, v, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                 average_attn_weights=average, is_causal=is_causal)
    return call


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias,add_bias_kv,add_zero_attn", list(itertools.product([True, False], repeat=3)))
def test_mha_unbatched_inputs_like_torchs_module_inputs(bias, add_bias_kv, add_zero_attn, batch_first):
    """module_inputs_torch_nn_MultiheadAttention: embed_dim 3, 3 heads, (3, 3) inputs with no
    batch dim, with and without a key padding mask (3,) and a (heads, L, S) attn_mask."""
    theirs, ours = _pair(torch.nn.MultiheadAttention, fl_nn.MultiheadAttention, embed_dim=3, num_heads=3,
                         batch_first=batch_first, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    kpm = torch.tensor([False, False, True], device=DEVICE)
    am = torch.tensor([False, False, True], device=DEVICE).expand(3, 3, 3)
    for key_padding_mask, attn_mask, need_weights in itertools.product((None, kpm), (None, am), (True, False)):
        _assert_same(theirs, ours, _inputs((3, 3), (3, 3), (3, 3)),
                     _mha_call(need_weights, key_padding_mask, attn_mask))


def _masks(kind, b, h, nq, nk, dtype):
    """attn_mask / key_padding_mask of every kind torch takes, no row fully masked."""
    gen = torch.Generator().manual_seed(1)
    allowed = torch.rand(nq, nk, generator=gen) < 0.6
    allowed[:, 0] = True
    return {
        None: (None, None),
        "bool 2-D": (~allowed, None),
        "float 2-D": (torch.randn(nq, nk, generator=gen, dtype=dtype), None),
        "bool 3-D": (~allowed.expand(b * h, nq, nk), None),
        "float 3-D": (torch.randn(b * h, nq, nk, generator=gen, dtype=dtype), None),
        "bool padding": (None, torch.tensor([[False] * nk, [False] * (nk - 2) + [True, True]])),
        "float padding": (None, torch.randn(b, nk, generator=gen, dtype=dtype)),
        "bool both": (~allowed, torch.tensor([[False] * nk, [False] + [True] * (nk - 1)])),
    }[kind]


@pytest.mark.parametrize("mask", [None, "bool 2-D", "float 2-D", "bool 3-D", "float 3-D", "bool padding",
                                  "float padding", "bool both"])
@pytest.mark.parametrize("kdim_vdim", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks_kdim_vdim_batch_first(mask, kdim_vdim, batch_first):
    b, h, e, nq, nk = 2, 2, 8, 3, 5
    extra = dict(kdim=6, vdim=5) if kdim_vdim else {}
    theirs, ours = _pair(torch.nn.MultiheadAttention, fl_nn.MultiheadAttention, e, h, batch_first=batch_first,
                         **extra)
    attn_mask, kpm = (t.to(DEVICE) if t is not None else None for t in _masks(mask, b, h, nq, nk, F64))

    def shape(n, d):
        return (b, n, d) if batch_first else (n, b, d)

    inputs = _inputs(shape(nq, e), shape(nk, extra.get("kdim", e)), shape(nk, extra.get("vdim", e)))
    for need_weights, average in ((True, True), (True, False), (False, True)):
        _assert_same(theirs, ours, inputs, _mha_call(need_weights, kpm, attn_mask, average))


def test_mha_self_attention_is_causal_and_eval_mode():
    theirs, ours = _pair(torch.nn.MultiheadAttention, fl_nn.MultiheadAttention, 8, 2, batch_first=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4, device=DEVICE, dtype=F64)
    (x,) = _inputs((2, 4, 8))
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        _assert_same(theirs, ours, [x, x, x], lambda m, q, k, v: m(q, q, q, attn_mask=causal, is_causal=True,
                                                                    need_weights=False))
        with torch.no_grad():  # torch's fast path conditions (eval, no grad, batch_first, self-attention)
            torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])


def test_mha_fully_masked_row_is_zero_not_nan():
    theirs, ours = _pair(torch.nn.MultiheadAttention, fl_nn.MultiheadAttention, 4, 2)
    q = torch.randn(3, 1, 4, dtype=F64, device=DEVICE)
    mask = torch.tensor([[False, True], [True, True], [False, False]], device=DEVICE)  # row 1 sees nothing
    kv = q[:2]
    want_sdpa = theirs(q, kv, kv, attn_mask=mask, need_weights=False)[0]
    want_weights = theirs(q, kv, kv, attn_mask=mask, need_weights=True)[0]
    for need_weights in (True, False):
        got = ours(q, kv, kv, attn_mask=mask, need_weights=need_weights)[0]
        torch.testing.assert_close(got, want_sdpa)  # torch 2.14's SDPA: 0 on that row
        assert not got.isnan().any()
    assert want_weights[1].isnan().all()  # the deliberate difference: torch's weights path gives NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_empty_batch_and_empty_sequence(backend):
    theirs, ours = _pair(torch.nn.MultiheadAttention, fl_nn.MultiheadAttention, 8, 2, batch_first=True,
                         backend=backend, dtype=torch.float32)
    for shape_q, shape_kv in (((0, 3, 8), (0, 4, 8)), ((2, 0, 8), (2, 4, 8))):
        q, kv = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in (shape_q, shape_kv))
        for need_weights in (False, True):
            got, weights = ours(q, kv, kv, need_weights=need_weights)
            want, want_weights = theirs(q, kv, kv, need_weights=need_weights)
            assert got.shape == want.shape
            if need_weights:
                assert weights.shape == want_weights.shape
            (g,) = torch.autograd.grad(got.sum(), q)
            assert g.shape == q.shape


def test_mha_dtypes_under_autocast_and_bias_kv():
    """Under CPU autocast the projections are bfloat16 while bias_k / bias_v stay float32:
    torch concatenates them (type promotion); the drop-in must not refuse the call."""
    theirs, ours = _pair(torch.nn.MultiheadAttention, fl_nn.MultiheadAttention, 8, 2, add_bias_kv=True,
                         add_zero_attn=True, kdim=6, vdim=6, dtype=torch.float32)
    q, kv = torch.randn(3, 2, 8, device=DEVICE), torch.randn(4, 2, 6, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = theirs(q, kv, kv, need_weights=False)[0]
        got = ours(q, kv, kv, need_weights=False)[0]
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------- Transformer layers

LAYER_MASKS = [(None, None), (torch.tensor([False, False, True]).expand(3, 3), None),
               (None, torch.tensor([False, False, True]))]


@pytest.mark.parametrize("norm_first,batch_first,bias", list(itertools.product([True, False], repeat=3)))
def test_encoder_layer_like_torchs_module_inputs(norm_first, batch_first, bias):
    theirs, ours = _pair(torch.nn.TransformerEncoderLayer, fl_nn.TransformerEncoderLayer, d_model=4, nhead=2,
                         dim_feedforward=8, dropout=0.0, batch_first=batch_first, norm_first=norm_first, bias=bias)
    for src_mask, kpm in LAYER_MASKS:
        src_mask, kpm = (t.to(DEVICE) if t is not None else None for t in (src_mask, kpm))
        # no batch dim (3, 4), as module_inputs_torch_nn_TransformerEncoderLayer; and batched
        _assert_same(theirs, ours, _inputs((3, 4)),
                     lambda m, x: m(x, src_mask=src_mask, src_key_padding_mask=kpm))
        batched_kpm = kpm.expand(2, 3) if kpm is not None else None
        _assert_same(theirs, ours, _inputs((2, 3, 4) if batch_first else (3, 2, 4)),
                     lambda m, x: m(x, src_mask=src_mask, src_key_padding_mask=batched_kpm))


@pytest.mark.parametrize("activation", [F.relu, F.gelu, "gelu"], ids=str)
def test_encoder_layer_activations(activation):
    theirs, ours = _pair(torch.nn.TransformerEncoderLayer, fl_nn.TransformerEncoderLayer, 4, 2, 8, 0.0, activation)
    _assert_same(theirs, ours, _inputs((2, 3, 4)), lambda m, x: m(x))


@pytest.mark.parametrize("norm_first,batch_first", list(itertools.product([True, False], repeat=2)))
def test_decoder_layer_matches_torch(norm_first, batch_first):
    theirs, ours = _pair(torch.nn.TransformerDecoderLayer, fl_nn.TransformerDecoderLayer, d_model=4, nhead=2,
                         dim_feedforward=8, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(3, device=DEVICE, dtype=F64)
    memory_kpm = torch.tensor([[False, False, False, True], [False, True, True, True]], device=DEVICE)
    tgt_shape, mem_shape = ((2, 3, 4), (2, 4, 4)) if batch_first else ((3, 2, 4), (4, 2, 4))
    _assert_same(theirs, ours, _inputs(tgt_shape, mem_shape),
                 lambda m, t, mem: m(t, mem, tgt_mask=causal, tgt_is_causal=True,
                                     memory_key_padding_mask=memory_kpm))
    _assert_same(theirs, ours, _inputs((3, 4), (4, 4)), lambda m, t, mem: m(t, mem))  # no batch dim


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_dtypes_under_autocast(norm_first):
    """A float32 residual stream plus a bfloat16 sublayer output is float32 in torch (type
    promotion), so the post-norm layer returns float32 under CPU autocast: so must ours."""
    theirs, ours = _pair(torch.nn.TransformerEncoderLayer, fl_nn.TransformerEncoderLayer, 8, 2, 16, 0.0,
                         norm_first=norm_first, batch_first=True, dtype=torch.float32)
    x = torch.randn(2, 3, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want, got = theirs(x), ours(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_transformer_encoder_swapped_matches_with_nested_fast_path():
    """nn.TransformerEncoder in eval mode with a padding mask hands a nested tensor to its
    layers (torch's fast path); the swapped model gives the same padded result."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).to(DEVICE).eval()
    x = torch.randn(2, 5, 8, device=DEVICE)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=DEVICE)
    with torch.no_grad():
        want = model(x, src_key_padding_mask=kpm)
        fusedlayers.swap(model)
        got = model(x, src_key_padding_mask=kpm)
    assert isinstance(model.layers[0], fl_nn.TransformerEncoderLayer)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, :3], want[1, :3], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm", "TransformerEncoderLayer"])
def test_cuda_autocast_dtypes_match_torch(kind):
    """Under CUDA autocast torch's layer_norm runs in float32 (float32 output), its rms_norm in
    some versions only (bfloat16 output on torch 2.11): the drop-ins give torch's dtype and values."""
    args = {"LayerNorm": (16,), "RMSNorm": (16,), "TransformerEncoderLayer": (16, 2, 32, 0.0)}[kind]
    theirs, ours = _pair(getattr(torch.nn, kind), getattr(fl_nn, kind), *args, backend="auto",
                         dtype=torch.float32)
    theirs, ours = theirs.cuda(), ours.cuda()
    x = torch.randn(4, 3, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = x.bfloat16() if kind != "TransformerEncoderLayer" else x
        want, got = theirs(x), ours(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
