"""The sequential quantization driver: one block at a time.

capture every block's inputs (block 0's hidden states; each block's own mask) -> for each
block: calibrate and quantize its linears stage by stage (attention inputs -> o_proj ->
experts' gate/up -> down), each stage seeing the already-quantized earlier stages -> re-run
the quantized block so the next block sees quantized inputs. Only the block being worked on needs to sit on ``device``; the rest of
the model stays where it is (CPU).

The later passes over a block skip work without changing a bit of what they compute
(tested against the plain path): a quantized linear runs as a dense ``nn.Linear`` holding
its dequantized weight until the block is done (then its packed ``QuantLinear`` is
installed); once the attention's linears are quantized its output for each batch is
computed once and replayed, and so is each routed expert's down input on the final pass
(replay.py). The collector cuts passes short once a stage's inputs are recorded
(calib/hessian.py).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from quantmoe.anatomy import BlockAnatomy, LinearUnit, ModelAnatomy, describe, family_of, unfuse_experts
from quantmoe.anatomy.carry import Carry, split_output, stand_in_output, with_carried
from quantmoe.anatomy.expert_view import EXPERT_INPUT_KINDS
from quantmoe.calib.data import CalibrationConfig
from quantmoe.calib.hessian import ExpertsHookTarget, HessianCollector, StopForward
from quantmoe.finite import all_finite
from quantmoe.hooks import removed_after
from quantmoe.quant.blocktune import tune_block_scales, tune_steps
from quantmoe.quant.gptq import (
    act_order_mode,
    act_order_record,
    gptq_quantize,
    gptq_quantize_batched,
    refine_sweeps,
)
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.qlinear import QuantLinear
from quantmoe.quant.replay import BlockReplay, FrozenOutputs
from quantmoe.quant.stages import STAGES, input_key, stage_of, stage_of_kind, stat_groups
from quantmoe.quant.working_set import expert_cache_bytes, expert_chunks

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class GPTQConfig:
    method: str = "gptq"
    damp: float = 0.01
    block_size: int = 128  # columns per lazy-update block (see gptq.py)
    # GPTQ column order: none, desc or gar (quant/gptq.py); a bool is read as False = none, True = desc
    act_order: str = "none"
    static_groups: bool = False  # group scale/zero from the unquantized W (forced by act_order desc with groups)
    batch_experts: bool = True  # one batched GPTQ over a block's experts of equal shape and settings
    # device memory a block may use to keep its routed experts' down inputs from the down stage's
    # pass for its final pass (which then skips their gate/up); 0 turns it off
    expert_cache_mb: float = 2048
    # at most this many experts per batched GPTQ call (0 = no cap but expert_batch_mb's)
    expert_chunk: int = 0
    # float32 working set of one batched expert GPTQ call (weights, Hessians, their inverses and
    # factors, codes): experts are batched in chunks that fit (at least one); 0 = all at once.
    # The same result bit for bit; on CPU chunks of a few experts are also faster (cache)
    expert_batch_mb: float = 64
    # float32 input statistics (x^T x) of routed experts that one calibration pass of a stage collects:
    # a stage calibrates its routed experts in groups that fit (at least one expert), each group's
    # pass stopping at the experts' dispatch; 0 = every expert in one pass. The same result bit for bit
    expert_stats_mb: float = 1024
    # keep o_proj's inputs from its own pass to rebuild the attention's output on the next pass without
    # running the attention again (memory: tokens x o_proj's input width); False runs the attention once
    # more per block instead. The same result bit for bit
    attention_tail: bool = True
    # keep the attention's output of each batch once its linears are quantized and replay it on the
    # block's later passes (memory: tokens x hidden); False runs the attention on every pass instead
    # (and keeps no o_proj inputs either). The same result bit for bit
    attention_replay: bool = True
    # rotate the residual stream by a random Hadamard matrix (seed 0) folded into the weights
    # before calibration (quant/rotate.py): the same model, other weights; recorded with the run
    rotate: bool = False
    # sweeps of coordinate descent on the codes after GPTQ (gptq.refine_codes): the same grid, a lower
    # layer loss; 0 = plain GPTQ
    refine: int = 0
    # Adam steps tuning each block's group scales against the full-precision block's output after
    # GPTQ (quant/blocktune.py), at learning rate tune_lr on the log-scales; 0 = off
    tune_steps: int = 0
    tune_lr: float = 0.005

    def __post_init__(self) -> None:
        object.__setattr__(self, "act_order", act_order_mode(self.act_order))
        refine_sweeps(self.refine)
        tune_steps(self.tune_steps)
        if not 0 < self.tune_lr < 1:
            raise ValueError(f"check `tune_lr`: {self.tune_lr} must be in (0, 1) (Adam's step on the log-scales)")
        if self.method not in METHODS:
            raise ValueError(f"check `method`: {self.method!r} is not one of {', '.join(METHODS)}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"check `damp`: {self.damp} must be in [0, 1) (a fraction of the mean diagonal)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"check `block_size`: {self.block_size!r} is not a positive number of columns")
        if self.expert_chunk < 0:
            raise ValueError(f"check `expert_chunk`: {self.expert_chunk} must be >= 0 (0 = all experts at once)")
        if self.expert_batch_mb < 0:
            raise ValueError(f"check `expert_batch_mb`: {self.expert_batch_mb} must be >= 0 (0 = all experts at once)")
        if self.expert_stats_mb < 0:
            raise ValueError(f"check `expert_stats_mb`: {self.expert_stats_mb} must be >= 0 (0 = all experts at once)")
        if self.expert_cache_mb < 0:
            raise ValueError(f"check `expert_cache_mb`: {self.expert_cache_mb} must be >= 0 (0 turns the cache off)")

    def to_dict(self) -> dict[str, Any]:
        """The settings as checkpoint metadata and resume identities record them: act-order none/desc as
        false/true, as before the modes existed, so that earlier checkpoints keep their identity."""
        return asdict(self) | {"act_order": act_order_record(self.act_order)}


@dataclass(frozen=True)
class UnitReport:
    bits: int
    group_size: int | None
    symmetric: bool
    method: str  # gptq, rtn, keep, rtn-fallback
    tokens: int
    loss: float | None = None
    damp: float | None = None
    note: str | None = None
    tuned: bool | None = None  # block tuning's scales kept (None: no tuning)


@dataclass(frozen=True)
class BlockReport:
    """What one block's quantization recorded (the streaming driver writes it as the block finishes)."""

    index: int
    units: Mapping[str, UnitReport]
    expert_tokens: tuple[int, ...] | None
    fallbacks: tuple[str, ...]
    seconds: float
    final_pass_seconds: float = 0.0  # the quantized block run over every calibration batch


def outside_to(model: nn.Module, layers: str, device: torch.device, skip: tuple[str, ...] = ()) -> None:
    """The real tensors outside the blocks (``layers``) to ``device``, but those of the modules in
    ``skip``; tied weights stay tied (moved in place), tensors on ``meta`` stay there."""
    for name, module in model.named_modules():
        if name == layers or name.startswith(layers + ".") or any(name == k or name.startswith(k + ".") for k in skip):
            continue
        module._apply(lambda t: t if t.is_meta else t.to(device), recurse=False)


class BlockIO:
    """Where the driver's blocks come from and where they go; this base keeps the whole model in memory.

    A streaming subclass (quant/stream.py) loads each block from disk in ``load_block``, writes
    it in ``block_done`` and frees it in ``release_block``; ``first_block`` and
    ``restored_hidden`` let a resumed run start after the blocks already done.
    """

    first_block: int = 0

    def load_embedding(self, model: nn.Module, embedding: nn.Module, device: torch.device) -> None:
        """What block 0's inputs are computed from on ``device``: the embedding and whatever else sits
        outside the blocks (ZAYA's input scale, rotary tables), but the LM head."""
        family = family_of(model)
        outside_to(model, family.layers, device, skip=(family.lm_head,))
        embedding.to(device)

    def release_embedding(self, model: nn.Module, embedding: nn.Module, home: torch.device) -> None:
        """Called once block 0's inputs are captured; the in-memory model keeps it until the end."""

    def restored_hidden(self) -> list[torch.Tensor] | None:
        """Hidden states entering ``first_block`` (one per calibration batch), when it is not 0."""
        return None

    def load_block(self, model: nn.Module, index: int, device: torch.device) -> nn.Module:
        return model.get_submodule(family_of(model).layers)[index].to(device)

    def restored_references(self) -> list[torch.Tensor] | None:
        """The full-precision model's hidden states leaving the last finished block (block tuning)."""
        return None

    def restored_carried(self, count: int) -> list[tuple[torch.Tensor | None, ...]] | None:
        """What the last finished block handed to ``first_block`` beside its hidden states (``count``
        tensors per calibration batch, ``FamilySpec.carries``), when ``first_block`` is not 0."""
        return None

    def block_done(self, model: nn.Module, index: int, outputs: Sequence[torch.Tensor], report: BlockReport,
                   references: Sequence[torch.Tensor] | None = None, carried: Sequence[tuple] = ()) -> None:
        """The block is quantized (its ``QuantLinear``s installed); ``outputs`` enter the next block,
        with ``carried`` (one tuple per batch: ``FamilySpec.carries``)."""

    def release_block(self, model: nn.Module, index: int, home: torch.device) -> None:
        model.get_submodule(family_of(model).layers)[index].to(home)

    def finish(self, model: nn.Module, embedding: nn.Module, home: torch.device) -> None:
        outside_to(model, family_of(model).layers, home)


@dataclass(frozen=True)
class QuantReport:
    units: Mapping[str, UnitReport]
    expert_tokens: Mapping[int, tuple[int, ...]]  # block -> routed calibration tokens per expert
    fallbacks: tuple[str, ...]
    seconds: float
    block_seconds: tuple[float, ...] = field(default=())


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[tuple[tuple, dict]]:
    """Positional and keyword inputs of the first block, one entry per calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    with removed_after() as handles:
        handles.append(first_block.register_forward_pre_hook(hook, with_kwargs=True))
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i:i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    return captured


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, blocks: Sequence[nn.Module], windows: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[list[tuple[tuple, dict]]]:
    """Per block, per calibration batch: the positional and keyword inputs the model's forward gives it.

    Each block gets its own: models that mix layer types pass each block its own attention
    mask (GPT-OSS and Qwen2-MoE alternate sliding-window and full attention), so block 0's
    mask is not every block's. No block runs: each ``forward`` is swapped for a recorder that
    passes the hidden states through, and the last one stops the pass. Blocks after the first
    get ``None`` for their hidden states: the driver puts in the outputs of the quantized
    block before.

    A family whose blocks hand more than their hidden states to the next (`FamilySpec.carries`:
    GLM-5's top-k indices, ZAYA's router states) gets recorders that return the same tuple, with
    None where the carried tensors go; the driver puts in the block before's (`with_carried`).
    A decoder loop that unpacks more than the spec declares cannot be walked with recorders:
    every block then gets block 0's keyword inputs.
    """
    captured: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    carries = family_of(model).carries

    def recorder(i: int):
        def forward(*args, **kwargs):
            captured[i].append((args if i == 0 else (None,) + args[1:], kwargs))  # later hidden states: filled in
            if i == len(blocks) - 1:
                raise _Captured
            return stand_in_output(carries, args[0] if args else kwargs["hidden_states"])
        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i:i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    except (ValueError, TypeError) as err:  # the loop unpacks more than hidden states from each block
        log.info("%s: its blocks return more than their hidden states (%s): every block is calibrated with "
                 "block 0's keyword inputs", type(model).__name__, err)
        captured = []
    finally:
        for block in blocks:
            del block.forward
    if not captured:
        first = capture_block_inputs(model, blocks[0], windows, batch_size, device)
        return [first] + [[((None,) + args[1:], kwargs) for args, kwargs in first] for _ in blocks[1:]]
    if any(len(c) != len(captured[0]) for c in captured):
        raise RuntimeError(f"{type(model).__name__} did not call each of its {len(blocks)} blocks once per batch: "
                           "its decoder loop is not the plain one quantmoe expects (see docs/adding-a-family.md)")
    return captured


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]], replay: BlockReplay | None = None,
               carries: Sequence[Carry] = (), carried: list[tuple] | None = None) -> list[torch.Tensor]:
    """The block's hidden-state outputs, one per batch; the tensors it hands to the next block
    (``carries``) are appended to ``carried``, one tuple per batch."""
    outs = []
    for i, (args, kwargs) in enumerate(inputs):
        if replay is not None:
            replay.at_batch(i)
        hidden, handed = split_output(carries, block(*args, **kwargs))
        outs.append(hidden)
        if carried is not None:
            carried.append(handed)
    return outs


def _calibrate_block(block: nn.Module, inputs: list[tuple[tuple, dict]], collector: HessianCollector,
                     replay: BlockReplay | None = None) -> None:
    """Run the block over every batch for its hooks; a stopping collector cuts each pass short."""
    for i, (args, kwargs) in enumerate(inputs):
        collector.start_batch()
        if replay is not None:
            replay.at_batch(i)
        try:
            block(*args, **kwargs)
        except StopForward:
            pass


def _first_frozen_stage(units: Sequence[LinearUnit]) -> int:
    """The first stage after every one of ``units`` is quantized."""
    return max((stage_of(u) + 1 for u in units), default=0)


def _block_replay(block: nn.Module, info: BlockAnatomy, units: Sequence[LinearUnit], attention: str,
                  inputs: list[tuple[tuple, dict]], calib: CalibrationConfig, gptq: GPTQConfig) -> BlockReplay:
    """The attention from the stage after its linears, unless ``gptq.attention_replay`` is off (rebuilt
    from the inputs of its tail, the linear alone in its last stage, o_proj, unless
    ``gptq.attention_tail`` is off); each routed expert's down
    input from the stage after gate/up, for as many experts as fit in ``gptq.expert_cache_mb`` at their
    average share of the routed tokens (not in the ``all`` MoE mode: experts also run on every token
    there)."""
    parts = []
    module = getattr(block, attention, None)
    if module is not None and gptq.attention_replay:
        prefix = f"{info.module_name}.{attention}."
        mine = [u for u in units if u.name.startswith(prefix)]
        first = _first_frozen_stage(mine)
        last = [u.name.removeprefix(prefix) for u in mine if stage_of(u) == first - 1]
        tail = last[0] if gptq.attention_tail and len(last) == 1 and "." not in last[0] else None
        parts.append((FrozenOutputs(module, tail=tail), first))
    readers = [u for u in units if u.expert is not None and u.kind in EXPERT_INPUT_KINDS]
    if info.is_moe and readers and calib.moe_mode != "all" and not gptq.tune_steps:  # tuned: no final replay
        experts = block.get_submodule(info.experts_module.removeprefix(info.module_name + "."))
        tokens = sum(args[0].shape[:-1].numel() for args, _ in inputs)
        size_mb = expert_cache_bytes(readers, info.top_k, tokens, inputs[0][0][0].element_size()) / 2**20
        experts = list(experts)
        fits = len(experts) if size_mb <= gptq.expert_cache_mb else int(gptq.expert_cache_mb / size_mb * len(experts))
        first = _first_frozen_stage(readers)
        parts += [(FrozenOutputs(expert, method="hidden"), first) for expert in experts[:fits]]
    return BlockReplay(parts)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Every floating tensor (routers, norms, embeddings, not only linears) finite, or a clear error."""
    for name, t in tensors:
        if t.is_floating_point() and not t.is_meta and not all_finite(t):
            raise ValueError(f"the model's tensor {name} has {int((~torch.isfinite(t)).sum()):,} NaN/Inf values: "
                             "the checkpoint is corrupt or was saved after a diverged training run; quantization "
                             "needs finite weights")


@torch.no_grad()
def quantize_model(model: nn.Module, specs: Mapping[str, QuantSpec], windows: torch.Tensor,
                   calib: CalibrationConfig = CalibrationConfig(), gptq: GPTQConfig = GPTQConfig(),
                   device: str | torch.device | None = None, progress: bool = True,
                   io: BlockIO | None = None) -> QuantReport:
    """Quantize ``model`` in place: every unit in ``specs`` becomes a ``QuantLinear``.

    The model is switched to its per-expert view block by block (and stays in it: quantized
    experts are per-expert modules). ``specs`` maps unit names to settings (see ``Plan.resolve``).
    ``io`` says where blocks come from and go to (default: all in memory); the report covers
    the blocks quantized in this call. With ``gptq.rotate`` the residual stream is rotated first
    (``quantmoe.quant.rotate.rotate_model``, in memory only).

    Inside an initialized ``torch.distributed`` process group of more than one rank (torchrun),
    each rank calibrates on its share of ``windows`` and quantizes the experts it owns
    (quant/distributed.py); every rank ends with the same quantized model.
    """
    t_start = time.perf_counter()
    io = io if io is not None else BlockIO()
    parallel = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from quantmoe.quant.distributed import current

        parallel = current() if gptq.method == "gptq" else None  # RTN needs no calibration: every rank alone
    if parallel is not None:
        if type(io) is not BlockIO:
            raise ValueError("streamed quantization (--stream/--resume) runs in one process: drop torchrun")
        if gptq.tune_steps:
            raise ValueError("block tuning (--tune-steps) runs in one process: drop torchrun or --tune-steps")
        windows = parallel.share(windows)
    family = family_of(model)
    if gptq.rotate:
        from quantmoe.quant.rotate import rotate_model

        rotate_model(model)
    anatomy: ModelAnatomy = describe(model)
    home = next(model.parameters()).device
    home = torch.device("cpu") if home.type == "meta" else home  # a skeleton's blocks arrive one by one
    device = torch.device(device) if device is not None else home
    streamed = any(p.is_meta for p in model.parameters())  # blocks arrive one by one (quant/stream.py)
    if not streamed:
        unfuse_experts(model)
        check_finite(model.state_dict().items())  # before any work, when every weight is at hand
    blocks = model.get_submodule(family.layers)
    embedding = model.get_submodule(family.embedding)
    io.load_embedding(model, embedding, device)
    rotary = getattr(model.get_submodule(family.layers.rsplit(".", 1)[0]), "rotary_emb", None)
    if rotary is not None:
        rotary.to(device)
    layer_inputs = capture_layer_inputs(model, blocks, windows, calib.batch_size, device)
    io.release_embedding(model, embedding, home)
    inputs = layer_inputs[io.first_block]
    restored = io.restored_hidden()
    if restored is not None:
        if len(restored) != len(inputs):
            raise ValueError(f"{len(restored)} stored calibration batches, expected {len(inputs)}")
        handed = io.restored_carried(len(family.carries)) or [(None,) * len(family.carries)] * len(inputs)
        inputs = [with_carried(family.carries, args, kwargs, h.to(device), tuple(_to(t, device) for t in c))
                  for h, c, (args, kwargs) in zip(restored, handed, inputs, strict=True)]
    # block tuning's targets come from the full-precision model's own hidden states, carried beside
    references = None
    if gptq.tune_steps:
        references = io.restored_references() if restored is not None else [args[0] for args, _ in inputs]
        if references is None or len(references) != len(inputs):
            raise ValueError("this work folder holds no full-precision hidden states for block tuning: it was "
                             "started without --tune-steps; start it again without --resume")
        references = [r.to(device) for r in references]
    reports: dict[str, UnitReport] = {}
    expert_tokens: dict[int, tuple[int, ...]] = {}
    fallbacks: list[str] = []
    block_seconds: list[float] = []
    by_block: dict[int, list[LinearUnit]] = defaultdict(list)
    for unit in anatomy.units:
        by_block[unit.block].append(unit)
    todo = [b for b in anatomy.blocks if b.index >= io.first_block]
    bar = tqdm(todo, desc="quantize blocks", disable=not progress or (parallel is not None and parallel.rank > 0))
    for block_info in bar:
        t0 = time.perf_counter()
        units = by_block[block_info.index]
        block = io.load_block(model, block_info.index, device)
        unfuse_experts(model, only=(block_info.experts_module,) if block_info.is_moe else ())
        block = blocks[block_info.index]
        if streamed:
            check_finite(block.state_dict(prefix=f"{family.layers}.{block_info.index}.").items())
        n_fallbacks = len(fallbacks)
        experts = [ExpertsHookTarget(block_info.experts_module, block_info.num_experts)] if block_info.is_moe else []
        experts_module_of = {u.name: block_info.experts_module if u.expert is not None else None for u in units}
        staged: dict[str, QuantLinear] = {}  # computed as dense stand-ins until the block is done
        targets = None
        if references is not None:  # the full-precision block's outputs, before any of its linears change
            targets = _run_block(block, [((r,) + args[1:], kwargs) for r, (args, kwargs) in zip(references, inputs)])
        replay = _block_replay(block, block_info, units, block_info.mixer, inputs, calib, gptq)
        for stage_index in range(len(STAGES)):
            stage_units = [u for u in units if stage_of(u) == stage_index and not specs[u.name].keep]
            for u in units:
                if stage_of(u) == stage_index and specs[u.name].keep:
                    reports[u.name] = UnitReport(16, None, True, "keep", 0)
            if not stage_units:
                continue
            groups = stat_groups(stage_units, calib, gptq)
            for g, group in enumerate(groups):
                collector = HessianCollector(model, group, input_key, experts, calib.moe_mode, stop_early=True)
                if gptq.method == "gptq":
                    with replay.stage(stage_index), collector.attached(experts_module_of):
                        _calibrate_block(block, inputs, collector, replay)
                if parallel is None:
                    _quantize_units(model, group, specs, collector, calib, gptq, reports, fallbacks, staged)
                else:
                    what = f"block {block_info.index} stage {stage_index}" + (f" group {g}" if len(groups) > 1 else "")
                    _quantize_shared(model, group, specs, collector, calib, gptq, reports, fallbacks, staged,
                                     parallel, what)
                if experts and stage_index == stage_of_kind("gate_proj") and gptq.method == "gptq" and g == 0:
                    # every group's pass routes all the tokens: the counts are the same in each
                    expert_tokens[block_info.index] = tuple(
                        collector.routed_tokens[block_info.experts_module].tolist())
        if targets is not None and staged:
            tuned = tune_block_scales(model, staged, inputs, targets, gptq.tune_steps, gptq.tune_lr, block=block)
            for u in units:
                if u.name in staged:
                    reports[u.name] = replace(reports[u.name], tuned=tuned.kept)
            log.info("block %d tuned: output loss %.4g -> %.4g%s", block_info.index, tuned.loss_before,
                     tuned.loss_after, "" if tuned.kept else " (not lower: GPTQ's scales kept)")
            replay = BlockReplay()  # what it kept predates the tuned scales
        t_final = time.perf_counter()
        carried: list[tuple] = []  # what the block hands to the next beside its outputs (FamilySpec.carries)
        with replay.stage(len(STAGES)):
            outputs = _run_block(block, inputs, replay, family.carries, carried)
        t_final = time.perf_counter() - t_final
        for out in outputs:
            if not all_finite(out):
                raise ValueError(f"block {block_info.index} produced NaN/Inf after quantization")
        del replay  # what it kept (the block's device memory) goes before the next block arrives
        for name, qlinear in staged.items():
            model.set_submodule(name, qlinear)
        if block_info.index + 1 < len(layer_inputs):  # the next block's own mask and positions
            layer_inputs[block_info.index] = []
            inputs = [with_carried(family.carries, args, kwargs, out, handed)
                      for out, handed, (args, kwargs) in zip(outputs, carried, layer_inputs[block_info.index + 1])]
        block_seconds.append(time.perf_counter() - t0)
        if targets is not None:
            references = targets
        io.block_done(model, block_info.index, outputs,
                      BlockReport(block_info.index, {u.name: reports[u.name] for u in units},
                                  expert_tokens.get(block_info.index), tuple(fallbacks[n_fallbacks:]),
                                  block_seconds[-1], t_final), references, carried)
        del outputs, carried, block
        io.release_block(model, block_info.index, home)
        bar.set_postfix(block=block_info.index, s=f"{block_seconds[-1]:.1f}")
    io.finish(model, embedding, home)
    if rotary is not None:
        rotary.to(home)
    if fallbacks:
        log.info("%d linears fell back to RTN (too few calibration tokens or no positive-definite Hessian): "
                 "%s", len(fallbacks), ", ".join(fallbacks[:3]) + (", ..." if len(fallbacks) > 3 else ""))
    return QuantReport(units=reports, expert_tokens=expert_tokens, fallbacks=tuple(fallbacks),
                       seconds=time.perf_counter() - t_start, block_seconds=tuple(block_seconds))


def _stage(model: nn.Module, name: str, qlinear: QuantLinear, staged: dict[str, QuantLinear],
           weight: torch.Tensor | None = None) -> None:
    """Put the dense stand-in of ``qlinear`` (its dequantized ``weight``, if at hand) in place; the
    driver installs ``qlinear`` once the block is done."""
    staged[name] = qlinear
    model.set_submodule(name, qlinear.dense(weight))


def _quantize_shared(model: nn.Module, units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec],
                     collector: HessianCollector, calib: CalibrationConfig, gptq: GPTQConfig,
                     reports: dict[str, UnitReport], fallbacks: list[str], staged: dict[str, QuantLinear],
                     parallel, what: str) -> None:
    """``_quantize_units`` over ranks: Hessians summed onto their owners, each rank quantizes its
    own units, then every rank receives the others' (quant/distributed.py). Fallbacks are listed
    in unit order."""
    parallel.reduce_stats(collector, units, what)
    n_fallbacks = len(fallbacks)
    _quantize_units(model, [u for u in units if parallel.owns(u)], specs, collector, calib, gptq, reports,
                    fallbacks, staged)
    for name, qlinear in parallel.share_stage(model, units, reports, staged, what).items():
        _stage(model, name, qlinear, staged)
    del fallbacks[n_fallbacks:]
    fallbacks += [u.name for u in units if reports[u.name].method == "rtn-fallback"]


def _quantize_units(model: nn.Module, units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec],
                    collector: HessianCollector, calib: CalibrationConfig, gptq: GPTQConfig,
                    reports: dict[str, UnitReport], fallbacks: list[str], staged: dict[str, QuantLinear]) -> None:
    """GPTQ (batched over experts of equal shape and settings, in chunks) or RTN for each unit of a
    stage. A chunk's Hessians are built when it runs; an input's statistics are freed once the
    last unit reading it is quantized."""
    batches: dict[tuple, list[tuple[LinearUnit, int]]] = defaultdict(list)
    for unit in units:
        spec = specs[unit.name]
        linear = model.get_submodule(unit.name)
        if gptq.method == "rtn":
            _stage(model, unit.name, QuantLinear.from_float(linear, spec), staged)
            reports[unit.name] = UnitReport(spec.bits, spec.group_size, spec.symmetric, "rtn", 0)
            continue
        tokens = collector.tokens(unit)
        if tokens == 0 or (unit.expert is not None and tokens < calib.min_expert_tokens):
            # never GPTQ on an empty Hessian: it would zero the weights
            _stage(model, unit.name, QuantLinear.from_float(linear, spec), staged)
            note = f"{tokens} calibration tokens < min_expert_tokens={calib.min_expert_tokens}"
            reports[unit.name] = UnitReport(spec.bits, spec.group_size, spec.symmetric, "rtn-fallback", tokens,
                                            note=note)
            fallbacks.append(unit.name)
            collector.release(unit)
            continue
        key = (unit.kind, spec, tuple(linear.weight.shape), unit.expert is not None)
        batches[key].append((unit, tokens))
    chunked = []
    for (_, spec, shape, is_expert), items in batches.items():
        step = expert_chunks(len(items), shape, gptq) if is_expert else len(items)
        chunked += [(spec, is_expert, items[i:i + step]) for i in range(0, len(items), step)]
    for spec, is_expert, items in chunked:
        linears = [model.get_submodule(u.name) for u, _ in items]
        weights = [linear.weight for linear in linears]
        if is_expert and len(items) > 1 and gptq.batch_experts:
            results = gptq_quantize_batched(torch.stack(weights),
                                            torch.stack([collector.hessian(u)[0] for u, _ in items]), spec,
                                            damp=gptq.damp, block_size=gptq.block_size, act_order=gptq.act_order,
                                            static_groups=gptq.static_groups, refine=gptq.refine,
                                            names=[u.name for u, _ in items])
        else:
            results = [gptq_quantize(w, collector.hessian(u)[0], spec, damp=gptq.damp, block_size=gptq.block_size,
                                     act_order=gptq.act_order, static_groups=gptq.static_groups,
                                     refine=gptq.refine, name=u.name)
                       for w, (u, _) in zip(weights, items)]
        qlinears = QuantLinear.from_results(linears, results)
        for (unit, tokens), result, qlinear in zip(items, results, qlinears):
            _stage(model, unit.name, qlinear, staged, weight=result.Q)
            collector.release(unit)
            method = "rtn-fallback" if result.fallback else "gptq"
            if result.fallback:
                fallbacks.append(unit.name)
            reports[unit.name] = UnitReport(spec.bits, spec.group_size, spec.symmetric, method, tokens,
                                            loss=result.loss, damp=result.damp_used,
                                            note="Hessian not positive definite" if result.fallback else None)
