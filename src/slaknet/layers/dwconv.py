"""Depthwise convolution operator used by every large-kernel branch.

This module is the single entry point through which slaknet runs a depthwise ("groups == channels")
convolution with 'same' padding. The implementations are registered backends
(:mod:`slaknet.layers.backends`; built-ins in :mod:`slaknet.layers.dwconv_backends`):

* ``plain``: ``F.conv2d`` exactly as PyTorch runs it (cuDNN on CUDA, oneDNN on CPU); always available.
* ``fast``: a custom autograd operator (:class:`slaknet.layers.dwconv_impl.DepthwiseConvFunction`) whose
  forward and input gradient run PyTorch's depthwise kernel in the memory layout where it is fast, and
  whose weight gradient is formed by FFT or banded GEMMs where PyTorch's kernel is slow, by fixed rules.
* ``fft`` / ``gemm``: ``fast`` with that weight-gradient method forced.
* any backend registered with :func:`slaknet.layers.backends.register_dwconv_backend`.

Default (``auto``): for fp32 convs on CPU and CUDA (no autocast) large enough to time, the backend that
repeated, interleaved timings found fastest for this kind of call (no-grad forward, or forward with
gradients) and shape, kept only if it beats ``plain`` by 5%, else ``plain``; answers are cached per
machine (:mod:`slaknet.layers.autotune`, docs/speed.md "How auto decides"). Elsewhere (autocast, other
dtypes, tiny convs, timing budget spent) the rule: ``fast`` on CPU and CUDA for convs it handles, else
``plain``. Override with the ``backend`` argument, or for the whole process with the environment variable
``SLAKNET_DWCONV=<registered name>|auto``, or for a block of code in the current thread with
``with use_backend("plain"):``. The choice is logged once per (device, backend) on the ``slaknet.dwconv``
logger.
"""
from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from slaknet.layers import autotune
from slaknet.layers.backends import DWConvBackend, dwconv_backend, dwconv_backends, registry_version
from slaknet.layers.dispatch import autocast_dtype, backend_name, exporting
from slaknet.layers.dwconv_backends import FAST
from slaknet.layers.dwconv_impl import DepthwiseConvFunction

__all__ = ["depthwise_conv2d", "autocast_input", "resolve_backend", "rule_backend", "auto_key", "auto_candidates",
           "use_backend",
           "backend_names", "BACKENDS", "ENV_VAR", "TIMING_MIN_MACS", "TIMING_MAX_MACS"]

ENV_VAR = "SLAKNET_DWCONV"
# auto times a conv only from this many multiply-adds per call (below, Python overhead is what one would
# time, and the rule answers) and times at most this many per call (large batches: a slice of the batch)
TIMING_MIN_MACS = 1 << 20
TIMING_MAX_MACS = 1 << 30
logger = logging.getLogger("slaknet.dwconv")
_logged: Set[Tuple[str, str, str]] = set()
_memo: Dict[tuple, str] = {}  # auto's answers by exact inputs (see _auto)
_MEMO_SIZE = 4096
# a backend forced for the current thread / task (use_backend); beats the environment variable
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("slaknet_dwconv_backend", default=None)


def backend_names() -> Tuple[str, ...]:
    """The values ``SLAKNET_DWCONV`` / ``backend=`` accept: 'auto' and every registered backend."""
    return ("auto", *(b.name for b in dwconv_backends()))


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # kept for existing callers; always the current registry
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run depthwise convs with backend ``name`` inside the block, in this thread only (unlike
    ``SLAKNET_DWCONV``, which is process-wide). An explicit ``backend=`` argument still wins."""
    _requested(name)  # validate now, with a clear error
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _requested(backend: Optional[str]) -> str:
    return backend_name(backend if backend is not None else _forced.get(), ENV_VAR, backend_names(),
                        "depthwise conv")


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))


def resolve_backend(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int] = (0, 0),
                    backend: Optional[str] = None, training: Optional[bool] = None) -> str:
    """The backend that :func:`depthwise_conv2d` runs for these inputs (under ``auto`` this may time the
    candidates, once per shape and machine). ``training``: whether gradients will be needed (default:
    what the tensors and grad mode say)."""
    padding = (int(padding[0]), int(padding[1]))
    kind = "train" if (training if training is not None else _needs_grad(x, weight, None)) else "forward"
    return _choose(_requested(backend), x, weight, padding, kind)


def rule_backend(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int]) -> str:
    """``auto``'s answer without timing: ``fast`` on CPU and CUDA for the convs it handles, else ``plain``."""
    return "fast" if x.device.type in ("cpu", "cuda") and FAST.applies(x, weight, padding) else "plain"


def _choose(name: str, x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int], kind: str) -> str:
    if name == "auto":
        return _auto(x, weight, padding, kind)
    if name == "plain" or not dwconv_backend(name).applies(x, weight, padding):
        return "plain"
    return name


def _layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "nchw"
    return "nhwc" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def _device_tag(x: torch.Tensor) -> str:
    if x.device.type == "cuda":
        return "cuda:" + torch.cuda.get_device_name(x.device).replace("/", "-")
    return x.device.type


def _timing_batch(x: torch.Tensor, weight: torch.Tensor) -> int:
    per_sample = x.shape[1] * x.shape[2] * x.shape[3] * weight.shape[2] * weight.shape[3]
    return max(1, min(x.shape[0], TIMING_MAX_MACS // max(1, per_sample)))


def auto_key(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int], training: bool) -> Optional[str]:
    """The question ``auto`` times (and caches, :mod:`slaknet.layers.autotune`) for these inputs, or None
    where it answers by rule without timing: devices other than CPU / CUDA, dtypes other than fp32,
    autocast, convs below :data:`TIMING_MIN_MACS` multiply-adds. Batches above what
    :data:`TIMING_MAX_MACS` allows share one question (timed on a slice of the batch)."""
    dev = x.device.type
    if dev not in ("cpu", "cuda") or x.dim() != 4 or weight.dim() != 4 or x.dtype != torch.float32 \
            or weight.dtype != torch.float32 or autocast_dtype(dev) is not None:
        return None
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    if n * c * h * w * kh * kw < TIMING_MIN_MACS:
        return None
    kind = "train" if training else "forward"
    return (f"dwconv/{kind}/{_device_tag(x)}/float32/t{torch.get_num_threads()}/n{_timing_batch(x, weight)}"
            f"/c{c}/{h}x{w}/k{kh}x{kw}/p{padding[0]}x{padding[1]}/{_layout(x)}")


def auto_candidates(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int], training: bool) -> List[str]:
    """The backends ``auto`` times for these inputs: 'plain' and every registered backend whose hints say it
    competes in this kind of call on this device, that applies, and whose forward is not plain's here."""
    kind, dev = ("train" if training else "forward"), x.device.type
    return [b.name for b in dwconv_backends() if b.name == "plain" or (
        kind in b.auto_kinds and dev in b.devices and b.applies(x, weight, padding)
        and not (kind == "forward" and b.forward_is_plain is not None and b.forward_is_plain(x, weight, padding)))]


def _auto(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int], kind: str) -> str:
    # the answer for these exact inputs, memoized: the checks below cost ~15 us per call, this ~3 us
    memo = (kind, x.device, x.dtype, x.shape, x.stride(), weight.shape, weight.dtype, padding,
            torch.get_num_threads(), autocast_dtype(x.device.type), registry_version(), autotune.generation())
    hit = _memo.get(memo)
    if hit is None:
        if len(_memo) >= _MEMO_SIZE:
            _memo.clear()
        hit = _memo[memo] = _auto_uncached(x, weight, padding, kind)
    return hit


def _auto_uncached(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int], kind: str) -> str:
    rule = rule_backend(x, weight, padding)
    key = auto_key(x, weight, padding, kind == "train")
    if key is None:
        return rule
    dev = x.device.type
    names = auto_candidates(x, weight, padding, kind == "train")
    if len(names) == 1:
        return "plain"
    nt = _timing_batch(x, weight)
    return autotune.decide(key, names, lambda: _timing_calls(names, x[:nt], weight, padding, kind),
                           baseline="plain", fallback=rule, device=dev)


def _timing_calls(names, x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int],
                  kind: str) -> Dict[str, Callable[[], None]]:
    """One representative call per candidate on detached copies of the inputs (no effect on the caller's
    autograd graph or RNG): a no-grad forward, or forward plus input and weight gradients."""
    x, weight = x.detach(), weight.detach()
    calls: Dict[str, Callable[[], None]] = {}
    if kind == "forward":
        for name in names:
            def fwd(b: DWConvBackend = dwconv_backend(name)) -> None:
                with torch.no_grad():
                    _run(b, x, weight, None, padding, False)
            calls[name] = fwd
        return calls
    g = torch.Generator(device=x.device).manual_seed(0)
    gy = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    if _layout(x) == "nhwc":  # the output (and so its gradient) has the input's layout
        gy = gy.contiguous(memory_format=torch.channels_last)
    xg, wg = x.requires_grad_(), weight.requires_grad_()
    for name in names:
        def step(b: DWConvBackend = dwconv_backend(name)) -> None:
            with torch.enable_grad():
                y = _run(b, xg, wg, None, padding, True)
                torch.autograd.grad(y, (xg, wg), gy)
        calls[name] = step
    return calls


def _log_once(device: str, requested: str, chosen: str) -> None:
    key = (device, requested, chosen)
    if key not in _logged:
        _logged.add(key)
        logger.info("depthwise conv on %s: backend %r (requested %r; set %s or backend= to override)",
                    device, chosen, requested, ENV_VAR)


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    padding: Tuple[int, int] = (0, 0),
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise conv, stride 1: ``weight`` is ``[C, 1, kh, kw]``, ``x`` is ``[N, C, H, W]``.

    Numerically equal (up to summation order) to ``F.conv2d(x, weight, bias, padding=padding, groups=C)``
    in outputs and gradients, whichever backend runs. ``backend``: see the module docstring.
    """
    padding = (int(padding[0]), int(padding[1]))
    if exporting():
        # tracers / exporters (TorchScript, ONNX, torch.export, torch.compile) see the plain conv op
        return F.conv2d(x, weight, bias, stride=1, padding=padding, groups=weight.shape[0])
    requested = _requested(backend)
    needs_grad = _needs_grad(x, weight, bias)
    chosen = _choose(requested, x, weight, padding, "train" if needs_grad else "forward")
    _log_once(x.device.type, requested, chosen)
    b = dwconv_backend(chosen)
    if b.autograd:  # plain: F.conv2d, autocast and autograd as PyTorch does them
        return b.forward(x, weight, bias, padding)

    dev = x.device.type
    dtype = autocast_dtype(dev)
    if dtype is not None:
        # autocast would run conv2d in its low-precision dtype; do the same cast, then run unautocast
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return _run(b, x, weight, bias, padding, needs_grad)
    return _run(b, x, weight, bias, padding, needs_grad)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` cast to the active autocast dtype of its device (else unchanged): a layer that feeds one input
    to several depthwise convs casts it once instead of once per conv."""
    if exporting() or not x.is_floating_point():  # tracers: no data-dependent checks, plain graph
        return x
    dtype = autocast_dtype(x.device.type)
    return x.to(dtype) if dtype is not None else x


def _run(b: DWConvBackend, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         padding: Tuple[int, int], needs_grad: bool) -> torch.Tensor:
    """Backend ``b`` on these inputs: its forward alone for inference (no autograd node), else one autograd
    node with its gradient functions."""
    if b.autograd or not needs_grad:
        return b.forward(x, weight, bias, padding)
    assert b.weight_grad is not None  # checked when the backend was built
    return DepthwiseConvFunction.apply(x, weight, bias, padding, b.weight_grad, b.forward, b.input_grad)
