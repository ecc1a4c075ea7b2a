import subprocess
import sys

import pytest

from quantmoe.allocator import ARENAS, M_ARENA_MAX, M_TOP_PAD, TOP_PAD_BYTES, tune_malloc


class _FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_one_arena_and_a_64_mb_top_pad():
    libc = _FakeLibc()
    assert tune_malloc({}, libc) is True
    assert sorted(libc.calls) == sorted([(M_ARENA_MAX, ARENAS), (M_TOP_PAD, TOP_PAD_BYTES)])
    assert (M_ARENA_MAX, M_TOP_PAD, ARENAS, TOP_PAD_BYTES) == (-8, -2, 1, 64 << 20)  # glibc's malloc.h numbers


def test_the_users_choice_wins():
    for environ in ({"QUANTMOE_MALLOC": "default"}, {"MALLOC_ARENA_MAX": "4"}, {"MALLOC_TOP_PAD_": "0"},
                    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}):
        libc = _FakeLibc()
        assert tune_malloc(environ, libc) is False and libc.calls == [], environ


def test_a_refused_setting_is_reported():
    assert tune_malloc({}, _FakeLibc(answer=0)) is False


def test_the_command_applies_it_before_anything_else(monkeypatch):
    import quantmoe.cli as cli

    order = []

    def parser():
        order.append("parser")
        raise SystemExit(0)

    monkeypatch.setattr(cli, "tune_malloc", lambda: order.append("malloc"))
    monkeypatch.setattr(cli, "build_parser", parser)
    with pytest.raises(SystemExit):
        cli.main(["families"])
    assert order == ["malloc", "parser"]


def test_real_glibc_accepts_it():
    """In a fresh interpreter on this (glibc Linux) machine, mallopt takes both settings."""
    code = "from quantmoe.allocator import tune_malloc; print(tune_malloc({}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("True" if sys.platform.startswith("linux") else "False")
