"""fusedlayers.nn against torch.nn: the same weights, outputs and gradients under the test
method (float64 torch is the truth; ours may err 2x / 3x what float32 torch errs), the
same constructor, initialisation and state_dict, every mask convention of
nn.MultiheadAttention."""

import copy

import pytest
import torch

import fusedlayers
from fusedlayers import nn as fnn
from module_rule import check_runs, randn

E, H = 32, 4  # embed dim, heads


def _params(module):
    return {n: p for n, p in module.named_parameters()}


def _runner(theirs, ours, make_inputs, call):
    """run(kind) for check_runs: the module of that kind on inputs of that kind."""
    modules = {"ref64": copy.deepcopy(theirs).double(), "torch": theirs, "ours": ours}

    def run(kind):
        inputs = make_inputs(kind)
        out = call(modules[kind], inputs)
        tensors = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
        tensors.update(_params(modules[kind]))
        return out, tensors

    return run


# ---------------------------------------------------------------------------- norms


@pytest.mark.parametrize("shape, kwargs", [
    (E, {}),
    ((E,), {"eps": 1e-3}),
    ((4, 8), {}),  # multi-dim normalized_shape: flattened trailing dims
    (E, {"elementwise_affine": False}),
    (E, {"bias": False}),
], ids=str)
def test_layer_norm_matches_torch(shape, kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm(shape, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ours = fnn.LayerNorm.from_torch(theirs)
    xshape = (3, 5) + ((shape,) if isinstance(shape, int) else tuple(shape))
    check_runs(_runner(theirs, ours, lambda k: {"x": randn(xshape, k, "x", requires_grad=True)},
                       lambda m, i: m(i["x"])), f"LayerNorm{shape} {kwargs}")


@pytest.mark.parametrize("shape, eps", [(E, None), (E, 1e-5), ((4, 8), 1e-6)], ids=str)
def test_rms_norm_matches_torch(shape, eps):
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm(shape, eps=eps)
    with torch.no_grad():
        theirs.weight.add_(torch.randn_like(theirs.weight) * 0.5)
    ours = fnn.RMSNorm.from_torch(theirs)
    xshape = (3, 5) + ((shape,) if isinstance(shape, int) else tuple(shape))
    check_runs(_runner(theirs, ours, lambda k: {"x": randn(xshape, k, "x", requires_grad=True)},
                       lambda m, i: m(i["x"])), f"RMSNorm{shape} eps={eps}")


class _AddNormTorch(torch.nn.LayerNorm):
    """The unfused formula AddLayerNorm replaces: LN(x + residual), and the sum."""

    def forward(self, x, residual):
        z = x + residual
        return torch.cat([super().forward(z), z], dim=-1)


@pytest.mark.parametrize("prenorm", [False, True])
def test_add_layer_norm_matches_torch(prenorm):
    torch.manual_seed(0)
    theirs = _AddNormTorch(E)
    with torch.no_grad():
        theirs.weight.add_(torch.randn(E) * 0.5)
        theirs.bias.add_(torch.randn(E))
    ours = fnn.AddLayerNorm(E, prenorm=prenorm)
    ours.load_state_dict(theirs.state_dict())  # a LayerNorm's state_dict loads into it

    def call(m, i):
        if m is not ours:
            out = m(i["x"], i["r"])
            return out if prenorm else out[..., :E]
        y = m(i["x"], i["r"])
        return torch.cat(y, dim=-1) if prenorm else y

    check_runs(_runner(theirs, ours, lambda k: {"x": randn((3, 5, E), k, "x", requires_grad=True),
                                                "r": randn((3, 5, E), k, "r", requires_grad=True)}, call),
               f"AddLayerNorm prenorm={prenorm}")


def test_add_layer_norm_dropout():
    """Training: z = x * keep / (1 - p) + residual and y = LN(z); eval: no dropout."""
    m = fnn.AddLayerNorm(256, dropout=0.25, prenorm=True)
    x, r = torch.randn(64, 256), torch.randn(64, 256)
    y, z = m(x, r)
    kept = (z - r).abs() > 1e-6
    assert 0.7 < kept.float().mean().item() < 0.8
    torch.testing.assert_close((z - r)[kept], (x / 0.75)[kept])  # float32 sum, then difference
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(z, (256,)), atol=1e-5, rtol=1e-5)
    m.eval()
    y, z = m(x, r)
    torch.testing.assert_close(z, x + r)


# ---------------------------------------------------------------------------- attention


def _causal(n):
    """The causal attn_mask of torch.nn, bool (True = not allowed): the same type as the
    padding masks (torch warns on mixed types)."""
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def _padding(b, s, kind):
    """key_padding_mask of nn.MultiheadAttention (True / -inf = ignore); sequence 0 unpadded."""
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, s - 2:] = True
    pad[-1, s - 1:] = True
    return pad if kind == "bool" else torch.zeros(b, s).masked_fill(pad, float("-inf"))


MHA_CASES = [
    # batch_first, kdim, bias_kv, zero_attn, need_weights, attn_mask, key_padding_mask, batched
    (False, None, False, False, False, None, "bool", True),
    (True, None, False, False, False, None, "bool", True),
    (True, None, False, False, False, "bool2", "bool", True),
    (False, None, False, False, False, "float2", "float", True),
    (True, None, False, False, False, "float2", "bool", True),  # mixed: torch converts both to float
    (True, None, False, False, False, "bool3", None, True),  # (N*num_heads, L, S)
    (True, 24, False, False, False, "bool2", "bool", True),  # kdim = vdim != embed_dim: q/k/v_proj_weight
    (False, None, True, True, False, "bool2", "bool", True),  # bias_k / bias_v, add_zero_attn
    (True, None, False, False, True, "float2", "bool", True),  # need_weights: materialised path
    (False, 24, True, False, True, "bool3", None, True),
    (True, None, False, False, False, "bool3", "bool", False),  # unbatched
    (False, None, False, False, True, "bool2", "bool", False),
]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")  # a case mixes them
@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_multihead_attention_matches_torch(case):
    batch_first, kdim, bias_kv, zero_attn, need_weights, attn_kind, kpm_kind, batched = case
    b, nq, nk = 3, 7, 9
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, bias=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim,
                                         vdim=kdim, batch_first=batch_first)
    if not batched:
        b = 1
    ours = fnn.MultiheadAttention.from_torch(theirs)
    gen = torch.Generator().manual_seed(1)
    attn_mask = {None: None,
                 "bool2": torch.rand(nq, nk, generator=gen) < 0.3,
                 "float2": torch.randn(nq, nk, generator=gen),
                 "bool3": torch.rand(b * H, nq, nk, generator=gen) < 0.3}[attn_kind]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[..., 0] = False  # every query sees a key
    kpm = None if kpm_kind is None else _padding(3, nk, kpm_kind)[1 if not batched else slice(None)]

    def shape(n, e):
        if not batched:
            return (n, e)
        return (b, n, e) if batch_first else (n, b, e)

    def inputs(kind):
        return {"query": randn(shape(nq, E), kind, "q", requires_grad=True),
                "key": randn(shape(nk, kdim or E), kind, "k", requires_grad=True),
                "value": randn(shape(nk, kdim or E), kind, "v", requires_grad=True)}

    def call(m, i):
        dtype = i["query"].dtype
        mask = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        pad = kpm.to(dtype) if kpm is not None and kpm.is_floating_point() else kpm
        out, w = m(i["query"], i["key"], i["value"], key_padding_mask=pad, need_weights=need_weights,
                   attn_mask=mask)
        assert (w is None) == (not need_weights)
        return out if w is None else torch.cat([out.flatten(), w.flatten()])

    check_runs(_runner(theirs, ours, inputs, call), f"MultiheadAttention {case}")


def test_multihead_attention_self_attention_causal():
    """Self-attention (one projection), is_causal with the causal mask (the hint) and
    without (ours applies it; torch needs the mask), with and without padding."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = fnn.MultiheadAttention.from_torch(theirs)
    causal = _causal(7)
    for pad in (None, _padding(3, 7, "bool")):
        for give_mask in (True, False):
            def call(m, i):
                x, dtype = i["x"], i["x"].dtype
                mask = causal if (give_mask or m is not ours) else None
                return m(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=False, is_causal=True)[0]

            check_runs(_runner(theirs, ours, lambda k: {"x": randn((3, 7, E), k, "x", requires_grad=True)}, call),
                       f"causal, padding={pad is not None}, mask given={give_mask}")


def test_multihead_attention_average_weights_and_eval_dropout():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, dropout=0.5).eval()
    ours = fnn.MultiheadAttention.from_torch(theirs)
    x = torch.randn(6, 2, E)
    for average in (True, False):
        o1, w1 = theirs(x, x, x, average_attn_weights=average)
        o2, w2 = ours(x, x, x, average_attn_weights=average)
        assert w1.shape == w2.shape == ((2, 6, 6) if average else (2, H, 6, 6))
        torch.testing.assert_close(o2, o1)
        torch.testing.assert_close(w2, w1)
    ours.train()  # dropout on: runs, forward and backward, both paths
    for need_weights in (True, False):
        xg = x.clone().requires_grad_()
        out, _ = ours(xg, xg, xg, need_weights=need_weights)
        out.sum().backward()
        assert torch.isfinite(xg.grad).all()


def test_multihead_attention_fully_masked_query_gives_zero():
    """A query that sees no key: attention output 0 (out_proj(0) = its bias); torch gives NaN."""
    torch.manual_seed(0)
    ours = fnn.MultiheadAttention(E, H, batch_first=True)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True  # query 2 may see nothing
    x = torch.randn(2, 5, E)
    for need_weights in (False, True):
        out, _ = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
        torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(2, E))


def test_multihead_attention_rejects_bad_masks():
    m = fnn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        fnn.MultiheadAttention(E, H, backend="fast")


# ---------------------------------------------------------------------------- layers


LAYER_ARGS = dict(d_model=E, nhead=H, dim_feedforward=64, dropout=0.1)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(batch_first, norm_first):
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoderLayer(**LAYER_ARGS, batch_first=batch_first, norm_first=norm_first,
                                              activation="gelu").eval()
    ours = fnn.TransformerEncoderLayer(**LAYER_ARGS, batch_first=batch_first, norm_first=norm_first,
                                       activation="gelu").eval()
    ours.load_state_dict(theirs.state_dict())
    pad = _padding(3, 7, "bool")
    causal = _causal(7)

    def call(m, i):
        src = i["src"] if batch_first else i["src"].transpose(0, 1)
        return m(src, src_mask=causal, src_key_padding_mask=pad, is_causal=True)

    check_runs(_runner(theirs, ours, lambda k: {"src": randn((3, 7, E), k, "src", requires_grad=True)}, call),
               f"TransformerEncoderLayer batch_first={batch_first} norm_first={norm_first}")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(batch_first, norm_first):
    torch.manual_seed(0)
    theirs = torch.nn.TransformerDecoderLayer(**LAYER_ARGS, batch_first=batch_first, norm_first=norm_first).eval()
    ours = fnn.TransformerDecoderLayer(**LAYER_ARGS, batch_first=batch_first, norm_first=norm_first).eval()
    ours.load_state_dict(theirs.state_dict())
    tgt_pad, mem_pad = _padding(3, 6, "bool"), _padding(3, 8, "bool")
    causal = _causal(6)

    def call(m, i):
        tgt, mem = (i["tgt"], i["mem"]) if batch_first else (i["tgt"].transpose(0, 1), i["mem"].transpose(0, 1))
        return m(tgt, mem, tgt_mask=causal, tgt_key_padding_mask=tgt_pad,
                 memory_key_padding_mask=mem_pad, tgt_is_causal=True)

    check_runs(_runner(theirs, ours, lambda k: {"tgt": randn((3, 6, E), k, "tgt", requires_grad=True),
                                                "mem": randn((3, 8, E), k, "mem", requires_grad=True)}, call),
               f"TransformerDecoderLayer batch_first={batch_first} norm_first={norm_first}")


def test_transformer_end_to_end():
    """torch.nn.Transformer built from our layers (swap) vs the original, padded and causal."""
    torch.manual_seed(0)
    theirs = torch.nn.Transformer(d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=2,
                                  dim_feedforward=64, batch_first=True).eval()
    ours = copy.deepcopy(theirs)
    report = fusedlayers.swap(ours)
    assert {e.new for e in report.swapped} == {"fusedlayers.nn.TransformerEncoderLayer",
                                               "fusedlayers.nn.TransformerDecoderLayer",
                                               "fusedlayers.nn.MultiheadAttention", "fusedlayers.nn.LayerNorm"}
    src_pad, tgt_pad = _padding(3, 8, "bool"), _padding(3, 6, "bool")
    causal = _causal(6)

    def call(m, i):
        return m(i["src"], i["tgt"], tgt_mask=causal, src_key_padding_mask=src_pad,
                 tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad, tgt_is_causal=True)

    check_runs(_runner(theirs, ours, lambda k: {"src": randn((3, 8, E), k, "src", requires_grad=True),
                                                "tgt": randn((3, 6, E), k, "tgt", requires_grad=True)}, call),
               "nn.Transformer")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_encoder_nested_tensor_path():
    """nn.TransformerEncoder in eval under no_grad with a padding mask hands its layers a
    nested tensor; ours runs it padded and returns it nested (padding zeros, as torch)."""
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(**LAYER_ARGS, batch_first=True)
    torch.manual_seed(0)
    ref_layer = torch.nn.TransformerEncoderLayer(**LAYER_ARGS, batch_first=True)
    ours = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    theirs = torch.nn.TransformerEncoder(ref_layer, 2, enable_nested_tensor=True).eval()
    assert ours.use_nested_tensor  # our layer is a TransformerEncoderLayer: torch keeps its fast path on
    x, pad = torch.randn(3, 7, E), _padding(3, 7, "bool")
    with torch.no_grad():
        torch.testing.assert_close(ours(x, src_key_padding_mask=pad), theirs(x, src_key_padding_mask=pad),
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- construction


DROP_INS = [
    (torch.nn.LayerNorm, fnn.LayerNorm, (E,), {"eps": 1e-6, "bias": False}),
    (torch.nn.RMSNorm, fnn.RMSNorm, ((4, 8),), {"eps": 1e-6}),
    (torch.nn.MultiheadAttention, fnn.MultiheadAttention, (E, H), {"add_bias_kv": True, "kdim": 24, "vdim": 16}),
    (torch.nn.MultiheadAttention, fnn.MultiheadAttention, (E, H), {"batch_first": True}),
    (torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, (E, H, 64), {"norm_first": True}),
    (torch.nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer, (E, H, 64), {"bias": False}),
]


@pytest.mark.parametrize("torch_cls, our_cls, args, kwargs", DROP_INS, ids=lambda v: getattr(v, "__name__", ""))
def test_same_constructor_init_and_state_dict(torch_cls, our_cls, args, kwargs):
    """Under one seed both draw the same weights under the same state_dict keys, and each
    loads the other's state_dict strictly (both directions)."""
    torch.manual_seed(0)
    theirs = torch_cls(*args, **kwargs)
    torch.manual_seed(0)
    ours = our_cls(*args, **kwargs, backend="reference")
    assert isinstance(ours, torch_cls)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_t) == list(sd_o)
    assert all(torch.equal(sd_t[k], sd_o[k]) for k in sd_t)
    torch.manual_seed(1)
    other_t, other_o = torch_cls(*args, **kwargs), our_cls(*args, **kwargs)
    for p in list(other_t.parameters()) + list(other_o.parameters()):
        torch.nn.init.normal_(p)
    ours.load_state_dict(other_t.state_dict(), strict=True)
    theirs.load_state_dict(other_o.state_dict(), strict=True)
    assert all(torch.equal(v, other_t.state_dict()[k]) for k, v in ours.state_dict().items())
    assert all(torch.equal(v, other_o.state_dict()[k]) for k, v in theirs.state_dict().items())
    assert "backend='reference'" in repr(ours) or our_cls in (fnn.TransformerEncoderLayer,
                                                                 fnn.TransformerDecoderLayer)


def test_from_torch_shares_parameters():
    m = torch.nn.MultiheadAttention(E, H)
    ours = fnn.MultiheadAttention.from_torch(m, backend="reference")
    assert all(a is b for a, b in zip(m.parameters(), ours.parameters()))
    assert ours.backend == "reference" and not hasattr(m, "backend")
    with pytest.raises(TypeError, match="expects a torch.nn"):
        fnn.LayerNorm.from_torch(torch.nn.RMSNorm(E))
