"""The optional C++/CUDA extension: the device kernels it registers through torch.library."""

import pytest
import torch

from fusedlayers import _ext

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension unavailable: {_ext.ERROR}")


@needs_ext
def test_cuda_kernels_are_registered_when_built():
    # Needs no GPU: the dispatcher knows which device kernels the binary registered.
    if not _ext.has_cuda():
        pytest.skip(f"extension built without CUDA: {_ext.INFO}")
    for op in ("attention_fwd_kernel", "attention_bwd_kernel", "norm_fwd_kernel", "norm_bwd_kernel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedlayers::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedlayers::{op}", "CPU"), op
