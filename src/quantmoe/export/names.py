"""The model's own checkpoint names for the tensors of the per-expert view.

quantmoe works on the per-expert view (``model.layers.3.mlp.experts.5.down_proj``); an export
is read by engines that expect the names of the model's checkpoint on the hub, which are the
names transformers 5's ``save_pretrained`` writes: Mixtral's
``model.layers.3.block_sparse_moe.experts.5.w2``, Qwen/DeepSeek/OLMoE's
``model.layers.3.mlp.experts.5.down_proj``, DeepSeek's ``mlp.shared_experts.*``, Qwen2-MoE's
``mlp.shared_expert.*``. Rather than a table of our own, the names come from transformers'
own save conversion (``revert_weight_conversion``), run on small marker tensors: every tensor
is replaced by numbers that say which module it is, each fused experts tensor by a
(experts, 2 or 1, 1) tensor of markers, and the reverted state dict tells where each one went.

A family whose checkpoint keeps its experts fused (GPT-OSS: ``mlp.experts.gate_up_proj``,
interleaved and transposed; Aria: ``mlp.experts.fc1/fc2``; Granite-MoE:
``block_sparse_moe.input_linear/output_linear``; LARA, whose checkpoint also fuses the
linear-attention ``in_proj``) has no per-expert names on the hub; its quantized experts keep the
per-expert names ``mlp.experts.<e>.gate_proj/up_proj/down_proj``, the names GPTQModel writes.
The unquantized tensors go through the same save conversion as real tensors
(``quantmoe.export.writer``), so one the model holds fused and the checkpoint splits
(Kimi-Linear's q/k/v ``conv1d``) is written split. tests/anatomy/test_families.py checks every
family's export against the names and shapes ``save_pretrained`` writes.

Example:
    >>> from quantmoe.anatomy import tiny_model, unfuse_experts
    >>> names = checkpoint_names(unfuse_experts(tiny_model("mixtral")))
    >>> names["model.layers.1.mlp.experts.0.gate_proj"]
    'model.layers.1.block_sparse_moe.experts.0.w1'
"""

from __future__ import annotations

import torch
from torch import nn

from quantmoe.anatomy import describe
from quantmoe.anatomy.expert_view import DOWN, GATE_UP, UP, UnfusedExperts, unit_kinds

_WEIGHT = ".weight"


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """{per-expert-view name: checkpoint name} for every quantizable linear (module names,
    no ``.weight``) and every other state-dict key of ``model`` (a per-expert view)."""
    from transformers.core_model_loading import revert_weight_conversion

    experts = {name: m for name, m in model.named_modules() if isinstance(m, UnfusedExperts)}
    units = {u.name for u in describe(model).units}
    in_experts = tuple(f"{name}." for name in experts)
    markers: dict[str, torch.Tensor] = {}
    owner: list[str] = []  # marker value -> view name

    def mark(view_names: list[str], shape: tuple[int, ...]) -> torch.Tensor:
        start = len(owner)
        owner.extend(view_names)
        return torch.arange(start, len(owner), dtype=torch.float64).reshape(shape)

    for name, module in experts.items():  # fused (E, [gate; up], ...) and (E, ...) as transformers holds them
        count, kinds = len(module), unit_kinds(module.layout)
        reads = kinds[:-1]  # gate and up, or up alone (experts without a gate hold `up_proj`)
        markers[f"{name}.{GATE_UP if len(reads) == 2 else UP}"] = mark(
            [f"{name}.{e}.{kind}" for e in range(count) for kind in reads], (count, len(reads), 1))
        markers[f"{name}.{DOWN}"] = mark([f"{name}.{e}.{kinds[-1]}" for e in range(count)], (count, 1, 1))
    keys = [k for k in model.state_dict() if not k.startswith(in_experts)]
    for key in keys:
        module_name, _, leaf = key.rpartition(".")
        if module_name in units and leaf in ("weight", "qweight"):
            markers[module_name + _WEIGHT] = mark([module_name], (1,))
        else:
            markers[key] = mark([key], (1,))
    reverted = revert_weight_conversion(model, markers)
    names: dict[str, str] = {}
    for key, tensor in reverted.items():
        values = tensor.flatten().tolist() if isinstance(tensor, torch.Tensor) else []
        if len(values) != 1:  # a fused tensor the checkpoint keeps fused: per-expert names stay
            continue
        view_name = owner[int(values[0])]
        names[view_name] = key.removesuffix(_WEIGHT) if view_name in units else key
    for name in units:
        names.setdefault(name, name)
    for key in keys:
        names.setdefault(key, key)
    return names
