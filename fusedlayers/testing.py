"""The test method of fusedlayers: tolerance rule, case grids, input makers, checks.

Shared by ``tests/`` and by anything that verifies a backend on a user's machine.

The rule (FlashAttention's): a kernel's output passes when its max error against a
float64 reference is at most ``2x`` (outputs) or ``3x`` (gradients) the max error of
PyTorch's own computation of the same formula in the kernel's dtype, plus a floor: twice
the error of merely rounding the float64 answer to that dtype (no kernel that stores its
result in the dtype can do better), plus one ulp at 1.0. Both errors are measured against
the same float64 reference on CPU. Where PyTorch's own run is not finite (it overflowed),
the bound is the floor alone.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, ops, reference

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


# ---------------------------------------------------------------------------- tolerance


def max_error(actual: Tensor, expected: Tensor) -> float:
    """Max |actual - expected| in float64; inf when NaN appears or the shapes differ.
    Matching infinities (lse = -inf on fully masked rows) count as 0 error."""
    if actual.shape != expected.shape:
        return float("inf")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    return float(torch.nan_to_num(diff, nan=float("inf"), posinf=float("inf")).max())


@dataclass
class Comparison:
    """One checked tensor: the kernel's error, PyTorch's error and the allowed bound."""

    name: str
    error: float
    torch_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.bound) and self.error <= self.bound

    def __str__(self) -> str:
        return (f"{self.name}: error {self.error:.3g} vs bound {self.bound:.3g} "
                f"(torch same-dtype error {self.torch_error:.3g}){'' if self.ok else '  FAIL'}")


def compare(name: str, actual: Tensor, ref64: Tensor, torch_same: Tensor, factor: float) -> Comparison:
    """Applies the rule to one tensor: ``actual`` (kernel, its dtype), ``ref64`` (float64
    reference), ``torch_same`` (the reference formula run by PyTorch in the kernel's dtype)."""
    dtype = actual.dtype
    torch_error = max_error(torch_same, ref64)
    floor = 2 * max_error(ref64.to(dtype), ref64) + torch.finfo(dtype).eps
    # When PyTorch's own run overflows (NaN / inf), it sets no scale: the kernel must then
    # be as good as rounding the exact answer.
    bound = factor * torch_error + floor if math.isfinite(torch_error) else floor
    return Comparison(name, max_error(actual, ref64), torch_error, bound)


def assert_all_ok(comparisons: list[Comparison], context: str = "") -> None:
    if not all(c.ok for c in comparisons):
        raise AssertionError(f"{context}\n" + "\n".join(f"  {c}" for c in comparisons))


# ---------------------------------------------------------------------------- inputs


def _generator(*key) -> torch.Generator:
    """A CPU generator seeded from a case: every run draws the same inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, gen, dtype, device) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class AttentionCase:
    """One point of the attention grid.

    mask: "none"; "key_padding" (bool (B,1,1,Nk), a padded batch); "bool" (bool
    (B,Hq,Nq,Nk) with query row 0 of every head fully masked); "bias" (float (1,Hq,Nq,Nk)
    that requires grad); "bias_inf" (float (B,1,Nq,Nk) with -inf entries and a fully
    masked row 0, requires grad).
    causal: None, "top_left" or "bottom_right".
    strided: q, k, v are (B, N, H, D) tensors transposed to (B, H, N, D): not contiguous.
    dv: v's head dim when it differs from q's and k's (None: d). Left out of repr, so the
    inputs drawn for the other fields do not change with it; so are the score variants
    (window, softcap, alibi, sinks: ``fusedlayers.attention``'s arguments), whose own inputs
    come from :func:`make_variants`.
    """

    b: int = 2
    hq: int = 4
    hkv: int = 4
    nq: int = 128
    nk: int = 128
    d: int = 64
    mask: str = "none"
    causal: Optional[str] = None
    dropout_p: float = 0.0
    strided: bool = False
    dv: Optional[int] = field(default=None, repr=False)
    window: Optional[tuple[int, int]] = field(default=None, repr=False)  # window_size
    softcap: float = field(default=0.0, repr=False)
    alibi: bool = field(default=False, repr=False)  # alibi_slopes (B, Hq)
    sinks: bool = field(default=False, repr=False)  # sinks (Hq,), requiring grad

    def __str__(self) -> str:
        defaults = AttentionCase()
        return "-".join(f"{f.name}{getattr(self, f.name)}" for f in fields(self)
                        if getattr(self, f.name) != getattr(defaults, f.name) or f.name in ("nq", "nk", "d")) or "base"


MASKS = ("none", "key_padding", "bool", "bias", "bias_inf")


def make_attention_mask(case: AttentionCase, dtype, device, gen) -> Optional[Tensor]:
    b, hq, nq, nk = case.b, case.hq, case.nq, case.nk
    if case.mask == "none":
        return None
    if case.mask == "key_padding":
        lengths = torch.randint(1, nk + 1, (b,), generator=gen)
        lengths[0] = nk
        return (torch.arange(nk)[None, :] < lengths[:, None]).view(b, 1, 1, nk).to(device)
    if case.mask == "bool":
        m = torch.rand((b, hq, nq, nk), generator=gen) < 0.7
        m[:, :, 0, :] = False
        return m.to(device)
    if case.mask == "bias":
        return _randn((1, hq, nq, nk), gen, dtype, device).requires_grad_()
    if case.mask == "bias_inf":
        bias = torch.randn((b, 1, nq, nk), generator=gen, dtype=torch.float64)
        bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.2, float("-inf"))
        bias[:, :, 0, :] = float("-inf")
        return bias.to(device=device, dtype=dtype).requires_grad_()
    raise ValueError(f"unknown mask kind {case.mask!r}")


def make_variants(case, batch: int, dtype, device) -> dict:
    """The score-variant keyword arguments of a case (attention or varlen): ALiBi slopes
    float32 (batch, Hq) in ALiBi's geometric series, sinks (Hq,) in ``dtype`` requiring grad;
    the same on every run."""
    kw = {}
    if case.window is not None:
        kw["window_size"] = case.window
    if case.softcap:
        kw["softcap"] = case.softcap
    if case.alibi:
        base = torch.tensor([2.0 ** (-8.0 * (h + 1) / case.hq) for h in range(case.hq)], dtype=torch.float64)
        kw["alibi_slopes"] = (base * torch.linspace(1.0, 1.5, batch, dtype=torch.float64)[:, None]).to(
            device=device, dtype=torch.float32)
    if case.sinks:
        kw["sinks"] = _randn((case.hq,), _generator("sinks", case), dtype, device).requires_grad_()
    return kw


def _cast_variants(kw: dict, cast) -> dict:
    """The variants with their tensors cast like the other inputs of a reference run."""
    return {name: cast(t) if isinstance(t, Tensor) else t for name, t in kw.items()}


def _variant_call_fields(case) -> dict:
    from .reference import window_bounds

    return dict(window=window_bounds(case.window), softcap=case.softcap, alibi=case.alibi, sinks=case.sinks,
                sinks_grad=case.sinks)


def make_attention_inputs(case: AttentionCase, dtype, device):
    """q, k, v (requiring grad), attn_mask, dout, dlse for one case, the same on every run."""
    gen = _generator("attention", case)

    dv = case.dv or case.d

    def qkv(h, n, d):
        if case.strided:  # (B, N, H, D) storage seen as (B, H, N, D)
            return _randn((case.b, n, h, d), gen, dtype, device).transpose(1, 2).requires_grad_()
        return _randn((case.b, h, n, d), gen, dtype, device).requires_grad_()

    q, k, v = qkv(case.hq, case.nq, case.d), qkv(case.hkv, case.nk, case.d), qkv(case.hkv, case.nk, dv)
    mask = make_attention_mask(case, dtype, device, gen)
    dout = _randn((case.b, case.hq, case.nq, dv), gen, dtype, device)
    dlse = _randn((case.b, case.hq, case.nq), gen, torch.float32, device)
    return q, k, v, mask, dout, dlse


def attention_grid(level: str = "default") -> list[AttentionCase]:
    """Cases of the test method. ``quick``: a handful (seconds); ``default``: every
    feature on small sizes (the CI suite, Triton-interpreter friendly); ``full``: the
    shapes that break tiles (Nq, Nk in 1..1025, head dims 16..512) crossed with features."""
    base = AttentionCase(b=2, hq=4, hkv=2, nq=113, nk=128, d=64)
    quick = [
        base,
        replace(base, causal="top_left", mask="key_padding"),
        replace(base, causal="bottom_right", nq=17, mask="bias"),
        replace(base, d=40, mask="bool", dropout_p=0.2),
    ]
    if level == "quick":
        return quick
    small = AttentionCase(b=2, hq=4, hkv=2, nq=64, nk=64, d=32)
    default = quick + [
        replace(small, mask=mask, causal=causal)
        for mask in MASKS for causal in (None, "top_left", "bottom_right")
    ] + [
        replace(small, nq=nq, nk=nk, causal=causal)
        for nq, nk in ((1, 128), (17, 113), (128, 17), (113, 1)) for causal in (None, "bottom_right")
    ] + [
        replace(small, d=d) for d in (16, 40, 59, 80, 128, 256, 512)
    ] + [
        replace(small, hq=4, hkv=1),  # MQA
        replace(small, hq=4, hkv=4, strided=True, mask="key_padding"),
        replace(small, dropout_p=0.3, mask="bias", causal="top_left"),
        replace(small, dropout_p=0.1, nq=17, nk=113, hkv=1),
    ]
    default += variant_grid()
    if level == "default":
        return default
    seqlens = (1, 17, 113, 128, 1025)
    full = [replace(base, b=1, hq=2, hkv=1, nq=nq, nk=nk, d=d)
            for nq, nk in itertools.product(seqlens, seqlens) for d in (16, 40, 59, 64, 80, 128, 256, 512)]
    full += [replace(base, nq=n, nk=n, mask=mask, causal=causal, strided=True)
             for n in (113, 1025) for mask in MASKS for causal in (None, "top_left", "bottom_right")]
    return default + full


def variant_grid() -> list[AttentionCase]:
    """The score variants alone and with the features they must compose with (masks and a
    bias gradient, both causal alignments, Nq != Nk, GQA / MQA, dropout, head dims up to 512)."""
    small = AttentionCase(b=2, hq=4, hkv=2, nq=64, nk=64, d=32)
    return [
        replace(small, window=(8, 0), causal="top_left"),  # sliding window, causal
        replace(small, window=(5, 7)),  # two-sided local attention
        replace(small, window=(16, None), nq=17, nk=113, causal="bottom_right", hkv=1),  # decode-like, MQA
        replace(small, window=(3, 2), mask="key_padding", dropout_p=0.2, causal="top_left"),
        replace(small, window=(0, 0), mask="bias"),  # each query sees its own position only
        replace(small, softcap=2.0, mask="bias"),  # softcap + bias gradient
        replace(small, softcap=5.0, causal="bottom_right", nq=17, d=40),
        replace(small, alibi=True, causal="top_left"),
        replace(small, alibi=True, window=(12, 12), mask="bool", nq=113, nk=128),
        replace(small, sinks=True),
        replace(small, sinks=True, mask="bool", causal="bottom_right", nq=113, nk=17),  # rows with no key
        replace(small, sinks=True, dropout_p=0.3, window=(10, 0), causal="top_left", hkv=1),
        replace(small, window=(20, 0), softcap=3.0, alibi=True, sinks=True, mask="bias_inf", causal="top_left"),
        replace(small, d=512, dv=320, window=(9, 0), softcap=4.0, sinks=True, causal="bottom_right", nq=40),
    ]


def attention_call_for(case: AttentionCase, dtype, device) -> dispatch.AttentionCall:
    """The dispatch descriptor of a case (to ask a backend whether it can serve it)."""
    q, k, v, mask, _, _ = make_attention_inputs(case, dtype, device)
    mask_kind = None if mask is None else "bool" if mask.dtype == torch.bool else "float"
    return dispatch.AttentionCall(device=torch.device(device), dtype=dtype, batch=case.b, heads_q=case.hq,
                                  heads_kv=case.hkv, seqlen_q=case.nq, seqlen_k=case.nk, head_dim=case.d,
                                  head_dim_v=case.dv or case.d, mask=mask_kind, mask_grad=mask is not None and mask.requires_grad,
                                  causal=case.causal is not None, dropout_p=case.dropout_p, deterministic=False,
                                  varlen=False, **_variant_call_fields(case))


def _grad_list(outputs, inputs, grad_outputs):
    live = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(outputs, live, grad_outputs))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def _to64(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    out = t.detach().cpu()
    out = out.double() if out.is_floating_point() else out
    return out.requires_grad_(t.requires_grad)


def _dropout_keep(family: str, backend: str, dropout_p: float, shape, device, rng_seed: int) -> Optional[Tensor]:
    """The keep-mask a backend used in a call made right after torch.manual_seed(rng_seed)."""
    if dropout_p == 0:
        return None
    torch.manual_seed(rng_seed)
    seed = int(ops._draw_seed(dropout_p))
    return dispatch.implementation(family, backend).dropout_keep_mask(seed, shape, dropout_p, device)


def check_attention(case: AttentionCase, dtype, device, backend: str, rng_seed: int = 0,
                    deterministic: bool = False) -> list[Comparison]:
    """Runs ``fusedlayers.attention`` on ``backend`` for one case (with ``deterministic`` as
    given) and compares out, lse and every gradient with the rule. Raises AssertionError on a
    wrong shape or dtype."""
    q, k, v, mask, dout, dlse = make_attention_inputs(case, dtype, device)
    variants = make_variants(case, case.b, dtype, device)
    align = case.causal or "top_left"
    torch.manual_seed(rng_seed)
    out, lse = ops.attention(q, k, v, mask, causal=case.causal is not None, causal_align=align,
                             dropout_p=case.dropout_p, return_lse=True, deterministic=deterministic, backend=backend,
                             **variants)
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == dtype, (out.shape, out.dtype)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    inputs = [q, k, v, mask if mask is not None and mask.requires_grad else None, variants.get("sinks")]
    grads = _grad_list((out, lse), inputs, (dout, dlse))

    keep = _dropout_keep("attention", backend, case.dropout_p, (case.b, case.hq, case.nq, case.nk), device, rng_seed)
    kwargs = dict(causal=case.causal is not None, causal_align=align, dropout_p=case.dropout_p)
    results = {}
    for label, cast in (("ref64", _to64), ("torch", lambda t: t.detach().requires_grad_(t.requires_grad)
                                                    if t is not None and t.is_floating_point() else t)):
        args = [cast(t) for t in (q, k, v, mask)]
        var = _cast_variants(variants, cast)
        keep_here = keep.cpu() if (keep is not None and label == "ref64") else keep
        o, l = reference.attention(*args, dropout_mask=keep_here, **kwargs, **var)
        g = _grad_list((o, l), [*args[:3], args[3] if mask is not None and mask.requires_grad else None,
                                var.get("sinks")],
                       (cast(dout).detach().to(o.dtype), cast(dlse).detach().to(l.dtype)))
        results[label] = (o, l, g)

    (o64, l64, g64), (ot, lt, gt) = results["ref64"], results["torch"]
    comps = [compare("out", out, o64, ot, OUT_FACTOR),
             compare("lse", lse, l64, lt.float(), OUT_FACTOR)]
    for name, g, r, t in zip(("dq", "dk", "dv", "dbias", "dsinks"), grads, g64, gt):
        if g is not None:
            comps.append(compare(name, g, r, t, GRAD_FACTOR))
    return comps


# ---------------------------------------------------------------------------- packed attention


@dataclass(frozen=True)
class VarlenCase:
    """One case of the packed-sequence check of ``fusedlayers.attention_varlen``: sequence b
    has ``lens_q[b]`` queries and ``lens_k[b]`` keys, packed without padding.
    causal: None, "top_left" or "bottom_right" (per sequence). dv: v's head dim (None: d)."""

    lens_q: tuple[int, ...] = (17, 1, 64)
    lens_k: tuple[int, ...] = (17, 1, 64)
    hq: int = 4
    hkv: int = 2
    d: int = 32
    causal: Optional[str] = None
    dropout_p: float = 0.0
    dv: Optional[int] = None
    window: Optional[tuple[int, int]] = field(default=None, repr=False)  # as in AttentionCase
    softcap: float = field(default=0.0, repr=False)
    alibi: bool = field(default=False, repr=False)
    sinks: bool = field(default=False, repr=False)

    def __str__(self) -> str:
        defaults = VarlenCase()
        return "-".join(f"{f.name}{getattr(self, f.name)}" for f in fields(self)
                        if getattr(self, f.name) != getattr(defaults, f.name) or f.name in ("lens_q", "lens_k"))


def varlen_grid(level: str = "default") -> list[VarlenCase]:
    """Cases of the packed check: equal and unequal query / key lengths, a one-token
    sequence, both causal alignments, dropout, v's own head dim; ``full`` adds long
    sequences and a large head dim."""
    uneven = VarlenCase(lens_q=(5, 40, 13), lens_k=(30, 40, 7))
    quick = [VarlenCase(), replace(uneven, causal="bottom_right")]
    if level == "quick":
        return quick
    default = quick + [replace(uneven, causal="top_left", dropout_p=0.2), replace(uneven, causal="bottom_right", dv=48)]
    default += [  # the score variants per sequence: positions from each sequence's start
        replace(uneven, window=(6, 0), causal="bottom_right"),
        replace(uneven, window=(4, 9), softcap=3.0),
        replace(uneven, alibi=True, causal="top_left"),
        replace(uneven, sinks=True, causal="bottom_right", window=(10, 2), dropout_p=0.2),
    ]
    if level == "default":
        return default
    return default + [VarlenCase(lens_q=(113, 1025, 1), lens_k=(128, 1025, 17), d=128, causal="bottom_right"),
                      VarlenCase(lens_q=(300, 7), lens_k=(300, 7), hkv=1, d=80, causal="top_left", dropout_p=0.1)]


def varlen_call_for(case: VarlenCase, dtype, device) -> dispatch.AttentionCall:
    """The dispatch descriptor of a packed case (to ask a backend whether it can serve it)."""
    return dispatch.AttentionCall(device=torch.device(device), dtype=dtype, batch=len(case.lens_q), heads_q=case.hq,
                                  heads_kv=case.hkv, seqlen_q=max(case.lens_q), seqlen_k=max(case.lens_k),
                                  head_dim=case.d, head_dim_v=case.dv or case.d, mask=None, mask_grad=False,
                                  causal=case.causal is not None, dropout_p=case.dropout_p, deterministic=False,
                                  varlen=True, **_variant_call_fields(case))


def _cu_seqlens(lens, device) -> Tensor:
    """(B + 1,) int32 offsets of packed sequences of lengths ``lens``: [0, l0, l0 + l1, ...]."""
    return torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)


def check_attention_varlen(case: VarlenCase, dtype, device, backend: str, rng_seed: int = 0) -> list[Comparison]:
    """Runs ``fusedlayers.attention_varlen`` on ``backend`` for one case and compares out, lse
    and the gradients through both (dq, dk, dv; dsinks with sinks) with the rule. The float64
    truth runs the dense reference one sequence at a time (so it also checks the packed
    reference's block-diagonal mask); PyTorch's own error is that of the packed reference in the
    kernel's dtype. Raises AssertionError on a wrong
    shape or dtype."""
    gen = _generator("varlen", case)
    tq, tk, dv = sum(case.lens_q), sum(case.lens_k), case.dv or case.d
    q, k, v = (_randn(shape, gen, dtype, device).requires_grad_()
               for shape in ((tq, case.hq, case.d), (tk, case.hkv, case.d), (tk, case.hkv, dv)))
    dout = _randn((tq, case.hq, dv), gen, dtype, device)
    dlse = _randn((case.hq, tq), gen, torch.float32, device)
    cu_q, cu_k = _cu_seqlens(case.lens_q, device), _cu_seqlens(case.lens_k, device)
    variants = make_variants(case, len(case.lens_q), dtype, device)
    kwargs = dict(causal=case.causal is not None, causal_align=case.causal or "top_left", dropout_p=case.dropout_p)
    torch.manual_seed(rng_seed)
    out, lse = ops.attention_varlen(q, k, v, cu_q, cu_k, max(case.lens_q), max(case.lens_k), return_lse=True,
                                    backend=backend, **kwargs, **variants)
    assert out.shape == (tq, case.hq, dv) and out.dtype == dtype, (out.shape, out.dtype)
    assert lse.shape == (case.hq, tq) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    sinks = variants.get("sinks")
    grads = _grad_list((out, lse), (q, k, v, sinks), (dout, dlse))
    keep = _dropout_keep("attention", backend, case.dropout_p, (case.hq, tq, tk), device, rng_seed)

    # float64 truth, one sequence at a time through the dense reference
    q64, k64, v64 = (_to64(t) for t in (q, k, v))
    var64 = _cast_variants(variants, _to64)
    outs, lses = [], []
    for b in range(len(case.lens_q)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        var_b = dict(var64, alibi_slopes=var64["alibi_slopes"][b]) if "alibi_slopes" in var64 else var64
        o, l = reference.attention(*(t.transpose(0, 1)[None] for t in (q64[sq], k64[sk], v64[sk])),  # (1, H, N, D)
                                   dropout_mask=None if keep is None else keep.cpu()[:, sq, sk][None], **kwargs,
                                   **var_b)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    out64, lse64 = torch.cat(outs), torch.cat(lses, dim=1)
    grads64 = _grad_list((out64, lse64), (q64, k64, v64, var64.get("sinks")), (dout.cpu().double(),
                                                                               dlse.cpu().double()))
    # PyTorch's own error at this dtype: the packed reference run in the dtype
    qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
    var_t = _cast_variants(variants, lambda t: t.detach().requires_grad_(t.requires_grad))
    ot, lt = reference.attention_varlen(qt, kt, vt, cu_q, cu_k, dropout_mask=keep, **kwargs, **var_t)
    grads_t = _grad_list((ot, lt), (qt, kt, vt, var_t.get("sinks")), (dout, dlse.to(lt.dtype)))

    comps = [compare("out", out, out64, ot, OUT_FACTOR), compare("lse", lse, lse64, lt.float(), OUT_FACTOR)]
    for name, g, g64, gt in zip(("dq", "dk", "dv", "dsinks"), grads, grads64, grads_t):
        if g is not None:
            comps.append(compare(name, g, g64, gt, GRAD_FACTOR))
    return comps


# ---------------------------------------------------------------------------- norms


@dataclass(frozen=True)
class NormCase:
    """One point of the norm grid. ``strided``: rows of x (and residual) are views into a
    wider buffer (row stride > hidden). ``weight_fp32``: float32 weight and bias under
    lower-precision activations."""

    rows: int = 64
    hidden: int = 256
    rms: bool = False
    residual: bool = False
    weight: bool = True
    bias: bool = True
    dropout_p: float = 0.0
    prenorm: bool = False
    residual_in_fp32: bool = False
    strided: bool = False
    weight_fp32: bool = False

    def __str__(self) -> str:
        defaults = NormCase()
        return "-".join(f"{f.name}{getattr(self, f.name)}" for f in fields(self)
                        if getattr(self, f.name) != getattr(defaults, f.name) or f.name in ("rows", "hidden"))


def norm_grid(level: str = "default") -> list[NormCase]:
    """``quick``: a handful; ``default``: every feature at small sizes plus odd hidden
    sizes; ``full``: hidden sizes {1, 7, 64, 768, 1000, 4096, 20000, 70000} x rows {1, 3, 1024}."""
    quick = [
        NormCase(),
        NormCase(rms=True, bias=False),
        NormCase(residual=True, prenorm=True, dropout_p=0.1),
        NormCase(rows=3, hidden=1000, residual=True, residual_in_fp32=True, weight_fp32=True),
    ]
    if level == "quick":
        return quick
    default = quick + [
        NormCase(rows=rows, hidden=hidden) for rows, hidden in ((1, 1), (3, 7), (17, 64), (5, 768), (2, 4096))
    ] + [
        NormCase(rms=rms, residual=residual, prenorm=prenorm, dropout_p=p, strided=strided)
        for rms in (False, True) for residual in (False, True) for prenorm in (False, True)
        for p in (0.0, 0.2) for strided in (False, True)
    ] + [
        NormCase(weight=False, bias=False),
        NormCase(bias=False),
        NormCase(weight_fp32=True, residual=True),
        NormCase(residual_in_fp32=True, prenorm=True),
        NormCase(rows=3, hidden=20000, residual=True),
        NormCase(rows=97, hidden=533),  # cpu: two threads' dweight / dbias partials; an odd vector and a tail
    ]
    if level == "default":
        return default
    full = [NormCase(rows=rows, hidden=hidden, residual=True, prenorm=True)
            for rows in (1, 3, 1024) for hidden in (1, 7, 64, 768, 1000, 4096, 20000, 70000)]
    full += [NormCase(rows=rows, hidden=hidden, rms=True, bias=False, dropout_p=0.1)
             for rows in (1, 3, 1024) for hidden in (1, 7, 64, 768, 1000, 4096, 20000, 70000)]
    return default + full


def make_norm_inputs(case: NormCase, dtype, device):
    """x, residual, weight, bias (requiring grad; None where the case has none), dy, dz."""
    gen = _generator("norm", case)
    shape = (case.rows, case.hidden)

    def act(dt):
        if case.strided:  # rows are views into a wider buffer
            return _randn((case.rows, case.hidden + 3), gen, dt, device)[:, : case.hidden].requires_grad_()
        return _randn(shape, gen, dt, device).requires_grad_()

    wdtype = torch.float32 if case.weight_fp32 else dtype
    x = act(dtype)
    residual = act(torch.float32 if case.residual_in_fp32 else dtype) if case.residual else None
    weight = (1 + 0.5 * _randn((case.hidden,), gen, wdtype, device)).requires_grad_() if case.weight else None
    bias = _randn((case.hidden,), gen, wdtype, device).requires_grad_() if case.bias and not case.rms else None
    dy = _randn(shape, gen, dtype, device)
    dz = _randn(shape, gen, dtype, device)
    return x, residual, weight, bias, dy, dz


def check_norm(case: NormCase, dtype, device, backend: str, rng_seed: int = 0, eps: float = 1e-5) -> list[Comparison]:
    """Runs the norm family op on ``backend`` for one case; compares y, z and every gradient."""
    x, residual, weight, bias, dy, dz = make_norm_inputs(case, dtype, device)
    fn = ops.add_rms_norm if case.rms else ops.add_layer_norm
    extra = () if case.rms else (bias,)
    torch.manual_seed(rng_seed)
    res = fn(x, residual, weight, *extra, eps, dropout_p=case.dropout_p, prenorm=case.prenorm,
             residual_in_fp32=case.residual_in_fp32, backend=backend)
    y, z = res if case.prenorm else (res, None)
    assert y.shape == x.shape and y.dtype == dtype, (y.shape, y.dtype)
    if z is not None:
        expected = torch.float32 if case.residual_in_fp32 else (residual.dtype if residual is not None else dtype)
        assert z.shape == x.shape and z.dtype == expected, (z.shape, z.dtype, expected)
    inputs = [x, residual, weight, bias]
    outs, gouts = ((y, z), (dy, dz.to(z.dtype))) if z is not None else ((y,), (dy,))
    grads = _grad_list(outs, inputs, gouts)

    keep = _dropout_keep("norm", backend, case.dropout_p, x.shape, device, rng_seed)
    results = {}
    for label, cast in (("ref64", _to64), ("torch", lambda t: t.detach().requires_grad_(t.requires_grad)
                                                    if t is not None else None)):
        args = [cast(t) for t in inputs]
        keep_here = keep.cpu() if (keep is not None and label == "ref64") else keep
        yr, zr = reference.add_layer_norm(args[0], args[1], args[2], args[3], eps, dropout_p=case.dropout_p,
                                          dropout_mask=keep_here, rms=case.rms)
        if label == "torch":  # the stored dtypes of the op's outputs
            zr = zr.to(z.dtype if z is not None else zr.dtype)
            yr = yr.to(dtype)
        routs = (yr, zr) if z is not None else (yr,)
        g = _grad_list(routs, args, [cast(t).detach().to(o.dtype) for t, o in zip(gouts, routs)])
        results[label] = (yr, zr, g)

    (y64, z64, g64), (yt, zt, gt) = results["ref64"], results["torch"]
    comps = [compare("y", y, y64, yt, OUT_FACTOR)]
    if z is not None:
        comps.append(compare("z", z, z64, zt, OUT_FACTOR))
    for name, g, r, t in zip(("dx", "dresidual", "dweight", "dbias"), grads, g64, gt):
        if g is not None:
            comps.append(compare(name, g, r, t, GRAD_FACTOR))
    return comps


def norm_call_for(case: NormCase, dtype, device) -> dispatch.NormCall:
    wdtype = torch.float32 if case.weight_fp32 else dtype
    return dispatch.NormCall(device=torch.device(device), dtype=dtype,
                             weight_dtype=wdtype if case.weight else None,
                             residual_dtype=(torch.float32 if case.residual_in_fp32 else dtype) if case.residual else None,
                             rows=case.rows, hidden=case.hidden, rms=case.rms, dropout_p=case.dropout_p)
