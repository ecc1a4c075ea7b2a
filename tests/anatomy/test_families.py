"""Every family of the table, end to end on its tiny model: roles, per-expert view, quantize + reload, policies.

One parametrized test per property, over `FAMILIES` (not a copy per family); the catalog tests
check the table against the installed transformers and docs/families.md.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace
from pathlib import Path
from re import search as re_search

import numpy as np
import pytest
import torch
from torch import nn

import quantmoe
from quantmoe.alloc.policies import assign_bits
from quantmoe.alloc.presets import parse_policy
from quantmoe.alloc.scorers import Evidence
from quantmoe.anatomy import (
    FAMILIES,
    QUANTIZABLE_ROLES,
    REFUSED,
    UnsupportedModelError,
    describe,
    family_of,
    format_anatomy,
    fuse_experts,
    tiny_config,
    tiny_model,
    unfuse_experts,
)
from quantmoe.anatomy.catalog import family_table_markdown, moe_model_types
from quantmoe.anatomy.expert_view import unit_kinds
from quantmoe.anatomy.specs import is_norm, module_at
from quantmoe.calib.data import CalibrationConfig
from quantmoe.calib.routing import collect_routing
from quantmoe.multimodal import MULTIMODAL
from quantmoe.quant.checkpoint import save_quantized
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.pipeline import quantize_model

SUPPORTED = sorted(t for t, spec in FAMILIES.items() if spec.view_refusal is None)
SHAPES_ONLY = sorted(t for t, spec in FAMILIES.items() if spec.view_refusal is not None)
DOC = Path(__file__).resolve().parents[2] / "docs" / "families.md"
TOL = 1e-5
_EXPERTS_VIEW = r"\.experts\.\d+\.(gate|up|down)_proj\.(weight|bias)$"
_FUSED_3D = r"\.experts\.(gate_up_proj|down_proj)$"  # the checkpoint keeps transformers' 3D experts
_GRANITE = (_EXPERTS_VIEW, r"\.block_sparse_moe\.(input|output)_linear\.weight$")  # the hub's 3D experts
# family: (the export's names for what the hub checkpoint fuses, the checkpoint's fused names)
FUSED_IN_CHECKPOINT = {
    "aria_text": (_EXPERTS_VIEW, r"\.mlp\.experts\.fc[12]\.weight$"),
    "dbrx": (_EXPERTS_VIEW, r"\.ffn\.experts\.mlp\.(w1|v1|w2)$"),
    "gemma4_text": (_EXPERTS_VIEW, _FUSED_3D),
    "gpt_oss": (_EXPERTS_VIEW, r"\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$"),
    "granitemoe": _GRANITE,
    "granitemoe_swa": (_EXPERTS_VIEW, _FUSED_3D),
    "granitemoehybrid": _GRANITE,
    "granitemoeshared": _GRANITE,
    "llama4_text": (_EXPERTS_VIEW, _FUSED_3D),
    "lara_mini": (_EXPERTS_VIEW + r"|\.linear_attn\.in_proj_(a|b|qkv|z)\.weight$",
                  r"\.mlp\.experts\.(gate_up_proj|down_proj)$|\.linear_attn\.in_proj\.weight$"),
    "minimax_m3_vl_text": (_EXPERTS_VIEW, _FUSED_3D),
    "hy_v4": (_EXPERTS_VIEW, _FUSED_3D),
    "zaya": (_EXPERTS_VIEW, _FUSED_3D),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _pristine(model_type: str) -> nn.Module:
    return tiny_model(model_type)


def _model(model_type: str) -> nn.Module:
    return copy.deepcopy(_pristine(model_type))


def _ids(seed: int = 1, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=_ids() if ids is None else ids).logits


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("model_type", SUPPORTED + SHAPES_ONLY)
def test_inspect_roles(model_type):
    """Role totals are the parameter count; every linear is a unit or a documented full-precision part."""
    model, spec = _pristine(model_type), FAMILIES[model_type]
    anatomy = describe(model)
    total = sum(p.numel() for p in model.parameters())
    assert anatomy.total_params == total == sum(anatomy.role_params.values())
    for role in QUANTIZABLE_ROLES:
        units = anatomy.units_by_role(role)
        assert anatomy.role_params[role] == sum(u.numel + (u.out_features if u.has_bias else 0) for u in units), role
    assert format_anatomy(anatomy).splitlines()[-1] == f"sum of roles {total:,} = model parameters {total:,}"

    mixer_kinds = {spec.attention: set(spec.attention_linears)}
    for m in spec.mixers:
        mixer_kinds.setdefault(m.attr, set()).update(m.linears)
    for b in anatomy.blocks:
        assert b.is_moe == (module_at(model.get_submodule(b.module_name), spec.experts) is not None), b.index
        if spec.sublayers:  # one sublayer per block: a token mixer, a dense MLP or the MoE
            assert [bool(b.attention), bool(b.dense_mlp), b.is_moe].count(True) == 1, b.index
            assert bool(b.mixer) == bool(b.attention)
        else:
            assert b.mixer in mixer_kinds and b.attention
            assert bool(b.dense_mlp) == (not b.is_moe or spec.dense_beside_experts)
        assert {anatomy.unit(n).kind for n in b.attention} <= mixer_kinds.get(b.mixer, set())
        assert tuple(anatomy.unit(n).kind for n in b.dense_mlp) in ((), spec.mlp_linears)
        assert tuple(anatomy.unit(n).kind for n in b.shared) in ((), spec.shared_expert_linears)
        if b.is_moe:
            assert (b.num_experts, b.top_k) == (spec.num_experts(model.config), spec.top_k(model.config))
            kinds = unit_kinds(spec.expert_layout)
            assert all(tuple(anatomy.unit(n).kind for n in ex) == kinds for ex in b.experts)
            assert isinstance(model.get_submodule(b.router), nn.Module)
    if spec.moe_layers != "all":  # the tiny config exercises both kinds of block
        assert {b.is_moe for b in anatomy.blocks} == {True, False}
    if spec.shared_expert:
        assert any(b.shared for b in anatomy.blocks)
    if spec.mixers:  # some block holds a declared mixer, not the softmax attention
        assert any({anatomy.unit(n).kind for n in b.attention} == set(m.linears)
                   for b in anatomy.blocks for m in spec.mixers)

    # every other nn.Linear is a router, a shared-expert gate, the lm_head, a documented
    # full-precision part of a token mixer (Mamba x_proj/dt_proj, indexers), of the block or the
    # model (`full_precision`, `outside_full_precision`) or the small gate inside a norm (A.X-K2's
    # AXK2GatedRMSNorm), counted as the role "norm"
    if spec.view_refusal is not None:
        return
    unfused = unfuse_experts(copy.deepcopy(model))
    units = {u.name for u in anatomy.units}
    allowed = [spec.lm_head] + [b.router for b in anatomy.blocks if b.router]
    allowed += [b.shared_gate for b in anatomy.blocks if b.shared_gate]
    allowed += [f"{b.module_name}.{b.mixer}" for b in anatomy.blocks if b.mixer]
    allowed += [f"{b.module_name}.{path}" for b in anatomy.blocks for path in spec.full_precision]
    allowed += list(spec.outside_full_precision)
    allowed += [name for name, module in unfused.named_modules() if is_norm(module)]
    for name, module in unfused.named_modules():
        if isinstance(module, nn.Linear) and name not in units:
            assert _under(name, allowed), f"{name} is neither a quantizable unit nor a documented full-precision part"


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_per_expert_view_round_trip(model_type):
    model = _model(model_type)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = _logits(model)
    assert reference.abs().max() > 0.05  # random weights give non-trivial logits
    unfuse_experts(model)
    assert (_logits(model) - reference).abs().max() < TOL
    fuse_experts(model)
    restored = dict(model.named_parameters())
    assert restored.keys() == original.keys()
    assert all(torch.equal(p, original[n]) for n, p in restored.items())


def _policy(anatomy) -> str:
    """Every structure rule: roles, first/last MoE blocks, the most routed experts, shared experts
    and, by kind, their output projection (down_proj, Granite's output_linear)."""
    policy = "uniform=4,experts=3,first=1:2,last=1:4,topk=1:8"
    shared_out = {anatomy.unit(b.shared[-1]).kind for b in anatomy.blocks if b.shared}
    return policy + "".join(f",shared=8,kind={kind}:3:shared" for kind in shared_out)


def _expected_bits(anatomy, top: dict[int, int]) -> dict[str, int]:
    """`_policy` re-derived from the anatomy: the most routed expert of every MoE block 8, other
    experts of the last MoE block 4, of the first 2, the rest 3; shared experts 8 but their output
    projection 3; everything else 4."""
    moe = [b.index for b in anatomy.blocks if b.is_moe]
    bits = {}
    for u in anatomy.units:
        if u.role == "routed_expert":
            bits[u.name] = 8 if top[u.block] == u.expert else 4 if u.block == moe[-1] else 2 if u.block == moe[0] else 3
        elif u.role == "shared_expert":
            bits[u.name] = 3 if u.name == anatomy.blocks[u.block].shared[-1] else 8
        else:
            bits[u.name] = 4
    return bits


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_quantize_mixed_plan_and_reload(model_type, tmp_path):
    """Structure policies pick the right linears, and the quantized model reloads with identical logits."""
    model = _model(model_type)
    anatomy = describe(model)
    windows = _ids(seed=0, batch=8, length=32)

    # routing seen by the (unfused) experts modules themselves, as collect_routing must report it
    seen: dict[int, torch.Tensor] = {}
    unfuse_experts(model)
    hooks = [model.get_submodule(b.experts_module).register_forward_pre_hook(
        lambda m, args, i=b.index: seen.__setitem__(i, seen.get(i, 0) + torch.bincount(
            args[1].reshape(-1), minlength=m.num_experts + 1)[: m.num_experts]))
        for b in anatomy.blocks if b.is_moe]  # fmt: skip
    try:
        routing = collect_routing(model, anatomy, windows)
    finally:
        for h in hooks:
            h.remove()
    for b in (b for b in anatomy.blocks if b.is_moe):
        assert np.array_equal(routing.counts[b.index], seen[b.index].numpy()), b.index
        assert routing.counts[b.index].sum() == windows.numel() * b.top_k
    top = {b.index: int(np.argmax(routing.counts[b.index])) for b in anatomy.blocks if b.is_moe}

    bits = assign_bits(parse_policy(_policy(anatomy)), anatomy, Evidence(routing=routing))
    assert bits == _expected_bits(anatomy, top)
    specs = {name: QuantSpec(bits=b, group_size=16) for name, b in bits.items()}

    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), progress=False)
    save_quantized(model, tmp_path / "q", specs, {"family": model_type})
    loaded = quantmoe.load(tmp_path / "q", attn_implementation="eager")
    for name, b in bits.items():
        assert loaded.get_submodule(name).bits == b, name
    ids = _ids(seed=2)
    quantized = _logits(model, ids)
    assert torch.equal(quantized, _logits(loaded, ids))
    assert (quantized - _logits(_pristine(model_type), ids)).abs().max() > TOL  # the weights did change


@pytest.mark.parametrize("model_type", SHAPES_ONLY or ["mixtral"])
def test_shapes_only_families_refuse_the_per_expert_view(model_type, monkeypatch):
    """A family with a `view_refusal` is described but refuses the view; with none in the table (every
    family has a view), a supported one stands in with a refusal set."""
    if model_type not in SHAPES_ONLY:
        monkeypatch.setitem(FAMILIES, model_type, replace(FAMILIES[model_type], view_refusal="a stand-in reason"))
    model = _model(model_type)
    assert describe(model).total_params == sum(p.numel() for p in model.parameters())
    with pytest.raises(UnsupportedModelError, match="no per-expert view") as info:
        unfuse_experts(model)
    assert FAMILIES[model_type].view_refusal in str(info.value)
    assert not any(isinstance(m, nn.Linear) and ".experts." in n for n, m in model.named_modules())


@pytest.mark.parametrize("model_type", sorted(t for t, spec in FAMILIES.items() if spec.refuse_when))
def test_configs_the_driver_cannot_carry_are_refused(model_type):
    spec, model = FAMILIES[model_type], _model(model_type)
    assert spec.config_refusal(model.config) is None
    for key, why in spec.refuse_when:
        setattr(model.config, key, 1)
        with pytest.raises(UnsupportedModelError, match="cannot be quantized") as info:
            unfuse_experts(model)
        assert why in str(info.value)
        setattr(model.config, key, 0)


# --- the table against the installed transformers ------------------------------------------------


def test_every_moe_family_is_supported_or_refused_with_a_reason():
    installed = set(moe_model_types())
    unknown = sorted(installed - set(FAMILIES) - set(REFUSED) - set(MULTIMODAL))
    assert not unknown, f"MoE model types of the installed transformers without a FamilySpec or a reason: {unknown}"
    assert not set(FAMILIES) & set(REFUSED) and not set(MULTIMODAL) & (set(FAMILIES) | set(REFUSED))
    assert set(MULTIMODAL) <= installed and {m.text_model_type for m in MULTIMODAL.values()} <= set(FAMILIES)
    assert all(len(reason) > 40 for reason in REFUSED.values())
    assert set(REFUSED) <= installed  # no stale refusals
    for model_type, reason in REFUSED.items():
        with pytest.raises(UnsupportedModelError, match="refuses") as info:
            family_of(type("Config", (), {"model_type": model_type})())
        assert reason in str(info.value)


def test_catalog_finds_known_families_and_skips_dense_ones():
    installed = moe_model_types()
    assert {"mixtral", "qwen3_next", "jamba", "dbrx", "llama4_text"} <= set(installed)
    assert not {"llama", "qwen3", "mistral", "gemma2"} & set(installed)


def test_docs_families_md_is_generated():
    expected = family_table_markdown()
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/families.md is stale: run `quantmoe families --markdown > docs/families.md`")
    for model_type in moe_model_types():
        assert f"| `{model_type}` |" in expected


def test_readme_counts_the_supported_families():
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    stated = re_search(r"(\d+) MoE families of transformers", readme)
    assert stated is not None and int(stated.group(1)) == len(SUPPORTED), "update the count in README.md"


def test_tiny_config_for_every_family():
    for model_type in SUPPORTED:
        assert tiny_config(model_type).model_type == model_type


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_gptq_export_uses_the_checkpoint_names_of_save_pretrained(model_type, tmp_path):
    """Every tensor of the GPTQ export is named as transformers' ``save_pretrained`` names it for
    the family: a quantized module's ``qweight`` where the checkpoint has its ``weight``."""
    from safetensors import safe_open

    from quantmoe.export.gptq_format import storable
    from quantmoe.export.writer import export_tensors
    from quantmoe.quant.pipeline import GPTQConfig

    _pristine(model_type).save_pretrained(tmp_path / "fp")
    shapes: dict[str, list[int]] = {}
    for path in (tmp_path / "fp").glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            shapes |= {k: f.get_slice(k).get_shape() for k in f.keys()}
    saved = set(shapes)
    model = unfuse_experts(_model(model_type))
    units = describe(model).units
    specs = {u.name: QuantSpec(bits=16) if storable(u.in_features, u.out_features, 4) else QuantSpec(4, 16)
             for u in units}  # tiny shapes that 4-bit packing cannot hold stay at 16 bits
    quantize_model(model, specs, _ids(seed=0, batch=4, length=32), CalibrationConfig(min_expert_tokens=1),
                   GPTQConfig(method="rtn"), progress=False)
    tensors, _ = export_tensors(model, specs)
    gptq_leaves = (".qweight", ".qzeros", ".scales", ".g_idx")
    quantized = {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}
    assert len(quantized) == sum(not s.keep for s in specs.values()) > 0
    exported = {k for k in tensors if not k.endswith(gptq_leaves)} | {m + ".weight" for m in quantized}
    # where the hub checkpoint keeps tensors fused that the model holds apart (experts as 3D
    # tensors, LARA's linear-attention in_proj), the export keeps the per-expert view's names (the
    # names GPTQModel writes): the only differences allowed, pinned per family
    exported_only, saved_only = exported - saved, saved - exported
    view, fused = FUSED_IN_CHECKPOINT.get(model_type, ("$^", "$^"))
    assert all(re_search(view, k) for k in exported_only), sorted(exported_only)[:5]
    assert all(re_search(fused, k) for k in saved_only), sorted(saved_only)[:5]
    assert bool(exported_only) == bool(saved_only) == (model_type in FUSED_IN_CHECKPOINT)
    # unquantized tensors also in the checkpoint's shapes (Kimi-Linear's conv1d: split into q/k/v)
    assert all(list(tensors[k].shape) == shapes[k] for k in exported & saved if k in tensors)
