"""GPTQ act-order modes none / desc / gar: what each visits, that groups stay contiguous (trivial
g_idx, so the GPTQ export stays exact), and every way of setting the mode (bools included)."""

import pytest
import torch

from quantmoe.export.gptq_format import dequantize, from_gptq, to_gptq
from quantmoe.quant.gptq import act_order_mode, gar_order, gptq_quantize, gptq_quantize_batched
from quantmoe.quant.grid import QuantSpec, compute_qparams
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.qlinear import QuantLinear


def _problem(n_in: int = 128, out: int = 16, seed: int = 0, loud: tuple[int, ...] = (70, 3)):
    """W (out, in) and H = 2/n X^T X of correlated inputs X whose ``loud`` columns are large (the
    Hessian diagonal's largest entries, in a group that does not come first)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    for k, c in enumerate(loud):
        X[:, c] *= 20 - 5 * k
    return torch.randn(out, n_in, generator=g), 2 / 512 * X.T @ X, X


def _perm_H(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return H[perm][:, perm]


def test_gar_order_by_hand():
    diag = torch.tensor([[1.0, 5.0, 2.0, 9.0, 3.0, 0.5, 7.0],  # groups of 2: max 5, 9, 3; a partial last group
                         [4.0, 4.0, 0.0, 1.0, 8.0, 2.0, 6.0]])  # ties keep the column order
    assert gar_order(diag, 2).tolist() == [[3, 2, 1, 0, 4, 5, 6], [4, 5, 0, 1, 3, 2, 6]]
    assert gar_order(diag, 8).tolist() == torch.argsort(diag, dim=1, descending=True, stable=True).tolist()


@pytest.mark.parametrize("n_in", [128, 112])  # 112: the last group of 32 is partial
def test_gar_is_gptq_on_the_reordered_problem(n_in):
    """gar = plain GPTQ (act-order none, dynamic groups) on columns permuted by gar_order, permuted back:
    the permutation maps whole groups onto whole groups, so each group is still read as one span."""
    W, H, _ = _problem(n_in)
    spec = QuantSpec(3, 32, False)
    res = gptq_quantize(W, H, spec, act_order="gar", block_size=64)
    perm = gar_order(torch.diag(H)[None], 32)[0]
    assert perm[0] == 70 and perm[:32].sort().values.tolist() == list(range(64, 96))  # the loud group first
    plain = gptq_quantize(W[:, perm], _perm_H(H, perm), spec, act_order="none", block_size=64)
    inv = torch.argsort(perm)
    assert torch.equal(res.Q, plain.Q[:, inv])
    assert torch.equal(res.qweight, plain.qweight[:, inv])


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(2, 16, False)])
def test_gar_keeps_groups_contiguous_with_dynamic_parameters(spec):
    W, H, _ = _problem()
    res = gptq_quantize(W, H, spec, act_order="gar", block_size=32)
    gs = spec.group_size
    assert torch.equal(res.g_idx, torch.arange(128) // gs)
    g = res.g_idx
    assert torch.equal(res.Q, res.scale[:, g] * (res.qweight.float() - res.zero[:, g]))  # one scale per group
    static = compute_qparams(W, spec)
    first = 70 // gs  # the group gar visits first is read before any update: its parameters are W's
    assert torch.equal(res.scale[:, first], static.scale[:, first])
    assert not torch.equal(res.scale, static.scale)  # later groups read the updated weights (not static groups)
    with_static = gptq_quantize(W, H, spec, act_order="gar", block_size=32, static_groups=True)
    assert torch.equal(with_static.scale, static.scale) and torch.equal(with_static.g_idx, res.g_idx)


@pytest.mark.parametrize("spec", [QuantSpec(3, None, True), QuantSpec(2, None, False), QuantSpec(4, 256, True)])
def test_gar_is_desc_with_one_group(spec):
    """Per-channel (or a group as wide as the row) there is one group: gar's order is desc's, and
    its one dynamic group is read before any update, which is desc's static group."""
    W, H, _ = _problem()
    gar = gptq_quantize(W, H, spec, act_order="gar")
    desc = gptq_quantize(W, H, spec, act_order="desc")
    none = gptq_quantize(W, H, spec, act_order="none")
    assert torch.equal(gar.Q, desc.Q) and torch.equal(gar.scale, desc.scale) and torch.equal(gar.zero, desc.zero)
    assert not torch.equal(gar.Q, none.Q)


@pytest.mark.parametrize("spec", [QuantSpec(3, 32, True), QuantSpec(2, 32, False), QuantSpec(4, 16, True)])
def test_the_three_modes_differ_with_groups(spec):
    W, H, X = _problem()
    Q = {m: gptq_quantize(W, H, spec, act_order=m).Q for m in ("none", "desc", "gar")}
    assert not torch.equal(Q["gar"], Q["none"]) and not torch.equal(Q["gar"], Q["desc"])
    rtn_err = (X @ (W - gptq_quantize(W, torch.eye(128), spec, damp=0.0).Q).T).norm()
    for q in Q.values():
        assert (X @ (W - q).T).norm() < rtn_err


def test_batched_gar_equals_looped():
    E, spec = 3, QuantSpec(3, 32, False)
    problems = [_problem(96, seed=e, loud=(10 + 30 * e,)) for e in range(E)]
    W, H = torch.stack([p[0] for p in problems]), torch.stack([p[1] for p in problems])
    batched = gptq_quantize_batched(W, H, spec, act_order="gar", block_size=32)
    assert len({tuple(gar_order(torch.diag(H[e])[None], 32)[0, :4].tolist()) for e in range(E)}) == E
    for e in range(E):
        single = gptq_quantize(W[e], H[e], spec, act_order="gar", block_size=32)
        torch.testing.assert_close(batched[e].Q, single.Q, rtol=0, atol=1e-5)


def test_bools_are_none_and_desc():
    W, H, _ = _problem()
    spec = QuantSpec(3, 32, True)
    for flag, mode in ((False, "none"), (True, "desc")):
        assert act_order_mode(flag) == mode and GPTQConfig(act_order=flag).act_order == mode
        assert torch.equal(gptq_quantize(W, H, spec, act_order=flag).Q, gptq_quantize(W, H, spec, act_order=mode).Q)


@pytest.mark.parametrize("bad", ["asc", "DESC", "", 1, None])
def test_unknown_mode_names_the_allowed_ones(bad):
    message = r"check `act_order`: .* is not one of none, desc, gar \(or a bool"
    with pytest.raises(ValueError, match=message):
        GPTQConfig(act_order=bad)
    W, H, _ = _problem(32, loud=())
    with pytest.raises(ValueError, match=message):
        gptq_quantize(W, H, QuantSpec(4, 32), act_order=bad)


def test_metadata_and_identities_record_none_and_desc_as_before():
    from quantmoe.bench.sweep import QuantizerSettings

    recorded = {m: GPTQConfig(act_order=m).to_dict()["act_order"] for m in ("none", "desc", "gar")}
    assert recorded == {"none": False, "desc": True, "gar": "gar"}
    assert GPTQConfig(act_order="none").to_dict() == GPTQConfig(act_order=False).to_dict()
    assert QuantizerSettings(act_order="none").identity() == QuantizerSettings().identity()
    assert QuantizerSettings(act_order="desc").identity() == QuantizerSettings(act_order=True).identity()
    assert QuantizerSettings(act_order="desc").identity()["act_order"] is True
    gar = QuantizerSettings(act_order="gar")
    assert gar.identity()["act_order"] == "gar" and gar.gptq().act_order == "gar"


def test_stream_resume_identity_keeps_its_old_value():
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.quant.stream import _run_identity

    def ident(mode):
        return _run_identity("m", {}, CalibrationConfig(), GPTQConfig(act_order=mode), torch.float32,
                             torch.zeros(2, 4, dtype=torch.long))["gptq"]

    assert ident("none")["act_order"] is False and ident("desc")["act_order"] is True
    assert ident("gar")["act_order"] == "gar"


def test_sweep_accepts_a_bool_or_a_mode():
    from quantmoe.bench.sweep import sweep_from_dict

    base = {"models": ["mixtral-s"], "runs": [{"name": "u4", "policy": "uniform=4"}]}
    for given, mode in ((True, "desc"), (False, "none"), ("gar", "gar"), ("desc", "desc"), ("none", "none")):
        q = sweep_from_dict({**base, "quantizer": {"act_order": given}}).quantizer
        assert q.gptq().act_order == mode, given
    with pytest.raises(ValueError, match="quantizer.act_order"):
        sweep_from_dict({**base, "quantizer": {"act_order": "asc"}})


@pytest.mark.parametrize("argv, mode", [([], "none"), (["--act-order"], "desc"), (["--act-order", "desc"], "desc"),
                                        (["--act-order", "gar"], "gar"), (["--act-order", "none"], "none")])
def test_cli_act_order(argv, mode, quantize_settings):
    # a bare --act-order before another option: desc, not the option's name
    args, gptq = quantize_settings(["mixtral-s", "--bits", "4", *argv, "--out", "unused"])
    assert args.act_order == mode
    assert gptq.act_order == mode


def test_cli_rejects_an_unknown_mode(capsys):
    from quantmoe.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "mixtral-s", "--bits", "4", "--act-order", "asc", "--out", "x"])
    assert "invalid choice: 'asc'" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size, symmetric, clip", [(32, True, "none"), (64, False, "hmse"), (16, False, "mse")])
def test_gar_export_is_exact(bits, group_size, symmetric, clip):
    """The GPTQ-format export of a gar result: trivial g_idx, and it dequantizes to our weight bit for bit."""
    W, H, _ = _problem(out=32)  # 32 rows: 3-bit packing needs a multiple of 32
    linear = torch.nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(W * 0.02)
    res = gptq_quantize(linear.weight.detach(), H, QuantSpec(bits, group_size, symmetric, clip), act_order="gar")
    q = QuantLinear.from_result(linear, res)
    t = to_gptq(q)
    assert torch.equal(t["g_idx"], (torch.arange(128) // group_size).to(torch.int32))
    assert torch.equal(dequantize(t, 128), res.Q)
    assert torch.equal(from_gptq(t, 128, 32, torch.float32).dequantize_weight(), q.dequantize_weight())
