"""List the torch names the code uses that an older torch does not define (the supported range starts at 2.11).

    python tools/torch_api_check.py OLD_TORCH_DIR [--new NEW_TORCH_DIR] [paths ...]

OLD_TORCH_DIR is the ``torch/`` folder of an unpacked wheel (only its ``.py``/``.pyi`` files are read, so a
CUDA wheel unpacked on a CPU machine will do: ``unzip -q torch-2.11.0-*.whl 'torch/*.py' 'torch/*.pyi'``).
NEW_TORCH_DIR defaults to the installed torch. Every dotted name rooted at ``torch`` in the code
(``torch.nn.functional.rms_norm``, ``F.rms_norm`` after ``import torch.nn.functional as F``, ``from
torch.library import custom_op``) is looked up in each tree: the longest prefix that is a module file,
then the next name, which must be defined or re-exported there (or, for ``torch`` and ``torch.nn.functional``,
in the ``torch/_C`` stubs of the built-in functions). A name found in NEW but not in OLD is printed with
where it is used; the exit status is 1 when there is one.

What it cannot see: methods of tensors and other objects (``x.foo()``), keyword arguments added to an
existing function, and behaviour changes. A use guarded by a ``hasattr``/``getattr`` fallback is listed
too: judge it by reading the line.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = ("imontage", "kernels", "megatron_patches", "tools", "tests")
# Built-in functions live in compiled modules; their stubs say what each version exports.
BUILTIN_STUBS = {
    "torch": ("_C/__init__.pyi", "_C/_VariableFunctions.pyi"),
    "torch.nn.functional": ("_C/_nn.pyi", "_C/_VariableFunctions.pyi", "nn/functional.pyi"),
}


def torch_names(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """``(dotted name, line)`` of every use of a name under ``torch``."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    aliases[alias.asname or "torch"] = alias.name if alias.asname else "torch"
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                yield f"{node.module}.{alias.name}", node.lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            parts: list[str] = []
            inner: ast.expr = node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases:
                yield ".".join([aliases[inner.id], *reversed(parts)]), node.lineno


def mark_parents(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]


@cache
def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def module_sources(root: Path, module: str) -> list[Path]:
    """The files of ``module`` (``torch.a.b``) under ``root`` (a ``torch/`` folder), empty if none."""
    rel = Path(*module.split(".")[1:])
    candidates = [root / rel / "__init__.py", root / rel / "__init__.pyi"]
    if rel.parts:
        candidates += [
            root.joinpath(*rel.parts[:-1], rel.name + ".py"),
            root.joinpath(*rel.parts[:-1], rel.name + ".pyi"),
        ]
    return [p for p in candidates if p.is_file()]


def defines(root: Path, dotted: str) -> bool:
    """Whether ``dotted`` resolves in the torch tree ``root`` (module docstring)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        files = module_sources(root, module)
        if not files:
            continue
        if cut == len(parts):
            return True
        name = parts[cut]
        if (root / Path(*parts[1 : cut + 1])).is_dir() or module_sources(root, f"{module}.{name}"):
            return True  # a submodule
        return names_module(root, module, name)
    return False


STAR_IMPORT = re.compile(r"^\s*from (\.*)([\w.]*) import \*", re.MULTILINE)


def names_module(root: Path, module: str, name: str, depth: int = 0) -> bool:
    """Whether ``module``'s files (or the modules they star-import) mention ``name`` as a word."""
    files = module_sources(root, module)
    texts = [read(p) for p in files] + [read(root / stub) for stub in BUILTIN_STUBS.get(module, ())]
    if any(re.search(rf"\b{re.escape(name)}\b", text) for text in texts):
        return True
    if depth == 3:
        return False
    package = module if any(p.stem == "__init__" for p in files) else module.rpartition(".")[0]
    for text in texts:
        for dots, target in STAR_IMPORT.findall(text):
            base = package.split(".")[: len(package.split(".")) - len(dots) + 1] if dots else []
            source = ".".join([*base, target]) if dots else target
            if not source.startswith("torch"):
                return True  # re-exports a library outside torch (multiprocessing): not versioned here
            if names_module(root, source, name, depth + 1):
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="torch/ folder of the oldest supported release")
    parser.add_argument("--new", type=Path, default=None, help="torch/ folder to compare with (installed)")
    parser.add_argument("paths", nargs="*", default=DEFAULT_PATHS)
    args = parser.parse_args(argv)
    if args.new is None:
        import torch

        args.new = Path(torch.__file__).parent
    uses: dict[str, list[str]] = defaultdict(list)
    for base in args.paths:
        path = Path(base) if Path(base).is_absolute() else REPO / base
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = ast.parse(file.read_text(), str(file))
            mark_parents(tree)
            for name, line in torch_names(tree):
                uses[name].append(f"{file.relative_to(REPO) if file.is_relative_to(REPO) else file}:{line}")
    missing = sorted(name for name in uses if defines(args.new, name) and not defines(args.old, name))
    unresolved = sorted(name for name in uses if not defines(args.new, name))
    print(f"{len(uses)} torch names used; {len(missing)} defined in {args.new} but not in {args.old}")
    for name in missing:
        print(f"  {name}: {', '.join(sorted(set(uses[name]))[:6])}")
    if unresolved:
        print(f"{len(unresolved)} names this check cannot place in either tree (attributes of objects):")
        print("  " + ", ".join(unresolved))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
