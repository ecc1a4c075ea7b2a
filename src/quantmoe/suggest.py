""""Did you mean" for unknown keys and names: one helper for every message that needs it.

Example:
    >>> did_you_mean("seedz", ["seeds", "store", "models"])
    "did you mean 'seeds'?"
    >>> did_you_mean("xyz", ["seeds"])
    ''
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

CUTOFF = 0.6  # difflib similarity ratio below which a name is not offered


def close_matches(word: str, choices: Iterable[str], n: int = 3, cutoff: float = CUTOFF) -> list[str]:
    """Up to ``n`` of ``choices`` closest to ``word``, best first (difflib's ratio >= ``cutoff``)."""
    return difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str], n: int = 3, cutoff: float = CUTOFF) -> str:
    """``did you mean 'a' or 'b'?`` for the names of ``choices`` close to ``word``, else ``''``."""
    close = close_matches(word, choices, n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(map(repr, close))}?" if close else ""
