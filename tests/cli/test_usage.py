"""Usage errors of the installed console script, run as on a fresh install.

The subprocess can import only the standard library, learnreg and the distributions that
learnreg's declared dependencies bring (transitively): a package that happens to be on the
developer's machine (``click`` was one) is invisible, as it would be on a fresh machine.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import learnreg

SRC = Path(learnreg.__file__).resolve().parent
SCRIPT = Path(sys.executable).parent / "learnreg"


def _declared_closure() -> set[str]:
    """Normalized names of learnreg's required distributions and everything they require."""
    seen: set[str] = set()
    todo = ["learnreg"]
    while todo:
        name = todo.pop()
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = req.name.lower().replace("_", "-")
            if key not in seen:
                seen.add(key)
                todo.append(req.name)
    return seen


def _importable_top_levels() -> set[str]:
    allowed = _declared_closure()
    tops = {"learnreg"}
    for module, dists in md.packages_distributions().items():
        if any(d.lower().replace("_", "-") in allowed for d in dists):
            tops.add(module)
    return tops


SITECUSTOMIZE = """
import sys
ALLOWED = set({allowed!r}) | set(sys.stdlib_module_names) | set(sys.builtin_module_names)

class FreshInstall:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ALLOWED or top.startswith("_"):
            return None
        raise ModuleNotFoundError(f"No module named {{top!r}} (not a declared dependency)")

sys.meta_path.insert(0, FreshInstall())
"""


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> dict[str, str]:
    if not SCRIPT.exists():
        pytest.skip("console script not installed in this environment")
    site = tmp_path_factory.mktemp("fresh")
    code = SITECUSTOMIZE.format(allowed=sorted(_importable_top_levels()))
    (site / "sitecustomize.py").write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), COLUMNS="100", NO_COLOR="1")
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_the_sandbox_hides_undeclared_packages(fresh_env):
    done = subprocess.run(
        [sys.executable, "-c", "import pytest"], capture_output=True, text=True, env=fresh_env
    )
    assert done.returncode != 0 and "not a declared dependency" in done.stderr


USAGE_ERRORS = {
    "no arguments": (["register"], "Missing argument 'FIXED'"),
    "missing -o": (["register", "f.nii.gz", "m.nii.gz"], "Missing option '-o'"),
    "-o without value": (["register", "f.nii.gz", "m.nii.gz", "-o"], "requires an argument"),
    "mistyped subcommand": (["regster"], "No such command 'regster'"),
    "unknown option": (["register", "f", "m", "-o", "x", "--bogus"], "No such option: --bogus"),
    "bad integer": (["register", "f", "m", "-o", "x", "--refine", "abc"], "'--refine'"),
    "apply without inputs": (["apply", "run", "-o", "x"], "Invalid value for 'RESULT INPUT...'"),
    "apply without anything": (["apply", "-o", "x"], "Missing argument 'RESULT INPUT...'"),
    "train without config": (["train"], "Missing argument 'CONFIG'"),
    "evaluate without method": (["evaluate"], "Missing option '--method'"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_one_line_and_exit_2(fresh_env, case):
    args, needle = USAGE_ERRORS[case]
    done = run(fresh_env, *args)
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert needle in lines[0] and lines[0].startswith("error: "), lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["register", "-h"], ["apply", "--help"]])
def test_help(fresh_env, args):
    done = run(fresh_env, *args)
    assert done.returncode == 0, done.stderr
    assert "Usage: learnreg" in done.stdout and done.stderr == ""


def test_version(fresh_env):
    done = run(fresh_env, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"learnreg {learnreg.__version__}"


def test_no_arguments_shows_help(fresh_env):
    done = run(fresh_env)
    assert "Usage: learnreg" in done.stdout and "Traceback" not in done.stderr


def test_methods_runs_on_a_fresh_install(fresh_env):
    done = run(fresh_env, "methods")
    assert done.returncode == 0, done.stderr
    assert "voxelmorph" in done.stdout


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions: those are optional paths)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_every_module_level_import_is_declared():
    """What the package imports unconditionally is stdlib, learnreg, or a declared dependency."""
    allowed = _importable_top_levels() | set(sys.stdlib_module_names) | {"__future__"}
    undeclared = {
        f"{path.relative_to(SRC)}: {name}"
        for path in SRC.rglob("*.py")
        for name in _top_level_imports(path) - allowed
    }
    assert not undeclared, sorted(undeclared)
