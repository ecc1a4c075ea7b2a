"""The calibration stages of a block, as data, and how a stage's linears share their input statistics.

Inside a block the driver (quant/pipeline.py) calibrates and quantizes the linears stage by
stage, in the paper's sequential order: attention inputs -> MLA's second projections ->
o_proj -> the experts' gate/up -> down; each stage sees the already-quantized earlier ones.
Linears of one parent module in a stage that reads a shared input share one statistic
(`input_key`), and a stage's routed experts are calibrated in groups whose statistics fit a
memory budget (`stat_groups`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantmoe.anatomy import LinearUnit

if TYPE_CHECKING:
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.quant.pipeline import GPTQConfig


@dataclass(frozen=True)
class Stage:
    kinds: frozenset[str]
    shared_input: bool  # linears of one parent module in this stage read the same input


# The paper's sequential order inside a block, as data. MLA's q_b/kv_b read different inputs.
# Linear-attention and Mamba mixers (anatomy `Mixer`s) read the block input in their in_proj*
# and write it back through out_proj, like q/k/v and o_proj. A gated attention's gate_proj
# shares its kind with the MLP's and is calibrated in the MLP's gate/up pass. Output gates (`g_proj`)
# and forget gates (`f_proj`, the low-rank `f_a_proj` -> `f_b_proj`) read the block input too; A.X-K2's
# `q_gate_proj` reads the query latent, like q_b_proj. ZAYA's value projections (`v_proj_current`,
# `v_proj_delayed`: half of each value head from this token, half from the one before) read the block input,
# as does DeepSeek-V4's single KV head (`kv_proj`); its `o_b_proj` writes the attention's output (after the
# grouped `o_a_proj`, which is not quantized).
STAGES: tuple[Stage, ...] = (
    Stage(frozenset({"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa", "in_proj",
                     "in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                     "g_a_proj", "b_proj", "qkv_proj", "output_gate", "Wqkv", "g_proj", "f_proj", "f_a_proj",
                     "v_proj_current", "v_proj_delayed", "kv_proj"}), True),
    Stage(frozenset({"q_b_proj", "kv_b_proj", "g_b_proj", "f_b_proj", "q_gate_proj"}), False),
    Stage(frozenset({"o_proj", "out_proj", "o_b_proj"}), False),
    Stage(frozenset({"gate_proj", "up_proj", "w1", "w3", "input_linear", "gate_up_proj"}), True),  # [gate; up] fused
    Stage(frozenset({"down_proj", "w2", "output_linear"}), False),
)


def stage_of_kind(kind: str) -> int:
    """The calibration stage of a linear kind; a dotted kind (`forget_gate.f_proj`, a linear inside a
    submodule of the mixer) is staged by its own name, the last step."""
    name = kind.rpartition(".")[2]
    for i, stage in enumerate(STAGES):
        if name in stage.kinds:
            return i
    raise ValueError(f"linear kind {kind!r} has no calibration stage: add it to quantmoe.quant.stages.STAGES")


def stage_of(unit: LinearUnit) -> int:
    return stage_of_kind(unit.kind)


def input_key(unit: LinearUnit) -> str:
    """The statistic a unit's input is recorded in: shared by the linears of one parent module in a
    stage whose linears read the same input (q/k/v; an expert's gate/up)."""
    stage = STAGES[stage_of(unit)]
    return unit.name.rsplit(".", 1)[0] + f"#stage{stage_of(unit)}" if stage.shared_input else unit.name


def expert_stats_bytes(units: Sequence[LinearUnit]) -> dict[int, int]:
    """Routed expert -> bytes of the float32 input statistics (x^T x) its ``units`` of one stage collect
    (linears of an expert that share an input share them)."""
    per_expert: dict[int, int] = defaultdict(int)
    seen: set[str] = set()
    for u in units:
        key = input_key(u)
        if u.expert is not None and key not in seen:
            seen.add(key)
            per_expert[u.expert] += 4 * u.in_features * u.in_features
    return dict(per_expert)


def stat_groups(units: Sequence[LinearUnit], calib: CalibrationConfig, gptq: GPTQConfig) -> list[list[LinearUnit]]:
    """One stage's units as calibration groups, each calibrated by its own pass: routed experts in
    index order, as many per group as their statistics fit in ``gptq.expert_stats_mb`` (at least one);
    the other units (attention, shared experts, dense MLPs) with the first group. One group when the
    budget is 0, without GPTQ, or in the ``all`` MoE mode (every expert shares one statistic there).

    Each expert's statistics sum the same rows in the same order in any grouping, so the grouping
    changes no bit of the result; a later group's pass replays the block up to the experts' dispatch
    (the attention's output is kept) and stops there."""
    sizes = expert_stats_bytes(units)
    budget = gptq.expert_stats_mb * 2**20
    if not budget or gptq.method != "gptq" or calib.moe_mode == "all" or sum(sizes.values()) <= budget:
        return [list(units)]
    group_of: dict[int, int] = {}
    group, used = 0, 0
    for expert, size in sorted(sizes.items()):
        if used and used + size > budget:
            group, used = group + 1, 0
        group_of[expert] = group
        used += size
    groups: list[list[LinearUnit]] = [[] for _ in range(group + 1)]
    for u in units:
        groups[group_of[u.expert] if u.expert is not None else 0].append(u)
    return groups
