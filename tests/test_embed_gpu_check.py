"""bench/gpu_checks/embed.py in the GPU check's smoke mode (tiny Qwen3 shape on the CPU): its rows, the
fp8 refusal off CUDA, and its FLOP count against torch's FlopCounterMode."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def gpu_check(monkeypatch):
    """The gpu_check script as a module (bench/ on sys.path, as when it runs as a script)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module("gpu_check")


def test_quick_run_reports_speed_ceiling_and_why_fp8_did_not_run(gpu_check, tmp_path):
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "embed", "--out", str(tmp_path)]) == 0
    checks = {check["name"]: check for check in json.loads((tmp_path / "gpu_check.json").read_text())["checks"]}
    assert list(checks) == ["embed_qwen3_0.6b", "embed_qwen3_8b"]
    for name, size in (("embed_qwen3_0.6b", "0.6B"), ("embed_qwen3_8b", "8B")):
        assert checks[name]["status"] == "ok", checks[name].get("traceback")
        rows = {row["name"]: row for row in checks[name]["rows"]}
        label = f"Qwen3-{size} shape fp32 cpu"
        for measurement, unit in (("captions/s", "captions/s"), ("tokens/s", "tokens/s"),
                                  ("model TFLOP/s", "TFLOP/s"), ("/ matmul_bf16", "x")):
            row = rows[f"{label} {measurement}"]
            assert row["unit"] == unit and row["value"] > 0
        assert rows[f"{label} tokens/s"]["value"] > rows[f"{label} captions/s"]["value"]
        assert "matmul_bf16" in rows[f"{label} / matmul_bf16"]["notes"]
        fp8 = rows[f"Qwen3-{size} shape fp8 cpu captions/s"]
        assert math.isnan(fp8["value"]) and "compute capability >= 8.9" in fp8["notes"]


def test_flop_count_is_linear_layers_plus_causal_attention(gpu_check):
    from gpu_checks import Context
    from gpu_checks.embed import QUICK_SHAPE, build_encoder, model_flops
    from torch.utils.flop_counter import FlopCounterMode

    encoder = build_encoder(Context(torch.device("cpu"), quick=True), QUICK_SHAPE, torch.float32, 8, 0)
    encoder.model.config._attn_implementation = "eager"  # attention as plain matmuls, which FlopCounterMode counts
    layers, width = QUICK_SHAPE["num_hidden_layers"], QUICK_SHAPE["num_attention_heads"] * QUICK_SHAPE["head_dim"]
    for length in (1, 13, 40):
        with FlopCounterMode(display=False) as counter:
            encoder.model(input_ids=torch.randint(3, 1000, (1, length)))
        # eager attention computes the whole length x length square; the causal half is the useful work
        assert model_flops(encoder.model, [length]) == counter.get_total_flops() - 2 * layers * length**2 * width
    assert model_flops(encoder.model, [13, 40]) == model_flops(encoder.model, [13]) + model_flops(encoder.model, [40])
