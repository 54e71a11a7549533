"""The import graph of cboprune points one way (docs/architecture.md, "Layers"): no module imports
one of a higher layer, there are no circles, the graph has at most 10 floors, and our own modules
are imported at the top of a module except in the few places the docs name.

The graph is read from the source (ast), every import counted, inside functions too; only imports
under `if TYPE_CHECKING:` are left out (they never run)."""

from __future__ import annotations

import ast
import fnmatch
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cboprune"

#: bottom to top; a module belongs to the most specific pattern that matches it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("cboprune.core", "cboprune.core.*")),
    ("configuration", ("cboprune.core.config", "cboprune.heal.recipe")),
    ("models and data", ("cboprune.models", "cboprune.models.*", "cboprune.data", "cboprune.data.*",
                         "cboprune.evaluation", "cboprune.evaluation.*", "cboprune.heal", "cboprune.heal.*",
                         "cboprune.report", "cboprune.report.*", "cboprune.gguf", "cboprune.gguf.*")),
    ("selection", ("cboprune.selection", "cboprune.selection.*", "cboprune.solvers", "cboprune.solvers.*",
                   "cboprune.energies", "cboprune.energies.*", "cboprune.baselines", "cboprune.baselines.*",
                   "cboprune.repair", "cboprune.repair.*", "cboprune.bench", "cboprune.bench.*")),
    ("engine", ("cboprune.engine", "cboprune.engine.*")),
    ("front ends", ("cboprune", "cboprune.api", "cboprune.cli", "cboprune.*.cli", "cboprune.workflows",
                    "cboprune.workflows.*", "cboprune.gguf.bench")),
]

#: Modules that may import our own modules inside functions, and why (docs/architecture.md):
#: `cboprune --help` and `cboprune methods` import these and must not pay for torch, transformers
#: or numba, so each command's handler imports its machinery when it runs.
LAZY = {
    "cboprune.cli": "start-up: one handler per command imports what it runs",
    "cboprune.core.config": "start-up: validation consults torch-heavy checks only when it runs",
    "cboprune.core.methods": "start-up: the registry lists methods without importing their implementations",
    "cboprune.energies.*": "start-up: registered by `cboprune methods`; the implementation runs on selection",
    "cboprune.baselines.*": "start-up: registered by `cboprune methods`; the implementation runs on selection",
    "cboprune.*.cli": "start-up: parsers are built for --help; the handler imports what it runs",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _own(name: str) -> str | None:
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


@cache
def _imports() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported module, at module level, line)] for our own modules."""
    out: dict[str, list[tuple[str, bool, int]]] = {}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found: list[tuple[str, bool, int]] = []

        def visit(node: ast.AST, top: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if _type_checking(child):
                    for sub in child.orelse:
                        visit_one(sub, top)
                    continue
                visit_one(child, top)

        def visit_one(child: ast.AST, top: bool) -> None:
            targets: list[str] = []
            if isinstance(child, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", child)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in _modules() else base for a in child.names]
            elif isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            for target in targets:
                own = _own(target) if target.startswith("cboprune") else None
                if own and own != name:
                    found.append((own, top, child.lineno))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, top and not inner)

        visit(tree, True)
        out[name] = found
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or ("*" in pattern and fnmatch.fnmatchcase(name, pattern))


def layer_of(name: str) -> int:
    """The layer of a module: an exact name wins; else the highest layer with a matching pattern
    (so `cboprune.heal.cli` is a front end while the rest of `cboprune.heal.*` is not)."""
    exact = [i for i, (_, patterns) in enumerate(LAYERS) if name in patterns]
    if exact:
        return exact[0]
    matching = [i for i, (_, patterns) in enumerate(LAYERS) if any(_matches(name, p) for p in patterns)]
    assert matching, f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return max(matching)


def _lazy(name: str) -> bool:
    return any(_matches(name, pattern) for pattern in LAZY)


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    upward = [f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]}) at line {line}"
              for src, edges in _imports().items() for dst, _, line in edges if layer_of(dst) > layer_of(src)]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _graph() -> dict[str, set[str]]:
    return {src: {dst for dst, _, _ in edges} for src, edges in _imports().items()}


def test_no_circles():
    assert _cycles(_graph()) == []


#: Floors: the longest chain of imports between our modules, inside functions too (issue 31: at most
#: 10). The chain at 10 is cli -> workflows.run -> energies.hybrid -> selection.energy -> solvers.api ->
#: solvers.bnb -> solvers.heuristics -> solvers._problem -> core.ranking -> core.errors: a new import
#: that deepens it means a piece lives on the wrong floor (docs/architecture.md, "Layers").
MAX_FLOORS = 10


def _longest_chain(graph: dict[str, set[str]]) -> list[str]:
    @cache
    def chain(v: str) -> tuple[str, ...]:
        return (v, *max((chain(w) for w in graph[v]), key=len, default=()))

    return list(max((chain(v) for v in graph), key=len))


def test_the_graph_has_at_most_ten_floors():
    graph = _graph()
    assert not _cycles(graph), "circles first (test_no_circles)"
    longest = _longest_chain(graph)
    assert len(longest) <= MAX_FLOORS, " -> ".join(longest)


def test_own_modules_are_imported_at_the_top_except_where_the_docs_say_why():
    inner = [f"{src}:{line} imports {dst} inside a function" for src, edges in _imports().items()
             if not _lazy(src) for dst, top, line in edges if not top]
    assert not inner, f"{len(inner)} imports inside functions:\n" + "\n".join(inner)


def test_the_checks_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _longest_chain({"a": {"b", "d"}, "b": {"c"}, "c": set(), "d": set()}) == ["a", "b", "c"]
    assert layer_of("cboprune.cli") > layer_of("cboprune.core.config") > layer_of("cboprune.core.errors")
    assert layer_of("cboprune.heal.cli") == len(LAYERS) - 1 and layer_of("cboprune.heal.trainer") == 2
