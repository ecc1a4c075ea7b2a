"""Library modules do not depend on the command-line layer: CLIs parse arguments and call the library."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "quantmoe"
CLI_MODULES = {"quantmoe.cli", "quantmoe.alloc.cli", "quantmoe.alloc.solve_cli", "quantmoe.bench.cli",
               "quantmoe.quant.cli", "quantmoe.zoo.cli", "quantmoe.export.cli"}


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
        if module in CLI_MODULES:
            continue
        bad = sorted(n for n in _imports(path) if n in CLI_MODULES or n == "argparse")
        if bad:
            offenders[module] = bad
    assert not offenders, f"library modules importing the CLI layer: {offenders}"
