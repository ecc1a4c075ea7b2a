import json

import pytest

from quantmoe.safeout import (
    OutputRefused,
    check_file_output,
    check_folder_output,
    claim_folder,
    is_our_folder,
    starts_with,
)


def test_what_counts_as_ours(tmp_path):
    marked = claim_folder(tmp_path / "marked", "report")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "quantization_config.json").write_text(json.dumps({"format": "quantmoe"}))
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"quantization_config": {"meta": {"quantizer": ["quantmoe:0.1"]}}}))
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# Benchmark report: demo\n")
    assert all(is_our_folder(p) for p in (marked, ckpt, export, report))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "quantization_config.json").write_text(json.dumps({"format": "gptq"}))
    (foreign / "config.json").write_text(json.dumps({"quantization_config": {"meta": {"quantizer": ["gptqmodel:7"]}}}))
    (foreign / "report.md").write_text("# My notes\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "quantization_config.json").write_text("{not json")
    assert not any(is_our_folder(p) for p in (foreign, broken, tmp_path / "missing"))


def test_folder_rules(tmp_path):
    ours = claim_folder(tmp_path / "ours", "checkpoint")
    (tmp_path / "empty").mkdir()
    assert check_folder_output(tmp_path / "new", overwrite=False) == (tmp_path / "new").resolve()
    assert check_folder_output(tmp_path / "empty", overwrite=False)
    with pytest.raises(OutputRefused, match="--overwrite"):
        check_folder_output(ours, overwrite=False)
    assert check_folder_output(ours, overwrite=True) and check_folder_output(ours, overwrite=False, refresh_ours=True)
    with pytest.raises(OutputRefused, match="source model"):
        check_folder_output(tmp_path / "empty", overwrite=True, protect=[tmp_path / "empty"])
    with pytest.raises(OutputRefused, match="holding the source model"):
        check_folder_output(tmp_path, overwrite=True, protect=[tmp_path / "empty"])


def test_file_rules(tmp_path):
    ours, foreign = tmp_path / "ours.yaml", tmp_path / "notes.yaml"
    ours.write_text("# quantmoe plan x\ndefault: {bits: 4}\n")
    foreign.write_text("default: {bits: 4}\n")
    is_ours = starts_with("# quantmoe")
    assert check_file_output(tmp_path / "new.yaml", overwrite=False, ours=is_ours)
    with pytest.raises(OutputRefused, match="--overwrite"):
        check_file_output(ours, overwrite=False, ours=is_ours)
    assert check_file_output(ours, overwrite=True, ours=is_ours)
    assert check_file_output(ours, overwrite=False, ours=is_ours, append=True)
    for overwrite in (False, True):
        with pytest.raises(OutputRefused, match="did not write"):
            check_file_output(foreign, overwrite=overwrite, ours=is_ours, append=True)
    with pytest.raises(OutputRefused, match="is a folder"):
        check_file_output(tmp_path, overwrite=True, ours=is_ours)
    assert foreign.read_text() == "default: {bits: 4}\n"


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from quantmoe.safeout import remove_stale_temporaries

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = tmp_path / f".checkpoint-{proc.pid}-abcdefgh"
    alive = tmp_path / f".checkpoint-{os.getpid()}-abcdefgh"
    other = tmp_path / ".checkpoint-notes"
    for p in (dead, alive, other):
        (p / "model").mkdir(parents=True)
    remove_stale_temporaries(tmp_path, ".checkpoint-")
    assert not dead.exists() and alive.is_dir() and other.is_dir()


def test_temporaries_are_judged_by_host_and_pid(tmp_path):
    """Several hosts may share a filesystem: a pid is only checked on the host that named the folder."""
    import os
    import subprocess
    import sys

    from quantmoe.safeout import HOST_TAG, owner_tag, remove_stale_temporaries

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    other_host = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    dead_here = tmp_path / f".checkpoint-{proc.pid}@{HOST_TAG}-abcdefgh"
    elsewhere = tmp_path / f".checkpoint-{proc.pid}@{other_host}-abcdefgh"  # same pid, another machine
    mine = tmp_path / f".checkpoint-{owner_tag()}-abcdefgh"
    for p in (dead_here, elsewhere, mine):
        (p / "model").mkdir(parents=True)
    remove_stale_temporaries(tmp_path, ".checkpoint-")
    assert not dead_here.exists() and elsewhere.is_dir() and mine.is_dir()
    assert owner_tag() == f"{os.getpid()}@{HOST_TAG}"
