"""benchmarks/gpu_session.sh and benchmarks/gpu_smoke.py without a GPU. CI also runs the session's
whole dry run (`bash benchmarks/gpu_session.sh --dry-run`) in a copy of the tree."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_smoke  # noqa: E402


def test_check_cli_accepts_the_session_commands_and_refuses_bad_ones(capsys):
    assert gpu_smoke.check_cli(["verify --quick --backend triton", "verify --backend cuda", "info",
                                "bench --quick --op attention --op rms_norm --out somewhere"]) == 0
    assert gpu_smoke.check_cli(["verify --quick --backend nope"]) == 1
    assert gpu_smoke.check_cli(["verify --quick --full"]) == 1
    assert gpu_smoke.check_cli(["bench --quick --op attnetion"]) == 1
    out = capsys.readouterr().out
    assert out.count("cli ok") == 4 and out.count("cli FAIL") == 3 and "unknown --op ['attnetion']" in out


def test_smoke_cases_cover_what_the_session_promises():
    for tiny in (False, True):
        names = [c[0] for c in gpu_smoke.cases(tiny)]
        assert names == ["bf16 d128 fwd+bwd", "dropout", "split-KV decode", "fp32 bwd", "d256 non-atomic dQ",
                         "deterministic"]
        by_name = {c[0]: c for c in gpu_smoke.cases(tiny)}
        assert by_name["split-KV decode"][1].nq == 1 and by_name["dropout"][1].dropout_p > 0
        assert by_name["d256 non-atomic dQ"][1].d > 128 and by_name["deterministic"][3]


def test_session_script_parses_and_heads_with_its_plan():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    plan = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    for step in ("versions", "install", "imports", "build", "smoke", "verify-triton", "ptxas", "verify-cuda",
                 "memcheck", "bench", "racecheck", "suite", "--dry-run"):
        assert step in plan, step
    assert subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True).returncode == 2
