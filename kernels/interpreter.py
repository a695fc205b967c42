"""What the Triton kernels do differently under the Triton interpreter, in one place.

``INTERPRET`` is True when this process runs Triton kernels through the interpreter
(``TRITON_INTERPRET=1``, CPU tensors: tests only). It is read once, at import, because
``@triton.jit`` decides interpretation when it decorates a kernel, that is when the kernel
module is imported. It is a ``tl.constexpr``, so a ``@triton.jit`` function may read it as
a global: the branch it guards is removed at compile time, and a kernel compiled for a GPU
(``INTERPRET`` False) contains none of it. Host code reads it as a bool (``if INTERPRET:``).

The interpreter holds bf16 values as raw uint16 arrays, and its own bf16 <-> fp32
conversions are wrong at the edges: fp32 -> bf16 truncates the mantissa (a GPU rounds to
nearest even) and bf16 -> fp32 misreads subnormals. ``to_f32`` and ``to_dtype`` are those two
conversions done right under the interpreter (by bit manipulation) and natively otherwise;
their two bf16 branches are the only code in this module that runs only under the interpreter. The interpreter's
bf16 arithmetic works on the raw integers (garbage), so kernels convert to fp32 with
``to_f32`` before any arithmetic and back with ``to_dtype`` only to store.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def to_f32(v):
    """v (any float dtype) as fp32, exactly."""
    if INTERPRET and v.dtype == tl.bfloat16:  # bf16 is the high half of an fp32
        out = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """fp32 v converted to ``dtype``, rounded to nearest (ties to even) as a GPU rounds."""
    if INTERPRET and dtype == tl.bfloat16:  # the interpreter's cast truncates
        bits = v.to(tl.uint32, bitcast=True)
        rounded = tl.add(bits, 0x7FFF + ((bits >> 16) & 1), sanitize_overflow=False)
        bits = tl.where(v == v, rounded, bits | 0x400000)  # NaN stays NaN (quiet)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out
