"""Where ``quantmoe bench``, ``quantmoe report`` and the demo may write (the rule: ``quantmoe.safeout``).

A results store is appended to only when it is quantmoe's; a report folder is new, empty or
an earlier report (rebuilt in place), and is marked as quantmoe's before any file goes in.
"""

from __future__ import annotations

from pathlib import Path

from quantmoe.safeout import check_file_output, check_folder_output, claim_folder

SQLITE_HEADER = b"SQLite format 3\x00"


def is_results_store(path: Path) -> bool:
    """Whether ``path`` is a results store quantmoe wrote (an SQLite file with its ``runs`` and ``meta`` tables)."""
    import sqlite3

    try:
        with open(path, "rb") as fh:
            if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                return False
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except (OSError, sqlite3.DatabaseError):
        return False
    return {"runs", "meta"} <= tables


def check_store(store: Path) -> Path:
    """A results store path quantmoe may append to: new, or a store of ours (never a foreign file)."""
    return check_file_output(store, overwrite=False, ours=is_results_store, what="results store",
                             option="--store", append=True)


def check_report_dir(out: Path) -> Path:
    """A report folder quantmoe may (re)write: new, empty, or an earlier report (rebuilt in place)."""
    return check_folder_output(out, overwrite=False, what="report", refresh_ours=True)


def prepare_report_dir(out: Path) -> Path:
    """``check_report_dir``, then mark the folder as ours before any file goes in."""
    check_report_dir(out)
    return claim_folder(out, "report")
