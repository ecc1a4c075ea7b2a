"""The results store: one SQLite row per finished run, everything needed to reproduce it.

A row is written in a single transaction once its run has finished, so a run killed at any
moment (even ``kill -9``) leaves either the complete row or nothing; rerunning the same
sweep skips the keys already present. ``key`` is a hash of everything the run computes
(model and its weights, allocation, quantizer, calibration and seed, evaluation), so a
changed setting is a new run and never a stale hit.

Per-model artifacts that reports need (the anatomy's expert layout, routing statistics)
live in a second table, keyed by the model's weight hash. Runs that failed (a distributed
sweep records a run whose retries are spent, with its error) live in a third table,
``failures``: a failed key is not in ``runs``, so the next invocation runs it again, and its
failure row is removed once it succeeds.

Testing hook: with ``QUANTMOE_TEST_PAUSE=store-row-in-transaction:FILE`` (see
``quantmoe.safeout.pause_for_test``) ``add`` creates FILE and sleeps inside the row's
transaction, after the row is written and before it is committed: the worst moment for a
``kill -9`` (tests/bench/test_runner.py). Unset, it does nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from quantmoe.safeout import pause_for_test

SCHEMA_VERSION = 1

_JSON_FIELDS = ("spec", "plan", "bitmap", "quantizer", "calibration", "evaluation", "versions", "metrics",
                "fallbacks", "engines")
ADDED_COLUMNS = ("engines",)  # added to stores written before them: NULL there, read as empty


@dataclass(frozen=True)
class FailedRun:
    """A run whose every attempt failed; it is not in ``runs`` and is run again on the next invocation."""

    key: str
    sweep: str
    model: str
    run: str
    seed: int | None
    attempts: int  # how many times it was tried in the invocation that recorded it
    error: str  # the last attempt's error (type and message)
    created_at: str


@dataclass(frozen=True)
class RunRecord:
    key: str
    sweep: str
    model: str  # as named in the sweep
    model_sha256: str  # of the full-precision weights
    run: str  # the run's name in the sweep
    spec: Mapping[str, Any]  # policy / plan / solver / full_precision
    seed: int | None  # calibration seed (None: nothing calibrated)
    average_bits: float  # sum(bits x params) / sum(params) over quantizable linears
    effective_bits: float  # including scales and zeros
    plan: Mapping[str, int]  # module -> bits
    bitmap: Mapping[str, Any]  # per block: attention / dense / shared bits and bits per routed expert
    quantizer: Mapping[str, Any]
    calibration: Mapping[str, Any]
    evaluation: Mapping[str, Any]
    versions: Mapping[str, str]
    metrics: Mapping[str, Any]  # ppl, nll, kl_*, top1_agreement, task:<name>, task_mean
    fallbacks: tuple[str, ...] | list[str]
    quant_seconds: float
    peak_rss_mb: float
    peak_device_mb: float | None
    checkpoint_bytes: int | None
    created_at: str
    # serving engine -> "" when it can load the plan's GPTQ export, else the first reason (quantmoe.export.engines);
    # empty for full precision and for rows stored before this column existed
    engines: Mapping[str, str] = field(default_factory=dict)


_COLUMNS = tuple(f.name for f in fields(RunRecord))
PAUSE_POINT = "store-row-in-transaction"
_SQL_TYPES = {"seed": "INTEGER", "average_bits": "REAL", "effective_bits": "REAL", "quant_seconds": "REAL",
              "peak_rss_mb": "REAL", "peak_device_mb": "REAL", "checkpoint_bytes": "INTEGER"}


def _schema() -> str:
    cols = ",\n  ".join(f"{c} {_SQL_TYPES.get(c, 'TEXT')}{' PRIMARY KEY' if c == 'key' else ''}" for c in _COLUMNS)
    return (f"CREATE TABLE IF NOT EXISTS runs (\n  {cols}\n);\n"
            "CREATE TABLE IF NOT EXISTS artifacts (model_sha256 TEXT, kind TEXT, json TEXT, "
            "PRIMARY KEY (model_sha256, kind));\n"
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);\n"
            "CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, sweep TEXT, model TEXT, run TEXT, "
            "seed INTEGER, attempts INTEGER, error TEXT, created_at TEXT);\n")


class ResultsStore:
    """``with ResultsStore(path) as store: ...`` — rows of finished runs and per-model artifacts."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"results store {self.path} not found: run `quantmoe bench SWEEP.yaml` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_schema())
            have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
            for column in ADDED_COLUMNS:
                if column not in have:
                    self._db.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._db.commit()
            version = self._db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path} is not a quantmoe results store ({err}); give another --store path") \
                from None
        if int(version) != SCHEMA_VERSION:
            raise ValueError(f"{self.path} has results schema {version}, this quantmoe reads {SCHEMA_VERSION}: "
                             "use a new --store path")

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db:  # commits on success, rolls back on error
            yield self._db

    # --- runs ---------------------------------------------------------------------------------

    def keys(self) -> set[str]:
        return {k for (k,) in self._db.execute("SELECT key FROM runs")}

    def add(self, record: RunRecord) -> bool:
        """Insert a finished run, all its columns and metrics in one statement and one transaction;
        False (and nothing written) when its key is already stored."""
        row = asdict(record)
        values = [json.dumps(row[c], sort_keys=True) if c in _JSON_FIELDS else row[c] for c in _COLUMNS]
        with self._transaction() as db:
            cur = db.execute(f"INSERT OR IGNORE INTO runs ({', '.join(_COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(_COLUMNS))})", values)
            pause_for_test(PAUSE_POINT)
            db.execute("DELETE FROM failures WHERE key = ?", (record.key,))
            return cur.rowcount == 1

    def records(self, sweep: str | None = None) -> list[RunRecord]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM runs"
        args: tuple = ()
        if sweep is not None:
            query += " WHERE sweep = ?"
            args = (sweep,)
        out = []
        for row in self._db.execute(query + " ORDER BY created_at, key", args):
            data = dict(zip(_COLUMNS, row))
            for c in _JSON_FIELDS:
                data[c] = json.loads(data[c]) if data[c] is not None else {}
            data["fallbacks"] = tuple(data["fallbacks"])
            data["plan"] = {k: int(v) for k, v in data["plan"].items()}
            out.append(RunRecord(**data))
        return out

    # --- failed runs ----------------------------------------------------------------------------

    def add_failure(self, failure: FailedRun) -> None:
        """Record (or replace) the failure of a run that is not stored; a stored run is never marked failed."""
        row = asdict(failure)
        names = list(row)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (failure.key,)).fetchone() is None:
                db.execute(f"INSERT OR REPLACE INTO failures ({', '.join(names)}) "
                           f"VALUES ({', '.join('?' * len(names))})", [row[n] for n in names])

    def failures(self, sweep: str | None = None) -> list[FailedRun]:
        names = [f.name for f in fields(FailedRun)]
        query = f"SELECT {', '.join(names)} FROM failures"
        args: tuple = ()
        if sweep is not None:
            query += " WHERE sweep = ?"
            args = (sweep,)
        return [FailedRun(**dict(zip(names, row))) for row in self._db.execute(query + " ORDER BY created_at", args)]

    # --- per-model artifacts ------------------------------------------------------------------

    def put_artifact(self, model_sha256: str, kind: str, value: Any) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)",
                       (model_sha256, kind, json.dumps(value, sort_keys=True)))

    def artifact(self, model_sha256: str, kind: str) -> Any | None:
        row = self._db.execute("SELECT json FROM artifacts WHERE model_sha256 = ? AND kind = ?",
                               (model_sha256, kind)).fetchone()
        return None if row is None else json.loads(row[0])
