"""Tests specific to the Triton norm kernels (kernels/layer_norm.py): the paths the shared
grid may not reach (rows wider than a column block, many backward row groups), the dropout
keep-mask, determinism, bf16 rounding, the launch configurations CI compiles, and the
backend's refusals. The shared grid (tests/test_norm.py) runs the kernels too."""

import os
import subprocess
import sys

import pytest
import torch

import fusedlayers
from fusedlayers import dispatch, testing
from fusedlayers.testing import NormCase

from conftest import DEVICE, skip_unless_serves

K = dispatch.implementation("norm", "triton") if dispatch.why_not(
    "norm", "triton", testing.norm_call_for(NormCase(), torch.float32, DEVICE)) is None else None
pytestmark = pytest.mark.skipif(K is None, reason="the triton norm backend cannot run here")


def _check(case, dtype):
    skip_unless_serves("norm", "triton", testing.norm_call_for(case, dtype, DEVICE))
    testing.assert_all_ok(testing.check_norm(case, dtype, DEVICE, "triton"), f"triton {case} {dtype}")


WIDE = [
    # wider than the forward's column block: both kernels loop over column blocks
    NormCase(rows=2, hidden=2 * 8192 + 5, residual=True, prenorm=True, dropout_p=0.1),
    NormCase(rows=2, hidden=2 * 8192 + 5, rms=True, bias=False, residual=True, weight_fp32=True),
    # between the backward's and the forward's block: forward in one block, backward loops
    NormCase(rows=3, hidden=5000, residual=True, residual_in_fp32=True, prenorm=True),
    NormCase(rows=3, hidden=5000, rms=True, bias=False, dropout_p=0.2, strided=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WIDE, ids=str)
def test_rows_wider_than_a_block(case, dtype):
    assert K._config(case.rows, case.hidden, backward=True)[1] < case.hidden  # the backward loops
    _check(case, dtype)


@pytest.mark.parametrize("case", [NormCase(rows=2000, hidden=48, residual=True),
                                  NormCase(rows=300, hidden=5000, weight_fp32=True)], ids=str)
def test_many_backward_row_groups(case):
    m, n = case.rows, case.hidden
    block_m, block_n, warps = K._config(m, n, backward=True)
    n_tiles = -(-m // block_m)
    assert -(-n_tiles // K._tiles_per_group(n_tiles, -(-n // block_n), block_m, warps, torch.device(DEVICE))) > 3
    _check(case, torch.float32)


def _drop_inputs(shape, dtype=torch.float32):
    x = torch.ones(shape, device=DEVICE, dtype=dtype)
    return x, torch.zeros_like(x)


@pytest.mark.parametrize("shape", [(5, 24), (70, 33), (3, 2 * 8192 + 5)], ids=str)
def test_dropout_mask_is_the_kernels_own(shape):
    p, seed = 0.25, 1234567890123
    keep = K.dropout_keep_mask(seed, shape, p, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == shape
    x, r = _drop_inputs(shape)
    # forward: z = dropout(1) + 0 is 1/(1-p) where kept, 0 where dropped
    _, z, mean, rstd = K.forward(x, r, None, None, seed, 1e-5, p, False, True, False)
    assert torch.equal(z != 0, keep)
    torch.testing.assert_close(z[keep], torch.full_like(z[keep], 1 / (1 - p)))
    # backward regenerates it: with dy = 0 and the stream's own gradient dz = 1, dx = keep / (1-p)
    dx, dres, _, _ = K.backward(torch.zeros_like(z), torch.ones_like(z), z, None, None, mean, rstd, seed, 1e-5, p,
                                False, x.dtype, r.dtype)
    assert torch.equal(dx != 0, keep)
    assert torch.equal(dres, torch.ones_like(dres))
    # a new seed, a new mask; the keep rate is 1 - p
    assert not torch.equal(keep, K.dropout_keep_mask(seed + 1, shape, p, DEVICE))
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5


def test_dropout_mask_does_not_depend_on_the_block():
    # offsets are row * N + col: a (M, N) mask is the first M rows of the (2M, N) one, and
    # the mask of N columns equals the mask computed with a narrower block in a loop
    seed, p = 77, 0.5
    full = K.dropout_keep_mask(seed, (40, 300), p, DEVICE)
    assert torch.equal(K.dropout_keep_mask(seed, (7, 300), p, DEVICE), full[:7])
    x, r = _drop_inputs((3, 2 * 8192 + 5))
    z_loop = K.forward(x, r, None, None, seed, 1e-5, p, False, True, False)[1]  # loop path
    assert torch.equal(z_loop != 0, K.dropout_keep_mask(seed, x.shape, p, DEVICE))


def test_backward_is_deterministic():
    case = NormCase(rows=300, hidden=200, residual=True, prenorm=True, dropout_p=0.1)
    x, residual, weight, bias, dy, dz = testing.make_norm_inputs(case, torch.float32, DEVICE)
    y, z, mean, rstd = K.forward(x.detach(), residual.detach(), weight.detach(), bias.detach(), 5, 1e-5, 0.1, False,
                                 True, False)
    runs = [K.backward(dy, dz, z, weight.detach(), bias.detach(), mean, rstd, 5, 1e-5, 0.1, False, x.dtype,
                       residual.dtype) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hidden", [300, 2 * 8192 + 5], ids=str)
def test_bf16_stores_round_to_nearest_even(hidden):
    # all arithmetic is fp32, so the bf16 result is exactly the fp32 result rounded (torch
    # rounds to nearest even); the interpreter's own cast would truncate
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(4, hidden, generator=gen).to(device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    w, b = (torch.randn(hidden, generator=gen).to(device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    y16, z16, _, _ = K.forward(x, r, w, b, 0, 1e-5, 0.0, False, True, False)
    z32 = x.float() + r.float()
    assert torch.equal(z16, z32.to(torch.bfloat16))
    # y is LN of the stream as returned (z rounded to bf16), computed in fp32
    y32 = K.forward(z16.float(), None, w.float(), b.float(), 0, 1e-5, 0.0, False, False, False)[0]
    assert torch.equal(y16, y32.to(torch.bfloat16))


def test_bf16_subnormals_load_and_round_exactly():
    # bf16 subnormals in, the stream z = dropout(x) + residual out: z must be the fp32 result
    # of the exact inputs, rounded to nearest even (interpreted, bf16 -> fp32 and fp32 -> bf16
    # go through kernels/interpreter.py: the interpreter's own casts misread subnormals and
    # truncate)
    tiny, p, seed = torch.finfo(torch.bfloat16).tiny, 0.3, 3
    gen = torch.Generator().manual_seed(1)
    x, r = ((torch.rand(3, 200, generator=gen) * 2 - 1) * (0.99 * tiny) for _ in range(2))
    x, r = (t.to(device=DEVICE, dtype=torch.bfloat16) for t in (x, r))
    assert (x.abs() < tiny).all() and (x != 0).float().mean() > 0.9
    _, z, _, _ = K.forward(x, r, None, None, seed, 1e-5, p, False, True, False)
    keep = K.dropout_keep_mask(seed, x.shape, p, DEVICE)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    z32 = torch.where(keep, x.float() * scale, 0.0) + r.float()
    assert (z32 != z32.to(torch.bfloat16).float()).any()  # rounding is exercised
    assert torch.equal(z, z32.to(torch.bfloat16))


def test_expanded_and_strided_gradients():
    # y.sum().backward() hands the op an expanded dy (stride 0); any stride must work
    x = torch.randn(6, 2, 40, device=DEVICE)[:, 0].requires_grad_()  # rows with stride 80
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    grads = []
    for backend in ("triton", "reference"):
        fusedlayers.layer_norm(x, w, None, backend=backend).sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    torch.testing.assert_close(grads[0], grads[1])


def test_every_gpu_launch_configuration_is_a_compile_target():
    targets = K.compile_targets()
    names = {t[0] for t in targets}
    assert len(names) == len(targets)
    for name, fn, signature, constexprs, options, attrs in targets:  # what triton.compile will be given
        assert list(signature) == list(fn.arg_names), name
        assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs), name
        assert set(attrs) <= set(signature) and options["num_warps"] in (4, 8, 16), name
    for backward, kernel in ((False, "norm_fwd"), (True, "norm_bwd")):
        for m in (1, 3, 1000, 100000):
            for n in (1, 7, 16, 100, 768, 1000, 2048, 4096, 5000, 8192, 8193, 20000, 70000, 1 << 20):
                block_m, block_n, warps = K._config(m, n, backward, interpret=False)
                shape = f"BM{block_m}_BN{block_n}_w{warps}_{'single' if n <= block_n else 'loop'}"
                assert f"{kernel}_{shape}_all" in names and f"{kernel}_{shape}_none" in names, (m, n, shape)
                # and the build of a hidden size / row stride that is not a multiple of 16
                assert f"{kernel}_{shape}_all_unaligned" in names, (m, n, shape)
    for name, fn, signature, constexprs, options, attrs in targets:
        if name.endswith("_unaligned"):
            assert not {"N", "stride_x", "stride_dy"} & set(attrs) and any(a in attrs for a in ("X", "DY")), name


def test_refusals():
    call = testing.norm_call_for(NormCase(), torch.float32, DEVICE)
    assert "float64" in K.why_not(call._replace(dtype=torch.float64))
    assert "weight dtype" in K.why_not(call._replace(weight_dtype=torch.float64))
    assert K.why_not(call._replace(device=torch.device("meta"))) is not None


def test_cpu_refused_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch; from fusedlayers import dispatch; "
            "c = dispatch.NormCall(torch.device('cpu'), torch.float32, None, None, 4, 8, False, 0.0); "
            "print(dispatch.why_not('norm', 'triton', c))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "not a CUDA tensor" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout
