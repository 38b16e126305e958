"""The package's layers: each subpackage imports only those below it, so each can be read (and
imported) without the ones above, and no module imports itself in a circle, also through the
imports made inside a function. Annotation-only imports (under TYPE_CHECKING) do not count.

    errors                      what every layer may raise
    kernels/                    the fast paths: backend, fused loops, CUDA kernels, radix select
    nn/                         layers, methods, the model, optimizers
    data/                       dataset sources and their preparation
    run/                        the spec, the loop, the run store, the run's lifecycle
    commands/                   sweep, compare, inspect, export, bench
    api.py, cli.py              the Python API and the command line, on top
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "scoretrain"

# package -> the packages it may import (besides itself and errors)
ALLOWED = {
    "errors": set(),
    "kernels": set(),
    "nn": {"kernels"},
    "data": set(),
    "run": {"kernels", "nn", "data"},
    "commands": {"kernels", "nn", "data", "run"},
    "top": {"kernels", "nn", "data", "run", "commands"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    head = module.split(".")[0]
    if head in ALLOWED and head != "top":
        return head
    return "top"  # api, cli, __init__, __main__


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for inner in node.body:
                lines.update(range(inner.lineno, inner.end_lineno + 1))
    return lines


def imports() -> dict[str, set[str]]:
    """module (dotted, below scoretrain) -> the package's modules it imports, anywhere in it."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        found = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.lineno in skip:
                continue
            if node.level:
                base = here[: len(here) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "scoretrain":
                base = []
                node = ast.ImportFrom(module=node.module.partition(".")[2] or None, names=node.names, level=0)
            else:
                continue
            target = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                for candidate in (".".join(target + [alias.name]), ".".join(target)):
                    if candidate in modules:
                        found.add(candidate)
                        break
        graph[name] = found - {name, ""}
    return graph


def test_each_package_imports_only_the_ones_below_it():
    wrong = []
    for module, targets in imports().items():
        mine = package_of(module)
        for target in targets:
            theirs = package_of(target)
            if theirs not in ALLOWED[mine] | {mine, "errors"} and module:
                wrong.append(f"{module} ({mine}/) imports {target} ({theirs}/)")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_sees_imports():
    """The check above reads real imports: the run loop imports the network, the CLI the API."""
    graph = imports()
    assert "nn.model" in graph["run.train"] and "nn.layers" in graph["nn.model"]
    assert "api" in graph["cli"] and "kernels.backend" in graph["nn.layers"]
    assert "run.config" not in graph["nn.model"]  # its annotation-only import does not count


def test_the_modules_import_one_another_without_a_circle():
    graph = imports()
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "an import circle: " + " -> ".join(path[path.index(module):] + [module])
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            visit(other, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_test_infrastructure_has_a_folder_of_its_own():
    tests = Path(__file__).resolve().parent
    assert not [p.name for p in tests.glob("*.py") if not p.name.startswith(("test_", "conftest"))]
