"""GPTQ's `block_size` and `static_groups`: what the math says they change, and that every way of
setting them (GPTQConfig, the `quantize` command, a sweep) reaches the column loop."""

import pytest
import torch

from quantmoe.quant.gptq import gptq_quantize, scale_in_dtype
from quantmoe.quant.grid import QuantSpec, compute_qparams
from quantmoe.quant.pipeline import GPTQConfig


def _problem(n_in: int = 128, out: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)  # correlated inputs
    return torch.randn(out, n_in, generator=g), 2 / 512 * X.T @ X


# Lazy batch updates are the same arithmetic grouped differently: any block size gives the same Q up to
# float32 reordering (1e-5 here; in practice the codes are identical). With dynamic groups it is not so:
# a group's scale is read from W as updated by the earlier *blocks* (the reference's choice), so the block
# size decides which updates it sees (gptq.py's docstring); that case is excluded on purpose.
@pytest.mark.parametrize("spec, kwargs", [
    (QuantSpec(3, 32, True), {"static_groups": True}),
    (QuantSpec(3, 32, False), {"act_order": True}),
    (QuantSpec(4, None, True), {}),
    (QuantSpec(2, None, False), {"act_order": True}),
])
def test_block_size_does_not_change_q(spec, kwargs):
    W, H = _problem(n_in=112)  # 112 columns: block sizes 48 and 80 leave a partial last block
    ref = gptq_quantize(W, H, spec, block_size=112, **kwargs)
    for block_size in (1, 16, 48, 80, 128):
        res = gptq_quantize(W, H, spec, block_size=block_size, **kwargs)
        assert (res.Q - ref.Q).abs().max() <= 1e-5
        assert (res.qweight != ref.qweight).float().mean() <= 0.001  # a rounding tie at most
        assert res.loss == pytest.approx(ref.loss, rel=1e-4)


def test_static_groups_take_every_group_from_the_unquantized_weight():
    W, H = _problem()
    spec = QuantSpec(3, 32, True)
    static = gptq_quantize(W, H, spec, block_size=32, static_groups=True)
    dynamic = gptq_quantize(W, H, spec, block_size=32, static_groups=False)
    qp = compute_qparams(W, spec)
    assert torch.equal(static.scale, scale_in_dtype(qp.scale, W.dtype)) and torch.equal(static.zero, qp.zero)
    # dynamic groups, one group per block: the first group sees W itself, the later ones the updated weights
    assert torch.equal(dynamic.scale[:, 0], static.scale[:, 0])
    assert not torch.equal(dynamic.scale[:, 1:], static.scale[:, 1:])


def test_act_order_with_groups_is_static_groups_either_way():
    W, H = _problem()
    spec = QuantSpec(4, 32, False)
    a = gptq_quantize(W, H, spec, act_order=True, static_groups=False)
    b = gptq_quantize(W, H, spec, act_order=True, static_groups=True)
    assert torch.equal(a.Q, b.Q) and torch.equal(a.scale, b.scale)


def test_per_channel_ignores_static_groups():
    W, H = _problem()
    spec = QuantSpec(3, None, True)
    assert torch.equal(gptq_quantize(W, H, spec).Q, gptq_quantize(W, H, spec, static_groups=True).Q)


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True, "64"])
def test_gptq_config_rejects_bad_block_sizes(block_size):
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=block_size)


def _o_proj_scales(gptq: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales of a tiny model's first o_proj after quantize_model, and the scales of its original weight."""
    from quantmoe.anatomy import describe, tiny_model
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.quant.pipeline import quantize_model
    from quantmoe.quant.plan import Plan

    torch.manual_seed(0)
    model = tiny_model("mixtral")
    anatomy = describe(model)
    unit = next(u for u in anatomy.units if u.kind == "o_proj")
    name = unit.name
    assert 16 < unit.in_features <= 128  # several groups of 16, one block of 128 columns
    W = model.get_submodule(name).weight.detach().clone()
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    specs = Plan.uniform(3, group_size=16).resolve(anatomy)
    quantize_model(model, specs, windows, CalibrationConfig(num_windows=4, seq_len=32, min_expert_tokens=0), gptq,
                   progress=False)
    scales = model.get_submodule(name).scales.float()  # (out, groups)
    return scales, scale_in_dtype(compute_qparams(W.float(), QuantSpec(3, 16, True)).scale, W.dtype)


def test_pipeline_passes_block_size_and_static_groups_to_gptq():
    static, from_w = _o_proj_scales(GPTQConfig(block_size=16, static_groups=True))
    assert torch.equal(static, from_w)
    one_block, _ = _o_proj_scales(GPTQConfig(block_size=128))  # every dynamic group read before any update
    assert torch.equal(one_block, from_w)
    per_group, _ = _o_proj_scales(GPTQConfig(block_size=16))  # later groups read the updated weights
    assert not torch.equal(per_group, from_w)


def test_quantize_command_sets_both(quantize_settings):
    from quantmoe.cli import build_parser
    from quantmoe.quant import cli

    _, gptq = quantize_settings(["mixtral-s", "--bits", "4", "--out", "unused", "--static-groups",
                                 "--block-size", "64"])
    assert gptq.static_groups is True and gptq.block_size == 64
    args = build_parser().parse_args(["quantize", "mixtral-s", "--bits", "4", "--out", "unused", "--block-size", "0"])
    with pytest.raises(ValueError, match="block_size"):
        cli._cmd_quantize(args)


def test_sweep_sets_both():
    from quantmoe.bench.sweep import sweep_from_dict

    base = {"models": ["mixtral-s"], "runs": [{"name": "u4", "policy": "uniform=4"}]}
    q = sweep_from_dict({**base, "quantizer": {"block_size": 64, "static_groups": True}}).quantizer
    assert q.gptq().block_size == 64 and q.gptq().static_groups is True
    for bad, message in (({"block_size": 0}, "quantizer.block_size: input should be greater than or equal to 1"),
                         ({"static_groups": "yes"}, 'quantizer.static_groups: expected true or false, got "yes"')):
        with pytest.raises(ValueError, match=message):
            sweep_from_dict({**base, "quantizer": bad})


def test_new_gptq_settings_keep_earlier_run_keys():
    from quantmoe.bench.sweep import QuantizerSettings

    default = QuantizerSettings().identity()
    assert "block_size" not in default and "static_groups" not in default  # rows stored before them still match
    assert QuantizerSettings(block_size=64).identity()["block_size"] == 64
    assert QuantizerSettings(static_groups=True).identity()["static_groups"] is True
