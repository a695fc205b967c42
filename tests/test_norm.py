"""layer_norm / rms_norm / add_layer_norm / add_rms_norm on every backend, against the
float64 reference with the test method's tolerance rule (fusedlayers.testing)."""

import pytest
import torch
import torch.nn.functional as F

import fusedlayers
from fusedlayers import dispatch, testing
from fusedlayers.testing import NormCase

from conftest import DEVICE, dtype_id, skip_unless_serves

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(case, dtype, backend):
    skip_unless_serves("norm", backend, testing.norm_call_for(case, dtype, DEVICE))
    testing.assert_all_ok(testing.check_norm(case, dtype, DEVICE, backend), f"{backend} {case} {dtype}")


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", testing.norm_grid("default"), ids=str)
def test_grid(case, dtype, backend):
    _run(case, dtype, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_full_grid(full_norm_case, dtype, backend):
    _run(full_norm_case, dtype, backend)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_matches_torch_functional(backend):
    # The drop-in claim: the same answers as torch's own layer_norm and rms_norm.
    skip_unless_serves("norm", backend, testing.norm_call_for(NormCase(), torch.float32, DEVICE))
    x = torch.randn(4, 7, 96, device=DEVICE)
    w, b = torch.randn(96, device=DEVICE), torch.randn(96, device=DEVICE)
    torch.testing.assert_close(fusedlayers.layer_norm(x, w, b, 1e-5, backend=backend),
                               F.layer_norm(x, (96,), w, b, 1e-5))
    torch.testing.assert_close(fusedlayers.layer_norm(x, backend=backend), F.layer_norm(x, (96,)))
    torch.testing.assert_close(fusedlayers.rms_norm(x, w, 1e-6, backend=backend), F.rms_norm(x, (96,), w, 1e-6))
    r = torch.randn_like(x)
    torch.testing.assert_close(fusedlayers.add_layer_norm(x, r, w, b, backend=backend),
                               F.layer_norm(x + r, (96,), w, b))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_dropout_is_reproducible_and_keeps_the_right_fraction(backend):
    skip_unless_serves("norm", backend, testing.norm_call_for(NormCase(dropout_p=0.3), torch.float32, DEVICE))
    x, r = torch.randn(2, 64, 512, device=DEVICE), torch.randn(2, 64, 512, device=DEVICE)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(fusedlayers.add_layer_norm(x, r, None, None, dropout_p=0.3, prenorm=True, backend=backend)[1])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    dropped = (outs[0] == r).float().mean().item()  # z == residual exactly where x was dropped
    n = x.numel()
    assert abs(dropped - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5, dropped


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_leading_dims_and_outputs(backend):
    skip_unless_serves("norm", backend, testing.norm_call_for(NormCase(), torch.float16, DEVICE))
    x = torch.randn(2, 3, 5, 40, device=DEVICE, dtype=torch.float16)
    y, z = fusedlayers.add_layer_norm(x, None, None, None, prenorm=True, residual_in_fp32=True, backend=backend)
    assert y.shape == x.shape and y.dtype == torch.float16 and z.dtype == torch.float32
    torch.testing.assert_close(z, x.float())
