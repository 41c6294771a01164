"""Convert an official SLaK release checkpoint (or any file slaknet can read) into slaknet's formats.

The source is read without unpickling arbitrary objects, the raw or EMA state dict is taken out (prefixes
stripped, old key names renamed), the architecture is read from the tensor shapes, and a model is built
and loaded *strictly* from it, so a converted file is known to load. The output is

* ``dense``: a safetensors file of the state dict, or
* ``sparse``: the compact sparse format (:mod:`slaknet.deploy.sparse_format`; masks = non-zero pattern),

optionally reparameterized (``strips`` / ``dense``), with a metadata record of the model and of where it
came from (source file name, size and SHA-256, which weights were taken, the epoch and the training
arguments stored in the file, the time of conversion). ``auto`` picks ``sparse`` when at least 10% of the
conv/linear weights are exact zeros.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from slaknet.errors import ConfigError

__all__ = ["convert_checkpoint", "ConvertResult", "CONVERT_FORMATS", "load_converted_metadata"]

CONVERT_FORMATS = ("auto", "dense", "sparse")
SPARSE_AUTO_THRESHOLD = 0.10
META_KEY = "slaknet"


@dataclass
class ConvertResult:
    """What :func:`convert_checkpoint` wrote."""

    path: str
    format: str
    variant: Optional[str]
    weights: str  # which state dict of the source was taken
    sparsity: float
    source_bytes: int
    file_bytes: int
    summary: str

    def describe(self) -> str:
        return (f"{self.path}: {self.format} ({self.file_bytes / 2**20:.1f} MiB, "
                f"{self.file_bytes / max(self.source_bytes, 1):.2f}x the source), {self.variant or 'custom'}, "
                f"{self.weights} weights, sparsity {self.sparsity:.1%}; {self.summary}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
        return list(v)
    return None


def _provenance(path: str, obj: Any, weights: str) -> Dict[str, Any]:
    from slaknet.deploy.metadata import file_sha256

    rec: Dict[str, Any] = {
        "file": os.path.basename(path), "path": os.path.abspath(path), "bytes": os.path.getsize(path),
        "sha256": file_sha256(path), "weights": weights,
        "converted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if isinstance(obj, Mapping):
        rec["top_level_keys"] = sorted(str(k) for k in obj)[:20]
        for key in ("epoch", "step", "global_step"):
            if isinstance(obj.get(key), (int, float)):
                rec[key] = obj[key]
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        if isinstance(args, Mapping):
            kept = {str(k): _jsonable(v) for k, v in args.items()}
            rec["training_args"] = {k: v for k, v in kept.items() if v is not None}
    return rec


def _which_weights(obj: Any, use_ema: Optional[bool]) -> str:
    from slaknet.checkpoints.reader import EMA_KEYS, RAW_KEYS

    if not isinstance(obj, Mapping) or all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict"
    raw = next((k for k in RAW_KEYS if isinstance(obj.get(k), Mapping)), None)
    ema = next((k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
    if use_ema is True:
        return ema or "?"
    if use_ema is False:
        return raw or "?"
    return raw or ema or "?"


def convert_checkpoint(src: str, dst: str, fmt: str = "auto", model: Optional[str] = None,
                       use_ema: Optional[bool] = None, reparameterize: str = "none",
                       class_names: Optional[Sequence[str]] = None) -> ConvertResult:
    """Convert ``src`` (official release file, state dict, or slaknet file) into ``dst`` (module docstring).

    ``model``: the variant name to build (default: the registered variant whose depths and widths match
    the file). ``dst`` must end in ``.safetensors``.
    """
    from slaknet.deploy.metadata import model_metadata, weight_sparsity
    from slaknet.checkpoints import (describe_state_dict, extract_state_dict, read_checkpoint, save_sparse_checkpoint,
                                     write_safetensors)
    from slaknet.models.factory import create_model, guess_variant, reparameterize_model

    if fmt not in CONVERT_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(CONVERT_FORMATS)}, got {fmt!r}")
    if reparameterize not in ("none", "strips", "dense"):
        raise ConfigError(f"reparameterize must be none, strips or dense, got {reparameterize!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    if not dst.endswith(".safetensors"):
        raise ConfigError(f"the output file must end in .safetensors, got {dst!r}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConfigError("source and destination are the same file")
    obj = read_checkpoint(src)
    weights = _which_weights(obj, use_ema)
    sd = extract_state_dict(obj, use_ema=use_ema)
    spec = describe_state_dict(sd)
    variant, _ = guess_variant(spec)
    name = model or variant or "slak_tiny"
    net = create_model(name, checkpoint=src, use_ema=use_ema)  # strict load: the file is known to fit
    if reparameterize != "none":
        net = reparameterize_model(net, merge_dense=reparameterize == "dense", inplace=True)
    sparsity = weight_sparsity(net)
    if fmt == "auto":
        fmt = "sparse" if sparsity >= SPARSE_AUTO_THRESHOLD else "dense"
    source = _provenance(src, obj, weights)
    previous: Dict[str, Any] = {}
    if src.endswith(".safetensors"):  # a slaknet file: keep its record (class names, original source)
        previous = load_converted_metadata(src)
        if previous.get("source"):
            source["previous"] = previous["source"]
    if class_names is None and previous.get("class_names"):
        class_names = previous["class_names"]
    meta = model_metadata(net, class_names=class_names, source=source, architecture=spec.summary())
    if variant is None:
        meta["variant"] = name
    if fmt == "sparse":
        save_sparse_checkpoint(dst, net, metadata=meta)
    else:
        write_safetensors(net.state_dict(), dst, {META_KEY: json.dumps(meta, default=str)})
    return ConvertResult(path=dst, format=fmt, variant=meta.get("variant"), weights=weights, sparsity=sparsity,
                         source_bytes=os.path.getsize(src), file_bytes=os.path.getsize(dst),
                         summary=spec.summary())


def load_converted_metadata(path: str) -> Dict[str, Any]:
    """The model/provenance record of a converted or exported safetensors file (dense or sparse)."""
    from slaknet.checkpoints import read_safetensors_metadata

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    meta = read_safetensors_metadata(path)
    raw = meta.get("model") if meta.get("format") == "slaknet-sparse" else meta.get(META_KEY)
    return json.loads(raw) if raw else {}
