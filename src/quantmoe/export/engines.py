"""Which serving engines can load a plan's GPTQ export, and why not.

The rules come from the engines' own loaders (docs/serving.md cites them):

* every engine: the format stores 2, 3, 4 and 8 bits; packing needs whole int32 words along
  both dimensions (3 bits: multiples of 32).
* gptqmodel (its torch kernel, ``TorchLinear``): group sizes -1, 16, 32, ..., 1024; any mix of
  formats per module, routed experts included.
* transformers (5.24, through optimum 2.3 + GPTQModel 7.7; tried here, docs/serving.md): its GPTQ
  integration replaces ``nn.Linear`` modules only, so the fused 3D experts of transformers 5 MoE
  models are left unquantized (their per-expert tensors "unexpected"), and it builds every
  linear in the base format, ignoring ``dynamic``: no MoE export loads.
* vllm / sglang (SGLang reuses vLLM's GPTQ loaders): the fused-MoE kernel takes one format per
  layer, so all routed experts of a block share one format, 4 or 8 bits symmetric (Marlin MoE:
  uint4b8/uint8b128; the MoeWNA16 fallback also takes 4/8); linears that the engine fuses
  (q/k/v, DeepSeek's q_a/kv_a, gate/up of shared experts and dense MLPs) share one format; a
  grouped linear's input must be a multiple of its group size. Marlin (chosen automatically
  when the base format is 4 or 8 bits symmetric) takes only 4/8-bit symmetric modules with
  groups -1, 32, 64 or 128; any other module needs vLLM's ``gptq`` method
  (``--quantization gptq``), whose MoE path ignores ``dynamic`` and reads experts in the base
  format: then every routed expert of every block has the base format.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from quantmoe.anatomy import LinearUnit
from quantmoe.export.dynamic import GPTQFormat
from quantmoe.export.gptq_format import storable
from quantmoe.quant.grid import QuantSpec

ENGINES = ("vllm", "sglang", "gptqmodel", "transformers")
TORCH_KERNEL_GROUPS = (-1, 16, 32, 64, 128, 256, 512, 1024)
MARLIN_GROUPS = (-1, 32, 64, 128)
MOE_BITS = (4, 8)
# linears an engine fuses into one (vLLM's packed_modules_mapping): they must share a format
FUSED_KINDS = (("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj"))


def _block_fix(experts_module: str) -> str:
    pattern = experts_module.replace(".", "\\.") + "\\..*"
    return ("give every routed expert of a block one format: `quantmoe solve --granularity block`, or a plan "
            f"pattern for the block, e.g. {{pattern: '{pattern}', bits: 4}}")


class ServingError(ValueError):
    """A plan an engine cannot load, with the modules and the fix."""


@dataclass(frozen=True)
class Problem:
    where: str  # a module, or a block's experts module
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}; {self.fix}"


def _fmt(f: GPTQFormat | None) -> str:
    if f is None:
        return "16 bits"
    grid = "sym" if f.sym else "asym"
    return f"{f.bits} bits g{f.group_size if f.group_size > 0 else '-1 (per-channel)'} {grid}"


def _common(units: Sequence[LinearUnit], fmts: Mapping[str, GPTQFormat | None]) -> list[Problem]:
    out = []
    for u in units:
        f = fmts[u.name]
        why = None if f is None else storable(u.in_features, u.out_features, f.bits)
        if why:
            out.append(Problem(u.name, f"cannot be stored in the GPTQ format: {why}",
                               "give it another width (a plan `modules` entry) or keep it at 16 bits"))
    return out


def _torch_kernel(units: Sequence[LinearUnit], fmts: Mapping[str, GPTQFormat | None]) -> list[Problem]:
    return [Problem(u.name, f"group size {fmts[u.name].group_size} is not one of GPTQModel's "
                            f"{', '.join(map(str, TORCH_KERNEL_GROUPS))}", "set `group_size` in the plan")
            for u in units if fmts[u.name] is not None and fmts[u.name].group_size not in TORCH_KERNEL_GROUPS]


def _vllm(units: Sequence[LinearUnit], fmts: Mapping[str, GPTQFormat | None]) -> list[Problem]:
    out: list[Problem] = []
    experts: dict[int, list[LinearUnit]] = defaultdict(list)
    fused: dict[tuple, list[LinearUnit]] = defaultdict(list)
    for u in units:
        f = fmts[u.name]
        if u.role == "routed_expert":
            experts[u.block].append(u)
        else:
            for kinds in FUSED_KINDS:
                if u.kind in kinds:
                    fused[(u.name.rsplit(".", 1)[0], kinds)].append(u)
        if f is not None and f.group_size > 0 and u.in_features % f.group_size:
            out.append(Problem(u.name, f"in_features {u.in_features} is not a multiple of group size {f.group_size}",
                               "use a group size that divides it, or -1 (null: per-channel)"))
    expert_formats = set()
    for _, members in sorted(experts.items()):
        formats = {fmts[u.name] for u in members}
        where = members[0].name.rsplit(".", 2)[0]  # model.layers.N.mlp.experts
        expert_formats |= formats
        if len(formats) > 1:
            out.append(Problem(where, "its routed experts mix formats (" + ", ".join(sorted(map(_fmt, formats)))
                               + ") but the fused-MoE kernel takes one per layer", _block_fix(where)))
        bad = [f for f in formats if f is not None and (f.bits not in MOE_BITS or not f.sym)]
        if bad:
            out.append(Problem(where, f"routed experts at {', '.join(sorted(map(_fmt, bad)))}: vLLM's fused-MoE "
                                      "GPTQ kernels take 4 or 8 bits symmetric",
                               "give routed experts 4 or 8 bits with `symmetric: true` (or 16)"))
    for (_, kinds), members in fused.items():
        formats = {fmts[u.name] for u in members}
        if len(formats) > 1:
            out.append(Problem(", ".join(u.name for u in members), f"vLLM fuses {'/'.join(kinds)} into one linear, "
                               "which takes one format", "give them one format in the plan"))
    quantized = {f for f in fmts.values() if f is not None}
    marlin = all(f.bits in MOE_BITS and f.sym and f.group_size in MARLIN_GROUPS for f in quantized)
    expert_q = {f for f in expert_formats if f is not None}
    if not marlin and (len(expert_q) > 1 or None in expert_formats and expert_q):
        out.append(Problem("routed experts", "with modules outside Marlin's 4/8-bit symmetric g-1/32/64/128, vLLM "
                           "needs `--quantization gptq`, whose fused-MoE path reads every block's experts in the "
                           "base format", "give all routed experts one format, or every module 4/8 bits symmetric"))
    return out


def problems(units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec], target: str) -> list[Problem]:
    """What keeps ``target`` from loading the export of ``specs`` (empty: it can)."""
    if target not in ENGINES:
        raise ValueError(f"check `--target`: {target!r} is not one of {', '.join(ENGINES)}")
    fmts = {u.name: GPTQFormat.of(specs[u.name], u.in_features) for u in units}
    out = _common(units, fmts)
    if target == "transformers" and any(u.role == "routed_expert" for u in units):
        out.append(Problem("routed experts", "transformers' GPTQ integration (optimum + GPTQModel) replaces nn.Linear "
                           "modules only: it leaves transformers 5's fused 3D experts unquantized and ignores "
                           "`dynamic`", "load the export with GPTQModel (`--target gptqmodel`) or quantmoe.load"))
    if target in ("gptqmodel", "transformers"):
        return out + _torch_kernel(units, fmts)
    return out + _vllm(units, fmts)


def servable(units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec]) -> dict[str, list[Problem]]:
    """Per engine, the problems (an empty list: the engine can serve the plan)."""
    return {engine: problems(units, specs, engine) for engine in ENGINES}


def check(units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec], target: str) -> None:
    """Raise ``ServingError`` naming every offending module and the fix."""
    found = problems(units, specs, target)
    if found:
        lines = "\n  ".join(str(p) for p in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise ServingError(f"{target} cannot serve this plan:\n  {lines}{more}")


def expert_base(units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec]) -> GPTQFormat | None:
    """The routed experts' one format when vLLM's gptq method must read them as the base, else None."""
    fmts = {u.name: GPTQFormat.of(specs[u.name], u.in_features) for u in units}
    quantized = {f for f in fmts.values() if f is not None}
    if all(f.bits in MOE_BITS and f.sym and f.group_size in MARLIN_GROUPS for f in quantized):
        return None
    experts = {fmts[u.name] for u in units if u.role == "routed_expert"}
    return next(iter(experts)) if len(experts) == 1 and None not in experts else None


def format_servable(units: Sequence[LinearUnit], specs: Mapping[str, QuantSpec]) -> str:
    """One line per engine: whether it can serve the plan's GPTQ export, else the first reason."""
    lines = ["serving (GPTQ export, `quantmoe export --target ENGINE`):"]
    for engine, found in servable(units, specs).items():
        if not found:
            lines.append(f"  {engine:<12} yes")
        else:
            more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
            lines.append(f"  {engine:<12} no: {found[0].where}: {found[0].reason}{more}")
    return "\n".join(lines)
