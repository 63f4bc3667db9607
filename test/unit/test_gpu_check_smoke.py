"""benchmarks/gpu_check.sh --smoke: the prepared GPU check runs end to end on the CPU (tiny model), so it is never
dead code: environment report, the gpu-marked tests (skipped here), and the benchmark's table (online methods and
offline one-at-a-time vs batched rows) with every method matching the reference forward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_runs_and_prints_one_table() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "== gpu-marked tests" in text and "== torch benchmark" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | median ms |")
    methods = [r.split("|")[1].strip() for r in rows[1:]]
    assert methods[:3] == ["reference", "cached", "cached+prefix"]  # the graph rows are CUDA only
    assert methods[3:5] == ["offline plain, 1 step/call", "offline prefix, 1 step/call"]
    assert methods[5].startswith("offline prefix, ") and methods[5].endswith(" steps/call") and len(methods) == 6
    assert "offline scoring steps/s" in text
    assert "parity: every method within 0.001 of the reference's progress logits" in text
    assert "gpu_check done" in text and "exit 0" in text
