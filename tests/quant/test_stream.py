import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quantmoe
from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant import expert_load
from quantmoe.quant.checkpoint import save_quantized
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.lazy import CheckpointFilesError, LazyCheckpoint, checkpoint_files
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.quant.stream import (
    PAUSE_ENV,
    ResumeError,
    memory_need,
    parse_size,
    quantize_stream,
    work_folder,
)

# the six first families; ZAYA: its blocks hand router states on (FamilySpec.carries) and its model
# scales the embeddings before block 0 (outside tensors other than the embedding); Qwen4-Exp,
# Hunyuan-V4, DeepSeek-V4: several residual streams between blocks; GLM-5: top-k indices carried
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "zaya", "qwen4_exp_text", "hy_v4",
            "deepseek_v4", "glm_moe_dsa"]
PLAN = Plan.from_dict({"default": {"bits": 4, "group_size": 16},
                       "kinds": {"down_proj": {"bits": 3, "symmetric": False}}})
CALIB = CalibrationConfig(min_expert_tokens=1, batch_size=4)


def _windows(vocab=128, n=8, t=32):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _source(tmp_path, family, shard=None, **overrides):
    """A tiny random model saved as transformers writes it (legacy per-expert keys where the family has them)."""
    path = tmp_path / f"src-{family}"
    tiny_model(family, **overrides).save_pretrained(path, max_shard_size=shard or "50GB")
    return path


def _in_memory(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager",
                                                attn_implementation="eager").eval()


def _tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_loading_gives_the_in_memory_checkpoint_with_one_block_in_memory(tmp_path, family, monkeypatch):
    src = _source(tmp_path, family, shard="40KB" if family in ("mixtral", "deepseek_v3") else None)
    model = _in_memory(src)
    specs = PLAN.resolve(describe(model))
    windows = _windows()

    # load hook: whenever a group of keys is read, no other block may hold real weights
    real_read = LazyCheckpoint._read
    seen: list[tuple[int, int]] = []

    def read(self, group, skip=frozenset()):
        blocks = self.model.get_submodule(self.family.layers)
        seen.append((group, sum(any(not p.is_meta for p in b.parameters()) for b in blocks)))
        real_read(self, group, skip)

    monkeypatch.setattr(LazyCheckpoint, "_read", read)
    per_expert: list[str] = []  # the experts are read straight into the per-expert view
    real_experts = expert_load.read_experts
    monkeypatch.setattr(expert_load, "read_experts",
                        lambda model, reads, *rest: per_expert.append(reads.name) or real_experts(model, reads, *rest))
    lazy = quantize_stream(src, tmp_path / "lazy", specs, windows, CALIB, dtype=torch.float32, progress=False,
                           attn_implementation="eager")
    assert lazy.max_loaded_blocks == 1
    n_blocks = len(describe(model).blocks)
    assert [g for g, _ in seen] == [-1] + list(range(n_blocks)) and all(n == 0 for _, n in seen)
    assert per_expert == [b.experts_module for b in describe(model).blocks if b.is_moe]

    # the same streaming writer fed by the model in memory writes the same bytes
    quantize_stream(model, tmp_path / "mem", specs, windows, CALIB, progress=False)
    shards = sorted(p.name for p in (tmp_path / "lazy").glob("model-*.safetensors"))
    assert len(shards) == n_blocks + 1
    for name in shards:
        assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes(), name

    # and the tensors of today's whole-model path, bit for bit
    whole = _in_memory(src)
    quantize_model(whole, specs, windows, CALIB, progress=False)
    save_quantized(whole, tmp_path / "whole", specs, {})
    ref, got = _tensors(tmp_path / "whole"), _tensors(tmp_path / "lazy")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    loaded = quantmoe.load(tmp_path / "lazy", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=windows).logits, whole(input_ids=windows).logits)
    assert not work_folder(tmp_path / "lazy").exists()


def test_the_heap_is_trimmed_after_each_block_before_the_next_is_read(tmp_path, monkeypatch):
    import quantmoe.quant.stream as stream

    src = _source(tmp_path, "qwen3_moe")
    events: list[object] = []
    real_read = LazyCheckpoint._read
    monkeypatch.setattr(LazyCheckpoint, "_read", lambda self, group, skip=frozenset(): events.append(group)
                        or real_read(self, group, skip))
    monkeypatch.setattr(stream, "release_free_memory", lambda: events.append("trim"))
    specs = PLAN.resolve(describe(_in_memory(src)))
    quantize_stream(src, tmp_path / "q", specs, _windows(), CALIB, dtype=torch.float32, progress=False)
    n = len(describe(_in_memory(src)).blocks)
    assert events == [-1] + [x for i in range(n) for x in (i, "trim")]


def _mapped_files() -> set[str]:
    maps = Path("/proc/self/maps")
    return {line.split()[5] for line in maps.read_text().splitlines() if len(line.split()) >= 6} if maps.exists() else set()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_a_loaded_block_owns_its_memory_and_unmaps_the_shard(tmp_path, family):
    # safetensors reads without a copy: a weight left as a view of the shard would keep it mapped (and resident)
    src = _source(tmp_path, family, tie_word_embeddings=True)
    lazy = LazyCheckpoint(src, dtype=torch.float32)
    lazy.load_outside()
    block = lazy.load_block(0)
    model = lazy.model
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    loaded = [t for t in (*model.parameters(), *model.buffers()) if not t.is_meta]
    assert len(loaded) > len(list(block.parameters())) and all(t.untyped_storage().resizable() for t in loaded)
    assert not {f for f in _mapped_files() if f.endswith(".safetensors")}
    reference = _tensors(src)
    compared = [name for name, p in block.named_parameters() if f"model.layers.0.{name}" in reference]
    assert compared and all(torch.equal(block.get_parameter(n), reference[f"model.layers.0.{n}"]) for n in compared)


def test_bfloat16_streams_in_the_checkpoint_dtype_and_matches_memory(tmp_path):
    src = _source(tmp_path, "qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))
    model = _in_memory(src, torch.bfloat16)
    specs = PLAN.resolve(describe(model))
    quantize_stream(src, tmp_path / "lazy", specs, _windows(), CALIB, progress=False, attn_implementation="eager")
    quantize_stream(model, tmp_path / "mem", specs, _windows(), CALIB, progress=False)
    lazy, mem = _tensors(tmp_path / "lazy"), _tensors(tmp_path / "mem")
    assert all(torch.equal(lazy[k], mem[k]) for k in mem)
    assert lazy["model.norm.weight"].dtype == torch.bfloat16
    qcfg = json.loads((tmp_path / "lazy" / "quantization_config.json").read_text())
    assert qcfg["dtype"] == "bfloat16"


def test_missing_shard_and_truncated_file_are_named_before_any_work(tmp_path):
    src = _source(tmp_path, "mixtral", shard="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    specs = PLAN.resolve(describe(_in_memory(src)))
    shards[1].rename(tmp_path / "away")
    with pytest.raises(CheckpointFilesError, match=shards[1].name + " is missing"):
        quantize_stream(src, tmp_path / "q", specs, _windows(), CALIB, progress=False)
    (tmp_path / "away").rename(shards[1])
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[:-100])
    with pytest.raises(CheckpointFilesError, match=shards[2].name + " is truncated"):
        quantize_stream(src, tmp_path / "q", specs, _windows(), CALIB, progress=False)
    assert not work_folder(tmp_path / "q").exists() and not (tmp_path / "q").exists()
    shards[2].write_bytes(data)
    assert len(checkpoint_files(src)) == len(load_file(shards[0])) + sum(len(load_file(s)) for s in shards[1:])


def test_memory_guard_refuses_with_the_number_it_needs(tmp_path):
    src = _source(tmp_path, "mixtral")
    model = _in_memory(src)
    specs = PLAN.resolve(describe(model))
    need = memory_need(model, CALIB, torch.float32)
    assert need.block == max(sum(p.numel() for p in b.parameters()) for b in model.model.layers) * 4
    assert need.activations == 2 * CALIB.num_windows * CALIB.seq_len * model.config.hidden_size * 4
    widest = max(model.config.hidden_size, model.config.intermediate_size)  # the experts' widest input
    assert need.hessians == model.config.num_local_experts * 4 * widest**2  # every expert's, in one pass
    one = memory_need(model, CALIB, torch.float32, gptq=GPTQConfig(expert_stats_mb=1e-6))  # one expert per pass
    assert one.hessians == 4 * widest**2 and one.block == need.block
    tokens, config = CALIB.num_windows * CALIB.seq_len, model.config
    attention_out = tokens * config.hidden_size * 4  # replayed attention output
    o_inputs = tokens * model.model.layers[0].self_attn.o_proj.in_features * 4  # o_proj's inputs: rebuilt from
    down_inputs = config.num_experts_per_tok * tokens * config.intermediate_size * 4  # the experts' cache
    assert need.replay == attention_out + o_inputs + down_inputs
    assert memory_need(model, CALIB, torch.float32, gptq=GPTQConfig(expert_cache_mb=0)).replay == attention_out + o_inputs
    lean = memory_need(model, CALIB, torch.float32, gptq=GPTQConfig(expert_cache_mb=0, attention_tail=False))
    assert lean.replay == attention_out
    leanest = memory_need(model, CALIB, torch.float32, gptq=GPTQConfig(expert_cache_mb=0, attention_replay=False))
    assert leanest.replay == 0 and leanest.total == lean.total - attention_out
    with pytest.raises(ValueError, match=r"needs about .* GiB .*replay .*--expert-cache-mb 0.*--max-memory"):
        quantize_stream(src, tmp_path / "q", specs, _windows(), CALIB, progress=False, max_memory=need.total - 1)
    assert not work_folder(tmp_path / "q").exists()
    assert parse_size("1.5GB") == int(1.5 * 2**30) and parse_size("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="--max-memory"):
        parse_size("lots")


@pytest.mark.parametrize("family", ["mixtral", "hy_v4", "qwen4_exp_text"])
def test_the_memory_estimate_counts_the_hidden_states_blocks_really_pass(family):
    """Hunyuan-V4 and Qwen4-Exp pass several residual streams (hyper-connections): the estimate's activations
    (the hidden states entering and leaving a block) are twice the bytes block 0 really receives."""
    from quantmoe.quant.pipeline import capture_layer_inputs

    model = tiny_model(family)
    windows = _windows()
    first = capture_layer_inputs(model, model.model.layers, windows, CALIB.batch_size, torch.device("cpu"))[0]
    entering = sum(args[0].numel() * args[0].element_size() for args, _ in first)
    calib = CalibrationConfig(num_windows=windows.shape[0], seq_len=windows.shape[1])
    assert memory_need(model, calib, torch.float32).activations == 2 * entering


def test_resume_refuses_another_run_and_a_leftover_work_folder_needs_resume(tmp_path):
    src = _source(tmp_path, "mixtral")
    specs = PLAN.resolve(describe(_in_memory(src)))
    work = work_folder(tmp_path / "q")
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"source": "other"}))
    with pytest.raises(ResumeError, match="--resume"):
        quantize_stream(src, tmp_path / "q", specs, _windows(), CALIB, progress=False)
    with pytest.raises(ResumeError, match="other settings"):
        quantize_stream(src, tmp_path / "q", specs, _windows(), CALIB, progress=False, resume=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        quantize_stream(src, foreign, specs, _windows(), CALIB, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_kill_9_after_block_1_of_3_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from quantmoe.models import embedded_root

    src = _source(tmp_path, "qwen3_moe", vocab_size=8192)  # 3 blocks
    tok = embedded_root() / "tokenizer"
    for f in tok.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    args = ["quantize", str(src), "--bits", "4", "--group-size", "16", "--calib-windows", "8", "--calib-len", "32",
            "--min-expert-tokens", "1", "--dtype", "float32", "--stream", "--threads", "1"]
    marker = tmp_path / "paused"
    env = {**os.environ, PAUSE_ENV: f"1:{marker}", "PYTHONPATH": str(Path(quantmoe.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "quantmoe.cli", *args, "--out", str(tmp_path / "q")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    work = work_folder(tmp_path / "q")
    assert json.loads((work / "progress.json").read_text()) == {"done": 1}
    assert not (tmp_path / "q").exists()

    from quantmoe.cli import main

    monkeypatch.delenv(PAUSE_ENV, raising=False)
    assert main([*args, "--out", str(tmp_path / "q"), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    for f in sorted((tmp_path / "ref").glob("model-*.safetensors")):
        assert f.read_bytes() == (tmp_path / "q" / f.name).read_bytes(), f.name
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert len(report["block_seconds"]) == 3 and all(r > 0 for r in report["peak_rss_mb"])
    assert not work.exists()


def test_cli_reports_a_missing_shard_without_traceback_and_load_checks_each_shard(tmp_path, caplog):
    from quantmoe.cli import main
    from quantmoe.quant.checkpoint import CorruptCheckpointError

    src = _source(tmp_path, "mixtral", shard="40KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "away")
    assert main(["quantize", str(src), "--bits", "4", "--stream", "--out", str(tmp_path / "q")]) == 2
    assert f"{shard.name} is missing" in caplog.text
    (tmp_path / "away").rename(shard)
    assert main(["quantize", str(src), "--bits", "4", "--stream", "--eval", "test", "--out", str(tmp_path / "q")]) == 2
    assert "--eval needs the whole model" in caplog.text

    specs = PLAN.resolve(describe(_in_memory(src)))
    quantize_stream(src, tmp_path / "q", specs, _windows(), CALIB, dtype=torch.float32, progress=False)
    out = sorted((tmp_path / "q").glob("model-*.safetensors"))[2]
    data = bytearray(out.read_bytes())
    data[-1] ^= 1
    out.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=out.name):
        quantmoe.load(tmp_path / "q")


def test_resume_accepts_other_memory_settings_but_not_other_gptq_settings(tmp_path):
    from quantmoe.quant.pipeline import GPTQConfig
    from quantmoe.quant.stream import _prepare_work, _run_identity

    windows, specs = _windows(), {"m.q_proj": QuantSpec(4)}
    first = _run_identity("src", specs, CALIB, GPTQConfig(), torch.float32, windows)
    work = tmp_path / "work"
    assert _prepare_work(work, first, resume=False) == 0
    stored = json.loads((work / "run.json").read_text())
    stored["gptq"].update(expert_cache_mb=2048, expert_chunk=0)  # as folders written before recorded them
    (work / "run.json").write_text(json.dumps(stored))
    leaner = GPTQConfig(expert_cache_mb=0, expert_chunk=2, expert_batch_mb=8)
    assert _prepare_work(work, _run_identity("src", specs, CALIB, leaner, torch.float32, windows), resume=True) == 0
    for other in (GPTQConfig(damp=0.1), GPTQConfig(refine=2), GPTQConfig(act_order="desc")):
        with pytest.raises(ResumeError, match="gptq differ"):
            _prepare_work(work, _run_identity("src", specs, CALIB, other, torch.float32, windows), resume=True)


def test_resume_hands_on_what_the_last_finished_block_carried(tmp_path, monkeypatch):
    """GLM-5's blocks hand their top-k indices to the next (FamilySpec.carries): an interrupted run keeps
    them beside the hidden states, and the resumed result equals an uninterrupted run byte for byte."""
    from quantmoe.quant import stream

    src = _source(tmp_path, "glm_moe_dsa")  # block 1 reuses block 0's top-k indices
    specs = PLAN.resolve(describe(_in_memory(src)))
    run = dict(calib=CALIB, dtype=torch.float32, progress=False, attn_implementation="eager")
    quantize_stream(src, tmp_path / "ref", specs, _windows(), **run)

    def stop_after_block_0(index):
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(stream, "_maybe_pause", stop_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        quantize_stream(src, tmp_path / "q", specs, _windows(), **run)
    spilled = load_file(work_folder(tmp_path / "q") / "hidden.safetensors")
    assert {k.partition(".")[0] for k in spilled} == {"batch", "carry0"}  # the indices block 1 reads
    monkeypatch.undo()
    quantize_stream(src, tmp_path / "q", specs, _windows(), resume=True, **run)
    for f in sorted((tmp_path / "ref").glob("model-*.safetensors")):
        assert f.read_bytes() == (tmp_path / "q" / f.name).read_bytes(), f.name
