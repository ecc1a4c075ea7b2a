import pytest
import torch

from quantmoe.quant.grid import QuantSpec, compute_qparams, dequantize, expand_groups, quantize, rtn


def test_symmetric_grid_known_answer():
    w = torch.tensor([[-2.0, -1.0, 0.5, 1.5]])
    qp = compute_qparams(w, QuantSpec(bits=2, group_size=None, symmetric=True))
    # maxq 3: scale = 2 * max|w| / 3, zero in the middle
    assert qp.scale.item() == pytest.approx(4.0 / 3.0)
    assert qp.zero.item() == 2.0
    q = quantize(w, qp.scale, qp.zero, 3)
    assert q.tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_asymmetric_grid_known_answer():
    w = torch.tensor([[1.0, 1.9, 3.0, 4.0]])  # the range is widened to include 0
    qp = compute_qparams(w, QuantSpec(bits=2, group_size=None, symmetric=False))
    assert qp.scale.item() == pytest.approx(4.0 / 3.0)
    assert qp.zero.item() == 0.0
    out = rtn(w, QuantSpec(bits=2, group_size=None, symmetric=False))
    assert torch.allclose(out, torch.tensor([[4 / 3, 4 / 3, 8 / 3, 4.0]]))


def test_groups_are_independent_and_padding_does_not_widen_range():
    w = torch.cat([torch.full((2, 4), 0.1), torch.full((2, 2), 100.0)], dim=1)  # in=6, group 4 -> 2 groups
    spec = QuantSpec(bits=4, group_size=4, symmetric=False)
    qp = compute_qparams(w, spec)
    assert qp.scale.shape == (2, 2)
    out = rtn(w, spec)
    assert torch.allclose(out, w, rtol=1e-5)  # each group's constant value sits on its own grid


def test_codes_in_range_and_dequantize_roundtrip():
    w = torch.randn(16, 64)
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits=bits, group_size=16, symmetric=False)
        qp = compute_qparams(w, spec)
        s = expand_groups(qp.scale, qp.group_size, 64)
        z = expand_groups(qp.zero, qp.group_size, 64)
        q = quantize(w, s, z, spec.maxq)
        assert q.min() >= 0 and q.max() <= spec.maxq
        assert torch.equal(q, torch.round(q))
        assert torch.allclose(dequantize(q, s, z), rtn(w, spec))


def test_error_shrinks_with_bits_and_groups():
    w = torch.randn(64, 256)
    errs = [(rtn(w, QuantSpec(bits=b, group_size=None)) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4
    coarse = (rtn(w, QuantSpec(bits=3, group_size=None)) - w).pow(2).mean()
    fine = (rtn(w, QuantSpec(bits=3, group_size=32)) - w).pow(2).mean()
    assert fine < coarse


def test_keep_is_identity():
    w = torch.randn(4, 8)
    assert torch.equal(rtn(w, QuantSpec(bits=16)), w)


@pytest.mark.parametrize("kwargs, setting", [({"bits": 5}, "bits"), ({"bits": 4, "group_size": 100}, "group_size"),
                                             ({"bits": 4, "group_size": 0}, "group_size")])
def test_bad_spec_names_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=f"`{setting}`"):
        QuantSpec(**kwargs)
