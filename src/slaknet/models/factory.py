"""``slaknet.create_model``: build a registered SLaK variant, optionally fitted to a checkpoint."""
from __future__ import annotations

import copy
import difflib
import logging
import os
from typing import Any, List, Mapping, Optional, Tuple, Union

import timm
import torch.nn as nn

from slaknet.checkpoints.info import TrainingInfo, read_training_info
from slaknet.errors import CheckpointError, ConfigError
from slaknet.layers import LargeKernelConv
from slaknet.models.checkpoint import (ArchSpec, describe_model, describe_state_dict, extract_state_dict,
                                       load_checkpoint, read_checkpoint)
from slaknet.models.slak import MODEL_SPECS

__all__ = ["create_model", "list_models", "reparameterize_model", "guess_variant", "architecture_name",
           "check_variant", "model_for_state_dict", "model_from_checkpoint", "set_pretrained_cfg"]

log = logging.getLogger(__name__)
_WIDTH_FACTORS = (1.0, 1.3, 1.5, 2.0)


def list_models() -> List[str]:
    """Names of the SLaK variants registered with timm."""
    return list(MODEL_SPECS)


def _single_kernel(name: str) -> bool:
    """Whether variant ``name`` has one M x M kernel per block (the ``_k7`` twins) rather than SLaK's branches."""
    return "small_kernel" in MODEL_SPECS[name] and MODEL_SPECS[name]["small_kernel"] is None


def _same_kind(name: str, spec: ArchSpec) -> bool:
    """Same block kind (single kernel vs large + small branches); a dense-merged file cannot tell."""
    return spec.reparameterized == "dense" or _single_kernel(name) == (spec.small_kernel is None)


def guess_variant(spec: ArchSpec) -> Tuple[Optional[str], Optional[float]]:
    """The registered variant and width factor whose depths, widths and block kind equal the checkpoint's (the
    depths and widths alone where no variant has its block kind), if any."""
    fits = []
    for name, s in MODEL_SPECS.items():
        if tuple(s["depths"]) != spec.depths:
            continue
        for wf in _WIDTH_FACTORS:
            if tuple(int(d * wf) for d in s["dims"]) == spec.widths:
                fits.append((name, wf))
                break
    for name, wf in fits:
        if _same_kind(name, spec):
            return name, wf
    return fits[0] if fits else (None, None)


def architecture_name(spec: ArchSpec) -> str:
    """An honest name for the architecture of ``spec``: the registered variant it equals (with its width
    factor and, when they differ from the variant's, its kernel sizes), else "custom SLaK (...)"."""
    variant, wf = guess_variant(spec)
    kernels = "/".join(map(str, spec.kernel_sizes))
    if variant is None:
        return (f"custom SLaK (depths {'/'.join(map(str, spec.depths))}, widths "
                f"{'/'.join(map(str, spec.widths))}, kernels {kernels})")
    name = variant if wf == 1.0 else f"{variant} (width {wf:g})"
    default = MODEL_SPECS[variant].get("kernel_size")
    if default is not None and tuple(default) != tuple(spec.kernel_sizes):
        name += f", kernels {kernels}"
    return name


def check_variant(name: str, spec: ArchSpec, source: str = "the checkpoint") -> None:
    """Raise a one-line :class:`CheckpointError` unless ``spec`` is variant ``name`` (any width factor)."""
    if name not in MODEL_SPECS:
        create_model(name)  # the one-line "unknown model" error with suggestions
    depths = tuple(MODEL_SPECS[name]["depths"])
    widths_fit = any(tuple(int(d * wf) for d in MODEL_SPECS[name]["dims"]) == spec.widths for wf in _WIDTH_FACTORS)
    if depths != spec.depths or not widths_fit or not _same_kind(name, spec):
        raise CheckpointError(f"{source} does not fit --model {name}: it looks like {architecture_name(spec)}; "
                              "leave --model out to use the checkpoint's own architecture")


def create_model(name: str, checkpoint: Optional[Union[str, os.PathLike]] = None,
                 use_ema: Optional[bool] = None, **overrides: Any) -> nn.Module:
    """Build ``name`` (e.g. ``"slak_tiny"``) with keyword ``overrides`` of its defaults.

    With ``checkpoint``, the architecture (depths, widths, kernel sizes, N, decomposition, classes, and
    reparameterized form) is read from the file's tensor shapes, the model is built to match, and the
    weights are loaded strictly. Explicit ``overrides`` win over what the file implies, so a conflicting
    override ends in an error that describes both sides. ``use_ema`` picks EMA or raw weights.
    """
    if name not in MODEL_SPECS:
        close = difflib.get_close_matches(name, list(MODEL_SPECS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint} (available: {', '.join(MODEL_SPECS)})")
    if checkpoint is None:
        return _build(name, **overrides)
    path = os.fspath(checkpoint)
    obj = read_checkpoint(path)
    sd = extract_state_dict(obj, use_ema=use_ema)
    check_variant(name, describe_state_dict(sd), source=path)
    model = model_for_state_dict(name, sd, **overrides)
    set_pretrained_cfg(model, read_training_info(path, obj))
    log.info("loaded %s: %s", checkpoint, describe_model(model).summary())
    return model


def set_pretrained_cfg(model: nn.Module, info: TrainingInfo) -> None:
    """Make ``model.pretrained_cfg`` (what timm's ``resolve_data_config`` reads) say what the checkpoint was
    trained with: input size, classes, normalisation, crop."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    in_chans = int(cfg.get("input_size", (3,))[0])
    if info.input_size:
        cfg["input_size"] = (in_chans, int(info.input_size), int(info.input_size))
    if info.mean is not None and info.std is not None:
        cfg["mean"], cfg["std"] = tuple(info.mean), tuple(info.std)
    if info.crop_pct is not None:
        cfg["crop_pct"] = float(info.crop_pct)
    cfg["num_classes"] = int(getattr(model, "num_classes", cfg.get("num_classes", 0)) or 0)
    if info.classes:
        cfg["label_names"] = tuple(info.classes)
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg


def model_for_state_dict(name: str, sd: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Build a model of the architecture ``sd`` implies (base variant ``name``) and load ``sd`` strictly."""
    spec = describe_state_dict(sd)
    variant, wf = guess_variant(spec)
    arch = dict(depths=spec.depths, kernel_size=spec.kernel_sizes, num_classes=spec.num_classes,
                in_chans=spec.in_chans, layer_scale_init_value=1e-6 if spec.layer_scale else 0.0)
    if variant is not None:
        arch.update(dims=MODEL_SPECS[variant]["dims"], width_factor=wf)
        if variant != name:
            log.warning("checkpoint looks like %s (width %s), not %s: building that architecture", variant, wf, name)
    else:
        arch.update(dims=spec.widths, width_factor=1.0)
    if spec.reparameterized != "dense":  # merged kernels no longer tell N or the decomposition
        arch.update(small_kernel=spec.small_kernel, decompose=spec.decompose)
    arch.update(overrides)
    model = _build(variant or name, **arch)
    if spec.reparameterized:
        reparameterize_model(model, merge_dense=spec.reparameterized == "dense", inplace=True)
    load_checkpoint(model, sd, strict=True)
    return model


def model_from_checkpoint(checkpoint: Union[str, os.PathLike], name: Optional[str] = None,
                          use_ema: Optional[bool] = None) -> Tuple[nn.Module, TrainingInfo, str]:
    """``(model, training info, architecture name)`` for a checkpoint file, for the command-line tools.

    ``name`` given: the file must be that variant (any width factor), else a one-line
    :class:`CheckpointError`. Not given: the architecture is read from the file and named honestly
    (:func:`architecture_name`). The file is read once.
    """
    path = os.fspath(checkpoint)
    obj = read_checkpoint(path)
    info = read_training_info(path, obj)
    sd = extract_state_dict(obj, use_ema=use_ema)
    spec = describe_state_dict(sd)
    if name is not None:
        check_variant(name, spec, source=path)
    base = name or guess_variant(spec)[0] or (info.model if info.model in MODEL_SPECS else None) or "slak_tiny"
    model = model_for_state_dict(base, sd)
    set_pretrained_cfg(model, info)
    return model.eval(), info, architecture_name(spec)


def _build(name: str, **kwargs: Any) -> nn.Module:
    # the registered entry point directly: timm.create_model drops None-valued keywords, which would
    # turn small_kernel=None (a single M x M kernel) back into the default N
    return timm.models.model_entrypoint(name)(pretrained=False, **kwargs)


def reparameterize_model(model: nn.Module, merge_dense: bool = False, inplace: bool = False) -> nn.Module:
    """Fold every large-kernel layer into its inference form (see ``LargeKernelConv.reparameterize``).

    Equivalent to ``timm.utils.reparameterize_model`` for the default lean form; ``merge_dense`` merges
    each layer into one M x M kernel instead. Returns the (copied unless ``inplace``) model in eval mode.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, LargeKernelConv):
            module.reparameterize(merge_dense=merge_dense)
    return model.eval()
