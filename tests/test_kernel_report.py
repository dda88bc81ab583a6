"""The kernel report (bench/kernel_report.py): every Triton kernel compiles ahead of time for sm_90a and
sm_100a with the installed triton, and with triton 3.6 (torch 2.11's) where it is installed beside it,
without a spill and within the slab kernels' goals (>= 16 resident warps per SM, 128-bit slab loads).

The report runs in a subprocess: conftest.py sets TRITON_INTERPRET=1, under which triton builds
interpreted kernels that cannot be compiled for a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "kernel_report.py"
TRITON36_ENV_VAR = "LIFT_FAST_TRITON36"  # a folder holding triton 3.6 (pip install --target)
TRITON36 = Path(os.environ.get(TRITON36_ENV_VAR, ROOT / ".venv" / "triton36"))

pytest.importorskip("triton")


def load_report_module():
    spec = importlib.util.spec_from_file_location("kernel_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_report(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPORT), "--check", "--json", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"kernel report failed:\n{done.stderr[-4000:]}"
    payload = json.loads(out.read_text())
    return payload if isinstance(payload, list) else [payload]


def check_complete(result: dict) -> None:
    """Every launch of the dispatch on both targets, each compiled and within the goals."""
    rows = result["rows"]
    configs = {(row["kernel"], row["config"]) for row in rows}
    assert ("_siglip_kernel", "WITH_GRAD=False") in configs
    for dtype in ("fp32", "bf16", "fp16"):
        assert ("_clip_grad_kernel", f"grad {dtype}") in configs
        assert ("_siglip_kernel", f"WITH_GRAD=True grad {dtype}") in configs
    assert ("_clip_stats_kernel", "stats") in configs and ("_clip_rows_kernel", "row merge") in configs
    assert {config + ", odd sizes" for _, config in configs if "odd" not in config} <= {c for _, c in configs}
    assert {row["target"] for row in rows} == {"sm_90a", "sm_100a"}
    assert len(configs) == 18 and len(rows) == 2 * len(configs)
    report = load_report_module()
    assert report.goal_failures(result) == []
    for row in rows:  # what goal_failures checks, asserted here too so that the check itself is tested
        assert row["spill_stores"] == row["spill_loads"] == 0, row
        assert row["regs"] <= 128 and row["warps_per_sm"] >= 16, row
        assert row["mix"]["total"] > 0 and row["mix"]["ldg"] > 0, row
        if row["sizes"] == "aligned" and row["slab_loads_needed"]:  # the whole float32 tile in 128-bit loads
            assert row["widest_load"] == 128 and row["vector_loads"] >= row["slab_loads_needed"] > 0, row


@pytest.mark.slow  # 72 compiles: about 30 s of CPU
def test_installed_triton_compiles_every_kernel_within_the_goals(tmp_path):
    check_complete(run_report(tmp_path)[0])


@pytest.mark.slow
@pytest.mark.skipif(not (TRITON36 / "triton" / "__init__.py").is_file(),
                    reason=f"triton 3.6 is not installed in {TRITON36} (pip install --no-deps --target "
                           f"{TRITON36} triton==3.6.0, or set {TRITON36_ENV_VAR})")
def test_triton_36_compiles_every_kernel_within_the_goals(tmp_path):
    (result,) = run_report(tmp_path, "--triton", str(TRITON36))
    assert result["triton"].startswith("3.6")
    check_complete(result)


def test_goal_check_catches_spills_low_occupancy_narrow_loads_and_errors():
    report = load_report_module()
    good = dict(kernel="_k", config="c", target="sm_90a", sizes="aligned", regs=64, spill_stores=0, spill_loads=0,
                stack=0, shared=1040, num_warps=4, warps_per_sm=32, widest_load=128, widest_store=128,
                vector_loads=4, slab_loads_needed=4, mix={})
    odd = dict(good, sizes="odd", widest_load=32, vector_loads=0)  # no vector width is promised there
    bad = [dict(good, spill_stores=4), dict(good, regs=168, warps_per_sm=12),
           dict(good, widest_load=32, vector_loads=0), dict(good, vector_loads=2),
           dict(kernel="_k", config="c", target="sm_100a", error="CompilationError: x")]
    assert report.goal_failures(dict(triton="3.8.0", rows=[good, odd])) == []
    failures = report.goal_failures(dict(triton="3.8.0", rows=bad))
    assert len(failures) == 5
    assert "spills" in failures[0] and "12 warps" in failures[1] and "widest 32 bits" in failures[2]
    assert "2 128-bit global loads" in failures[3] and "does not compile" in failures[4]


@pytest.mark.parametrize("regs,num_warps,expected", [
    (128, 4, 16),  # the goal's edge: 4096 registers a warp, 16 warps
    (166, 4, 12),  # 64x64 tile's _siglip_kernel: 168 allocated, 12 warps
    (255, 4, 8),
    (32, 4, 64),  # capped by 64 warps per SM
    (80, 4, 24),
])
def test_resident_warps_by_registers(regs, num_warps, expected):
    assert load_report_module().resident_warps(regs, num_warps) == expected


def test_report_configurations_are_the_launches_the_losses_make(monkeypatch):
    """slab_ops.kernel_launches() (what the report compiles) against the launches clip_loss and
    siglip_loss really make, forward and backward, in fp32, bf16 and fp16: the same set."""
    import torch

    from lift_fast.kernels import KERNELS_ENV_VAR, clip_loss, siglip_loss, slab_ops

    triton_names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    listed = {(launch["name"], tuple(sorted(launch["constexprs"].items())), launch["num_warps"],
               launch["signature"].get("grad_ptr") if launch["constexprs"].get("WITH_GRAD", True) else None)
              for launch in slab_ops.kernel_launches()}
    made = set()

    class Recorder:  # stands in for a kernel: records the launch instead of running it
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, num_warps, **constexprs):
                names = self.kernel.arg_names
                grad = args[names.index("grad_ptr")] if "grad_ptr" in names else None
                grad_type = None if grad is None or not constexprs.get("WITH_GRAD", True) else next(
                    name for name, dtype in triton_names.items() if dtype == grad.dtype)
                made.add((self.kernel.__name__, tuple(sorted(constexprs.items())), num_warps,
                          f"*{grad_type}" if grad_type else None))
            return launch

    for name in ("_clip_stats_kernel", "_clip_rows_kernel", "_clip_grad_kernel", "_siglip_kernel"):
        monkeypatch.setattr(slab_ops, name, Recorder(getattr(slab_ops, name)))
    monkeypatch.setenv(KERNELS_ENV_VAR, "triton")
    for dtype in triton_names.values():
        image = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).to(dtype).requires_grad_()
        text = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).to(dtype).requires_grad_()
        for loss in (clip_loss(image, text, 10.0), siglip_loss(image, text, 10.0, -1.0)):
            loss.backward()  # the recorded launches leave garbage outputs; only their configurations count
    assert made == listed
