"""The package's import graph: one-way layers and no cycles.

Every import counts, including those inside functions: hiding an import in a
function keeps a cycle out of module start-up but not out of the design.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "keras_sd"

# Lower layers may not import higher ones (a module may import its own layer).
LAYERS = [
    {"keras_sd.backend"},
    {"keras_sd.tokenizer", "keras_sd.models", "keras_sd.schedulers"},
    {"keras_sd.presets"},
    {"keras_sd.weights"},
    {"keras_sd.sampling"},
    {"keras_sd.pipeline", "keras_sd.training"},
    {"keras_sd.compat"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """`{module: keras_sd modules it imports}` over every file of the package."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # `from keras_sd.x import y` imports module x (and y if y is a module); a module's
        # own enclosing packages are not edges (`from keras_sd.backend import devices`
        # inside keras_sd.backend.cache names its sibling, not a new dependency).
        graph[name] = {
            m
            for m in _imports(path, name)
            if m in files and m != name and not name.startswith(m + ".")
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def _layer(module: str) -> int | None:
    for level, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return level
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_layers_import_only_downwards():
    wrong = []
    for module, imported in import_graph().items():
        level = _layer(module)
        for other in imported:
            other_level = _layer(other)
            if level is not None and other_level is not None and other_level > level:
                wrong.append(f"{module} imports {other}")
    assert not wrong, wrong


def test_weights_never_import_the_pipeline():
    graph = import_graph()
    assert "keras_sd.pipeline" in graph  # the walk sees the package
    for module, imported in graph.items():
        if module.startswith("keras_sd.weights"):
            assert "keras_sd.pipeline" not in imported, module
