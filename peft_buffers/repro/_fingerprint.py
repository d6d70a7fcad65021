"""Detect whether a tensor changed, without keeping a copy of a big one.

Small tensors (below ``exact_below_bytes``, 1 MiB by default) are copied on their own device and compared
bitwise later: exact. Big tensors get a checksum computed on their own device and kept there (two int64
numbers per tensor): a two-level random linear hash of the tensor's bytes modulo the Mersenne prime
p = 2**31 - 1, twice with independent coefficients.

Why this checksum and not ``sum`` / ``sum of squares`` / a sample:

* float reductions miss changes that cancel (a swap of two values, +d here and -d there) and a sample
  misses any change outside it; a random linear hash over all the bytes catches every change except with
  probability about 1/p per hash, so about 2**-62 for the pair;
* float reductions on a GPU are not bitwise reproducible (atomics, split reductions), so an unchanged
  tensor can look changed; integer arithmetic modulo p is exact whatever the reduction order;
* the hash reads the raw bytes, so NaN, -0.0 and every dtype (bf16, float8, bitsandbytes' packed 4-bit
  uint8 weights) are handled alike.

Cost: one pass over the tensor in chunks of 2**20 words with int64 temporaries of 16 MiB per chunk, plus one
16 MiB coefficient table per device, made once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from ._common import bitwise_equal, byte_view

__all__ = ["EXACT_BELOW_BYTES", "Fingerprint", "fingerprint", "modular_hash"]

EXACT_BELOW_BYTES = 1 << 20
_P = (1 << 31) - 1
_CHUNK = 1 << 20
_SEED = 0x5EED_B0FF
_coefficients: dict[torch.device, torch.Tensor] = {}


def _coefficient_table(device: torch.device) -> torch.Tensor:
    """Two rows of ``_CHUNK`` coefficients in [1, p), the same on every call for a device."""
    table = _coefficients.get(device)
    if table is None:
        generator = torch.Generator(device=device).manual_seed(_SEED)
        table = torch.randint(1, _P, (2, _CHUNK), generator=generator, device=device, dtype=torch.int64)
        _coefficients[device] = table
    return table


def _chunk_multipliers(count: int, device: torch.device) -> torch.Tensor:
    """Coefficients for the second level, one pair per chunk index, independent of how many chunks there are."""
    values = [[random.Random(_SEED * 1_000_003 + 2 * j + row).randrange(1, _P) for j in range(count)]
              for row in range(2)]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as 32-bit (else 16-bit, else 8-bit) integer words."""
    data = byte_view(tensor)
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if data.numel() % size == 0:
            try:
                return data.view(dtype)
            except RuntimeError:  # storage offset not aligned: align a copy
                return data.clone().view(dtype)
    return data


def modular_hash(tensor: torch.Tensor) -> torch.Tensor:
    """Two independent random linear hashes of the tensor's bytes mod 2**31-1, as an int64 tensor of shape (2,)
    on the tensor's device. Nothing is synchronised or copied to the host.

    Example:
        >>> t = torch.arange(6, dtype=torch.float32)
        >>> swapped = t[[1, 0, 2, 3, 4, 5]]  # same sum, same sum of squares
        >>> torch.equal(modular_hash(t), modular_hash(swapped))
        False
    """
    words = _words(tensor)
    device = words.device
    table = _coefficient_table(device)
    count = max(1, -(-words.numel() // _CHUNK))
    per_chunk = torch.zeros((2, count), dtype=torch.int64, device=device)
    for index in range(count):
        chunk = words[index * _CHUNK : (index + 1) * _CHUNK].to(torch.int64)
        # |word| < 2**31 and coefficient < 2**31: each product fits in int64; each term < p after the
        # remainder, so a chunk's sum stays below 2**51.
        terms = torch.remainder(chunk.unsqueeze(0) * table[:, : chunk.numel()], _P)
        per_chunk[:, index] = torch.remainder(terms.sum(dim=1), _P)
    weighted = torch.remainder(per_chunk * _chunk_multipliers(count, device), _P)
    return torch.remainder(weighted.sum(dim=1), _P)


@dataclass
class Fingerprint:
    """What a tensor looked like: an exact copy (small tensors) or a checksum (big ones)."""

    shape: tuple
    dtype: torch.dtype
    copy: Optional[torch.Tensor] = None
    checksum: Optional[torch.Tensor] = None

    @property
    def exact(self) -> bool:
        return self.copy is not None

    def matches(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` has the same shape, dtype and bytes as when fingerprinted."""
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            return False
        if self.copy is None and self.checksum is None:  # was on the meta device: nothing to compare
            return tensor.device.type == "meta"
        if self.copy is not None:
            return bitwise_equal(self.copy, tensor)
        return torch.equal(self.checksum, modular_hash(tensor).to(self.checksum.device))

    def max_abs_diff(self, tensor: torch.Tensor) -> Optional[float]:
        """Largest absolute change of a floating tensor that was copied; None when unknown."""
        if self.copy is None or not self.copy.is_floating_point() or tuple(tensor.shape) != self.shape:
            return None
        delta = (tensor.detach().to(self.copy.device, torch.float64) - self.copy.to(torch.float64)).abs()
        return float(delta.max()) if delta.numel() else 0.0


def fingerprint(tensor: torch.Tensor, exact_below_bytes: int = EXACT_BELOW_BYTES) -> Fingerprint:
    """Fingerprint ``tensor`` on its own device: a copy when it is small, else :func:`modular_hash`.

    Example:
        >>> w = torch.zeros(4)
        >>> fp = fingerprint(w)
        >>> w[2] = 1.0
        >>> fp.matches(w)
        False
    """
    data = tensor.detach()
    shape, dtype = tuple(data.shape), data.dtype
    if data.device.type == "meta":  # nothing to read: offloaded or not materialised
        return Fingerprint(shape, dtype)
    if data.numel() * data.element_size() < exact_below_bytes:
        return Fingerprint(shape, dtype, copy=data.clone())
    return Fingerprint(shape, dtype, checksum=modular_hash(data))
