"""``dvc.yaml`` declares every module a stage can import, so a code change re-runs the stage.

Static: each stage's ``hap <command>`` is resolved to its CLI function, and every ``hap`` module that
function can import (transitively, lazy imports included: they run too) must lie under one of the
stage's ``deps``. The behaviour itself (a touched module makes ``dvc status`` report the stage) is
checked for real in ``tests/system/test_dvc_pipeline.py``.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

from hap.core.config import REPO_ROOT

CLI = REPO_ROOT / "hap" / "cli.py"


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _hap_imports(tree: ast.AST) -> set[str]:
    """Every ``hap`` module an import in ``tree`` names (``from hap.x import y`` may name module y)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hap":
            found.add(node.module)
            found.update(
                f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")
            )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "hap")
    return {m for m in found if _module_file(m)}


@cache
def _closure(module: str) -> frozenset[Path]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # parent packages' __init__ run too
        todo += list(_hap_imports(ast.parse(_module_file(current).read_text())))
    return frozenset(_module_file(m) for m in seen)


def _command_functions() -> dict[str, ast.FunctionDef]:
    """CLI command name -> its function node (typer's name, or the function's name with dashes)."""
    out = {}
    for node in ast.parse(CLI.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "command":
                name = deco.args[0].value if deco.args else node.name.replace("_", "-")
                out[name] = node
    return out


def _files_of_command(command: str) -> set[Path]:
    """Every file ``hap <command>`` can import: its function's imports and the CLI's top-level ones."""
    tree = ast.parse(CLI.read_text())
    top_level = ast.Module(body=[n for n in tree.body if isinstance(n, ast.ImportFrom)], type_ignores=[])
    files = {CLI}
    for module in _hap_imports(_command_functions()[command]) | _hap_imports(top_level):
        files |= _closure(module)
    return files


def _stages() -> list[tuple[str, list[str], list[str]]]:
    """(stage name, hap commands it runs, its dependency paths)."""
    raw = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in raw.items():
        body = stage.get("do", stage)
        cmds = body["cmd"] if isinstance(body["cmd"], list) else [body["cmd"]]
        commands = [c.split()[1] for c in cmds if c.split()[0] == "hap"]
        deps = [d for d in body.get("deps", []) if "${" not in d]
        out.append((name, commands, deps))
    return out


def _missing(commands: list[str], deps: list[str]) -> list[str]:
    declared = [REPO_ROOT / d for d in deps]
    return sorted(
        str(f.relative_to(REPO_ROOT))
        for command in commands
        for f in _files_of_command(command)
        if not any(f == d or d in f.parents for d in declared)
    )


@pytest.mark.parametrize("stage", [s[0] for s in _stages()])
def test_stage_declares_every_module_it_imports(stage: str) -> None:
    _, commands, deps = next(s for s in _stages() if s[0] == stage)
    assert commands, f"stage {stage} runs no hap command"
    missing = _missing(commands, deps)
    assert not missing, f"stage {stage} imports modules its deps miss: {missing}"


def test_a_stage_that_misses_a_module_is_caught() -> None:
    """The check can fail: train declared with its own package only misses config, schema, the split."""
    missing = _missing(["train"], ["hap/cli.py", "hap/model"])
    assert {"hap/core/config.py", "hap/core/schema.py", "hap/data/split.py"} <= set(missing)
