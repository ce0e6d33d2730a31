"""The package's layout (docs/layout.md): its import contracts hold, and model families are looked up
in the registry, never named outside ``imontage/models/``.

Every registered family's name is searched for in the code (not the comments or docstrings) of
every other module: as a string (``family == "wan"``), as an attribute (``cfg.hunyuan_video``)
or as an import of its folder (``imontage.models.wan``); so are the diffusers classes its record
names, its transformer's and its VAEs' (``class_name == "AutoencoderKLWan"``). Each hit is a place
that would need an edit when a family is added; the registry record is where such knowledge goes.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from imontage.models.registry import FAMILIES

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# The diffusers classes the families' records name: their transformers' and their VAEs'.
FAMILY_CLASSES = {
    name
    for record in FAMILIES.values()
    for name in (*record.diffusers_classes, *(v.class_name for v in record.vaes))
}


def broken_contracts(config: Path, cwd: Path) -> tuple[list[str], str]:
    """The names of the contracts of ``config`` that the code under ``cwd`` breaks, and the report."""
    run = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(config)], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    report = run.stdout + run.stderr
    # The summary lists each contract as "<name> KEPT" or "<name> BROKEN", a long name wrapped.
    summary = report.split("dependencies.", 1)[-1].split("Contracts:", 1)[0]
    verdicts = re.findall(r"(\S.*?) (KEPT|BROKEN)", " ".join(summary.replace("-", " ").split()))
    assert verdicts and run.returncode == (1 if any(v == "BROKEN" for _, v in verdicts) else 0), report
    return [name for name, verdict in verdicts if verdict == "BROKEN"], report


def test_the_import_contracts_hold() -> None:
    """The layer order, the families apart and no cycles (.importlinter), as ``make lint`` checks them."""
    broken, report = broken_contracts(REPO / ".importlinter", REPO)
    assert broken == [], f"broken import contracts: {broken}\n{report}"


def test_a_broken_contract_is_named(tmp_path: Path) -> None:
    """The check itself: an import from a lower layer up breaks the layers contract, which is named."""
    package = tmp_path / "house"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "roof.py").write_text("")
    (package / "ground.py").write_text("import house.roof\n")
    config = tmp_path / "contracts.ini"
    config.write_text(
        "[importlinter]\nroot_packages =\n    house\n\n[importlinter:contract:layers]\n"
        "name = The roof above the ground\ntype = layers\nlayers =\n    house.roof\n    house.ground\n"
    )
    broken, _ = broken_contracts(config, tmp_path)
    assert broken == ["The roof above the ground"]


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
        elif isinstance(node, ast.Constant) and node.value in FAMILY_CLASSES and id(node) not in docstrings:
            found.append(f"{node.lineno}: the family's diffusers class {node.value!r}")
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
    mentions = {str(path.relative_to(REPO)): family_mentions(path) for path in sources()}
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
        f'vae_is_theirs = vae.class_name == "{sorted(FAMILY_CLASSES)[0]}"\n'
    )
    found = family_mentions(code)
    assert sorted(line.split(":")[0] for line in found) == ["2", "5", "5", "6"], found
