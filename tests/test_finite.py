import pytest
import torch

from quantmoe.finite import all_finite, finite_rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_anywhere_is_found(dtype, bad):
    t = torch.randn(7, 13).to(dtype)
    assert all_finite(t)
    for index in [(0, 0), (3, 5), (6, 12)]:
        u = t.clone()
        u[index] = bad
        assert not all_finite(u) and not all_finite(u.T)  # strided too


def test_integer_and_empty_tensors_are_finite():
    assert all_finite(torch.arange(5)) and all_finite(torch.empty(0, 3))


def test_finite_rows_names_each_bad_row():
    t = torch.randn(4, 3, 5)
    t[1, 2, 0], t[3, 0, 4] = float("nan"), -float("inf")
    assert finite_rows(t).tolist() == [True, False, True, False]
