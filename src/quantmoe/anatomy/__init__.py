"""Model anatomy: which MoE family a model is, where its parts live, and a per-expert view.

Families are declared as data in `families.FAMILIES`; see docs/adding-a-family.md to add one.
"""

from quantmoe.anatomy.describe import (
    BlockAnatomy,
    LinearUnit,
    ModelAnatomy,
    describe,
    describe_config,
    inspect_model,
)
from quantmoe.anatomy.expert_view import (
    ExpertMLP,
    UnfusedExperts,
    fuse_experts,
    is_unfused,
    per_expert_view,
    unfuse_experts,
)
from quantmoe.anatomy.families import FAMILIES, REFUSED, family_of
from quantmoe.anatomy.report import format_anatomy
from quantmoe.anatomy.specs import (
    QUANTIZABLE_ROLES,
    ROLES,
    ExpertLayout,
    FamilySpec,
    Mixer,
    UnsupportedModelError,
)
from quantmoe.anatomy.tiny import randomize_, tiny_config, tiny_model

__all__ = [
    "FAMILIES",
    "QUANTIZABLE_ROLES",
    "REFUSED",
    "ROLES",
    "BlockAnatomy",
    "ExpertLayout",
    "ExpertMLP",
    "FamilySpec",
    "LinearUnit",
    "Mixer",
    "ModelAnatomy",
    "UnfusedExperts",
    "UnsupportedModelError",
    "describe",
    "describe_config",
    "family_of",
    "format_anatomy",
    "fuse_experts",
    "inspect_model",
    "is_unfused",
    "per_expert_view",
    "randomize_",
    "tiny_config",
    "tiny_model",
    "unfuse_experts",
]
