"""Writing checkpoint files atomically: torch pickles of plain data and safetensors files."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch

from slaknet.io import atomic_path

__all__ = ["save_torch", "write_safetensors"]

PathLike = Union[str, os.PathLike]


def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save`` through :func:`slaknet.io.atomic_path`: the old file stays until the new one is whole."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_safetensors(tensors: Mapping[str, Any], path: PathLike,
                      metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write the tensors of ``tensors`` (other values are skipped) as a safetensors file, atomically.

    Tensors are stored as contiguous CPU copies (safetensors refuses shared or strided storage);
    metadata values are stored as strings, sorted by key, so identical tensors and metadata give identical
    bytes (hash-based reproducibility checks).
    """
    from safetensors.torch import save

    data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    meta = {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    blob = _sorted_header(save(data, metadata=meta))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(blob)


def _sorted_header(blob: bytes) -> bytes:
    """The safetensors bytes with the JSON header's keys sorted (the library writes them in hash order, which
    changes from one process to the next); same length, offsets unchanged (the header may be padded)."""
    import json

    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > n:  # cannot happen for a reordering; keep the library's bytes rather than break the file
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n:]
