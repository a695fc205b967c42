"""The optional C++/CUDA extension: it loads when built and says why when not; its smoke op
is registered for CPU (and CUDA) tensors through torch.library."""

import pytest
import torch

from fusedlayers import _ext

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension unavailable: {_ext.ERROR}")


def test_import_never_fails_and_explains():
    assert _ext.available() or "not built" in _ext.ERROR or "failed to load" in _ext.ERROR


@needs_ext
def test_cpu_smoke_op():
    x = torch.randn(5, 3)
    torch.testing.assert_close(torch.ops.fusedlayers._ext_smoke(x), x * 2 + 1)
    assert _ext.INFO.startswith("cpu")


@needs_ext
def test_cuda_kernels_are_registered_when_built():
    # Needs no GPU: the dispatcher knows which device kernels the binary registered.
    if not _ext.has_cuda():
        pytest.skip(f"extension built without CUDA: {_ext.INFO}")
    for op in ("attention_fwd_kernel", "attention_bwd_kernel", "norm_fwd_kernel", "norm_bwd_kernel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedlayers::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedlayers::{op}", "CPU"), op
