"""Where quantmoe may write: it never deletes or overwrites what it did not write.

Every command that writes (``quantize --out``, ``plan/solve --out``, reports, results
stores) checks its output path here first:

* a path that does not exist, or an empty folder, is fine;
* a path quantmoe wrote earlier (one of *ours*) is replaced only with ``overwrite=True``
  (``--overwrite``); report folders, being rebuilt from their store, are always refreshed;
* anything else (a non-empty folder quantmoe did not write, a file where a folder goes, a
  folder where a file goes, the source model's own folder or a folder holding it) is
  refused with an :class:`OutputRefused` error naming the path and the fix, and left as is.

A folder is ours when it holds the marker file ``.quantmoe-output`` (written by
:func:`claim_folder`), a ``quantization_config.json`` with quantmoe's format tag (a quantized
checkpoint), a ``config.json`` whose ``quantization_config.meta.quantizer`` names quantmoe
(a GPTQ export), or a ``report.md`` that starts with quantmoe's report heading.

Example::

    >>> check_folder_output(Path("q4"), overwrite=False, protect=[Path("models/src")])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".quantmoe-output"
PAUSE_ENV = "QUANTMOE_TEST_PAUSE"  # "POINT:FLAG_FILE": at POINT, create FLAG_FILE and sleep (kill tests only)


class OutputRefused(ValueError):
    """An output path quantmoe must not write to (the message says why and what to do)."""


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline(200)
    except OSError:
        return ""


def is_our_folder(path: Path) -> bool:
    """Whether ``path`` is a folder quantmoe wrote (see the module docstring for the signs)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER).is_file():
        return True
    qcfg = _json(path / "quantization_config.json")
    if qcfg is not None and qcfg.get("format") == "quantmoe":
        return True
    cfg = _json(path / "config.json")
    meta = ((cfg or {}).get("quantization_config") or {}).get("meta") or {}
    quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
    if any(str(q).startswith("quantmoe") for q in ([quantizer] if isinstance(quantizer, str) else quantizer or [])):
        return True
    return _first_line(path / "report.md").startswith("# Benchmark report")


def claim_folder(path: Path, kind: str) -> Path:
    """Create ``path`` (if needed) and mark it as quantmoe's output of this ``kind``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
    return path


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_folder_output(path: Path, *, overwrite: bool, protect: Iterable[Path | str] = (),
                        what: str = "checkpoint", refresh_ours: bool = False) -> Path:
    """Refuse ``path`` as an output folder unless writing there loses nothing; return it resolved.

    ``protect``: folders that must survive (the source model). ``refresh_ours``: our own
    earlier output is replaced without ``overwrite`` (derived outputs such as reports).
    """
    out = Path(path).expanduser().resolve()
    for p in protect:
        src = Path(p).expanduser().resolve()
        if _within(src, out):
            what_it_is = "the source model" if src == out else "a folder holding the source model"
            raise OutputRefused(f"--out {path} is {what_it_is} ({src}): choose another output folder")
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir() or out.is_symlink():
        raise OutputRefused(f"--out {path} is an existing file, not a folder: choose a new folder path "
                            f"(quantmoe never replaces what it did not write)")
    if not any(out.iterdir()):
        return out
    if not is_our_folder(out):
        raise OutputRefused(f"--out {path} is a non-empty folder that quantmoe did not write: choose a new or empty "
                            f"folder (quantmoe never deletes what it did not write)")
    if not (overwrite or refresh_ours):
        raise OutputRefused(f"--out {path} holds an earlier quantmoe {what}: pass --overwrite to replace it, "
                            f"or choose another folder")
    return out


def check_file_output(path: Path, *, overwrite: bool, ours: Callable[[Path], bool], what: str = "file",
                      option: str = "--out", append: bool = False) -> Path:
    """Refuse ``path`` as an output file unless writing there loses nothing; return it.

    ``ours(path)`` says whether an existing file is one quantmoe wrote. ``append``: an
    existing file of ours is extended, not replaced (a results store), so it needs no
    ``overwrite``.
    """
    out = Path(path).expanduser()
    if not out.exists() and not out.is_symlink():
        return out
    if out.is_dir():
        raise OutputRefused(f"{option} {path} is a folder: give the path of a {what}")
    if not out.is_file() or not ours(out):
        raise OutputRefused(f"{option} {path} is an existing file that quantmoe did not write: choose another path "
                            f"(quantmoe never overwrites what it did not write)")
    if not (overwrite or append):
        raise OutputRefused(f"{option} {path} holds an earlier quantmoe {what}: pass --overwrite to replace it, "
                            f"or choose another path")
    return out


def starts_with(prefix: str) -> Callable[[Path], bool]:
    """An ``ours`` test for text files quantmoe writes with a recognisable first line."""
    return lambda path: _first_line(path).startswith(prefix)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (then its temporary folders are not leftovers)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


HOST_TAG = _host_tag()  # this machine, in the names of temporaries (several hosts may share a filesystem)
OWNER_PATTERN = r"(\d+)(?:@([0-9a-f]{8}))?"  # PID or PID@HOST in a temporary's name: groups (pid, host)


def owner_tag() -> str:
    """``PID@HOST`` of this process, for the names of its temporary files and folders."""
    return f"{os.getpid()}@{HOST_TAG}"


def owner_alive(pid: str | int, host: str | None) -> bool:
    """Whether the process that named a temporary ``PID@HOST`` may still run.

    Only a process of this host can be checked: one of another host (sharing the filesystem) counts as
    running, so its temporaries are never removed from here. Names without a host (written by earlier
    versions) are taken to be of this host.
    """
    if host is not None and host != HOST_TAG:
        return True
    return process_alive(int(pid))


def remove_stale_temporaries(parent: Path, prefix: str) -> None:
    """Remove ``PREFIX{PID@HOST}-*`` folders in ``parent`` whose process (of this host) no longer runs."""
    import re
    import shutil

    pattern = re.compile(rf"{re.escape(prefix)}{OWNER_PATTERN}-[a-z0-9_]{{8}}")
    for path in sorted(Path(parent).glob(f"{prefix}*")):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        if owner_alive(match.group(1), match.group(2)):
            if match.group(2) not in (None, HOST_TAG):
                log.info("%s belongs to a run on another host: left alone", path)
            continue
        shutil.rmtree(path)
        log.warning("removed %s, the temporary folder of an interrupted run", path)


def pause_for_test(point: str) -> None:
    """Tests only: when ``$QUANTMOE_TEST_PAUSE`` is ``POINT:FLAG``, create FLAG and sleep at POINT.

    Lets a test kill a subprocess (``kill -9``) at a chosen moment of a save.
    """
    setting = os.environ.get(PAUSE_ENV, "")
    name, _, flag = setting.partition(":")
    if name != point or not flag:
        return
    Path(flag).write_text(str(os.getpid()), encoding="utf-8")
    log.warning("paused at %s for a test (%s)", point, PAUSE_ENV)
    time.sleep(3600)
