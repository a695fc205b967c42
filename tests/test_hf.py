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
    "t5": ("T5Config", "T5Model", dict(SEQ2SEQ_SIZES, num_layers=2, num_heads=4, d_kv=8, d_ff=64), "right", True),
    "bart": ("BartConfig", "BartModel", dict(SEQ2SEQ_SIZES, encoder_layers=2, decoder_layers=2,
                                             encoder_attention_heads=4, decoder_attention_heads=4,
                                             encoder_ffn_dim=64, decoder_ffn_dim=64), "right", True),
}


def _build(name):
    config_cls, model_cls, kwargs, _, _ = MODELS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    # from_config mutates the config it is given: a copy per model
    return getattr(transformers, model_cls)._from_config(copy.deepcopy(config), attn_implementation="eager").eval()


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
    from transformers.masking_utils import sdpa_mask

    assert transformers.AttentionMaskInterface._global_mapping[hf.NAME] is sdpa_mask
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


def test_output_attentions():
    model = _build("llama-gqa")
    ids, mask = _ids(S, 0), _padding(S, "left")
    expected = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model.set_attn_implementation(hf.NAME)
    got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()[:, None, :, None]  # query rows that are tokens
    for g, e in zip(got, expected):
        torch.testing.assert_close(g * valid, e * valid)


def test_unsupported_arguments_raise():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        hf.attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)
    with pytest.raises(NotImplementedError, match="sinks"):
        hf.attention_forward(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2))


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
