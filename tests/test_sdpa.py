"""fusedlayers.sdpa: activate_flash_attention_impl("fusedlayers") routes SDPA's flash path to
fusedlayers, forward and backward, for models that call SDPA themselves; restored on
deactivation; never active on import."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedlayers
from fusedlayers import _ext, registration, sdpa

attention_registry = pytest.importorskip("torch.nn.attention")
if not hasattr(attention_registry, "activate_flash_attention_impl"):
    pytest.skip(f"torch {torch.__version__} has no flash attention registry", allow_module_level=True)

CPU_BACKEND = "cpu" if _ext.available() else "reference"


@pytest.fixture
def active():
    """fusedlayers activated for the test, restored after it; the call counter reset."""
    sdpa.calls.clear()
    attention_registry.activate_flash_attention_impl("fusedlayers")
    yield sdpa.calls
    sdpa.deactivate()


def _leaves(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _grads(fn, inputs):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
    return out.detach(), [t.grad.clone() for t in inputs]


def test_not_active_on_import():
    code = ("import fusedlayers, torch.nn.attention as a; "
            "print(a.current_flash_attention_impl(), 'fusedlayers' in a.list_flash_attention_impls())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.split() == ["None", "True"], run.stdout + run.stderr


@pytest.mark.parametrize("case", ["causal", "float_mask_2d", "bool_mask_4d", "cross_gqa"])
def test_plain_sdpa_forward_backward(case):
    b, h, n, d = 2, 4, 12, 16
    nk, hkv = (n, h) if case != "cross_gqa" else (7, h)
    q, k, v = _leaves((b, h, n, d), (b, hkv, nk, d), (b, hkv, nk, d))
    kwargs = {"causal": dict(is_causal=True),
              "float_mask_2d": dict(attn_mask=torch.randn(n, nk)),
              "bool_mask_4d": dict(attn_mask=torch.rand(b, 1, n, nk) > 0.3),
              "cross_gqa": dict(scale=0.3)}[case]
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs)  # noqa: E731
    expected, expected_grads = _grads(fn, (q, k, v))
    sdpa.calls.clear()
    sdpa.activate()
    try:
        out, grads = _grads(fn, (q, k, v))
    finally:
        sdpa.deactivate()
    assert sdpa.calls == {("forward", CPU_BACKEND): 1, ("backward", CPU_BACKEND): 1}
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    # restored: aten's kernel again, fusedlayers no longer called
    assert attention_registry.current_flash_attention_impl() is None
    _grads(fn, (q, k, v))
    assert sum(sdpa.calls.values()) == 2


def test_bfloat16(active):
    q, k, v = _leaves((1, 2, 9, 32), (1, 2, 9, 32), (1, 2, 9, 32), dtype=torch.bfloat16)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.float().sum().backward()
    assert active[("forward", CPU_BACKEND)] == 1 and active[("backward", CPU_BACKEND)] == 1
    ref = fusedlayers.reference.attention(q.double(), k.double(), v.double(), causal=True)[0]
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_dropout_stays_on_sdpa_math_path(active):
    """SDPA sends CPU dropout to its math path (aten's CPU flash kernel has none): untouched."""
    q, k, v = _leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).sum().backward()
    assert sum(active.values()) == 0


def test_multihead_attention(active):
    """nn.MultiheadAttention in training (F.multi_head_attention_forward -> SDPA) runs
    fusedlayers; its inference fast path stays correct."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 10, 32, requires_grad=True)
    sdpa.deactivate()
    expected = mha(x, x, x, need_weights=False)[0]
    expected.sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    sdpa.activate()
    out = mha(x, x, x, need_weights=False)[0]
    out.sum().backward()
    assert active[("forward", CPU_BACKEND)] == 1 and active[("backward", CPU_BACKEND)] == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-4, atol=1e-5)
    mha.eval()
    with torch.inference_mode():
        y = x.detach()
        fast = mha(y, y, y, need_weights=False)[0]
    torch.testing.assert_close(fast, expected.detach(), rtol=1e-5, atol=1e-5)
    # The inference path does not reach SDPA's CPU flash op (torch 2.14.1): aten serves it.
    assert active[("forward", CPU_BACKEND)] == 1


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_under_torch_compile(active, compiler):
    """Compiled code calls the overridden aten ops, whose outputs must have the strides of
    aten's meta kernels (inductor checks them)."""
    q, k, v = _leaves((2, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16), seed=3)
    fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), backend=compiler,
                       fullgraph=True)
    out, grads = _grads(fn, (q, k, v))
    assert active[("forward", CPU_BACKEND)] >= 1 and active[("backward", CPU_BACKEND)] >= 1
    sdpa.deactivate()
    expected, expected_grads = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                      (q, k, v))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_hugging_face_llama_sdpa(active):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding: SDPA gets an explicit mask

    def run():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = run()
    assert active[("forward", CPU_BACKEND)] == 2 and active[("backward", CPU_BACKEND)] == 2  # one per layer
    sdpa.deactivate()
    expected, expected_grads = run()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_cuda_override_carries_the_dropout_seed():
    """The CUDA override's logic, run on CPU tensors: the dropout seed goes out in rng_state
    and comes back as philox_seed, so the backward regenerates the forward's keep-mask."""
    q, k, v = (t.detach() for t in _leaves((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)))
    torch.manual_seed(7)
    out, lse, _, _, max_q, max_k, rng_state, unused, _ = sdpa._cuda_forward(q, k, v, 0.3, True, scale=0.25)
    assert (max_q, max_k) == (8, 8) and rng_state.dtype == torch.uint64
    torch.manual_seed(7)
    seed = fusedlayers.ops._draw_seed(0.3)
    assert int(rng_state[0]) == int(seed) and int(seed) % 2 == 1
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = registration.attention_fwd(qq, kk, vv, None, seed, 0.25, True, False, 0.3, False, CPU_BACKEND)
    torch.testing.assert_close(out, ref_out)
    dout = torch.randn_like(out)
    ref_out.backward(dout)
    dq, dk, dv = sdpa._cuda_backward(dout, q, k, v, out, lse, None, None, 8, 8, 0.3, True, rng_state, unused,
                                     scale=0.25)
    for g, e in zip((dq, dk, dv), (qq.grad, kk.grad, vv.grad)):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
def test_cuda_sdpa_routes_to_fusedlayers(active):
    # The override replaces SDPA's flash path; on Hopper SDPA tries cuDNN first (torch 2.11 on an H200),
    # so the flash path is chosen here as a user would.
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    with attention_registry.sdpa_kernel(attention_registry.SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.float().sum().backward()
    assert sum(n for (p, _), n in active.items() if p == "forward") == 1
    assert sum(n for (p, _), n in active.items() if p == "backward") == 1
    ref = fusedlayers.reference.attention(q.double(), k.double(), v.double(), causal=True)[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
