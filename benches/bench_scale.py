"""Streaming quantization of a random-weight MoE with real proportions: time, peak RSS, floor.

Writes a Qwen3-MoE checkpoint with random bf16 weights to local disk (per-expert keys, one
safetensors shard per block and an index, as hub snapshots are laid out; kept between runs),
then, each in its own subprocess so that peak RSS is the process's own:

- baseline: the interpreter with torch, transformers and quantmoe imported and the model's
  skeleton built on the meta device (no weights);
- stream: ``quantmoe quantize --stream`` with a mixed plan (attention 4 bits, routed gate/up
  3 bits, down 2 bits), the checkpoint's own dtype;
- whole load: the in-memory path, ``load_model`` of the whole model in float32 (loading only;
  add ``--whole-quantize`` to also quantize it in memory, ``--skip-whole`` to skip it).

Prints wall time and peak RSS of each, the floor (largest block + calibration activations,
from the shapes), the ratio peak / floor, and per block: peak RSS, the time to spill the hidden
states (what a resume reads) and the time of the block's final pass (what rebuilding them by
re-running finished blocks would cost at least, per block). Run:

    .venv/bin/python benches/bench_scale.py                                  # ~4.9 GB bf16 (issue size)
    .venv/bin/python benches/bench_scale.py --hidden 512 --layers 4 --experts 32 --moe-intermediate 256
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
PLAN = """default: {bits: 4, group_size: 128, symmetric: true}
roles:
  routed_expert: {bits: 3}
kinds:
  down_proj: {bits: 2}
"""


def qwen3_moe_config(args: argparse.Namespace):
    from transformers import AutoConfig

    heads = args.hidden // 64
    return AutoConfig.for_model(
        "qwen3_moe", vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 8), head_dim=128,
        intermediate_size=4 * args.hidden, moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
        num_experts_per_tok=8, decoder_sparse_step=1, norm_topk_prob=True, max_position_embeddings=4096,
        tie_word_embeddings=False, dtype="bfloat16")


def block_tensors(config, i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Block ``i``'s tensors as Qwen3-MoE hub checkpoints name them (per-expert keys), random bf16."""
    h, d, q = config.hidden_size, config.head_dim, config.num_attention_heads * config.head_dim
    kv, inter = config.num_key_value_heads * config.head_dim, config.moe_intermediate_size
    p = f"model.layers.{i}."
    shapes = {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
              p + "mlp.gate.weight": (config.num_experts, h)}
    for e in range(config.num_experts):
        shapes |= {p + f"mlp.experts.{e}.gate_proj.weight": (inter, h), p + f"mlp.experts.{e}.up_proj.weight": (inter, h),
                   p + f"mlp.experts.{e}.down_proj.weight": (h, inter)}
    out = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[p + f"{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    for norm in ("q_norm", "k_norm"):
        out[p + f"self_attn.{norm}.weight"] = torch.ones(d, dtype=torch.bfloat16)
    return out


def generate(folder: Path, args: argparse.Namespace) -> int:
    """Write the model (if this size is not there yet); its size in bytes."""
    config = qwen3_moe_config(args)
    marker = folder / "bench_scale.json"
    key = {k: getattr(args, k) for k in ("hidden", "layers", "experts", "moe_intermediate")}
    if not (marker.exists() and json.loads(marker.read_text()) == key):
        shutil.rmtree(folder, ignore_errors=True) if marker.exists() else None
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        n = config.num_hidden_layers + 1
        weight_map: dict[str, str] = {}
        total = 0
        for s in range(n):
            name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            if s < config.num_hidden_layers:
                tensors = block_tensors(config, s, gen)
            else:
                h, v = config.hidden_size, config.vocab_size
                tensors = {"model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).bfloat16(),
                           "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).bfloat16(),
                           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, name)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            print(f"  wrote {name}", file=sys.stderr, flush=True)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        config.save_pretrained(folder)
        for f in (ROOT / "embedded" / "tokenizer").iterdir():
            shutil.copyfile(f, folder / f.name)
        marker.write_text(json.dumps(key))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) of the command's own process, its stdout.

    Linux carries a process's peak RSS over fork and exec, so a command started straight from
    this process (which held the generated weights) would report at least this process's RSS:
    it is started from the small ``_peak_rss.py`` launcher instead, as bench_peers.py does.
    """
    with tempfile.TemporaryDirectory() as tmp:
        measured = Path(tmp) / "rss.json"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "benches" / "_peak_rss.py"), str(measured), *cmd], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        return wall, json.loads(measured.read_text())["peak_rss_mb"], proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--expert-chunk", type=int, default=0, help="experts per batched GPTQ call (0 = all)")
    ap.add_argument("--dir", type=Path, default=ROOT / ".cache" / "bench" / "scale")
    ap.add_argument("--quantize-args", default="", help="more options for the streamed `quantmoe quantize`, "
                                                        "e.g. '--expert-stats-mb 64 --expert-cache-mb 0'")
    ap.add_argument("--skip-whole", action="store_true", help="do not time the whole-model load")
    ap.add_argument("--whole-quantize", action="store_true", help="also quantize the whole model in memory")
    args = ap.parse_args()
    model_dir = args.dir / f"qwen3moe-h{args.hidden}-l{args.layers}-e{args.experts}-i{args.moe_intermediate}"
    t0 = time.perf_counter()
    size = generate(model_dir, args)
    print(f"model: {model_dir} ({size / 2**30:.2f} GiB bf16, generated/checked in {time.perf_counter() - t0:.0f} s)")

    from transformers import AutoConfig

    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.quant.cli import add_quantize_parser, gptq_config
    from quantmoe.quant.lazy import build_skeleton
    from quantmoe.quant.stream import memory_need, work_folder

    calib = CalibrationConfig(num_windows=args.calib_windows, seq_len=args.calib_len)
    quantize = argparse.ArgumentParser()  # the streamed run's own options, read as `quantmoe quantize` reads them
    add_quantize_parser(quantize.add_subparsers())
    gptq = gptq_config(quantize.parse_args(["quantize", str(model_dir), "--out", "-", *shlex.split(args.quantize_args)]))
    need = memory_need(build_skeleton(AutoConfig.from_pretrained(model_dir), torch.bfloat16), calib, torch.bfloat16,
                       gptq=gptq)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
    py = sys.executable
    skeleton = ("import sys, torch, transformers, quantmoe.quant.stream, quantmoe.cli; "
                "from quantmoe.quant.lazy import build_skeleton; "
                "build_skeleton(transformers.AutoConfig.from_pretrained(sys.argv[1]), torch.bfloat16)")
    base_s, base_rss, _ = run([py, "-c", skeleton, str(model_dir)], env)
    plan = args.dir / "plan.yaml"
    plan.write_text(PLAN)
    out = args.dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work_folder(out), ignore_errors=True)  # what an interrupted run of this bench left
    stream_s, stream_rss, stream_out = run(
        [py, "-m", "quantmoe.cli", "quantize", str(model_dir), "--plan", str(plan), "--stream", "--out", str(out),
         "--calib-windows", str(args.calib_windows), "--calib-len", str(args.calib_len),
         "--threads", str(args.threads), "--expert-chunk", str(args.expert_chunk), *shlex.split(args.quantize_args)],
        env)
    report = json.loads((out / "quant_report.json").read_text())
    out_size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    load_code = ("import sys, torch; from quantmoe.models import load_model; "
                 "load_model(sys.argv[1], dtype=torch.float32)")
    rows = [("baseline (imports, meta skeleton)", base_s, base_rss), ("stream quantize", stream_s, stream_rss)]
    if not args.skip_whole:
        load_s, load_rss, _ = run([py, "-c", load_code, str(model_dir)], env)
        rows.append(("whole-model load, float32", load_s, load_rss))
    if args.whole_quantize:
        q_s, q_rss, _ = run([py, "-m", "quantmoe.cli", "quantize", str(model_dir), "--plan", str(plan), "--dtype",
                             "float32", "--out", str(args.dir / "out-whole"), "--calib-windows",
                             str(args.calib_windows), "--calib-len", str(args.calib_len), "--threads",
                             str(args.threads)], env)
        rows.append(("whole-model quantize, float32", q_s, q_rss))
    mb = 2**20
    print(stream_out.strip())
    print(f"calibration {args.calib_windows} x {args.calib_len}, threads {args.threads}, expert chunk "
          f"{args.expert_chunk or 'all'}{', ' + args.quantize_args if args.quantize_args else ''}; "
          f"checkpoint {out_size / mb:.0f} MB")
    print(f"floor = largest block {need.block / mb:.0f} MB + calibration activations {need.activations / mb:.0f} MB "
          f"= {need.floor / mb:.0f} MB (--max-memory's estimate with Hessians, GPTQ work and replayed outputs: "
          f"{need.total / mb:.0f} MB)")
    print(f"{'run':40s} {'wall s':>8s} {'peak RSS MB':>12s} {'peak/floor':>11s} {'(peak-base)/floor':>18s} "
          f"{'peak/model':>11s}")
    for name, s, rss in rows:
        print(f"{name:40s} {s:8.1f} {rss:12.0f} {rss * mb / need.floor:11.2f} "
              f"{(rss - base_rss) * mb / need.floor:18.2f} {rss * mb / size:11.2f}")
    spill, final = sum(report["spill_seconds"]), report["final_pass_seconds"]
    print(f"per block: peak RSS {min(report['peak_rss_mb']):.0f}-{max(report['peak_rss_mb']):.0f} MB, "
          f"{sum(report['block_seconds']) / len(final):.1f} s; spilling the hidden states took {spill:.2f} s in all "
          f"({spill / len(final):.3f} s per block); rebuilding them by re-running the finished blocks would take "
          f"at least their final passes, {sum(final) / len(final):.2f} s per block ({sum(final):.1f} s after the "
          f"last block)")


if __name__ == "__main__":
    main()
