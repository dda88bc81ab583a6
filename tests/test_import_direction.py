"""Imports point down: the store sits below the data loader and the embed stage, the stages below the trainer.

    embed -> data (shards, captions), store       data -> store       store -> neither
    embed, models -> never train or eval (device switches: lift_fast/device.py)    eval -> never the train loop

Checked on the source (every import statement, inside functions too, relative ones resolved), so a
lazy import inside a function cannot slip an upward edge past the check, and in a fresh interpreter
(importing the store loads neither stage).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lift_fast"

# package folder -> the lift_fast packages its modules must never import
FORBIDDEN = {
    "data": ("lift_fast.embed", "lift_fast.train", "lift_fast.eval"),
    "store": ("lift_fast.embed", "lift_fast.data", "lift_fast.train", "lift_fast.eval", "lift_fast.models"),
    "embed": ("lift_fast.train", "lift_fast.eval"),
    "models": ("lift_fast.data", "lift_fast.train", "lift_fast.eval"),
    "eval": ("lift_fast.train.loop",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file at `path`, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from lift_fast import embed` imports the package lift_fast.embed
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names] + [(node.lineno, base)]
    return found


def upward_imports(folder: str) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_down(folder):
    assert (PACKAGE / folder / "__init__.py").is_file()
    assert upward_imports(folder) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The check itself can fail: a data module importing the embed stage, in each spelling, is reported.
    fake = tmp_path / "lift_fast"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "a.py").write_text("from lift_fast.embed.store import open_store\n")
    (fake / "data" / "b.py").write_text("def f():\n    from ..embed import load_store\n")
    (fake / "data" / "c.py").write_text("from lift_fast import embed\nimport lift_fast.store\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert [entry.split(" imports ")[1] for entry in upward_imports("data")] == [
        "lift_fast.embed.store.open_store", "lift_fast.embed.store", "lift_fast.embed.load_store", "lift_fast.embed",
        "lift_fast.embed"]


def test_importing_the_store_loads_neither_stage():
    code = ("import sys, lift_fast.store, lift_fast.data.loader\n"
            "print(sorted(m for m in sys.modules if m.startswith(('lift_fast.embed', 'lift_fast.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_old_store_paths_still_work():
    from lift_fast import embed, store

    assert embed.load_store is store.load_store and embed.open_store is store.open_store
    from lift_fast.embed.manifest import EMBED_SETTINGS, check_manifest
    from lift_fast.embed.store import StoreError, caption_hash, record_files

    assert check_manifest is store.check_manifest and EMBED_SETTINGS == store.EMBED_SETTINGS
    assert (StoreError, caption_hash, record_files) == (store.StoreError, store.caption_hash, store.record_files)
