"""Compact sparse checkpoints: only the kept kernel values, plus a bit-packed mask or an index list.

A trained SLaK model at 40% sparsity stores 40% zeros in every sparse weight. This format writes, for each
sparse tensor, its kept values (in flat C order) and *whichever is smaller* of

* a bit-packed mask (``numel / 8`` bytes), or
* the sorted flat indices of the kept entries in the narrowest unsigned integer type that can hold them
  (uint8 / uint16 / int32 / int64),

and every other tensor unchanged. The container is a plain safetensors file (nothing is ever unpickled);
its string metadata holds the format version, the per-tensor layout and a JSON record of the model
(variant, kernel sizes, width, sparsity, class names, preprocessing, provenance).

Loading restores the dense tensors exactly (``torch.equal``; every kept value bit for bit, a kept ``-0.0``
included; dropped entries come back as ``+0.0``, also where masking by multiplication had left ``-0.0``)
and the masks. When the masks come from a :class:`slaknet.sparse.SparseEngine`, a mask may keep an entry
whose value is exactly zero (a freshly regrown weight); those masks are stored as given, and the engine's
counters and "ever active" record too, so ``engine.load_state_dict(ckpt.engine_state)`` resumes training
exactly. Without an engine, masks are the non-zero pattern of each weight.

``slaknet.read_checkpoint`` (and so ``slaknet.create_model(name, checkpoint=...)``) decodes these files
transparently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from slaknet.checkpoints.writer import write_safetensors
from slaknet.errors import CheckpointError, ConfigError

__all__ = ["save_sparse_checkpoint", "load_sparse_checkpoint", "SparseCheckpoint", "SparseSaveReport",
           "is_sparse_checkpoint", "decode_sparse_tensors", "read_safetensors_metadata", "encode_tensor", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "slaknet-sparse"
FORMAT_VERSION = 1
VALUES = ".__values__"
BITS = ".__maskbits__"
INDICES = ".__indices__"
EVER = ".__everbits__"
PathLike = Union[str, os.PathLike]


def _index_dtype(numel: int) -> torch.dtype:
    if numel <= 2 ** 8:
        return torch.uint8
    if numel <= 2 ** 16:
        return torch.uint16
    if numel <= 2 ** 31:
        return torch.int32
    return torch.int64


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ``ceil(numel / 8)`` bytes (bit i of byte j is entry 8j + i)."""
    flat = mask.detach().reshape(-1).cpu().numpy().astype(bool)
    return torch.from_numpy(np.packbits(flat, bitorder="little").copy())


def _unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    flat = np.unpackbits(bits.cpu().numpy(), count=numel, bitorder="little").astype(bool)
    return torch.from_numpy(flat)


def _nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Entries that are not zero (``-0.0`` counts as zero: masking by multiplication leaves those)."""
    return t != 0


def encode_tensor(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The stored tensors of one sparse weight: values plus bit mask or indices, whichever is smaller."""
    if mask.shape != tensor.shape:
        raise ConfigError(f"mask of {name!r} has shape {tuple(mask.shape)}, tensor has {tuple(tensor.shape)}")
    t = tensor.detach().cpu().contiguous()
    m = mask.detach().cpu().to(torch.bool).reshape(-1)
    outside = _nonzero_mask(t).reshape(-1) & ~m
    if bool(outside.any()):
        raise ConfigError(f"{name!r} has {int(outside.sum())} non-zero values outside its mask; apply the masks "
                          "first (engine.apply_masks()) or pass masks that cover every non-zero weight")
    values = t.reshape(-1)[m].clone()
    numel = m.numel()
    idx_dtype = _index_dtype(numel)
    idx_bytes = int(m.sum()) * torch.empty((), dtype=idx_dtype).element_size()
    bit_bytes = (numel + 7) // 8
    if idx_bytes < bit_bytes:
        idx = m.nonzero().reshape(-1)
        return {name + VALUES: values, name + INDICES: idx.to(torch.int64).to(idx_dtype)}
    return {name + VALUES: values, name + BITS: _pack_bits(m)}


def _decode_one(name: str, info: Mapping[str, Any], stored: Mapping[str, torch.Tensor]):
    shape = tuple(int(s) for s in info["shape"])
    numel = int(np.prod(shape)) if shape else 1
    values = stored.get(name + VALUES)
    if values is None:
        raise CheckpointError(f"sparse checkpoint lacks the values of {name!r}")
    if name + BITS in stored:
        mask = _unpack_bits(stored[name + BITS], numel)
    elif name + INDICES in stored:
        idx = stored[name + INDICES].to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise CheckpointError(f"sparse checkpoint has out-of-range indices for {name!r}")
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[idx] = True
    else:
        raise CheckpointError(f"sparse checkpoint lacks the mask or indices of {name!r}")
    if int(mask.sum()) != values.numel():
        raise CheckpointError(f"sparse checkpoint is inconsistent for {name!r}: {int(mask.sum())} mask entries, "
                              f"{values.numel()} values")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape), mask.reshape(shape)


@dataclass
class SparseCheckpoint:
    """What :func:`load_sparse_checkpoint` returns.

    ``state_dict``: the dense tensors, exactly as saved. ``masks``: name -> bool mask (True = kept) of
    every sparse tensor. ``mask_source``: ``"engine"``, ``"given"`` or ``"nonzero"``. ``metadata``: the
    model record (variant, kernel sizes, sparsity, class names, preprocessing, provenance, ...).
    ``engine_state``: a :meth:`SparseEngine.load_state_dict` input when the engine was saved, else None.
    """

    state_dict: Dict[str, torch.Tensor]
    masks: Dict[str, torch.Tensor]
    mask_source: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    engine_state: Optional[Dict[str, Any]] = None


@dataclass
class SparseSaveReport:
    """Sizes after :func:`save_sparse_checkpoint`: ``dense_bytes`` is the tensor payload stored densely."""

    path: str
    file_bytes: int
    dense_bytes: int
    sparse_tensors: int
    bitmask_tensors: int
    index_tensors: int
    density: float  # kept fraction over the sparse tensors

    @property
    def ratio(self) -> float:
        return self.file_bytes / max(self.dense_bytes, 1)


def _state_of(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):  # a DDP / torch.compile wrapper saves its inner model's names
        from slaknet.checkpoints.reader import normalize_key

        return {normalize_key(k): v for k, v in model_or_state.state_dict().items()}
    if not isinstance(model_or_state, Mapping):
        raise ConfigError(f"expected a model or a state dict, got {type(model_or_state).__name__}")
    return {k: v for k, v in model_or_state.items() if isinstance(v, torch.Tensor)}


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.generic,)):
        return o.item()
    return str(o)


def save_sparse_checkpoint(path: PathLike, model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]], *,
                           engine: Any = None, masks: Optional[Mapping[str, torch.Tensor]] = None,
                           metadata: Optional[Mapping[str, Any]] = None,
                           min_zero_fraction: float = 0.05) -> SparseSaveReport:
    """Write ``model_or_state`` to ``path`` in the compact sparse format (atomically).

    Masks come from ``engine`` (a :class:`slaknet.sparse.SparseEngine`, whose full state is stored so
    training can resume), else from ``masks``, else from the non-zero pattern of every floating weight with
    two or more dimensions that has at least ``min_zero_fraction`` zeros and gets smaller when encoded.
    ``metadata`` (JSON-serialisable) is stored as the model record; see :func:`slaknet.deploy.model_metadata`.
    """
    sd = _state_of(model_or_state)
    engine_json = None
    ever: Dict[str, torch.Tensor] = {}
    if engine is not None:
        state = engine.state_dict()
        chosen = dict(state["masks"])
        ever = dict(state.get("ever_active", {}))
        engine_json = {k: v for k, v in state.items() if k not in ("masks", "ever_active")}
        source = "engine"
    elif masks is not None:
        chosen, source = dict(masks), "given"
    else:
        chosen, source = {}, "nonzero"
        for name, t in sd.items():
            if not t.is_floating_point() or t.dim() < 2:
                continue
            nz = _nonzero_mask(t)
            zero_fraction = 1.0 - float(nz.float().mean())
            if zero_fraction >= min_zero_fraction:
                chosen[name] = nz
    unknown = [n for n in chosen if n not in sd]
    if unknown:
        raise ConfigError(f"mask for {unknown[0]!r}, which is not in the state dict ({len(unknown)} such masks)")

    stored: Dict[str, torch.Tensor] = {}
    layout: Dict[str, Any] = {}
    dense_bytes = kept = total = n_bits = n_idx = 0
    for name, t in sd.items():
        dense_bytes += t.numel() * t.element_size()
        if any(name.endswith(s) for s in (VALUES, BITS, INDICES, EVER)):
            raise ConfigError(f"tensor name {name!r} ends with a reserved suffix")
        if name not in chosen:
            stored[name] = t.detach().cpu().contiguous()
            continue
        enc = encode_tensor(name, t, chosen[name])
        if source == "nonzero":  # only worth it when smaller
            enc_bytes = sum(v.numel() * v.element_size() for v in enc.values())
            if enc_bytes >= t.numel() * t.element_size():
                stored[name] = t.detach().cpu().contiguous()
                continue
        stored.update(enc)
        encoding = "bits" if name + BITS in enc else "indices"
        n_bits += encoding == "bits"
        n_idx += encoding == "indices"
        layout[name] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "encoding": encoding}
        kept += enc[name + VALUES].numel()
        total += t.numel()
        if name in ever:
            e = ever[name].to(torch.bool) | chosen[name].detach().cpu().to(torch.bool)
            if not torch.equal(e, chosen[name].detach().cpu().to(torch.bool)):
                stored[name + EVER] = _pack_bits(e)
                layout[name]["ever"] = True

    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "mask_source": source,
        "tensors": json.dumps(layout), "model": json.dumps(dict(metadata or {}), default=_json_default),
    }
    if engine_json is not None:
        meta["engine"] = json.dumps(engine_json, default=_json_default)
    path = os.fspath(path)
    write_safetensors(stored, path, meta)
    return SparseSaveReport(path=path, file_bytes=os.path.getsize(path), dense_bytes=dense_bytes,
                            sparse_tensors=len(layout), bitmask_tensors=n_bits, index_tensors=n_idx,
                            density=kept / total if total else 1.0)


def read_safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file's header (one-line error when it is not one)."""
    from safetensors import safe_open

    path = os.fspath(path)

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def is_sparse_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a slaknet compact sparse checkpoint (reads only the header)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        return read_safetensors_metadata(path).get("format") == FORMAT_NAME
    except CheckpointError:
        return False


def decode_sparse_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> SparseCheckpoint:
    """Decode the raw tensors and metadata of a compact sparse file (see :func:`load_sparse_checkpoint`)."""
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError("not a slaknet compact sparse checkpoint (no 'format' metadata)")
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"sparse checkpoint format version {version} is newer than this slaknet "
                              f"supports ({FORMAT_VERSION}); upgrade slaknet")
    try:
        layout = json.loads(metadata.get("tensors", "{}"))
        model_meta = json.loads(metadata.get("model", "{}"))
        engine_json = json.loads(metadata["engine"]) if "engine" in metadata else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"sparse checkpoint metadata is not valid JSON: {exc}") from exc
    out: Dict[str, torch.Tensor] = {}
    masks: Dict[str, torch.Tensor] = {}
    ever: Dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not any(key.endswith(s) for s in (VALUES, BITS, INDICES, EVER)):
            out[key] = t
    for name, info in layout.items():
        dense, mask = _decode_one(name, info, tensors)
        out[name] = dense
        masks[name] = mask
        if info.get("ever") and name + EVER in tensors:
            ever[name] = _unpack_bits(tensors[name + EVER], mask.numel()).reshape(mask.shape)
        else:
            ever[name] = mask.clone()
    engine_state = None
    if engine_json is not None:
        engine_state = dict(engine_json)
        engine_state["masks"] = masks
        engine_state["ever_active"] = ever
    return SparseCheckpoint(state_dict=out, masks=masks, mask_source=metadata.get("mask_source", "nonzero"),
                            metadata=model_meta, engine_state=engine_state)


def load_sparse_checkpoint(path: PathLike) -> SparseCheckpoint:
    """Read a compact sparse checkpoint: dense state dict, masks, model metadata and engine state."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    metadata = read_safetensors_metadata(path)
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is a safetensors file but not a slaknet compact sparse checkpoint")
    return decode_sparse_tensors(load_file(path, device="cpu"), metadata)
