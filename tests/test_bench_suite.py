"""The throughput-suite switch in bench/conftest.py: skipped by plain pytest, run with --benchmark,
and each pair's ratio printed and saved."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"

PAIR_MODULE = textwrap.dedent('''
    import time
    import pytest

    @pytest.mark.parametrize("side", ["baseline", "fast"])
    def test_sleep(paired_benchmark, side):
        seconds = 0.004 if side == "baseline" else 0.001
        paired_benchmark("sleep pair", time.sleep, seconds, rounds=3, warmup_rounds=0)
        paired_benchmark.record(bytes_moved=4096 if side == "baseline" else 1024)
''')


def run_pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_plain_pytest_reports_the_throughput_suite_as_skipped():
    done = run_pytest("bench", "-q", "-rs", cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    last_line = done.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ skipped\b", last_line), done.stdout
    assert "passed" not in last_line and "failed" not in last_line
    assert "pytest --benchmark" in done.stdout  # the skip reason says how to run it


def test_benchmark_flag_runs_only_the_pairs_and_saves_their_ratios(tmp_path):
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\ntestpaths = tests bench\npython_files = test_*.py bench_*.py\n")
    (tmp_path / "bench").mkdir()
    shutil.copy(BENCH_DIR / "conftest.py", tmp_path / "bench" / "conftest.py")
    shutil.copy(BENCH_DIR / "machine.py", tmp_path / "bench" / "machine.py")
    (tmp_path / "bench" / "bench_sleep.py").write_text(PAIR_MODULE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_plain.py").write_text("def test_plain():\n    pass\n")

    plain = run_pytest("-q", cwd=tmp_path)
    assert "1 passed, 2 skipped" in plain.stdout, plain.stdout + plain.stderr
    assert not (tmp_path / "bench" / "results").exists()

    done = run_pytest("--benchmark", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed, 1 deselected" in done.stdout
    # Our table comes after pytest-benchmark's.
    assert done.stdout.index("benchmark 'sleep pair'") < done.stdout.index("paired benchmarks")

    latest = json.loads((tmp_path / "bench" / "results" / "latest.json").read_text())
    assert {"date", "cpu", "cpu_count", "torch"} <= set(latest["machine"])
    entry = latest["pairs"]["sleep pair"]
    assert entry["candidate"] == "fast"
    assert entry["ratio"] == entry["baseline_s"] / entry["candidate_s"]
    assert entry["ratio"] > 1.5  # 4 ms against 1 ms of sleep
    assert entry["bytes_moved_ratio"] == 4.0

    pytest_benchmark_json = json.loads(
        (tmp_path / "bench" / "results" / "pytest-benchmark.json").read_text())
    assert pytest_benchmark_json["pairs"] == latest["pairs"]
