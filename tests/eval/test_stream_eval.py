"""Block-sequential evaluation equals whole-model evaluation, with one block in memory at a time.

Tolerance: float32 on the CPU, relative 1e-5 on perplexity, NLL, KL statistics and top-1
agreement (the streamed forward runs the same operations on the same tensors, so the values
are in practice equal; the tolerance only allows for summation order).
"""

import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantmoe
from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.cli import main
from quantmoe.eval.metrics import EvalResult, evaluate, reference_logprobs
from quantmoe.eval.stream import CachedReference, evaluate_stream, reference_stream
from quantmoe.quant.checkpoint import CorruptCheckpointError, save_quantized
from quantmoe.quant.lazy import CheckpointFilesError, LazyCheckpoint
from quantmoe.quant.lazy_quantized import LazyQuantized
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.quant.stream import quantize_stream

REL = 1e-5
# A single token's KL (the quantiles: median, p90, p99, max) is a sum of products of float32
# log-probabilities of magnitude ~5, whose last bit is ~5e-7: the streamed and the whole model
# compute the same sums in other orders (gate and up as one matmul or two, per-expert views), so
# a quantile may move by a few 1e-7 where the mean and the perplexity agree to 1e-5 or better
TOKEN_KL_ABS = 1e-6
# the six first families, three whose blocks hand more than hidden states on (FamilySpec.carries), one of
# them (hy_v4) with several residual streams as its hidden states, as DeepSeek-V4 (hash routing by token id)
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "glm_moe_dsa", "zaya", "hy_v4",
            "deepseek_v4", "qwen4_exp_text"]
PLAN = Plan.from_dict({"default": {"bits": 4, "group_size": 16},
                       "kinds": {"down_proj": {"bits": 3, "symmetric": False}}})
CALIB = CalibrationConfig(min_expert_tokens=1, batch_size=4)


def _windows(n=7, t=24, vocab=128):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def _source(tmp_path, family, shard="40KB", **overrides):
    path = tmp_path / f"src-{family}"
    tiny_model(family, **overrides).save_pretrained(path, max_shard_size=shard)
    return path


def _whole(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()


def _assert_equal(got: EvalResult, want: EvalResult):
    assert got.tokens == want.tokens
    for name, value in want.as_dict().items():
        if value is None:
            assert getattr(got, name) is None, name
        else:
            quantile = name.startswith("kl_") and name != "kl_mean"
            assert getattr(got, name) == pytest.approx(value, rel=REL, abs=TOKEN_KL_ABS if quantile else 1e-12), name


@pytest.fixture
def watch_reads(monkeypatch):
    """Load hook on both lazy readers: at every read, which blocks and whether the embedding hold real weights."""
    seen: list[tuple[int, list[int], bool]] = []

    def hook(cls):
        real = cls._read

        def read(self, group, **kwargs):
            blocks = self.model.get_submodule(self.family.layers)
            loaded = [i for i, b in enumerate(blocks) if any(not t.is_meta for t in b.state_dict().values())]
            embedding = self.model.get_submodule(self.family.embedding).weight
            seen.append((group, loaded, not embedding.is_meta))
            real(self, group, **kwargs)
        monkeypatch.setattr(cls, "_read", read)

    hook(LazyCheckpoint)
    hook(LazyQuantized)
    return seen


def _one_block_at_a_time(seen, n_blocks):
    # the outside tensors for the embedding, each block once in order, the outside again for the head
    assert [g for g, _, _ in seen] == [-1] + list(range(n_blocks)) + [-1]
    # no block holds weights when a group is read, and the embedding is released while blocks run
    assert all(loaded == [] for _, loaded, _ in seen)
    assert not any(emb for g, _, emb in seen if g >= 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_precision_stream_equals_whole_model(tmp_path, family, watch_reads):
    src = _source(tmp_path, family)
    windows = _windows()
    whole = _whole(src)
    other = tiny_model(family, seed=1)  # a different model as reference: KL far from 0
    ref = reference_logprobs(other, windows, batch_size=3)
    want = evaluate(whole, windows, ref, batch_size=3)
    got = evaluate_stream(src, windows, ref, batch_size=3)
    _assert_equal(got, want)
    assert got.kl_mean > 1e-3
    _one_block_at_a_time(watch_reads, len(describe(whole).blocks))


def test_the_heap_is_trimmed_after_each_block_before_the_next_is_read(tmp_path, monkeypatch, watch_reads):
    import quantmoe.eval.stream as stream

    src = _source(tmp_path, "mixtral")
    windows = _windows()
    trims: list[int] = []
    monkeypatch.setattr(stream, "release_free_memory", lambda: trims.append(len(watch_reads)))
    evaluate_stream(src, windows, reference_logprobs(tiny_model("mixtral", seed=1), windows, batch_size=3),
                    batch_size=3)
    n = len(describe(_whole(src)).blocks)
    assert trims == [i + 2 for i in range(n)]  # after block i's read (read number i + 2), before the next


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("writer", ["save_quantized", "quantize_stream"])
def test_quantized_checkpoint_stream_equals_whole_model(tmp_path, family, writer, watch_reads):
    tied = family == "qwen3_moe"
    src = _source(tmp_path, family, tied=tied)
    windows = _windows()
    model = _whole(src)
    cache = tmp_path / "cache"
    ref = reference_stream(src, windows, batch_size=4, cache_dir=cache)
    specs = PLAN.resolve(describe(model))
    out = tmp_path / "q"
    if writer == "save_quantized":
        quantize_model(model, specs, windows, CALIB, GPTQConfig(), progress=False)
        save_quantized(model, out, specs, {})
    else:
        quantize_stream(src, out, specs, windows, CALIB, GPTQConfig(), dtype=torch.float32, progress=False)
    watch_reads.clear()
    whole = quantmoe.load(out)
    want = evaluate(whole, windows, reference_logprobs(_whole(src), windows, batch_size=4), batch_size=4)
    got = evaluate_stream(out, windows, ref, batch_size=4)
    _assert_equal(got, want)
    assert 0 < got.kl_mean and got.top1_agreement < 1
    _one_block_at_a_time(watch_reads, len(describe(whole).blocks))


def test_reference_is_cached_by_content_and_equals_the_whole_model(tmp_path, monkeypatch):
    src = _source(tmp_path, "mixtral")
    windows = _windows()
    want = reference_logprobs(_whole(src), windows, batch_size=4)
    ref = reference_stream(src, windows, batch_size=4, cache_dir=tmp_path / "cache")
    assert isinstance(ref, CachedReference) and len(ref) == len(want) == 2
    for a, b in zip(ref, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=REL, atol=1e-6)

    # the same content again: read from the cache, no block is read
    def no_read(self, group):
        raise AssertionError("the cached reference was recomputed")
    monkeypatch.setattr(LazyCheckpoint, "_read", no_read)
    again = reference_stream(src, windows, batch_size=4, cache_dir=tmp_path / "cache")
    assert again.folder == ref.folder
    # other windows, another batch size or other weights: another key
    assert len(list((tmp_path / "cache" / "reference").iterdir())) == 1
    monkeypatch.undo()
    reference_stream(src, windows[:4], batch_size=4, cache_dir=tmp_path / "cache")
    reference_stream(src, windows, batch_size=3, cache_dir=tmp_path / "cache")
    tiny_model("mixtral", seed=2).save_pretrained(src, max_shard_size="40KB")
    reference_stream(src, windows, batch_size=4, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "reference").iterdir())) == 4


def test_a_reference_of_other_batches_is_refused(tmp_path):
    src = _source(tmp_path, "mixtral")
    windows = _windows()
    ref = reference_logprobs(_whole(src), windows, batch_size=3)
    with pytest.raises(ValueError, match="same windows and batch size"):
        evaluate_stream(src, windows, ref, batch_size=4)


@pytest.fixture
def no_work(monkeypatch):
    def read(self, group):
        raise AssertionError("a block was read before the files were checked")
    monkeypatch.setattr(LazyCheckpoint, "_read", read)
    monkeypatch.setattr(LazyQuantized, "_read", read)


def test_missing_or_truncated_shard_is_an_error_before_any_work(tmp_path, no_work):
    src = _source(tmp_path, "mixtral")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    saved = shards[1].read_bytes()
    shards[1].unlink()
    with pytest.raises(CheckpointFilesError, match=re.escape(shards[1].name) + ".* is missing"):
        evaluate_stream(src, _windows())
    shards[1].write_bytes(saved[:-100])
    with pytest.raises(CheckpointFilesError, match="truncated"):
        evaluate_stream(src, _windows())
    with pytest.raises(CheckpointFilesError, match="truncated"):
        reference_stream(src, _windows(), cache_dir=tmp_path / "cache")


def test_quantized_checkpoint_with_a_missing_or_changed_shard_is_an_error_before_any_work(tmp_path, monkeypatch):
    src = _source(tmp_path, "mixtral")
    model = _whole(src)
    specs = PLAN.resolve(describe(model))
    out = tmp_path / "q"
    quantize_stream(src, out, specs, _windows(), CALIB, GPTQConfig(method="rtn"), dtype=torch.float32,
                    progress=False)
    shard = sorted(out.glob("model-*.safetensors"))[2]
    saved = shard.read_bytes()

    def read(self, group):
        raise AssertionError("a block was read before the files were checked")
    monkeypatch.setattr(LazyQuantized, "_read", read)
    shard.unlink()
    with pytest.raises(CheckpointFilesError, match="is missing"):
        evaluate_stream(out, _windows())
    shard.write_bytes(saved[:-8])
    with pytest.raises(CheckpointFilesError, match="truncated"):
        evaluate_stream(out, _windows())
    flipped = bytearray(saved)
    flipped[-1] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        evaluate_stream(out, _windows())


def test_cli_eval_stream_equals_whole_model_and_refuses_tasks(tmp_path, tiny_model_dir, capsys, caplog, monkeypatch):
    monkeypatch.setenv("QUANTMOE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--bits", "4", "--method", "rtn", "--out", str(out), "--calib-windows", "4",
                 "--calib-len", "32", "--stream"]) == 0
    args = [str(out), "--seq-len", "32", "--max-windows", "6", "--batch-size", "4", "--reference", str(src)]
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    whole = capsys.readouterr().out
    assert main(["eval", *args, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert "perplexity" in whole and "KL to" in whole and "top-1 agreement" in whole
    assert streamed == whole  # the printed figures, to their printed digits
    assert main(["eval", str(out), "--stream", "--tasks", "qmoe_ending"]) == 2
    assert "lm-eval tasks need the whole model" in caplog.text
    assert main(["eval", str(out), "--stream", "--dtype", "bfloat16"]) == 2
    assert "quantized in" in caplog.text
    assert main(["eval", str(src), "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to --stream" in caplog.text
    weights = src / "model.safetensors"  # the fixture is one file
    weights.write_bytes(weights.read_bytes()[:-64])
    assert main(["eval", str(src), "--stream"]) == 2
    assert "truncated" in caplog.text
