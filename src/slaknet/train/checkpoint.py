"""Training checkpoints: atomic writes, weights-only reads, RNG state capture, safetensors export.

A training checkpoint is a plain dict of tensors and Python scalars / lists / dicts (loadable with
``torch.load(weights_only=True)``): ``model``, ``model_ema``, ``optimizer``, ``scheduler``, ``scaler``,
``sparse`` (engine state: masks, counters), ``epoch`` / ``step`` / ``batch_in_epoch``, ``rng`` and
``config`` (the resolved run configuration), ``history`` (per-epoch records), ``best``.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from slaknet.checkpoints.reader import first_line
from slaknet.checkpoints.writer import save_torch, write_safetensors
from slaknet.errors import CheckpointError

__all__ = ["atomic_save", "load_training_checkpoint", "capture_rng", "restore_rng", "export_safetensors"]


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` onto ``path``
    (:func:`slaknet.checkpoints.save_torch`): a crash mid-write never leaves a truncated checkpoint."""
    save_torch(obj, path)


def load_training_checkpoint(path: str, lazy: bool = False) -> Dict[str, Any]:
    """Read a slaknet training checkpoint (weights only); one-line errors for missing / foreign files.

    ``lazy``: memory-map the file instead of reading it, for callers that only look at its settings (the
    configuration of ``--resume``): the tensors are then read once, by the run that restores them.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (check --resume)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
        except RuntimeError:
            if not lazy:
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file: read it
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable weights-only checkpoint ({first_line(exc)})") from exc
    if not isinstance(obj, dict) or "model" not in obj or "optimizer" not in obj:
        raise CheckpointError(f"{path} is not a slaknet training checkpoint (no model/optimizer state); "
                              "use --finetune to start from plain or official weights")
    return obj


def capture_rng() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as weights-only-safe values."""
    py = random.getstate()
    npst = np.random.get_state()
    out: Dict[str, Any] = {
        "python_version": int(py[0]), "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2],
        "numpy_keys": torch.from_numpy(npst[1].astype(np.int64)), "numpy_pos": int(npst[2]),
        "numpy_has_gauss": int(npst[3]), "numpy_gauss": float(npst[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def export_safetensors(state_dict: Mapping[str, torch.Tensor], path: str,
                       metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors (contiguous CPU copies, atomic; :func:`slaknet.checkpoints.write_safetensors`)."""
    write_safetensors(state_dict, path, metadata)
