"""Block tuning (quant/blocktune.py): each block's group scales tuned against the full-precision block's
output after GPTQ. What it promises: the block's output loss falls where tuning is kept and is never
raised (a worse result is dropped); codes and zero points are GPTQ's; scales stay storable; the
checkpoint reloads exactly; streaming and resuming give the in-memory result."""

import pytest
import torch
from torch import nn

from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant.blocktune import tune_block_scales
from quantmoe.quant.grid import QuantSpec, round_scale
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.quant.qlinear import QuantLinear

CALIB = CalibrationConfig(num_windows=8, seq_len=32, min_expert_tokens=1, batch_size=4)


def _windows(model, n=8, t=32):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


def _mlp():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    inputs = [((torch.randn(8, 64),), {}) for _ in range(4)]
    with torch.no_grad():
        targets = [block(*args) for args, _ in inputs]
    staged = {str(i): QuantLinear.from_float(block[i], QuantSpec(bits=2, group_size=32)) for i in (0, 2)}
    for name, q in staged.items():
        block[int(name)] = q.dense()
    return block, staged, inputs, targets


def _loss(block, inputs, targets):
    with torch.no_grad():
        outs = [block(*args) for args, _ in inputs]
    return sum(((o - t) ** 2).sum().item() for o, t in zip(outs, targets)) / sum(t.numel() for t in targets)


def test_tuning_lowers_the_output_loss_and_keeps_codes_and_zero_points():
    block, staged, inputs, targets = _mlp()
    before = {n: (q.qweight.clone(), q.qzeros.clone(), q.scales.clone()) for n, q in staged.items()}
    loss_before = _loss(block, inputs, targets)
    result = tune_block_scales(block, staged, inputs, targets, steps=60, lr=0.01)
    assert result.kept and result.loss_before == pytest.approx(loss_before, rel=1e-5)
    assert result.loss_after < 0.9 * result.loss_before
    assert _loss(block, inputs, targets) == pytest.approx(result.loss_after, rel=1e-5)  # stand-ins carry the scales
    for name, q in staged.items():
        qweight, qzeros, scales = before[name]
        assert torch.equal(q.qweight, qweight) and torch.equal(q.qzeros, qzeros)
        assert not torch.equal(q.scales, scales)
        assert torch.equal(q.scales.float(), round_scale(q.scales.float()))  # float16 values: storable
        assert isinstance(block[int(name)], nn.Linear) and torch.equal(block[int(name)].weight, q.dequantize_weight())


def test_a_tuning_that_does_not_lower_the_loss_is_dropped():
    block, staged, inputs, _ = _mlp()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # near the quantized block's own outputs: GPTQ's scales are about the optimum
        targets = [block(*args) + 1e-3 * torch.randn(8, 64, generator=g) for args, _ in inputs]
    scales = {n: q.scales.clone() for n, q in staged.items()}
    loss_before = _loss(block, inputs, targets)
    result = tune_block_scales(block, staged, inputs, targets, steps=3, lr=0.5)  # steps far too long
    assert not result.kept and result.loss_after > result.loss_before
    for name, q in staged.items():
        assert torch.equal(q.scales, scales[name])
        assert torch.equal(block[int(name)].weight, q.dequantize_weight())
    assert _loss(block, inputs, targets) == loss_before


@pytest.mark.parametrize("bad", [{"tune_steps": -1}, {"tune_steps": 1.5}, {"tune_steps": True}, {"tune_lr": 0},
                                 {"tune_lr": 1.0}])
def test_bad_settings_are_refused(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"check `{key}`"):
        GPTQConfig(**bad)


def _quantized(family, tune_steps, **gptq):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    windows = _windows(model)
    specs = Plan.uniform(2, group_size=16).resolve(describe(model))
    report = quantize_model(model, specs, windows, CALIB, GPTQConfig(tune_steps=tune_steps, **gptq), progress=False)
    return model, specs, windows, report


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_pipeline_tunes_every_block_and_the_checkpoint_reloads(tmp_path, family):
    import quantmoe
    from quantmoe.eval.metrics import evaluate, reference_logprobs
    from quantmoe.quant.checkpoint import save_quantized

    plain, _, windows, plain_report = _quantized(family, 0)
    tuned, specs, _, report = _quantized(family, 30, tune_lr=0.01)
    assert all(u.tuned is None for u in plain_report.units.values())
    quantized = {n: u for n, u in report.units.items() if u.method != "keep"}
    assert quantized and all(u.tuned is not None for u in quantized.values())
    assert any(u.tuned for u in quantized.values())
    plain_q = {n: m for n, m in plain.named_modules() if isinstance(m, QuantLinear)}
    tuned_q = {n: m for n, m in tuned.named_modules() if isinstance(m, QuantLinear)}
    assert plain_q.keys() == tuned_q.keys()
    # the first block sees the same inputs in both runs, so GPTQ gives it the same codes; tuning moves only scales
    first = [n for n in plain_q if ".layers.0." in n]
    assert first and all(torch.equal(plain_q[n].qweight, tuned_q[n].qweight) for n in first)
    assert any(not torch.equal(plain_q[n].scales, tuned_q[n].scales) for n in first)
    fp = tiny_model(family).eval()
    ref = reference_logprobs(fp, windows)
    assert evaluate(tuned, windows, ref).kl_mean < evaluate(plain, windows, ref).kl_mean  # on its calibration text
    save_quantized(tuned, tmp_path / "q", specs, {"gptq": GPTQConfig(tune_steps=30).to_dict()})
    loaded = quantmoe.load(tmp_path / "q", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, tuned(windows).logits)


def test_streamed_tuning_equals_memory_and_resumes_after_a_crash(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from quantmoe.quant import stream
    from quantmoe.quant.stream import quantize_stream

    src = tmp_path / "src"
    tiny_model("qwen3_moe", vocab_size=8192).save_pretrained(src)  # 3 blocks
    model = tiny_model("qwen3_moe", vocab_size=8192).eval()
    windows, specs = _windows(model), Plan.uniform(3, group_size=16).resolve(describe(model))
    gptq = GPTQConfig(tune_steps=10, tune_lr=0.01)

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("model*.safetensors")):
            out.update(load_file(f))
        return out

    quantize_stream(src, tmp_path / "whole", specs, windows, CALIB, gptq, dtype=torch.float32, progress=False)

    class Crash(Exception):
        pass

    def crash_after_block_1(index):
        if index == 1:
            raise Crash

    monkeypatch.setattr(stream, "_maybe_pause", crash_after_block_1)
    with pytest.raises(Crash):
        quantize_stream(src, tmp_path / "q", specs, windows, CALIB, gptq, dtype=torch.float32, progress=False)
    assert set(load_file(stream.work_folder(tmp_path / "q") / "hidden.safetensors")) >= {"reference.0", "batch.0"}
    monkeypatch.undo()
    quantize_stream(src, tmp_path / "q", specs, windows, CALIB, gptq, dtype=torch.float32, progress=False,
                    resume=True)
    whole, resumed = tensors(tmp_path / "whole"), tensors(tmp_path / "q")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    quantize_model(model, specs, windows, CALIB, gptq, progress=False)
    state = model.state_dict()
    scales = [k for k in whole if k.endswith(".scales")]
    assert scales and all(torch.equal(whole[k], state[k]) for k in scales)


def test_resuming_an_untuned_work_folder_with_tuning_is_refused(tmp_path):
    from quantmoe.quant.stream import ResumeError, _prepare_work, _run_identity

    windows, specs = torch.zeros(2, 4, dtype=torch.long), {"m.q_proj": QuantSpec(4)}
    work = tmp_path / "work"
    assert _prepare_work(work, _run_identity("src", specs, CALIB, GPTQConfig(), torch.float32, windows), False) == 0
    with pytest.raises(ResumeError, match="gptq differ"):
        _prepare_work(work, _run_identity("src", specs, CALIB, GPTQConfig(tune_steps=5), torch.float32, windows),
                      resume=True)
    identity = _run_identity("src", specs, CALIB, GPTQConfig(), torch.float32, windows)
    assert "tune_steps" not in identity["gptq"] and "tune_lr" not in identity["gptq"]  # older folders still resume


def test_quantize_command_and_sweep_set_it(quantize_settings):
    from quantmoe.bench.sweep import QuantizerSettings, sweep_from_dict

    _, gptq = quantize_settings(["mixtral-s", "--bits", "3", "--out", "unused", "--tune-steps", "50",
                                 "--tune-lr", "0.002"])
    assert (gptq.tune_steps, gptq.tune_lr) == (50, 0.002)
    _, gptq = quantize_settings(["mixtral-s", "--bits", "3", "--out", "unused"])
    assert gptq.tune_steps == 0
    base = {"models": ["mixtral-s"], "runs": [{"name": "u3", "policy": "uniform=3"}]}
    assert sweep_from_dict({**base, "quantizer": {"tune_steps": 50}}).quantizer.gptq().tune_steps == 50
    with pytest.raises(ValueError, match="quantizer.tune_steps"):
        sweep_from_dict({**base, "quantizer": {"tune_steps": -1}})
    identity = QuantizerSettings().identity()
    assert "tune_steps" not in identity and "tune_lr" not in identity  # rows stored before the option keep keys
    assert QuantizerSettings(tune_steps=50).identity()["tune_steps"] == 50


def test_memory_guard_counts_tuning():
    from quantmoe.quant.stream import memory_need

    model = tiny_model("mixtral")
    plain, tuned = memory_need(model, CALIB, torch.float32), memory_need(model, CALIB, torch.float32, tuned=True)
    assert tuned.activations == 2 * plain.activations and tuned.tuning > 0 and plain.tuning == 0
    assert tuned.total > plain.total


def test_targets_are_the_full_precision_models_own_hidden_states(monkeypatch):
    from quantmoe.quant import pipeline

    seen = []

    def recording(root, staged, inputs, targets, *args, **kwargs):
        seen.append(torch.cat(targets))
        return real(root, staged, inputs, targets, *args, **kwargs)

    real = pipeline.tune_block_scales
    monkeypatch.setattr(pipeline, "tune_block_scales", recording)
    model, _, windows, _ = _quantized("mixtral", 2)
    fp = tiny_model("mixtral").eval()
    outputs = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in fp.model.layers]
    with torch.no_grad():
        for i in range(0, len(windows), CALIB.batch_size):  # the driver's batches
            fp(windows[i:i + CALIB.batch_size])
    for h in hooks:
        h.remove()
    blocks = fp.config.num_hidden_layers
    assert len(seen) == blocks >= 2
    batches = len(windows) // CALIB.batch_size
    for i in range(blocks):  # each block's output of every batch, batch-major as the hooks saw them
        expected = torch.cat([outputs[b * blocks + i] for b in range(batches)])
        torch.testing.assert_close(seen[i], expected, rtol=1e-4, atol=1e-5)


def test_torchrun_is_refused_before_any_work(monkeypatch):
    from quantmoe.quant import distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "current", lambda: distributed.Parallel(0, 2))
    model = tiny_model("mixtral").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="drop torchrun or --tune-steps"):
        quantize_model(model, Plan.uniform(3).resolve(describe(model)), _windows(model), CALIB,
                       GPTQConfig(tune_steps=5), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
