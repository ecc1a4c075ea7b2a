"""The benches measure a tool's own peak RSS, not the peak their own process carries into the child."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))

from bench_scale import run  # noqa: E402


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's ru_maxrss semantics")
def test_a_child_started_through_the_launcher_reports_its_own_peak():
    ballast = bytearray(256 * 2**20)  # this process holds 256 MB more than a bare interpreter
    ballast[::4096] = b"\1" * len(ballast[::4096])
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(proc.pid, 0)
    straight = usage.ru_maxrss / 1024  # Linux: at least this process's RSS when it started the child
    _, launched, _ = run([sys.executable, "-c", "import sys; print(sys.version)"], dict(os.environ))
    assert straight > 256
    assert launched < 100 < straight  # a bare interpreter: tens of MB
    del ballast
