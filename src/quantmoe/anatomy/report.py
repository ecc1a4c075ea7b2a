"""Plain-text rendering of a ModelAnatomy, for the `inspect` command.

Example output (Mixtral-8x7B config, built on `meta`):

    family             mixtral (Mixtral)
    blocks             32 (32 MoE, 0 dense)
    routed experts     8 per MoE block, top-k 2
    shared experts     none
    quantizable units  896 linears

    role                        parameters            % quantizable   % total
    -------------------------------------------------------------------------
    attention*               1,342,177,280     1.34B          2.89%     2.87%
    ...
    sum of roles 46,702,792,704 = model parameters 46,702,792,704

Roles marked * are quantizable; "% quantizable" is the share of their sum.
"""

from __future__ import annotations

from quantmoe.anatomy.describe import ModelAnatomy
from quantmoe.anatomy.families import FAMILIES
from quantmoe.anatomy.specs import QUANTIZABLE_ROLES, ROLES


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _values(values: list[int]) -> str:
    distinct = sorted(set(values))
    return str(distinct[0]) if len(distinct) == 1 else "/".join(map(str, distinct))


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    for i in indices:
        if parts and i == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ", ".join(parts)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:6.2f}%" if whole else "     -"


def format_anatomy(anatomy: ModelAnatomy) -> str:
    """A printable report: structure, then a table of parameters by role that sums to the total."""
    spec = FAMILIES.get(anatomy.family)
    moe = [b for b in anatomy.blocks if b.is_moe]
    dense = [b.index for b in anatomy.blocks if not b.is_moe]
    name = f"{anatomy.family} ({spec.display_name})" if spec else anatomy.family
    lines = [
        f"family             {name}",
        f"blocks             {anatomy.num_blocks} ({len(moe)} MoE, {len(dense)} dense"
        + (f" [{_ranges(dense)}])" if dense else ")"),
    ]
    if moe:
        lines.append(
            f"routed experts     {_values([b.num_experts for b in moe])} per MoE block, "
            f"top-k {_values([b.top_k for b in moe])}"
        )
        with_shared = [b for b in moe if b.shared]
        if with_shared:
            gate = f", gated ({with_shared[0].shared_gate.rsplit('.', 1)[-1]})" if with_shared[0].shared_gate else ""
            lines.append(f"shared experts     1 shared MLP per MoE block{gate}")
        else:
            lines.append("shared experts     none")
    lines.append(f"quantizable units  {len(anatomy.units)} linears")
    lines.append("")

    quantizable, total = anatomy.quantizable_params, anatomy.total_params
    header = f"{'role':<20}{'parameters':>18}{'':>10}{'% quantizable':>15}{'% total':>10}"
    lines += [header, "-" * len(header)]
    for role in ROLES:
        count = anatomy.role_params.get(role, 0)
        share = _pct(count, quantizable) if role in QUANTIZABLE_ROLES else "      "
        mark = "*" if role in QUANTIZABLE_ROLES else " "
        lines.append(f"{role + mark:<20}{count:>18,}{_human(count):>10}{share:>15}{_pct(count, total):>10}")
    lines.append("-" * len(header))
    lines.append(
        f"{'quantizable*':<20}{quantizable:>18,}{_human(quantizable):>10}{_pct(quantizable, quantizable):>15}"
        f"{_pct(quantizable, total):>10}"
    )
    role_sum = sum(anatomy.role_params.values())
    verdict = "=" if role_sum == total else "!="
    lines.append(f"sum of roles {role_sum:,} {verdict} model parameters {total:,}")
    return "\n".join(lines)
