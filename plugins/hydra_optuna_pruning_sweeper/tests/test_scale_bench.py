"""benchmarks/scale.py keeps working: its CI size (`--quick`: SQLite, N=1 and 2 workers on one study, 20 short
trials) runs, the workers together run exactly the budget, and the table has a row per N. Its figures are a
machine's, not checked here; matplotlib is optional (the bench says so when it is missing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_quick_scale_bench_runs_the_budget_exactly(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "scale-sqlite.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 2]
    for r in rows:
        checks = r["checks"]
        assert checks["complete"] == checks["budget"] == 20, checks
        assert checks["duplicate_numbers"] == 0 and checks["running"] == 0, checks
        assert r["workers_seen"] >= 1 and r["trials_per_s"] > 0
    table_rows = re.findall(r"^\| (\d+)[ |(]", result.stdout, flags=re.MULTILINE)
    assert table_rows == ["1", "2"], result.stdout[-3000:]
    assert (tmp_path / "logs" / "sqlite-n2" / "worker-1.log").exists()
