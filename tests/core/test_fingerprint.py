"""The base-identity fingerprint: its definition (checked against a plain-Python implementation), the guarantee
that one changed element is always found, and what it does not see (a rearrangement inside one 512-byte row)."""

from __future__ import annotations

import struct

import pytest
import torch

from peft_buffers.core import fingerprint, fingerprints
from peft_buffers.core._fingerprint import ROW_BYTES, row_weights

MASK = (1 << 64) - 1


def splitmix64(index: int) -> int:
    z = (0x7065_6674_6275_6666 + (index + 1) * 0x9E37_79B9_7F4A_7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & MASK
    return z ^ (z >> 31)


def reference(tensor: torch.Tensor) -> int:
    """The definition, word by word in Python."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    data += b"\0" * (-len(data) % ROW_BYTES)
    total = 0
    for row in range(len(data) // ROW_BYTES):
        words = struct.unpack("<64Q", data[row * ROW_BYTES:(row + 1) * ROW_BYTES])
        total += (splitmix64(row) | 1) * (sum(words) & MASK)
    return total & MASK


def test_row_weights_are_splitmix64_made_odd():
    assert [int(w) & MASK for w in row_weights(5)] == [splitmix64(i) | 1 for i in range(5)]


@pytest.mark.parametrize("make", [
    lambda: torch.randn(1000),  # packed with others (under 64 KiB), a partial last row
    lambda: torch.randn(70_000),  # reduced in place, a partial last row packed
    lambda: torch.randn(16_384),  # exactly 64 KiB, whole rows
    lambda: torch.arange(5, dtype=torch.uint8),  # fewer bytes than one word
    lambda: torch.randn(3, 40_000)[:, 5:],  # not contiguous
    lambda: torch.randn(100_001)[1:],  # a view at an offset that is no multiple of 8 bytes
    lambda: torch.randn(40, 40, dtype=torch.float64).to(torch.bfloat16),
    lambda: torch.tensor(3.0),
    lambda: torch.zeros(0),
    lambda: torch.tensor([True, False, True]),
], ids=["small", "big", "whole-rows", "tiny", "strided", "unaligned", "bf16", "scalar", "empty", "bool"])
def test_matches_the_definition(make):
    torch.manual_seed(0)
    tensor = make()
    assert fingerprint(tensor) == reference(tensor)


def test_a_batch_gives_each_tensor_its_own_fingerprint_whatever_the_others():
    torch.manual_seed(0)
    tensors = [torch.randn(70_000), torch.randn(7), torch.randn(300, 300), torch.arange(9, dtype=torch.int64)]
    alone = [fingerprint(t) for t in tensors]
    assert fingerprints(tensors) == alone
    assert fingerprints(tensors[::-1]) == alone[::-1]
    assert fingerprints(tensors) == alone  # the layout kept from the first call gives the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int8, torch.uint8, torch.bool])
def test_one_changed_element_anywhere_is_always_found(dtype):
    # exhaustive: every position of a tensor of 2.5 rows, each changed by one bit pattern of its own width
    count = (5 * ROW_BYTES // 2) // torch.empty(0, dtype=dtype).element_size()
    base = (torch.arange(count) % 7).to(dtype)
    original = fingerprint(base)
    for position in range(count):
        changed = base.clone()
        changed[position] = (not bool(base[position])) if dtype == torch.bool else base[position] + 1
        assert fingerprint(changed) != original, position


def test_one_changed_element_of_a_big_tensor_is_found_at_its_ends_and_in_the_middle():
    torch.manual_seed(0)
    base = torch.randn(123_457)  # reduced in place, with a packed last row
    original = fingerprint(base)
    for position in (0, 1, 64_000, 123_455, 123_456):
        changed = base.clone()
        changed[position] = torch.nextafter(changed[position], torch.tensor(float("inf")))  # the smallest change
        assert fingerprint(changed) != original, position


def test_sign_of_zero_counts_and_nan_is_stable():
    negative = torch.zeros(8)
    negative[3] = -0.0
    assert fingerprint(torch.zeros(8)) != fingerprint(negative)
    nan = torch.full((8,), float("nan"))
    assert fingerprint(nan) == fingerprint(nan.clone())


def test_a_swap_across_rows_is_found_but_a_word_swap_inside_one_row_is_not():
    # What a collision needs (the module docstring): words rearranged within one aligned 512-byte row.
    base = torch.arange(256, dtype=torch.int64)  # 4 rows of 64 words
    across = base.clone()
    across[[3, 100]] = across[[100, 3]]
    assert fingerprint(across) != fingerprint(base)
    inside = base.clone()
    inside[[3, 10]] = inside[[10, 3]]
    assert fingerprint(inside) == fingerprint(base)


def test_nothing_to_read_gives_none():
    assert fingerprints([torch.empty(4, device="meta"), torch.ones(2)])[0] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_fingerprint_on_cuda_as_on_the_cpu():
    torch.manual_seed(0)
    tensors = [torch.randn(70_000), torch.randn(1000).to(torch.bfloat16), torch.randn(2048, 2048).half()]
    on_cpu = fingerprints(tensors)
    assert fingerprints([t.cuda() for t in tensors]) == on_cpu
    assert fingerprints([tensors[0].cuda(), tensors[1]]) == on_cpu[:2]  # two devices in one call
