"""Triton smoke test for the first minute on a GPU (benchmarks/gpu_session.sh, step "smoke").

A handful of cases that cover the Triton attention paths a GPU takes and the interpreter does not
(native bf16 MMA, the tile tables, split-KV decode, the separate dQ pass of 16-bit head dims > 128),
each checked against the float64 reference by the test method's rule (``fusedlayers.testing``):

    bf16 d128 fwd+bwd      GQA, causal, key padding: the common training call
    dropout                bf16 d64, additive bias with its gradient, dropout 0.1 (against the kernels'
                           own keep-mask)
    split-KV decode        bf16 d128, Nq = 1 against Nk = 4096, GQA (split-KV on a GPU; the number of
                           splits is printed)
    fp32 bwd               fp32 d64 with a bias: exact fp32 dots, fp64 dP
    d256 non-atomic dQ     bf16 d256: dQ by its own pass, not by atomics inside dK/dV
    deterministic          fp16 d80: the atomics-free backward

Outputs are poisoned first: a NaN-filled block is freed into torch's caching allocator before each
case, so an output element a kernel never writes reads back as NaN. One line per case, exit status 1
when any case fails or raises.

    python benchmarks/gpu_smoke.py                       # on a GPU
    python benchmarks/gpu_smoke.py --device cpu --tiny   # the same cases, tiny, through the Triton
                                                         # interpreter (the session's dry run)
    python benchmarks/gpu_smoke.py --check-cli "verify --quick --backend triton" ...
                                                         # parse fusedlayers command lines, run nothing
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: through the Triton interpreter (TRITON_INTERPRET=1), for the dry run")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (seconds under the interpreter)")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--check-cli", nargs="+", metavar="COMMAND",
                        help="parse each `fusedlayers` command line (quoted) without running it; exit 1 on an error")
    return parser.parse_args(argv)


def check_cli(commands: list[str]) -> int:
    """Parses each command line with fusedlayers' own parser; the commands themselves are replaced by
    recorders, so nothing runs."""
    from fusedlayers import cli

    failures = 0
    for command in commands:
        parsed = []
        saved = {name: getattr(cli, name) for name in ("info", "verify", "bench")}
        for name in saved:
            setattr(cli, name, lambda args, _n=name: parsed.append((_n, args)) or 0)
        try:
            rc = cli.main(shlex.split(command))
            ok = rc == 0 and len(parsed) == 1
        except SystemExit as e:  # argparse: a bad flag or value
            ok = False
            rc = e.code
        finally:
            for name, fn in saved.items():
                setattr(cli, name, fn)
        if ok and parsed[0][0] == "bench" and parsed[0][1].op:  # --op takes any word: check it here
            from fusedlayers.benchmarks import suite

            unknown = [op for op in parsed[0][1].op if op not in suite.OPS]
            if unknown:
                ok, rc = False, f"unknown --op {unknown} (known: {', '.join(suite.OPS)})"
        failures += not ok
        detail = vars(parsed[0][1]) if parsed else {}
        detail = {k: v for k, v in detail.items() if k != "fn"}
        print(f"cli {'ok  ' if ok else 'FAIL'} fusedlayers {command}  -> {detail if ok else f'exit {rc}'}")
    return 1 if failures else 0


def cases(tiny: bool):
    """(name, AttentionCase, dtype, deterministic) of every smoke case."""
    import torch

    from fusedlayers.testing import AttentionCase

    sizes = ("b", "hq", "hkv", "nq", "nk", "d")
    table = [  # name, features, interpreter sizes (--tiny), GPU sizes, dtype, deterministic
        ("bf16 d128 fwd+bwd", dict(mask="key_padding", causal="top_left"), (1, 4, 2, 40, 40, 128),
         (2, 8, 2, 1000, 1000, 128), torch.bfloat16, False),
        ("dropout", dict(mask="bias", dropout_p=0.1), (1, 2, 2, 33, 50, 64), (2, 4, 4, 300, 257, 64),
         torch.bfloat16, False),
        ("split-KV decode", dict(mask="key_padding"), (1, 4, 2, 1, 130, 128), (2, 8, 2, 1, 4096, 128),
         torch.bfloat16, False),
        ("fp32 bwd", dict(mask="bias"), (1, 2, 2, 33, 40, 64), (1, 4, 2, 257, 300, 64), torch.float32, False),
        ("d256 non-atomic dQ", dict(causal="bottom_right"), (1, 2, 1, 20, 30, 256), (1, 4, 2, 200, 300, 256),
         torch.bfloat16, False),
        ("deterministic", dict(mask="bool"), (1, 2, 2, 20, 30, 80), (1, 4, 4, 129, 129, 80), torch.float16, True),
    ]
    return [(name, AttentionCase(**dict(zip(sizes, small if tiny else large)), **features), dtype, deterministic)
            for name, features, small, large, dtype, deterministic in table]


def _poison(device: str) -> None:
    """Free a NaN-filled block into torch's caching allocator: the next allocations reuse it."""
    import torch

    if device == "cuda":
        torch.full((64 << 20,), float("nan"), dtype=torch.float32, device=device)  # 256 MB, freed at once


def _note(name: str, case, dtype, device: str) -> str:
    """What the Triton launcher decides for this case on this GPU (split-KV count, dQ path)."""
    if device != "cuda":
        return ""
    from fusedlayers.kernels import attention as A

    if name == "split-KV decode":
        bm, bn, _, _ = A._config("decode", case.d, dtype, device, False, case.mask != "none")
        return f"splits={A._num_splits(case.b, case.hq, case.nq, case.nk, bm, bn, device)}"
    if name == "d256 non-atomic dQ":
        return f"atomic dQ={A._atomic_dq(A._bucket(case.d), dtype)}"
    return ""


def run(device: str, tiny: bool, only=None) -> int:
    import torch

    from fusedlayers import dispatch, testing

    failures = 0
    for name, case, dtype, deterministic in cases(tiny):
        if only and only not in name:
            continue
        start = time.perf_counter()
        try:
            call = testing.attention_call_for(case, dtype, device)
            reason = dispatch.why_not("attention", "triton", call)
            if reason is not None:
                raise RuntimeError(f"triton cannot serve it: {reason}")
            _poison(device)
            comps = testing.check_attention(case, dtype, device, "triton", deterministic=deterministic)
            if device == "cuda":
                torch.cuda.synchronize()
            ok = all(c.ok for c in comps)
            worst = max(comps, key=lambda c: c.error / c.bound if c.bound > 0 else float("inf"))
            text = f"worst {worst}"
            if not ok:
                text = "; ".join(str(c) for c in comps if not c.ok)
        except Exception as e:  # one broken case must not hide the others
            ok = False
            text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(limit=4)
        failures += not ok
        note = _note(name, case, dtype, device) if ok else ""
        print(f"smoke {'ok  ' if ok else 'FAIL'} {name:20s} {str(dtype).replace('torch.', ''):8s} {case} "
              f"({time.perf_counter() - start:.1f} s){' ' + note if note else ''}: {text}", flush=True)
    return failures


def main(argv=None) -> int:
    args = _parse(argv)
    if args.device == "cpu":
        # before any kernel module imports: @triton.jit decides interpretation at decoration time
        os.environ["TRITON_INTERPRET"] = "1"
    if args.check_cli:
        return check_cli(args.check_cli)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (use --device cpu --tiny for the interpreter)")
        return 2
    failures = run(args.device, args.tiny, args.only)
    print(f"smoke: {'all passed' if failures == 0 else f'{failures} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
