"""Hugging Face transformers on fusedlayers: ``fusedlayers.hf.register()`` +
``attn_implementation="fusedlayers"`` + ``fusedlayers.swap`` (the norms), against the
same model on ``eager`` attention, with padded batches. Models come from tiny random
configs: nothing is downloaded. Skipped without transformers (``pip install .[hf]``)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedlayers  # noqa: E402
from fusedlayers import hf  # noqa: E402
from fusedlayers.swap import HFRMSNorm  # noqa: E402
from module_rule import check_runs  # noqa: E402

B, S, T = 3, 9, 6  # batch, encoder / decoder-only length, decoder length of encoder-decoders


@pytest.fixture(scope="module", autouse=True)
def registered():
    return hf.register()


def _ids(n, key):
    return torch.randint(5, 90, (B, n), generator=torch.Generator().manual_seed(key))


def _padding(n, side):
    """(B, n) attention_mask, 1 = token: sequence 0 full, the others padded on ``side``."""
    mask = torch.ones(B, n, dtype=torch.long)
    mask[1, n - 3:] = 0
    mask[2, n - 5:] = 0
    return mask if side == "right" else mask.flip(1)


ENCODER = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
SEQ2SEQ_SIZES = dict(vocab_size=100, d_model=32)
# sliding_window 6 < S = 9 binds, and leaves every right-padded query a token to see
SLIDING = dict(ENCODER, num_key_value_heads=2, head_dim=8, sliding_window=6,
               layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_local_experts=2, num_experts_per_tok=1, experts_implementation="eager")  # float64 experts
# Padding on the right: with left padding a padding query of a decoder sees no key, and
# eager attention in float64 then turns the whole sequence into NaN (0 * NaN in p @ v);
# left padding is checked by the cache and output_attentions tests below, in float32.
MODELS = {
    # name: (config class, model class, config kwargs, padding side, encoder-decoder)
    "bert": ("BertConfig", "BertModel", ENCODER, "right", False),
    "roberta": ("RobertaConfig", "RobertaModel", ENCODER, "right", False),
    "gpt2": ("GPT2Config", "GPT2Model", dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                             eos_token_id=2), "right", False),
    "llama-gqa": ("LlamaConfig", "LlamaModel", dict(ENCODER, num_key_value_heads=2), "right", False),
    "mistral-sliding-window": ("MistralConfig", "MistralModel", dict(ENCODER, num_key_value_heads=2,
                                                                     sliding_window=6), "right", False),
    # layer_types: sliding and full layers
    "gemma2-softcap-sliding": ("Gemma2Config", "Gemma2Model", dict(SLIDING, attn_logit_softcapping=5.0,
                                                                    query_pre_attn_scalar=8), "right", False),
    "gemma3-sliding": ("Gemma3TextConfig", "Gemma3TextModel", dict(SLIDING), "right", False),
    "gpt-oss-sinks-sliding": ("GptOssConfig", "GptOssModel", dict(SLIDING, **MOE), "right", False),
    "qwen2-sliding": ("Qwen2Config", "Qwen2Model", dict(ENCODER, num_key_value_heads=2, sliding_window=6,
                                                        use_sliding_window=True, max_window_layers=1), "right", False),
    # no sliding_window argument and no module attribute: the window comes from the config
    "phimoe-sliding": ("PhimoeConfig", "PhimoeModel", dict(ENCODER, num_key_value_heads=2, sliding_window=6,
                                                           **MOE), "right", False),
    "t5": ("T5Config", "T5Model", dict(SEQ2SEQ_SIZES, num_layers=2, num_heads=4, d_kv=8, d_ff=64), "right", True),
    "bart": ("BartConfig", "BartModel", dict(SEQ2SEQ_SIZES, encoder_layers=2, decoder_layers=2,
                                             encoder_attention_heads=4, decoder_attention_heads=4,
                                             encoder_ffn_dim=64, decoder_ffn_dim=64), "right", True),
}

# norm classes swap has no drop-in for (Gemma's (1 + weight) RMSNorm, GptOssRMSNorm): left as they are
NORMS_WITHOUT_DROP_IN = {"gemma2-softcap-sliding", "gemma3-sliding", "gpt-oss-sinks-sliding"}


def _build(name):
    config_cls, model_cls, kwargs, _, _ = MODELS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    # from_config mutates the config it is given: a copy per model
    model = getattr(transformers, model_cls)._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    for module in model.modules():  # attention sinks of order 1 (initialised near 0)
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            torch.nn.init.normal_(module.sinks.data)
    return model


SLIDING_MODELS = {name: MODELS[name][2]["sliding_window"] for name in MODELS if "sliding" in name}


class AttentionSpy:
    """Records what each fusedlayers.attention call of hf's attention function receives."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = hf.ops.attention

        def spy(q, k, v, attn_mask=None, **kwargs):
            self.calls.append(dict(kwargs, nq=q.shape[2], nk=k.shape[2], mask=attn_mask))
            return real(q, k, v, attn_mask, **kwargs)

        monkeypatch.setattr(hf.ops, "attention", spy)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_eager(name):
    """Outputs and gradients (inputs embeddings and every parameter) of the model on
    fusedlayers' attention with its norms swapped, against eager attention in float64
    (truth) and float32, on the non-padding positions."""
    _, _, _, side, seq2seq = MODELS[name]
    original = _build(name)
    ours = copy.deepcopy(original)
    ours.set_attn_implementation(hf.NAME)
    report = fusedlayers.swap(ours)
    if name in NORMS_WITHOUT_DROP_IN:
        assert not report.swapped, str(report)
    else:
        assert report.swapped and not report.left, str(report)
    mask = _padding(S, side)
    dec_mask = _padding(T, "right")

    def run(kind):
        model = {"ref64": copy.deepcopy(original).double(), "torch": original, "ours": ours}[kind]
        embeds = model.get_input_embeddings()(_ids(S, 0)).detach().requires_grad_()
        if seq2seq:
            out = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=_ids(T, 1),
                        decoder_attention_mask=dec_mask)
            out = torch.cat([out.last_hidden_state.flatten(), (out.encoder_last_hidden_state
                                                               * mask[..., None]).flatten()])
        else:
            out = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return out, {"inputs_embeds": embeds, **dict(model.named_parameters())}

    if seq2seq:
        valid = torch.cat([dec_mask[..., None].expand(B, T, 32).flatten(), mask[..., None].expand(B, S, 32).flatten()])
    else:
        valid = mask[..., None]
    check_runs(run, name, valid=valid.bool())


def test_register_files_both_interfaces():
    assert transformers.AttentionMaskInterface._global_mapping[hf.NAME] is hf.sliding_window_mask
    assert transformers.AttentionInterface._global_mapping[hf.NAME].__name__ == "fusedlayers_attention"
    assert hf.NAME in hf.REGISTERED


def test_padded_bert_receives_the_mask():
    """What transformers hands our function for a padded encoder: a bool (B, 1, Nq, Nk)
    mask, True = attend (without the mask function it would hand None)."""
    seen = []
    model = _build("bert")
    model.set_attn_implementation(hf.NAME)
    layer = model.encoder.layer[0].attention.self
    layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    mask = _padding(S, "right")
    model(input_ids=_ids(S, 0), attention_mask=mask)
    assert seen[0].dtype == torch.bool and seen[0].shape == (B, 1, S, S)
    assert torch.equal(seen[0][:, 0, 0, :], mask.bool())


def test_generate_with_cache_matches_eager():
    """Greedy decoding with a KV cache (one query against the cache) and left padding."""
    config = transformers.LlamaConfig(**dict(MODELS["llama-gqa"][2]))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    ids, mask = _ids(S, 0), _padding(S, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**kwargs)
    model.set_attn_implementation(hf.NAME)
    fusedlayers.swap(model)
    assert torch.equal(model.generate(**kwargs), expected)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2-softcap-sliding", "gpt-oss-sinks-sliding"])
def test_output_attentions(name):
    """The weights, softcap and sinks included, padded (the mask holds the window) and
    not (the window goes to the materialised path as window_size)."""
    model = _build(name)
    ours = copy.deepcopy(model)
    ours.set_attn_implementation(hf.NAME)
    ids = _ids(S, 0)
    for mask in (_padding(S, "left"), torch.ones(B, S, dtype=torch.long)):
        expected = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        got = ours(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        valid = mask.bool()[:, None, :, None]  # query rows that are tokens
        for g, e in zip(got, expected):
            torch.testing.assert_close(g * valid, e * valid)


def _layer_windows(name):
    """The window each attention layer of the model should receive (None: a full layer)."""
    config = getattr(transformers, MODELS[name][0])(**MODELS[name][2])
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [config.sliding_window if t == "sliding_attention" else None for t in types]


@pytest.mark.parametrize("name", list(SLIDING_MODELS))
def test_sliding_window_without_padding_runs_no_dense_mask(name, monkeypatch):
    """Unpadded, the sliding layers get no mask and ``window_size=(W - 1, W - 1)`` (W
    shorter than the sequence), the full layers neither; outputs and gradients (sinks
    included) match eager attention."""
    spy = AttentionSpy(monkeypatch)
    original = _build(name)
    ours = copy.deepcopy(original)
    ours.set_attn_implementation(hf.NAME)
    assert SLIDING_MODELS[name] < S

    def run(kind):
        model = {"ref64": copy.deepcopy(original).double(), "torch": original, "ours": ours}[kind]
        embeds = model.get_input_embeddings()(_ids(S, 0)).detach().requires_grad_()
        out = model(inputs_embeds=embeds, attention_mask=torch.ones(B, S, dtype=torch.long)).last_hidden_state
        return out, {"inputs_embeds": embeds, **dict(model.named_parameters())}

    check_runs(run, name)
    windows = _layer_windows(name)
    assert len(spy.calls) == len(windows)
    for call, w in zip(spy.calls, windows):
        assert call["mask"] is None and call["causal"]
        assert call["window_size"] == (None if w is None else (w - 1, w - 1))
    if name.startswith("gpt-oss"):
        assert all(call["sinks"] is not None and call["sinks"].requires_grad for call in spy.calls)
    if name.startswith("gemma2"):
        assert all(call["softcap"] == 5.0 for call in spy.calls)


def test_decode_past_the_window_matches_eager(monkeypatch):
    """A cache that keeps every key (``DynamicCache()``): each decoded token's query sees
    only the last W keys of a longer cache, through the window aligned bottom-right."""
    spy = AttentionSpy(monkeypatch)
    config = transformers.Gemma3TextConfig(**MODELS["gemma3-sliding"][2])
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM._from_config(config, attn_implementation="eager").eval()
    ours = copy.deepcopy(model)
    ours.set_attn_implementation(hf.NAME)
    ids, steps = _ids(S, 0), _ids(4, 1)
    caches = {"eager": transformers.DynamicCache(), "ours": transformers.DynamicCache()}
    for step in range(1 + steps.shape[1]):
        x = ids if step == 0 else steps[:, step - 1:step]
        with torch.no_grad():
            want = model(input_ids=x, cache=caches["eager"], use_cache=True).logits
            got = ours(input_ids=x, cache=caches["ours"], use_cache=True).logits
        torch.testing.assert_close(got, want)
    decode = [c for c in spy.calls if c["nq"] == 1 and c["window_size"] is not None]
    assert len(decode) == steps.shape[1] and all(c["mask"] is None for c in decode)
    assert all(c["causal_align"] == "bottom_right" and c["nk"] > c["window_size"][0] + 1 for c in decode)


@pytest.mark.parametrize("side", ["none", "left"])
def test_generate_sliding_window_with_cache_matches_eager(side, monkeypatch):
    """Greedy decoding on Gemma 2 (softcap, sliding and full layers, the default cache
    that keeps W - 1 keys on sliding layers), prompt plus new tokens longer than the
    window."""
    spy = AttentionSpy(monkeypatch)
    config = transformers.Gemma2Config(**MODELS["gemma2-softcap-sliding"][2])
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval()
    mask = torch.ones(B, S, dtype=torch.long) if side == "none" else _padding(S, "left")
    kwargs = dict(input_ids=_ids(S, 0), attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**kwargs)
    model.set_attn_implementation(hf.NAME)
    fusedlayers.swap(model)
    assert torch.equal(model.generate(**kwargs), expected)
    assert any(c["nq"] == 1 and c["window_size"] == (5, 5) and c["mask"] is None for c in spy.calls)
    if side == "none":
        assert all(c["mask"] is None for c in spy.calls)
    else:  # padded prefill: the mask (once the padding leaves a sliding layer's W keys, its decoding has none)
        assert all(c["mask"] is not None and c["window_size"] is None for c in spy.calls if c["nq"] > 1)


def test_sliding_window_mask_skips_only_the_causal_window():
    """The mask function returns None only for an aligned, unpadded causal window it has
    checked; every other call returns exactly what sdpa_mask returns."""
    from transformers import masking_utils as mu

    def both(**kw):
        return hf.sliding_window_mask(**kw), mu.sdpa_mask(**kw)

    window = mu.sliding_window_causal_mask_function(4)
    base = dict(batch_size=2, q_length=9, kv_length=9, mask_function=window, local_size=4)
    padded = torch.ones(2, 9, dtype=torch.bool)
    padded[1, :2] = False
    skipped = [base, dict(base, q_length=1, kv_length=12, q_offset=11),  # prefill; decoding past the window
               dict(base, q_length=1, kv_length=4, q_offset=11, kv_offset=8),  # a cache holding the last keys
               dict(base, attention_mask=torch.ones(2, 9, dtype=torch.bool))]
    for kw in skipped:
        assert hf.sliding_window_mask(**kw) is None, kw
    kept = [dict(base, attention_mask=padded),
            dict(base, q_length=1, kv_length=12, q_offset=5),  # the query is not the last key
            dict(base, q_length=3, kv_length=12, q_offset=9),  # neither one query nor Nq == Nk
            dict(base, allow_is_causal_skip=False),
            dict(base, mask_function=mu.sliding_window_causal_mask_function(5)),  # not local_size's window
            dict(base, mask_function=mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))),
            dict(base, mask_function=mu.sliding_window_bidirectional_mask_function(4)),
            dict(base, mask_function=mu.and_masks(window, lambda b, h, q, k: k != 6)),  # a hole only row 7+ sees
            dict(base, mask_function=mu.causal_mask_function)]
    for kw in kept:
        got, want = both(**kw)
        assert got is not None and torch.equal(got, want), kw
    for kw in (dict(base, local_size=None, mask_function=mu.causal_mask_function),
               dict(base, local_size=None, mask_function=mu.causal_mask_function, attention_mask=padded)):
        got, want = both(**kw)
        assert (got is None and want is None) or torch.equal(got, want), kw


def test_variant_arguments():
    """softcap (None = off), s_aux sinks (their gradient), sliding_window, on one call,
    against the reference; what fusedlayers does not have raises, naming the argument."""
    from fusedlayers import reference

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))  # float32 against the float64 reference
    sinks = torch.randn(4, requires_grad=True)
    out, _ = hf.attention_forward(torch.nn.Module(), q, k[:, :2], v[:, :2], None, softcap=5.0, s_aux=sinks,
                                  sliding_window=3)
    (dsinks,) = torch.autograd.grad(out.sum(), sinks)
    sinks_ref = sinks.detach().double().requires_grad_()
    want, _ = reference.attention(q.double(), k[:, :2].double(), v[:, :2].double(), causal=True,
                                  window_size=(2, None), softcap=5.0, sinks=sinks_ref)
    (dsinks_ref,) = torch.autograd.grad(want.sum(), sinks_ref)
    torch.testing.assert_close(out, want.transpose(1, 2).float())
    torch.testing.assert_close(dsinks, dsinks_ref.float())
    plain, _ = hf.attention_forward(torch.nn.Module(), q, k, v, None, softcap=None, sliding_window=None)
    want, _ = reference.attention(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(plain, want.transpose(1, 2).float())

    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="one sink logit per query head"):
        hf.attention_forward(module, q, k, v, None, sinks=torch.zeros(2, 4, 7, 1))  # per-token sinks
    with pytest.raises(ValueError, match="both s_aux= and sinks="):
        hf.attention_forward(module, q, k, v, None, sinks=torch.zeros(4), s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="indices="):
        hf.attention_forward(module, q, k, v, None, indices=torch.zeros(2, 7, 3, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="block_indices="):
        hf.attention_forward(module, q, k, v, None, block_indices=torch.zeros(2, 2, 7, 3, dtype=torch.long))


def test_hf_norm_dtype_rules_and_probe():
    """The swapped norm returns what the original returns (float32 weight under bfloat16
    input: float32, as LlamaRMSNorm and T5LayerNorm do); a class with a table name but
    other arithmetic is left, found by the check on a random input."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    x = torch.randn(2, 5, 32).bfloat16()
    for cls in (LlamaRMSNorm, T5LayerNorm):
        for weight_dtype in (torch.float32, torch.bfloat16):
            model = torch.nn.Sequential(cls(32, eps=1e-6)).to(weight_dtype)
            torch.nn.init.normal_(model[0].weight)
            want = model(x)
            report = fusedlayers.swap(model)
            assert type(model[0]) is HFRMSNorm, str(report)
            got = model(x)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)

    class LlamaRMSNorm(torch.nn.Module):  # a same-named class with Gemma's (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(32))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    LlamaRMSNorm.__module__ = "transformers.models.fake.modeling_fake"
    model = torch.nn.Sequential(LlamaRMSNorm())
    report = fusedlayers.swap(model)
    assert not report.swapped and "differs" in report.left[0].reason
