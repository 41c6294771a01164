"""Reading SLaK checkpoints (official releases and slaknet's own) safely, and fitting models to them.

Official files store neither kernel sizes nor width, and evaluating a checkpoint with the wrong kernel
settings silently fails in the research code. Here the architecture is read off the tensor shapes
(:func:`describe_state_dict`), the matching model can be built from it, and a mismatch is reported as
"the file looks like X, the model is Y" instead of a wall of missing keys.

Files are read with ``torch.load(weights_only=True)`` (plus ``argparse.Namespace``, which official
training checkpoints carry as ``args``) or as safetensors: nothing arbitrary is ever unpickled.
"""
from __future__ import annotations

import argparse
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from slaknet.errors import CheckpointError

__all__ = [
    "ArchSpec", "read_checkpoint", "extract_state_dict", "describe_state_dict", "describe_model",
    "load_checkpoint", "RENAMED_KEYS",
]

PathLike = Union[str, os.PathLike]

# Older releases used other names for the same tensors.
RENAMED_KEYS = ((".large_kernel.Decom1.", ".large_kernel.LoRA1."), (".large_kernel.Decom2.", ".large_kernel.LoRA2."))
# Where release files keep the state dict, in order of preference for raw and EMA weights.
RAW_KEYS = ("model", "state_dict")
EMA_KEYS = ("model_ema", "state_dict_ema")


@dataclass
class ArchSpec:
    """The architecture a SLaK state dict implies (everything needed to build a model that fits it)."""

    depths: Tuple[int, ...]
    widths: Tuple[int, ...]
    kernel_sizes: Tuple[int, ...]
    small_kernel: Optional[int]
    decompose: bool
    num_classes: int
    in_chans: int
    layer_scale: bool = True
    reparameterized: Optional[str] = None  # None, "strips" or "dense"
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        form = "decomposed" if self.decompose else "undecomposed"
        if self.small_kernel is None:
            form = "single-kernel"
        rep = f", reparameterized ({self.reparameterized})" if self.reparameterized else ""
        return (f"{len(self.depths)} stages, depths {'/'.join(map(str, self.depths))}, widths "
                f"{'/'.join(map(str, self.widths))}, kernels {'/'.join(map(str, self.kernel_sizes))} "
                f"(N={self.small_kernel}, {form}{rep}), {self.num_classes} classes, {self.in_chans} input channels")

    def differences(self, other: "ArchSpec") -> List[str]:
        out = []
        for name in ("depths", "widths", "kernel_sizes", "small_kernel", "decompose", "num_classes",
                     "in_chans", "layer_scale", "reparameterized"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: file {a} vs model {b}")
        return out


def read_checkpoint(path: PathLike) -> Any:
    """Load a checkpoint file without unpickling arbitrary objects (``.safetensors`` or torch zip/pickle)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        from slaknet.deploy.sparse_format import is_sparse_checkpoint, load_sparse_checkpoint

        if is_sparse_checkpoint(path):  # slaknet's compact sparse format: decoded to the dense tensors
            return load_sparse_checkpoint(path).state_dict
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read as a weights-only PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). slaknet never unpickles arbitrary objects; "
            "re-save the state dict alone (torch.save(model.state_dict(), ...)) or as safetensors") from exc


def extract_state_dict(obj: Any, use_ema: Optional[bool] = None) -> "OrderedDict[str, torch.Tensor]":
    """The model state dict inside a release-format object, with prefixes stripped and old names renamed.

    ``use_ema``: True takes EMA weights (``model_ema``/``state_dict_ema``), False the raw ones, None the raw
    ones when present, else EMA.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict or a dict holding one, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
        if use_ema:
            raise CheckpointError("EMA weights were requested, but the file holds a single plain state dict")
    else:
        raw = next((k for k in RAW_KEYS if isinstance(obj.get(k), Mapping)), None)
        ema = next((k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
        if use_ema is True:
            key = ema
            if key is None:
                raise CheckpointError(f"EMA weights were requested, but the file has none (keys: {sorted(obj)[:10]})")
        elif use_ema is False:
            key = raw
            if key is None:
                raise CheckpointError(f"raw weights were requested, but the file has none (keys: {sorted(obj)[:10]})")
        else:
            key = raw or ema
        if key is None:
            raise CheckpointError("no state dict found: expected tensors at the top level or under one of "
                                  f"{RAW_KEYS + EMA_KEYS}; the file has keys {sorted(map(str, obj))[:10]}")
        sd = obj[key]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        for old, new in RENAMED_KEYS:
            k = k.replace(old, new)
        out[k] = v
    return out


_BLOCK_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.")


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> ArchSpec:
    """Read the SLaK architecture off a state dict's keys and shapes."""
    stem = sd.get("downsample_layers.0.0.weight")
    if stem is None or stem.dim() != 4:
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(f"this does not look like a SLaK state dict (no downsample_layers.0.0.weight; "
                              f"first keys: {sample})")
    blocks: Dict[int, set] = {}
    for k in sd:
        m = _BLOCK_RE.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError("state dict has no contiguous stages.{i}.{j} blocks")
    depths = tuple(max(blocks[i]) + 1 for i in range(len(blocks)))
    # per stage: large kernel M, small kernel N (None for a single M x M kernel), decomposed or not
    widths, kernels, smalls, decomposed, reparam, single = [], [], set(), set(), set(), []
    for i in range(len(depths)):
        p = f"stages.{i}.0.large_kernel."
        if f"{p}LoRA1.conv.weight" in sd:
            m, n = sd[f"{p}LoRA1.conv.weight"].shape[-2:]
            decomposed.add(True)
            smalls.add(int(n))
        elif f"{p}lkb_strip1.weight" in sd:
            m, n = sd[f"{p}lkb_strip1.weight"].shape[-2:]
            decomposed.add(True)
            smalls.add(int(n))
            reparam.add("strips")
        elif f"{p}lkb_origin.conv.weight" in sd:
            m = sd[f"{p}lkb_origin.conv.weight"].shape[-1]
            small = sd.get(f"{p}small_conv.conv.weight")
            if small is not None:
                decomposed.add(False)
                smalls.add(int(small.shape[-1]))
            else:
                single.append((i, int(m)))
        elif f"{p}lkb_reparam.weight" in sd:
            m = sd[f"{p}lkb_reparam.weight"].shape[-1]
            reparam.add("dense")
        else:
            raise CheckpointError(f"stage {i} has no recognisable large-kernel weights under '{p}'")
        kernels.append(int(m))
        widths.append(int(sd[f"stages.{i}.0.pwconv1.weight"].shape[1]))
    notes = []
    if len(smalls) > 1 or len(decomposed) > 1:
        raise CheckpointError(f"stages disagree on small kernel / decomposition: N={smalls}, decomposed={decomposed}")
    small_kernel = smalls.pop() if smalls else None
    # a stage whose M <= N has a single M x M kernel in any form; with M > N it would not
    bad = [f"stage {i} (M={m})" for i, m in single if small_kernel is not None and m > small_kernel]
    if bad:
        raise CheckpointError(f"{', '.join(bad)} has a single kernel although other stages use N={small_kernel}")
    if reparam == {"dense"}:
        notes.append("merged dense kernels: the original small kernel and decomposition cannot be recovered")
    head = sd.get("head.weight")
    return ArchSpec(
        depths=depths, widths=tuple(widths), kernel_sizes=tuple(kernels),
        small_kernel=small_kernel, decompose=decomposed.pop() if decomposed else False,
        num_classes=int(head.shape[0]) if head is not None else 0, in_chans=int(stem.shape[1]),
        layer_scale="stages.0.0.gamma" in sd, reparameterized=("strips" if "strips" in reparam else "dense") if reparam else None, notes=notes)


def describe_model(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a built model (via its state dict, so both sides are read the same way)."""
    return describe_state_dict(model.state_dict())


def load_checkpoint(model: nn.Module, path_or_state: Union[PathLike, Mapping[str, Any]],
                    use_ema: Optional[bool] = None, strict: bool = True) -> Dict[str, List[str]]:
    """Load official or slaknet weights into ``model``; raise a readable error if they do not fit.

    Returns ``{"missing_keys": [...], "unexpected_keys": [...]}`` (both empty for a strict load).
    """
    obj = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    sd = extract_state_dict(obj, use_ema=use_ema)
    file_spec = describe_state_dict(sd)
    model_spec = describe_model(model)
    diffs = file_spec.differences(model_spec)
    if diffs and (strict or any(not d.startswith("num_classes") for d in diffs)):
        hint = ("build the matching model with slaknet.create_model(name, checkpoint=path)"
                if not file_spec.reparameterized else
                "build the model, call slaknet.reparameterize_model on it, then load")
        raise CheckpointError("checkpoint does not fit the model.\n  file:  " + file_spec.summary() +
                              "\n  model: " + model_spec.summary() + "\n  differences: " + "; ".join(diffs) +
                              f"\n  hint: {hint}")
    if not strict:  # e.g. a new classifier: skip tensors whose shapes differ
        own = model.state_dict()
        sd = OrderedDict((k, v) for k, v in sd.items() if k not in own or own[k].shape == v.shape)
    result = model.load_state_dict(sd, strict=strict)
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}
