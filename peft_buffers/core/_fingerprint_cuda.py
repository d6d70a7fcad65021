"""The fingerprint's row sums and weighting on a CUDA device in one kernel for all tensors (Triton).

With one ``sum`` kernel per tensor, a model's few hundred tensors cost more in launches than in reading their
bytes (the 1.1B Llama: 201 tensors, 2.2 GB, about 0.7 ms of reading on an H100). Here one Triton kernel reads
every tensor through a table of pointers: each program sums the 64-bit words of up to ``_TILE_ROWS`` rows of
one tensor, multiplies each row sum by its row weight and stores the tile's total; the tiles of a tensor are
then added with one ``cumsum`` (exact: all arithmetic is modulo 2**64). The result is the same number the
CPU computes (tested, and checked once per device before first use). Used when Triton is importable and the
kernel builds and passes that check; otherwise the per-tensor path runs.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional

import torch

__all__ = ["direct_totals"]

_TILE_ROWS = 32
_lock = threading.Lock()
_state: dict = {"kernel": None, "failed": None, "verified": set()}
_TABLES: Dict[tuple, tuple] = {}  # (device, rows per tensor) -> tile tables, the last 8


def _kernel():
    """The compiled-on-first-use Triton kernel, or None when Triton is missing or failed before."""
    with _lock:
        if _state["kernel"] is not None or _state["failed"] is not None:
            return _state["kernel"]
        try:
            import triton
            import triton.language as tl
        except ImportError as error:
            _state["failed"] = f"triton is not importable ({error})"
            return None

        @triton.jit
        def tile_totals(pointers, rows_of, tile_entry, tile_row0, weights, out, TILE_ROWS: tl.constexpr,
                        WORDS: tl.constexpr):
            tile = tl.program_id(0)
            entry = tl.load(tile_entry + tile)
            row0 = tl.load(tile_row0 + tile)
            base = tl.load(pointers + entry).to(tl.pointer_type(tl.int64))
            count = tl.load(rows_of + entry)
            rows = row0 + tl.arange(0, TILE_ROWS)
            inside = rows < count
            words = tl.load(base + rows[:, None] * WORDS + tl.arange(0, WORDS)[None, :], mask=inside[:, None],
                            other=0)
            weight = tl.load(weights + rows, mask=inside, other=0)
            tl.store(out + tile, tl.sum(tl.sum(words, axis=1) * weight, axis=0))

        _state["kernel"] = tile_totals
        return tile_totals


def _tables(device: torch.device, rows: tuple[int, ...]) -> tuple:
    key = (device, rows)
    with _lock:
        kept = _TABLES.get(key)
        if kept is not None:
            return kept
    counts = torch.tensor(rows, dtype=torch.int64)
    tiles = (counts + _TILE_ROWS - 1) // _TILE_ROWS
    first = torch.cumsum(tiles, 0) - tiles
    entry = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int64), tiles)
    row0 = (torch.arange(int(tiles.sum()), dtype=torch.int64) - torch.repeat_interleave(first, tiles)) * _TILE_ROWS
    last = first + tiles - 1  # each tensor has at least one row, so at least one tile
    kept = tuple(t.to(device) for t in (counts, entry, row0, first, last))
    with _lock:
        if len(_TABLES) >= 8:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = kept
    return kept


def direct_totals(device: torch.device, pointers: list[int], rows: list[int], weights: torch.Tensor
                  ) -> Optional[torch.Tensor]:
    """``sum_r weights[r] * rowsum_r`` (mod 2**64) of each tensor given by its data pointer (8-byte aligned,
    ``rows[i]`` whole rows of 64 words), as int64 on ``device``; None when the Triton kernel is unavailable.

    Example:
        >>> direct_totals(torch.device("cpu"), [], [], torch.zeros(0, dtype=torch.int64)) is None
        True
    """
    if device.type != "cuda" or not pointers:
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    if device not in _state["verified"] and not _verify(kernel, device):
        return None
    return _run(kernel, device, pointers, rows, weights)


def _run(kernel, device: torch.device, pointers: list[int], rows: list[int], weights: torch.Tensor
         ) -> Optional[torch.Tensor]:
    counts, entry, row0, first, last = _tables(device, tuple(rows))
    table = torch.tensor(pointers, dtype=torch.int64).to(device, non_blocking=True)
    out = torch.empty(entry.numel(), dtype=torch.int64, device=device)
    try:
        with torch.cuda.device(device):
            kernel[(entry.numel(),)](table, counts, entry, row0, weights, out, TILE_ROWS=_TILE_ROWS, WORDS=64)
    except Exception as error:  # noqa: BLE001 - a kernel that does not build here: the per-tensor path runs
        with _lock:
            _state["kernel"], _state["failed"] = None, f"{type(error).__name__}: {error}"
        return None
    running = torch.cumsum(out, 0)  # int64, wraps modulo 2**64 like every step above
    before = torch.where(first > 0, running[(first - 1).clamp(min=0)], torch.zeros_like(first))
    return running[last] - before


def _verify(kernel, device: torch.device) -> bool:
    """Once per device: the kernel's totals equal plain torch's on random data (else it is not used)."""
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(-2**62, 2**62, (rows, 64), generator=generator, dtype=torch.int64).to(device)
            for rows in (1, 33, 70)]
    weights = torch.randint(-2**62, 2**62, (70,), generator=generator, dtype=torch.int64).to(device) | 1
    got = _run(kernel, device, [t.data_ptr() for t in data], [t.shape[0] for t in data], weights)
    expected = torch.stack([(t.sum(dim=1) * weights[: t.shape[0]]).sum() for t in data])
    ok = got is not None and torch.equal(got, expected)
    with _lock:
        if ok:
            _state["verified"].add(device)
        elif _state["failed"] is None:
            _state["kernel"], _state["failed"] = None, "its totals differ from torch's on this device"
    return ok


def triton_status() -> str:
    """Whether the Triton path runs: ``"ready"``, ``"not tried"`` or why it does not.

    Example:
        >>> isinstance(triton_status(), str)
        True
    """
    if _state["kernel"] is not None:
        return "ready"
    return _state["failed"] or "not tried"
