"""Block-sequential evaluation: perplexity and KL of a model larger than memory.

The quantization driver's own walk (``pipeline.capture_layer_inputs``) gives every block its
inputs for every batch: with only the embedding read, the model's forward runs with its
blocks swapped for recorders, which keep each block's keyword inputs (position embeddings,
its own attention mask) and pass the hidden states on. Then, for each block in turn, its
weights alone are read from the safetensors files (``LazyCheckpoint`` for a full-precision
folder, ``LazyQuantized`` for a quantmoe checkpoint), put on ``device``, run over every
batch (``pipeline._run_block``) and put back on ``meta``. Last, the tensors outside the
blocks are read again and the model's own forward runs once per batch with its blocks
swapped for the final hidden states, so the final norm, the LM head and whatever the family
does to its logits are the model's: log-probabilities come out as ``evaluate`` computes them.

Precision: the blocks, the hidden states between them and the logits are in the compute
dtype (a full-precision folder: float32 by default, as ``quantmoe eval`` loads it whole, or
``dtype``; a quantmoe checkpoint: the dtype it was quantized in, its codes dequantized to it,
as ``quantmoe.load``); the hidden states wait on the host between blocks, a batch at a time
on ``device``; log-softmax, NLL and KL are float32 (sums in float64), as in ``evaluate``.
With the same dtype, batch size and device the numbers equal whole-model ``evaluate``
(float32 on the CPU: within 1e-5 relative, tested).

Reference log-probabilities (``reference_stream``) are computed the same way and cached on
disk, one float32 safetensors file per batch, keyed by the SHA-256 of the model's files, the
windows, the batch size and the dtype; ``CachedReference`` reads one batch at a time.

Example:
    >>> ref = reference_stream("Qwen3-30B-A3B", windows)                     # doctest: +SKIP
    >>> evaluate_stream("runs/q30b", windows, ref, device="cuda").kl_mean    # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quantmoe.allocator import release_free_memory
from quantmoe.anatomy.carry import stand_in_output, with_carried
from quantmoe.eval.metrics import EvalResult, Tally, batch_logprobs, check_reference
from quantmoe.quant.lazy import LazyCheckpoint

log = logging.getLogger(__name__)

REFERENCE_FORMAT = 1


def open_checkpoint(folder: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                    attn_implementation: str | None = None, verify: bool = True) -> LazyCheckpoint:
    """The block-by-block reader of a full-precision safetensors folder or of a quantmoe checkpoint
    (its files checked first: a missing or truncated shard is an error before any work)."""
    from quantmoe.models import quantized_format

    kind = quantized_format(folder)
    if kind == "gptq":
        raise ValueError(f"{folder} is a GPTQ-format folder: streaming evaluation reads full-precision safetensors "
                         "folders and quantmoe checkpoints; evaluate it without --stream, or stream the quantmoe "
                         "checkpoint it was exported from")
    if kind == "quantmoe":
        from quantmoe.quant.lazy_quantized import LazyQuantized

        if dtype is not None:
            raise ValueError(f"check `dtype`: {folder} is a quantized checkpoint, computed in the dtype it was "
                             "quantized in (drop --dtype)")
        return LazyQuantized(folder, verify=verify, trust_remote_code=trust_remote_code,
                             attn_implementation=attn_implementation)
    return LazyCheckpoint(folder, dtype=dtype if dtype is not None else torch.float32,
                          trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)


def _moved(tensors: tuple, device: torch.device) -> tuple:
    return tuple(None if t is None else t.to(device) for t in tensors)


@torch.no_grad()
def stream_logprobs(lazy: LazyCheckpoint, windows: torch.Tensor, batch_size: int = 8,
                    device: str | torch.device | None = None, progress: bool = False) -> Iterator[torch.Tensor]:
    """Log-probabilities (float32, (b, t-1, vocab), on ``device``) of each batch of ``windows``,
    computed block by block (see the module docstring); yielded once every block has run."""
    from quantmoe.quant.pipeline import _run_block, capture_layer_inputs, outside_to

    model, layers, carries = lazy.model, lazy.family.layers, lazy.family.carries
    device = torch.device(device) if device is not None else torch.device("cpu")
    host = torch.device("cpu")
    blocks = model.get_submodule(layers)
    lazy.load_outside()
    lazy.release_outside(only=(lazy.family.lm_head,))  # the rest may run before block 0
    outside_to(model, layers, device)
    layer_inputs = capture_layer_inputs(model, blocks, windows, batch_size, device)
    lazy.release_outside()
    hidden = [args[0].to(host) for args, _ in layer_inputs[0]]  # compute dtype, on the host between blocks
    handed: list[tuple] = [(None,) * len(carries)] * len(hidden)  # FamilySpec.carries, block to block
    for i in tqdm(range(len(blocks)), desc="eval blocks", disable=not progress, leave=False):
        block = lazy.load_block(i, per_expert=True).to(device)
        carried: list[tuple] = []
        hidden = [_run_block(block, [with_carried(carries, args, kwargs, h.to(device), _moved(c, device))], None,
                             carries, carried)[0].to(host)
                  for h, c, (args, kwargs) in zip(hidden, handed, layer_inputs[i])]
        handed = [_moved(c, host) for c in carried]
        layer_inputs[i] = []
        del block
        lazy.release_block(i)
        release_free_memory()  # the heap's free pages back to the kernel between blocks (quantmoe/allocator.py)
    final: list[torch.Tensor] = []

    def first(*args, **kwargs):
        return stand_in_output(carries, final[0])

    def through(*args, **kwargs):
        return stand_in_output(carries, args[0] if args else kwargs["hidden_states"])

    lazy.load_outside()
    outside_to(model, layers, device)
    for i, block in enumerate(blocks):
        block.forward = first if i == 0 else through  # instance attributes: nn.Module.__call__ finds them first
    try:
        for n, start in enumerate(range(0, len(windows), batch_size)):
            final[:] = [hidden[n].to(device)]
            hidden[n] = None  # type: ignore[call-overload]
            yield batch_logprobs(model, windows[start:start + batch_size], device, use_cache=False)
    finally:
        for block in blocks:
            del block.forward
        lazy.release_outside()


def evaluate_stream(folder: str | Path, windows: torch.Tensor, reference: Sequence[torch.Tensor] | None = None, *,
                    batch_size: int = 8, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    progress: bool = False, trust_remote_code: bool = False, attn_implementation: str | None = None,
                    verify: bool = True) -> EvalResult:
    """``evaluate`` of the model in ``folder`` (full precision or a quantmoe checkpoint) with one block
    in memory at a time; ``reference``: log-probs per batch of the same windows and batch size
    (``reference_stream``, ``reference_logprobs``) for KL and top-1 agreement."""
    if reference is not None:
        check_reference(reference, windows, batch_size)
    lazy = open_checkpoint(folder, dtype, trust_remote_code, attn_implementation, verify)
    tally = Tally()
    for n, lp in enumerate(stream_logprobs(lazy, windows, batch_size, device, progress)):
        tally.add(windows[n * batch_size:(n + 1) * batch_size], lp, None if reference is None else reference[n])
    return tally.result()


@dataclass(frozen=True)
class CachedReference(Sequence):
    """Reference log-probabilities on disk, one float32 batch read per item (see ``reference_stream``)."""

    folder: Path
    batches: int

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, n):  # one batch; Sequence's iteration stops at the IndexError
        if not isinstance(n, int) or not 0 <= n < self.batches:
            raise IndexError(f"batch {n} of {self.batches}")
        return load_file(str(self.folder / f"batch-{n:05d}.safetensors"))["logprobs"]


def _content_key(lazy: LazyCheckpoint, windows: torch.Tensor, batch_size: int) -> str:
    from quantmoe.cache import array_sha256, content_key
    from quantmoe.quant.checkpoint import file_sha256

    configs = {lazy.folder / name for name in ("config.json", "quantization_config.json")}
    files = sorted(set(lazy.files.values()) | {p for p in configs if p.is_file()})
    return content_key({"what": "reference log-probs", "format": REFERENCE_FORMAT,
                        "files": {p.name: file_sha256(p) for p in files}, "windows": array_sha256(windows),
                        "batch_size": batch_size, "dtype": str(lazy.dtype),
                        "attn": getattr(lazy.model.config, "_attn_implementation", None)})


def reference_stream(folder: str | Path, windows: torch.Tensor, *, batch_size: int = 8,
                     device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                     cache_dir: str | Path | None = None, progress: bool = False, trust_remote_code: bool = False,
                     attn_implementation: str | None = None) -> CachedReference:
    """The reference log-probabilities of the model in ``folder`` on ``windows``, computed block by
    block once and cached in ``cache_dir`` (default $QUANTMOE_CACHE or ~/.cache/quantmoe) under
    a key over the SHA-256 of its files (hashing reads them once), the windows, batch size and dtype."""
    from quantmoe.cache import cache_root
    from quantmoe.safeout import owner_tag

    lazy = open_checkpoint(folder, dtype, trust_remote_code, attn_implementation)
    key = _content_key(lazy, windows, batch_size)
    root = cache_root(cache_dir) / "reference"
    out = root / key[:24]
    batches = -(-len(windows) // batch_size)
    if (out / "reference.json").is_file():
        log.info("reference log-probabilities from %s", out)
        return CachedReference(out, batches)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:24]}.{owner_tag()}-", suffix=".partial", dir=root))
    try:
        for n, lp in enumerate(stream_logprobs(lazy, windows, batch_size, device, progress)):
            save_file({"logprobs": lp.to("cpu", torch.float32).contiguous()}, str(tmp / f"batch-{n:05d}.safetensors"))
        (tmp / "reference.json").write_text(json.dumps({"key": key, "source": str(folder), "batches": batches,
                                                        "windows": list(windows.shape), "batch_size": batch_size}))
        try:
            os.replace(tmp, out)
        except OSError:  # another run cached it meanwhile
            if not (out / "reference.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved reference log-probabilities to %s", out)
    return CachedReference(out, batches)
