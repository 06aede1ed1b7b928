"""SHA-256 digests that identify things across processes: JSON payloads (cache and resume keys),
index sets (forget sets, training subsets) and tensor states (weights)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["indices_digest", "json_digest", "state_digest"]


def json_digest(payload: Any) -> str:
    """Hex SHA-256 of ``json.dumps(payload, sort_keys=True)``: equal JSON values, equal digests."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def indices_digest(indices: Sequence[int] | torch.Tensor, n: int | None = None, *,
                   sort: bool = True) -> str:
    """Hex SHA-256 of int64 indices (sorted first unless ``sort=False``), prefixed by ``"n:"``
    when the size ``n`` of the set they index is given (so a forget set of another training set
    never shares a digest)."""
    idx = torch.as_tensor(indices, dtype=torch.int64).flatten()
    if sort:
        idx = idx.sort().values
    h = hashlib.sha256(f"{n}:".encode()) if n is not None else hashlib.sha256()
    h.update(idx.contiguous().numpy().tobytes())
    return h.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the sorted names, dtypes, shapes and bytes of every tensor."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
