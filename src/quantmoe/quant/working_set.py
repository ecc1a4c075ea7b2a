"""What a block's work holds in memory, from shapes: a batched GPTQ call's working set and the
final pass's cache of the routed experts' down inputs.

The driver (quant/pipeline.py) sizes its expert GPTQ batches with `expert_chunks` and its
down-input cache with `expert_cache_bytes`; `--max-memory`'s estimate (quant/stream.py,
`memory_need`) adds up the same figures before a run starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from quantmoe.anatomy import LinearUnit
from quantmoe.anatomy.expert_view import EXPERT_INPUT_KINDS

if TYPE_CHECKING:
    from quantmoe.quant.pipeline import GPTQConfig

# float32 copies of W (out, in) and of H (in, in) a GPTQ call holds at its peak: W, its quantized
# values, scales, zeros, codes, the running block; H, its damped copy and one factor (measured by
# benches/bench_gptq_memory.py: at most these on every shape it runs, 10-30% less on most)
GPTQ_W_COPIES = 8
GPTQ_H_COPIES = 3


REFINE_COPIES = 3  # refinement adds the unquantized W and H, the error and its product with H (gptq.refine_codes)


def gptq_working_set(shape: Sequence[int], refine: bool = False) -> int:
    """Bytes one linear of weight ``shape`` (out, in) adds to a (batched) GPTQ call:
    ``GPTQ_W_COPIES`` float32 copies of its weight and ``GPTQ_H_COPIES`` of its Hessian, and
    ``REFINE_COPIES`` more of each with refinement."""
    out_features, in_features = shape
    extra = REFINE_COPIES if refine else 0
    return 4 * in_features * ((GPTQ_W_COPIES + extra) * out_features + (GPTQ_H_COPIES + extra) * in_features)


def expert_chunks(n: int, shape: Sequence[int], gptq: GPTQConfig) -> int:
    """Experts per batched GPTQ call for ``n`` experts of weight ``shape``: within ``gptq.expert_chunk``
    and ``gptq.expert_batch_mb``, at least one."""
    step = min(n, gptq.expert_chunk or n)
    if gptq.expert_batch_mb:
        step = min(step, max(1, int(gptq.expert_batch_mb * 2**20 // gptq_working_set(shape, gptq.refine > 0))))
    return step


def expert_cache_bytes(units: Sequence[LinearUnit], top_k: int, tokens: int, element_size: int) -> int:
    """Bytes of one block's routed experts' down inputs (``ExpertMLP.hidden``) over ``tokens`` calibration
    tokens routed to ``top_k`` experts each: what the final pass's cache holds when every expert fits
    (``units``: the block's; 0 without routed gate/up)."""
    widths = [u.out_features for u in units if u.expert is not None and u.kind in EXPERT_INPUT_KINDS]
    return top_k * tokens * max(widths) * element_size if widths else 0
