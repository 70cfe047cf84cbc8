"""The shape of the driver's code: rooms of one job each, arrows one way.

docs/DESIGN.md opens with a map of the modules; these tests keep the code
to it: each module imports only modules below it in `ORDER` (so data flows
one way: CLI and host -> pool -> volume -> kinds -> file primitives), no
class is over 300 lines and no function over 50, the host API adapter
(volume.py) stays at most 300 lines, and no module reaches into another
object's private state (no protected-access suppression outside the host
stand-in).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "qubes_reflink"

#: Every module of the package, lowest first: a module may import only
#: modules before it.
ORDER = [
    "standin",
    "host",
    "layout",
    "errors",
    "options",
    "fileops",
    "btrfs",
    "settings",
    "extents",
    "judgement",
    "guards",
    "inspect",
    "defrag",
    "health",
    "trash",
    "subvolumes",
    "revisions",
    "spares",
    "kinds",
    "autodefrag",
    "background",
    "transfer",
    "volume",
    "pool",
    "repair",
    "migrate",
    "qubesxml",
    "output",
    "cli",
    "__init__",
]

MODULES = sorted(PACKAGE.glob("*.py"))


def parsed(path):
    """The syntax tree of a module."""
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def package_imports(tree):
    """The modules of the package that `tree` imports (relative imports)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_every_module_has_its_place():
    assert sorted(p.stem for p in MODULES) == sorted(ORDER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_point_down(path):
    rank = ORDER.index(path.stem)
    upward = {
        name
        for name in package_imports(parsed(path))
        if ORDER.index(name) >= rank
    }
    assert not upward, f"{path.stem} imports {sorted(upward)} from above it"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_no_long_classes_or_functions(path):
    too_long = []
    for node in ast.walk(parsed(path)):
        limit = {ast.ClassDef: 300, ast.FunctionDef: 50}.get(type(node))
        limit = 50 if isinstance(node, ast.AsyncFunctionDef) else limit
        if limit and node.end_lineno - node.lineno + 1 > limit:
            too_long.append(f"{node.name}: {node.end_lineno - node.lineno + 1}")
    assert not too_long


def test_the_host_adapter_stays_small():
    lines = (PACKAGE / "volume.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300


@pytest.mark.parametrize(
    "path", [p for p in MODULES if p.stem != "standin"], ids=lambda p: p.stem
)
def test_no_reach_into_private_state(path):
    text = path.read_text(encoding="utf-8")
    assert "protected-access" not in text and "W0212" not in text
