"""Copies and byte comparison of many tensors at once: the store's reference copies and the save path's
device-to-host copies.

Plain torch. Comparing bytes (not values) makes NaN equal to NaN and -0.0 differ from 0.0: a reload must give
the same bits. Tensors are grouped per device and dtype and handled in one concatenation, so a model with
thousands of small buffers costs a few kernel launches, not thousands.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch

__all__ = ["host_copies", "same_bytes"]


def same_bytes(pairs: list[tuple[torch.Tensor, torch.Tensor]], cache: Optional[dict] = None) -> list[bool]:
    """For each ``(a, b)``: True when both hold exactly the same bits (NaN == NaN; shape and dtype must match).

    All pairs of one device are compared at once: one concatenation of each side and one host sync, not one
    comparison (and, on an accelerator, one sync) per tensor. On the CPU a single ``torch.equal`` settles the
    common case where nothing differs; only then are the pairs told apart. ``cache``: a dict of the caller's
    (a store's) where the segment layout of the last comparisons is kept for the next.

    Example:
        >>> same_bytes([(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")])),
        ...             (torch.zeros(2), torch.ones(2))])
        [True, False]
    """
    result = [False] * len(pairs)
    groups: Dict[torch.device, list[int]] = {}
    for i, (a, b) in enumerate(pairs):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            continue
        if a.numel() == 0:
            result[i] = True
        else:
            groups.setdefault(a.device, []).append(i)
    for device, indices in groups.items():
        lefts = [_as_bytes(pairs[i][0]) for i in indices]
        left, right = torch.cat(lefts), torch.cat([_as_bytes(pairs[i][1]) for i in indices])
        if device.type == "cpu" and torch.equal(left, right):
            for i in indices:
                result[i] = True
            continue
        sizes = tuple(t.numel() for t in lefts)
        counts = torch.zeros(len(indices), dtype=torch.int32, device=device)
        counts.index_add_(0, _segment_ids(device, sizes, cache), (left != right).to(torch.int32))
        for i, n in zip(indices, counts.tolist()):
            result[i] = n == 0
    return result


def _segment_ids(device: torch.device, sizes: tuple[int, ...], cache: Optional[dict]) -> torch.Tensor:
    """``[0]*sizes[0] + [1]*sizes[1] + ...`` on ``device``, kept in ``cache`` (a store's own: a module-level one
    would keep dropped models' layouts) for the next call with the same layout."""
    key = (device, sizes)
    ids = cache.get(key) if cache is not None else None
    if ids is None:
        counts = torch.tensor(sizes, device=device)
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts, output_size=sum(sizes))
        if cache is not None:
            if len(cache) > 8:
                cache.clear()
            cache[key] = ids
    return ids


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # A flat uint8 view (one view op when contiguous): bitwise, so NaN == NaN and -0.0 != 0.0.
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.view(-1).view(torch.uint8)


class _Slot:
    """A base value kept inside a flat copy of many (see :func:`_flat_copies`): no tensor object until asked."""

    __slots__ = ("flat", "offset", "numel", "shape")

    def __init__(self, flat: torch.Tensor, offset: int, numel: int, shape: torch.Size):
        self.flat, self.offset, self.numel, self.shape = flat, offset, numel, shape

    def tensor(self) -> torch.Tensor:
        return self.flat.narrow(0, self.offset, self.numel).view(self.shape)

    def fits(self, live: torch.Tensor) -> bool:
        flat = self.flat
        return live.dtype == flat.dtype and live.device == flat.device and live.shape == self.shape

    def __deepcopy__(self, memo: dict) -> _Slot:  # a deep-copied store gets its own flat copy, shared by its slots
        import copy

        return _Slot(copy.deepcopy(self.flat, memo), self.offset, self.numel, self.shape)


def _flat_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, Union[torch.Tensor, _Slot]]:
    """Copies of ``tensors``: one concatenation per device and dtype, a :class:`_Slot` into it per tensor."""
    groups: Dict[tuple, list[str]] = {}
    for key, tensor in tensors.items():
        groups.setdefault((tensor.device, tensor.dtype), []).append(key)
    copies: dict[str, Union[torch.Tensor, _Slot]] = {}
    for keys in groups.values():
        parts = [tensors[k].detach() for k in keys]
        if len(parts) == 1:
            copies[keys[0]] = parts[0].clone()
            continue
        flat = torch.cat([t.reshape(-1) for t in parts])
        offset = 0
        for key, part in zip(keys, parts):
            numel = part.numel()
            copies[key] = _Slot(flat, offset, numel, part.shape)
            offset += numel
    return copies


def _changed_in_group(members: list, cache: Optional[dict] = None) -> list:
    """``(key, place)`` of the members whose live value differs from its slot; all slots of one flat copy.

    When the members are the whole flat copy, in order, the live values are concatenated and compared with it
    in one go; otherwise each member is compared with its slot.
    """
    flat = members[0][2].flat
    whole = members[0][2].offset == 0 and sum(slot.numel for _, _, slot in members) == flat.numel()
    if whole and all(a[2].offset + a[2].numel == b[2].offset for a, b in zip(members, members[1:])):
        live = torch.cat([place.tensor.detach().reshape(-1) for _, place, _ in members])
        if torch.equal(_as_bytes(live), _as_bytes(flat)):
            return []
    pairs = [(place.tensor.detach(), slot.tensor()) for _, place, slot in members]
    return [(key, place) for (key, place, _), same in zip(members, same_bytes(pairs, cache)) if not same]


def host_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every accelerator tensor copied to the CPU: one device-to-host copy per device and dtype
    (a concatenation), not one transfer and sync per tensor; CPU tensors are passed through. Each result owns
    its storage.

    Example:
        >>> out = host_copies({"a": torch.ones(2), "b": torch.zeros(1, 3)})
        >>> {k: tuple(v.shape) for k, v in out.items()}
        {'a': (2,), 'b': (1, 3)}
    """
    result = dict(tensors)
    groups: Dict[tuple, list[str]] = {}
    for key, tensor in tensors.items():
        if tensor.device.type != "cpu":
            groups.setdefault((tensor.device, tensor.dtype), []).append(key)
    for keys in groups.values():
        parts = [tensors[k].detach() for k in keys]
        flat = torch.cat([t.reshape(-1) for t in parts]).cpu()
        for key, part, piece in zip(keys, parts, flat.split([t.numel() for t in parts])):
            result[key] = piece.view(part.shape).clone()
    return result
