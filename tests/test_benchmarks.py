"""The benchmarks' agreement columns: each script compares the library with the hand-written
code it times, and prints MISMATCH when their numbers differ beyond round-off. Timings are not
asserted (they are the tables' business); these runs are a few steps long, so they check that
the library and the references still compute the same thing (a change of the library's hook
order once left bench_maml comparing the wrong gradient, 3e-1 off, unnoticed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_maml_variants_agree_with_the_autograd_loop():
    stdout = run("bench_maml.py", "--steps", "1", "--repeats", "1", "--warmup", "1",
                 "--variants", "loop", "betty-tb", "betty-problems", "betty-windows")
    rows = re.findall(r"^(betty [^\n]*?)\s+[0-9.]+\s+[0-9.]+.*?([0-9.]+e[-+][0-9]+)",
                      stdout, re.MULTILINE)
    assert len(rows) == 3, stdout
    assert "MISMATCH" not in stdout, stdout
    assert all(float(diff) < 1e-5 for _, diff in rows), rows


def test_bench_core_library_equals_the_hand_written_loops():
    stdout = run("bench_core.py", "--steps-a", "20", "--unroll", "5", "--steps-b", "10",
                 "--repeats", "1", "--check-steps-a", "10", "--check-steps-b", "3")
    assert "MISMATCH" not in stdout, stdout
    assert "mwn-darts: library and hand-written final numbers are bit-identical" in stdout
    table = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^(logreg-cg|mwn-darts)\s+\d+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+"
        r"([0-9.e+-]+)", stdout, re.MULTILINE)}
    assert set(table) == {"logreg-cg", "mwn-darts"} and max(table.values()) < 1e-6, stdout
