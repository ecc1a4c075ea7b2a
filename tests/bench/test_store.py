import sqlite3

import pytest

from quantmoe.bench.store import ResultsStore, RunRecord


def record(key: str, seed: int | None = 0, kl: float = 0.1) -> RunRecord:
    return RunRecord(key=key, sweep="s", model="m", model_sha256="abc", run="r", spec={"policy": "uniform=2"},
                     seed=seed, average_bits=2.0, effective_bits=2.14, plan={"a.b": 2},
                     bitmap={"blocks": []}, quantizer={"method": "gptq"}, calibration={"seed": seed},
                     evaluation={}, versions={"torch": "x"}, metrics={"ppl": 10.0, "kl_mean": kl},
                     fallbacks=("a.c",), quant_seconds=1.5, peak_rss_mb=100.0, peak_device_mb=None,
                     checkpoint_bytes=1234, created_at="2026-01-01T00:00:00.000+00:00")


def test_round_trip_and_no_duplicates(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultsStore(path) as store:
        assert store.add(record("k1"))
        assert not store.add(record("k1", kl=0.5))  # same key: nothing written
        assert store.add(record("k2", seed=None))
        store.put_artifact("abc", "routing", {"frequency": {"1": [0.5, 0.5]}})
    with ResultsStore(path, create=False) as store:
        rows = store.records()
        assert [r.key for r in rows] == ["k1", "k2"]
        assert rows[0] == record("k1")
        assert rows[1].seed is None
        assert store.artifact("abc", "routing") == {"frequency": {"1": [0.5, 0.5]}}
        assert store.artifact("abc", "missing") is None
        assert store.records(sweep="other") == []


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantmoe bench"):
        ResultsStore(tmp_path / "none.sqlite", create=False)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a quantmoe results store"):
        ResultsStore(junk)


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultsStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="schema 99"):
        ResultsStore(path)


def test_a_failed_run_stays_pending_and_its_failure_goes_once_it_is_stored(tmp_path):
    from quantmoe.bench.store import FailedRun

    fail = lambda key: FailedRun(key=key, sweep="s", model="m", run="r", seed=1, attempts=3,
                                 error="RuntimeError: boom", created_at="2026-01-01T00:00:00")
    with ResultsStore(tmp_path / "s.sqlite") as store:
        store.add(record("done"))
        store.add_failure(fail("done"))  # a stored run is never marked failed
        store.add_failure(fail("k"))
        assert [f.key for f in store.failures()] == ["k"] and store.keys() == {"done"}  # "k" is still to run
        assert store.failures("other sweep") == []
        store.add(record("k"))
        assert store.failures() == [] and store.keys() == {"done", "k"}


def test_a_store_from_before_the_engines_column_opens_and_reads(tmp_path):
    import dataclasses
    import sqlite3

    path = tmp_path / "old.sqlite"
    with ResultsStore(path) as store:
        store.add(dataclasses.replace(record("old"), engines={"vllm": ""}))
    with sqlite3.connect(path) as db:  # the schema before the column existed
        db.execute("ALTER TABLE runs DROP COLUMN engines")
    with ResultsStore(path) as store:
        (old,) = store.records()
        assert old.engines == {}  # not recorded: the report shows "-"
        assert store.add(dataclasses.replace(record("new"), engines={"vllm": "reason"}))
        assert {r.key: r.engines for r in store.records()} == {old.key: {}, "new": {"vllm": "reason"}}
