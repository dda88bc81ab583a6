"""The throughput suite: paired benchmarks, each timed beside its baseline in the same run.

`pytest --benchmark` runs the items in this folder with pytest-benchmark and deselects every item
outside it; plain `pytest` collects them and reports them as skipped, so the test run stays fast.

A pair is two parametrisations of one benchmark function: `side="baseline"` and one or more
candidate sides (e.g. `"lift_fast"`). Each side calls the `paired_benchmark` fixture with the
pair's name, which becomes the pytest-benchmark group. At session end every candidate's speedup,
baseline mean time / candidate mean time, is printed after pytest-benchmark's table and saved
into pytest-benchmark's JSON (key "pairs") and into bench/results/latest.json. Numeric metrics
recorded with `paired_benchmark.record(...)` get a ratio too (baseline / candidate, so above 1
means the candidate does better when lower is better). See bench/README.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from machine import machine_info

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
BASELINE = "baseline"
# pytest-benchmark's JSON (all timings) when --benchmark is given without --benchmark-json.
DEFAULT_BENCHMARK_JSON = RESULTS_DIR / "pytest-benchmark.json"

_RECORDS = pytest.StashKey[list]()
_RESULTS_PATH = pytest.StashKey[Path]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="Run the throughput suite in bench/ (and only it); without this flag its items are "
        "skipped. Ratios to baselines go to bench/results/latest.json.",
    )


def _in_bench(item: pytest.Item) -> bool:
    return BENCH_DIR in Path(item.path).resolve().parents


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDS] = []
    if config.getoption("benchmark", False) and not config.getoption("benchmark_json", None):
        # Runs before pytest-benchmark's own pytest_configure (trylast), which reads this option.
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = DEFAULT_BENCHMARK_JSON


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("benchmark", False):
        # Only the throughput suite: tests are deselected, not skipped, so the summary stays short.
        deselected = [item for item in items if not _in_bench(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if _in_bench(item)]
        return
    skip = pytest.mark.skip(reason="throughput suite: run it with `pytest --benchmark`")
    for item in items:
        if _in_bench(item):
            item.add_marker(skip)


class PairedBenchmark:
    """Times one side of a pair with pytest-benchmark's `benchmark` fixture.

    Call it once per test: `paired_benchmark(pair, function, *args, rounds=..., ...)`; then
    optionally `paired_benchmark.record(name=value, ...)` for extra numeric metrics (peak memory,
    bytes saved for backward ...), which are compared baseline / candidate like the times.
    """

    def __init__(self, benchmark: Any, side: str, records: list) -> None:
        self.benchmark = benchmark
        self.side = side
        self._records = records

    def __call__(
        self,
        pair: str,
        function: Callable,
        *args: Any,
        rounds: int = 10,
        iterations: int = 1,
        warmup_rounds: int = 1,
        setup: Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        """Time `function(*args, **kwargs)` as this side of `pair` (the pytest-benchmark group).

        Uses `benchmark.pedantic`, so rounds and iterations are fixed (keep a pair to a few
        seconds). Returns what the last call of `function` returned.
        """
        self.benchmark.group = pair
        self.benchmark.extra_info["pair"] = pair
        self.benchmark.extra_info["side"] = self.side
        result = self.benchmark.pedantic(
            function,
            args=args,
            kwargs=kwargs,
            setup=setup,
            rounds=rounds,
            iterations=iterations,
            warmup_rounds=warmup_rounds,
        )
        if self.benchmark.stats is not None:  # None when pytest-benchmark is disabled
            self._records.append(self.benchmark.stats)
        return result

    def record(self, **metrics: float) -> None:
        """Store extra numeric metrics in extra_info; each gets a baseline / candidate ratio."""
        for name, value in metrics.items():
            if name in ("pair", "side"):
                raise ValueError(f"paired_benchmark.record: {name!r} is reserved")
            self.benchmark.extra_info[name] = value


@pytest.fixture
def paired_benchmark(benchmark: Any, request: pytest.FixtureRequest) -> PairedBenchmark:
    """One side of a baseline/candidate pair; the test must be parametrised over `side`."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or "side" not in callspec.params:
        raise pytest.UsageError(
            f"{request.node.nodeid}: paired_benchmark needs "
            f'@pytest.mark.parametrize("side", ["{BASELINE}", "<candidate>"])'
        )
    return PairedBenchmark(benchmark, str(callspec.params["side"]), request.config.stash[_RECORDS])


def summarise_pairs(records: list) -> dict[str, dict[str, Any]]:
    """Ratios per pair from pytest-benchmark `Metadata` objects (or anything with `.group`,
    `.extra_info` and `.stats.mean`).

    Returns {key: {"baseline", "candidate", "baseline_s", "candidate_s", "ratio" (of the means),
    "baseline_min_s", "candidate_min_s", "ratio_min", "rounds", "<metric>_baseline",
    "<metric>_candidate", "<metric>_ratio" ...}} where key is the pair's
    name, or "pair [candidate]" when a pair has more than one candidate. A pair missing its
    baseline or candidate gets ratio None and a "missing" field.
    """
    sides: dict[str, dict[str, Any]] = {}
    for record in records:
        if not record or "side" not in record.extra_info:
            continue
        sides.setdefault(record.extra_info["pair"], {})[record.extra_info["side"]] = record

    summary: dict[str, dict[str, Any]] = {}
    for pair, by_side in sides.items():
        baseline = by_side.get(BASELINE)
        candidates = [side for side in by_side if side != BASELINE]
        if not candidates:
            summary[pair] = {"baseline": BASELINE, "candidate": None, "ratio": None,
                             "baseline_s": baseline.stats.mean, "missing": "candidate"}
            continue
        for side in candidates:
            key = pair if len(candidates) == 1 else f"{pair} [{side}]"
            summary[key] = _compare(baseline, by_side[side], side)
    return summary


def _compare(baseline: Any, candidate: Any, side: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"baseline": BASELINE, "candidate": side}
    if baseline is None:
        entry.update(baseline_s=None, candidate_s=candidate.stats.mean, ratio=None,
                     missing="baseline")
        return entry
    entry["baseline_s"] = baseline.stats.mean
    entry["candidate_s"] = candidate.stats.mean
    entry["ratio"] = _ratio(baseline.stats.mean, candidate.stats.mean)
    # Best-round times too: on a shared machine the minimum is the steadier of the two.
    entry["baseline_min_s"] = baseline.stats.min
    entry["candidate_min_s"] = candidate.stats.min
    entry["ratio_min"] = _ratio(baseline.stats.min, candidate.stats.min)
    entry["rounds"] = min(baseline.stats.rounds, candidate.stats.rounds)
    extra = {k: v for k, v in candidate.extra_info.items() if k not in ("pair", "side")}
    for name, value in extra.items():
        base_value = baseline.extra_info.get(name)
        entry[f"{name}_baseline"] = base_value
        entry[f"{name}_candidate"] = value
        if _is_number(base_value) and _is_number(value):
            entry[f"{name}_ratio"] = _ratio(base_value, value)
    return entry


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ratio(baseline: float, candidate: float) -> float | None:
    return baseline / candidate if candidate else None


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    output_json["pairs"] = summarise_pairs(benchmarks)


def pytest_sessionfinish(session: pytest.Session) -> None:
    summary = summarise_pairs(session.config.stash.get(_RECORDS, []))
    if not summary:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "latest.json"
    path.write_text(json.dumps({"machine": machine_info(), "pairs": summary}, indent=2) + "\n")
    session.config.stash[_RESULTS_PATH] = path



@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    summary = summarise_pairs(config.stash.get(_RECORDS, []))
    if not summary:
        return
    terminalreporter.section("paired benchmarks: ratio = baseline / candidate (higher is better)",
                             sep="-")
    for line in format_pairs(summary):
        terminalreporter.write_line(line)
    if _RESULTS_PATH in config.stash:
        terminalreporter.write_line(f"saved: {config.stash[_RESULTS_PATH]}")


def format_pairs(summary: dict[str, dict[str, Any]]) -> list[str]:
    """A plain-text table: pair, candidate, mean times of both sides, speedups, other ratios."""
    rows = [("pair", "candidate", "baseline", "candidate", "speedup", "speedup (min)",
             "other ratios")]
    for key, entry in summary.items():
        others = ", ".join(f"{name[:-6]} {value:.2f}x" for name, value in entry.items()
                           if name.endswith("_ratio") and value is not None)
        rows.append((
            key,
            str(entry.get("candidate")),
            _format_seconds(entry.get("baseline_s")),
            _format_seconds(entry.get("candidate_s")),
            f"{entry['ratio']:.2f}x" if entry.get("ratio") else f"missing {entry.get('missing')}",
            f"{entry['ratio_min']:.2f}x" if entry.get("ratio_min") else "-",
            others,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"
