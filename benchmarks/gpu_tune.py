"""Where the time goes on a GPU, and which Triton launch configurations are fastest there.

One call on a GPU machine, after benchmarks/gpu_session.sh has shown the kernels correct. Three parts,
each stopped at its share of ``--seconds`` (the results so far are kept), every figure beside torch's in
the same process:

    profile   per op (norms at 8192 x 4096 bf16, attention b4 h16 n4096 d128 bf16, decode): the time
              of one call (``triton.testing.do_bench``, L2 flushed), the time of its GPU kernels alone
              (torch.profiler), and the host time of a call on tiny inputs (where the kernel costs
              nothing: wall time of 200 calls in a row), forward and forward + backward; then the
              norms again on the ``cuda`` backend (the CUDA C++ kernels)
    norms     the Triton norm kernels' (BLOCK_M, num_warps) for the forward and the backward, at
              (8192, 4096) and (32768, 1024) bf16, against torch
    attention the Triton attention tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) of the bf16 d128
              forward, dK/dV and dQ passes (and dQ by atomics or by its own pass) at b4 h16 n4096,
              and the decode split count, against SDPA's best backend

Candidates are launched through the kernels' own entry points with the configuration functions
replaced (``kernels.layer_norm._config``, ``kernels.attention._config`` / ``_atomic_dq`` /
``_num_splits``), so what is timed is what a call would run with that table entry. The sweeps rank GPU
kernel time (torch.profiler; ``do_bench`` of a whole call measures the host wherever the host time exceeds
the L2 flush, as it did for the norms on the first GPU session). A candidate that
fails to compile or run is reported, not fatal. The tables in kernels/ are changed by hand from these
figures, keeping only entries that compile without spills (benchmarks/resource_check.py).

    python benchmarks/gpu_tune.py --out DIR [--seconds 240] [--parts profile norms attention]
    python benchmarks/gpu_tune.py --device cpu --tiny     # runs every part tiny through the interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for tune.json (printed either way)")
    p.add_argument("--seconds", type=float, default=240.0, help="time for all parts together")
    p.add_argument("--parts", nargs="+", default=["check", "profile", "norms", "attention"],
                   choices=["check", "profile", "norms", "attention"])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the interpreter's dry run)")
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:])
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from fusedlayers.kernels import attention as A  # noqa: E402
from fusedlayers.kernels import layer_norm as LN  # noqa: E402

DEV = torch.device(ARGS.device)
RESULTS: dict = {"env": {"torch": torch.__version__, "triton": triton.__version__,
                         "device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"}}


def say(*a):
    print(*a, flush=True)


def save():
    if ARGS.out:
        os.makedirs(ARGS.out, exist_ok=True)
        with open(os.path.join(ARGS.out, "tune.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


def bench_ms(fn) -> float:
    """Median ms of fn (do_bench on a GPU: L2 flushed; a few plain runs on CPU)."""
    if DEV.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=5, rep=25))
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def kernel_ms(fn, reps: int = 5) -> tuple[float, list]:
    """GPU time of fn's kernels per call (torch.profiler), and (name, calls) of each kernel."""
    if DEV.type != "cuda":
        return float("nan"), []
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total, names = 0.0, []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t and e.device_type.name == "CUDA":
            total += t
            names.append((e.key[:60], e.count // reps))
    return total / reps / 1e3, names


def sweep_ms(fn) -> float:
    """The time of fn's GPU kernels alone (a launch-configuration sweep ranks kernels: ``do_bench`` of a call
    whose host time exceeds the L2 flush measures the host); on CPU the wall time."""
    return kernel_ms(fn, reps=10)[0] if DEV.type == "cuda" else bench_ms(fn)


def host_us(fn, calls: int = 200) -> float:
    """Host time per call: wall time of ``calls`` calls in a row on tiny inputs, then one sync."""
    calls = 2 if ARGS.tiny else calls
    fn()
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def randn(*shape, dtype=torch.bfloat16, grad=False):
    return torch.randn(shape, device=DEV, dtype=torch.float32).to(dtype).requires_grad_(grad)


# ------------------------------------------------------------------------------------ profile


def profile_part(dl: Deadline):
    import fusedlayers

    rows, hidden = (64, 256) if ARGS.tiny else (8192, 4096)
    b, h, n, d = (1, 2, 64, 32) if ARGS.tiny else (4, 16, 4096, 128)
    out = RESULTS.setdefault("profile", [])

    def norm_cases(r, c, be="triton", tag=""):
        x, res, dy = randn(r, c, grad=True), randn(r, c, grad=True), randn(r, c)
        w, bb = randn(c, grad=True), randn(c, grad=True)
        return {
            "layer_norm" + tag: (lambda: fusedlayers.layer_norm(x, w, bb, backend=be),
                                 lambda: F.layer_norm(x, (c,), w, bb), dy, (x, w, bb)),
            "rms_norm" + tag: (lambda: fusedlayers.rms_norm(x, w, backend=be),
                               lambda: F.rms_norm(x, (c,), w), dy, (x, w)),
            "add_layer_norm" + tag: (lambda: fusedlayers.add_layer_norm(x, res, w, bb, prenorm=True, backend=be)[0],
                                     lambda: F.layer_norm(x + res, (c,), w, bb), dy, (x, res, w, bb)),
        }

    def attn_cases(bb, hh, nn, dd):
        q, k, v = (randn(bb, hh, nn, dd, grad=True) for _ in range(3))
        dout = randn(bb, hh, nn, dd)
        bd, hq, hkv = (1, 4, 1) if ARGS.tiny else (8, 32, 8)
        qd, kd, vd = randn(bd, hq, 1, dd), randn(bd, hkv, n, dd), randn(bd, hkv, n, dd)
        return {
            "attention": (lambda: fusedlayers.attention(q, k, v, backend="triton"),
                          lambda: F.scaled_dot_product_attention(q, k, v), dout, (q, k, v)),
            "attention causal": (lambda: fusedlayers.attention(q, k, v, causal=True, backend="triton"),
                                 lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dout, (q, k, v)),
            "decode": (lambda: fusedlayers.attention(qd, kd, vd, backend="triton"),
                       lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), None, ()),
        }

    big = {**norm_cases(rows, hidden), **attn_cases(b, h, n, d)}
    tiny = {**norm_cases(4, 64), **attn_cases(1, 1, 16, 16)}
    if DEV.type == "cuda":  # the CUDA C++ norm kernels beside the Triton ones (kernel time: could they serve auto?)
        big.update(norm_cases(rows, hidden, "cuda", "[cuda]"))
        tiny.update(norm_cases(4, 64, "cuda", "[cuda]"))
    for name, (ours, theirs, dy, leaves) in big.items():
        if dl.left() < 5:
            say(f"profile: out of time before {name}")
            break
        row = {"op": name}
        try:
            for who, fn in (("ours", ours), ("torch", theirs)):
                row[f"{who}_fwd_ms"] = bench_ms(lambda: fn())
                row[f"{who}_fwd_kernel_ms"], row[f"{who}_fwd_kernels"] = kernel_ms(lambda: fn())
                if dy is not None:
                    o = fn()
                    bwd = lambda o=o: torch.autograd.grad(o, leaves, dy, retain_graph=True)  # noqa: E731
                    row[f"{who}_bwd_ms"] = bench_ms(bwd)
                    row[f"{who}_bwd_kernel_ms"], row[f"{who}_bwd_kernels"] = kernel_ms(bwd)
                t_ours, t_theirs, t_dy, t_leaves = tiny[name]
                t_fn = t_ours if who == "ours" else t_theirs
                row[f"{who}_host_us"] = host_us(t_fn)
                if t_dy is not None:  # forward + backward on tiny inputs
                    row[f"{who}_host_fwd_bwd_us"] = host_us(lambda f=t_fn: torch.autograd.grad(f(), t_leaves, t_dy))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        out.append(row)
        save()
        say(f"profile {name:17s} " + "  ".join(
            f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)) + (f" {row.get('error', '')}"))
        for k, v in row.items():
            if k.endswith("_kernels"):
                say(f"    {k}: {v}")


# ------------------------------------------------------------------------------------ norms


def norms_part(dl: Deadline):
    shapes = [(64, 256)] if ARGS.tiny else [(8192, 4096), (32768, 1024)]
    out = RESULTS.setdefault("norms", [])
    real = LN._config
    for m, n in shapes:
        x, res, dy = randn(m, n), randn(m, n), randn(m, n)
        w, bias = randn(n), randn(n)
        torch_fwd = {
            False: sweep_ms(lambda: F.layer_norm(x, (n,), w, bias)),
            True: sweep_ms(lambda: F.rms_norm(x, (n,), w)),
        }
        for rms in (False, True):
            base = real(m, n)
            bm0, bn, _ = base
            cands = sorted({(bm, wp) for bm in (bm0, 1, 2, 4) for wp in (4, 8, 16) if bm * bn <= 16384}
                           | {(bm0, real(m, n)[2])})
            if ARGS.tiny:
                cands = cands[:2]
            y, z, mean, rstd = LN.forward(x, None, w, None if rms else bias, 0, 1e-5, 0.0, rms, False, False, True)
            for mode in ("fwd", "bwd"):
                best = None
                for bm, wp in cands:
                    if dl.left() < 3:
                        break
                    LN._config = (lambda bm=bm, wp=wp: (lambda mm, nn, backward=False, interpret=False:
                                                        (bm, real(mm, nn, backward)[1], wp)))()
                    try:
                        if mode == "fwd":
                            ms = sweep_ms(lambda: LN.forward(x, None, w, None if rms else bias, 0, 1e-5, 0.0, rms,
                                                             False, False, False))
                        else:
                            ms = sweep_ms(lambda: LN.backward(dy, None, x, w, None if rms else bias, mean, rstd, 0,
                                                              1e-5, 0.0, rms, x.dtype, None))
                        err = ""
                    except Exception as e:
                        ms, err = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
                    finally:
                        LN._config = real
                    cur = (bm, wp) == (real(m, n, mode == "bwd")[0], real(m, n, mode == "bwd")[2])
                    out.append({"m": m, "n": n, "rms": rms, "mode": mode, "block_m": bm, "warps": wp, "ms": ms,
                                "current": cur, "torch_fwd_ms": torch_fwd[rms] if mode == "fwd" else None,
                                "error": err})
                    if ms == ms and (best is None or ms < best[0]):
                        best = (ms, bm, wp)
                save()
                cur = real(m, n, mode == "bwd")
                cur_ms = next((r["ms"] for r in out if r["m"] == m and r["n"] == n and r["rms"] == rms
                               and r["mode"] == mode and r["current"]), float("nan"))
                say(f"norms {m}x{n} {'rms' if rms else 'ln '} {mode}: current (bm {cur[0]}, warps {cur[2]}) "
                    f"{cur_ms:.4g} ms; best {best}; torch fwd {torch_fwd[rms]:.4g} ms")


# ------------------------------------------------------------------------------------ attention


# candidates, most likely first (the part stops at its deadline); the current table entry is among them
FWD = [(128, 32, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)]
# (64, 64, 8, 1): the one tile found that compiles without the dQ atomics with 0 spills on sm_80 and sm_90a
# (Triton 3.8, plain calls; with the score variants it spills on sm_90a)
DKDV = [(64, 64, 8, 1), (32, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 128, 4, 3), (16, 128, 8, 2)]
DQ = [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2)]
DECODE = [(16, 32, 4, 2), (16, 64, 4, 3), (16, 128, 4, 3)]


def _worst(got, want) -> float:
    """Largest |got - want| over a tuple of tensors, relative to want's largest magnitude."""
    return max(float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
               for g, w in zip(got, want) if g is not None)


def attention_part(dl: Deadline):
    b, h, n, d = (1, 2, 64, 32) if ARGS.tiny else (4, 16, 4096, 128)
    out = RESULTS.setdefault("attention", [])
    q, k, v, dout = (randn(b, h, n, d) for _ in range(4))
    scale = d ** -0.5
    real_config, real_atomic = A._config, A._atomic_dq

    def use(tiles: dict, atomic=None):
        A._config = lambda kd, *a, **kw: tiles.get(kd) or real_config(kd, *a, **kw)
        if atomic is not None:
            A._atomic_dq = lambda *a, **kw: atomic

    def restore():
        A._config, A._atomic_dq = real_config, real_atomic

    def run(tiles, fn, atomic=None, **extra):
        """Times fn with these table entries; records ms and the result's difference from the current tables'."""
        try:
            use(tiles, atomic)
            got = fn()
            ms, err = sweep_ms(fn), ""
            diff = _worst(got, baseline[fn.__name__])
        except Exception as e:
            ms, err, diff = float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:150]}", float("nan")
        finally:
            restore()
        row = {"tiles": {k2: list(v2) for k2, v2 in tiles.items()}, "atomic_dq": atomic, "ms": ms,
               "diff_vs_current": diff, "error": err, **extra}
        out.append(row)
        save()
        say(f"attention {fn.__name__:6s} {str(tiles):45s} atomic={atomic} {ms:.4g} ms diff {diff:.2g} "
            f"{extra or ''} {err}")
        return ms

    def sdpa_best(fn):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        best = {}
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel(be):
                    best[be.name] = sweep_ms(fn)
            except Exception:
                pass
        return best

    o, lse = A.forward(q, k, v, None, 0, scale, False, False, 0.0)
    dlse = torch.zeros_like(lse)

    def fwd():
        return A.forward(q, k, v, None, 0, scale, False, False, 0.0)[:1]

    def bwd():
        return A.backward(dout, dlse, q, k, v, None, o, lse, 0, scale, False, False, 0.0, False, False)[:3]

    bd, hq, hkv, nk = (1, 4, 1, 256) if ARGS.tiny else (8, 32, 8, 4096)
    qd, kd, vd = randn(bd, hq, 1, d), randn(bd, hkv, nk, d), randn(bd, hkv, nk, d)
    splits_now = {}

    def decode():
        return A.forward_split_kv(qd, kd, vd, None, 0, scale, False, False, 0.0, splits_now["n"])[:1]

    splits_now["n"] = 1
    baseline = {"fwd": fwd(), "bwd": bwd(), "decode": decode()}
    if DEV.type == "cuda":
        RESULTS["sdpa_fwd"] = sdpa_best(lambda: F.scaled_dot_product_attention(q, k, v))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        RESULTS["sdpa_fwd_bwd"] = sdpa_best(lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), dout))
        RESULTS["sdpa_decode"] = sdpa_best(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
        say(f"sdpa (ms) fwd {RESULTS['sdpa_fwd']}  fwd+bwd {RESULTS['sdpa_fwd_bwd']}  decode {RESULTS['sdpa_decode']}")

    # decode first: tiles x split counts
    for tile in DECODE[:1] if ARGS.tiny else DECODE:
        for splits in (1, 2) if ARGS.tiny else (1, 2, 4, 8, 16):
            if dl.left() < 5:
                return
            splits_now["n"] = splits
            run({"decode": tile}, decode, splits=splits)
    for tile in FWD[:2] if ARGS.tiny else FWD:
        if dl.left() < 10:
            return
        run({"fwd": tile}, fwd)
    if dl.left() > 10:
        run({}, bwd, atomic=True)  # the current dK/dV tile with dQ by atomics, as the table says for d128
    best = (float("inf"), DKDV[0])
    for tile in DKDV[:2] if ARGS.tiny else DKDV:
        if dl.left() < 10:
            return
        ms = run({"dkdv": tile}, bwd, atomic=False)
        if ms < best[0]:
            best = (ms, tile)
    for tile in DQ[:2] if ARGS.tiny else DQ:
        if dl.left() < 10:
            return
        run({"dkdv": best[1], "dq": tile}, bwd, atomic=False)


def check_part(dl: Deadline):
    """The attention backward of the tables as they stand, and with forced dK/dV tiles, against the float64
    reference by the test method's rule (``fusedlayers.testing.check_attention``), deterministic and not."""
    from fusedlayers import testing

    # GQA and MHA: the deterministic dK of 16-bit d128 failed at B=4 H=16 (MHA) and passed with GQA
    shapes = [(1, 4, 2, 64)] if ARGS.tiny else [(4, 16, 16, 2048), (1, 4, 2, 1024)]
    cases = [testing.AttentionCase(b=b, hq=hq, hkv=hkv, nq=n, nk=n, d=d, mask=mask, causal=causal, dropout_p=p)
             for b, hq, hkv, n in shapes
             for d, mask, causal, p in ((128, "none", None, 0.0), (128, "none", "bottom_right", 0.0),
                                        (128, "bias", None, 0.0), (128, "none", None, 0.1), (64, "none", None, 0.0),
                                        (256, "none", None, 0.0), (80, "key_padding", None, 0.1))]
    forced = [None, (64, 64, 8, 1), (32, 64, 8, 2), (32, 64, 8, 1), (64, 64, 8, 2), (16, 64, 8, 2)]
    out = RESULTS.setdefault("check", [])
    real_config, real_why_not = A._config, A.why_not

    def why_not_but_known_failures(call):  # the checks run what the backend refuses for a known wrong answer
        reason = real_why_not(call)
        return None if reason and "seen on a GPU" in reason else reason

    from fusedlayers import dispatch

    A.why_not = why_not_but_known_failures
    dispatch._SELECTED.clear()  # select keeps its answer per call signature: decide these afresh
    try:
        _check_cases(dl, cases, forced, out, real_config)
    finally:
        A.why_not = real_why_not
        dispatch._SELECTED.clear()


def _check_cases(dl, cases, forced, out, real_config):
    from fusedlayers import testing

    for case in cases[:2] if ARGS.tiny else cases:
        for tile in forced:
            for det in (False, True):
                if dl.left() < 5:
                    return
                if tile is not None and (case.d != 128 or case.mask != "none" or case.dropout_p or case.causal):
                    continue
                if tile is not None:
                    A._config = (lambda t: lambda kd, *a, **kw: t if kd == "dkdv" else real_config(kd, *a, **kw))(tile)
                try:
                    comps = testing.check_attention(case, torch.bfloat16, DEV, "triton", deterministic=det)
                    bad = [str(c) for c in comps if not c.ok]
                    row = {"case": repr(case), "dkdv": tile, "deterministic": det, "ok": not bad, "failures": bad}
                except Exception as e:
                    row = {"case": repr(case), "dkdv": tile, "deterministic": det, "ok": False,
                           "failures": [f"{type(e).__name__}: {str(e)[:200]}"]}
                finally:
                    A._config = real_config
                out.append(row)
                save()
                say(f"check {'ok  ' if row['ok'] else 'FAIL'} {case} dkdv={tile} det={det} "
                    f"{'; '.join(row['failures'])[:300]}")


def main() -> int:
    t0 = time.monotonic()
    parts = {"check": (check_part, 0.3), "profile": (profile_part, 0.2), "norms": (norms_part, 0.15),
             "attention": (attention_part, 0.35)}
    chosen = [p for p in parts if p in ARGS.parts]
    share = sum(parts[p][1] for p in chosen)
    failed = 0
    for p in chosen:
        left = ARGS.seconds - (time.monotonic() - t0)
        budget = left if p == chosen[-1] else ARGS.seconds * parts[p][1] / share
        say(f"=== {p} ({budget:.0f} s)")
        try:
            parts[p][0](Deadline(budget))
        except Exception:
            failed = 1
            traceback.print_exc()
        save()
    say(f"=== done in {time.monotonic() - t0:.0f} s")
    return failed


if __name__ == "__main__":
    sys.exit(main())
