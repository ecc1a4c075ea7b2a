"""`refine`: coordinate descent on GPTQ's codes and scales (quant/gptq.py refine_codes). What the math
promises: the layer loss 1/2 tr(E H E^T) (E = W - Q, H damped as GPTQ used it) never rises and here
falls; the result stays on a storable grid with GPTQ's zero points; every way of asking for it reaches
the column loop."""

import pytest
import torch

from quantmoe.quant.gptq import gptq_quantize, gptq_quantize_batched, refine_codes, scale_in_dtype
from quantmoe.quant.grid import QuantSpec, dequantize, expand_groups, round_scale
from quantmoe.quant.pipeline import GPTQConfig


def _problem(n_in: int = 96, out: int = 24, seed: int = 0, experts: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shape = () if experts is None else (experts,)
    X = torch.randn(*shape, 384, n_in, generator=g) @ torch.randn(*shape, n_in, n_in, generator=g)
    H = 2 / 384 * X.transpose(-1, -2) @ X
    return torch.randn(*shape, out, n_in, generator=g), H


def _layer_loss(W, H, Q, damp=0.01):
    Hd = H + damp * H.diagonal().mean() * torch.eye(H.shape[0])
    E = (W - Q).float()
    return 0.5 * (E * (E @ Hd)).sum().item()


SPECS = [QuantSpec(2, 32, True), QuantSpec(3, 32, False), QuantSpec(4, None, True), QuantSpec(3, 64, True, "hmse"),
         QuantSpec(8, 32, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", ["none", "desc", "gar"])
def test_refine_lowers_the_layer_loss_it_reports(spec, act_order):
    W, H = _problem()
    plain = gptq_quantize(W, H, spec, act_order=act_order)
    assert plain.loss == pytest.approx(_layer_loss(W, H, plain.Q), rel=1e-4)  # GPTQ's loss is this loss
    refined = gptq_quantize(W, H, spec, act_order=act_order, refine=3)
    assert refined.loss == pytest.approx(_layer_loss(W, H, refined.Q), rel=1e-4)
    assert refined.loss < plain.loss * (0.99 if spec.bits < 8 else 1.0)
    assert not torch.equal(refined.qweight, plain.qweight)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_refined_weight_is_on_a_storable_grid_with_gptqs_zero_points(spec):
    W, H = _problem()
    plain = gptq_quantize(W, H, spec)
    res = gptq_quantize(W, H, spec, refine=3)
    assert torch.equal(res.zero, plain.zero)
    assert int(res.qweight.max()) <= spec.maxq
    assert torch.equal(res.scale, round_scale(res.scale)) and bool((res.scale > 0).all())  # float16 values
    gs = res.group_size
    assert torch.equal(res.Q, dequantize(res.qweight.float(), expand_groups(res.scale, gs, 96),
                                         expand_groups(res.zero, gs, 96)))


def test_bfloat16_weights_get_bfloat16_scales():
    W, H = _problem()
    res = gptq_quantize(W.bfloat16(), H, QuantSpec(3, 32, True), refine=3)
    assert res.Q.dtype == torch.bfloat16
    assert torch.equal(res.scale, scale_in_dtype(res.scale, torch.bfloat16))


def test_each_pass_lowers_the_loss_on_its_own():
    """Codes only (scales left as they are) and scales only (one sweep, codes fixed) each lower it."""
    W, H = _problem()
    spec = QuantSpec(3, 32, True)
    plain = gptq_quantize(W, H, spec)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(96)
    C = plain.qweight.float()[None].clone()
    S, Z = (expand_groups(t, 32, 96)[None].clone() for t in (plain.scale, plain.zero))
    after = refine_codes(W[None], Hd[None], C, S, Z, spec.maxq, sweeps=1, group_size=32)
    assert float(after[0]) == pytest.approx(_layer_loss(W, H, dequantize(C[0], S[0], Z[0])), rel=1e-4)
    assert float(after[0]) < plain.loss
    codes_changed = not torch.equal(C[0], plain.qweight.float())
    scales_changed = not torch.equal(S[0, :, ::32], plain.scale)
    assert codes_changed and scales_changed


def test_more_sweeps_never_raise_the_loss():
    W, H = _problem(seed=1)
    spec = QuantSpec(2, 32, False)
    losses = [gptq_quantize(W, H, spec, refine=k).loss for k in (0, 1, 2, 4, 8)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses


def test_batched_equals_one_by_one():
    W, H = _problem(experts=3)
    spec = QuantSpec(3, 32, True)
    batched = gptq_quantize_batched(W, H, spec, refine=2, act_order="desc")
    for e in range(3):
        single = gptq_quantize(W[e], H[e], spec, refine=2, act_order="desc")
        assert (batched[e].qweight != single.qweight).float().mean() < 0.01
        assert batched[e].loss == pytest.approx(single.loss, rel=1e-3)


def test_an_expert_without_tokens_stays_round_to_nearest():
    W, H = _problem(experts=2)
    H[1] = 0
    spec = QuantSpec(3, 32, True)
    plain = gptq_quantize_batched(W, H, spec)
    refined = gptq_quantize_batched(W, H, spec, refine=3)
    assert refined[1].fallback == "rtn" and torch.equal(refined[1].Q, plain[1].Q)
    assert refined[0].loss < plain[0].loss


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_sweep_counts_are_refused(bad):
    W, H = _problem()
    with pytest.raises(ValueError, match="check `refine`"):
        GPTQConfig(refine=bad)
    with pytest.raises(ValueError, match="check `refine`"):
        gptq_quantize(W, H, QuantSpec(3, 32), refine=bad)


def test_pipeline_refines_and_the_checkpoint_reloads(tmp_path):
    import quantmoe
    from quantmoe.anatomy import describe, tiny_model
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.quant.checkpoint import save_quantized
    from quantmoe.quant.pipeline import quantize_model
    from quantmoe.quant.plan import Plan

    calib = CalibrationConfig(num_windows=4, seq_len=32, min_expert_tokens=0)
    losses = {}
    for refine in (0, 2):
        torch.manual_seed(0)
        model = tiny_model("mixtral").eval()
        windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        specs = Plan.uniform(3, group_size=16).resolve(describe(model))
        report = quantize_model(model, specs, windows, calib, GPTQConfig(refine=refine), progress=False)
        losses[refine] = {name: unit.loss for name, unit in report.units.items() if unit.method == "gptq"}
    assert losses[0].keys() == losses[2].keys() and losses[0]
    # each linear's loss is on its own inputs, which differ once earlier linears are refined: compare the sums
    assert sum(losses[2].values()) < 0.97 * sum(losses[0].values())
    save_quantized(model, tmp_path / "q", specs, {"gptq": GPTQConfig(refine=2).to_dict()})
    loaded = quantmoe.load(tmp_path / "q", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(loaded(windows).logits, model(windows).logits)


def test_quantize_command_and_sweep_set_it(quantize_settings):
    from quantmoe.bench.sweep import QuantizerSettings, sweep_from_dict

    _, gptq = quantize_settings(["mixtral-s", "--bits", "3", "--out", "unused", "--refine", "4"])
    assert gptq.refine == 4
    _, gptq = quantize_settings(["mixtral-s", "--bits", "3", "--out", "unused"])
    assert gptq.refine == 0
    base = {"models": ["mixtral-s"], "runs": [{"name": "u3", "policy": "uniform=3"}]}
    assert sweep_from_dict({**base, "quantizer": {"refine": 4}}).quantizer.gptq().refine == 4
    with pytest.raises(ValueError, match="quantizer.refine"):
        sweep_from_dict({**base, "quantizer": {"refine": -1}})
    assert "refine" not in QuantizerSettings().identity()  # rows stored before the option keep their keys
    assert QuantizerSettings(refine=4).identity()["refine"] == 4


def test_the_descent_stops_at_a_sweep_that_changes_nothing(monkeypatch):
    import quantmoe.quant.gptq as gptq_module

    W, H = _problem()
    spec = QuantSpec(3, 32, True)
    calls = []
    real = gptq_module.quantize
    monkeypatch.setattr(gptq_module, "quantize", lambda *a: calls.append(1) or real(*a))
    gptq_quantize(W, H, spec, refine=200)
    sweeps = (len(calls) - 96) / 96  # GPTQ's loop rounds each of the 96 columns once, then one per sweep
    assert 1 < sweeps < 200
    assert gptq_quantize(W, H, spec, refine=200).loss == gptq_quantize(W, H, spec, refine=int(sweeps)).loss


def test_refinement_counts_in_the_expert_batch_budget():
    from quantmoe.quant.working_set import expert_chunks, gptq_working_set

    shape = (256, 512)
    assert gptq_working_set(shape, refine=True) > gptq_working_set(shape)
    budget = 8 * gptq_working_set(shape) / 2**20  # eight plain experts
    assert expert_chunks(64, shape, GPTQConfig(expert_batch_mb=budget)) == 8
    assert expert_chunks(64, shape, GPTQConfig(expert_batch_mb=budget, refine=2)) < 8


def test_a_scale_step_that_rounding_makes_worse_is_not_taken():
    """Double rounding (float16, then bfloat16 ties-to-even) can land the optimal scale on the farther
    storable value; the step is taken only where it lowers the loss, so the scale stays."""
    a = torch.tensor([1.0, -1.0, 2.0, -2.0])  # codes - zero
    best = 1.00390625 + 1e-4  # just above the bfloat16 midpoint of 1.0 and 1.0078125
    kept = 1.0078125  # the storable scale nearest to it
    assert scale_in_dtype(round_scale(torch.tensor(best)), torch.bfloat16).item() == 1.0  # the farther one
    W = (best * a)[None, None]  # (1, 1, 4): zero loss at the best scale
    C, Z = (a + 8)[None, None].clone(), torch.full((1, 1, 4), 8.0)
    S = torch.full((1, 1, 4), kept)
    loss = refine_codes(W, torch.eye(4)[None], C, S, Z, maxq=15, sweeps=1, group_size=4, dtype=torch.bfloat16)
    assert torch.equal(S, torch.full((1, 1, 4), kept)) and torch.equal(C[0, 0], a + 8)
    assert float(loss) == pytest.approx(0.5 * (best - kept) ** 2 * 10, rel=1e-3)
