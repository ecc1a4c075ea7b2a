"""Peers, side by side on the same model and text: HQQ, AutoRound, GPTQModel and quantmoe.

Every tool quantizes the same embedded model in its own subprocess (each peer in its own venv,
peer_envs.py / gptqmodel_env.py) and writes back the dequantized weight of every linear it
quantized; this process copies them into a copy of the full-precision model (quantmoe's
per-expert view) and scores every result with quantmoe's evaluation on the same test windows:
mean per-token KL(full precision || quantized) and perplexity. Per tool and setting it prints
the quantize time, the wall time and peak RSS of the subprocess (``wait4``), and the effective
bits (codes + per-group scales + zero points, counted as quantmoe.quant.plan.effective_bits_of
does, with each tool's own zero-point width), then draws KL against effective bits.

What is quantized is what quantmoe's uniform plans quantize: every attention and expert linear
(routed and shared; deepseek's dense MLPs too); routers, embeddings and the LM head stay in
full precision.

* HQQ 0.2.8 (calibration-free): ``Quantizer.quantize`` per weight (axis=1, its half-quadratic
  zero optimization), float16 scale and float16 zero per group.
* AutoRound (auto-round 0.16.1): uniform W{bits}A16 g128 sym, tuned on the first
  --autoround-nsamples calibration windows for --autoround-iters steps; AutoScheme mixed bits
  (W2/W3/W4/W8 A16 g128) at target average bits (--autoscheme-targets; AutoScheme counts
  scales and zeros in its average). AutoRound unfuses transformers 5's fused experts itself
  (per-expert names, the same as quantmoe's) and leaves routers and the LM head unquantized
  (and, by its own ignore list, deepseek's kv_a_proj_with_mqa: counted at 16 bits).
* GPTQModel 7.7.0 (the runner of bench_vs_gptqmodel.py) and quantmoe: uniform GPTQ g128 sym on
  the same calibration windows (128 x 256 tokens of the calibration split, seed 0 by default);
  quantmoe also with its quantizer options (``--quantmoe-options plain hmse/desc/4``: clipping,
  act-order, refinement sweeps), exported the same way.

A tool that fails prints the end of its log and the bench goes on.

    .venv/bin/python benches/bench_peers.py --model mixtral-s --out .cache/bench/peers
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
sys.path.insert(0, str(BENCHES))

from bench_vs_gptqmodel import load_into, run_tool  # noqa: E402
from quantmoe.anatomy import LinearUnit  # noqa: E402
from quantmoe.quant.plan import SCALE_BITS  # noqa: E402

TOOLS = ("quantmoe", "gptqmodel", "hqq", "autoround", "autoscheme")
HQQ_ZERO_BITS = 16  # HQQ keeps a float zero point per group (float16 in HQQLinear)


@dataclass(frozen=True)
class PeerPoint:
    tool: str
    setting: str
    effective_bits: float
    quant_seconds: float  # the quantization call alone, as the runner timed it
    process_seconds: float  # the whole subprocess: imports, load, quantize, export
    peak_rss_mb: float
    kl: float
    ppl: float


def effective_bits(units: Iterable[LinearUnit], bits: Mapping[str, int], group_size: int | None,
                   zero_bits: int | None = None) -> float:
    """Bits per weight over ``units``: codes + per (row, group) a 16-bit scale and a zero point of
    ``zero_bits`` bits (None: the code width, as GPTQ stores it; HQQ: 16, a float16 zero).

    With ``zero_bits=None`` this is quantmoe's count (``bit_stats(...).effective_bits``).

    >>> u = LinearUnit("q", "attention", 0, None, "q_proj", 128, 128, False)
    >>> effective_bits([u], {"q": 4}, 64, zero_bits=16)  # 4 + (16 + 16) / 64
    4.5
    """
    total = eff = 0.0
    for unit in units:
        b = bits[unit.name]
        total += unit.numel
        if b >= 16:  # kept in full precision (a linear the tool did not quantize)
            eff += 16 * unit.numel
            continue
        size = group_size or unit.in_features
        groups = -(-unit.in_features // size)
        overhead = groups * unit.out_features * (SCALE_BITS + (b if zero_bits is None else zero_bits))
        eff += b * unit.numel + overhead
    if total == 0:
        raise ValueError("no quantized linear")
    return eff / total


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-s", help="embedded model name or local folder")
    p.add_argument("--tools", default="quantmoe,hqq,autoround,autoscheme",
                   help=f"comma-separated, run in this order; of {', '.join(TOOLS)}")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="widths of the uniform settings")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ / AutoRound group size")
    p.add_argument("--hqq-group-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--quantmoe-options", nargs="+", default=["plain"],
                   help="quantmoe settings to run, each plain or CLIP/ACT_ORDER/REFINE, e.g. hmse/desc/4")
    p.add_argument("--autoround-iters", type=int, default=50)
    p.add_argument("--autoround-nsamples", type=int, default=32)
    p.add_argument("--autoscheme-targets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=32, help="test windows of 256 tokens")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each tool's process")
    p.add_argument("--out", default=str(ROOT / ".cache" / "bench" / "peers"),
                   help="folder for the table, the plot and the work files")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Job:
    tool: str
    setting: str
    cmd: list[str]
    out: Path


def _jobs(args: argparse.Namespace, model_path: str, windows_path: Path, fp_weights: Path, work: Path,
          pythons: Mapping[str, Path]) -> list[Job]:
    gptq_common = ["--model", model_path, "--windows", str(windows_path), "--group-size", str(args.group_size),
                   "--damp", "0.01", "--batch-size", "8", "--threads", str(args.threads)]
    jobs = []
    for tool in args.tools:
        if tool == "hqq":
            for bits in args.bits:
                for g in args.hqq_group_sizes:
                    out = work / f"hqq-w{bits}g{g}"
                    jobs.append(Job(tool, f"w{bits} g{g}", [str(pythons[tool]), str(BENCHES / "_hqq_runner.py"),
                                    "--weights", str(fp_weights), "--out", str(out), "--bits", str(bits),
                                    "--group-size", str(g), "--threads", str(args.threads)], out))
        elif tool in ("quantmoe", "gptqmodel"):
            runner = BENCHES / f"_{tool}_runner.py"
            python = sys.executable if tool == "quantmoe" else str(pythons[tool])
            for bits, option in itertools.product(args.bits, args.quantmoe_options if tool == "quantmoe" else ["plain"]):
                suffix = "" if option == "plain" else "-" + option.replace("/", "-")
                out = work / f"{tool}-w{bits}g{args.group_size}{suffix}"
                extra = ["--seed", str(args.seed)] if tool == "quantmoe" else []
                extra += _quantmoe_flags(option)
                jobs.append(Job(tool, f"w{bits} g{args.group_size}" + (f" {option}" if suffix else ""),
                                [python, str(runner), *gptq_common, "--bits", str(bits), "--out", str(out), *extra],
                                out))
        elif tool in ("autoround", "autoscheme"):
            common = [str(pythons["autoround"]), str(BENCHES / "_autoround_runner.py"), "--model", model_path,
                      "--windows", str(windows_path), "--group-size", str(args.group_size), "--threads",
                      str(args.threads), "--iters", str(args.autoround_iters), "--nsamples",
                      str(args.autoround_nsamples)]
            if tool == "autoround":
                for bits in args.bits:
                    out = work / f"autoround-w{bits}g{args.group_size}"
                    jobs.append(Job(tool, f"w{bits} g{args.group_size}", [*common, "--bits", str(bits), "--out",
                                                                        str(out)], out))
            else:
                for target in args.autoscheme_targets:
                    out = work / f"autoscheme-{target}"
                    jobs.append(Job(tool, f"avg {target} g{args.group_size}", [*common, "--target-bits", str(target),
                                                                             "--out", str(out)], out))
    return jobs


def _quantmoe_flags(option: str) -> list[str]:
    """The runner flags of a --quantmoe-options entry: plain, or CLIP/ACT_ORDER/REFINE (hmse/desc/4)."""
    if option == "plain":
        return []
    parts = option.split("/")
    if len(parts) != 3 or parts[0] not in ("none", "mse", "hmse") or parts[1] not in ("none", "desc", "gar") \
            or not parts[2].isdigit():
        raise SystemExit(f"check --quantmoe-options: {option!r} is not plain or CLIP/ACT_ORDER/REFINE, e.g. hmse/desc/4")
    return ["--clip", parts[0], "--act-order", parts[1], "--refine", parts[2]]


def _bits_of(job: Job, result: dict, units: list[LinearUnit], missing: set[str]) -> float:
    """Effective bits of a job's result over every unit; the ones it did not quantize count as 16."""
    per_module = result.get("bits_per_module")
    if per_module:  # AutoScheme: its chosen width of every linear
        return effective_bits(units, {u.name: int(per_module.get(u.name, 16)) for u in units},
                              result["group_size"])
    bits, group = (int(t.lstrip("wg")) for t in job.setting.split()[:2])
    zero = HQQ_ZERO_BITS if job.tool == "hqq" else None
    return effective_bits(units, {u.name: 16 if u.name in missing else bits for u in units}, group, zero)


def _plot(points: list[PeerPoint], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"quantmoe": "o", "gptqmodel": "s", "hqq": "^", "autoround": "D", "autoscheme": "P"}
    for tool in dict.fromkeys(p.tool for p in points):
        pts = sorted((p for p in points if p.tool == tool), key=lambda p: p.effective_bits)
        if tool == "hqq":  # one line per group size
            for g in sorted({p.setting.split()[1] for p in pts}):
                sub = [p for p in pts if p.setting.split()[1] == g]
                ax.plot([p.effective_bits for p in sub], [p.kl for p in sub], marker=markers[tool], label=f"HQQ {g}")
            continue
        name = {"quantmoe": "quantmoe GPTQ", "gptqmodel": "GPTQModel", "autoround": "AutoRound",
                "autoscheme": "AutoRound AutoScheme"}.get(tool, tool)
        for option in dict.fromkeys(" ".join(p.setting.split()[2:]) for p in pts):  # quantmoe: one line per option
            sub = [p for p in pts if " ".join(p.setting.split()[2:]) == option]
            ax.plot([p.effective_bits for p in sub], [p.kl for p in sub], marker=markers.get(tool, "x"),
                    label=f"{name} {option}".strip())
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (codes + scales + zeros)")
    ax.set_ylabel("mean per-token KL to full precision")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    args = _parse()
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if bad := [t for t in args.tools if t not in TOOLS]:
        raise SystemExit(f"check --tools: {bad[0]!r} is not one of {', '.join(TOOLS)}")
    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    import gptqmodel_env
    import peer_envs
    from quantmoe.anatomy import describe, per_expert_view
    from quantmoe.calib.data import calibration_windows
    from quantmoe.data import split_tokens
    from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
    from quantmoe.models import load_model, resolve_model

    model_path = resolve_model(args.model)
    name = Path(model_path).name
    out = Path(args.out)
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    fp, tok = load_model(model_path)
    units = list(describe(fp).units)
    windows = calibration_windows(split_tokens("calibration", tok), args.calib_windows, args.calib_len, args.seed)
    windows_path = work / "calibration_windows.npy"
    np.save(windows_path, windows.numpy())
    fp_weights = work / "fp_weights.safetensors"
    with per_expert_view(fp), torch.no_grad():
        save_file({u.name: fp.get_submodule(u.name).weight.detach().float().contiguous() for u in units},
                  str(fp_weights))

    pythons: dict[str, Path] = {}
    for tool in args.tools:
        env = "autoround" if tool == "autoscheme" else tool
        if env in pythons or tool == "quantmoe":
            continue
        try:
            pythons[env] = gptqmodel_env.ensure() if env == "gptqmodel" else peer_envs.ensure(env)
        except Exception as err:  # noqa: BLE001 - a peer that cannot install is reported, the bench goes on
            print(f"[{tool}] venv failed: {type(err).__name__}: {err}", flush=True)
    jobs = [j for j in _jobs(args, model_path, windows_path, fp_weights, work,
                             {**pythons, "autoscheme": pythons.get("autoround")}) if j.tool == "quantmoe" or
            pythons.get("autoround" if j.tool == "autoscheme" else j.tool)]

    test = make_windows(split_tokens("test", tok), 256, args.eval_windows)
    ref = reference_logprobs(fp, test)
    base = evaluate(fp, test, ref)
    print(f"{name}: {len(units)} quantized linears; calibration {args.calib_windows} x {args.calib_len} tokens "
          f"(seed {args.seed}); KL and ppl on {len(test)} test windows of 256 tokens; full precision ppl "
          f"{base.ppl:.3f}; {args.threads} threads per tool", flush=True)

    points: list[PeerPoint] = []
    failures: list[str] = []
    for job in jobs:
        for stale in ("result.json", "error.txt"):
            (job.out / stale).unlink(missing_ok=True)
        job.out.mkdir(parents=True, exist_ok=True)
        measured = job.out / "rusage.json"
        run = run_tool(f"{job.tool} {job.setting}", [sys.executable, str(BENCHES / "_peak_rss.py"), str(measured),
                                                     *job.cmd], job.out / "run.log", args.threads)
        if measured.exists():  # the tool's own figures, not the launcher's (see _peak_rss.py)
            run = replace(run, **{k: v for k, v in json.loads(measured.read_text()).items() if k != "returncode"})
        result_path = job.out / "result.json"
        if run.returncode != 0 or not result_path.exists():
            reason = ""
            if (job.out / "error.txt").exists():
                reason = (job.out / "error.txt").read_text().strip()
            failures.append(f"{job.tool} {job.setting}: exit {run.returncode}; {reason or 'see ' + run.log}")
            continue
        result = json.loads(result_path.read_text())
        qmodel, coverage = load_into(fp, job.out / "dequant.safetensors")
        if coverage["missing"] or coverage["extra"]:
            print(f"[{job.tool} {job.setting}] not quantized: {coverage['missing'][:6]}; unknown names: "
                  f"{coverage['extra'][:6]}", flush=True)
        eff = _bits_of(job, result, units, set(coverage["missing"]))
        res = evaluate(qmodel, test, ref)
        del qmodel
        points.append(PeerPoint(job.tool, job.setting, eff, result["quant_seconds"], run.wall_seconds,
                                run.peak_rss_mb, res.kl_mean, res.ppl))
        p = points[-1]
        print(f"[{job.tool} {job.setting}] eff {p.effective_bits:.3f} bits, KL {p.kl:.4f}, ppl {p.ppl:.2f}, "
              f"quantize {p.quant_seconds:.1f} s, process {p.process_seconds:.1f} s, peak RSS {p.peak_rss_mb:.0f} MB",
              flush=True)

    lines = [f"# {name}: peers side by side", "",
             f"KL = mean per-token KL(full precision || quantized), ppl on {len(test)} test windows of 256 tokens "
             f"(full precision ppl {base.ppl:.3f}); calibration {args.calib_windows} x {args.calib_len} tokens; "
             f"{args.threads} threads per tool. AutoRound: {args.autoround_iters} iters, {args.autoround_nsamples} "
             f"calibration windows (the first of the same set).", "",
             "| tool | setting | eff. bits | KL | ppl | quantize (s) | process (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.tool} | {p.setting} | {p.effective_bits:.3f} | {p.kl:.4f} | {p.ppl:.2f} | "
                     f"{p.quant_seconds:.1f} | {p.process_seconds:.1f} | {p.peak_rss_mb:.0f} |")
    if failures:
        lines += ["", "Did not run:", *[f"- {f}" for f in failures]]
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "fp_ppl": base.ppl,
                                                  "points": [asdict(p) for p in points], "failures": failures},
                                                 indent=1))
    if points:
        _plot(points, out / f"{name}.png", f"{name}: KL vs effective bits")
        print(f"plot: {out / f'{name}.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
