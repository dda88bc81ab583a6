#!/usr/bin/env python
"""Run every GPU measurement registered in bench/gpu_checks/ within a time budget.

    python bench/gpu_check.py                    # on a GPU machine; 480 s budget
    python bench/gpu_check.py --budget-s 120 --only matmul
    python bench/gpu_check.py --device cpu --quick --out /tmp/x   # smoke run with tiny shapes

Checks run in registration order: the proofs first (what the code does on the device: the GEMM
dtypes and host syncs of a train step, the losses'), then the two ceilings, then the timings. A check
whose estimated time does not
fit in what is left of the budget is skipped and reported as skipped; a check that raises is
reported as failed with its error, and the rest still run. Writes gpu_check.json and gpu_check.md
into --out and prints the table last. Exit status: 0, 1 if a check failed, 2 on a usage error
(e.g. no CUDA device without `--device cpu --quick`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # so `gpu_checks` imports however this script is started
    sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402
from gpu_checks import Check, Context, Row, load_checks  # noqa: E402
from machine import machine_info  # noqa: E402

DEFAULT_BUDGET_S = 480.0  # 8 of the 15 minutes a device session gets, leaving time to rerun
DEFAULT_OUT = BENCH_DIR / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"wall-clock budget for all checks, seconds (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for gpu_check.json and gpu_check.md (default bench/results/)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu is only for the smoke mode and needs --quick")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: tiny shapes, seconds in all; estimates are ignored and a "
                        "check starts while any budget is left")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only checks whose name contains SUBSTRING (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the registered checks and exit")
    return parser.parse_args(argv)


def run_checks(checks: list[Check], ctx: Context, budget_s: float,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run `checks` in order within `budget_s` seconds; never raises for a failing check.

    Returns one dict per check: name, status ("ok", "failed" or "skipped"), est_seconds, seconds
    (wall time, None when skipped), rows (list of Row as dicts), error (None unless failed or
    skipped) and, for failures, the traceback. The rows of each check that ran ok are also put in
    `ctx.results`, so later checks can read them (`ctx.earlier_value`).
    """
    start = time.monotonic()
    ctx.deadline = start + budget_s
    results = []
    for index, check in enumerate(checks, 1):
        left = ctx.seconds_left()
        result: dict[str, Any] = {"name": check.name, "status": "ok", "est_seconds": check.est_seconds,
                                  "seconds": None, "rows": [], "error": None}
        needed = 0.0 if ctx.quick else check.est_seconds
        if left <= 0 or needed > left:
            result["status"] = "skipped"
            result["error"] = ("budget spent" if left <= 0 else
                               f"needs ~{needed:.0f} s, {left:.0f} s of the budget left")
            log(f"[{index}/{len(checks)}] {check.name}: skipped ({result['error']})")
            results.append(result)
            continue
        log(f"[{index}/{len(checks)}] {check.name}: running (est. {check.est_seconds:.0f} s) ...")
        began = time.monotonic()
        try:
            rows = list(check.function(ctx))
            ctx.synchronize()
            for row in rows:
                if not isinstance(row, Row):
                    raise TypeError(f"check {check.name!r} returned {type(row).__name__}, not Row")
            result["rows"] = [row.__dict__ for row in rows]
            ctx.results[check.name] = rows  # later checks read their ceilings from here
        except Exception as error:  # one broken check must not cost the others their turn
            result["status"] = "failed"
            result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            result["traceback"] = traceback.format_exc()
        result["seconds"] = time.monotonic() - began
        _release_memory(ctx)
        log(f"[{index}/{len(checks)}] {check.name}: {result['status']} in {result['seconds']:.1f} s"
            + (f" ({result['error']})" if result["error"] else ""))
        results.append(result)
    return results


def _release_memory(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        try:
            torch.cuda.synchronize(ctx.device)
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error; the next check will report it
            pass


def environment(device: torch.device) -> dict[str, Any]:
    """Date, device name and properties, torch / CUDA / cuDNN / driver versions, commit."""
    return {"device": device.type, **machine_info(str(device))}


def table_lines(results: list[dict[str, Any]]) -> list[str]:
    """The results as a markdown table: one line per row, one per skipped or failed check."""
    lines = ["| check | measurement | value | unit | notes |", "| --- | --- | --- | --- | --- |"]
    for result in results:
        if result["status"] != "ok":
            lines.append(f"| {result['name']} | {result['status'].upper()} | | | "
                         f"{_cell(result['error'] or '')} |")
        for row in result["rows"]:
            lines.append(f"| {result['name']} | {_cell(row['name'])} | {_format_value(row['value'])} "
                         f"| {row['unit']} | {_cell(row['notes'])} |")
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _format_value(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    device = env["gpu"] or f"CPU ({env['cpu']})"
    if env.get("sm_count"):
        device += (f", {env['sm_count']} SMs, {env['gpu_memory_gib']} GiB, "
                   f"compute capability {env['compute_capability']}")
    counts = {status: sum(r["status"] == status for r in report["checks"])
              for status in ("ok", "skipped", "failed")}
    header = [
        "# GPU check",
        "",
        f"- date: {env['date']}",
        f"- device: {device}",
        f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env.get('cudnn')}, "
        f"driver {env.get('driver')}",
        f"- mode: {'quick smoke run (tiny shapes)' if report['quick'] else 'full'}; "
        f"budget {report['budget_s']:g} s, used {report['elapsed_s']:.1f} s",
        f"- checks: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed",
        "",
    ]
    return "\n".join(header + table_lines(report["checks"])) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checks = load_checks()
    if args.only:
        checks = [check for check in checks if any(part in check.name for part in args.only)]
    if args.list:
        for check in checks:
            print(f"{check.name:30s} est. {check.est_seconds:6.0f} s")
        return 0
    if args.device == "cpu" and not args.quick:
        print("gpu_check: --device cpu runs only as a smoke test; add --quick", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda}); this script measures a GPU. For a smoke run on the CPU use "
              "`python bench/gpu_check.py --device cpu --quick`.", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    ctx = Context(device=device, quick=args.quick)
    started = time.monotonic()
    results = run_checks(checks, ctx, args.budget_s)
    report = {
        "environment": environment(device),
        "quick": args.quick,
        "budget_s": args.budget_s,
        "elapsed_s": time.monotonic() - started,
        "checks": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "gpu_check.json", args.out / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    print()
    print("\n".join(table_lines(results)), flush=True)
    return 1 if any(result["status"] == "failed" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
