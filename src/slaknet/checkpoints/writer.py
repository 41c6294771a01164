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
    metadata values are stored as strings.
    """
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    meta = {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(data, tmp, metadata=meta)
