"""Reading a YAML file a user wrote (plan, policy, sweep): one clear error naming the file and line.

Example::

    >>> data = read_yaml(Path("plan.yaml"), "plan")  # doctest: +SKIP
    ValueError: plan.yaml: not valid YAML at line 3, column 9: mapping values are not allowed here; fix the plan
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """The content of ``path`` (``safe_load``). A missing file is a FileNotFoundError, an unreadable or
    malformed one a ValueError; both name the file (and the line and column of a syntax error)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found")
    if not path.is_file():
        raise ValueError(f"{what} {path} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {err.start}): save the {what} as UTF-8") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where}: {problem}; fix the {what}") from None
