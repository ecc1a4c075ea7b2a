"""Which model types of the installed transformers are MoE families, and the family table.

A model type counts as a MoE family when both hold:

1. transformers maps it to a causal LM (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`): quantmoe loads
   models with `AutoModelForCausalLM`; vision towers, audio encoders and encoder-decoder
   models are out of scope;
2. its modeling file declares routed experts: a class decorated with
   `@use_experts_implementation` (transformers 5's marker for fused experts), or a top-level
   class whose name contains `Experts`, `SparseMoe`, `MoE` or `Moe` (families with their own
   expert code: DBRX, JetMoE, Llama 4, ...).

The files are read as text (nothing is imported but the package stubs), so listing every
family takes well under a second. `family_table_markdown` renders docs/families.md from
`FAMILIES` and `REFUSED`; a test checks the committed file against it and the model types
against this list, so a MoE family added by a future transformers fails that test by name.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from quantmoe.anatomy.families import FAMILIES, REFUSED
from quantmoe.anatomy.specs import FamilySpec
from quantmoe.multimodal import MULTIMODAL, text_architecture

_EXPERTS_MARKER = "@use_experts_implementation"
_MOE_CLASS = re.compile(r"^class \w*(?:Experts|SparseMoe|MoE|Moe)\w*\(", re.MULTILINE)


def _modeling_file(model_type: str) -> Path | None:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
    return Path(spec.origin) if spec is not None and spec.origin else None


@cache
def moe_model_types() -> tuple[str, ...]:
    """The MoE causal-LM model types of the installed transformers (see the module docstring), sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        path = _modeling_file(model_type)
        if path is None or not path.is_file():
            continue
        source = path.read_text(encoding="utf-8")
        if _EXPERTS_MARKER in source or _MOE_CLASS.search(source):
            found.append(model_type)
    return tuple(sorted(found))


@dataclass(frozen=True)
class FamilyRow:
    model_type: str
    status: str  # "supported", "shapes only" (inspect and plan, no quantization) or "refused"
    name: str
    roles: str
    expert_view: str


_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


def _names(kinds: tuple[str, ...]) -> str:
    return ", ".join(kinds)


def _blocks(spec: FamilySpec) -> str:
    rule = {
        "all": "every block MoE",
        "sparse_step": "MoE unless in `mlp_only_layers` or off `decoder_sparse_step`",
        "first_k_dense": f"first `{spec.moe_layers_key or 'first_k_dense_replace'}` blocks dense",
        "interval": "MoE every `moe_layer_interval` blocks from `moe_layer_start_index` to `moe_layer_end_index`",
        "listed": f"MoE blocks listed in `{spec.moe_layers_key}`",
        "typed": f"MoE where `{spec.moe_layers_key}` says sparse (or moe)",
        "counted": f"MoE where `{spec.moe_layers_key}` > 1",
    }[spec.moe_layers]
    return rule


def _roles(spec: FamilySpec) -> str:
    parts = [f"attention `{spec.attention}` ({_names(spec.attention_linears)})"]
    parts += [f"{m.label} `{m.attr}` ({_names(m.linears)})" for m in spec.mixers]
    parts.append(f"router `{spec.router}`")
    parts.append(f"routed experts `{spec.experts}`")

    def kinds(linears: tuple[str, ...]) -> str:  # named only where they are not gate_proj, up_proj, down_proj
        return f" ({_names(linears)})" if linears != _GATE_UP_DOWN else ""

    if spec.shared_expert:
        gate = f" + gate `{spec.shared_expert_gate.rpartition('.')[2]}`" if spec.shared_expert_gate else ""
        parts.append(f"shared expert `{spec.shared_expert}`{kinds(spec.shared_expert_linears)}{gate}")
    dense = f"dense MLP `{spec.mlp}`{kinds(spec.mlp_linears)}"
    if spec.sublayers:
        parts.append(f"{dense}; one sublayer per block, at `{spec.mlp}`: a token mixer, a dense MLP or the MoE "
                     f"({_blocks(spec)})")
    elif spec.dense_beside_experts:
        parts.append(f"{dense} beside the experts in every block")
    elif spec.moe_layers != "all":
        parts.append(f"{dense} ({_blocks(spec)})")
    parts += [f"quantization refused when `{key}` is set: {why}" for key, why in spec.refuse_when]
    kept = [f"`{p}`" for p in spec.full_precision] + [f"`{p}` (outside the blocks)" for p in spec.outside_full_precision]
    if kept:
        parts.append(f"kept in full precision: {', '.join(kept)}")
    if spec.residual_streams_key:
        parts.append(f"hidden states between blocks: `{spec.residual_streams_key}` residual streams (hyper-connections)")
    parts += [f"each block hands output {c.output} to the next block's "
              + (f"`{c.argument}`" if isinstance(c.argument, str) else f"argument {c.argument}") for c in spec.carries]
    return "; ".join(parts)


def _expert_view(spec: FamilySpec) -> str:
    layout = spec.expert_layout
    if layout.stacked is not None:
        return (f"{'/'.join(layout.stacked)} each (E * I, H), stacked by expert, down transposed -> 3 nn.Linear per "
                "expert, act(gate) * up")
    if not layout.has_gate:
        return "up_proj/down_proj (E, I, H) and (E, H, I), no gate -> 2 nn.Linear per expert, act(up)"
    shape = "(E, H, 2I) and (E, I, H), transposed" if layout.transposed else "(E, 2I, H) and (E, H, I)"
    order = "gate/up interleaved" if layout.interleaved else "[gate; up]"
    bias = ", with biases" if layout.has_bias else ""
    act = {"clamped_swiglu": "clamped SwiGLU", "clamped_glu": "act(clamped gate) * clamped up"}.get(
        layout.activation, "act(gate) * up")
    scaled = ("; every expert runs on every token scaled by its router score (0 where not chosen): the view "
              "dispatches each expert's routed tokens, scaled before the expert" if layout.scaled_input else "")
    return f"gate_up_proj/down_proj {shape}, {order}{bias} -> 3 nn.Linear per expert, {act}{scaled}"


def family_rows() -> list[FamilyRow]:
    """One row per MoE model type of the installed transformers and per declared family, sorted."""
    rows = []
    for model_type in sorted(set(moe_model_types()) | set(FAMILIES) | set(REFUSED) | set(MULTIMODAL)):
        spec = FAMILIES.get(model_type)
        wrapper = MULTIMODAL.get(model_type)
        if wrapper is not None:
            text = wrapper.text_model_type
            rows.append(FamilyRow(model_type, "text model", wrapper.display_name,
                                  f"its text model `{text}` (above); the towers are skipped",
                                  f"`quantize --text-only` writes a text-only {text_architecture(text)} checkpoint"))
        elif spec is not None and spec.view_refusal is not None:
            view = f"none: {spec.view_refusal}; quantization refused"
            rows.append(FamilyRow(model_type, "shapes only", spec.display_name, _roles(spec), view))
        elif spec is not None:
            rows.append(FamilyRow(model_type, "supported", spec.display_name, _roles(spec), _expert_view(spec)))
        else:
            rows.append(FamilyRow(model_type, "refused", "", REFUSED.get(model_type, ""), ""))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def family_table_markdown() -> str:
    """docs/families.md: the table of every MoE family with its status, roles and per-expert view."""
    import transformers

    rows = family_rows()
    supported = [r for r in rows if r.status == "supported"]
    shapes_only = [r for r in rows if r.status == "shapes only"]
    refused = [r for r in rows if r.status == "refused"]
    text_models = [r for r in rows if r.status == "text model"]
    lines = [
        "# MoE families",
        "",
        "<!-- generated by `quantmoe families --markdown > docs/families.md`; do not edit by hand -->",
        "",
        f"Every MoE causal-LM model type of transformers {transformers.__version__} (found as described in "
        f"`quantmoe/anatomy/catalog.py`): {len(supported)} supported, "
        + (f"{len(shapes_only)} described from shapes only (inspect and plan; quantization refused with the "
           "reason), " if shapes_only else "")
        + f"{len(text_models)} multimodal checkpoints read as their supported MoE text model, "
        + f"{len(refused)} refused with the reason.",
        "Supported means: `quantmoe inspect` assigns every parameter one role, the per-expert view "
        "reproduces the logits and packs back exactly, and a mixed-precision `quantmoe quantize` "
        "reloads with identical logits (tests/anatomy/test_families.py, one tiny model per family).",
        "Linear-attention and Mamba projections take the role `attention`; linears not listed stay "
        "in full precision (role `other`).",
        "",
        "## Supported",
        "",
        "| model_type | family | roles | per-expert view |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{r.model_type}` | {_cell(r.name)} | {_cell(r.roles)} | {_cell(r.expert_view)} |" for r in supported]
    if shapes_only:
        lines += ["", "## Shapes only (inspect, plan)", "", "| model_type | family | roles | per-expert view |",
                  "|---|---|---|---|"]
        lines += [f"| `{r.model_type}` | {_cell(r.name)} | {_cell(r.roles)} | {_cell(r.expert_view)} |"
                  for r in shapes_only]
    lines += ["", "## Multimodal checkpoints: their text model", "",
              "These checkpoints hold a vision (and audio) tower beside a supported MoE language model. "
              "`quantmoe inspect`, `plan` and `eval` work on the language model; `quantmoe quantize` needs "
              "`--text-only` and writes a text-only checkpoint of the text model class, without the towers "
              "(quantmoe/multimodal.py; tests/test_multimodal.py).", "",
              "| model_type | model | quantmoe reads | output |", "|---|---|---|---|"]
    lines += [f"| `{r.model_type}` | {_cell(r.name)} | {_cell(r.roles)} | {_cell(r.expert_view)} |" for r in text_models]
    lines += ["", "## Refused", "", "| model_type | reason |", "|---|---|"]
    lines += [f"| `{r.model_type}` | {_cell(r.roles or 'NO REASON GIVEN')} |" for r in refused]
    return "\n".join(lines) + "\n"
