"""The module layout of docs/architecture.md's table, checked on the source: arrows point down only.

The table is the source of truth: every module of the package is in exactly one of its layers,
and every import (function bodies included) goes to the same layer or one below, never from
one stage to another.
"""

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dcfeat"
# What each layer may import; a stage imports only its own modules of the stages layer (a stage package's:
# test_a_stage_never_imports_another_stage), never another stage.
MAY_IMPORT = {
    "command line": {"command line", "stages", "model", "support", "fixtures"},
    "stages": {"stages", "model", "support"},
    "model": {"model", "support"},
    "support": {"support"},
    "fixtures": {"fixtures", "support"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports() -> dict[str, set[str]]:
    """dcfeat module → the dcfeat modules it imports, anywhere in its body (functions included)."""
    return {name: set(found) for name, found in _import_graph().items()}


@functools.cache
def _import_graph() -> dict[str, frozenset[str]]:
    """`imports()`, parsed once per session (every module's syntax tree: a second or so of CPU)."""
    found_modules = modules()
    graph = {}
    for name, path in found_modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from dcfeat import x`: module dcfeat.x, or the package root for anything else but
                # its version (a plain string that every layer may read).
                submodules = {f"{node.module}.{a.name}" for a in node.names} & set(found_modules)
                if submodules != {f"{node.module}.{a.name}" for a in node.names} and \
                        [a.name for a in node.names] != ["__version__"]:
                    found.add(node.module)
                found |= submodules
        graph[name] = frozenset(m for m in found if m in found_modules and m != name)
    return graph


def layers() -> dict[str, str]:
    """Module → its layer, as docs/architecture.md's table says."""
    section = (ROOT / "docs" / "architecture.md").read_text()
    layer_of, layer = {}, None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("layer", "---"):
            continue
        layer = cells[0] or layer
        for file in re.findall(r"`([\w/]+\.py)`", cells[1]):
            module = _module_name(PACKAGE / file)
            assert module not in layer_of, f"{file} is in two rows of docs/architecture.md's table"
            layer_of[module] = layer
    return layer_of


def test_readme_places_every_module_in_one_known_layer():
    layer_of = layers()
    assert set(layer_of.values()) <= set(MAY_IMPORT)
    assert set(layer_of) == set(modules()), (set(modules()) - set(layer_of), set(layer_of) - set(modules()))
    assert {m for m, layer in layer_of.items() if layer == "stages"} >= {
        "dcfeat.extract", "dcfeat.train", "dcfeat.calibrate", "dcfeat.evaluate", "dcfeat.predict"}


def test_imports_point_down_only():
    layer_of, graph = layers(), imports()
    upward = sorted((m, n) for m, targets in graph.items() for n in targets
                    if layer_of[n] not in MAY_IMPORT[layer_of[m]])
    assert upward == []


def _stage(module: str) -> str:
    """The stage a module belongs to: a stage is a module (dcfeat.train) or a package (dcfeat.serve.*)."""
    return ".".join(module.split(".")[:2])


def test_a_stage_never_imports_another_stage():
    """The modules of one stage package may import each other; nothing imports another stage."""
    layer_of, graph = layers(), imports()
    stages = {m for m, layer in layer_of.items() if layer == "stages"}
    assert sorted((s, t) for s in stages for t in graph[s] & stages if _stage(s) != _stage(t)) == []


def test_the_rules_catch_a_stage_importing_another():
    """A module of a stage package importing another stage is seen; its own package's modules are not."""
    layer_of = layers()
    stages = {m for m, layer in layer_of.items() if layer == "stages"}
    graph = {**imports(), "dcfeat.serve.app": imports()["dcfeat.serve.app"] | {"dcfeat.predict"}}
    assert "dcfeat.serve.batcher" in graph["dcfeat.serve.app"]
    assert sorted((s, t) for s in stages for t in graph[s] & stages if _stage(s) != _stage(t)) == [
        ("dcfeat.serve.app", "dcfeat.predict")]


def test_the_rules_catch_an_upward_import(tmp_path):
    """The checks above can fail: an import from support up to the model layer is seen."""
    layer_of = layers()
    graph = {**imports(), "dcfeat.sampling": imports()["dcfeat.sampling"] | {"dcfeat.model"}}
    assert [(m, n) for m, t in graph.items() for n in t if layer_of[n] not in MAY_IMPORT[layer_of[m]]] == [
        ("dcfeat.sampling", "dcfeat.model")]


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


def test_nothing_in_the_package_imports_pipelines_or_tests():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("pipelines", "tests") for n in names), path


def test_every_module_says_what_it_holds():
    """A module docstring whose first line names its concept (__main__ is two lines of code)."""
    missing = [m for m, p in modules().items()
               if m != "dcfeat.__main__" and not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert missing == []


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["evaluate", "--help"]])
def test_the_command_line_answers_help_without_torch_or_matplotlib(args):
    """Stages are imported when their command runs: help and version load neither."""
    code = ("import sys; from dcfeat.cli import main\n"
            "try:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'h5py', 'polars') if m in sys.modules))" % args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
