"""The README's quick start is what CI runs, and the commands it shows exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quick_start_is_two_commands_demo_then_tests():
    demo, tests = quick_start_commands()
    assert demo.startswith("python3 -m venv") and demo.endswith("lift-fast demo --out demo")
    assert tests.startswith("python3 -m venv") and tests.endswith("&& pytest")
    for command in (demo, tests):
        # torch is installed before the project, so pip never picks a torch build by itself
        assert command.index("pip install torch==") < command.index("pip install -e")


def test_ci_runs_the_readme_test_command():
    _, tests = quick_start_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci_lines


def test_documented_cli_commands_exist():
    from lift_fast.cli import build_parser

    parser = build_parser()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in sorted(set(re.findall(r"^lift-fast (\w+)", text, flags=re.M))):
        assert command in parser._subparsers._group_actions[0].choices, command
