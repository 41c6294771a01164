"""Which weights the sparse engine manages (the "sparse candidates")."""
from __future__ import annotations

import fnmatch
from typing import Callable, List, Sequence, Tuple, Union

import torch.nn as nn

from slaknet.checkpoints.schema import LARGE_BRANCHES
from slaknet.errors import ConfigError

__all__ = ["ParamFilter", "select_parameters", "unwrap_model"]

# a user filter: glob patterns on parameter names, or predicate(name, module, param) -> bool
ParamFilter = Union[None, str, Sequence[str], Callable[[str, nn.Module, nn.Parameter], bool]]

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_STRIP_NAMES = LARGE_BRANCHES  # LoRA1, LoRA2, lkb_origin (the shared branch-name schema)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (never a copy)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def _is_strip(module_name: str, root: nn.Module) -> bool:
    """True for the conv of a LargeKernelConv's LoRA1 / LoRA2 / lkb_origin branch."""
    from slaknet.layers.large_kernel import LargeKernelConv

    parts = module_name.split(".")
    # <lk>.<branch>.conv ; <lk> must be a LargeKernelConv
    if len(parts) < 3 or parts[-1] != "conv" or parts[-2] not in _STRIP_NAMES:
        return False
    parent = root.get_submodule(".".join(parts[:-2])) if len(parts) > 2 else root
    return isinstance(parent, LargeKernelConv)


def _match(flt: ParamFilter, name: str, module: nn.Module, param: nn.Parameter) -> bool:
    if flt is None:
        return False
    if callable(flt):
        return bool(flt(name, module, param))
    patterns = [flt] if isinstance(flt, str) else list(flt)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_parameters(model: nn.Module, layers: str = "all", include: ParamFilter = None,
                      exclude: ParamFilter = None) -> List[Tuple[str, nn.Module, nn.Parameter]]:
    """Return ``(name, module, weight)`` for every weight the engine should make sparse.

    Args:
        model: the (unwrapped) model.
        layers: ``"all"``: every conv and linear weight (what the paper counts); ``"large_kernel"``: only
            the large-kernel strips / kernels of :class:`~slaknet.layers.LargeKernelConv`
            (``LoRA1``, ``LoRA2``, ``lkb_origin``); ``"none"``: nothing unless ``include`` adds it.
        include: extra weights (glob patterns on parameter names, or a predicate ``(name, module, param)``).
            With ``layers="none"`` it is the whole selection; it may name any parameter of 2+ dims.
        exclude: weights to leave dense (patterns or predicate), applied last.
    """
    if layers not in ("all", "large_kernel", "none"):
        raise ConfigError(f"sparse layers must be 'all', 'large_kernel' or 'none', got {layers!r}")
    out: List[Tuple[str, nn.Module, nn.Parameter]] = []
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(param) in seen or not param.requires_grad:
                continue
            chosen = False
            if p_name == "weight" and isinstance(module, _LAYER_TYPES) and param.dim() >= 2:
                if layers == "all":
                    chosen = True
                elif layers == "large_kernel":
                    chosen = _is_strip(mod_name, model)
            if not chosen and include is not None and param.dim() >= 2:
                chosen = _match(include, full, module, param)
            if chosen and exclude is not None and _match(exclude, full, module, param):
                chosen = False
            if chosen:
                seen.add(id(param))
                out.append((full, module, param))
    return out


def parse_filter(text: Union[None, str, Sequence[str]]) -> ParamFilter:
    """Comma-separated glob patterns from a command line, or a list of them (``None`` / empty: no filter)."""
    if not text:
        return None
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    return [t.strip() for t in items if t.strip()] or None
