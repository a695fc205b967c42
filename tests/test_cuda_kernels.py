"""The hand-written CUDA kernels (backend "cuda", csrc/attention/*_cuda.cu, csrc/layer_norm/*_cuda.cu).

Without a GPU (CI): the backend's refusals and status, and the ptxas resource report that
CI fails on when a kernel spills. With a GPU (``pytest -m gpu``, benchmarks/gpu_session.sh):
the test method's grids (fusedlayers.testing) on the cuda backend, determinism, the
dropout stream shared with the cpu backend, and small cases that compute-sanitizer runs
(``python tests/test_cuda_kernels.py`` runs one small case of every kernel, for
``compute-sanitizer --tool memcheck|racecheck``).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fusedlayers import _ext, cuda_backend, dispatch, testing
from fusedlayers.testing import AttentionCase, NormCase

HAS_GPU = torch.cuda.is_available()
needs_cuda_ext = pytest.mark.skipif(not (_ext.available() and _ext.has_cuda()),
                                    reason=f"extension without CUDA: {_ext.INFO or _ext.ERROR}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ptxas_report  # noqa: E402


# ------------------------------------------------------------------ without a GPU


def _attention_call(**kw):
    base = dict(device=torch.device("cuda"), dtype=torch.float16, batch=2, heads_q=4, heads_kv=2, seqlen_q=128,
                seqlen_k=128, head_dim=64, head_dim_v=64, mask=None, mask_grad=False, causal=False, dropout_p=0.0,
                deterministic=False, varlen=False)
    base.update(kw)
    return dispatch.AttentionCall(**base)


def test_attention_refusals_name_the_reason():
    assert cuda_backend.attention.why_not(_attention_call(device=torch.device("cpu"))) == "not a CUDA tensor"
    if not (_ext.available() and _ext.has_cuda()):
        pytest.skip("the extension has no CUDA part: every CUDA call is refused for that reason")
    assert cuda_backend.attention.why_not(_attention_call()) is None
    assert "float32" in cuda_backend.attention.why_not(_attention_call(dtype=torch.float32))
    assert cuda_backend.attention.why_not(_attention_call(head_dim=300, head_dim_v=300)) == "head dim 300 > 256"
    assert cuda_backend.attention.why_not(_attention_call(head_dim=256, head_dim_v=256)) is None


@needs_cuda_ext
def test_shared_memory_need_is_the_extensions_own(monkeypatch):
    # Needs no GPU: the largest kSmem of the forward / dK dV / dQ tiles of the head dim's bucket.
    sizes = {d: cuda_backend.smem_bytes(d) for d in (1, 64, 65, 128, 129, 256)}
    assert sizes == {1: 55_296, 64: 55_296, 65: 104_448, 128: 104_448, 129: 135_168, 256: 135_168}
    with pytest.raises(RuntimeError, match=r"head_dim must be in 1\.\.256"):
        cuda_backend.smem_bytes(257)
    # a GPU with 100 KB per block (sm_86-like) takes bucket 64 only
    monkeypatch.setattr(cuda_backend, "_smem_limit", lambda device: 101_376)
    assert cuda_backend.attention.why_not(_attention_call(head_dim=64, head_dim_v=64)) is None
    assert cuda_backend.attention.why_not(_attention_call(head_dim=64, head_dim_v=80)) == (
        "head dim 80 needs 104448 bytes of shared memory per block, this GPU allows 101376")


def test_status_says_unverified_without_a_passing_record(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDLAYERS_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_backend, "_committed_records", lambda: [])
    status = cuda_backend.status()
    if _ext.available() and _ext.has_cuda():
        assert status.startswith("built, not verified on a GPU")
    assert not cuda_backend.verified()
    # a record whose cuda rows passed flips it; one with a failure does not
    row = {"op": "attention", "backend": "cuda", "dtype": "float16", "cases": 3, "worst_error": 0.1,
           "worst_bound": 1.0, "failures": []}
    rec = {"device": "NVIDIA H100 (sm_90)", "date": "2030-01-01T00:00:00", "rows": [row]}
    monkeypatch.setattr(cuda_backend, "_committed_records", lambda: [dict(rec, source="x")])
    assert cuda_backend.verified()
    monkeypatch.setattr(cuda_backend, "_committed_records",
                        lambda: [dict(rec, rows=[dict(row, failures=["case: out"])], source="x")])
    assert not cuda_backend.verified()


def test_auto_tries_cuda_first_only_on_a_verified_gpu_and_torch(tmp_path, monkeypatch):
    from fusedlayers import verify

    monkeypatch.setenv("FUSEDLAYERS_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_backend, "_committed_records", lambda: [])
    monkeypatch.setattr(dispatch, "_CUDA_ORDERS", {})
    gpu_name = "NVIDIA H200 (sm_90)"
    monkeypatch.setattr(verify, "device_name", lambda device: gpu_name)
    rows = [{"op": op, "backend": b, "dtype": "float16", "cases": 3, "worst_error": 0.1, "worst_bound": 1.0,
             "failures": []} for op in ("attention", "norm") for b in ("cuda", "triton")]
    good = {"device": gpu_name, "date": "2030-01-01T00:00:00", "level": "default", "passed": True,
            "versions": {"torch": torch.__version__}, "rows": rows}

    def order_with(record):
        verify.record_path().parent.mkdir(parents=True, exist_ok=True)
        verify.record_path().write_text(json.dumps({"cuda": record}))
        dispatch._CUDA_ORDERS.clear()
        return dispatch.auto_order(torch.device("cuda", 0))

    assert order_with(good) == dispatch.VERIFIED_CUDA_ORDER == ("cuda", "triton", "reference")
    assert order_with(dict(good, device="NVIDIA A100 (sm_80)")) == dispatch.AUTO_ORDER["cuda"]
    assert order_with(dict(good, versions={"torch": "0.0.1"})) == dispatch.AUTO_ORDER["cuda"]
    assert order_with(dict(good, level="quick")) == dispatch.AUTO_ORDER["cuda"]
    assert order_with(dict(good, rows=[r for r in rows if r["op"] != "norm"])) == dispatch.AUTO_ORDER["cuda"]
    failing = [dict(r, failures=["case: out"]) if r["backend"] == "cuda" and r["op"] == "norm" else r for r in rows]
    assert order_with(dict(good, rows=failing)) == dispatch.AUTO_ORDER["cuda"]
    # a failing triton row does not matter to the cuda backend's promotion
    failing_triton = [dict(r, failures=["x"]) if r["backend"] == "triton" else r for r in rows]
    assert order_with(dict(good, rows=failing_triton)) == dispatch.VERIFIED_CUDA_ORDER
    # decided once per GPU: a record written later changes nothing in this process
    verify.record_path().write_text(json.dumps({}))
    assert dispatch.auto_order(torch.device("cuda", 0)) == dispatch.VERIFIED_CUDA_ORDER
    assert dispatch.auto_order(torch.device("cpu")) == dispatch.AUTO_ORDER["cpu"]
    # select follows the decided order: cuda first where it can serve
    monkeypatch.setattr(dispatch, "why_not", lambda family, backend, call: None)
    assert dispatch.select("attention", _attention_call(device=torch.device("cuda", 0))) == "cuda"
    dispatch._CUDA_ORDERS.clear()
    dispatch._SELECTED.clear()  # select decides a call signature once
    assert dispatch.select("attention", _attention_call(device=torch.device("cuda", 0))) == "triton"


SAMPLE_LOG = """\
ptxas info    : Compiling entry function '_ZN11fusedlayers4cuda4attn20attention_fwd_kernelI6__halfLi64EEEvNS0_15AttentionParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN11fusedlayers4cuda4attn20attention_fwd_kernelI6__halfLi64EEEvNS0_15AttentionParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 159 registers, used 1 barriers, 832 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3bigv' for 'sm_90a'
ptxas info    : Function properties for _Z3bigv
    24 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 640 bytes smem, 380 bytes cmem[0]
"""


def test_ptxas_report_parses_and_fails_on_spills(tmp_path, capsys):
    kernels = ptxas_report.parse(SAMPLE_LOG.splitlines())
    assert [(k.arch, k.registers, k.spill_stores, k.spill_loads, k.smem) for k in kernels] == [
        ("sm_80", 159, 0, 0, 0), ("sm_90a", 255, 24, 20, 640)]
    log = tmp_path / "build.log"
    log.write_text(SAMPLE_LOG)
    assert ptxas_report.main([str(log)]) == 1
    out = capsys.readouterr().out
    assert "attn::attention_fwd_kernel<fp16, 64>" in out and "1 SPILL" in out
    log.write_text(SAMPLE_LOG.split("ptxas info    : Compiling entry function '_Z3bigv'")[0])
    assert ptxas_report.main([str(log)]) == 0
    log.write_text("no report here\n")
    assert ptxas_report.main([str(log)]) == 1


# --------------------------------------------------------------------- with a GPU

gpu = pytest.mark.gpu
HALF = (torch.float16, torch.bfloat16)


@gpu
@needs_cuda_ext
def test_cuda_backend_is_wired_and_serves_cuda_tensors():
    call = testing.attention_call_for(AttentionCase(), torch.float16, "cuda")
    assert dispatch.why_not("attention", "cuda", call) is None, "dispatch has no cuda attention: wire fusedlayers.cuda_backend"
    ncall = testing.norm_call_for(NormCase(), torch.float16, "cuda")
    assert dispatch.why_not("norm", "cuda", ncall) is None


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", testing.attention_grid("default") if HAS_GPU else [], ids=str)
def test_attention_grid(case, dtype):
    call = testing.attention_call_for(case, dtype, "cuda")
    reason = dispatch.why_not("attention", "cuda", call)
    if reason is not None:
        pytest.skip(reason)
    testing.assert_all_ok(testing.check_attention(case, dtype, "cuda", "cuda"), str(case))


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", (torch.float32,) + HALF, ids=str)
@pytest.mark.parametrize("case", testing.norm_grid("default") if HAS_GPU else [], ids=str)
def test_norm_grid(case, dtype):
    testing.assert_all_ok(testing.check_norm(case, dtype, "cuda", "cuda"), str(case))


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("case", [c for c in testing.attention_grid("full") if c.d in (64, 128, 256)][:40] if HAS_GPU
                         else [], ids=str)
def test_attention_full_grid_sample(case):
    testing.assert_all_ok(testing.check_attention(case, torch.bfloat16, "cuda", "cuda"), str(case))


@gpu
@needs_cuda_ext
def test_keep_mask_matches_the_cpu_stream():
    keep_gpu = torch.empty((3, 5, 37), dtype=torch.bool, device="cuda")
    keep_cpu = torch.empty((3, 5, 37), dtype=torch.bool)
    torch.ops.fusedlayers.dropout_keep_mask_kernel(keep_gpu, 1234, 0.3)
    torch.ops.fusedlayers.dropout_keep_mask_kernel(keep_cpu, 1234, 0.3)
    assert torch.equal(keep_gpu.cpu(), keep_cpu)


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("d", (64, 128, 256))
def test_attention_backward_is_bitwise_reproducible(d):
    from fusedlayers import ops

    case = AttentionCase(b=2, hq=4, hkv=2, nq=200, nk=300, d=d, mask="bias", causal="bottom_right", dropout_p=0.1)
    grads = []
    for _ in range(2):
        q, k, v, mask, dout, _ = testing.make_attention_inputs(case, torch.bfloat16, "cuda")
        torch.manual_seed(0)
        out = ops.attention(q, k, v, mask, causal=True, causal_align="bottom_right", dropout_p=0.1,
                            deterministic=True, backend="cuda")
        grads.append(torch.autograd.grad(out, (q, k, v, mask), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("causal", (False, True))
def test_varlen_equals_dense_per_sequence(causal):
    from fusedlayers import ops

    lens = [5, 130, 64, 1]
    h, d = 4, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens), h, d, generator=gen).to("cuda", torch.float16).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    out = ops.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal, backend="cuda")
    out.float().square().sum().backward()
    for i, n in enumerate(lens):
        s = slice(int(cu[i]), int(cu[i + 1]))
        qi, ki, vi = (t.detach()[s].transpose(0, 1)[None].clone().requires_grad_() for t in (q, k, v))
        oi = ops.attention(qi, ki, vi, causal=causal, backend="cuda")
        oi.float().square().sum().backward()
        torch.testing.assert_close(out[s], oi[0].transpose(0, 1), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(q.grad[s], qi.grad[0].transpose(0, 1), atol=5e-3, rtol=5e-3)


def check_extreme_bias(dtype, bias_dtype, d: int, device, backend: str) -> list:
    """Attention with a finite additive bias of ``finfo(bias_dtype).min`` (Hugging Face's padding value):
    left padding of 0, 5 and all but one key, and one fully masked query row (every score then is the
    finite finfo.min + s: the row attends uniformly, as the float64 reference says). Forward and backward
    (bias gradient included) against the float64 reference by the test method's rule."""
    from fusedlayers import ops, reference

    b, h, nq, nk = 3, 2, 40, 70
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype).requires_grad_() for n in (nq, nk, nk))
    low = torch.finfo(bias_dtype).min
    bias = torch.randn(b, 1, nq, nk, generator=gen, dtype=torch.float64) * 0.5
    for i, pad in enumerate((0, 5, nk - 1)):
        bias[i, :, :, :pad] = low
    bias[:, :, 3, :] = low
    bias = bias.to(device, bias_dtype).requires_grad_()
    dout = torch.randn(b, h, nq, d, generator=gen).to(device, dtype)
    dlse = torch.randn(b, h, nq, generator=gen).to(device)
    out, lse = ops.attention(q, k, v, bias, return_lse=True, backend=backend)
    grads = torch.autograd.grad((out, lse), (q, k, v, bias), (dout, dlse))
    results = []
    for cast in (testing._to64, lambda t: t.detach().requires_grad_()):
        args = [cast(t) for t in (q, k, v, bias)]
        o, l = reference.attention(*args)
        results.append((o, l, torch.autograd.grad((o, l), args, (dout.to(o), dlse.to(l)))))  # o's device too
    (o64, l64, g64), (ot, lt, gt) = results
    comps = [testing.compare("out", out, o64, ot, testing.OUT_FACTOR),
             testing.compare("lse", lse, l64, lt.float(), testing.OUT_FACTOR)]
    comps += [testing.compare(name, g, r, t, testing.GRAD_FACTOR)
              for name, g, r, t in zip(("dq", "dk", "dv", "dbias"), grads, g64, gt)]
    return comps


@gpu
@needs_cuda_ext
@pytest.mark.parametrize("d", (64, 128, 256))
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("bias_dtype", ("same", torch.float32), ids=str)
def test_attention_finite_extreme_bias(bias_dtype, dtype, d):
    # exp(S - m) as exp2(S * log2e - m * log2e) overflowed at m near -FLT_MAX: inf * 0 = NaN in out and grads
    comps = check_extreme_bias(dtype, dtype if bias_dtype == "same" else bias_dtype, d, "cuda", "cuda")
    testing.assert_all_ok(comps, f"{dtype} bias {bias_dtype} d{d}")


# ------------------------------------------------ small cases for compute-sanitizer

SMALL_ATTENTION = [
    AttentionCase(b=1, hq=2, hkv=1, nq=70, nk=90, d=64, mask="bias", causal="bottom_right", dropout_p=0.2),
    AttentionCase(b=1, hq=2, hkv=2, nq=33, nk=17, d=40, mask="bool", strided=True),  # element-wise copies
    AttentionCase(b=1, hq=1, hkv=1, nq=20, nk=40, d=128, causal="top_left"),
    AttentionCase(b=1, hq=1, hkv=1, nq=20, nk=40, d=256, mask="key_padding"),
]
SMALL_NORM = [
    NormCase(rows=5, hidden=768, residual=True, prenorm=True, dropout_p=0.1),  # one warp per row
    NormCase(rows=3, hidden=4100, rms=True, bias=False, strided=True),       # one block per row, scalar path
]


def run_small_cases() -> int:
    """One small case of every CUDA kernel (forward and backward); returns the number of failures."""
    failures = 0
    for case in SMALL_ATTENTION:
        comps = testing.check_attention(case, torch.float16, "cuda", "cuda")
        failures += sum(not c.ok for c in comps)
        print(f"attention {case}: {'ok' if all(c.ok for c in comps) else 'FAIL ' + str(comps)}")
    for case in SMALL_NORM:
        comps = testing.check_norm(case, torch.bfloat16, "cuda", "cuda")
        failures += sum(not c.ok for c in comps)
        print(f"norm {case}: {'ok' if all(c.ok for c in comps) else 'FAIL ' + str(comps)}")
    torch.cuda.synchronize()
    return failures


@gpu
@needs_cuda_ext
def test_small_cases():
    assert run_small_cases() == 0


if __name__ == "__main__":
    sys.exit(1 if run_small_cases() else 0)
