"""Host-side helpers of the Triton launchers (kernels/attention.py, kernels/layer_norm.py).

A launch's host time is what separates a 20 µs GPU kernel from a 20 µs call, so these replace the
calls that cost microseconds each on the launch path: ``triton.cdiv`` / ``triton.next_power_of_2``
(Python ints here), torch's device queries (read once per device) and the ``torch.cuda.device``
switch (entered only when the tensors are on another GPU than the current one).
"""

from __future__ import annotations

import contextlib
import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The power of two >= n (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def gpu_facts(device: torch.device) -> tuple[int, int]:
    """(compute capability major, SM count) of a CUDA device (a tensor's, so with its index)."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.multi_processor_count


_HERE = contextlib.nullcontext()


def on_device(device: torch.device):
    """The context to launch in: Triton launches on the current CUDA device, so tensors on another GPU make
    theirs current for the launch (cuda:1 tensors read by a kernel running on device 0 otherwise)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _HERE
    return torch.cuda.device(device)
