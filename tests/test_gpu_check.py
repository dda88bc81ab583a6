"""bench/gpu_check.py: the smoke mode end to end, the budget, failures, and the no-CUDA refusal."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
CEILINGS = ("matmul_bf16", "copy_d2d")
PROOFS = ("train_step_gemm_dtypes", "train_step_host_syncs")


def gpu_checks_module():
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module("gpu_checks")


@pytest.fixture
def gpu_check(monkeypatch):
    """The gpu_check script as a module (bench/ on sys.path, as when it runs as a script)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("gpu_check")


def test_smoke_run_writes_json_and_markdown_and_prints_the_table_last(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "gpu_check.py"), "--device", "cpu", "--quick",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {check["name"]: check for check in report["checks"]}
    # the proofs (dtypes, syncs) open the report, before the ceilings and every timing
    proofs = [check.name for check in gpu_checks_module().load_checks() if check.proof]
    assert set(PROOFS) <= set(proofs)
    assert list(checks)[: len(proofs) + len(CEILINGS)] == proofs + list(CEILINGS)
    for name in PROOFS:
        assert checks[name]["status"] == "ok", checks[name]
    dtypes = {row["name"]: row for row in checks["train_step_gemm_dtypes"]["rows"]}
    assert all(row["value"] == 1.0 for row in dtypes.values()), dtypes  # every GEMM bf16
    syncs = checks["train_step_host_syncs"]["rows"]
    assert syncs and all(row["value"] == 0 for row in syncs), syncs
    for name, unit in zip(CEILINGS, ("TFLOP/s", "GB/s")):
        assert checks[name]["status"] == "ok"
        (row,) = checks[name]["rows"]
        assert row["unit"] == unit and row["value"] > 0
    for key in ("date", "torch", "cuda", "gpu"):
        assert key in report["environment"]

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| check | measurement | value | unit | notes |" in markdown
    assert all(f"| {name} |" in markdown for name in CEILINGS)
    assert report["environment"]["date"] in markdown and "torch" in markdown

    lines = done.stdout.rstrip().splitlines()
    header = lines.index("| check | measurement | value | unit | notes |")
    table = lines[header:]
    assert all(line.startswith("|") for line in table)  # nothing printed after the table
    # one line per row, and one per check that did not run ok
    assert len(table) == 2 + sum(len(c["rows"]) + (c["status"] != "ok") for c in report["checks"])
    assert all(any(f"| {name} |" in line for line in table) for name in CEILINGS)


def test_spent_budget_skips_every_check_and_says_so(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["checks"] and all(c["status"] == "skipped" for c in report["checks"])
    table_end = capsys.readouterr().out.splitlines()[-len(report["checks"]):]  # one line per check, last
    assert all(line.startswith(f"| {check['name']} | SKIPPED |") for line, check in zip(table_end, report["checks"]))


def test_a_check_that_does_not_fit_the_budget_left_is_skipped(gpu_check):
    from gpu_checks import Check, Context, Row

    def quick_check(ctx):
        return [Row("answer", 42.0, "units")]

    checks = [Check("fits", 1.0, quick_check), Check("too_long", 1e6, quick_check),
              Check("fits_too", 1.0, quick_check)]
    ctx = Context(device=torch.device("cpu"), quick=False)
    results = gpu_check.run_checks(checks, ctx, budget_s=60.0, log=lambda line: None)
    assert [r["status"] for r in results] == ["ok", "skipped", "ok"]
    assert "needs ~1000000 s" in results[1]["error"]
    assert results[0]["rows"] == [{"name": "answer", "value": 42.0, "unit": "units", "notes": ""}]


def test_a_failing_check_is_recorded_and_the_rest_still_run(gpu_check):
    from gpu_checks import Check, Context, load_checks

    def broken(ctx):
        raise RuntimeError("out of luck\nsecond line")

    def wrong_type(ctx):
        return [("name", 1.0, "unit", "")]

    checks = [Check("broken", 1.0, broken), Check("wrong_type", 1.0, wrong_type), *load_checks()]
    ctx = Context(device=torch.device("cpu"), quick=True)
    results = gpu_check.run_checks(checks, ctx, budget_s=60.0, log=lambda line: None)
    statuses = {r["name"]: r["status"] for r in results}
    assert statuses == {"broken": "failed", "wrong_type": "failed", **{c.name: "ok" for c in load_checks()}}
    assert results[0]["error"] == "RuntimeError: out of luck"
    assert "not Row" in results[1]["error"]
    table = gpu_check.table_lines(results)
    assert "| broken | FAILED | | | RuntimeError: out of luck |" in table


def test_registering_a_name_twice_is_an_error(gpu_check):
    from gpu_checks import gpu_check as register
    from gpu_checks import load_checks

    before = load_checks()
    with pytest.raises(ValueError, match="matmul_bf16"):
        register("matmul_bf16", est_seconds=1)(lambda ctx: [])
    assert load_checks() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_script_refuses_with_a_clear_message(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "no CUDA device" in error and "--device cpu --quick" in error
    assert not (tmp_path / "gpu_check.json").exists()


def test_cpu_without_quick_is_refused(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--quick" in capsys.readouterr().err
