"""bench/gpu_checks/loss.py in the GPU check's smoke mode: its rows, its ceiling, its guards."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
LOSS_CHECKS = ("clip_loss_guard_fp32", "clip_loss_b32k_d4096", "clip_loss_sweep")
SIDES = ("lift_fast frozen text", "lift_fast text grads", "naive torch")


@pytest.fixture
def gpu_check(monkeypatch):
    """The gpu_check script as a module (bench/ on sys.path, as when it runs as a script)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("gpu_check")


@pytest.fixture
def quick_report(gpu_check, tmp_path):
    """The smoke run of the loss checks after the matmul ceiling (first, as on a GPU), as gpu_check.json
    holds it; the other modules' checks have their own tests."""
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "matmul", "--only", "loss",
                           "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "gpu_check.json").read_text())


def test_quick_run_reports_every_side_at_every_size(quick_report):
    from gpu_checks.loss import QUICK_SWEEP_SIZES, QUICK_TARGET_SIZE

    checks = {check["name"]: check for check in quick_report["checks"]}
    assert [name for name in checks if name.startswith("clip_loss")] == list(LOSS_CHECKS)
    # the dtype and host-sync contract runs before the loss timings
    names = list(checks)
    assert names.index("loss_dtypes_syncs") < names.index(LOSS_CHECKS[0])
    assert checks["loss_dtypes_syncs"]["status"] == "ok"
    (contract,) = checks["loss_dtypes_syncs"]["rows"]
    assert contract["value"] == 12 and "all bf16; 0 aten::_local_scalar_dense" in contract["notes"]
    assert all(checks[name]["status"] == "ok" for name in LOSS_CHECKS)

    (guard,) = checks["clip_loss_guard_fp32"]["rows"]
    assert guard["unit"] == "rel diff" and guard["value"] < 1e-4

    for name, sizes in (("clip_loss_b32k_d4096", [QUICK_TARGET_SIZE]), ("clip_loss_sweep", QUICK_SWEEP_SIZES)):
        rows = {row["name"]: row for row in checks[name]["rows"]}
        for batch, dim in sizes:
            size = f"B={batch} D={dim} fp32 cpu"
            for side in SIDES:
                assert rows[f"{side} {size}"]["unit"] == "TFLOP/s" and rows[f"{side} {size}"]["value"] > 0
                memory = rows[f"{side} {size} memory"]  # no allocator statistics on the CPU
                assert memory["unit"] == "x inputs+grads" and math.isnan(memory["value"])
            for side in SIDES[:2]:  # lift_fast against the ceiling measured first in the same run
                fraction = rows[f"{side} {size} / matmul_bf16"]
                assert fraction["value"] > 0 and "matmul_bf16 in this run" in fraction["notes"]
            assert rows[f"lift_fast speedup over naive torch {size}"]["unit"] == "x"
            assert "rel diff vs lift_fast" in rows[f"naive torch {size}"]["notes"]
            assert "6*B^2*D" in rows[f"lift_fast frozen text {size}"]["notes"]
            assert "8*B^2*D" in rows[f"lift_fast text grads {size}"]["notes"]
        inf_cl = rows["Inf-CL cal_inf_loss"]  # not installed here, or not run without CUDA
        assert math.isnan(inf_cl["value"]) and inf_cl["notes"]
    target = {row["name"]: row for row in checks["clip_loss_b32k_d4096"]["rows"]}
    assert "target >= 0.6" in target[f"lift_fast text grads B={QUICK_TARGET_SIZE[0]} D={QUICK_TARGET_SIZE[1]} "
                                      "fp32 cpu / matmul_bf16"]["notes"]


def test_guard_fails_the_check_when_the_loss_is_wrong(gpu_check, monkeypatch):
    from gpu_check import load_checks
    from gpu_checks import Context
    from gpu_checks.loss import clip_loss_guard_fp32

    import lift_fast.kernels

    right = lift_fast.kernels.clip_loss
    monkeypatch.setattr(lift_fast.kernels, "clip_loss", lambda *args: right(*args) * (1 + 1e-3))
    (guard,) = [check for check in load_checks() if check.function is clip_loss_guard_fp32]
    (result,) = gpu_check.run_checks([guard], Context(torch.device("cpu"), quick=True), 60.0, log=lambda line: None)
    assert result["status"] == "failed"
    assert "differs from the naive loss" in result["error"] and "loss 1.0e-03" in result["error"]


def test_a_baseline_out_of_memory_is_a_row_and_the_rest_still_run(gpu_check, monkeypatch):
    from gpu_checks import Context, loss

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(loss, "naive_clip_loss", out_of_memory)
    ctx = Context(torch.device("cpu"), quick=True)
    rows = {row.name: row for row in loss.measure_size(ctx, 64, 16, (1.0, "given"), inf_cl=None)}
    naive = rows["naive torch B=64 D=16 fp32 cpu"]
    assert math.isnan(naive.value) and naive.notes.startswith("OOM: OutOfMemoryError")
    assert rows["lift_fast text grads B=64 D=16 fp32 cpu"].value > 0
    assert not any(name.startswith("lift_fast speedup") for name in rows)


def test_ceiling_comes_from_the_earlier_check_or_is_measured_here(gpu_check):
    from gpu_checks import Check, Context, Row
    from gpu_checks.loss import matmul_ceiling

    ctx = Context(torch.device("cpu"), quick=True)
    value, source = matmul_ceiling(ctx)  # matmul_bf16 has not run in this context
    assert value > 0 and "measured inside this check" in source

    seen = []
    checks = [Check("matmul_bf16", 1.0, lambda ctx: [Row("matmul", 123.0, "TFLOP/s")]),
              Check("reader", 1.0, lambda ctx: seen.append(matmul_ceiling(ctx)) or [])]
    gpu_check.run_checks(checks, ctx, 60.0, log=lambda line: None)
    assert seen == [(123.0, "matmul_bf16 in this run")]
    assert ctx.earlier_value("matmul_bf16", "GB/s") is None and ctx.earlier_value("absent", "TFLOP/s") is None


@pytest.mark.parametrize("broken", ["host sync", "fp32 gemm"])
def test_contract_check_fails_on_a_host_sync_or_a_gemm_outside_bf16(gpu_check, monkeypatch, broken):
    from gpu_checks import Context
    from gpu_checks.loss import loss_dtypes_syncs

    import lift_fast.kernels

    right = lift_fast.kernels.clip_loss

    def with_sync(image, text, scale):
        loss = right(image, text, scale)
        return loss * (1 + 0 * float(loss.detach()))

    def with_fp32_gemm(image, text, scale):
        return right(image, text, scale) + 0 * (image.float() @ text.float().T).sum()

    monkeypatch.setattr(lift_fast.kernels, "clip_loss", with_sync if broken == "host sync" else with_fp32_gemm)
    with pytest.raises(AssertionError) as raised:
        loss_dtypes_syncs(Context(torch.device("cpu"), quick=True))
    message = str(raised.value)
    assert "clip_loss" in message and ("_local_scalar_dense" if broken == "host sync" else "not in bf16") in message
    assert "siglip_loss" not in message  # only the broken loss is named


def test_slab_sizing_check_times_the_budget_against_the_old_slabs(quick_report):
    """loss_slab_sizing in smoke mode: both losses under both sizings at the quick size, their time
    ratio, and a row saying why each peer (siglip-kernel, memeff) was not run here."""
    from gpu_checks.loss import QUICK_SLAB_SIZES, old_slab_bytes

    checks = {check["name"]: check for check in quick_report["checks"]}
    assert checks["loss_slab_sizing"]["status"] == "ok"
    rows = {row["name"]: row for row in checks["loss_slab_sizing"]["rows"]}
    ((batch, dim),) = QUICK_SLAB_SIZES
    size = f"B={batch} D={dim} fp32 cpu"
    for loss in ("clip", "siglip"):
        for sizing in ("budget", "old D/8"):
            row = rows[f"lift_fast {loss} {sizing} slabs {size}"]
            assert row["unit"] == "TFLOP/s" and row["value"] > 0 and "8*B^2*D" in row["notes"]
            assert rows[f"lift_fast {loss} {sizing} slabs {size} / matmul_bf16"]["value"] > 0
        assert rows[f"lift_fast {loss} budget over old slabs {size}"]["value"] > 0
    for peer in ("siglip-kernel", "memeff"):  # not installed here: a row with the reason
        assert math.isnan(rows[f"{peer} (peer)"]["value"]) and rows[f"{peer} (peer)"]["notes"]
    # e4d546b's rule: D/8 rows once N·D >= 8M (64 rows at D=512), 2^20 similarities below
    assert old_slab_bytes(32768, 512) // (32768 * 8) == 64 and old_slab_bytes(128, 32) == 2**20 * 8
