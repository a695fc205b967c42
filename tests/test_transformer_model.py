"""The reference Transformer's model: the same numbers on every backend (the test method's
bound), a KV-cache decode equal to full recomputation, a few training steps with the same losses
on every backend, and clear errors."""

import pytest
import torch

import fusedlayers
from fusedlayers import dispatch, testing
from fusedlayers.transformer import generate
from fusedlayers.transformer.model import ModelConfig, make_bert, make_encoder_decoder

TINY = dict(vocab_size=23, tgt_vocab_size=19, d_model=32, n_heads=2, d_ff=48, n_layers=1, max_len=16)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(gen, vocab, b, n, pad_tail=True):
    ids = torch.randint(7, vocab, (b, n), generator=gen)
    if pad_tail:
        ids[1, n - 3:] = 0  # a padded sentence
    return ids


def _fused_backends():
    """Every backend but the reference that serves the model's calls on CPU float32."""
    call_a = dispatch.AttentionCall(device=torch.device("cpu"), dtype=torch.float32, batch=2, heads_q=2, heads_kv=2,
                                    seqlen_q=9, seqlen_k=11, head_dim=16, head_dim_v=16, mask="bool",
                                    mask_grad=False, causal=True, dropout_p=0.0, deterministic=False, varlen=False)
    call_n = dispatch.NormCall(device=torch.device("cpu"), dtype=torch.float32, weight_dtype=torch.float32,
                               residual_dtype=torch.float32, rows=22, hidden=32, rms=False, dropout_p=0.0)
    out = []
    for name in dispatch.BACKENDS:
        if name == "reference":
            continue
        reason = dispatch.why_not("attention", name, call_a) or dispatch.why_not("norm", name, call_n)
        out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reason}")) if reason else name)
    return out


def _run(model_fn, backend, dtype, inputs):
    """Forward + backward of the model on ``backend`` in ``dtype`` from the seed-0 weights:
    (output, gradients by parameter name)."""
    torch.manual_seed(0)
    model = model_fn(backend).to(dtype)
    out = model(*inputs)
    out.float().pow(2).mean().backward() if dtype != torch.float64 else out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


MODELS = {
    "encoder_decoder": (lambda b: make_encoder_decoder(backend=b, **TINY),
                        lambda g: (_ids(g, 23, 2, 11), _ids(g, 19, 2, 9, pad_tail=False))),
    "encoder_decoder_prenorm": (lambda b: make_encoder_decoder(backend=b, prenorm=True, positions="learned", **TINY),
                                lambda g: (_ids(g, 23, 2, 11), _ids(g, 19, 2, 9, pad_tail=False))),
    "bert_mlm": (lambda b: _MLM(make_bert(backend=b, **TINY)), lambda g: (_ids(g, 23, 2, 11),)),
}


class _MLM(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids):
        return self.bert.mlm_logits(ids)


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("which", list(MODELS))
def test_model_matches_reference_on_every_backend(which, backend):
    """Output and every weight gradient of a fused backend in float32 are within the test
    method's bound: at most 2x (outputs) / 3x (gradients) the error of the reference backend's
    own float32 run, both against the float64 run."""
    model_fn, inputs_fn = MODELS[which]
    inputs = inputs_fn(torch.Generator().manual_seed(1))
    out64, grads64 = _run(model_fn, "reference", torch.float64, inputs)
    out32, grads32 = _run(model_fn, "reference", torch.float32, inputs)
    try:
        out, grads = _run(model_fn, backend, torch.float32, inputs)
    except fusedlayers.BackendError as e:
        pytest.skip(f"{backend} cannot serve the whole model: {e}")
    comps = [testing.compare("output", out, out64, out32, testing.OUT_FACTOR)]
    comps += [testing.compare(f"grad {n}", grads[n], grads64[n], grads32[n], testing.GRAD_FACTOR) for n in grads64]
    testing.assert_all_ok(comps, f"{which} on {backend}")


@pytest.mark.parametrize("backend", _fused_backends())
def test_training_steps_give_the_same_losses_on_every_backend(backend):
    from fusedlayers.transformer.train import TrainConfig, TranslateTask, train

    task = TranslateTask(n_train=300, n_test=10)
    cfg = TrainConfig(steps=4, batch_size=8, warmup=2, quiet=True, eval=False)
    ref = train(task, ModelConfig(backend="reference", d_model=32, n_heads=2, d_ff=48, n_layers=1), cfg)["history"]
    try:
        got = train(task, ModelConfig(backend=backend, d_model=32, n_heads=2, d_ff=48, n_layers=1), cfg)["history"]
    except fusedlayers.BackendError as e:
        pytest.skip(f"{backend} cannot serve the whole model: {e}")
    assert got == pytest.approx(ref, rel=1e-3, abs=1e-4)


def test_kv_cache_decoding_equals_full_recomputation():
    """Greedy decoding with the cache (Nq = 1 per step, bottom-right causal) gives the same
    tokens and logits as recomputing the whole prefix at every step."""
    torch.manual_seed(0)
    model = make_encoder_decoder(**TINY).eval()
    src = _ids(torch.Generator().manual_seed(2), 23, 2, 11)
    memory, mask = model.encode(src)
    tgt = _ids(torch.Generator().manual_seed(3), 19, 2, 6, pad_tail=False)
    full = model.decode(tgt, memory, mask)  # (B, 6, V)
    cache = model.new_cache()
    steps = torch.cat([model.decode(tgt[:, t:t + 1], memory, mask, cache, offset=t) for t in range(6)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    with_cache, _ = generate.greedy(model, src, max_len=8)
    without, _ = generate.greedy(model, src, max_len=8, use_cache=False)
    assert torch.equal(with_cache, without)


def test_beam_search_with_beam_one_is_greedy():
    torch.manual_seed(0)
    model = make_encoder_decoder(**TINY).eval()
    src = _ids(torch.Generator().manual_seed(2), 23, 1, 9, pad_tail=False)
    ids, _ = generate.greedy(model, src, max_len=6)
    beams = generate.beam_search(model, src, beam=1, max_len=6)
    g = ids[0].tolist()
    assert beams[0].ids == (g[:g.index(6)] if 6 in g else g)  # up to EOS


def test_attention_weights_are_probabilities():
    torch.manual_seed(0)
    model = make_encoder_decoder(**TINY).eval()
    src = _ids(torch.Generator().manual_seed(2), 23, 2, 11)
    attn, self_attn = model.decoder.layers[0].cross_attn, model.decoder.layers[0].self_attn
    attn.record = self_attn.record = True
    model(src, _ids(torch.Generator().manual_seed(3), 19, 2, 5, pad_tail=False))
    w = attn.weights  # (B, H, Nt, Ns)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert float(w[1, :, :, -3:].abs().max()) == 0.0  # padded source words get no attention
    ws = self_attn.weights  # (B, H, Nt, Nt), causal: no weight on a later word
    torch.testing.assert_close(ws.sum(-1), torch.ones(ws.shape[:-1]))
    assert torch.equal(ws, ws.tril()) and bool((ws.diagonal(dim1=-2, dim2=-1) > 0).all())


def test_norms_are_the_library_modules_under_the_checkpoint_keys():
    from fusedlayers import nn as fl_nn

    bert = make_bert(**TINY, prenorm=True)
    norms = {name for name, m in bert.named_modules() if isinstance(m, (fl_nn.LayerNorm, fl_nn.AddLayerNorm))}
    assert norms == {"embeddings.norm", "encoder.input_norm", "encoder.layers.0.norm_1", "encoder.layers.0.norm_2",
                     "mlm_head.norm"}
    keys = set(bert.state_dict())
    assert all({f"{n}.weight", f"{n}.bias"} <= keys for n in norms)  # the keys saved checkpoints hold


def test_model_has_one_class_per_box_and_ties_embeddings():
    model = make_encoder_decoder(**TINY)
    assert model.generator.weight is model.tgt_embed.tokens.weight
    bert = make_bert(**TINY)
    assert bert.mlm_head.decoder.weight is bert.embeddings.tokens.weight
    assert bert.cfg.activation == "gelu"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'.*reference"):
        ModelConfig(backend="nope")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig(d_model=30, n_heads=4)
