import doctest

import pytest
import torch

import quantmoe.quant.pack as pack_module
from quantmoe.quant.pack import pack, packed_words, unpack


def as_int32(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


def stream_words(codes: list[int], bits: int, n_words: int) -> list[int]:
    """Reference: one little-endian bit stream as a Python integer."""
    big = sum(c << (j * bits) for j, c in enumerate(codes))
    return [as_int32((big >> (32 * k)) & 0xFFFFFFFF) for k in range(n_words)]


def test_docstring_example():
    assert doctest.testmod(pack_module).failed == 0


@pytest.mark.parametrize("bits, codes, words", [
    (4, [1, 2, 3, 4, 5, 6, 7, 8], [as_int32(0x87654321)]),
    (8, [1, 2, 3, 0xFF], [as_int32(0xFF030201)]),
    (2, [3] + [0] * 14 + [2], [as_int32(0x80000003)]),
    (3, [0] * 10 + [7] + [0] * 21, [as_int32(0xC0000000), 1, 0]),  # code 10 straddles words 0 and 1
    (3, [0] * 21 + [5] + [0] * 10, [0, as_int32(0x80000000), 2]),  # code 21 straddles words 1 and 2
])
def test_known_answers(bits, codes, words):
    packed = pack(torch.tensor([codes]), bits)
    assert packed.dtype == torch.int32 and packed.tolist() == [words]
    assert unpack(packed, bits, len(codes)).tolist() == [codes]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_reference_bit_stream(bits):
    codes = torch.randint(0, 2**bits, (3, 64))
    expected = [stream_words(row, bits, 2 * bits) for row in codes.tolist()]
    assert pack(codes, bits).tolist() == expected


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100, 256])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_any_length(bits, n):
    codes = torch.randint(0, 2**bits, (2, 3, n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (2, 3, packed_words(n, bits)) and packed.is_contiguous()
    assert torch.equal(unpack(packed, bits, n), codes)


def test_dense_sizes():
    assert [packed_words(32, b) for b in (2, 3, 4, 8)] == [2, 3, 4, 8]
    assert packed_words(33, 3) == 6 and packed_words(9, 4) == 2 and packed_words(0, 3) == 0


def test_all_ones_codes_round_trip():
    for bits in (2, 3, 4, 8):
        codes = torch.full((1, 96), 2**bits - 1)
        packed = pack(codes, bits)
        assert (packed == -1).all()
        assert torch.equal(unpack(packed, bits, 96).long(), codes)


def test_errors():
    with pytest.raises(ValueError, match="`bits`"):
        pack(torch.zeros(1, 8, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="integers"):
        pack(torch.tensor([[0.5]]), 4)
    with pytest.raises(ValueError, match="expected int32"):
        unpack(torch.zeros(1, 2, dtype=torch.int32), 3, 32)
