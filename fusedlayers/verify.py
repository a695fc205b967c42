"""``fusedlayers verify``: the test method's grid on this machine, for every backend.

Runs ``fusedlayers.testing``'s checks (float64 reference, FlashAttention-style bound) for
every op family (attention, packed ``attention_varlen``, the norms), every backend that can
serve this device, and fp32 / fp16 / bf16; prints one table row per (op, backend, dtype)
with the worst error against its bound; writes a record (device, date, versions, results) that ``fusedlayers info`` reads back.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import dispatch, testing

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# table row -> (dispatch op family, grid, call descriptor, check)
FAMILIES = {
    "attention": ("attention", testing.attention_grid, testing.attention_call_for, testing.check_attention),
    "varlen": ("attention", testing.varlen_grid, testing.varlen_call_for, testing.check_attention_varlen),
    "norm": ("norm", testing.norm_grid, testing.norm_call_for, testing.check_norm),
}


@dataclass
class Row:
    """One line of the table: a backend's verdict on one op family in one dtype."""

    op: str
    backend: str
    dtype: str
    cases: int
    worst_error: float  # of the comparison closest to its bound
    worst_bound: float
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run(level: str = "default", backends=None, device: Optional[torch.device] = None, progress=print) -> list[Row]:
    """Checks every (op family, backend, dtype) that can be served on ``device``."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for op, (family, grid_of, call_for, check) in FAMILIES.items():
        grid = grid_of(level)
        for backend in backends or dispatch.BACKENDS:
            for dtype in DTYPES:
                served = [c for c in grid if dispatch.why_not(family, backend, call_for(c, dtype, device)) is None]
                if not served:
                    continue
                row = Row(op, backend, str(dtype).replace("torch.", ""), len(served), 0.0, 1.0)
                worst = -1.0
                for case in served:
                    for comp in check(case, dtype, device, backend):
                        ratio = comp.error / comp.bound if comp.bound > 0 else float("inf")
                        if ratio > worst:
                            worst, row.worst_error, row.worst_bound = ratio, comp.error, comp.bound
                        if not comp.ok:
                            row.failures.append(f"{case}: {comp}")
                rows.append(row)
                if progress:
                    progress(format_row(row))
    return rows


HEADER = f"{'op':10s} {'backend':10s} {'dtype':9s} {'cases':>6s} {'worst error / bound':>22s}  result"


def format_row(row: Row) -> str:
    text = (f"{row.op:10s} {row.backend:10s} {row.dtype:9s} {row.cases:6d} "
            f"{f'{row.worst_error:.2e} / {row.worst_bound:.2e}':>22s}  {'pass' if row.ok else 'FAIL'}")
    return "\n".join([text] + [f"    {f}" for f in row.failures[:5]])


def record_path() -> Path:
    """Where the last verification of this machine is kept (``FUSEDLAYERS_CACHE`` or
    ``$XDG_CACHE_HOME/fusedlayers``)."""
    root = os.environ.get("FUSEDLAYERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusedlayers")
    return Path(root) / "verify.json"


def write_record(rows: list[Row], level: str, device: torch.device, seconds: float) -> Path:
    """Writes the record atomically (temp file + rename); one entry per device kind."""
    import fusedlayers

    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    records = read_records()
    records[device.type] = {
        "device": device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "level": level,
        "passed": all(r.ok for r in rows),
        "seconds": round(seconds, 1),
        "versions": {"fusedlayers": fusedlayers.__version__, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "rows": [asdict(r) for r in rows],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
    return path


def read_records() -> dict:
    try:
        return json.loads(record_path().read_text())
    except (OSError, ValueError):
        return {}


def summary(device_type: str) -> str:
    """One line for ``fusedlayers info``: the last verification of this device kind."""
    rec = read_records().get(device_type)
    if not rec:
        return "not verified on this machine yet (run `fusedlayers verify`)"
    backends = sorted({r["backend"] for r in rec["rows"]})
    verdict = "all passed" if rec["passed"] else "FAILURES"
    return (f"verified on {rec['device']} at {rec['date']} ({rec['level']} grid, {verdict}; "
            f"backends {', '.join(backends)}; torch {rec['versions']['torch']})")


def main(level: str, backends=None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fusedlayers verify ({level} grid) on {device_name(device)}")
    print(HEADER)
    start = time.perf_counter()
    rows = run(level, backends, device)
    seconds = time.perf_counter() - start
    failures = sum(len(r.failures) for r in rows)
    path = write_record(rows, level, device, seconds)
    print(f"{'all passed' if failures == 0 else f'{failures} FAILED'} in {seconds:.1f} s; record: {path}")
    return 0 if failures == 0 and rows else 1
