"""The benchmark suite: fusedlayers beside the best alternatives, in one process.

Run ``fusedlayers bench`` (``--quick`` for about a minute on CPU; ``--op`` to pick ops;
``--out`` for the results folder, default ``benchmarks/results/<device>/``). Every case
builds one set of inputs; every implementation that can run on them is checked against
the reference (or, past the reference's memory budget, against PyTorch SDPA / layer_norm)
and then timed; a wrong one is reported as WRONG and not timed.

Implementations: each fusedlayers backend that serves the call ("fusedlayers[triton]",
...; "fusedlayers[reference]" is the naive reference and counts as a competitor), PyTorch
SDPA with each backend it has on the device (flash, efficient, cudnn, math; CPU: flash,
math), ``torch.compile`` of the naive reference (not in ``--quick``), torch's
``layer_norm`` / ``rms_norm`` and ``layer_norm(x + r)``, and flash-attn, xformers,
Liger-Kernel and apex when installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fusedlayers
from fusedlayers import dispatch, reference

from .core import Report, Result, attention_flops, environment, interleaved_pair, measure_all, norm_bytes


@dataclass
class Impl:
    name: str
    ours: bool
    fn: Optional[Callable]  # the op, called on the case's inputs; None when unavailable
    note: str = ""


def _sdpa_impls(device: torch.device, gqa: bool, masked: bool) -> list[Impl]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if device.type != "cuda":
        kinds = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    impls = []
    for name, kind in kinds.items():
        def fn(q, k, v, mask=None, causal=False, _kind=kind):
            with sdpa_kernel([_kind]):
                return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal and mask is None,
                                                      enable_gqa=gqa)
        impls.append(Impl(f"torch.sdpa[{name}]", False, fn))
    return impls


def _optional_attention_impls() -> list[Impl]:
    impls = []
    try:
        from flash_attn import flash_attn_func

        impls.append(Impl("flash-attn", False, lambda q, k, v, mask=None, causal=False: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)))
    except ImportError:
        impls.append(Impl("flash-attn", False, None, "not installed"))
    try:
        import xformers.ops as xops

        impls.append(Impl("xformers", False, lambda q, k, v, mask=None, causal=False: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_bias=xops.LowerTriangularMask() if causal else None).transpose(1, 2)))
    except ImportError:
        impls.append(Impl("xformers", False, None, "not installed"))
    return impls


def attention_impls(call: dispatch.AttentionCall, quick: bool) -> list[Impl]:
    impls = []
    for backend in dispatch.BACKENDS:
        reason = dispatch.why_not("attention", backend, call)
        impls.append(Impl(f"fusedlayers[{backend}]", backend != "reference",
                          None if reason else (lambda q, k, v, mask=None, causal=False, _b=backend: fusedlayers.attention(
                              q, k, v, mask, causal=causal, backend=_b)), reason or ""))
    impls += _sdpa_impls(call.device, call.heads_q != call.heads_kv, call.mask is not None)
    if not quick:
        compiled = torch.compile(lambda q, k, v, mask=None, causal=False: reference.attention(
            q, k, v, mask, causal=causal)[0], dynamic=False)
        impls.append(Impl("torch.compile(reference)", False, compiled))
        impls += _optional_attention_impls()
    return impls


def norm_impls(op: str, call: dispatch.NormCall, quick: bool) -> list[Impl]:
    impls = []
    for backend in dispatch.BACKENDS:
        reason = dispatch.why_not("norm", backend, call)
        if op == "layer_norm":
            fn = lambda x, r, w, b, _b=backend: fusedlayers.layer_norm(x, w, b, backend=_b)  # noqa: E731
        elif op == "rms_norm":
            fn = lambda x, r, w, b, _b=backend: fusedlayers.rms_norm(x, w, backend=_b)  # noqa: E731
        else:
            fn = lambda x, r, w, b, _b=backend: fusedlayers.add_layer_norm(  # noqa: E731
                x, r, w, b, prenorm=True, backend=_b)[0]
        impls.append(Impl(f"fusedlayers[{backend}]", backend != "reference", None if reason else fn, reason or ""))
    n = call.hidden
    torch_fns = {
        "layer_norm": lambda x, r, w, b: F.layer_norm(x, (n,), w, b),
        "rms_norm": lambda x, r, w, b: F.rms_norm(x, (n,), w),
        "add_layer_norm": lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b),
    }
    impls.append(Impl("torch" if op != "add_layer_norm" else "torch layer_norm(x + r)", False, torch_fns[op]))
    if not quick:
        impls.append(Impl("torch.compile(torch)", False, torch.compile(torch_fns[op], dynamic=False)))
        try:
            from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

            liger = {"layer_norm": lambda x, r, w, b: liger_layer_norm(x, w, b, 1e-5),
                     "rms_norm": lambda x, r, w, b: liger_rms_norm(x, w, 1e-6),
                     "add_layer_norm": lambda x, r, w, b: liger_layer_norm(x + r, w, b, 1e-5)}
            impls.append(Impl("liger-kernel", False, liger[op]))
        except ImportError:
            impls.append(Impl("liger-kernel", False, None, "not installed"))
        try:
            from apex.normalization import fused_layer_norm_affine

            if op != "rms_norm":
                impls.append(Impl("apex", False, lambda x, r, w, b: fused_layer_norm_affine(
                    x if op == "layer_norm" else x + r, w, b, (n,), 1e-5)))
        except ImportError:
            impls.append(Impl("apex", False, None, "not installed"))
    return impls


# ------------------------------------------------------------------------------- cases


def attention_cases(device: torch.device, quick: bool) -> list[dict]:
    """B·N fixed at 16k tokens and hidden 2048 on GPU (the FlashAttention convention)."""
    if device.type == "cuda":
        seqlens = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        dims = (128,) if quick else (64, 128)
        dtypes = (torch.bfloat16,) if quick else (torch.float16, torch.bfloat16)
        return [dict(b=16384 // n, h=2048 // d, n=n, d=d, causal=c, dtype=dt)
                for dt in dtypes for d in dims for c in (False, True) for n in seqlens]
    seqlens = (256, 512) if quick else (512, 1024, 2048)
    return [dict(b=1, h=4 if quick else 8, n=n, d=64, causal=c, dtype=torch.float32)
            for c in ((False,) if quick else (False, True)) for n in seqlens]


def decode_cases(device: torch.device, quick: bool) -> list[dict]:
    if device.type == "cuda":
        lens = (4096,) if quick else (1024, 4096, 16384, 65536)
        return [dict(b=8, hq=32, hkv=8, nk=n, d=128, dtype=torch.bfloat16) for n in lens]
    return [dict(b=2, hq=8, hkv=2, nk=n, d=64, dtype=torch.float32) for n in ((2048,) if quick else (1024, 8192))]


def norm_cases(device: torch.device, quick: bool) -> list[dict]:
    if device.type == "cuda":
        shapes = ((8192, 4096),) if quick else ((4096, 1024), (8192, 4096), (8192, 8192), (32768, 1024),
                                               (4096, 16384))
        return [dict(rows=m, hidden=n, dtype=torch.bfloat16) for m, n in shapes]
    shapes = ((1024, 768),) if quick else ((1024, 768), (4096, 1024), (1024, 4096))
    return [dict(rows=m, hidden=n, dtype=torch.float32) for m, n in shapes]


# --------------------------------------------------------------------------- running


def _tolerance(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=2e-3, rtol=2e-3), torch.float16: dict(atol=2e-2, rtol=2e-2),
            torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}[dtype]


def _check(out: torch.Tensor, expected: torch.Tensor, dtype) -> str:
    try:
        torch.testing.assert_close(out.float(), expected.float(), **_tolerance(dtype))
        return ""
    except AssertionError as e:
        return "WRONG: " + str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else "WRONG"


def _time_modes(report, op, case, dtype, impls, make_inputs, expected_fn, work, unit, device, quick, modes,
                progress):
    """Checks every implementation on one case, then times those that pass, in every mode, interleaved
    (``measure_all``)."""
    inputs, grads = make_inputs()
    expected = expected_fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    notes = {}
    for impl in impls:
        if impl.fn is None:
            report.not_run.setdefault(impl.name, impl.note)
            continue
        try:
            notes[impl.name] = _check(impl.fn(*inputs), expected, dtype)
        except Exception as e:  # an implementation that cannot run this case
            notes[impl.name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    ran = [impl for impl in impls if impl.name in notes]
    for mode in modes:
        fns, mode_notes = {}, dict(notes)
        for impl in ran:
            if mode_notes[impl.name]:
                continue
            if mode == "fwd":
                fn = lambda impl=impl: impl.fn(*inputs)  # noqa: E731
            elif mode == "bwd":
                out = impl.fn(*inputs)
                fn = lambda out=out: torch.autograd.grad(out, leaves, grads, retain_graph=True,  # noqa: E731
                                                         allow_unused=True)
            else:
                fn = lambda impl=impl: torch.autograd.grad(impl.fn(*inputs), leaves, grads,  # noqa: E731
                                                           allow_unused=True)
            try:
                fn()  # the warm-up, and whether this mode runs
                fns[impl.name] = fn
            except Exception as e:
                mode_notes[impl.name] = f"error: {type(e).__name__}"
        times = measure_all(fns, device, quick=quick) if fns else {}
        for impl in ran:
            ms = times.get(impl.name)
            rate = None if ms is None else work(mode) / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
            report.results.append(Result(op, mode, case, impl.name, ms, rate, unit, impl.ours, mode_notes[impl.name]))
    if progress:
        for _ in ran:
            progress()


def _case_view(case: dict) -> dict:
    return {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in case.items()}


OPS = ("overhead", "attention", "decode", "varlen", "layer_norm", "add_layer_norm", "rms_norm", "train_step")
OVERHEAD_GOAL = 1.5  # host time per call, ours / torch's equivalent op, at most (DESIGN.md)


def overhead_cases(backend: str = "auto"):
    """(op, mode, ours, torch) on tiny CPU inputs, where a call's time is the host's: each
    a function of no argument making one call (and its backward in fwd+bwd). Modes: ``fwd``
    (no input requires grad), ``fwd-grad`` (the forward alone with inputs that require grad:
    the autograd node is built), ``fwd+bwd``. Competitors: F.layer_norm, F.rms_norm,
    F.layer_norm(x + r), F.rms_norm(x + r), F.scaled_dot_product_attention, and the torch.nn
    modules against their fusedlayers.nn drop-ins (the attention ones with parameters that
    require grad, as in training, so even ``fwd`` builds a graph). ``backend``: ours' backend argument (the
    nn drop-ins keep ``auto``, so they are left out for any other)."""
    import fusedlayers.nn as fnn

    be = backend
    n = 64
    x, r = torch.randn(4, n), torch.randn(4, n)
    w, b = torch.randn(n), torch.randn(n)
    q = torch.randn(1, 1, 4, 16)
    ln, rms = torch.nn.LayerNorm(n), torch.nn.RMSNorm(n, eps=1e-6)
    fln, frms = fnn.LayerNorm.from_torch(ln), fnn.RMSNorm.from_torch(rms)
    ops = {
        "layer_norm": (lambda x, r: fusedlayers.layer_norm(x, w, b, backend=be),
                       lambda x, r: F.layer_norm(x, (n,), w, b)),
        "rms_norm": (lambda x, r: fusedlayers.rms_norm(x, w, backend=be), lambda x, r: F.rms_norm(x, (n,), w, 1e-6)),
        "add_layer_norm": (lambda x, r: fusedlayers.add_layer_norm(x, r, w, b, backend=be),
                           lambda x, r: F.layer_norm(x + r, (n,), w, b)),
        "add_rms_norm": (lambda x, r: fusedlayers.add_rms_norm(x, r, w, backend=be),
                         lambda x, r: F.rms_norm(x + r, (n,), w, 1e-6)),
        "attention": (lambda x, r: fusedlayers.attention(x, x, x, backend=be),
                      lambda x, r: F.scaled_dot_product_attention(x, x, x)),
    }
    inputs = {"attention": q}
    if backend == "auto":
        e = 32  # modules on (1, 4, 32) batch-first sequences, 2 heads
        mha = torch.nn.MultiheadAttention(e, 2, batch_first=True)
        enc = torch.nn.TransformerEncoderLayer(e, 2, 2 * e, dropout=0.0, batch_first=True)
        fmha, fenc = fnn.MultiheadAttention.from_torch(mha), fnn.TransformerEncoderLayer.from_torch(enc)
        ops.update({"nn.LayerNorm": (lambda x, r: fln(x), lambda x, r: ln(x)),
                    "nn.RMSNorm": (lambda x, r: frms(x), lambda x, r: rms(x)),
                    "nn.MultiheadAttention": (lambda x, r: fmha(x, x, x, need_weights=False)[0],
                                              lambda x, r: mha(x, x, x, need_weights=False)[0]),
                    "nn.TransformerEncoderLayer": (lambda x, r: fenc(x), lambda x, r: enc(x))})
        inputs["nn.MultiheadAttention"] = inputs["nn.TransformerEncoderLayer"] = torch.randn(1, 4, e)
    for name, (ours, theirs) in ops.items():
        plain = inputs.get(name, x)
        xg, rg = plain.clone().requires_grad_(), r.clone().requires_grad_()
        yield name, "fwd", (lambda f=ours: f(plain, r)), (lambda f=theirs: f(plain, r))
        yield name, "fwd-grad", (lambda f=ours: f(xg, rg)), (lambda f=theirs: f(xg, rg))
        yield name, "fwd+bwd", (lambda f=ours: f(xg, rg).sum().backward()), \
            (lambda f=theirs: f(xg, rg).sum().backward())


def overhead_rows(report: Report, quick: bool) -> None:
    """The host-overhead rows: thousands of calls per second (higher is better), so that
    the report's ratio column reads as everywhere else (ours / best other, above 1: faster)."""
    pairs, calls = (5, 200) if quick else (21, 1000)
    for name, mode, ours, theirs in overhead_cases():
        row = interleaved_pair(ours, theirs, pairs, calls)
        case = {"call": name, "tensors": "tiny"}
        note = f"ours/torch time {row['ratio']:.2f}x"
        report.results.append(Result("overhead", mode, case, "fusedlayers", row["ours_us"], 1e3 / row["ours_us"],
                                     "kcalls/s", True, note))
        report.results.append(Result("overhead", mode, case, "torch", row["torch_us"], 1e3 / row["torch_us"],
                                     "kcalls/s", False))


def run(ops=OPS, *, quick: bool = False,
        device: Optional[torch.device] = None, progress_bar=None) -> Report:
    unknown = [op for op in ops if op not in OPS]
    if isinstance(ops, str) or unknown:
        raise ValueError(f"ops must be a sequence of op names from {', '.join(OPS)}, got unknown "
                         f"{ops if isinstance(ops, str) else unknown[0]!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(environment(device))
    modes = ("fwd", "bwd") if quick else ("fwd", "bwd", "fwd+bwd")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype, grad=True):
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype).requires_grad_(grad)

    plan = []
    if "attention" in ops:
        for c in attention_cases(device, quick):
            call = dispatch.AttentionCall(device, c["dtype"], c["b"], c["h"], c["h"], c["n"], c["n"], c["d"], c["d"],
                                          None, False, c["causal"], 0.0, False, False)

            def make(c=c):
                q, k, v = (randn(c["b"], c["h"], c["n"], c["d"], dtype=c["dtype"]) for _ in range(3))
                return (q, k, v, None, c["causal"]), randn(c["b"], c["h"], c["n"], c["d"], dtype=c["dtype"],
                                                           grad=False)

            def work(mode, c=c):
                return attention_flops(c["b"], c["h"], c["n"], c["n"], c["d"], c["causal"], mode)

            plan.append(("attention", c, attention_impls(call, quick), make, work, "TFLOP/s", modes))
    if "decode" in ops:
        for c in decode_cases(device, quick):
            call = dispatch.AttentionCall(device, c["dtype"], c["b"], c["hq"], c["hkv"], 1, c["nk"], c["d"], c["d"],
                                          None, False, False, 0.0, False, False)

            def make(c=c):
                q = randn(c["b"], c["hq"], 1, c["d"], dtype=c["dtype"], grad=False)
                k, v = (randn(c["b"], c["hkv"], c["nk"], c["d"], dtype=c["dtype"], grad=False) for _ in range(2))
                return (q, k, v, None, False), None

            def work(mode, c=c):
                return attention_flops(c["b"], c["hq"], 1, c["nk"], c["d"], False, mode)

            plan.append(("decode", c, attention_impls(call, quick), make, work, "TFLOP/s", ("fwd",)))
    if "varlen" in ops:
        for c in varlen_cases(device, quick):
            lens = torch.randint(c["n"] // 4, c["n"] + 1, (c["seqs"],), generator=gen).tolist()
            cu = torch.tensor([0] + lens).cumsum(0).to(device=device, dtype=torch.int32)
            call = dispatch.AttentionCall(device, c["dtype"], c["seqs"], c["h"], c["h"], max(lens), max(lens),
                                          c["d"], c["d"], None, False, False, 0.0, False, True)

            def make(c=c, lens=lens):
                q, k, v = (randn(sum(lens), c["h"], c["d"], dtype=c["dtype"]) for _ in range(3))
                return (q, k, v), randn(sum(lens), c["h"], c["d"], dtype=c["dtype"], grad=False)

            def work(mode, c=c, lens=lens):  # only the real tokens count
                return sum(attention_flops(1, c["h"], n, n, c["d"], False, mode) for n in lens)

            plan.append(("varlen", c, varlen_impls(call, cu, lens, quick), make, work, "TFLOP/s", modes))
    for op in ("layer_norm", "add_layer_norm", "rms_norm"):
        if op not in ops:
            continue
        for c in norm_cases(device, quick):
            call = dispatch.NormCall(device, c["dtype"], c["dtype"], c["dtype"] if op == "add_layer_norm" else None,
                                     c["rows"], c["hidden"], op == "rms_norm", 0.0)

            def make(c=c, op=op):
                x, r = (randn(c["rows"], c["hidden"], dtype=c["dtype"]) for _ in range(2))
                w, b = randn(c["hidden"], dtype=c["dtype"]), randn(c["hidden"], dtype=c["dtype"])
                return (x, r if op == "add_layer_norm" else None, w, b), randn(c["rows"], c["hidden"],
                                                                               dtype=c["dtype"], grad=False)

            def work(mode, c=c, op=op):
                size = torch.finfo(c["dtype"]).bits // 8
                return norm_bytes(c["rows"], c["hidden"], size, mode, residual=op == "add_layer_norm",
                                  prenorm=op == "add_layer_norm", weight_bytes=size, bias=op != "rms_norm")

            plan.append((op, c, norm_impls(op, call, quick), make, work, "GB/s", modes))

    if "overhead" in ops and device.type == "cpu":  # the CPU clock measures host time
        overhead_rows(report, quick)
    bar = progress_bar(total=sum(len(p[2]) for p in plan)) if progress_bar else None
    for op, case, impls, make, work, unit, op_modes in plan:
        big = op in ("attention", "decode") and case.get("b", 1) * case.get("h", case.get("hq", 1)) * case.get(
            "n", 1) * case.get("n", case.get("nk", 1)) > 2**28

        def expected(*args, op=op, big=big, impls=impls):
            if op == "varlen":  # the padded SDPA result is the yardstick
                return next(i.fn for i in impls if i.name == "torch.sdpa[math] (padded)")(*args)
            if op in ("attention", "decode"):
                q, k, v, mask, causal = args
                if big:  # the naive reference would need too much memory: SDPA is the yardstick
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                          enable_gqa=q.shape[1] != k.shape[1])
                return reference.attention(q.float(), k.float(), v.float(), causal=causal)[0]
            x, r, w, b = args
            z = (x.float() + r.float()) if r is not None else x.float()
            return reference.rms_norm(z, w.float()) if op == "rms_norm" else reference.layer_norm(z, w.float(),
                                                                                                 b.float())

        if bar:
            bar.set_description(f"{op} {', '.join(f'{k}={v}' for k, v in _case_view(case).items())}")
        _time_modes(report, op, _case_view(case), case["dtype"], impls, make, expected, work, unit, device, quick, op_modes,
                    bar.update if bar else None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bar:
        bar.close()
    if "train_step" in ops:
        train_steps(report, device, quick)
    return report


def varlen_cases(device: torch.device, quick: bool) -> list[dict]:
    if device.type == "cuda":
        return [dict(seqs=16, h=16, n=n, d=128, dtype=torch.bfloat16) for n in ((4096,) if quick else (1024, 4096))]
    return [dict(seqs=4, h=4, n=n, d=64, dtype=torch.float32) for n in ((256,) if quick else (512, 1024))]


def varlen_impls(call, cu, lens, quick) -> list[Impl]:
    """Ours on the packed tokens vs SDPA on a padded batch with a key-padding mask (the usual
    alternative), both returning packed (total, H, D)."""
    n, seqs = max(lens), len(lens)
    pos = torch.arange(n, device=cu.device)
    valid = pos[None, :] < torch.tensor(lens, device=cu.device)[:, None]  # (B, N)

    def padded(q, k, v, _kind=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def pad(t):  # (total, H, D) -> (B, H, N, D)
            out = t.new_zeros(seqs, n, *t.shape[1:])
            out = out.masked_scatter(valid[..., None, None], t)
            return out.transpose(1, 2)

        with sdpa_kernel([_kind or SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), valid[:, None, None, :])
        return o.transpose(1, 2)[valid]  # back to packed (total, H, D)

    impls = []
    for backend in dispatch.BACKENDS:
        reason = dispatch.why_not("attention", backend, call)
        impls.append(Impl(f"fusedlayers[{backend}]", backend != "reference", None if reason else (
            lambda q, k, v, _b=backend: fusedlayers.attention_varlen(q, k, v, cu, cu, n, n, backend=_b)),
            reason or ""))
    from torch.nn.attention import SDPBackend

    impls.append(Impl("torch.sdpa[math] (padded)", False, padded))
    if call.device.type == "cuda":
        impls.append(Impl("torch.sdpa[efficient] (padded)", False,
                          lambda q, k, v: padded(q, k, v, SDPBackend.EFFICIENT_ATTENTION)))
    return impls


def encoder_step_pairs(d_model: int = 256, layers: int = 4, seq: int = 1024, batch: int = 4, pairs: int = 3,
                       steps: int = 2) -> tuple[list, dict]:
    """Training steps of a ``torch.nn.TransformerEncoder`` (post-norm layers, d_model // 64 heads, dropout 0.1)
    against a copy swapped onto fusedlayers (``fusedlayers.swap``: attention and the residual-add + layer norms)
    on CPU tensors: forward with a key-padding mask (sequences of 100/88/75/94% of ``seq``), a loss over the
    non-padding positions, backward and an SGD step, in float32 and under bf16 autocast. ``pairs`` rounds of
    ``steps`` steps of each model, alternating which goes first. Returns one row per dtype (median ms per step
    of each, median per-round speedup torch / ours) and the setup. The two models' eval-mode outputs are
    compared first."""
    import copy
    import statistics
    import time
    from contextlib import nullcontext

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model, nhead=max(1, d_model // 64), dim_feedforward=4 * d_model,
                                             batch_first=True)
    theirs = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    ours = copy.deepcopy(theirs)
    swapped = fusedlayers.swap(ours).swapped
    lengths = ([max(1, int(seq * f)) for f in (1.0, 0.88, 0.75, 0.94)] * batch)[:batch]
    pad = torch.arange(seq)[None, :] >= torch.tensor(lengths)[:, None]  # True: padding
    x = torch.randn(batch, seq, d_model, generator=torch.Generator().manual_seed(1))
    valid = (~pad)[..., None].float()
    with torch.no_grad():
        theirs.eval(), ours.eval()
        err = ((theirs(x, src_key_padding_mask=pad) - ours(x, src_key_padding_mask=pad)) * valid).abs().max().item()
        assert err < 1e-3, f"the swapped encoder's output differs from torch's by {err}"
        theirs.train(), ours.train()

    def stepper(model, autocast):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = model(x, src_key_padding_mask=pad)
            (out.float().square() * valid).mean().backward()
            opt.step()
        return step

    rows = []
    for dtype, autocast in (("float32", nullcontext),
                            ("bf16 autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        sides = {"ours": stepper(ours, autocast), "torch": stepper(theirs, autocast)}
        for fn in sides.values():  # warm-up
            fn()
        ms, ratios = {"ours": [], "torch": []}, []
        for i in range(pairs):
            t = {}
            for side in (("ours", "torch") if i % 2 == 0 else ("torch", "ours")):
                t0 = time.perf_counter()
                for _ in range(steps):
                    sides[side]()
                t[side] = (time.perf_counter() - t0) / steps * 1e3
                ms[side].append(t[side])
            ratios.append(t["torch"] / t["ours"])
        rows.append({"dtype": dtype, "ours_ms": statistics.median(ms["ours"]),
                     "torch_ms": statistics.median(ms["torch"]), "speedup": statistics.median(ratios)})
    setup = {"d_model": d_model, "layers": layers, "heads": max(1, d_model // 64), "batch": batch, "seq": seq,
             "lengths": lengths, "pairs": pairs, "steps": steps, "swapped": [str(m) for m in swapped]}
    return rows, setup


def train_steps(report: Report, device: torch.device, quick: bool) -> None:
    """Tokens/s of the reference Transformer's training (translation task, d_model 64, 2+2
    layers), the same run on each backend that can serve it."""
    from fusedlayers.transformer.lessons import TRAIN
    from fusedlayers.transformer.model import ModelConfig
    from fusedlayers.transformer.train import TASKS, TrainConfig, train

    task = TASKS["translate"]()
    case = {"task": "translate", "d_model": 64, "layers": 2, "steps": 10 if quick else 40}
    for backend in dispatch.BACKENDS:
        cfg = TrainConfig(steps=case["steps"], device=device, seed=0, out=None, eval=False, quiet=True,
                          **TRAIN["translate"])
        try:
            r = train(task, ModelConfig(d_model=64, n_heads=4, d_ff=128, n_layers=2, backend=backend), cfg)
        except dispatch.BackendError as e:
            report.not_run.setdefault(f"train_step fusedlayers[{backend}]", str(e).splitlines()[-1].strip())
            continue
        report.results.append(Result("train_step", "fwd+bwd", case, f"fusedlayers[{backend}]", r["seconds"] * 1e3,
                                     r["tokens_per_s"] / 1e3, "k tokens/s", backend != "reference"))
    if device.type == "cpu":  # a torch.nn model swapped vs not (benchmarks/bench_train_step.py)
        seq = 256 if quick else 1024
        rows, setup = encoder_step_pairs(seq=seq, pairs=2 if quick else 3, steps=1 if quick else 2)
        tokens = sum(setup["lengths"])
        for row in rows:
            case = {"model": "nn.TransformerEncoder", "d_model": 256, "layers": 4, "tokens": f"4x{seq}",
                    "dtype": row["dtype"]}
            for impl, key, ours_ in (("fusedlayers.swap", "ours_ms", True), ("torch", "torch_ms", False)):
                report.results.append(Result("train_step", "fwd+bwd", case, impl, row[key], tokens / row[key],
                                             "k tokens/s", ours_))
