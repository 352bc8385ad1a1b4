"""The house's rules (docs/architecture.md): module-level imports form no cycle, the one import
that runs back up is deferred and named, nothing outside tests/ imports from tests/, and the
rooms stay small."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nt_dist"
ANYONE_MAY_USE = {"errors", "fileio", "__version__"}  # the foundation every room may import


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nt_dist"):
        return [f"nt_dist.{a.name}" for a in node.names] if node.module == "nt_dist" else [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("nt_dist")]
    return []


def _room(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if parts[0] == "nt_dist" and len(parts) > 1 else None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """room -> rooms imported at module level, and room -> rooms imported inside functions
    (``if TYPE_CHECKING`` and ``if __name__ == "__main__"`` blocks left out); a package is one room."""
    solid: dict[str, set[str]] = {}
    deferred: dict[str, set[str]] = {}

    def visit(node: ast.AST, room: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and any(k in ast.unparse(child.test) for k in ("TYPE_CHECKING", "__main__")):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            for target in _targets(child):
                other = _room(target)
                if other and other != room and other not in ANYONE_MAY_USE:
                    (deferred if inside else solid).setdefault(room, set()).add(other)
            visit(child, room, inside)

    for path in PACKAGE.rglob("*.py"):
        visit(ast.parse(path.read_text(encoding="utf-8")), path.relative_to(PACKAGE).parts[0].removesuffix(".py"),
              False)
    return solid, deferred


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        room = todo.pop()
        if room == goal:
            return True
        if room not in seen:
            seen.add(room)
            todo.extend(graph.get(room, ()))
    return False


def test_module_level_imports_form_no_cycle():
    solid, _ = import_graph()
    cycles = [(a, b) for a, targets in solid.items() for b in targets if _reaches(solid, b, a)]
    assert cycles == []


def test_the_only_import_back_up_is_configs_deferred_registry_lookup():
    """A deferred import that would close a cycle runs back up the house: only config's, which
    validates run.role and distill.method against the objective registry."""
    solid, deferred = import_graph()
    upward = sorted((a, b) for a, targets in deferred.items() for b in targets if _reaches(solid, b, a))
    assert upward == [("config", "objectives")]


def test_nothing_outside_tests_imports_from_tests():
    offenders = []
    for folder in ("nt_dist", "benchmarks", "docs", "cluster"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(n == "tests" or n.startswith(("tests.", "conftest")) for n in names):
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_the_rooms_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes["nt_dist/train.py"] <= 300
    large = {path: n for path, n in sizes.items() if n > 450 and path != "nt_dist/models/cifar.py"}
    assert large == {}
