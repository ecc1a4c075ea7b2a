"""Measured damage of quantizing each unit at each width: the budget solver's costs.

For every quantizable linear and every allowed width b, the weight is quantized with GPTQ
(or RTN) on the full-precision model's own calibration statistics, giving the weight
change D_b = Q_b - W. Two measured estimates of what that costs:

* ``fisher`` (default; looks at the model output): the second-order Taylor estimate of the
  increase of the language-model loss, 0.5 * sum(F * D_b^2), with F the empirical Fisher
  diagonal (squared gradients of the loss on the calibration windows). Summed over
  calibration tokens, so it already weighs an expert by how often it is routed.
* ``output``: the linear's own output error on the tokens it sees,
  sum_t ||D_b x_t||^2 = n/2 * tr(D_b H D_b^T), i.e. the GPTQ objective; also weighted by
  routing frequency through the token count n.
* ``kfac``: both at once, the Kronecker-factored estimate of the loss increase,
  0.5 * sum_t (g_t^T D_b x_t)^2 ~ 0.5 * sum_j G_j (D_b Hbar D_b^T)_jj, with G_j the sum over
  the unit's tokens of the squared loss gradient at output j and Hbar = H / 2 the mean x x^T.
  Unlike ``fisher`` (a diagonal over weights, blind to how GPTQ makes the errors of one row
  cancel on the calibration inputs) it sees that cancellation; unlike ``output`` it weighs
  each output by how much the loss depends on it.

All are additive over units (the usual assumption of knapsack-style allocation), which is
what lets the solver pick widths jointly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from quantmoe.alloc.menu import label, parse_choice
from quantmoe.anatomy import ModelAnatomy, per_expert_view
from quantmoe.calib.data import run_windows
from quantmoe.calib.hessian import HessianCollector
from quantmoe.hooks import removed_after
from quantmoe.quant.gptq import gptq_quantize
from quantmoe.quant.grid import QuantSpec, rtn

log = logging.getLogger(__name__)

METRICS = ("fisher", "output", "kfac")


@dataclass(frozen=True)
class DamageTable:
    """Damage per unit (rows) and choice (columns). ``widths`` are the columns' bits; ``specs``, when
    given, their full settings (a solver menu); without it the columns are the widths at the
    solver's base settings."""

    units: tuple[str, ...]
    widths: tuple[int, ...]
    damage: np.ndarray  # (units, choices), >= 0
    params: np.ndarray  # (units,)
    metric: str
    specs: tuple[QuantSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.damage.shape != (len(self.units), len(self.widths)):
            raise ValueError("damage table shape does not match units x widths")
        if self.specs and tuple(s.bits for s in self.specs) != tuple(self.widths):
            raise ValueError("damage table specs do not match its widths")

    def row(self, name: str) -> np.ndarray:
        return self.damage[self.units.index(name)]

    def columns(self, base: QuantSpec) -> tuple[QuantSpec, ...]:
        """The full settings of every column (``specs``, or the widths at ``base``'s other settings)."""
        return self.specs or tuple(replace(base, bits=w) for w in self.widths)


@contextmanager
def _gradients_of(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Only ``params`` require gradients inside; every parameter's flag and no gradient left after."""
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
        model.zero_grad(set_to_none=True)


def _fisher(model: nn.Module, names: Sequence[str], windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal (sum of squared loss gradients) of each named linear's weight."""
    params = {n: model.get_submodule(n).weight for n in names}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    with _gradients_of(model, params.values()):
        for i in tqdm(range(0, len(windows), batch_size), desc="fisher", leave=False):
            batch = windows[i:i + batch_size].to(device)
            for row in batch:  # per-sequence gradients: the Fisher is a sum of per-sample outer products
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=row[None], labels=row[None]).loss * (row.numel() - 1)
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:  # None: an expert this sequence did not reach
                        fisher[n] += p.grad.float() ** 2
    return fisher


def _output_fisher(model: nn.Module, names: Sequence[str], windows: torch.Tensor,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """Per named linear, the sum over the tokens it processes of the squared loss gradient at each
    output (out,): the output-side factor of ``kfac``. The loss is the summed next-token NLL."""
    modules = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros(m.weight.shape[0], dtype=torch.float32, device=m.weight.device)
           for n, m in modules.items()}
    device = next(model.parameters()).device
    # the weights require gradients only so that the graph reaches every linear's output
    with _gradients_of(model, [m.weight for m in modules.values()]), removed_after() as handles:
        for n, m in modules.items():
            def add(g: torch.Tensor, n: str = n) -> None:
                acc[n] += g.detach().float().reshape(-1, g.shape[-1]).pow(2).sum(0)

            def hook(module, args, out, add=add):  # the gradient at this call's output, when backward reaches it
                if out.requires_grad:
                    out.register_hook(add)

            handles.append(m.register_forward_hook(hook))
        for i in tqdm(range(0, len(windows), batch_size), desc="output fisher", leave=False):
            batch = windows[i:i + batch_size].to(device)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=batch, labels=batch).loss * (batch.shape[0] * (batch.shape[1] - 1))
            loss.backward()
    return acc


@torch.no_grad()
def _hessians(model: nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor, batch_size: int,
              mode: str) -> tuple[HessianCollector, ...]:
    from quantmoe.calib.hessian import ExpertsHookTarget
    from quantmoe.quant.stages import STAGES, input_key, stage_of

    collectors = []
    # one collector per stage so that shared-input keys stay unambiguous
    for stage in range(len(STAGES)):
        units = [u for u in anatomy.units if stage_of(u) == stage]
        if not units:
            continue
        experts = [ExpertsHookTarget(b.experts_module, b.num_experts) for b in anatomy.blocks if b.is_moe]
        collector = HessianCollector(model, units, input_key, experts, mode)
        experts_of = {u.name: anatomy.blocks[u.block].experts_module if u.expert is not None else None for u in units}
        with collector.attached(experts_of):
            run_windows(model, windows, batch_size)
        collectors.append(collector)
    return tuple(collectors)


def measure_damage(model: nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor, widths: Sequence[int],
                   group_size: int | None = 128, symmetric: bool = True, metric: str = "fisher",
                   clip: str = "none",
                   quantizer: str = "gptq", damp: float = 0.01, batch_size: int = 8,
                   moe_mode: str = "routed", menu: Sequence[QuantSpec] = (), act_order: str = "none",
                   refine: int = 0) -> DamageTable:
    """Damage of every quantizable unit at every width (see the module docstring), or at every
    choice of ``menu`` (full settings per column) when given. ``act_order`` and ``refine`` are
    GPTQ's (quant/gptq.py): the damage of the quantizer that will run."""
    if metric not in METRICS:
        raise ValueError(f"check `metric`: {metric!r} is not one of {', '.join(METRICS)}")
    if quantizer not in ("gptq", "rtn"):
        raise ValueError(f"check `quantizer`: {quantizer!r} is not one of gptq, rtn")
    specs = tuple(dict.fromkeys(menu)) if menu else tuple(
        QuantSpec(bits=b, group_size=group_size, symmetric=symmetric, clip=clip) for b in sorted(set(widths)))
    widths = tuple(s.bits for s in specs)
    names = tuple(u.name for u in anatomy.units)
    table = np.zeros((len(names), len(specs)))
    with per_expert_view(model):
        model.eval()
        collectors = _hessians(model, anatomy, windows, batch_size, moe_mode)
        fisher = _fisher(model, names, windows, batch_size) if metric == "fisher" else None
        out_fisher = _output_fisher(model, names, windows, batch_size) if metric == "kfac" else None
        for i, unit in enumerate(tqdm(anatomy.units, desc="damage", leave=False)):
            collector = next(c for c in collectors if unit.name in c.key_of)
            H, tokens = collector.hessian(unit)
            W = model.get_submodule(unit.name).weight.detach().float()
            for j, spec in enumerate(specs):
                if spec.keep:
                    continue
                if quantizer == "gptq" and tokens > 0:
                    Q = gptq_quantize(W, H, spec, damp=damp, act_order=act_order, refine=refine,
                                      name=unit.name).Q.float()
                else:
                    Q = rtn(W, spec).float()
                D = Q - W  # (out, in)
                if fisher is not None:
                    table[i, j] = 0.5 * float((fisher[unit.name] * D.pow(2)).sum())
                elif out_fisher is not None:  # H is 2/n sum x x^T: Hbar = H / 2
                    per_output = ((D @ H) * D).sum(dim=1) / 2  # (D Hbar D^T)_jj
                    table[i, j] = 0.5 * float((out_fisher[unit.name] * per_output).sum())
                else:
                    table[i, j] = 0.5 * tokens * float(torch.einsum("oi,ij,oj->", D, H, D))
    params = np.array([u.numel for u in anatomy.units], dtype=np.float64)
    return DamageTable(units=names, widths=widths, damage=np.maximum(table, 0.0), params=params, metric=metric,
                       specs=specs if menu else ())


# --- cached tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DamageConfig:
    """How a damage table is measured: the text and every setting of ``measure_damage``."""

    split: str = "calibration"  # embedded split, hub corpus or text file
    windows: int = 32
    seq_len: int = 256
    seed: int = 0
    group_size: int | None = 128
    symmetric: bool = True
    clip: str = "none"
    metric: str = "fisher"
    quantizer: str = "gptq"
    damp: float = 0.01
    moe_mode: str = "routed"
    act_order: str = "none"  # GPTQ's column order (quant/gptq.py ACT_ORDERS)
    refine: int = 0  # GPTQ's refinement sweeps

    def __post_init__(self) -> None:
        from quantmoe.quant.gptq import act_order_mode

        object.__setattr__(self, "act_order", act_order_mode(self.act_order))
        if self.metric not in METRICS:
            raise ValueError(f"check `metric`: {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.windows < 1 or self.seq_len < 2:
            raise ValueError("check the damage windows: `windows` >= 1 and `seq_len` >= 2")

    def measure_settings(self) -> dict:
        """What the table depends on besides the model and the token windows (the text's name is not)."""
        return {k: v for k, v in self.identity().items()
                if k != "split" and not (k == "clip" and v == "none")}  # keys of tables measured before `clip`

    def identity(self) -> dict:
        """Every setting; GPTQ's act-order and refinement only when not at their default, so that tables
        measured before them keep their keys and cache file names."""
        later = {"act_order": "none", "refine": 0}
        return {k: v for k, v in asdict(self).items() if not (k in later and v == later[k])}


def _read_table(path: Path) -> tuple[DamageTable, str | None]:
    try:
        with np.load(path, allow_pickle=False) as d:
            specs = tuple(parse_choice(t, QuantSpec(4)) for t in d["choices"].tolist()) if "choices" in d.files else ()
            table = DamageTable(tuple(d["units"].tolist()), tuple(int(w) for w in d["widths"]), d["damage"],
                                d["params"], str(d["metric"]), specs)
            return table, str(d["key"]) if "key" in d.files else None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a damage table written by quantmoe ({err}); give another --damage-cache "
                         f"path or remove that file") from None


def load_or_measure_damage(model: nn.Module, tokenizer, anatomy: ModelAnatomy, widths: Sequence[int],
                           config: DamageConfig = DamageConfig(), cache: Path | None = None,
                           fingerprint: str | None = None, menu: Sequence[QuantSpec] = ()) -> DamageTable:
    """The damage table of ``model`` at ``widths`` (or at every choice of ``menu``): from ``cache`` (an npz file) when it was measured on the
    same weights, token windows and settings and has these widths, else measured (and saved to ``cache``).

    The cache stores a content key (weight hash, token-window hash, every setting) and is reused only when
    it matches; any difference measures again and replaces the file. ``fingerprint``: the model's weight
    hash when the caller has it (else computed).
    """
    from quantmoe.cache import array_sha256, content_key
    from quantmoe.calib.data import calibration_windows
    from quantmoe.data import calibration_tokens
    from quantmoe.models import model_fingerprint

    windows = calibration_windows(calibration_tokens(config.split, tokenizer), config.windows, config.seq_len,
                                  config.seed)
    key = content_key({"kind": "damage", "model": fingerprint or model_fingerprint(model),
                       "windows": array_sha256(windows), **config.measure_settings()})
    if cache is not None and Path(cache).exists():
        table, stored = _read_table(Path(cache))
        base = QuantSpec(4, config.group_size, config.symmetric, config.clip)
        wanted = set(menu) if menu else {replace(base, bits=w) for w in widths}
        if stored == key and wanted <= set(table.columns(base)) and table.units == tuple(u.name for u in anatomy.units):
            log.info("damage table from %s", cache)
            return table
        log.info("%s was measured %s; measuring again", cache,
                 "on other weights, text or settings" if stored != key else "for other widths or units")
    table = measure_damage(model, anatomy, windows, widths, group_size=config.group_size, symmetric=config.symmetric,
                           clip=config.clip,
                           metric=config.metric, quantizer=config.quantizer, damp=config.damp,
                           moe_mode=config.moe_mode, menu=menu, act_order=config.act_order, refine=config.refine)
    if cache is not None:
        from quantmoe.atomic import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, units=np.array(table.units), widths=np.array(table.widths), damage=table.damage,
                         params=table.params, metric=np.array(table.metric), key=np.array(key),
                         **({"choices": np.array([label(s) for s in table.specs])} if table.specs else {}))

        atomic_write(Path(cache), write)
    return table
