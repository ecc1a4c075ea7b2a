"""Streaming quantization: one block in memory, each finished block on disk, resumable.

``quantize_stream`` drives ``pipeline.quantize_model`` with a ``StreamIO``: blocks come from a
``LazyCheckpoint`` (or a model already in memory) and each finished block is written to a
work folder next to the output, ``.<out>.work/``::

    run.json                 what the run is (model, plan, calibration, GPTQ, dtype): a resume must match
    outside.safetensors      embeddings, final norm, LM head (written first)
    block-00003.safetensors  block 3 quantized (packed codes, scales, norms, router)
    block-00003.json         its report entries, peak host RSS and device memory
    hidden.safetensors       the calibration hidden states leaving the last finished block (and, with
                             block tuning, the full-precision model's; for a family whose blocks hand
                             more on, `FamilySpec.carries`, those tensors too)
    progress.json            the last finished block: written last, the one commit point

Every file is written atomically (temporary name, fsync, rename). After a crash or a kill -9,
``resume=True`` starts at the block after ``progress.json``'s, with the spilled hidden states
as its inputs: the result equals an uninterrupted run bit for bit (tested). When every block is
done the checkpoint is assembled in a temporary folder (HF sharded safetensors with
``model.safetensors.index.json``), verified (every shard re-read, its keys against the index,
its SHA-256 recorded) and renamed to the output path in one step; the work folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantmoe.allocator import release_free_memory
from quantmoe.anatomy import ModelAnatomy, describe, family_of
from quantmoe.atomic import atomic_write, atomic_write_text
from quantmoe.calib.data import CalibrationConfig
from quantmoe.memory import PeakMemory
from quantmoe.multimodal import text_config_of
from quantmoe.quant.checkpoint import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    REPORT_NAME,
    check_checkpoint_output,
    file_sha256,
    library_versions,
    mark_config,
)
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.lazy import INDEX_NAME, LazyCheckpoint
from quantmoe.quant.pipeline import BlockIO, BlockReport, GPTQConfig, check_finite, quantize_model
from quantmoe.safeout import owner_tag

log = logging.getLogger(__name__)

RUN_NAME, PROGRESS_NAME, HIDDEN_NAME, OUTSIDE_NAME = "run.json", "progress.json", "hidden.safetensors", \
    "outside.safetensors"
PAUSE_ENV = "QUANTMOE_PAUSE_AFTER_BLOCK"  # "<block>:<file>": touch <file> and wait once <block> is committed


class ResumeError(ValueError):
    """A work folder that does not belong to this run, or a run that would overwrite foreign data."""


def work_folder(out: Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.work")


def _save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata={"format": "pt", **(metadata or {})}))


def _state(module: nn.Module, prefix: str, skip: str | None = None) -> dict[str, torch.Tensor]:
    """``module``'s tensors on the CPU under ``prefix`` (but those starting with ``skip``), shared
    storage written once (tied embeddings)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in module.state_dict(prefix=prefix).items():
        if skip is not None and name.startswith(skip):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen and t.numel():
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def outside_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` outside its blocks (embeddings, final norm, LM head)."""
    return _state(model, "", skip=family_of(model).layers + ".")


@dataclass(frozen=True)
class BlockMemory:
    rss_mb: float
    device_mb: float | None


class StreamIO(BlockIO):
    """Blocks from a ``LazyCheckpoint`` (or the model in memory when ``lazy`` is None), each written
    to the work folder as it finishes; ``first_block`` > 0 resumes."""

    def __init__(self, work: Path, lazy: LazyCheckpoint | None, first_block: int = 0) -> None:
        self.work = work
        self.lazy = lazy
        self.first_block = first_block
        self.max_loaded_blocks = 0  # tensor accounting: blocks holding real weights at once
        self._peak: PeakMemory | None = None

    def _loaded_blocks(self, model: nn.Module) -> int:
        blocks = model.get_submodule(family_of(model).layers)
        return sum(any(not p.is_meta for p in b.parameters()) for b in blocks)

    def load_embedding(self, model: nn.Module, embedding: nn.Module, device: torch.device) -> None:
        if self.lazy is not None:
            self.lazy.load_outside()
            check_finite(outside_state(model).items())
        if self.first_block == 0:
            _save(outside_state(model), self.work / OUTSIDE_NAME)
        if self.lazy is not None:
            self.lazy.release_outside(only=(family_of(model).lm_head,))  # the rest runs before block 0
        super().load_embedding(model, embedding, device)

    def release_embedding(self, model: nn.Module, embedding: nn.Module, home: torch.device) -> None:
        if self.lazy is not None:
            self.lazy.release_outside()

    def _restored(self, key: str) -> list[torch.Tensor] | None:
        """The spilled tensors ``key.0``, ``key.1``, ... (only those are read from the file)."""
        if self.first_block == 0:
            return None
        with safe_open(str(self.work / HIDDEN_NAME), framework="pt") as fh:
            count = sum(name.startswith(f"{key}.") for name in fh.keys())
            return [fh.get_tensor(f"{key}.{i}") for i in range(count)] or None

    def restored_hidden(self) -> list[torch.Tensor] | None:
        return self._restored("batch")

    def restored_references(self) -> list[torch.Tensor] | None:
        return self._restored("reference")

    def restored_carried(self, count: int) -> list[tuple[torch.Tensor | None, ...]] | None:
        if self.first_block == 0 or not count:
            return None
        with safe_open(str(self.work / HIDDEN_NAME), framework="pt") as fh:
            names = set(fh.keys())
            batches = sum(name.startswith("batch.") for name in names)
            return [tuple(fh.get_tensor(f"carry{k}.{i}") if f"carry{k}.{i}" in names else None for k in range(count))
                    for i in range(batches)]

    def load_block(self, model: nn.Module, index: int, device: torch.device) -> nn.Module:
        self._peak = PeakMemory().__enter__()
        block = self.lazy.load_block(index, per_expert=True) if self.lazy is not None else \
            model.get_submodule(family_of(model).layers)[index]
        self.max_loaded_blocks = max(self.max_loaded_blocks, self._loaded_blocks(model))
        return block.to(device)

    def block_done(self, model: nn.Module, index: int, outputs: Sequence[torch.Tensor], report: BlockReport,
                   references: Sequence[torch.Tensor] | None = None, carried: Sequence[tuple] = ()) -> None:
        family = family_of(model)
        block = model.get_submodule(family.layers)[index]
        _save(_state(block, f"{family.layers}.{index}."), self.work / f"block-{index:05d}.safetensors")
        t_spill = time.perf_counter()
        spill = {f"batch.{i}": out.detach().to("cpu").contiguous() for i, out in enumerate(outputs)}
        spill |= {f"reference.{i}": r.detach().to("cpu").contiguous() for i, r in enumerate(references or ())}
        spill |= {f"carry{k}.{i}": t.detach().to("cpu").contiguous()  # None (nothing handed on) is left out
                  for i, handed in enumerate(carried) for k, t in enumerate(handed) if t is not None}
        _save(spill, self.work / HIDDEN_NAME, {"block": str(index)})
        t_spill = time.perf_counter() - t_spill
        peak = self._peak
        if peak is not None:
            peak.__exit__(None, None, None)
        memory = BlockMemory(peak.rss_mb if peak else 0.0, peak.device_mb if peak else None)
        entry = {"index": index, "units": {n: asdict(u) for n, u in report.units.items()},
                 "expert_tokens": list(report.expert_tokens) if report.expert_tokens is not None else None,
                 "fallbacks": list(report.fallbacks), "seconds": report.seconds, "spill_seconds": t_spill,
                 "final_pass_seconds": report.final_pass_seconds, "peak_rss_mb": memory.rss_mb,
                 "peak_device_mb": memory.device_mb}
        atomic_write_text(self.work / f"block-{index:05d}.json", json.dumps(entry, indent=1))
        atomic_write_text(self.work / PROGRESS_NAME, json.dumps({"done": index}))  # the commit point
        log.info("block %d written (%.1f s, peak RSS %.0f MB)", index, report.seconds, memory.rss_mb)
        _maybe_pause(index)

    def release_block(self, model: nn.Module, index: int, home: torch.device) -> None:
        if self.lazy is not None:
            self.lazy.release_block(index)
        else:
            super().release_block(model, index, home)
        release_free_memory()  # the next block starts from what the process holds (quantmoe/allocator.py)

    def finish(self, model: nn.Module, embedding: nn.Module, home: torch.device) -> None:
        if self.lazy is None:
            super().finish(model, embedding, home)


def _maybe_pause(index: int) -> None:
    """Test hook: with ``QUANTMOE_PAUSE_AFTER_BLOCK=<index>:<file>`` touch ``file`` and wait to be killed."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    block, _, marker = value.partition(":")
    if block == str(index):
        Path(marker).write_text(str(os.getpid()))
        signal.pause()


# GPTQConfig fields that set memory use only (the result is the same bit for bit: tests/quant/test_pipeline.py):
# a resumed run may change them
MEMORY_ONLY = ("expert_cache_mb", "expert_chunk", "expert_batch_mb", "expert_stats_mb", "attention_tail",
               "attention_replay")


def _gptq_identity(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The GPTQ settings a resumed run must share: all but the memory-only ones; rotate, refine and block
    tuning only when on, as work folders from before them recorded none of them."""
    tuned = bool(settings.get("tune_steps"))
    return {k: v for k, v in settings.items() if k not in MEMORY_ONLY and (k not in ("rotate", "refine", "tune_steps")
                                                                            or v) and (k != "tune_lr" or tuned)}


def _run_identity(source: str, specs: Mapping[str, QuantSpec], calib: CalibrationConfig, gptq: GPTQConfig,
                  dtype: torch.dtype, windows: torch.Tensor) -> dict[str, Any]:
    return {"source": source, "dtype": str(dtype).removeprefix("torch."), "calibration": asdict(calib),
            "gptq": _gptq_identity(gptq.to_dict()), "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "modules": {n: asdict(s) for n, s in sorted(specs.items())}}


def _prepare_work(work: Path, identity: dict[str, Any], resume: bool) -> int:
    """The first block still to do (0 for a fresh run); checks a resumed run is the same run."""
    if work.exists():
        if not resume:
            raise ResumeError(f"{work} holds an interrupted run: add --resume to continue it, or delete the folder "
                              "to start over")
        try:
            stored = json.loads((work / RUN_NAME).read_text())
        except (OSError, ValueError) as err:
            raise ResumeError(f"{work / RUN_NAME} is missing or unreadable: {work} is not a resumable run; "
                              "delete it to start over") from err
        if isinstance(stored.get("gptq"), dict):  # folders that recorded the memory-only settings too
            stored["gptq"] = _gptq_identity(stored["gptq"])
        changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        if changed:
            raise ResumeError(f"--resume: {work} was started with other settings ({', '.join(changed)} differ); "
                              "rerun with the same model and settings, or delete the folder to start over")
        progress = work / PROGRESS_NAME
        done = json.loads(progress.read_text())["done"] if progress.exists() else -1
        if done >= 0:
            log.info("resuming %s after block %d", work, done)
        return done + 1
    if resume:
        log.info("--resume: no interrupted run at %s, starting from block 0", work)
    work.mkdir(parents=True)
    atomic_write_text(work / RUN_NAME, json.dumps(identity, indent=1))
    return 0


@dataclass(frozen=True)
class MemoryNeed:
    """Host memory one streamed block needs (bytes): the guard of ``--max-memory`` and the bench's floor."""

    block: int  # the largest block's weights in the run's dtype
    activations: int  # calibration hidden states entering and leaving a block
    hessians: int  # float32 Hessian statistics of the largest calibration pass (one per distinct input)
    gptq: int  # float32 working set of the largest GPTQ call (one linear, or one chunk of experts)
    tuning: int = 0  # block tuning: float32 codes, weights and their gradients of the largest block
    # outputs kept for the later passes over a block: the attention's output per token, o_proj's inputs
    # (attention_tail) and the routed experts' down inputs (within expert_cache_mb)
    replay: int = 0

    @property
    def floor(self) -> int:
        """The largest block + calibration activations (what no streaming run can go below)."""
        return self.block + self.activations

    @property
    def total(self) -> int:
        return self.block + self.activations + self.hessians + self.gptq + self.tuning + self.replay


def memory_need(model: nn.Module, calib: CalibrationConfig, dtype: torch.dtype, tuned: bool = False,
                gptq: GPTQConfig | None = None) -> MemoryNeed:
    """Estimated from shapes alone (works on a ``meta`` skeleton); ``tuned``: with block tuning, which
    also carries the full-precision model's hidden states and the block's outputs on them. ``gptq``'s
    memory settings bound the Hessians (routed experts calibrated in groups, ``expert_stats_mb``) and
    the experts' GPTQ work (batched in chunks, ``expert_batch_mb``); default: ``GPTQConfig()``."""
    from collections import defaultdict

    from quantmoe.quant.stages import input_key, stage_of, stage_of_kind, stat_groups
    from quantmoe.quant.working_set import expert_cache_bytes, gptq_working_set

    gptq = gptq if gptq is not None else GPTQConfig()
    family = family_of(model)
    anatomy = describe(model)
    size = torch.empty((), dtype=dtype).element_size()
    blocks = model.get_submodule(family.layers)
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks) * size
    hidden = int(model.config.hidden_size)
    streams = family.residual_streams(model.config)  # hyper-connections: several streams between blocks
    activations = (4 if tuned else 2) * calib.num_windows * calib.seq_len * streams * hidden * size
    stages: dict[tuple[int, int], list] = defaultdict(list)
    for u in anatomy.units:
        stages[(u.block, stage_of(u))].append(u)
    hessians = work = 0
    for units in stages.values():
        for group in stat_groups(units, calib, gptq):
            hessians = max(hessians, sum(n * n * 4 for n in {input_key(u): u.in_features for u in group}.values()))
        sets = [(u.expert is not None, gptq_working_set((u.out_features, u.in_features), gptq.refine > 0))
                for u in units]
        dense = max((ws for routed, ws in sets if not routed), default=0)  # quantized one at a time
        experts = [ws for routed, ws in sets if routed]
        chunk = sum(experts) if not gptq.expert_batch_mb else min(
            sum(experts), max(int(gptq.expert_batch_mb * 2**20), max(experts, default=0)))
        work = max(work, dense, chunk)
    tokens = calib.num_windows * calib.seq_len
    cache = 0
    if calib.moe_mode != "all" and not tuned:  # as quant/pipeline.py's _block_replay sizes it
        by_block: dict[int, list] = defaultdict(list)
        for u in anatomy.units:
            by_block[u.block].append(u)
        budget = int(gptq.expert_cache_mb * 2**20)
        cache = max((min(budget, expert_cache_bytes(by_block[b.index], b.top_k, tokens, size))
                     for b in anatomy.blocks if b.is_moe), default=0)
    tail = 0
    if gptq.attention_tail:  # o_proj's inputs, kept from its pass to rebuild the attention's output
        tail = max((u.in_features for u in anatomy.units if stage_of(u) == stage_of_kind("o_proj")), default=0)
    attention = hidden + tail if gptq.attention_replay else 0  # the attention's kept output (and tail inputs)
    replay = tokens * attention * size + cache
    quantized = max(sum(u.numel for u in anatomy.units if u.block == b.index) for b in anatomy.blocks)
    return MemoryNeed(block, activations, hessians, work, 3 * 4 * quantized if tuned else 0, replay)


def check_memory(need: MemoryNeed, limit: int | None) -> None:
    """Refuse to start when one block + calibration activations + its stage's work exceed ``limit``."""
    if limit is None or need.total <= limit:
        return
    gb = 2**30
    raise ValueError(f"this run needs about {need.total / gb:.2f} GiB of host memory (largest block "
                     f"{need.block / gb:.2f} + calibration activations {need.activations / gb:.2f} + Hessians "
                     f"{need.hessians / gb:.2f} + GPTQ work {need.gptq / gb:.2f} + outputs kept for replay "
                     f"{need.replay / gb:.2f}) but --max-memory is "
                     f"{limit / gb:.2f} GiB: lower --calib-windows or --calib-len, keep fewer outputs for replay "
                     "(--expert-cache-mb 0, --recompute-attention or --no-attention-replay), calibrate fewer experts per pass "
                     "(--expert-stats-mb), or raise --max-memory")


def parse_size(text: str) -> int:
    """'24GB', '512MiB', '1.5T' or a plain number of GiB -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"check --max-memory: {text!r} is not a size such as 24GB, 512MB or 1.5TB")
    unit = m.group(2).upper() or "G"
    return int(float(m.group(1)) * 2 ** (10 * "KMGT".index(unit) + 10))


@dataclass(frozen=True)
class StreamResult:
    out: Path
    report: dict[str, Any]
    max_loaded_blocks: int


def quantize_stream(source: str | Path | nn.Module, out: str | Path, specs: Mapping[str, QuantSpec],
                    windows: torch.Tensor, calib: CalibrationConfig = CalibrationConfig(),
                    gptq: GPTQConfig = GPTQConfig(), *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, resume: bool = False, tokenizer=None,
                    metadata: Mapping[str, Any] | None = None, progress: bool = True,
                    trust_remote_code: bool = False, attn_implementation: str | None = None,
                    max_memory: int | None = None, overwrite: bool = False,
                    protect: tuple[Path | str, ...] = ()) -> StreamResult:
    """Quantize a model folder block by block (or a model in memory, same output) into a sharded checkpoint.

    ``specs`` are the plan resolved on the model's anatomy (``Plan.resolve(describe(...))``). ``out``
    must be new, an empty folder or (with ``overwrite``) an earlier checkpoint, as for ``save_quantized``;
    ``protect``: folders that must survive (the source model).
    """
    out = check_checkpoint_output(Path(out), overwrite=overwrite, protect=protect)
    lazy = None
    if isinstance(source, nn.Module):
        model, name = source, str(getattr(source.config, "_name_or_path", "") or "model in memory")
    else:
        lazy = LazyCheckpoint(source, dtype=dtype, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation)
        model, name = lazy.model, str(source)
    dtype = next(model.parameters()).dtype
    check_memory(memory_need(model, calib, dtype, tuned=bool(gptq.tune_steps), gptq=gptq), max_memory)
    identity = _run_identity(name, specs, calib, gptq, dtype, windows)
    work = work_folder(out)
    first = _prepare_work(work, identity, resume)
    io = StreamIO(work, lazy, first)
    n_blocks = len(model.get_submodule(family_of(model).layers))
    if first < n_blocks:
        torch.manual_seed(calib.seed)
        quantize_model(model, specs, windows, calib, gptq, device=device, progress=progress, io=io)
    report = _merged_report(work, n_blocks)
    qconfig = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "modules": {n: {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}
                           for n, s in specs.items()},
               "dtype": str(dtype).removeprefix("torch."), "versions": library_versions(), **(metadata or {})}
    check_checkpoint_output(out, overwrite=overwrite, protect=protect)  # again: hours may have passed
    path = assemble(work, out, n_blocks, model.config, qconfig, report, tokenizer)
    return StreamResult(path, report, io.max_loaded_blocks)


def _merged_report(work: Path, n_blocks: int) -> dict[str, Any]:
    entries = [json.loads((work / f"block-{i:05d}.json").read_text()) for i in range(n_blocks)]
    units = {n: u for e in entries for n, u in e["units"].items()}
    return {"seconds": sum(e["seconds"] for e in entries), "block_seconds": [e["seconds"] for e in entries],
            "fallbacks": [f for e in entries for f in e["fallbacks"]],
            "expert_tokens": {str(e["index"]): e["expert_tokens"] for e in entries if e["expert_tokens"] is not None},
            "peak_rss_mb": [e["peak_rss_mb"] for e in entries],
            "peak_device_mb": [e["peak_device_mb"] for e in entries],
            "spill_seconds": [e["spill_seconds"] for e in entries],
            "final_pass_seconds": [e["final_pass_seconds"] for e in entries], "units": units}


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def assemble(work: Path, out: Path, n_blocks: int, config, qconfig: dict[str, Any], report: dict[str, Any],
             tokenizer=None) -> Path:
    """Move the work folder's shards into a verified sharded checkpoint at ``out``, atomically."""
    parts = [work / OUTSIDE_NAME] + [work / f"block-{i:05d}.safetensors" for i in range(n_blocks)]
    n = len(parts)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{owner_tag()}-", suffix=".partial", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        mark_config(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weight_map: dict[str, str] = {}
        hashes: dict[str, str] = {}
        total = 0
        for i, part in enumerate(parts):
            name = shard_name(i, n)
            try:
                os.link(part, tmp / name)  # the work folder keeps its copy until the checkpoint is in place
            except OSError:
                shutil.copyfile(part, tmp / name)
            with safe_open(str(tmp / name), framework="pt") as fh:  # verify: the shard reads back
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
                    weight_map[key] = name
            hashes[name] = file_sha256(tmp / name)
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=1))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1))
        (tmp / CONFIG_NAME).write_text(json.dumps({**qconfig, "weights_sha256": hashes}, indent=1))  # last
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work)
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 1)


def _publish(tmp: Path, out: Path) -> None:
    from quantmoe.atomic import current_umask

    umask = current_umask()
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(tmp, 0o777 & ~umask)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    old = None
    if out.exists():  # an empty folder or an earlier checkpoint that check_checkpoint_output allowed
        old = out.with_name(f".{out.name}.old-{owner_tag()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # the new one never arrived: the previous checkpoint goes back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def anatomy_of(source: str | Path | nn.Module, trust_remote_code: bool = False) -> ModelAnatomy:
    """The anatomy a plan resolves on, without loading weights for a folder."""
    if isinstance(source, nn.Module):
        return describe(source)
    from transformers import AutoConfig

    from quantmoe.quant.lazy import build_skeleton

    config = text_config_of(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code))
    return describe(build_skeleton(config, torch.float32, trust_remote_code))

