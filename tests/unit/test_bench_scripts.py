"""Every bench/ script still starts: its imports resolve and it parses its flags (`--help`).

The benchmarks run by hand, not in CI, so a helper moved or renamed elsewhere breaks one silently
(bench/vision.py imported helpers from serve.py after they had moved to harness.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if "argparse" in p.read_text())


def test_the_scripts_are_found() -> None:
    assert {"serve.py", "vision.py", "speculative.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_bench_script_starts(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
