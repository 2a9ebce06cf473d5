"""The floors of the house, checked by reading the imports (DESIGN.md "Layout").

1. `backends/` imports only `backends.*` and `common.errors` from the project.
2. `common/` never imports `endpoints`, fastapi, starlette or uvicorn.
3. Inside `common/`, imports go one way (the rank table `RANKS`):
   errors <- config <- formats <- models <- {generation, downloads}.
4. No import circles anywhere in the project.

Every `.py` under backends/, common/, endpoints/ and main.py is parsed with
`ast`; every import counts wherever it is written: module level, inside a
function, or under `if TYPE_CHECKING:` (a lazy import hides a circle from the
interpreter, not from the design). The checkers are plain functions over a
root folder, so the last tests run them on a small planted tree to prove they
catch what they are meant to.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED_FOLDERS = ("backends", "common", "endpoints")
SCANNED_FILES = ("main.py",)

# Rule 2: what common/ must never import (top-level package names).
HTTP_PACKAGES = ("endpoints", "fastapi", "starlette", "uvicorn")

# Rule 3: the floors inside common/. A module may import its own room, or a room on a lower
# floor; rooms on the same floor (generation, downloads) must not import each other.
# errors.py is the leaf: everyone may import it, and it imports nothing of the project.
# A new room under common/ must be given a floor here before it can be imported.
RANKS: dict[str, int] = {
    "common": 0,  # the package itself (its __init__): imports nothing
    "common.errors": 0,
    "common.config": 1,
    "common.formats": 2,
    "common.models": 3,
    "common.generation": 4,
    "common.downloads": 4,
    "common.store": 4,  # persistence: imports only errors (the routes join it with generation)
}
LEAF = "common.errors"
ORDER = "errors <- config <- formats <- models <- {generation, downloads, store}"

BACKENDS_FIX = (
    "backends/ is what an engine's author reads, with backends/base.py as its only contract: move what it needs "
    "down into backends/ (a type into backends/base.py, a helper beside it), or have the caller pass it in "
    "(a parameter, a callback, a Protocol declared in backends/) instead of importing it."
)
HTTP_FIX = (
    "common/ is what the server knows, with no HTTP in it: move the HTTP-dependent code up into endpoints/, or "
    "turn the dependency around: declare what common needs in common/ (a Protocol, a callback, a contextvar) "
    "and let endpoints/ provide it."
)
ORDER_FIX = (
    f"Inside common/ imports go down only ({ORDER}): move the imported code down to the importer's floor or "
    "lower, or pass it in from above (a parameter, a callback, a Protocol declared on the lower floor)."
)
SIBLING_FIX = (
    "generation/ and downloads/ share a floor and must not import each other: move what both need down "
    "into models/ (or lower), or pass a callback."
)
CYCLE_FIX = (
    "Break each circle: move the piece both sides need down into a module neither imports back, or have the "
    "lower module accept a callback / a Protocol instead of importing the upper one. A function-level or "
    "`if TYPE_CHECKING:` import still counts: it hides the circle from Python, not from the design."
)


@dataclass(frozen=True)
class Import:
    file: str  # relative to the scanned root
    line: int
    importer: str  # dotted module name of the importing file
    target: str  # absolute dotted name imported; `from x import y` gives x.y when that is a project module

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Violation:
    rule: str
    imp: Import
    detail: str

    def __str__(self) -> str:
        return f"{self.imp.where()}: {self.imp.importer} imports {self.imp.target}: {self.detail}"


# -- scanning ------------------------------------------------------------------------
def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every scanned file under root."""
    found: dict[str, Path] = {}
    for folder in SCANNED_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path.relative_to(root))] = path
    for name in SCANNED_FILES:
        if (root / name).is_file():
            found[module_name(Path(name))] = root / name
    return found


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name a (possibly relative) `from ... import` names."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([module] if module else [])])


def scan(root: Path) -> list[Import]:
    """Every import statement in the scanned files, resolved to absolute names."""
    files = project_files(root)
    modules = set(files)
    out: list[Import] = []
    for name, path in files.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):  # walks function bodies and `if TYPE_CHECKING:` blocks too
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.append(Import(rel, node.lineno, name, alias.name))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.module, node.level, name, is_package)
                if base == "__future__":
                    continue
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
                for target in sorted(targets):
                    out.append(Import(rel, node.lineno, name, target))
    return sorted(out, key=lambda i: (i.file, i.line, i.target))


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# -- rule 1 ------------------------------------------------------------------------------
def check_backends(imports: list[Import], project: set[str]) -> list[Violation]:
    """backends/ imports only backends.* and common.errors from the project."""
    out = []
    for imp in imports:
        if not _within(imp.importer, "backends") or _top(imp.target) not in project:
            continue
        if _within(imp.target, "backends") or imp.target == LEAF:
            continue
        out.append(Violation("backends", imp, "backends/ may import only backends.* and common.errors"))
    return out


# -- rule 2 --------------------------------------------------------------------------------
def check_common_no_http(imports: list[Import]) -> list[Violation]:
    """common/ never imports endpoints, fastapi, starlette or uvicorn."""
    return [
        Violation("common-no-http", imp, f"common/ must not import {_top(imp.target)}")
        for imp in imports
        if _within(imp.importer, "common") and _top(imp.target) in HTTP_PACKAGES
    ]


# -- rule 3 --------------------------------------------------------------------------------
def room_of(module: str) -> str:
    """common.models.manager -> common.models; common.errors -> common.errors; common -> common."""
    parts = module.split(".")
    return ".".join(parts[:2])


def check_common_order(imports: list[Import]) -> list[Violation]:
    """Inside common/, a room imports its own room, errors, or rooms on a lower floor (RANKS)."""
    out = []
    for imp in imports:
        if not (_within(imp.importer, "common") and _within(imp.target, "common")):
            continue
        src, dst = room_of(imp.importer), room_of(imp.target)
        if dst == LEAF and src != LEAF:
            continue
        if src == dst and src != LEAF:
            continue
        unranked = [r for r in (src, dst) if r not in RANKS]
        if unranked:
            out.append(Violation(
                "common-order", imp, f"{', '.join(unranked)} has no floor: add it to RANKS in tests/unit/test_layering.py"
            ))
            continue
        if RANKS[dst] < RANKS[src]:
            continue
        if RANKS[dst] == RANKS[src]:
            detail = f"{src} and {dst} are on the same floor ({RANKS[src]}) and must not import each other"
        else:
            detail = f"{src} (floor {RANKS[src]}) imports upward into {dst} (floor {RANKS[dst]})"
        out.append(Violation("common-order", imp, detail))
    return out


# -- rule 4 --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cycle:
    members: tuple[str, ...]  # the strongly connected modules, sorted
    path: tuple[str, ...]  # one concrete circle through them: a -> b -> ... -> a
    edges: tuple[Import, ...]  # every import between members

    def __str__(self) -> str:
        lines = [f"circle of {len(self.members)}: {' -> '.join(self.path)}", f"  members: {', '.join(self.members)}"]
        lines += [f"  {e.where()}: {e.importer} imports {e.target}" for e in self.edges]
        return "\n".join(lines)


def import_graph(imports: list[Import], modules: set[str]) -> dict[str, dict[str, list[Import]]]:
    """importer -> imported project module -> the imports making that edge."""
    graph: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for imp in imports:
        target = imp.target
        while target and target not in modules:  # `import a.b.name_in_b` style leftovers: the module holding it
            target = target.rpartition(".")[0]
        if target:
            graph[imp.importer][target].append(imp)
    return graph


def _strong_components(nodes: list[str], graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (import graphs can be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(sorted(component))
    return found


def _circle_through(start: str, members: set[str], graph: dict[str, dict[str, list[Import]]]) -> tuple[str, ...]:
    """A shortest circle from start back to start inside the component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, {})):
                if child not in members:
                    continue
                if child == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = previous[node]
                    return (start, *reversed(path[1:]), start)
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    return (start,)


def find_cycles(imports: list[Import], modules: set[str]) -> list[Cycle]:
    graph = import_graph(imports, modules)
    cycles = []
    for component in _strong_components(sorted(modules), graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph.get(component[0], {}):
            continue
        edges = tuple(
            imp for src in component for dst, imps in sorted(graph.get(src, {}).items()) if dst in members for imp in imps
        )
        cycles.append(Cycle(tuple(component), _circle_through(component[0], members, graph), edges))
    return cycles


# -- reporting -------------------------------------------------------------------------------
def report(title: str, items: list[object], fix: str) -> str:
    body = "\n".join(f"  {item}" for item in items)
    return f"{title} ({len(items)}):\n{body}\nWhat to do: {fix}"


def _project(root: Path) -> tuple[list[Import], set[str]]:
    modules = set(project_files(root))
    return scan(root), modules


# -- the rules, on the real tree ------------------------------------------------------------
def test_the_scan_sees_the_project() -> None:
    """Guards the other tests against passing on an empty or misread tree."""
    imports, modules = _project(ROOT)
    assert {"backends.base", "common.errors", "endpoints.app", "main"} <= modules, sorted(modules)[:20]
    assert len(modules) > 40, f"only {len(modules)} modules found under {ROOT}"
    assert len(imports) > 200, f"only {len(imports)} imports found"
    edges = {(i.importer, i.target) for i in imports}
    assert ("backends.base", "common.errors") in edges
    assert any(i.importer == "main" and i.target.startswith(("common.", "endpoints.")) for i in imports)
    # Function-level and `if TYPE_CHECKING:` imports: proven on the planted tree below.


def test_backends_import_only_backends_and_common_errors() -> None:
    imports, modules = _project(ROOT)
    project = {_top(m) for m in modules}
    bad = check_backends(imports, project)
    assert not bad, report("backends/ imports outside backends/ and common/errors.py", bad, BACKENDS_FIX)


def test_common_never_imports_http() -> None:
    imports, _ = _project(ROOT)
    bad = check_common_no_http(imports)
    assert not bad, report("common/ imports the HTTP layer", bad, HTTP_FIX)


def test_common_floors_go_one_way() -> None:
    imports, _ = _project(ROOT)
    bad = check_common_order(imports)
    siblings = [v for v in bad if "same floor" in v.detail]
    fix = ORDER_FIX + (" " + SIBLING_FIX if siblings else "")
    assert not bad, report(f"common/ imports against the floor order {ORDER}", bad, fix)


def test_no_import_circles() -> None:
    imports, modules = _project(ROOT)
    cycles = find_cycles(imports, modules)
    assert not cycles, report("import circles", cycles, CYCLE_FIX)


# -- the checkers catch what they should: a planted tree -------------------------------------
PLANTED = {
    "main.py": "import endpoints.app\n",
    "backends/__init__.py": "",
    "backends/base.py": (
        "from typing import TYPE_CHECKING\n"
        "from common.errors import APIError\n"  # allowed
        "from common import errors\n"  # allowed: resolves to common.errors
        "if TYPE_CHECKING:\n"
        "    from common.formats.constraints import Constraint\n"  # line 5: violation (TYPE_CHECKING)
        "from . import sampling\n"  # allowed (relative)
    ),
    "backends/sampling.py": (
        "import json\n"
        "def load():\n"
        "    from common.models import manager\n"  # line 3: violation (function-level)
        "    return manager\n"
    ),
    "common/__init__.py": "",
    "common/errors.py": "",
    "common/config/__init__.py": "",
    "common/config/schema.py": "from common.errors import APIError\nfrom ..formats import output\n",  # line 2: upward
    "common/formats/__init__.py": "",
    "common/formats/output.py": "from common.config import settings\n",  # allowed: down (a name in the package)
    "common/formats/constraints.py": "",
    "common/models/__init__.py": "",
    "common/models/manager.py": (
        "from common.formats.output import x\n"  # allowed
        "from fastapi import FastAPI\n"  # line 2: HTTP
        "from common.models.loaded import LoadedModel\n"  # same room: allowed; half of a circle
    ),
    "common/models/loaded.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from common.models.manager import ModelManager\n"  # line 3: the other half
    ),
    "common/generation/__init__.py": "",
    "common/generation/pipeline.py": (
        "from common.models.manager import LoadedModel\n"  # allowed
        "from common.downloads import jobs\n"  # line 2: sibling
        "def ctx():\n"
        "    from endpoints.http.request_context import current\n"  # line 4: HTTP, function-level
    ),
    "common/downloads/__init__.py": "",
    "common/downloads/jobs.py": "import starlette.responses\n",  # line 1: HTTP
    "common/vault/__init__.py": "from common.errors import APIError\nfrom common.models import manager\n",  # unranked
    "endpoints/__init__.py": "",
    "endpoints/app.py": "from fastapi import FastAPI\nimport main\n",  # main <-> endpoints.app circle
}


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _where(violations: list[Violation]) -> set[str]:
    return {v.imp.where() for v in violations}


def test_the_checkers_catch_planted_violations(tmp_path: Path) -> None:
    _plant(tmp_path, PLANTED)
    imports, modules = _project(tmp_path)
    project = {_top(m) for m in modules}

    assert _where(check_backends(imports, project)) == {"backends/base.py:5", "backends/sampling.py:3"}
    assert _where(check_common_no_http(imports)) == {
        "common/models/manager.py:2", "common/generation/pipeline.py:4", "common/downloads/jobs.py:1",
    }
    order = check_common_order(imports)
    assert _where(order) == {"common/config/schema.py:2", "common/generation/pipeline.py:2", "common/vault/__init__.py:2"}
    details = {v.imp.where(): v.detail for v in order}
    assert "upward" in details["common/config/schema.py:2"]
    assert "same floor" in details["common/generation/pipeline.py:2"]
    assert "add it to RANKS" in details["common/vault/__init__.py:2"]

    cycles = find_cycles(imports, modules)
    assert sorted(c.members for c in cycles) == [
        ("common.models.loaded", "common.models.manager"),
        ("endpoints.app", "main"),
    ]
    text = report("import circles", cycles, CYCLE_FIX)
    assert "common/models/loaded.py:3" in text and "common/models/manager.py:3" in text
    assert "What to do:" in text


def test_the_checkers_pass_a_clean_tree(tmp_path: Path) -> None:
    clean = {
        "main.py": "import endpoints.app\n",
        "backends/__init__.py": "",
        "backends/base.py": "from common.errors import APIError\nfrom backends import sampling\n",
        "backends/sampling.py": "",
        "common/__init__.py": "",
        "common/errors.py": "",
        "common/config/__init__.py": "",
        "common/formats/__init__.py": "from common.config import x\n",
        "common/models/__init__.py": "from common.formats import y\nfrom backends.base import Engine\n",
        "common/generation/__init__.py": "from common.models import z\nfrom common.errors import E\n",
        "common/downloads/__init__.py": "from common.models import z\n",
        "endpoints/__init__.py": "",
        "endpoints/app.py": "from fastapi import FastAPI\nfrom common.generation import run\n",
    }
    _plant(tmp_path, clean)
    imports, modules = _project(tmp_path)
    assert len(imports) >= 9
    assert check_backends(imports, {_top(m) for m in modules}) == []
    assert check_common_no_http(imports) == []
    assert check_common_order(imports) == []
    assert find_cycles(imports, modules) == []
