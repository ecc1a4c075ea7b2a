"""quantmoe vs GPTQModel 7.7.0, side by side: same model, bits, group size, damping and
calibration windows, same threads, each tool in its own subprocess.

    .venv/bin/python benches/bench_vs_gptqmodel.py                      # mixtral-s, 4 bits
    .venv/bin/python benches/bench_vs_gptqmodel.py --model deepseek-s --bits 2
    .venv/bin/python benches/bench_vs_gptqmodel.py --random-qwen3-experts 64 --quantmoe-stream --expert-cache-mb 0

The last one is the memory comparison (docs/quantization.md, "Memory"): a random Qwen3-MoE with
64 experts (hidden 256, 4 layers, expert intermediate 512, top-8; written once by bench_scale.py
under .cache/bench/scale/), quantmoe run as a user after the lowest peak would run it:
``quantize --stream --dtype float32 --expert-cache-mb 0`` (one block in memory; no down-input
cache), with the default ``--expert-batch-mb`` (batched expert GPTQ in chunks of a 64 MB working
set); --expert-batch-mb 0 is one batch over all of a block's experts, as before.

Per tool: wall time of the quantization call alone (``api.quantize`` / ``model.quantize``)
and of the whole subprocess (imports, loading, export of the dequantized weights), its peak
RSS (``wait4`` of that child, grandchildren included, started from the small ``_peak_rss.py``
launcher so that this process's own RSS is not carried into it), then, in this process, perplexity,
KL divergence to the full-precision model and top-1 agreement on the test split. Each
runner writes the dequantized weight of every linear it quantized; they are copied into a
copy of the full-precision model through quantmoe's per-expert view, so both results are
evaluated by the same code. GPTQModel runs in its own venv (gptqmodel_env.py).

GPTQ settings on both sides: symmetric, group 128, damp 0.01 (GPTQModel's default is 0.05),
no act-order (GPTQModel: desc_act=False and act_group_aware=False; its default GAR is on:
--gptqmodel-gar), RTN fallback below 16 routed tokens (GPTQModel's default: 0.5%% of the
calibration tokens), float32 weights, model in memory (GPTQModel's default offload_to_disk
is on: --gptqmodel-offload). Work files go to .cache/bench/runs/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from quantmoe.allocator import ARENAS, TOP_PAD_BYTES

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
sys.path.insert(0, str(BENCHES))

import gptqmodel_env  # noqa: E402


@dataclass(frozen=True)
class ToolRun:
    tool: str
    returncode: int
    wall_seconds: float  # whole subprocess, as seen from here
    peak_rss_mb: float  # ru_maxrss of the child (and its reaped children)
    cpu_seconds: float  # user + system time of the child (and its reaped children)
    loadavg: tuple[float, float]  # 1-minute load average before and after: other work on the machine
    log: str


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-s", help="embedded model name (mixtral-s, deepseek-s) or local folder")
    p.add_argument("--random-qwen3-experts", type=int, default=None, metavar="N",
                   help="instead of --model: a random Qwen3-MoE with N experts (bench_scale.py's writer, hidden 256, "
                        "4 layers, expert intermediate 512, top-8, bf16 on disk) under .cache/bench/scale/")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration forward batch, both tools")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each tool's process")
    p.add_argument("--eval-len", type=int, default=256, help="test window length")
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many test windows")
    p.add_argument("--tools", default="quantmoe,gptqmodel", help="comma-separated, run in this order")
    p.add_argument("--quantmoe-stream", action="store_true",
                   help="quantmoe quantizes block by block from the model's files (quantize --stream --dtype float32)")
    p.add_argument("--expert-batch-mb", type=float, default=None,
                   help="quantmoe's GPTQ working-set budget per batch of experts (default: quantmoe's own)")
    p.add_argument("--expert-cache-mb", type=float, default=None,
                   help="quantmoe's budget for the experts' down inputs kept for a block's final pass "
                        "(default: quantmoe's own)")
    p.add_argument("--gptqmodel-gar", action="store_true", help="GPTQModel's default group-aware reordering")
    p.add_argument("--gptqmodel-offload", action="store_true", help="GPTQModel's default offload_to_disk")
    p.add_argument("--gptqmodel-verify-reload", action="store_true",
                   help="also save GPTQModel's checkpoint, reload it and check the exported weights match")
    p.add_argument("--gptqmodel-fallback-default", action="store_true",
                   help="GPTQModel's default RTN fallback threshold (0.5%% of calibration tokens)")
    p.add_argument("--gptqmodel-malloc-tuned", action="store_true",
                   help="give GPTQModel's process the glibc malloc settings quantmoe applies to itself "
                        "(MALLOC_ARENA_MAX=1, MALLOC_TOP_PAD_=64 MB; quantmoe/allocator.py)")
    p.add_argument("--quantmoe-malloc-default", action="store_true",
                   help="quantmoe with glibc's default malloc settings (QUANTMOE_MALLOC=default)")
    p.add_argument("--work", default=None, help="work folder (default .cache/bench/runs/MODEL-wBITS)")
    return p.parse_args()


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # GPTQModel's model loader asks for a pool of 2 CPU workers and refuses to start with fewer
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), GPTQMODEL_CPU_WORKERS=str(max(2, threads)))
    return env


def run_tool(tool: str, cmd: list[str], log_path: Path, threads: int, env: dict[str, str] | None = None) -> ToolRun:
    """Run one runner (``env``: extra environment); wall time and peak RSS of that child alone (os.wait4)."""
    env = env or {}
    print(f"[{tool}] {shlex.join([*(f'{k}={v}' for k, v in env.items()), *cmd])}", flush=True)
    load_before = os.getloadavg()[0]
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**_child_env(threads), **env},
                                cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    run = ToolRun(tool, proc.returncode, wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime,
                  (load_before, os.getloadavg()[0]), str(log_path))
    if run.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        print(f"[{tool}] FAILED with exit code {run.returncode}; last lines of {log_path}:\n{tail}", flush=True)
    return run


def dequant_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every dequantized weight a runner wrote to ``folder`` (one dequant.safetensors, or one per block)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("dequant*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def load_into(fp_model: torch.nn.Module, folder: Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """A copy of ``fp_model`` with every linear found in ``folder``'s dequantized weights replaced; coverage."""
    from quantmoe.anatomy import describe, per_expert_view

    weights = dequant_weights(folder)
    model = copy.deepcopy(fp_model)
    units = [u.name for u in describe(model).units]
    with per_expert_view(model), torch.no_grad():
        for name in units:
            if name in weights:
                linear = model.get_submodule(name)
                if tuple(weights[name].shape) != tuple(linear.weight.shape):
                    raise ValueError(f"{folder}: {name} has shape {tuple(weights[name].shape)}, "
                                     f"the model's is {tuple(linear.weight.shape)}")
                linear.weight.copy_(weights[name])
    coverage = {"missing": [n for n in units if n not in weights],
                "extra": sorted(set(weights) - set(units))}
    return model.eval(), coverage


def max_levels(folder: Path, group_size: int) -> int:
    """Most distinct values in one (row, group) over all weights: <= 2**bits if really quantized."""
    most = 0
    for w in dequant_weights(folder).values():  # (out, in)
        out_f, in_f = w.shape
        pad = (-in_f) % group_size
        g = torch.nn.functional.pad(w, (0, pad), value=float("nan")).reshape(out_f, -1, group_size)
        s = g.sort(dim=-1).values
        distinct = ((s[..., 1:] != s[..., :-1]) & ~s[..., 1:].isnan()).sum(-1) + 1
        most = max(most, int(distinct.max()))
    return most


def same_fraction(a: Path, b: Path, prefix: str) -> float | None:
    """Fraction of equal weight entries between two tools on the linears named ``prefix``* (block 0
    attention sees identical inputs in both tools: a check that the GPTQ settings match). rtol 1e-3
    absorbs GPTQModel's float16 scales (quantmoe keeps the model's float32)."""
    wa, wb = dequant_weights(a), dequant_weights(b)
    names = [n for n in wa if n.startswith(prefix) and n in wb]
    if not names:
        return None
    equal = sum(torch.isclose(wa[n], wb[n], rtol=1e-3, atol=1e-6).sum().item() for n in names)
    return equal / sum(wa[n].numel() for n in names)


def _git_revision() -> str:
    """HEAD, and whether src/ differs from it: which quantmoe code was measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision (no git)"
    return head + (" + uncommitted changes in src/" if dirty else "")


def random_qwen3(experts: int) -> str:
    """The folder of a random Qwen3-MoE with ``experts`` experts (written once by bench_scale.py)."""
    import bench_scale

    size = argparse.Namespace(hidden=256, layers=4, experts=experts, moe_intermediate=512)
    folder = ROOT / ".cache" / "bench" / "scale" / f"qwen3moe-h256-l4-e{experts}-i512"
    bench_scale.generate(folder, size)
    return str(folder)


def main() -> int:
    args = _parse()
    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)
    print(f"quantmoe at {_git_revision()}; started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from quantmoe.calib.data import calibration_windows
    from quantmoe.data import split_tokens
    from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
    from quantmoe.models import load_model, resolve_model

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - {"quantmoe", "gptqmodel"}
    if unknown:
        raise SystemExit(f"check --tools: {', '.join(sorted(unknown))} is not quantmoe or gptqmodel")
    model_path = random_qwen3(args.random_qwen3_experts) if args.random_qwen3_experts else resolve_model(args.model)
    name = Path(model_path).name
    work = Path(args.work) if args.work else ROOT / ".cache" / "bench" / "runs" / f"{name}-w{args.bits}"
    work.mkdir(parents=True, exist_ok=True)

    gptq_python = gptqmodel_env.ensure() if "gptqmodel" in tools else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    windows = calibration_windows(split_tokens("calibration", tokenizer), args.calib_windows, args.calib_len,
                                  args.seed)
    windows_path = work / "calibration_windows.npy"
    np.save(windows_path, windows.numpy())
    print(f"model {model_path}; {args.bits} bits, group {args.group_size}, symmetric, damp {args.damp}; "
          f"calibration {args.calib_windows} x {args.calib_len} tokens (seed {args.seed}) -> {windows_path}; "
          f"{args.threads} threads per tool", flush=True)

    common = ["--model", model_path, "--windows", str(windows_path), "--bits", str(args.bits),
              "--group-size", str(args.group_size), "--damp", str(args.damp), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads)]
    runs: dict[str, ToolRun] = {}
    results: dict[str, dict] = {}
    for tool in tools:
        out = work / tool
        if tool == "quantmoe":
            cmd = [sys.executable, str(BENCHES / "_quantmoe_runner.py"), *common, "--out", str(out),
                   "--seed", str(args.seed)]
            cmd += ["--stream"] if args.quantmoe_stream else []
            cmd += ["--expert-batch-mb", str(args.expert_batch_mb)] if args.expert_batch_mb is not None else []
            cmd += ["--expert-cache-mb", str(args.expert_cache_mb)] if args.expert_cache_mb is not None else []
        else:
            cmd = [str(gptq_python), str(BENCHES / "_gptqmodel_runner.py"), *common, "--out", str(out)]
            cmd += ["--act-group-aware"] if args.gptqmodel_gar else []
            cmd += ["--offload-to-disk"] if args.gptqmodel_offload else []
            cmd += ["--fallback-tokens", "-1"] if args.gptqmodel_fallback_default else []
            cmd += ["--verify-reload"] if args.gptqmodel_verify_reload else []
        (out / "result.json").unlink(missing_ok=True)
        for old in out.glob("dequant*.safetensors"):
            old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        env = {}
        if tool == "quantmoe" and args.quantmoe_malloc_default:
            env = {"QUANTMOE_MALLOC": "default"}
        if tool == "gptqmodel" and args.gptqmodel_malloc_tuned:
            env = {"MALLOC_ARENA_MAX": str(ARENAS), "MALLOC_TOP_PAD_": str(TOP_PAD_BYTES)}
        # started from the small launcher: Linux carries this process's peak RSS into a child it starts
        measured = out / "rusage.json"
        measured.unlink(missing_ok=True)
        runs[tool] = run_tool(tool, [sys.executable, str(BENCHES / "_peak_rss.py"), str(measured), *cmd],
                              work / f"{tool}.log", args.threads, env)
        if measured.exists():  # the tool's own figures, not the launcher's
            runs[tool] = replace(runs[tool], **{k: v for k, v in json.loads(measured.read_text()).items()
                                                if k != "returncode"})
        if runs[tool].returncode == 0:
            results[tool] = json.loads((out / "result.json").read_text())

    print("evaluating on the test split ...", flush=True)
    fp_model, tokenizer = load_model(model_path)
    test = make_windows(split_tokens("test", tokenizer), args.eval_len, args.eval_windows)
    ref = reference_logprobs(fp_model, test)
    base = evaluate(fp_model, test, ref)
    evals, coverage, levels = {}, {}, {}
    for tool in results:
        qmodel, coverage[tool] = load_into(fp_model, work / tool)
        evals[tool] = evaluate(qmodel, test, ref)
        levels[tool] = max_levels(work / tool, args.group_size)
        del qmodel

    print()
    print(f"model {name}, {args.bits}-bit g{args.group_size} sym, calibration {args.calib_windows}x{args.calib_len}, "
          f"test {len(test)}x{args.eval_len} = {base.tokens} predicted tokens, {args.threads} threads")
    header = (f"| {'tool':<9} | {'quantize (s)':>12} | {'process (s)':>11} | {'CPU (s)':>7} | {'peak RSS (MB)':>13} | "
              f"{'ppl':>8} | "
              f"{'KL mean':>8} | {'KL p99':>7} | {'top-1 %':>7} | {'linears':>7} | {'RTN fallbacks':>13} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    print(f"| {'fp32':<9} | {'':>12} | {'':>11} | {'':>7} | {'':>13} | {base.ppl:>8.3f} | {0:>8.5f} | {0:>7.4f} | "
          f"{100:>7.1f} | {'':>7} | {'':>13} |")
    for tool in tools:
        run = runs[tool]
        if tool not in results:
            print(f"| {tool:<9} | FAILED (exit {run.returncode}), see {run.log} |")
            continue
        r, e = results[tool], evals[tool]
        fallbacks = (len(r["fallbacks"]) if tool == "quantmoe"
                     else sum(str(m.get("loss", "")).startswith("fallback") for m in r["quant_log"].get("gptq", [])))
        print(f"| {tool:<9} | {r['quant_seconds']:>12.1f} | {run.wall_seconds:>11.1f} | {run.cpu_seconds:>7.1f} | "
              f"{run.peak_rss_mb:>13.0f} | {e.ppl:>8.3f} | {e.kl_mean:>8.5f} | {e.kl_p99:>7.4f} | {100 * e.top1_agreement:>7.1f} | "
              f"{len(r['quantized_modules']):>7} | {fallbacks:>13} |")
    if {"quantmoe", "gptqmodel"} <= set(results):
        q, g = results["quantmoe"], results["gptqmodel"]
        print(f"speed ratio GPTQModel / quantmoe: quantize step {g['quant_seconds'] / q['quant_seconds']:.2f}x, "
              f"whole process {runs['gptqmodel'].wall_seconds / runs['quantmoe'].wall_seconds:.2f}x")
        agree = same_fraction(work / "quantmoe", work / "gptqmodel", "model.layers.0.self_attn.")
        if agree is not None:
            print(f"block-0 attention weights equal in both tools (same inputs): {100 * agree:.2f}% of entries")
    print("1-min load average before/after each tool (2 cores): "
          + ", ".join(f"{t} {r.loadavg[0]:.1f}/{r.loadavg[1]:.1f}" for t, r in runs.items()))
    if "quantmoe" in results:
        r = results["quantmoe"]
        print(f"quantmoe: api.quantize {r['quant_seconds']:.1f} s = tokenizing the calibration split and drawing "
              f"the windows {r['quant_seconds'] - r['report_seconds']:.1f} s + quantize_model {r['report_seconds']:.1f} s")
    if "gptqmodel" in results:
        r = results["gptqmodel"]
        print(f"gptqmodel: settings {r['config']}; export {r['export_seconds']:.1f} s; "
              f"reload check {r['reload_check']}")
    for tool in results:
        cov = coverage[tool]
        print(f"{tool}: most distinct values in one group {levels[tool]} (<= {2 ** args.bits} expected); "
              f"not quantized: {len(cov['missing'])} {cov['missing'][:8]}{' ...' if len(cov['missing']) > 8 else ''}; "
              f"unknown names: {cov['extra'][:8]}; model load {results[tool]['load_seconds']:.1f} s; "
              f"model dtype {results[tool]['dtype']}")
    summary = {"args": vars(args), "fp": asdict(base), "runs": {t: asdict(r) for t, r in runs.items()},
               "eval": {t: asdict(e) for t, e in evals.items()}, "coverage": coverage, "max_levels": levels,
               "results": {t: {k: v for k, v in r.items() if k not in ("quant_log", "quantized_modules")}
                           for t, r in results.items()}}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"details: {work / 'summary.json'}")
    return 0 if all(r.returncode == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
