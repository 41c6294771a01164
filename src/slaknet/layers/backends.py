"""Registries of the interchangeable kernels behind slaknet's depthwise conv and its 1x1 (Linear) GEMMs.

A backend is a small record: a name, when it applies, the functions that compute, and hints for ``auto``
(which kinds of call it competes in, on which devices). ``SLAKNET_DWCONV`` / ``SLAKNET_LINEAR`` accept every
registered name, ``slaknet bench --backends`` offers them as arms, and ``auto`` times the registered
candidates against ``plain`` (:mod:`slaknet.layers.autotune`). Adding a kernel (e.g. a GPU one) is one
file that builds a record and calls :func:`register_dwconv_backend` / :func:`register_gemm_backend`;
the built-in ones live in :mod:`slaknet.layers.dwconv_backends` and :mod:`slaknet.layers.pointwise`.

This module only holds the records; it imports no kernel code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from slaknet.errors import ConfigError

__all__ = ["DWConvBackend", "GemmBackend", "register_dwconv_backend", "unregister_dwconv_backend",
           "dwconv_backend", "dwconv_backends", "register_gemm_backend", "unregister_gemm_backend",
           "gemm_backend", "gemm_backends", "registry_version", "KINDS"]

# the two kinds of call auto decides separately: no-grad forward, and forward + both gradients
KINDS: FrozenSet[str] = frozenset({"forward", "train"})

Padding = Tuple[int, int]
ConvFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Padding], torch.Tensor]
WeightGradFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Padding], torch.Tensor]
InputGradFn = Callable[[torch.Tensor, torch.Tensor, Padding], torch.Tensor]
AppliesFn = Callable[[torch.Tensor, torch.Tensor, Padding], bool]
GemmFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], str], torch.Tensor]


@dataclass(frozen=True)
class DWConvBackend:
    """One implementation of the depthwise, stride-1 conv ``F.conv2d(x, weight, bias, padding=padding,
    groups=C)`` with ``weight`` ``[C, 1, kh, kw]``.

    * ``applies(x, weight, padding)``: whether it can run these inputs (else the operator runs ``plain``).
    * ``forward(x, weight, bias, padding)``: the output, in ``x``'s memory format.
    * ``autograd``: True if ``forward`` is differentiable by autograd itself (``plain``); otherwise the
      operator wraps it in one autograd node whose gradients are ``input_grad(gy, weight, padding)``
      (default: ``forward`` of ``gy`` with the flipped kernel, exact for odd kernels with 'same' padding)
      and ``weight_grad(x, gy, weight, padding)`` (required then).
    * hints for ``auto``: ``auto_kinds`` (which decisions it competes in: 'forward' for no-grad calls,
      'train' for calls that need gradients), ``devices`` (device types it is timed on) and
      ``forward_is_plain(x, weight, padding)`` (inputs for which ``forward`` runs exactly ``plain``'s
      conv: not timed for no-grad calls). A backend whose forward is another's (``fft`` and ``gemm`` share
      ``fast``'s) competes in 'train' only, so the same forward is not timed twice.
    """

    name: str
    applies: AppliesFn
    forward: ConvFn
    weight_grad: Optional[WeightGradFn] = None
    input_grad: Optional[InputGradFn] = None
    autograd: bool = False
    forward_is_plain: Optional[AppliesFn] = None
    auto_kinds: FrozenSet[str] = KINDS
    devices: Tuple[str, ...] = ("cpu", "cuda")
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower() or self.name == "auto":
            raise ConfigError(f"a backend name must be lower case, non-empty and not 'auto', got {self.name!r}")
        if not self.autograd and self.weight_grad is None:
            raise ConfigError(f"depthwise conv backend {self.name!r} needs weight_grad (or autograd=True)")
        if not set(self.auto_kinds) <= KINDS:
            raise ConfigError(f"auto_kinds of {self.name!r} must be a subset of {sorted(KINDS)}")


@dataclass(frozen=True)
class GemmBackend:
    """One fp32/bf16 GEMM for the 1x1 layers: ``nt(a, b, bias, act)`` = ``act(a @ b.T + bias)`` for 2-D
    ``a`` ``[M, K]`` and ``b`` ``[N, K]`` (either may be a transposed view), ``act`` 'none' or exact 'gelu'.

    ``available()``: whether this PyTorch build has it (else ``plain`` runs); ``timed``: a candidate of
    ``auto``'s timing.
    """

    name: str
    nt: GemmFn
    available: Callable[[], bool] = lambda: True
    timed: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower() or self.name in ("auto", "fp32"):
            raise ConfigError(f"a GEMM backend name must be lower case, non-empty and not 'auto' / 'fp32', "
                              f"got {self.name!r}")


_DWCONV: Dict[str, DWConvBackend] = {}
_GEMM: Dict[str, GemmBackend] = {}
_version = [0]  # bumped on every change, so that callers can drop answers memoized for an older registry


def registry_version() -> int:
    """A number that changes whenever a backend is registered or removed."""
    return _version[0]


def _register(table: Dict, backend, replace: bool, kind: str) -> None:
    if backend.name in table and not replace:
        raise ConfigError(f"{kind} backend {backend.name!r} is already registered (pass replace=True)")
    table[backend.name] = backend
    _version[0] += 1


def register_dwconv_backend(backend: DWConvBackend, replace: bool = False) -> DWConvBackend:
    """Add a depthwise-conv backend; ``SLAKNET_DWCONV=<name>`` and ``backend=<name>`` then run it, and
    ``auto`` times it per its hints. Returns the backend (usable as a decorator result)."""
    _register(_DWCONV, backend, replace, "depthwise conv")
    return backend


def unregister_dwconv_backend(name: str) -> None:
    """Remove a registered depthwise-conv backend ('plain' stays: it is every other one's fallback)."""
    if name == "plain":
        raise ConfigError("the 'plain' depthwise conv backend cannot be removed")
    _DWCONV.pop(name, None)
    _version[0] += 1


def dwconv_backend(name: str) -> DWConvBackend:
    """The registered depthwise-conv backend called ``name`` (ConfigError if there is none)."""
    try:
        return _DWCONV[name]
    except KeyError:
        raise ConfigError(f"unknown depthwise conv backend {name!r}; choose from "
                          f"{', '.join(['auto', *_DWCONV])}") from None


def dwconv_backends() -> List[DWConvBackend]:
    """All registered depthwise-conv backends, in registration order (built-ins first)."""
    return list(_DWCONV.values())


def register_gemm_backend(backend: GemmBackend, replace: bool = False) -> GemmBackend:
    """Add a GEMM backend for the 1x1 layers (``SLAKNET_LINEAR=<name>``)."""
    _register(_GEMM, backend, replace, "linear")
    return backend


def unregister_gemm_backend(name: str) -> None:
    """Remove a registered GEMM backend ('plain' stays)."""
    if name == "plain":
        raise ConfigError("the 'plain' linear backend cannot be removed")
    _GEMM.pop(name, None)
    _version[0] += 1


def gemm_backend(name: str) -> GemmBackend:
    """The registered GEMM backend called ``name`` (ConfigError if there is none)."""
    try:
        return _GEMM[name]
    except KeyError:
        raise ConfigError(f"unknown linear backend {name!r}; choose from {', '.join(['auto', *_GEMM])}") from None


def gemm_backends() -> List[GemmBackend]:
    """All registered GEMM backends, in registration order (built-ins first)."""
    return list(_GEMM.values())
