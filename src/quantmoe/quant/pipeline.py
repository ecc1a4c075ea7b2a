"""The sequential quantization driver: one block at a time.

capture block 0's inputs -> for each block: calibrate and quantize its linears stage by
stage (attention inputs -> o_proj -> experts' gate/up -> down), each stage seeing the
already-quantized earlier stages -> re-run the quantized block so the next block sees
quantized inputs. Only the block being worked on needs to sit on ``device``; the rest of
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from quantmoe.anatomy import BlockAnatomy, LinearUnit, ModelAnatomy, describe, family_of, unfuse_experts
from quantmoe.anatomy.expert_view import EXPERT_INPUT_KINDS
from quantmoe.calib.data import CalibrationConfig
from quantmoe.calib.hessian import ExpertsHookTarget, HessianCollector, StopForward
from quantmoe.hooks import removed_after
from quantmoe.quant.gptq import gptq_quantize, gptq_quantize_batched
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.qlinear import QuantLinear
from quantmoe.quant.replay import BlockReplay, FrozenOutputs

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class Stage:
    kinds: frozenset[str]
    shared_input: bool  # linears of one parent module in this stage read the same input


# The paper's sequential order inside a block, as data. MLA's q_b/kv_b read different inputs.
STAGES: tuple[Stage, ...] = (
    Stage(frozenset({"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"}), True),
    Stage(frozenset({"q_b_proj", "kv_b_proj"}), False),
    Stage(frozenset({"o_proj"}), False),
    Stage(frozenset({"gate_proj", "up_proj"}), True),
    Stage(frozenset({"down_proj"}), False),
)


@dataclass(frozen=True)
class GPTQConfig:
    method: str = "gptq"
    damp: float = 0.01
    block_size: int = 128  # columns per lazy-update block (see gptq.py)
    act_order: bool = False
    static_groups: bool = False  # group scale/zero from the unquantized W (forced by act_order with groups)
    batch_experts: bool = True  # one batched GPTQ over a block's experts of equal shape and settings
    # device memory a block may use to keep its routed experts' down inputs from the down stage's
    # pass for its final pass (which then skips their gate/up); 0 turns it off
    expert_cache_mb: float = 2048

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"check `method`: {self.method!r} is not one of {', '.join(METHODS)}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"check `damp`: {self.damp} must be in [0, 1) (a fraction of the mean diagonal)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"check `block_size`: {self.block_size!r} is not a positive number of columns")
        if self.expert_cache_mb < 0:
            raise ValueError(f"check `expert_cache_mb`: {self.expert_cache_mb} must be >= 0 (0 turns the cache off)")


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


@dataclass(frozen=True)
class QuantReport:
    units: Mapping[str, UnitReport]
    expert_tokens: Mapping[int, tuple[int, ...]]  # block -> routed calibration tokens per expert
    fallbacks: tuple[str, ...]
    seconds: float
    block_seconds: tuple[float, ...] = field(default=())


def stage_of_kind(kind: str) -> int:
    for i, stage in enumerate(STAGES):
        if kind in stage.kinds:
            return i
    raise ValueError(f"linear kind {kind!r} has no calibration stage: add it to quantmoe.quant.pipeline.STAGES")


def stage_of(unit: LinearUnit) -> int:
    return stage_of_kind(unit.kind)


def _input_key(unit: LinearUnit) -> str:
    stage = STAGES[stage_of(unit)]
    return unit.name.rsplit(".", 1)[0] + f"#stage{stage_of(unit)}" if stage.shared_input else unit.name


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


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]],
               replay: BlockReplay | None = None) -> list[torch.Tensor]:
    outs = []
    for i, (args, kwargs) in enumerate(inputs):
        if replay is not None:
            replay.at_batch(i)
        out = block(*args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
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
    """The attention from the stage after its linears (its tail: the linear alone in its last
    stage, o_proj); each routed expert's down input from the stage after gate/up, within
    ``gptq.expert_cache_mb`` (not in the ``all`` MoE mode: experts also run on every token there)."""
    parts = []
    module = getattr(block, attention, None)
    if module is not None:
        prefix = f"{info.module_name}.{attention}."
        mine = [u for u in units if u.name.startswith(prefix)]
        first = _first_frozen_stage(mine)
        last = [u.name.removeprefix(prefix) for u in mine if stage_of(u) == first - 1]
        parts.append((FrozenOutputs(module, tail=last[0] if len(last) == 1 and "." not in last[0] else None), first))
    readers = [u for u in units if u.expert is not None and u.kind in EXPERT_INPUT_KINDS]
    if info.is_moe and readers and calib.moe_mode != "all":
        experts = block.get_submodule(info.experts_module.removeprefix(info.module_name + "."))
        hidden = max(u.out_features for u in readers)
        tokens = sum(args[0].shape[:-1].numel() for args, _ in inputs)
        size_mb = info.top_k * tokens * hidden * inputs[0][0][0].element_size() / 2**20
        if size_mb <= gptq.expert_cache_mb:
            first = _first_frozen_stage(readers)
            parts += [(FrozenOutputs(expert, method="hidden"), first) for expert in experts]
    return BlockReplay(parts)


@torch.no_grad()
def quantize_model(model: nn.Module, specs: Mapping[str, QuantSpec], windows: torch.Tensor,
                   calib: CalibrationConfig = CalibrationConfig(), gptq: GPTQConfig = GPTQConfig(),
                   device: str | torch.device | None = None, progress: bool = True) -> QuantReport:
    """Quantize ``model`` in place: every unit in ``specs`` becomes a ``QuantLinear``.

    The model is switched to its per-expert view (and stays in it: quantized experts are
    per-expert modules). ``specs`` maps unit names to settings (see ``Plan.resolve``).
    """
    t_start = time.perf_counter()
    family = family_of(model)
    unfuse_experts(model)
    anatomy: ModelAnatomy = describe(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    for name, t in model.state_dict().items():  # every tensor (routers, norms, embeddings), not only linears
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the model's tensor {name} has {int((~torch.isfinite(t)).sum()):,} NaN/Inf values: "
                             "the checkpoint is corrupt or was saved after a diverged training run; quantization "
                             "needs finite weights")
    blocks = model.get_submodule(family.layers)
    model.get_submodule(family.embedding).to(device)
    rotary = getattr(model.get_submodule(family.layers.rsplit(".", 1)[0]), "rotary_emb", None)
    if rotary is not None:
        rotary.to(device)
    inputs = capture_block_inputs(model, blocks[0], windows, calib.batch_size, device)
    reports: dict[str, UnitReport] = {}
    expert_tokens: dict[int, tuple[int, ...]] = {}
    fallbacks: list[str] = []
    block_seconds: list[float] = []
    by_block: dict[int, list[LinearUnit]] = defaultdict(list)
    for unit in anatomy.units:
        by_block[unit.block].append(unit)
    bar = tqdm(anatomy.blocks, desc="quantize blocks", disable=not progress)
    for block_info in bar:
        t0 = time.perf_counter()
        block = blocks[block_info.index].to(device)
        units = by_block[block_info.index]
        experts = [ExpertsHookTarget(block_info.experts_module, block_info.num_experts)] if block_info.is_moe else []
        experts_module_of = {u.name: block_info.experts_module if u.expert is not None else None for u in units}
        staged: dict[str, QuantLinear] = {}  # computed as dense stand-ins until the block is done
        replay = _block_replay(block, block_info, units, family.attention, inputs, calib, gptq)
        for stage_index in range(len(STAGES)):
            stage_units = [u for u in units if stage_of(u) == stage_index and not specs[u.name].keep]
            for u in units:
                if stage_of(u) == stage_index and specs[u.name].keep:
                    reports[u.name] = UnitReport(16, None, True, "keep", 0)
            if not stage_units:
                continue
            collector = HessianCollector(model, stage_units, _input_key, experts, calib.moe_mode, stop_early=True)
            if gptq.method == "gptq":
                with replay.stage(stage_index), collector.attached(experts_module_of):
                    _calibrate_block(block, inputs, collector, replay)
            _quantize_units(model, stage_units, specs, collector, calib, gptq, reports, fallbacks, staged)
            if experts and stage_index == stage_of_kind("gate_proj") and gptq.method == "gptq":
                expert_tokens[block_info.index] = tuple(collector.routed_tokens[block_info.experts_module].tolist())
        with replay.stage(len(STAGES)):
            outputs = _run_block(block, inputs, replay)
        for out in outputs:
            if not torch.isfinite(out).all():
                raise ValueError(f"block {block_info.index} produced NaN/Inf after quantization")
        del replay  # what it kept (the block's device memory) goes before the next block arrives
        for name, qlinear in staged.items():
            _replace(model, name, qlinear)
        inputs = [((out,) + args[1:], kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
        blocks[block_info.index].to(home)
        block_seconds.append(time.perf_counter() - t0)
        bar.set_postfix(block=block_info.index, s=f"{block_seconds[-1]:.1f}")
    model.get_submodule(family.embedding).to(home)
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
    _replace(model, name, qlinear.dense(weight))


def _quantize_units(model: nn.Module, units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec],
                    collector: HessianCollector, calib: CalibrationConfig, gptq: GPTQConfig,
                    reports: dict[str, UnitReport], fallbacks: list[str], staged: dict[str, QuantLinear]) -> None:
    """GPTQ (batched over experts of equal shape and settings) or RTN for each unit of a stage."""
    batches: dict[tuple, list[tuple[LinearUnit, torch.Tensor, int]]] = defaultdict(list)
    for unit in units:
        spec = specs[unit.name]
        linear = model.get_submodule(unit.name)
        if gptq.method == "rtn":
            _stage(model, unit.name, QuantLinear.from_float(linear, spec), staged)
            reports[unit.name] = UnitReport(spec.bits, spec.group_size, spec.symmetric, "rtn", 0)
            continue
        H, tokens = collector.hessian(unit)
        if tokens == 0 or (unit.expert is not None and tokens < calib.min_expert_tokens):
            # never GPTQ on an empty Hessian: it would zero the weights
            _stage(model, unit.name, QuantLinear.from_float(linear, spec), staged)
            note = f"{tokens} calibration tokens < min_expert_tokens={calib.min_expert_tokens}"
            reports[unit.name] = UnitReport(spec.bits, spec.group_size, spec.symmetric, "rtn-fallback", tokens,
                                            note=note)
            fallbacks.append(unit.name)
            continue
        key = (unit.kind, spec, tuple(linear.weight.shape), unit.expert is not None)
        batches[key].append((unit, H, tokens))
    for (_, spec, _, is_expert), items in batches.items():
        linears = [model.get_submodule(u.name) for u, _, _ in items]
        weights = [linear.weight for linear in linears]
        if is_expert and len(items) > 1 and gptq.batch_experts:
            results = gptq_quantize_batched(torch.stack(weights), torch.stack([H for _, H, _ in items]), spec,
                                            damp=gptq.damp, block_size=gptq.block_size, act_order=gptq.act_order,
                                            static_groups=gptq.static_groups,
                                            names=[u.name for u, _, _ in items])
        else:
            results = [gptq_quantize(w, H, spec, damp=gptq.damp, block_size=gptq.block_size,
                                     act_order=gptq.act_order, static_groups=gptq.static_groups, name=u.name)
                       for w, (u, H, _) in zip(weights, items)]
        qlinears = QuantLinear.from_results(linears, results)
        for (unit, _, tokens), result, qlinear in zip(items, results, qlinears):
            _stage(model, unit.name, qlinear, staged, weight=result.Q)
            method = "rtn-fallback" if result.fallback else "gptq"
            if result.fallback:
                fallbacks.append(unit.name)
            reports[unit.name] = UnitReport(spec.bits, spec.group_size, spec.symmetric, method, tokens,
                                            loss=result.loss, damp=result.damp_used,
                                            note="Hessian not positive definite" if result.fallback else None)
