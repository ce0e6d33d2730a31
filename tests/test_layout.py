"""The package's layout: model families are looked up in the registry, never named outside
``imontage/models/``.

Every registered family's name is searched for in the code (not the comments or docstrings) of
every other module: as a string (``family == "wan"``), as an attribute (``cfg.hunyuan_video``)
or as an import of its folder (``imontage.models.wan``). Each hit is a place that would need an
edit when a family is added; the registry record is where such knowledge goes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

from imontage.models.registry import FAMILIES

# The cost model still holds each family's memory and communication terms itself; they move
# beside their families with it (issue: "give the cost model its own home").
NOT_YET = {"imontage/parallel/plan.py"}


def family_mentions(path: Path) -> list[str]:
    """``line: what`` for every place ``path``'s code names a registered family."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in FAMILIES and id(node) not in docstrings:
            found.append(f"{node.lineno}: the string {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in FAMILIES:
            found.append(f"{node.lineno}: the attribute .{node.attr}")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            modules = (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            for module in modules:
                parts = module.split(".")
                if parts[:2] == ["imontage", "models"] and len(parts) > 2 and parts[2] in FAMILIES:
                    found.append(f"{node.lineno}: an import of {module}")
    return found


def sources() -> list[Path]:
    """Every module of the package outside ``imontage/models/``, the kernels and the tools."""
    models = REPO / "imontage" / "models"
    package = [
        f
        for f in (REPO / "imontage").rglob("*.py")
        if models not in f.parents and f.is_relative_to(REPO / "imontage")
    ]
    return sorted({*package, *(REPO / "kernels").rglob("*.py"), *(REPO / "tools").glob("*.py")})


def test_no_module_outside_the_models_names_a_family() -> None:
    mentions = {
        str(path.relative_to(REPO)): family_mentions(path)
        for path in sources()
        if str(path.relative_to(REPO)) not in NOT_YET
    }
    assert {path: found for path, found in mentions.items() if found} == {}


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The check itself: each way of naming a family is found; docstrings and other names are not."""
    name = next(iter(FAMILIES))
    code = tmp_path / "example.py"
    code.write_text(
        f'"""Mentions {name} in prose, and "{name}" too."""\n'
        f"from imontage.models.{name}.model import X\n"
        f"def f(cfg):\n"
        f'    """{name}"""\n'
        f'    return cfg.family == "{name}" or cfg.{name}.x or "{name}_like"\n'
    )
    found = family_mentions(code)
    assert [line.split(":")[0] for line in found] == ["2", "5", "5"], found


@pytest.mark.parametrize("path", sorted(NOT_YET))
def test_the_exceptions_still_need_to_be_one(path: str) -> None:
    """An exception that no longer names a family comes off the list."""
    assert family_mentions(REPO / path), f"{path} names no family now: take it off NOT_YET"
