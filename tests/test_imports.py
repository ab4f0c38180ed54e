"""The module layout of DESIGN.md ("Modules"), checked on the source: arrows point down only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dcfeat"
STAGES = {"dcfeat.extract", "dcfeat.train", "dcfeat.evaluate", "dcfeat.predict"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """dcfeat module → the dcfeat modules it imports, anywhere in its body (functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycles_among_dcfeat_modules():
    assert _cycle(imports()) == []


def test_a_stage_never_imports_another_stage():
    graph = imports()
    for stage in STAGES:
        assert not graph[stage] & (STAGES - {stage}), (stage, graph[stage] & STAGES)
    assert "dcfeat.train" not in graph["dcfeat.finetune"]


def test_nothing_in_the_package_imports_pipelines_or_tests():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("pipelines", "tests") for n in names), path


def test_modules_stay_small():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long
