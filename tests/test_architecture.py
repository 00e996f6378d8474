"""The package's layering, checked on its source (issue 13, acceptance 1).

Four rules, each a function over ``{path: source}`` so the unit tests below can feed it
synthetic modules that break it:

(a) no module reads or writes another module's underscore names: ``x._name`` where ``_name``
    is defined by a distgraph class or module other than the one reading it (``self._x`` and
    ``cls._x`` are fine), and ``from .other import _name``;
(b) only ``distgraph/runtime/ray/`` imports Ray (and ``distgraph/bench/``, whose peers are
    hand-written Ray baselines);
(c) core modules (everything outside ``runtime/``, ``bench/``, ``viz/`` and ``cli.py``) never
    import ``distgraph.runtime``;
(d) no import cycles among distgraph modules (module-level imports; ``if TYPE_CHECKING:``
    blocks and imports inside functions do not count);
(e) inside ``distgraph/dataparallel/`` each module imports only the siblings its layer allows
    (``rows`` at the bottom; ``gradients``, ``layout`` and ``shards`` on it; ``staleness`` on
    its own), and ``__init__.py`` only re-exports: a new module declares its layer here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distgraph"

#: (module path, underscore name) -> why the access is needed. Keep it short.
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {}

#: Modules outside runtime/, bench/, viz/ and cli.py that may import distgraph.runtime.
RUNTIME_IMPORT_ALLOWED: dict[str, str] = {
    "distgraph/__init__.py": "the public surface re-exports LocalExecutor and RayExecutor",
    "distgraph/train.py": "Trainer drives an executor's training session: it sits above the "
    "runtime, as the CLI does",
}


#: The dataparallel package's modules -> the siblings each may import (anywhere in it).
DATAPARALLEL_LAYERS: dict[str, frozenset[str]] = {
    "rows": frozenset(),
    "gradients": frozenset({"rows"}),
    "layout": frozenset({"rows"}),
    "shards": frozenset({"rows"}),
    "staleness": frozenset(),
}


# --- reading the package ----------------------------------------------------------------------


def package_sources() -> dict[str, str]:
    """Every module of the package: path relative to the checkout -> source."""
    root = PACKAGE.parent
    return {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def module_name(path: str) -> str:
    """``distgraph/runtime/local.py`` -> ``distgraph.runtime.local`` (a package: its name)."""
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: str) -> bool:
    return path.endswith("/__init__.py")


def _resolve(path: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if not node.level:
        return node.module or ""
    base = module_name(path).split(".")
    if not _is_package(path):
        base = base[:-1]  # a module's relative imports start from its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: str, tree: ast.AST) -> Iterator[tuple[ast.AST, str, list[str]]]:
    """Every import anywhere in a module: (node, absolute module, names imported from it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield node, _resolve(path, node), [a.name for a in node.names]


def _module_level_imports(path: str, tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """Imports that run when the module is imported: not in functions or classes' methods,
    not under ``if TYPE_CHECKING:``."""

    def walk(body: list[ast.stmt]) -> Iterator[tuple[str, list[str]]]:
        for stmt in body:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    yield alias.name, []
            elif isinstance(stmt, ast.ImportFrom):
                yield _resolve(path, stmt), [a.name for a in stmt.names]
            elif isinstance(stmt, ast.If):
                test = stmt.test
                name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
                if name != "TYPE_CHECKING":
                    yield from walk(stmt.body)
                yield from walk(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                yield from walk(stmt.body)
                for handler in stmt.handlers:
                    yield from walk(handler.body)
                yield from walk(stmt.orelse)
                yield from walk(stmt.finalbody)
            elif isinstance(stmt, (ast.With, ast.ClassDef)):
                yield from walk(stmt.body)

    yield from walk(tree.body)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _owned_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: module-level names, class members, ``self._x``
    attributes it assigns and ``__slots__`` entries."""
    owned: set[str] = set()

    def targets(node: ast.AST) -> Iterator[ast.AST]:
        if isinstance(node, (ast.Assign,)):
            yield from node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            yield node.target

    def add_target(t: ast.AST) -> None:
        if isinstance(t, ast.Name) and _private(t.id):
            owned.add(t.id)
        elif (
            isinstance(t, ast.Attribute)
            and _private(t.attr)
            and isinstance(t.value, ast.Name)
            and t.value.id in ("self", "cls")
        ):
            owned.add(t.attr)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for elt in t.elts:
                add_target(elt)

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(
            node.name
        ):
            owned.add(node.name)
        for t in targets(node):
            add_target(t)
            if isinstance(t, ast.Name) and t.id == "__slots__":
                value = getattr(node, "value", None)
                for elt in getattr(value, "elts", []):
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                        owned.add(elt.value)
    return owned


# --- the rules --------------------------------------------------------------------------------


def private_access_problems(
    sources: Mapping[str, str], allowed: Mapping[tuple[str, str], str] = PRIVATE_ALLOWED
) -> list[str]:
    """Rule (a): underscore names of one distgraph module used by another."""
    trees = {path: ast.parse(src, path) for path, src in sources.items()}
    owned = {path: _owned_names(tree) for path, tree in trees.items()}
    by_module = {module_name(p): p for p in sources}
    anywhere: set[str] = set().union(*owned.values()) if owned else set()
    problems = []
    for path, tree in trees.items():
        mine = owned[path]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                value = node.value
                if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                    continue
                foreign = node.attr in anywhere and node.attr not in mine
                if foreign and (path, node.attr) not in allowed:
                    problems.append(
                        f"{path}:{node.lineno}: reads or writes {ast.unparse(node)}, an "
                        "underscore name of another distgraph module"
                    )
        for node, module, names in _imports(path, tree):
            other = by_module.get(module)
            if other is None or other == path:
                continue
            for name in names:
                if _private(name) and (path, name) not in allowed:
                    problems.append(
                        f"{path}:{node.lineno}: imports {name} from {module}, an underscore "
                        "name of another module"
                    )
    return problems


def ray_import_problems(sources: Mapping[str, str]) -> list[str]:
    """Rule (b): Ray is imported only under runtime/ray/ (and by the benchmarks)."""
    problems = []
    for path, src in sources.items():
        if path.startswith(("distgraph/runtime/ray/", "distgraph/bench/")):
            continue
        for node, module, _ in _imports(path, ast.parse(src, path)):
            if module == "ray" or module.startswith("ray."):
                problems.append(f"{path}:{node.lineno}: imports {module} outside runtime/ray/")
    return problems


def _is_core(path: str) -> bool:
    outside = ("distgraph/runtime/", "distgraph/bench/", "distgraph/viz/")
    return not path.startswith(outside) and path != "distgraph/cli.py"


def runtime_import_problems(
    sources: Mapping[str, str], allowed: Mapping[str, str] = RUNTIME_IMPORT_ALLOWED
) -> list[str]:
    """Rule (c): core modules never import distgraph.runtime (not even inside a function)."""
    problems = []
    for path, src in sources.items():
        if not _is_core(path) or path in allowed:
            continue
        for node, module, names in _imports(path, ast.parse(src, path)):
            full = [module] + [f"{module}.{n}" for n in names]
            if any(m == "distgraph.runtime" or m.startswith("distgraph.runtime.") for m in full):
                problems.append(f"{path}:{node.lineno}: core module imports {module}")
    return problems


def import_cycles(sources: Mapping[str, str]) -> list[list[str]]:
    """Rule (d): cycles among the package's modules through module-level imports."""
    modules = {module_name(p): p for p in sources}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for module, names in _module_level_imports(path, ast.parse(sources[path], path)):
            for target in [f"{module}.{n}" for n in names] + [module]:
                if target in modules and target != name:
                    edges[name].add(target)
                    break  # `from . import x` is an edge to x, not to the package too
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def dataparallel_layer_problems(
    sources: Mapping[str, str],
    layers: Mapping[str, frozenset[str]] = DATAPARALLEL_LAYERS,
    package: str = "distgraph/dataparallel/",
) -> list[str]:
    """Rule (e): the dataparallel package's modules import only the siblings of their layer,
    every module has a layer, and its ``__init__.py`` defines nothing (it re-exports)."""
    problems = []
    prefix = module_name(package + "__init__.py") + "."
    for path, src in sources.items():
        if not path.startswith(package):
            continue
        tree = ast.parse(src, path)
        name = path[len(package) : -len(".py")]
        if name == "__init__":
            for stmt in tree.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    problems.append(
                        f"{path}:{stmt.lineno}: defines {stmt.name}; the package's "
                        "__init__.py only re-exports (put it in the module it belongs to)"
                    )
            continue
        if name not in layers:
            problems.append(
                f"{path}: no layer declared for module {name!r} (DATAPARALLEL_LAYERS in "
                "tests/test_architecture.py)"
            )
            continue
        for node, module, names in _imports(path, tree):
            if module + "." == prefix:
                # `from . import rows` names a sibling; `from . import combine`, the package's
                # re-exports, which the package imports from this module's siblings.
                siblings = [n if n in layers else "__init__" for n in names]
            elif module.startswith(prefix):
                siblings = [module[len(prefix) :].split(".")[0]]
            else:
                continue
            for sibling in siblings:
                if sibling not in layers[name]:
                    problems.append(
                        f"{path}:{node.lineno}: {name} imports {sibling}, outside its layer "
                        f"(it may import {sorted(layers[name]) or 'no sibling'})"
                    )
    return problems


# --- the package obeys them -------------------------------------------------------------------


def _checked_sources() -> dict[str, str]:
    sources = package_sources()
    assert "distgraph/graph.py" in sources and len(sources) > 20  # the package was found
    return sources


def test_no_module_touches_another_modules_underscore_names():
    problems = private_access_problems(_checked_sources())
    assert problems == []


def test_only_runtime_ray_imports_ray():
    problems = ray_import_problems(_checked_sources())
    assert problems == []


def test_core_modules_do_not_import_the_runtime():
    assert runtime_import_problems(_checked_sources()) == []


def test_no_import_cycles():
    assert import_cycles(_checked_sources()) == []


def test_dataparallel_modules_keep_their_layers():
    sources = _checked_sources()
    # Precondition: the package is where the rule looks, with every declared module.
    found = {p for p in sources if p.startswith("distgraph/dataparallel/")}
    assert found == {f"distgraph/dataparallel/{m}.py" for m in [*DATAPARALLEL_LAYERS, "__init__"]}
    assert dataparallel_layer_problems(sources) == []


# --- each rule catches what it is for ---------------------------------------------------------

_GRAPH = """
class Graph:
    __slots__ = ("_slot",)

    def __init__(self):
        self._nodes = {}

    def _helper(self):
        return self._nodes

    def copy(self):
        new = Graph()
        new._nodes = dict(self._nodes)  # its own class: fine
        return new


def _private_function():
    return 1
"""


def test_rule_a_catches_private_reads_writes_and_imports():
    sources = {
        "distgraph/graph.py": _GRAPH,
        "distgraph/autodiff.py": (
            "from .graph import Graph, _private_function\n"
            "def grad(g):\n"
            "    nodes = g._nodes\n"
            "    g._nodes = {}\n"
            "    g._helper()\n"
            "    return g._slot, np._NoValue, self._own\n"
        ),
    }
    problems = private_access_problems(sources)
    assert len(problems) == 5, problems
    assert all(p.startswith("distgraph/autodiff.py:") for p in problems)
    for what in ("g._nodes", "g._helper", "g._slot", "_private_function"):
        assert any(what in p for p in problems), (what, problems)
    assert not any("_NoValue" in p or "_own" in p for p in problems)  # not distgraph names
    assert private_access_problems({"distgraph/graph.py": _GRAPH}) == []
    allowed = {("distgraph/autodiff.py", n): "test" for n in ("_nodes", "_helper", "_slot")}
    allowed["distgraph/autodiff.py", "_private_function"] = "test"
    assert private_access_problems(sources, allowed) == []


def test_rule_b_catches_ray_imported_outside_runtime_ray():
    sources = {
        "distgraph/runtime/worker.py": "def f():\n    import ray\n",
        "distgraph/plan.py": "from ray.util import placement_group\n",
        "distgraph/runtime/ray/cluster.py": "import ray\n",
        "distgraph/bench/fine.py": "import ray\n",
        "distgraph/graph.py": "import rayon\n",  # not Ray
    }
    problems = ray_import_problems(sources)
    assert [p.split(":")[0] for p in problems] == [
        "distgraph/runtime/worker.py",
        "distgraph/plan.py",
    ]


def test_rule_c_catches_core_modules_importing_the_runtime():
    sources = {
        "distgraph/testing.py": "from .runtime.local import LocalExecutor\n",
        "distgraph/plan.py": "def f():\n    from distgraph import runtime\n",
        "distgraph/memory.py": "from . import runtime\n",
        "distgraph/cli.py": "from .runtime.local import LocalExecutor\n",
        "distgraph/viz/report.py": "from ..runtime import base\n",
        "distgraph/runtime/local.py": "from ..program import Program\n",
    }
    problems = runtime_import_problems(sources, allowed={})
    paths = sorted(p.split(":")[0] for p in problems)
    assert paths == ["distgraph/memory.py", "distgraph/plan.py", "distgraph/testing.py"]


def test_rule_d_catches_import_cycles():
    sources = {
        "distgraph/__init__.py": "from .graph import Graph\n",
        "distgraph/graph.py": "from . import ops\n",
        "distgraph/ops.py": "from .program import Program\n",
        "distgraph/program.py": "from .graph import Graph\n",
        "distgraph/cost.py": (
            "from typing import TYPE_CHECKING\n"
            "from .program import Program\n"
            "def f():\n    from .plan import Plan\n"
        ),
        "distgraph/plan.py": "from .cost import CostModel\n",
        "distgraph/spec.py": "if TYPE_CHECKING:\n    from .errors import Error\n",
        "distgraph/errors.py": "from .spec import Spec\n",
    }
    assert import_cycles(sources) == [
        ["distgraph.graph", "distgraph.ops", "distgraph.program"],
    ]
    sources["distgraph/program.py"] = "def f():\n    from .graph import Graph\n"
    assert import_cycles(sources) == []


def test_rule_e_catches_a_dataparallel_module_outside_its_layer():
    sources = {
        "distgraph/dataparallel/__init__.py": (
            "from .rows import analyze_rows as analyze_rows\ndef helper():\n    pass\n"
        ),
        "distgraph/dataparallel/rows.py": "from .layout import choose_layout\n",
        "distgraph/dataparallel/layout.py": "from .rows import shard_rows\n",
        "distgraph/dataparallel/staleness.py": (
            "def f():\n    from distgraph.dataparallel.gradients import combine\n"
        ),
        "distgraph/dataparallel/shards.py": "from . import rows, staleness\n",
        "distgraph/dataparallel/extra.py": "import numpy\n",
        "distgraph/dataparallel/gradients.py": "from . import combine\nfrom .rows import x\n",
        "distgraph/graph.py": "from .dataparallel.layout import choose_layout\n",  # not in it
    }
    problems = dataparallel_layer_problems(sources)
    assert len(problems) == 6, problems
    for what in (
        "__init__.py:2: defines helper",
        "rows.py:1: rows imports layout",
        "staleness.py:2: staleness imports gradients",
        "shards.py:1: shards imports staleness",
        "no layer declared for module 'extra'",
        "gradients.py:1: gradients imports __init__",
    ):
        assert any(what in p for p in problems), (what, problems)


@pytest.mark.parametrize(
    ("path", "node", "want"),
    [
        ("distgraph/plan.py", "from .cost import x", "distgraph.cost"),
        ("distgraph/runtime/local.py", "from ..program import x", "distgraph.program"),
        ("distgraph/runtime/__init__.py", "from .local import x", "distgraph.runtime.local"),
        ("distgraph/__init__.py", "from . import testing", "distgraph"),
    ],
)
def test_relative_imports_resolve(path, node, want):
    stmt = ast.parse(node).body[0]
    assert isinstance(stmt, ast.ImportFrom)
    assert _resolve(path, stmt) == want
