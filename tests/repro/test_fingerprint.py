"""The audit's change detection: exact copies for small tensors, an on-device modular hash for big ones."""

from __future__ import annotations

import torch

from peft_buffers.repro._fingerprint import _CHUNK, fingerprint, modular_hash


def test_hash_is_reproducible_and_sees_changes_that_sum_and_sum_of_squares_miss():
    t = torch.arange(1000, dtype=torch.float32)  # integers: float sums are exact here
    swapped = t.clone()
    swapped[[10, 900]] = swapped[[900, 10]]
    assert float(t.sum()) == float(swapped.sum()) and float((t * t).sum()) == float((swapped * swapped).sum())
    assert torch.equal(modular_hash(t), modular_hash(t.clone()))
    assert not torch.equal(modular_hash(t), modular_hash(swapped))


def test_hash_sees_a_swap_between_chunks_at_the_same_offset():
    # identical per-chunk coefficients alone would cancel this change; the per-chunk multipliers do not
    t = torch.arange(2 * _CHUNK, dtype=torch.int32)
    swapped = t.clone()
    swapped[[7, _CHUNK + 7]] = swapped[[_CHUNK + 7, 7]]
    assert not torch.equal(modular_hash(t), modular_hash(swapped))


def test_hash_reads_bytes_so_sign_of_zero_counts_and_nan_is_stable():
    zeros = torch.zeros(8)
    negative = zeros.clone()
    negative[3] = -0.0
    assert not torch.equal(modular_hash(zeros), modular_hash(negative))
    nan = torch.full((8,), float("nan"))
    assert torch.equal(modular_hash(nan), modular_hash(nan.clone()))


def test_hash_handles_odd_sizes_views_and_every_dtype():
    odd = torch.arange(3, dtype=torch.uint8)
    assert not torch.equal(modular_hash(odd), modular_hash(odd + 1))
    base = torch.randn(6, 5)
    view = base[:, 1:4]  # not contiguous
    assert torch.equal(modular_hash(view), modular_hash(view.contiguous()))
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool):
        t = torch.ones(5, dtype=dtype)
        changed = t.clone()
        changed[2] = 0
        assert not torch.equal(modular_hash(t), modular_hash(changed)), dtype


def test_small_tensors_are_copied_and_big_ones_checksummed():
    small, big = torch.zeros(4), torch.zeros(1 << 18)  # 16 bytes, 1 MiB
    fp_small, fp_big = fingerprint(small), fingerprint(big)
    assert fp_small.exact and not fp_big.exact
    small[1], big[12345] = 0.5, 1e-30
    assert not fp_small.matches(small) and not fp_big.matches(big)
    assert fp_small.max_abs_diff(small) == 0.5 and fp_big.max_abs_diff(big) is None
    assert not fingerprint(torch.zeros(4)).matches(torch.zeros(4, dtype=torch.float64))
