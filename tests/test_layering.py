"""Library modules do not depend on the command-line layer: CLIs parse arguments and call the library."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "quantmoe"
CLI_MODULES = {"quantmoe.cli", "quantmoe.alloc.cli", "quantmoe.alloc.solve_cli", "quantmoe.bench.cli",
               "quantmoe.quant.cli", "quantmoe.zoo.cli", "quantmoe.export.cli"}
ENTRY_POINTS = {"quantmoe.__main__"}  # `python -m quantmoe` / `torchrun -m quantmoe`: runs the CLI, parses nothing


def _module(path: Path) -> str:
    return ".".join(("quantmoe", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_cli_modules_are_the_ones_named():
    found = {_module(p) for p in SRC.rglob("*.py") if "argparse" in _imports(p)}
    assert found == CLI_MODULES  # only command-line modules parse arguments


def test_library_modules_import_no_cli_module():
    offenders = {}
    for path in SRC.rglob("*.py"):
        module = _module(path)
        if module in CLI_MODULES | ENTRY_POINTS:
            continue
        bad = sorted(n for n in _imports(path) if n in CLI_MODULES or n == "argparse")
        if bad:
            offenders[module] = bad
    assert not offenders, f"library modules importing the CLI layer: {offenders}"


def _node(module: str) -> str:
    """The layer a module belongs to: the command-line layer for the CLI modules (they parse and call,
    on top of everything), else its subpackage (quantmoe.quant.plan -> quant) or a top-level module."""
    if module in CLI_MODULES:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "quantmoe"


def _targets(path: Path) -> set[str]:
    """Every quantmoe module a file imports, at top level or inside functions, relative imports resolved."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, (*package[:len(package) - node.level + 1], base)))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if (SRC.parent / base.replace(".", "/") / a.name)
                         .with_suffix(".py").exists() or (SRC.parent / base.replace(".", "/") / a.name).is_dir())
    return {n for n in names if n == "quantmoe" or n.startswith("quantmoe.")}


def import_graph() -> dict[str, set[str]]:
    """Layer -> the other layers it imports (subpackages and top-level modules are the layers)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        source = _node(_module(path))
        edges = graph.setdefault(source, set())
        edges.update(t for t in map(_node, _targets(path)) if t != source)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "quantmoe"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "zoo").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "quant" / "__init__.py").write_text("")
    (pkg / "zoo" / "__init__.py").write_text("")
    (pkg / "quant" / "api.py").write_text("def f():\n    from ..zoo import recipes\n")
    (pkg / "zoo" / "recipes.py").write_text("import quantmoe.quant.api\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    graph = import_graph()
    assert graph["quant"] == {"zoo"} and graph["zoo"] == {"quant"}
    assert find_cycle(graph) == ["quant", "zoo", "quant"]


def test_no_import_cycle_between_layers():
    graph = import_graph()
    assert {"anatomy", "calib", "quant", "alloc", "eval", "bench", "zoo", "data", "models"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between layers: " + " -> ".join(cycle or ())


def test_zoo_is_a_leaf_recipe():
    """Only the zoo itself and the command line import the embedded models' recipe."""
    importers = sorted(layer for layer, targets in import_graph().items() if "zoo" in targets)
    assert importers == ["cli"]
