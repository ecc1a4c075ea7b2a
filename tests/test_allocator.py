import os
import subprocess
import sys

import pytest
import torch

from quantmoe.allocator import (
    ARENAS,
    KERNEL_CACHE_ENTRIES,
    KERNEL_CACHES,
    M_ARENA_MAX,
    M_TOP_PAD,
    TOP_PAD_BYTES,
    bound_kernel_caches,
    release_free_memory,
    tune_malloc,
)


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
    monkeypatch.setattr(cli, "bound_kernel_caches", lambda: order.append("kernel caches"))
    monkeypatch.setattr(cli, "build_parser", parser)
    with pytest.raises(SystemExit):
        cli.main(["families"])
    assert order == ["malloc", "kernel caches", "parser"]


def test_real_glibc_accepts_it():
    """In a fresh interpreter on this (glibc Linux) machine, mallopt takes both settings."""
    code = "from quantmoe.allocator import tune_malloc; print(tune_malloc({}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("True" if sys.platform.startswith("linux") else "False")


def test_kernel_caches_are_capped_unless_the_user_set_them():
    environ: dict[str, str] = {}
    assert bound_kernel_caches(environ) == environ == {name: "16" for name in KERNEL_CACHES}
    assert KERNEL_CACHES == ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY") and KERNEL_CACHE_ENTRIES == 16
    environ = {"LRU_CACHE_CAPACITY": "1024", "OTHER": "x"}
    assert bound_kernel_caches(environ) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}
    assert environ["LRU_CACHE_CAPACITY"] == "1024"


_EXPERT_CALLS = """
import sys, torch
from quantmoe.allocator import bound_kernel_caches
if sys.argv[1] == "bounded":
    bound_kernel_caches()  # after importing torch, before the first matmul: as the command does
torch.set_num_threads(1)
rss = lambda: next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
g = torch.Generator().manual_seed(0)
weights = [torch.randn(512, 1024, generator=g).bfloat16() for _ in range(64)]
x = torch.randn(500, 1024, generator=g).bfloat16()
before = rss()
for rep in range(3):  # routed experts: a new number of tokens in nearly every call
    for e, w in enumerate(weights):
        torch.nn.functional.linear(x[: 100 + (e * 37 + rep * 11) % 400], w)
print((rss() - before) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="oneDNN runs no bfloat16 matmuls on this CPU (no AVX512-BF16 / AMX): nothing is cached")
def test_bounded_kernel_caches_keep_less_memory_on_bfloat16_expert_calls():
    """The same 192 bfloat16 expert calls in two fresh interpreters (the caps only act before the
    first matmul): with the caps the process grows by tens of MB less."""
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHES}
    grown = {mode: int(subprocess.run([sys.executable, "-c", _EXPERT_CALLS, mode], capture_output=True, text=True,
                                      check=True, env=env).stdout)
             for mode in ("bounded", "default")}
    assert grown["bounded"] + 40 < grown["default"], grown


HOLES = """
import ctypes, os
from quantmoe.allocator import release_free_memory, tune_malloc
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tune_malloc({})
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
chunks = []
for _ in range(2000):  # 200 MB of 100 KB chunks (below glibc's mmap threshold: on the heap)
    chunks.append(libc.malloc(100_000))
    ctypes.memset(chunks[-1], 1, 100_000)
for c in chunks[:-1:2]:  # every other one freed: holes that no trim at the heap's top can return
    libc.free(c)
holes = rss()
print(release_free_memory(), holes - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_pages_inside_a_fragmented_heap_go_back_to_the_kernel():
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) > 80, out  # about 100 MB of holes released (measured: 89 MB)


def test_release_free_memory_calls_malloc_trim_zero():
    class Libc:
        calls: list[int] = []

        def malloc_trim(self, pad: int) -> int:
            self.calls.append(pad)
            return 1

    libc = Libc()
    assert release_free_memory(libc) is True and libc.calls == [0]
    assert release_free_memory(object()) is False  # not glibc: nothing to call
