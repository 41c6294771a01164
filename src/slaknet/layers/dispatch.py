"""What the kernel-choosing layers (depthwise conv, pointwise Linear) share: reading a requested backend
from an argument or an environment variable, and knowing when a tracer is watching (then only plain
PyTorch ops may run, so exported graphs contain standard operators)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from slaknet.errors import ConfigError

__all__ = ["backend_name", "exporting"]


def backend_name(value: Optional[str], env_var: str, choices: Sequence[str], kind: str) -> str:
    """``value`` if given, else ``$env_var``, else 'auto'; normalised, and a one-line ConfigError
    naming where a bad name came from."""
    name = value if value is not None else os.environ.get(env_var, "auto")
    name = (name or "auto").strip().lower()
    if name not in choices:
        source = "backend argument" if value is not None else env_var
        raise ConfigError(f"unknown {kind} backend {name!r} ({source}); choose from {', '.join(choices)}")
    return name


def exporting() -> bool:
    """True while TorchScript / ONNX / torch.export / torch.compile / torch.fx trace the model."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    fx = getattr(torch.fx, "_symbolic_trace", None)
    fx_tracing = getattr(fx, "is_fx_symbolic_tracing", None) or getattr(fx, "is_fx_tracing", None)
    if fx_tracing is not None and fx_tracing():
        return True
    onnx = getattr(torch, "onnx", None)
    if onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)():
        return True
    compiler = getattr(torch, "compiler", None)
    for name in ("is_exporting", "is_compiling"):
        fn = getattr(compiler, name, None)
        if fn is not None and fn():
            return True
    return False
