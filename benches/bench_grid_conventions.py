"""Where quantmoe's grid differs from GPTQ's reference ``find_params``, and how often that happens.

Two conventions differ from the reference (and from GPTQModel and llm-compressor, which follow it):

(a) A symmetric group with no negative weight: quantmoe spans ``[-max, max]`` (scale
    ``2 max / maxq``, the compressed-tensors convention); the reference keeps ``min = 0`` and
    gets half that scale with the zero point still in the middle, so the upper half of its
    range clips. ``clip="mse"``/``"hmse"`` search shrinks down to 0.2 of the range, and shrink
    0.5 is exactly the reference's grid, so with clipping the better of the two is taken per
    group.
(b) Dead inputs (``H[i, i] = 0``): quantmoe zeroes those columns before computing the grid
    (static groups and per-channel), the reference after: the reference's range also covers
    weights that no calibration input reaches.

This bench counts, on the embedded models, the groups that (a) applies to (per group size)
and the dead input columns GPTQ sees with the demo's calibration (b), then measures (a)'s
RTN error on synthetic groups with no negative weight, per width, for quantmoe's grid, the
reference's and quantmoe's with ``clip="mse"``:

    .venv/bin/python benches/bench_grid_conventions.py --calib-windows 32
"""

from __future__ import annotations

import argparse
import sys

import torch

from quantmoe import api
from quantmoe.anatomy import describe
from quantmoe.anatomy.expert_view import unfuse_experts
from quantmoe.calib.data import CalibrationConfig
from quantmoe.models import load_model
from quantmoe.quant import gptq as gptq_module
from quantmoe.quant.grid import QuantSpec, dequantize, expand_groups, quantize, round_scale, rtn
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan


def one_signed_groups(model_name: str, group_sizes: list[int | None]) -> list[tuple[str, int, int]]:
    """Per group size: (label, groups, groups with no negative or no positive weight)."""
    model, _ = load_model(model_name)
    unfuse_experts(model)
    modules = dict(model.named_modules())
    out = []
    for g in group_sizes:
        total = one_signed = 0
        for unit in describe(model).units:
            W = modules[unit.name].weight.detach().float()
            size = g or W.shape[1]
            if W.shape[1] % size:
                continue
            Wg = W.reshape(W.shape[0], -1, size)
            total += Wg.shape[0] * Wg.shape[1]
            one_signed += int(((Wg.amin(-1) >= 0) | (Wg.amax(-1) <= 0)).sum())
        out.append((f"g{g}" if g else "per-channel", total, one_signed))
    return out


def dead_inputs(model_name: str, calib_windows: int) -> dict[str, int]:
    """Input columns with H[i, i] = 0 over every GPTQ call of a uniform 4-bit run."""
    seen = {"matrices": 0, "columns": 0, "dead": 0}
    original = gptq_module._gptq

    def counting(W, H, *args, **kwargs):
        diag = H.diagonal(dim1=-2, dim2=-1)
        empty = (diag == 0).all(dim=-1)  # no calibration token at all: RTN, not a dead input
        seen["matrices"] += W.shape[0]
        seen["columns"] += diag.numel()
        seen["dead"] += int(((diag == 0) & ~empty[:, None]).sum())
        return original(W, H, *args, **kwargs)

    model, tok = load_model(model_name)
    gptq_module._gptq = counting
    try:
        api.quantize(model, tok, Plan.uniform(4), CalibrationConfig(num_windows=calib_windows), GPTQConfig(),
                     progress=False)
    finally:
        gptq_module._gptq = original
    return seen


def reference_sym_rtn(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """GPTQ's reference symmetric grid: ``min`` stays 0 in a group with no negative weight."""
    size = spec.group_size or W.shape[1]
    Wg = W.reshape(W.shape[0], -1, size)
    xmin, xmax = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    xmax = torch.maximum(xmin.abs(), xmax)
    xmin = torch.where(xmin < 0, -xmax, xmin)
    scale = round_scale((xmax - xmin) / spec.maxq)
    zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    S, Z = expand_groups(scale, size, W.shape[1]), expand_groups(zero, size, W.shape[1])
    return dequantize(quantize(W, S, Z, spec.maxq), S, Z)


def synthetic(widths: list[int], group_size: int, seed: int = 0) -> list[tuple[int, float, float, float]]:
    """(bits, error ours / reference / ours with clip=mse) on groups with no negative weight."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(256, 4 * group_size, generator=g).abs()  # every group one-signed
    rows = []
    for bits in widths:
        spec = QuantSpec(bits, group_size)
        err = [float((w - W).square().sum()) for w in
               (rtn(W, spec), reference_sym_rtn(W, spec), rtn(W, QuantSpec(bits, group_size, clip="mse")))]
        rows.append((bits, *err))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-s", "deepseek-s"])
    ap.add_argument("--calib-windows", type=int, default=32)
    args = ap.parse_args()
    print("command:", " ".join(sys.argv), flush=True)
    print("(a) groups with no negative (or no positive) weight, where the symmetric conventions differ:")
    for name in args.models:
        for label, total, one_signed in one_signed_groups(name, [32, 64, 128, None]):
            print(f"  {name:<11} {label:<12} {one_signed:>6} of {total:>7} groups")
    print(f"(b) dead input columns (H[i, i] = 0) in GPTQ, uniform 4-bit, {args.calib_windows} calibration windows:")
    for name in args.models:
        seen = dead_inputs(name, args.calib_windows)
        print(f"  {name:<11} {seen['dead']} of {seen['columns']} columns over {seen['matrices']} matrices")
    print("(a) on synthetic groups with no negative weight (|N(0,1)|, g128): squared RTN error")
    print(f"  {'bits':>4} {'quantmoe':>10} {'reference':>10} {'clip=mse':>10} {'ours/ref':>9} {'mse/ref':>8}")
    for bits, ours, ref, mse in synthetic([2, 3, 4, 8], 128):
        print(f"  {bits:>4} {ours:>10.2f} {ref:>10.2f} {mse:>10.2f} {ours / ref:>9.3f} {mse / ref:>8.3f}")


if __name__ == "__main__":
    main()
