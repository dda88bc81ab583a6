"""Kernel report: every @triton.jit kernel of lift_fast.kernels compiled ahead of time for Hopper
(sm_90a) and Blackwell (sm_100a), without a GPU, and read back from the compiler.

For each configuration the host code can launch (slab_ops.kernel_launches(): every constexpr and
grad dtype, the tile and num_warps the dispatch uses, with the 16-byte aligned pointers and
16-divisible sizes a real launch is specialised on), triton.compile gives PTX and a cubin; then
  ptxas -v (ptxas-blackwell for sm_100a)   registers, spill stores/loads, stack
  cuobjdump -res-usage                     registers and shared memory of triton's own cubin
  cuobjdump -sass                          global load/store widths and the instruction mix
and one table: kernel, config, target, registers, spills, shared memory, resident warps per SM by
registers (65536 registers per SM, allocated per warp in units of 256, at most 64 warps), the widest
global load and store, instruction counts.

    python bench/kernel_report.py                          # the installed triton
    python bench/kernel_report.py --triton installed --triton .venv/triton36 --write-docs
    python bench/kernel_report.py --check                  # exit 1 on a spill or a missed goal

Another triton (`--triton DIR`, a `pip install --target DIR triton==X` folder) is run in a
subprocess with DIR first on PYTHONPATH, so it never replaces the installed one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
MARK_START, MARK_END = "<!-- kernel-report:start -->", "<!-- kernel-report:end -->"
TARGETS = {"sm_90a": 90, "sm_100a": 100}
DOCS_DATE = "2026-12-08"

# Occupancy arithmetic of sm_90 and sm_100 (CUDA occupancy calculator): registers are allocated per
# warp in units of 256, 64 Ki per SM, at most 64 warps and 32 blocks per SM, 228 KiB of shared
# memory per SM with 1 KiB reserved per block.
REGISTERS_PER_SM, REGISTER_UNIT, MAX_WARPS, MAX_BLOCKS = 65536, 256, 64, 32
SHARED_PER_SM, SHARED_RESERVED = 228 * 1024, 1024

# Goals for the memory-bound slab kernels (issue 10): no spills, >= 16 resident warps per SM by
# registers (<= 128 registers per thread at 4 warps), 128-bit loads of the float32 slab.
MIN_WARPS_PER_SM = 16
SLAB_LOAD_BITS = 128

MIX = {  # instruction classes of the summary, by SASS opcode prefix
    "ldg": ("LDG",), "stg": ("STG",), "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK"),
    "mufu": ("MUFU",), "shfl": ("SHFL",), "shared": ("LDS", "STS"), "bar": ("BAR",),
    "int": ("IMAD", "IADD", "ISETP", "LOP3", "SHF", "LEA", "SEL", "IABS", "VIADD", "IMNMX"),
    "cvt": ("F2F", "F2I", "I2F", "F2FP"),
}


# ----------------------------------------------------------------------------------------- compile


def compile_launch(triton, launch: dict, arch: int):
    """triton.compile one kernel configuration for sm_{arch}a; returns the CompiledKernel.

    Triton 3.6 and 3.8 (both run by the tests) take ASTSource(fn, signature, constexprs, attrs)
    with signature {name: "*fp32" | "i32" | "constexpr"}, constexprs {name: value} and attrs
    {(index,): [["tt.divisibility", 16]]}; triton before 3.3 (an AttrsDescriptor) is refused with
    a clear error.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 3):
        raise RuntimeError(f"triton {triton.__version__}: its ASTSource takes an AttrsDescriptor; the report needs >= 3.3")
    kernel = launch["kernel"]
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in launch["aligned"]}
    source = ASTSource(kernel, launch["signature"], launch["constexprs"], attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch["num_warps"]})


def _tool(triton, name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout + done.stderr


def _access_bits(opcode: str) -> int:
    """Width of a LDG/STG from its SASS modifiers: .128/.64, .U8/.S16 ..., else 32 bits."""
    for part in opcode.split(".")[1:]:
        if part in ("128", "64"):
            return int(part)
        match = re.fullmatch(r"[US](8|16)", part)
        if match:
            return int(match.group(1))
    return 32


def inspect_compiled(triton, compiled, arch: int, workdir: Path) -> dict:
    """Registers, spills, shared memory, access widths and instruction mix of one compiled kernel."""
    name = compiled.metadata.name
    ptx, cubin = workdir / f"{name}.ptx", workdir / f"{name}.cubin"
    ptx.write_text(compiled.asm["ptx"])
    cubin.write_bytes(compiled.asm["cubin"])
    ptxas = _tool(triton, "ptxas-blackwell" if arch >= 100 else "ptxas")
    verbose = _run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(workdir / "ptxas.cubin")])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    stack = re.search(r"(\d+) bytes stack frame", verbose)
    cuobjdump = _tool(triton, "cuobjdump")
    usage = _run([cuobjdump, "-res-usage", str(cubin)])
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    opcodes = []
    for line in _run([cuobjdump, "-sass", str(cubin)]).splitlines():
        match = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if match:
            opcodes.append(match.group(1))
    mix = {key: sum(op.split(".")[0].startswith(prefixes) for op in opcodes) for key, prefixes in MIX.items()}
    mix["total"] = len(opcodes)
    loads = [_access_bits(op) for op in opcodes if op.startswith("LDG")]
    vector_loads = loads.count(128)
    stores = [_access_bits(op) for op in opcodes if op.startswith("STG")]
    num_warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared + static_shared
    return dict(regs=regs, spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                stack=int(stack.group(1)), shared=shared, num_warps=num_warps,
                warps_per_sm=resident_warps(regs, num_warps, shared),
                widest_load=max(loads, default=0), widest_store=max(stores, default=0),
                vector_loads=vector_loads, mix=mix)


def resident_warps(regs: int, num_warps: int, shared: int = 0) -> int:
    """Warps per SM that fit by registers (and shared memory), whole blocks of `num_warps`."""
    per_warp = -(-regs * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(REGISTERS_PER_SM // per_warp // num_warps, MAX_BLOCKS, MAX_WARPS // num_warps)
    if shared:
        blocks = min(blocks, SHARED_PER_SM // (shared + SHARED_RESERVED))
    return blocks * num_warps


def report(targets: dict[str, int] = TARGETS) -> dict:
    """Compile and inspect every kernel launch of lift_fast.kernels with the triton importable now.

    Returns:
        {"triton": version, "rows": [one dict per (launch, target)]}; a row whose compile or
        inspection failed has "error" set instead of the figures.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the kernel report compiles for a GPU: unset TRITON_INTERPRET before importing triton")
    import triton

    from lift_fast.kernels import slab_ops

    rows = []
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        for launch in slab_ops.kernel_launches():
            for target, arch in targets.items():
                row = dict(kernel=launch["name"], config=launch["config"], target=target, sizes=launch["sizes"])
                # 128-bit loads that read the whole float32 tile: 4 floats each, per thread (the row merge
                # reads no slab tile: only the stats kernel's partials, N / 64 a row, and one positive a row)
                tile = launch["constexprs"]["BLOCK_M"] * launch["constexprs"].get("BLOCK_N", 0)
                row["slab_loads_needed"] = tile // (32 * launch["num_warps"] * 4)
                try:
                    row.update(inspect_compiled(triton, compile_launch(triton, launch, arch), arch, Path(tmp)))
                except Exception as error:  # one broken configuration is a row of the report, not its end
                    row["error"] = f"{type(error).__name__}: {str(error).strip()[-1500:]}"
                rows.append(row)
    return dict(triton=triton.__version__, rows=rows)


def report_with(triton_dir: str | None, targets: dict[str, int] = TARGETS) -> dict:
    """`report()` with the installed triton (None) or, in a subprocess, the one installed in `triton_dir`.

    Raises:
        FileNotFoundError: triton_dir holds no triton package.
        RuntimeError: the subprocess failed (its stderr is in the message).
    """
    if triton_dir is None:
        return report(targets)
    folder = Path(triton_dir).resolve()
    if not (folder / "triton" / "__init__.py").is_file():
        raise FileNotFoundError(f"--triton {triton_dir}: no triton package in {folder} "
                                f"(pip install --no-deps --target {triton_dir} triton==3.6.0)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--json", str(out),
                   *(arg for target in targets for arg in ("--target", target))]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"kernel report with triton from {folder} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-3000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------- the table


def goal_failures(result: dict) -> list[str]:
    """What breaks the goals: compile errors, spills, < 16 warps per SM by registers, and (at aligned
    sizes) a float32 slab tile not read by 128-bit loads (every kernel here reads a float32 slab)."""
    failures = []
    for row in result["rows"]:
        where = f"triton {result['triton']} {row['kernel']} [{row['config']}] {row['target']}"
        if "error" in row:
            failures.append(f"{where}: does not compile: {row['error']}")
            continue
        if row["spill_stores"] or row["spill_loads"] or row["stack"]:
            failures.append(f"{where}: spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads, "
                            f"{row['stack']} B stack)")
        if row["warps_per_sm"] < MIN_WARPS_PER_SM:
            failures.append(f"{where}: {row['warps_per_sm']} warps per SM ({row['regs']} registers), "
                            f"goal >= {MIN_WARPS_PER_SM}")
        # at odd sizes rows are not 16-byte aligned, so no vector width can be promised there
        if row["sizes"] == "aligned" and row["vector_loads"] < row["slab_loads_needed"]:
            failures.append(f"{where}: {row['vector_loads']} {SLAB_LOAD_BITS}-bit global loads (widest "
                            f"{row['widest_load']} bits), goal >= {row['slab_loads_needed']}: the whole float32 "
                            f"tile in {SLAB_LOAD_BITS}-bit loads")
    return failures


def format_table(results: list[dict]) -> str:
    """One markdown table of every result (one per triton version)."""
    lines = ["| triton | kernel | config | target | regs | spills (st/ld B) | smem B | warps/SM | "
             "widest LDG/STG | LDG.128 | SASS total | LDG | STG | FP32 | MUFU | SHFL | INT |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for result in results:
        for row in result["rows"]:
            head = f"| {result['triton']} | `{row['kernel']}` | {row['config']} | {row['target']} |"
            if "error" in row:
                lines.append(f"{head} compile error: {row['error'].splitlines()[0][:120]} |" + " |" * 12)
                continue
            mix = row["mix"]
            cells = [row["regs"], f"{row['spill_stores']}/{row['spill_loads']}", row["shared"], row["warps_per_sm"],
                     f"{row['widest_load']}/{row['widest_store']}", row["vector_loads"],
                     *(mix[key] for key in ("total", "ldg", "stg", "fp32", "mufu", "shfl", "int"))]
            lines.append(f"{head} " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def write_docs(results: list[dict], command: str, path: Path = DOCS) -> None:
    """Replace the kernel-report section of docs/performance.md (between its markers) with the table.

    Raises:
        ValueError: the file lacks the markers.
    """
    text = path.read_text(encoding="utf-8")
    if MARK_START not in text or MARK_END not in text:
        raise ValueError(f"{path}: no {MARK_START} ... {MARK_END} section to write the kernel report into")
    versions = ", ".join(result["triton"] for result in results)
    section = "\n".join([
        MARK_START,
        f"Compiled on a CPU-only machine (2 EPYC cores); not run on a GPU. {DOCS_DATE}, triton {versions}, "
        f"`{command}`. Goals for these memory-bound kernels: no spills, >= {MIN_WARPS_PER_SM} resident "
        f"warps per SM by registers, {SLAB_LOAD_BITS}-bit loads of the float32 slab. warps/SM: by registers "
        "(65536 per SM, 256-register units per warp) and shared memory, whole blocks, at most 64; widest "
        "LDG/STG in bits from `cuobjdump -sass`; LDG.128: 128-bit global loads per thread (the float32 tile "
        "takes tile / (threads x 4) of them: 4 for 32x64, 2 for 16x64, at 4 warps); FP32/MUFU/SHFL/INT: "
        "instruction counts of the SASS. \"odd sizes\": nothing specialised as 16-divisible.",
        "",
        format_table(results),
        MARK_END,
    ])
    start, end = text.index(MARK_START), text.index(MARK_END) + len(MARK_END)
    path.write_text(text[:start] + section + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="append", metavar="DIR",
                        help="'installed' (default) or a folder holding another triton; repeatable")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: both")
    parser.add_argument("--check", action="store_true", help="exit 1 on a compile error, a spill or a missed goal")
    parser.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.relative_to(ROOT)}")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    targets = {name: TARGETS[name] for name in (args.target or TARGETS)}
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret
    results = [report_with(None if source == "installed" else source, targets)
               for source in (args.triton or ["installed"])]
    if args.json:
        payload = results[0] if len(results) == 1 else results
        Path(args.json).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(format_table(results))
    failures = [failure for result in results for failure in goal_failures(result)]
    for failure in failures:
        print("GOAL MISSED:", failure, file=sys.stderr)
    if args.write_docs:
        shown = ["python bench/kernel_report.py", *(f"--triton {t}" for t in args.triton or []), "--write-docs"]
        write_docs(results, " ".join(shown))
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
