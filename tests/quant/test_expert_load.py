"""Reading a block's experts straight into the per-expert view (quant/expert_load.py), on every family."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.core_model_loading import MergeModulelist

from quantmoe.anatomy import FAMILIES, family_of, tiny_model, unfuse_experts
from quantmoe.anatomy.expert_view import UnfusedExperts
from quantmoe.anatomy.specs import module_at
from quantmoe.quant import expert_load
from quantmoe.quant.expert_load import plan_expert_reads, read_experts
from quantmoe.quant.lazy import CheckpointFilesError, LazyCheckpoint

SUPPORTED = sorted(t for t, spec in FAMILIES.items() if spec.view_refusal is None)


pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(tmp_path, model_type, **overrides):
    path = tmp_path / model_type
    tiny_model(model_type, **overrides).save_pretrained(path)
    return path


def _lazy(path) -> LazyCheckpoint:
    return LazyCheckpoint(path, dtype=torch.float32, attn_implementation="eager")


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_per_expert_reading_equals_the_fused_load_then_the_view(tmp_path, model_type):
    """Every family's checkpoint (as save_pretrained writes it: per-expert keys or fused tensors)
    reads into the same per-expert model, bit for bit, and every MoE block is read per expert."""
    path = _saved(tmp_path, model_type)
    fused, direct = _lazy(path), _lazy(path)
    spec = family_of(fused.model)
    blocks = fused.model.get_submodule(spec.layers)
    for lazy in (fused, direct):
        lazy.load_outside()
    for i in range(len(blocks)):
        has_experts = module_at(blocks[i], spec.experts) is not None
        reads = plan_expert_reads(direct.model, i, direct.groups.get(i, []), direct.renamed, direct.converters)
        assert (reads is not None) == has_experts, i
        fused.load_block(i)
        block = direct.load_block(i, per_expert=True)
        assert isinstance(module_at(block, spec.experts), UnfusedExperts) == has_experts
    unfuse_experts(fused.model)
    want, got = fused.model.state_dict(), direct.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    assert [p.requires_grad for p in fused.model.parameters()] == [p.requires_grad for p in direct.model.parameters()]
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # also the MoE module's own dispatch (Llama 4's top-k dispatch to the view)
        assert torch.equal(fused.model(input_ids=ids).logits, direct.model(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "dbrx"])  # per-expert keys, fused, stacked rows
def test_experts_are_read_a_group_at_a_time(tmp_path, model_type, monkeypatch):
    """No fused tensor of all experts is built: the conversion sees one group's tensors, the groups
    cover the experts in order within the byte budget, and the experts equal the fused load's
    (12 experts: expert 10 comes after 9, not after 1)."""
    overrides = {} if model_type == "dbrx" else {"num_local_experts": 12}
    path = _saved(tmp_path, model_type, **overrides)
    fused = _lazy(path)
    fused.load_block(1)
    name = f"{fused.family.layers}.1.{fused.family.experts}"
    reads = plan_expert_reads(fused.model, 1, fused.groups[1], fused.renamed, fused.converters)
    per_expert = sum(s.meta.numel() * s.meta.element_size() for s in reads.sources) // reads.num_experts
    unfuse_experts(fused.model, only=(name,))

    groups, merged = [], []
    real_group, real_merge = expert_load._read_group, MergeModulelist.convert
    monkeypatch.setattr(expert_load, "_read_group",
                        lambda m, r, f, a, b, read: groups.append((a, b)) or real_group(m, r, f, a, b, read))
    monkeypatch.setattr(MergeModulelist, "convert", lambda self, d, **kw: merged.extend(len(v) for v in d.values())
                        or real_merge(self, d, **kw))
    lazy = _lazy(path)
    experts = read_experts(lazy.model, reads, lazy.files, group_bytes=2 * per_expert)  # two experts per group
    n = reads.num_experts
    assert n >= 4 and groups == [(a, min(a + 2, n)) for a in range(0, n, 2)]
    assert all(k <= 2 for k in merged) and (bool(merged) == (model_type == "mixtral"))
    want = fused.model.get_submodule(name)
    assert len(experts) == len(want) == n
    for a, b in zip(experts, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_per_expert_block_owns_its_memory_and_no_shard_stays_mapped(tmp_path):
    from pathlib import Path

    lazy = _lazy(_saved(tmp_path, "mixtral"))
    block = lazy.load_block(0, per_expert=True)
    assert all(p.untyped_storage().resizable() for p in block.parameters())
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert not [line for line in maps.read_text().splitlines() if line.endswith(".safetensors")]


def test_an_expert_tensor_of_the_wrong_shape_names_the_parameter(tmp_path):
    path = _saved(tmp_path, "mixtral")
    tensors = load_file(path / "model.safetensors")
    key = next(k for k in tensors if k.startswith("model.layers.1.") and ".experts.3.w1." in k)
    tensors[key] = tensors[key][:-1]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    lazy = _lazy(path)
    with pytest.raises(CheckpointFilesError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj.*different models"):
        lazy.load_block(1, per_expert=True)


def test_a_fused_expert_tensor_of_the_wrong_shape_names_the_file(tmp_path):
    path = _saved(tmp_path, "gpt_oss")
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFilesError, match=rf"model\.safetensors: {key} has shape .*different models"):
        _lazy(path).load_block(0, per_expert=True)
