"""Bit allocation: policies (rules composed in order), scorers, the block-importance predictor,
the paper's presets, and the ``quantmoe plan`` command. See `quantmoe.alloc.policies`."""

from quantmoe.alloc.plan_from_bits import plan_from_bits
from quantmoe.alloc.policies import RULES, Rule, assign_bits, build_plan, get_rule, policy_needs
from quantmoe.alloc.presets import PAPER_MODELS, PRESETS, Preset, format_policy, paper_config, parse_policy
from quantmoe.alloc.scorers import Evidence, ExpertScores

__all__ = [
    "PAPER_MODELS",
    "PRESETS",
    "RULES",
    "Evidence",
    "ExpertScores",
    "Preset",
    "Rule",
    "assign_bits",
    "build_plan",
    "format_policy",
    "get_rule",
    "paper_config",
    "parse_policy",
    "plan_from_bits",
    "policy_needs",
]
