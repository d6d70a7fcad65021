"""A 64-bit fingerprint of a tensor's bytes that no single changed element escapes, at the cost of one read.

Plain torch. The definition (``FINGERPRINT_FORMAT``), the same on every device:

* the tensor's bytes, in C order, zero-padded to a whole number of 512-byte *rows*, read as little-endian
  64-bit words (64 words a row);
* ``s_r``: the sum of row ``r``'s words modulo 2**64;
* the fingerprint: ``sum_r w_r * s_r`` modulo 2**64, where ``w_r = splitmix64(SEED + (r + 1) * GAMMA) | 1``
  (an odd pseudo-random weight per row, the same for every tensor).

**Guarantee.** Any element of at most 8 bytes lies in one word. If it changes, that word changes by some
``d != 0`` (mod 2**64), its row sum by ``d``, and the fingerprint by ``w_r * d``, which is not 0 modulo 2**64
because ``w_r`` is odd (invertible modulo 2**64). So one changed element anywhere is always found: every
byte is read, nothing is sampled. dtype and shape are recorded beside the fingerprint, not in it.

**What a collision needs.** Changes whose row-sum changes ``D_r`` cancel: ``sum_r w_r * D_r == 0`` (mod
2**64). That happens (a) when the 8-byte words of one aligned 512-byte block are rearranged or changed so that
their sum stays the same (e.g. two words swapped inside one block; a swap of two elements inside one word
changes the word), or (b) by coincidence, for changes spread over blocks: about 2**-64 for unrelated values
(2**-(64-k) when every ``D_r`` is a multiple of 2**k). It is a checksum against accidents, not a
cryptographic hash: a deliberately crafted collision is easy.

**Cost.** Row sums are one plain reduction over the tensor (torch's own ``sum``, at the speed of reading the
bytes), written into one buffer per device; the weighting is one pass over that buffer (1/64 of the bytes);
one host synchronisation per device for any number of tensors. Tensors under 64 KiB (and the last partial
row of bigger ones) are concatenated and reduced together, so a model's many small tensors cost one kernel.
On a CUDA device with Triton, one kernel reads every bigger tensor through a table of pointers
(:mod:`._fingerprint_cuda`): no launch per tensor.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Sequence

import torch

from ._fingerprint_cuda import direct_totals

__all__ = ["FINGERPRINT_FORMAT", "ROW_BYTES", "fingerprint", "fingerprints", "row_weights", "start_fingerprints"]

#: Names the definition above; recorded with every fingerprint so that a later definition is never compared
#: with this one.
FINGERPRINT_FORMAT = "rowsum64-512/1"
ROW_BYTES = 512
_ROW_WORDS = ROW_BYTES // 8
_DIRECT_MIN_BYTES = 64 << 10  # smaller tensors are concatenated: one kernel for all of them
_MASK = (1 << 64) - 1
_SEED = 0x7065_6674_6275_6666  # "peftbuff"
_GAMMA = 0x9E37_79B9_7F4A_7C15
_MIX1 = 0xBF58_476D_1CE4_E5B9
_MIX2 = 0x94D0_49BB_1331_11EB

_lock = threading.Lock()
_WEIGHTS: Dict[torch.device, torch.Tensor] = {}
_ZEROS: Dict[torch.device, torch.Tensor] = {}
_LAYOUTS: Dict[tuple, tuple] = {}  # (device, layout) -> (tensor index per row, weight per row), the last 8


def _signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; splitmix64 needs the logical shift
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def row_weights(rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The odd weights ``w_0 .. w_{rows-1}`` of the definition, as int64 (two's complement) on ``device``.

    Made on the CPU (so every device gets the same values) and kept per device, grown as needed.

    Example:
        >>> w = row_weights(3)
        >>> [int(x) & 1 for x in w]
        [1, 1, 1]
        >>> hex(int(w[0]) & (2**64 - 1))
        '0x63a84cb02b0c2011'
    """
    device = torch.device(device)
    with _lock:
        table = _WEIGHTS.get(device)
        if table is None or table.numel() < rows:
            cpu = _WEIGHTS.get(torch.device("cpu"))
            if cpu is None or cpu.numel() < rows:
                size = max(rows, 2 * cpu.numel() if cpu is not None else 4096)
                index = torch.arange(size, dtype=torch.int64)
                z = index * _signed(_GAMMA) + _signed(_SEED + _GAMMA)
                z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
                z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
                cpu = (z ^ _shift_right(z, 31)) | 1
                _WEIGHTS[torch.device("cpu")] = cpu
            table = _WEIGHTS[device] = cpu.to(device)
        return table[:rows]


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat contiguous uint8 tensor (a view when it is contiguous)."""
    flat = tensor.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    try:
        return flat.view(torch.uint8)
    except RuntimeError:  # a dtype torch cannot view as bytes directly (e.g. quantized): a plain copy of it
        return flat.contiguous().clone().view(torch.uint8)


def fingerprints(tensors: Sequence[torch.Tensor]) -> list[Optional[int]]:
    """The fingerprint (see the module docstring) of each tensor, as an int in [0, 2**64); None for a tensor
    with nothing to read (on the meta device, or not materialised).

    Computed on each tensor's own device, one host synchronisation per device.

    Example:
        >>> t = torch.arange(1000, dtype=torch.float32)
        >>> changed = t.clone(); changed[999] = 999.5
        >>> a, b, c = fingerprints([t, t.clone(), changed])
        >>> a == b, a == c
        (True, False)
    """
    return start_fingerprints(tensors)()


def start_fingerprints(tensors: Sequence[torch.Tensor]) -> Callable[[], list[Optional[int]]]:
    """Start :func:`fingerprints` (on an accelerator the work is queued, nothing waits) and return the function
    that waits for it and returns the fingerprints: the caller can do other work in between.

    Example:
        >>> finish = start_fingerprints([torch.zeros(2)])
        >>> finish()
        [0]
    """
    by_device: Dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        if tensor.device.type == "meta" or isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
            continue
        by_device.setdefault(tensor.device, []).append(i)
    started = [(indices, _on_device(device, [tensors[i] for i in indices])) for device, indices in by_device.items()]

    def finish() -> list[Optional[int]]:
        results: list[Optional[int]] = [None] * len(tensors)
        for indices, totals in started:
            for i, value in zip(indices, totals.tolist()):  # the one synchronisation per device
                results[i] = value & _MASK
        return results

    return finish


def fingerprint(tensor: torch.Tensor) -> Optional[int]:
    """The fingerprint of one tensor (see :func:`fingerprints`).

    Example:
        >>> fingerprint(torch.tensor([1.0, 2.0])) == fingerprint(torch.tensor([2.0, 1.0]))  # the words differ
        False
        >>> fingerprint(torch.zeros(0))
        0
    """
    return fingerprints([tensor])[0]


def _on_device(device: torch.device, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's fingerprint as int64 on ``device`` (queued there, not waited for)."""
    direct: list[tuple[int, torch.Tensor, int]] = []  # (index, tensor, whole rows) read where they are
    pieces: list[torch.Tensor] = []  # bytes concatenated and reduced together (whole rows, zero-padded)
    packed: list[tuple[int, int, int]] = []  # (index, first row, rows) of the concatenated bytes
    zeros = _zeros(device)
    for index, tensor in enumerate(tensors):
        data = tensor.detach()  # a plain tensor, also of a Parameter subclass
        nbytes = data.numel() * data.element_size()
        full = nbytes // ROW_BYTES
        if nbytes >= _DIRECT_MIN_BYTES and data.is_contiguous() and data.data_ptr() % 8 == 0:
            direct.append((index, data, full))
            rest = _bytes_of(data)[full * ROW_BYTES:] if nbytes % ROW_BYTES else None
        else:
            full, rest = 0, _bytes_of(data) if nbytes else None
        if rest is not None:
            pieces.append(rest)
            if rest.numel() % ROW_BYTES:
                pieces.append(zeros[: -rest.numel() % ROW_BYTES])
            packed.append((index, full, -(-rest.numel() // ROW_BYTES)))
    totals = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    segments = packed
    if direct:
        indices = [index for index, _, _ in direct]
        rows = [count for _, _, count in direct]
        weights = row_weights(max(rows), device)
        fast = direct_totals(device, [t.data_ptr() for _, t, _ in direct], rows, weights)
        if fast is not None:  # one kernel for all (CUDA with Triton)
            totals.index_copy_(0, torch.tensor(indices, device=device), fast)
        elif device.type == "cpu":  # row sums, then one dot product per tensor: no temporary the size of the sums
            sums = _scratch(device, sum(rows))
            for (index, data, count), out in zip(direct, sums.split(rows)):
                torch.sum(data.reshape(-1).view(torch.uint8)[: count * ROW_BYTES].view(torch.int64)
                          .view(-1, _ROW_WORDS), dim=1, out=out)
                totals[index] = torch.dot(out, weights[:count])
        else:
            segments = [(index, 0, count) for index, _, count in direct] + packed
    if segments:
        owner, weight = _layout(device, tuple(segments))
        sums = torch.empty(owner.numel(), dtype=torch.int64, device=device)
        start = 0
        if len(segments) > len(packed):  # the direct tensors' rows first (an accelerator without Triton)
            start = sum(count for _, _, count in direct)
            for (_, data, count), out in zip(direct, sums[:start].split([count for _, _, count in direct])):
                torch.sum(data.reshape(-1).view(torch.uint8)[: count * ROW_BYTES].view(torch.int64)
                          .view(-1, _ROW_WORDS), dim=1, out=out)
        if pieces:
            joined = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            torch.sum(joined.view(torch.int64).view(-1, _ROW_WORDS), dim=1, out=sums[start:])
        totals.index_add_(0, owner, sums.mul_(weight))
    return totals


_scratch_local = threading.local()


def _scratch(device: torch.device, count: int) -> torch.Tensor:
    """An int64 buffer of ``count`` elements on ``device``, kept per thread (a fresh one each call would cost
    page faults on a CPU, the size of 1/64 of the bytes read)."""
    kept = getattr(_scratch_local, "buffers", None)
    if kept is None:
        kept = _scratch_local.buffers = {}
    buffer = kept.get(device)
    if buffer is None or buffer.numel() < count:
        buffer = kept[device] = torch.empty(count, dtype=torch.int64, device=device)
    return buffer[:count]


def _zeros(device: torch.device) -> torch.Tensor:
    with _lock:
        zeros = _ZEROS.get(device)
        if zeros is None:
            zeros = _ZEROS[device] = torch.zeros(ROW_BYTES, dtype=torch.uint8, device=device)
        return zeros


def _layout(device: torch.device, segments: tuple[tuple[int, int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``segments`` (tensor index, its first row, row count), in order: the tensor index and the
    weight of its row number within that tensor. The last few layouts are kept per device."""
    key = (device, segments)
    with _lock:
        kept = _LAYOUTS.get(key)
        if kept is not None:
            return kept
    counts = torch.tensor([rows for _, _, rows in segments], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.tensor([index for index, _, _ in segments], dtype=torch.int64), counts)
    starts = torch.cumsum(counts, 0) - counts
    first = torch.tensor([row for _, row, _ in segments], dtype=torch.int64)
    row = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(starts - first, counts)
    weights = row_weights(int(row.max()) + 1)[row] if row.numel() else row
    kept = owner.to(device), weights.to(device)
    with _lock:
        if len(_LAYOUTS) >= 8:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = kept
    return kept
