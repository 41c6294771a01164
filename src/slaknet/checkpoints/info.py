"""What a checkpoint says about how its model was trained: variant, input size, classes, normalisation.

slaknet's training checkpoints (``checkpoint-*.pth``) hold a ``config`` dict (``model``, ``input_size``,
``data``, ...) and ``classes`` (and, when written by newer versions, ``mean`` / ``std``); its
``model.safetensors`` files hold the same as string metadata; converted / exported / compact sparse files
hold a JSON model record (``class_names``, ``preprocessing``). Official release files hold none of it.
:func:`read_training_info` collects what is there into one :class:`TrainingInfo`; every field may be None.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["TrainingInfo", "read_training_info", "info_from_object", "info_from_safetensors_metadata"]

_RECORD_KEY = "slaknet"  # JSON model record of converted / exported dense safetensors files


@dataclass
class TrainingInfo:
    """Training-time facts stored with a checkpoint (None where the file does not say)."""

    model: Optional[str] = None
    input_size: Optional[int] = None
    classes: Optional[List[str]] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    crop_pct: Optional[float] = None
    data: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # difficulty, data_seed, val_samples, kernel_size, ...

    def get(self, key: str, default: Any = None) -> Any:
        """A field or an ``extra`` entry by name."""
        value = getattr(self, key, None) if key != "extra" else None
        return value if value is not None else self.extra.get(key, default)


def _parse(value: Any) -> Any:
    """Metadata values are strings: JSON where possible, ``None``/empty as None, else the string."""
    if not isinstance(value, str):
        return value
    if value in ("", "None", "null"):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _size(value: Any) -> Optional[int]:
    value = _parse(value)
    if isinstance(value, (list, tuple)) and value:
        value = value[-1]  # (C, H, W) -> W (slaknet trains square inputs)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _floats(value: Any) -> Optional[Tuple[float, ...]]:
    value = _parse(value)
    if isinstance(value, str):
        value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    try:
        out = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else None
    except (TypeError, ValueError):
        return None
    return out if out else None


def _names(value: Any) -> Optional[List[str]]:
    value = _parse(value)
    return [str(c) for c in value] if isinstance(value, (list, tuple)) and value else None


_EXTRA = ("difficulty", "data_seed", "val_samples", "kernel_size", "num_classes")


def _fill(info: TrainingInfo, src: Mapping[str, Any], overwrite: bool = False) -> None:
    """Take the known keys of one flat mapping (config dict or string metadata) into ``info``."""
    def put(name: str, value: Any) -> None:
        if value is not None and (overwrite or getattr(info, name) is None):
            setattr(info, name, value)

    model = _parse(src.get("model"))
    put("model", model if isinstance(model, str) else None)
    put("input_size", _size(src.get("input_size")))
    put("classes", _names(src.get("classes", src.get("class_names"))))
    put("mean", _floats(src.get("mean")))
    put("std", _floats(src.get("std")))
    crop = _parse(src.get("crop_pct"))
    put("crop_pct", float(crop) if isinstance(crop, (int, float)) else None)
    data = _parse(src.get("data"))
    put("data", str(data) if data is not None else None)
    for key in _EXTRA:
        value = _parse(src.get(key))
        if value is not None and (overwrite or key not in info.extra):
            info.extra[key] = value


def _fill_record(info: TrainingInfo, record: Mapping[str, Any]) -> None:
    """A model record (:func:`slaknet.deploy.model_metadata`): variant, class names, preprocessing."""
    _fill(info, {"model": record.get("variant"), "classes": record.get("class_names")})
    prep = record.get("preprocessing")
    if isinstance(prep, Mapping):
        _fill(info, prep)


def info_from_object(obj: Any) -> TrainingInfo:
    """The :class:`TrainingInfo` of a loaded torch checkpoint object (``config``, ``classes``, ``args``)."""
    info = TrainingInfo()
    if not isinstance(obj, Mapping):
        return info
    _fill(info, {k: obj.get(k) for k in ("classes", "mean", "std", "input_size") if k in obj})
    config = obj.get("config")
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    if isinstance(config, Mapping):
        _fill(info, config)
    args = obj.get("args")  # official training checkpoints: an argparse.Namespace
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        _fill(info, {"input_size": args.get("input_size"), "crop_pct": args.get("crop_pct")})
    return info


def info_from_safetensors_metadata(meta: Mapping[str, str]) -> TrainingInfo:
    """The :class:`TrainingInfo` of a safetensors header (trainer metadata, model record, sparse format)."""
    info = TrainingInfo()
    if meta.get("format") == "slaknet-sparse":
        record = _parse(meta.get("model"))
        if isinstance(record, Mapping):
            _fill_record(info, record)
        return info
    _fill(info, meta)
    record = _parse(meta.get(_RECORD_KEY))
    if isinstance(record, Mapping):
        _fill_record(info, record)
    return info


def read_training_info(path: str, obj: Any = None) -> TrainingInfo:
    """The :class:`TrainingInfo` of a checkpoint file (``obj``: the already loaded torch object, if any)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from slaknet.checkpoints.sparse_format import read_safetensors_metadata

        return info_from_safetensors_metadata(read_safetensors_metadata(path))
    if obj is None:
        from slaknet.checkpoints.reader import read_checkpoint

        obj = read_checkpoint(path)
    return info_from_object(obj)

