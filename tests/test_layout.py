"""The package's modules import one another in one direction (config -> data -> model -> train ->
store -> cli, roughly): no circle, also through the imports made inside a function, so each
module can be read, and imported, on its own terms."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "scoretrain"


def imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in it."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scoretrain."):
                found.add(node.module.split(".")[1])
        graph[name] = found & modules
    return graph


def test_the_modules_import_one_another_without_a_circle():
    graph = imports()
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "an import circle: " + " -> ".join(path[path.index(module):] + [module])
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert "layers" in graph["model"] and "model" not in graph["layers"]  # the layers have a room of their own
