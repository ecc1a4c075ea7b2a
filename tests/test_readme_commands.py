"""The command blocks of README.md and docs/*.md run, in order, on a fresh working folder.

Each file's ```bash blocks run top to bottom in an empty folder of their own (with the
clone's `sweeps/`, `embedded/` and `docs/` beside them, as on a fresh clone), so a command
that needs a file must come after the command that writes it. Lines marked `# needs the
hub`, `# needs a GPU`, `# rebuilds the zoo` or `# run by hand` (pip, the mutation check) are skipped (no network,
no GPU here), and so are `make demo` (the
11-minute job) and `make test` (this suite); every
other line must be a `quantmoe` command and must succeed. Commands run in this process
(`quantmoe.cli.main` with the line's own arguments) to save the start-up time of each one.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from quantmoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = {"needs the hub": "no hub here", "needs a GPU": "no GPU here", "rebuilds the zoo": "rebuilds the embedded models",
        "run by hand": "a setup or development step, not a quantmoe command",
        "needs a Ray cluster": "no Ray cluster here"}
PROGRAMS = (".venv/bin/quantmoe", "quantmoe")


def bash_blocks(text: str) -> list[list[str]]:
    """The lines of each ```bash block (continuations joined)."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines, pending = [], ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
        blocks.append(lines)
    return blocks


def commands(path: Path) -> list[tuple[str, str | None]]:
    """(line, reason to skip or None) for every command line of the file's bash blocks."""
    out = []
    for block in bash_blocks(path.read_text(encoding="utf-8")):
        for line in block:
            if not line.strip() or line.strip().startswith("#"):
                continue
            reason = next((why for marker, why in SKIP.items() if marker in line), None)
            if line.split()[0] == "make":  # `make demo` is the 11-minute job, `make test` this suite
                reason = "make targets are not run by the suite"
            out.append((line.strip(), reason))
    return out


def test_the_extraction_sees_the_readme_commands():
    cmds = commands(ROOT / "README.md")
    runnable = [c for c, why in cmds if why is None]
    assert any("quantize deepseek-s --plan plan-ds.yaml" in c for c in runnable)
    assert any("inspect mistralai/Mixtral-8x7B-v0.1" in c for c, why in cmds if why == "no hub here")
    # the plan is written before the command that reads it
    written = next(i for i, c in enumerate(runnable) if "--out plan-ds.yaml" in c)
    read = next(i for i, c in enumerate(runnable) if "--plan plan-ds.yaml" in c)
    assert written < read


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quantmoe-cache")


@pytest.mark.parametrize("doc", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_commands_run_in_order(doc, tmp_path, monkeypatch, shared_cache, caplog):
    cmds = commands(doc)
    if not cmds:
        pytest.skip(f"{doc.name} has no bash command block")
    for name in ("sweeps", "embedded", "docs"):  # what a fresh clone has beside the commands' outputs
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTMOE_CACHE", str(shared_cache))
    skipped = []
    for line, reason in cmds:
        if reason is not None:
            skipped.append(f"{line}  [{reason}]")
            continue
        argv = shlex.split(line, comments=True)
        assert argv[0] in PROGRAMS, f"{doc.name}: {line!r} is not a quantmoe command"
        caplog.clear()
        try:
            code = main(argv[1:])
        except SystemExit as stop:  # --help
            code = stop.code
        assert code == 0, f"{doc.name}: `{line}` exited with {code}:\n{caplog.text[-2000:]}"
    if skipped:
        print(f"{doc.name}: skipped " + "; ".join(skipped))
