"""The layering of ARCHITECTURE.md: no module of learnreg imports from a package below its own.

:data:`LAYERS` is the layer table, lowest first; a package imports only from its own row and
the rows above it. Every ``import`` counts wherever it stands (module level, inside functions
or ``if TYPE_CHECKING:``), relative imports included, and so do module names given as strings
(``importlib.import_module("learnreg.data.synthetic")``, ``python -m learnreg.runner.evaluate``).
``learnreg/__init__.py`` and ``learnreg/__main__.py`` are outside the table: the first imports
no learnreg package but ``api``, and that one only on first use of ``learnreg.register`` & co.
(so ``from learnreg import __version__`` is allowed anywhere and loads nothing), the second is
imported by nobody. When ../shared/ARCHITECTURE.md is present, the packages its table lists
must appear in it in the order of :data:`LAYERS` (the document, maintained outside this
repository, may lag behind by rows this issue added, ``metrics`` and ``runner``, never
contradict it).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

LAYERS: tuple[str, ...] = (
    "core",
    "nn",
    "spatial",
    "io",
    "losses",
    "metrics",
    "methods",
    "optimize",
    "data",
    "train",
    "zoo",
    "eval",
    "runner",
    "api",
    "cli",
)
"""The layer table of ARCHITECTURE.md, lowest first (the one copy the tests read)."""

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "learnreg"
ARCHITECTURE = Path(
    os.environ.get("LEARNREG_ARCHITECTURE", ROOT / ".." / "shared" / "ARCHITECTURE.md")
)
_MODULE_NAME = re.compile(r"learnreg(\.[A-Za-z_][A-Za-z0-9_]*)+")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``source`` (the module ``module``),
    relative ones resolved, plus string constants that name a learnreg module."""
    found: list[tuple[int, str]] = []
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "learnreg":  # `from learnreg import x`: x may be a package
                found += [
                    (node.lineno, f"learnreg.{a.name}" if a.name in LAYERS else "learnreg")
                    for a in node.names
                ]
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # a string naming a module of a learnreg package (not e.g. a file "learnreg.log")
            if _MODULE_NAME.fullmatch(node.value) and node.value.split(".")[1] in LAYERS:
                found.append((node.lineno, node.value))
    return [(line, name) for line, name in found if name.split(".")[0] == "learnreg"]


def layer(name: str) -> str | None:
    """The package (row of :data:`LAYERS`) of a dotted learnreg module name; ``None`` for
    the top-level ``learnreg`` itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import that points up the table, as ``file:line: pkg imports module``."""
    rank = {p: i for i, p in enumerate(LAYERS)}
    bad = []
    for path in sorted(package.rglob("*.py")):
        mod = module_name(path, package)
        own = layer(mod)
        if own in ("__init__", "__main__") or own is None:
            continue
        for line, target in imports(
            path.read_text(encoding="utf-8"), mod, path.name == "__init__.py"
        ):
            tgt = layer(target)
            if tgt is None or tgt == own:
                continue
            where = f"{path.relative_to(package.parent)}:{line}"
            if tgt not in rank:
                bad.append(f"{where}: {own} imports {target}, a package not in the table")
            elif own in rank and rank[tgt] > rank[own]:
                bad.append(f"{where}: {own} imports {target} (a layer below {own})")
    return bad


def test_every_package_is_in_the_table():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert not modules, f"top-level modules outside the layer table: {sorted(modules)}"
    assert packages == set(LAYERS), (
        f"packages not in LAYERS: {sorted(packages - set(LAYERS))}; "
        f"LAYERS without a package: {sorted(set(LAYERS) - packages)}"
    )


def test_no_import_points_up_the_table():
    bad = upward_imports()
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_init_and_main_stay_outside_the_table():
    init = PACKAGE / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    inner = [t for _, t in imports(ast.unparse(ast.Module(top, [])), "learnreg", True)]
    inner = [t for t in inner if layer(t) is not None]
    assert not inner, f"learnreg/__init__.py imports {inner}: everything would depend on them"
    lazy = [
        t
        for _, t in imports(init.read_text(encoding="utf-8"), "learnreg", True)
        if layer(t) is not None
    ]
    assert set(lazy) <= {"learnreg.api"}, f"learnreg/__init__.py loads {lazy} (only api)"
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        users += [
            f"{mod}:{line}"
            for line, t in imports(
                path.read_text(encoding="utf-8"), mod, path.name == "__init__.py"
            )
            if t == "learnreg.__main__"
        ]
    assert not users, f"learnreg.__main__ is imported by {users}"


def test_the_check_sees_every_kind_of_import(tmp_path):
    """A package that imports upward in every way the checker knows is reported each time."""
    pkg = tmp_path / "learnreg"
    for sub in LAYERS:
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "io" / "bad.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import learnreg.core.grid\n"  # fine: above io
        "from learnreg import __version__\n"  # fine: outside the table
        "from learnreg.spatial import sampling\n"  # fine
        "from . import images\n"  # fine: own package
        "if TYPE_CHECKING:\n"
        "    from learnreg.methods.base import RegistrationBatch\n"  # 8
        "def f():\n"
        "    import learnreg.train.trainer\n"  # 10
        "    from ..eval import report\n"  # 11
        "    from learnreg import cli\n"  # 12
        "    return __import__('importlib').import_module('learnreg.runner.evaluate')\n"  # 13
        "import learnreg.nowhere\n"  # 14
    )
    bad = upward_imports(pkg)
    lines = sorted(int(b.split(":")[1]) for b in bad)
    assert lines == [8, 10, 11, 12, 13, 14], bad
    assert any(":11: io imports learnreg.eval " in b for b in bad)  # relative, resolved
    assert any("not in the table" in b and "learnreg.nowhere" in b for b in bad)


def _architecture_layers(text: str) -> list[str]:
    """The packages of the table rows that start with `` `name/` ``, in order."""
    return re.findall(r"^\|\s*`([a-z_]+)/`\s*\|", text, flags=re.MULTILINE)


@pytest.mark.skipif(not ARCHITECTURE.is_file(), reason="../shared/ARCHITECTURE.md not present")
def test_architecture_md_agrees_with_the_layers():
    listed = _architecture_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    unknown = [p for p in listed if p not in LAYERS]
    assert not unknown, f"{ARCHITECTURE} lists packages the code does not have: {unknown}"
    assert listed == sorted(listed, key=LAYERS.index), (
        f"{ARCHITECTURE}: its layer table orders {listed}; the tests check {list(LAYERS)}"
    )
