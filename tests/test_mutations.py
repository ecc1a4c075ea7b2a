"""The mutation check (tests/mutations.py) stays runnable: every anchor still occurs once, every named test exists."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutations():
    spec = importlib.util.spec_from_file_location("quantmoe_mutations", ROOT / "tests" / "mutations.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))  # dataclasses look it up
    spec.loader.exec_module(module)
    return module.MUTATIONS


def test_every_anchor_occurs_once_and_every_named_test_exists():
    mutations = _mutations()
    assert len({m.name for m in mutations}) == len(mutations)
    drifted, missing = [], []
    for m in mutations:
        for patch in m.patches:
            text = (ROOT / "src" / "quantmoe" / patch.file).read_text(encoding="utf-8")
            if text.count(patch.anchor) != 1:
                drifted.append(f"{m.name} ({patch.file}: {text.count(patch.anchor)} matches)")
        for test in m.tests:
            file, _, node = test.partition("::")
            function = node.split("[")[0]
            path = ROOT / file
            if not path.exists() or (function and f"def {function}(" not in path.read_text(encoding="utf-8")):
                missing.append(f"{m.name}: {test}")
    assert not drifted, f"the code changed under these mutations, rewrite them: {drifted}"
    assert not missing, f"these mutations name tests that do not exist: {missing}"
