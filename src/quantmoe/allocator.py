"""Process memory settings for long quantization runs (the `quantmoe` command applies them):
glibc's malloc (`tune_malloc`) and the size of oneDNN's kernel caches (`bound_kernel_caches`);
and what the streamed readers and drivers do with glibc's heap (`fix_malloc_threshold`,
`release_free_memory`).

A quantization pass allocates and frees activation-sized tensors (a few hundred KB to a few
MB: each expert's rows, its gate/up outputs) thousands of times per block. With glibc's
defaults much of that memory goes back to the kernel between uses (a trimmed heap top,
per-thread arenas), so the next tensor faults its pages in again: on a 32-expert random
Qwen3-MoE (benches/bench_vs_gptqmodel.py) the process took about 8 million minor page
faults, a third of its CPU time in the kernel. Two settings keep that memory in the process:

- one malloc arena (`M_ARENA_MAX` = 1): torch's worker threads hardly allocate, and
  per-thread arenas trim and refault on their own;
- a 64 MB top pad (`M_TOP_PAD`): the heap grows and is trimmed in 64 MB steps, not page by page.

Measured in docs/quantization.md ("Allocator settings"): about 11% less time for about 25 MB
more peak RSS on a 32-expert model, 1.46x less time for about 250 MB more on a 128-expert one. The `quantmoe` command calls `tune_malloc` first; library users may call it
themselves. It does nothing off glibc Linux, when `QUANTMOE_MALLOC=default`, or when the
environment already sets a glibc malloc tunable (`MALLOC_*`, `GLIBC_TUNABLES`) (the user's own choice wins).

On CPUs where PyTorch runs bfloat16 matmuls through oneDNN (those with AVX512-BF16 or AMX),
each new matmul shape leaves a cached primitive with its own buffers in two caches, oneDNN's
primitive cache and ideep's (PyTorch's oneDNN wrapper) LRU cache, 1024 entries each by
default. Routed experts see a different number of tokens in every batch, so nearly every
expert call is a new shape and the caches fill with entries that are never reused: 540 MB on
one block of benches/bench_scale.py's model (docs/quantization.md, "Allocator settings").
`bound_kernel_caches` caps both at 16 entries (the attention's and dense MLPs' shapes, which
repeat, still hit). It only sets the environment variables oneDNN and ideep read when they
create their first primitive, so it must run before the process's first matmul; a variable
the user already set is left as it is.

With one arena the heap also fragments over a long run: a block's freed activations leave
holes that the next block's differently sized tensors only partly reuse, and those pages stay
resident, so the per-block peak crept up block after block (810 -> 888 MB over six blocks of
bench_scale.py's model). `release_free_memory` (glibc's `malloc_trim(0)`) hands every free
page back to the kernel; the streamed quantization calls it after each block is written and
released, so each block starts from the memory the process really holds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

M_TOP_PAD = -2  # glibc's mallopt parameter numbers (malloc.h)
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
TOP_PAD_BYTES = 64 << 20
ARENAS = 1
OPT_OUT = "QUANTMOE_MALLOC"
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's
KERNEL_CACHE_ENTRIES = 16


def glibc() -> object | None:
    """glibc loaded with ctypes, or None off glibc Linux (macOS, musl, ...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def fix_malloc_threshold(threshold: int = 128 * 1024) -> bool:
    """Keep glibc's malloc from raising its mmap threshold as blocks come and go.

    glibc raises the threshold to the size of each freed memory-mapped chunk, so the next
    block's tensors land in the heap, and a heap fragmented by one block's tensors is kept when
    the block is released: without this, peak RSS grew by about one block per block (measured,
    ``benches/bench_scale.py``). A fixed threshold (glibc's own default value) returns each
    released block to the system. A no-op (False) where the C library is not glibc.
    """
    mallopt = getattr(glibc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold))


def _user_choice(environ: Mapping[str, str]) -> str | None:
    """Why the settings are left alone (an opt-out or the user's own MALLOC_* tunables), or None."""
    if environ.get(OPT_OUT, "").lower() == "default":
        return f"{OPT_OUT}=default"
    own = sorted(k for k in environ if k.startswith("MALLOC_"))  # MALLOC_ARENA_MAX, MALLOC_TOP_PAD_, ...
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        own.append("GLIBC_TUNABLES")
    return f"the environment sets {', '.join(own)}" if own else None


def tune_malloc(environ: Mapping[str, str] | None = None, libc: object | None = None) -> bool:
    """Apply one arena and a 64 MB top pad with glibc's `mallopt`; whether both were applied."""
    environ = os.environ if environ is None else environ
    why = _user_choice(environ)
    if why is not None:
        log.debug("malloc settings left as they are: %s", why)
        return False
    libc = libc if libc is not None else glibc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    applied = mallopt(M_ARENA_MAX, ARENAS) == 1 and mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1
    log.debug("malloc: %d arena, %d MB top pad: %s", ARENAS, TOP_PAD_BYTES >> 20, "applied" if applied else "refused")
    return applied


def bound_kernel_caches(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Cap oneDNN's and ideep's kernel caches at ``KERNEL_CACHE_ENTRIES`` entries each (the
    variables in ``KERNEL_CACHES`` the environment does not set yet); the variables set."""
    environ = os.environ if environ is None else environ
    applied = {name: str(KERNEL_CACHE_ENTRIES) for name in KERNEL_CACHES if name not in environ}
    environ.update(applied)
    log.debug("kernel caches: %s", applied or "left as the environment sets them")
    return applied


def release_free_memory(libc: object | None = None) -> bool:
    """Return the heap's free pages to the kernel (glibc's ``malloc_trim(0)``, which also releases
    whole free pages inside the heap, not only at its top); whether any memory was released.
    Does nothing off glibc Linux."""
    trim = getattr(libc if libc is not None else glibc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False
