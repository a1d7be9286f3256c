"""The package's shape (issue 11): stages side by side on a shared layer, no import cycles,
modules that fit on a few screens."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import deldist

PACKAGE = Path(deldist.__file__).parent
MAX_MODULE_LINES = 460
MAX_FUNCTION_LINES = 80


def _parse(text: str) -> ast.Module:
    """``ast.parse`` with the garbage collector paused. CPython 3.11 (before 3.11.8, gh-106905)
    keeps the AST-to-object conversion's recursion counter in state the interpreter's threads
    share and raises "AST constructor recursion depth mismatch" when it moved meanwhile. A
    collection during the conversion runs finalizers (of Ray objects, late in a test session),
    which lets other threads run; seen here even with the parse in a fresh thread."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text)
    finally:
        if enabled:
            gc.enable()


def _modules() -> dict[str, ast.Module]:
    return {p.stem: _parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield child
        yield from _runtime_nodes(child)


def _imports(tree: ast.Module, names: set[str]) -> set[str]:
    """deldist modules this module imports at run time (top level or inside functions)."""
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "deldist":
                found |= {a.name for a in node.names if a.name in names}
            elif node.module.startswith("deldist."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("deldist.")}
    return found & names


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_cycle_finder_sees_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_among_modules():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the walk sees the package's imports
    assert import_cycle(graph) is None


def test_modules_and_functions_fit_on_a_few_screens():
    too_long = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(_parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long


def test_stage_modules_do_not_import_each_other():
    """Stages share the thin layer, not each other's internals. Three stages use others by
    design: curate-new embeds uploads with the corpus's encoder and assigns them with its
    centroids (and re-clusters), report materializes, pretrains and finetunes each selection,
    sweep runs select's rules (the same settings) before evaluating the duplicate rule on a grid."""
    stages = {"embed", "cluster", "dedup", "select", "sweep", "curate_new", "materialize", "pretrain", "finetune",
              "report"}
    allowed = {("curate_new", s) for s in ("embed", "cluster", "dedup", "select")} | {("sweep", "select")}
    allowed |= {("report", s) for s in ("materialize", "pretrain", "finetune")}
    modules = _modules()
    crossing = sorted((name, other) for name in stages for other in _imports(modules[name], set(modules)) & stages
                      if other != name and (name, other) not in allowed)
    assert not crossing
