"""How the embedded models react to quantization: the realism table of the model cards.

Uniform RTN on every quantizable linear at 2/3/4/8 bits (symmetric and asymmetric,
group 128 and per-channel), and 2-bit on attention alone vs experts alone. Perplexity
and per-token KL divergence to the full-precision model on the test split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quantmoe.atomic import atomic_write_text
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.quant.fake import by_roles, rtn_model
from quantmoe.quant.grid import QuantSpec

log = logging.getLogger(__name__)

QUANTIZABLE = ("attention", "routed_expert", "shared_expert", "dense_mlp")
EXPERTS = ("routed_expert", "shared_expert")
ATTENTION = ("attention", "dense_mlp")  # the paper's "other block"


@dataclass(frozen=True)
class RealismRow:
    scope: str  # which linears were quantized
    bits: int
    group_size: int | None
    symmetric: bool
    ppl: float
    ppl_increase_pct: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float


@dataclass(frozen=True)
class Targets:
    """The realism targets of the embedded models."""

    min_2bit_ppl_increase_pct: float = 25.0
    max_4bit_ppl_increase_pct: float = 2.0
    min_kl_ratio: float = 3.0


def realism_rows(model: torch.nn.Module, test_ids, seq_len: int = 256, batch_size: int = 8) -> tuple[float, list[RealismRow]]:
    windows = make_windows(test_ids, seq_len)
    ref = reference_logprobs(model, windows, batch_size)
    base = evaluate(model, windows, ref, batch_size)
    configs = [("all", QUANTIZABLE, b, g, s) for b in (2, 3, 4, 8) for s in (False, True) for g in (128, None)]
    configs += [(scope, roles, 2, None, s) for s in (False, True)
                for scope, roles in (("attention only", ATTENTION), ("experts only", EXPERTS))]
    rows = []
    for scope, roles, bits, group, sym in tqdm(configs, desc="realism"):
        spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
        res = evaluate(rtn_model(model, by_roles(roles, spec)), windows, ref, batch_size)
        rows.append(RealismRow(scope, bits, group, sym, res.ppl, 100 * (res.ppl / base.ppl - 1),
                               res.kl_mean, res.kl_p99, res.top1_agreement))
    return base.ppl, rows


def check_targets(rows: list[RealismRow], targets: Targets = Targets()) -> list[tuple[str, bool]]:
    """Each realism target as (description with the measured values, met?)."""
    uniform = {(r.bits, r.group_size, r.symmetric): r for r in rows if r.scope == "all"}
    checks = []
    for sym in (False, True):
        kind = "symmetric" if sym else "asymmetric"
        r2 = uniform[(2, None, sym)]
        checks.append((f"2-bit per-channel {kind}: ppl +{r2.ppl_increase_pct:.1f}% "
                       f">= +{targets.min_2bit_ppl_increase_pct:.0f}%",
                       r2.ppl_increase_pct >= targets.min_2bit_ppl_increase_pct))
        for group in (128, None):
            gname = "per-channel" if group is None else f"g{group}"
            r4 = uniform[(4, group, sym)]
            checks.append((f"4-bit {gname} {kind}: ppl +{r4.ppl_increase_pct:.2f}% "
                           f"<= +{targets.max_4bit_ppl_increase_pct:.0f}%",
                           r4.ppl_increase_pct <= targets.max_4bit_ppl_increase_pct))
            ratios = [uniform[(lo, group, sym)].kl_mean / max(uniform[(hi, group, sym)].kl_mean, 1e-12)
                      for lo, hi in ((2, 3), (3, 4), (4, 8))]
            checks.append((f"KL ratio per width step {gname} {kind}: "
                           + ", ".join(f"{x:.1f}x" for x in ratios) + f" (each >= {targets.min_kl_ratio:.0f}x)",
                           all(x >= targets.min_kl_ratio for x in ratios)))
    return checks


def realism_markdown(base_ppl: float, rows: list[RealismRow]) -> str:
    lines = [f"Full precision test perplexity (every 256-token window of the test split): **{base_ppl:.2f}**", "",
             "| quantized | bits | group | grid | ppl | ppl change | KL mean | KL p99 | top-1 agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.scope} | {r.bits} | {'per-channel' if r.group_size is None else r.group_size} | "
                     f"{'sym' if r.symmetric else 'asym'} | {r.ppl:.2f} | {r.ppl_increase_pct:+.1f}% | "
                     f"{r.kl_mean:.4f} | {r.kl_p99:.3f} | {100 * r.top1_agreement:.1f}% |")
    lines += ["", "Targets:", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in check_targets(rows)]
    return "\n".join(lines)


def run_realism(model, tokenizer, test_ids, out_dir: Path) -> str:
    base_ppl, rows = realism_rows(model, test_ids)
    atomic_write_text(out_dir / "realism.json", json.dumps(
        {"base_ppl": base_ppl, "rows": [asdict(r) for r in rows],
         "targets": [{"check": t, "met": ok} for t, ok in check_targets(rows)]}, indent=1))
    return realism_markdown(base_ppl, rows)
