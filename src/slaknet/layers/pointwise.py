"""Pointwise (1x1) layers on the fastest CPU GEMM PyTorch ships: SLaK's MLP at the speed of the hardware.

86% of SLaK-T's multiply-adds are in the two ``Linear`` layers of every block. On CPU, ``nn.Linear`` runs
MKL's sgemm, which on AMD processors takes a code path that reaches about half of what the hardware does
(on this project's 2-core AMD Zen 5 machine: ~105 vs ~220 G multiply-adds/s). oneDNN, which PyTorch also
ships (``torch.ops.mkldnn._linear_pointwise``, the op ``torch.compile`` uses for CPU linears), runs the same
fp32 GEMM at full speed. :class:`Linear` is an ``nn.Linear`` (same parameters and checkpoint keys, seen as
``nn.Linear`` by the sparse engine, counters and timm) whose forward *and* backward use oneDNN's GEMM when
that is faster on this machine, and which can fuse the bias and GELU into the GEMM for inference.

Choice (``SLAKNET_LINEAR=auto|plain|onednn|<registered name>``, default ``auto``, or ``backend=`` per call of
:func:`linear`): the GEMMs are registered backends (:class:`slaknet.layers.backends.GemmBackend`: ``plain`` =
``F.linear``, ``onednn``). For inference calls (no gradients; bias and GELU fused) ``auto`` decides once
per machine, timing the candidates alternately on SLaK-T's MLP GEMMs (224 px, one image); for training
calls (forward and both gradients) it decides per shape (rows, in and out features: one layer's three
GEMMs timed, :func:`train_key`), because which GEMM wins depends on it (on a Zen 3, MKL at batch 1,
oneDNN at batch 8 for most SLaK-T layers). Either keeps ``plain`` unless another is >= 5% faster
(median); answers are cached per machine (:mod:`slaknet.layers.autotune`) and logged once per process on
the ``slaknet.linear`` logger. ``plain`` is exactly ``F.linear``. Off CPU, for dtypes other than fp32
and bf16, under fp16 autocast, while tracing / exporting / compiling, or if the op is missing,
``F.linear`` runs. Results equal ``F.linear`` up to fp32 summation order (tested against float64).

bf16: under CPU bf16 autocast (and for bf16 tensors) on a CPU with native bf16 (AVX512-BF16 / AMX),
``auto`` runs oneDNN's bf16 GEMM for all three products: the input, weight and bias are cast to bf16 once
(as autocast casts them for ``F.linear``), the result is bf16, and the weight / bias gradients flow back
through the cast into the fp32 parameters, exactly as autocast's ``F.linear`` does (tested against it).
On a CPU without native bf16, where PyTorch's bf16 GEMMs are emulated and several times slower than fp32,
``auto`` casts the same way but runs the three GEMMs in fp32 on the bf16 values and rounds the results to
bf16 (:func:`slaknet.layers.dispatch.bf16_via_fp32`): the same math up to summation order, at fp32 speed.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.layers import autotune, dispatch
from slaknet.layers.backends import GemmBackend, gemm_backend, gemm_backends, register_gemm_backend
from slaknet.layers.dispatch import autocast_dtype, backend_name, exporting

__all__ = ["Linear", "linear", "linear_backend", "auto_choice", "pin_auto_choice", "pinned_choice", "auto_key",
           "train_key", "train_choice", "MAX_TIMED_ROWS", "backend_names", "ENV_VAR",
           "onednn_op", "onednn_nt", "has_forward_hooks",
           "BACKENDS", "PLAIN", "ONEDNN"]

ENV_VAR = "SLAKNET_LINEAR"
logger = logging.getLogger("slaknet.linear")
# what 'auto' means per kind of call ('train': forward + both gradients, 'forward': no-grad inference),
# decided on first use (timed or from the per-machine cache) or pinned (pin_auto_choice)
_auto_choice: Optional[Dict[str, str]] = None
# training calls: one backend for every shape, set by pin_auto_choice (a resumed run that started before the
# per-shape questions existed, or a caller's explicit pin); None: per shape (train_choice)
_pinned_train: Optional[str] = None
# rows timed for one per-shape question (here and in slaknet.layers.block_mlp): SLaK-T stage 1 at batch 8;
# larger inputs are timed on a slice and share the answer
MAX_TIMED_ROWS = 8 * 56 * 56


def onednn_op() -> Optional[Callable]:
    """oneDNN's fused linear op, or None where this PyTorch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def onednn_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, act: str = "none") -> torch.Tensor:
    """``a @ b.T (+ bias)``, then ``act`` ('none' or exact 'gelu'), in one oneDNN call (a, b: 2-D)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, act, [], "none" if act == "gelu" else "")


def _plain_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    y = F.linear(a, b, bias)
    return F.gelu(y) if act == "gelu" else y


# --- registered GEMM backends -----------------------------------------------------------------------------
PLAIN = register_gemm_backend(GemmBackend(
    name="plain", nt=_plain_nt, description="F.linear (MKL's sgemm on CPU), then GELU"))
ONEDNN = register_gemm_backend(GemmBackend(
    name="onednn", nt=lambda a, b, bias, act: onednn_nt(a, b, bias, act), available=lambda: onednn_op() is not None,
    description="oneDNN's GEMM (torch.ops.mkldnn._linear_pointwise), bias and GELU fused"))


def backend_names() -> Tuple[str, ...]:
    """The values ``SLAKNET_LINEAR`` / ``backend=`` accept: 'auto' and every registered GEMM backend."""
    return ("auto", *(b.name for b in gemm_backends()))


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # kept for existing callers; always the current registry
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# SLaK-T's MLP (width 1.3, 4x expansion) at 224 px for one image: (tokens, channels) per stage
_TIMING_STAGES = ((3136, 124), (784, 249), (196, 499), (49, 998))


def _timing_calls(kind: str, names: Sequence[str]) -> Dict[str, Callable[[], None]]:
    """Per candidate, the GEMMs of SLaK-T's eight MLP layers (one 224 px image): with fused bias / GELU
    ('forward'), or forward, input and weight gradient as :class:`_GemmLinear` runs them ('train')."""
    g = torch.Generator().manual_seed(0)
    layers: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]] = []
    for rows, c in _TIMING_STAGES:
        for cin, cout, act in ((c, 4 * c, "gelu"), (4 * c, c, "none")):
            layers.append((torch.randn(rows, cin, generator=g), torch.randn(cout, cin, generator=g),
                           torch.randn(cout, generator=g), torch.randn(rows, cout, generator=g), act))

    def calls_for(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for x, w, b, gy, act in layers:
                    if kind == "forward":
                        _nt(x, w, b, act, name)
                    else:
                        _train_gemms(x, w, b, gy, name)
        return run

    return {name: calls_for(name) for name in names}


def auto_key(kind: str) -> str:
    """The question ``auto`` times (and caches, :mod:`slaknet.layers.autotune`) for fp32 GEMMs of ``kind``
    ('train' or 'forward') with the current number of torch threads."""
    return f"linear/{kind}/cpu/float32/t{torch.get_num_threads()}"


def _measure_auto(kind: str) -> str:
    """Time the available GEMM backends on SLaK-T-sized MLP GEMMs (or read this machine's cached answer);
    'plain' unless another is >= 5% faster."""
    names = [b.name for b in gemm_backends() if b.name == "plain" or (b.timed and b.available())]
    key = auto_key(kind)
    try:
        choice = autotune.decide(key, names, lambda: _timing_calls(kind, names), baseline="plain",
                                 fallback="plain", device="cpu")
    except RuntimeError as exc:  # a GEMM this build cannot run: stay on F.linear
        logger.info("linear on cpu: timing failed (%s); using plain", exc)
        return "plain"
    d = autotune.lookup(key)
    detail = ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in d.medians.items()) if d is not None else ""
    logger.info("linear on cpu, %s calls: %s (%s per SLaK-T MLP, %s; set %s to override)",
                "training" if kind == "train" else "inference", choice, detail or "-",
                d.source if d is not None else "-", ENV_VAR)
    return choice


def auto_choice(kind: str = "train") -> str:
    """What ``auto`` means on CPU in this process for fp32 GEMMs of ``kind`` ('train': calls that need
    gradients, 'forward': inference): a GEMM backend name, e.g. 'onednn' or 'plain' (decided on first use).

    The GEMMs sum in different orders, so a run that must continue bitwise (a resumed training run)
    records ``auto_choice()`` (training calls) and pins it with :func:`pin_auto_choice` instead of deciding
    again: on machines where both are about as fast, two processes can time differently.
    """
    global _auto_choice
    if _auto_choice is None:
        _auto_choice = {}
    if kind not in _auto_choice:
        _auto_choice[kind] = _measure_auto(kind)
    return _auto_choice[kind]


def pin_auto_choice(name: Optional[str]) -> None:
    """Make ``auto`` mean ``name`` (e.g. 'onednn' or 'plain') for every training call in this process instead
    of the per-shape answers (``SLAKNET_LINEAR`` still wins); inference calls keep their own answer.
    ``None`` goes back to the per-shape answers."""
    global _auto_choice, _pinned_train
    if name is None:
        _pinned_train = None
        return
    if name not in backend_names() or name == "auto":
        raise ValueError(f"auto can mean one of {', '.join(backend_names()[1:])}, not {name!r}")
    _auto_choice = dict(_auto_choice or {})
    _auto_choice["train"] = _pinned_train = name if gemm_backend(name).available() else "plain"


def pinned_choice() -> Optional[str]:
    """The backend :func:`pin_auto_choice` fixed for training calls, or None (per-shape answers)."""
    return _pinned_train


def train_key(rows: int, in_features: int, out_features: int) -> str:
    """The per-shape question ``auto`` times (and caches) for training calls of a layer of this shape."""
    return (f"linear/train/cpu/float32/t{torch.get_num_threads()}/m{min(rows, MAX_TIMED_ROWS)}"
            f"/k{in_features}/n{out_features}")


def _layer_calls(rows: int, in_f: int, out_f: int, names: Sequence[str]) -> Dict[str, Callable[[], None]]:
    """Per candidate, one layer's three training GEMMs (forward, input and weight gradient) as
    :class:`_GemmLinear` runs them, on random inputs of this shape."""
    g = torch.Generator().manual_seed(rows + 7 * in_f + 13 * out_f)
    x, w = torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
    b, gy = torch.randn(out_f, generator=g), torch.randn(rows, out_f, generator=g)

    def calls_for(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                _train_gemms(x, w, b, gy, name)
        return run

    return {name: calls_for(name) for name in names}


def train_choice(rows: int, in_features: int, out_features: int) -> str:
    """What ``auto`` runs for a training call (fp32, CPU) of a layer of this shape: the pinned backend if
    :func:`pin_auto_choice` set one, else this shape's answer (timed once per machine, cached)."""
    if _pinned_train is not None:
        return _pinned_train
    if rows < 1:
        return "plain"
    names = [b.name for b in gemm_backends() if b.name == "plain" or (b.timed and b.available())]
    try:
        return autotune.decide(train_key(rows, in_features, out_features), names,
                               lambda: _layer_calls(min(rows, MAX_TIMED_ROWS), in_features, out_features, names),
                               baseline="plain", fallback="plain", device="cpu")
    except RuntimeError as exc:  # a GEMM this build cannot run: stay on F.linear
        logger.info("linear on cpu: timing failed (%s); using plain", exc)
        return "plain"


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def linear_backend(x: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None,
                   training: Optional[bool] = None) -> str:
    """What :func:`linear` runs for these tensors (``backend`` beats the environment): a GEMM backend name
    ('onednn', 'plain', ...), or 'fp32' (bf16 in and out, fp32 GEMMs inside: bf16 on a CPU without native
    bf16, module docstring). ``training``: whether gradients are needed (default: from the tensors).

    Under CPU bf16 autocast the answer is for the bf16 GEMM that :func:`linear` then runs."""
    return _route(x, weight, None, backend, training)


def _route(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: Optional[str],
           training: Optional[bool]) -> str:
    name = backend_name(backend, ENV_VAR, backend_names(), "linear")
    if name == "plain" or exporting():  # tracers (incl. torch.fx proxies) must not see the checks below
        return "plain"
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return "plain"
    if (name == "auto" and onednn_op() is None) or (name != "auto" and not gemm_backend(name).available()):
        return "plain"
    amp = autocast_dtype("cpu")
    dtypes = {amp} if amp is not None else {x.dtype, weight.dtype}
    if dtypes == {torch.bfloat16}:
        # bf16 GEMMs: oneDNN if the CPU has native bf16 (measured 1.3x F.linear's bf16 path, docs/speed.md)
        return "onednn" if dispatch.cpu_bf16_native() and name in ("auto", "onednn") else "fp32"
    if dtypes != {torch.float32}:
        return "plain"
    if name != "auto":
        return name
    grad = training if training is not None else _needs_grad(x, weight, bias)
    if not grad:
        return auto_choice("forward")
    return train_choice(x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0])


def _fp32_gemm(backend: Optional[str], training: bool) -> str:
    """The fp32 GEMM backend that the 'fp32' route of :func:`linear` runs."""
    name = backend_name(backend, ENV_VAR, backend_names(), "linear")
    return name if name != "auto" else auto_choice("train" if training else "forward")


def _nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], act: str, gemm: str) -> torch.Tensor:
    """``act(a @ b.T + bias)`` on GEMM backend ``gemm`` (oneDNN: one fused call; plain: ``F.linear``)."""
    return gemm_backend(gemm).nt(a, b, bias, act)


def _weight_grad(x: torch.Tensor, gy: torch.Tensor, wide_out: bool, gemm: str) -> torch.Tensor:
    """``gy^T @ x`` (the weight gradient); oneDNN is fastest with the wider matrix as the first operand."""
    if wide_out:
        return _nt(x.t(), gy.t(), None, "none", gemm).t().contiguous()
    return _nt(gy.t(), x.t(), None, "none", gemm)


def _train_gemms(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], gy: torch.Tensor, gemm: str) -> None:
    """One training call's three GEMMs as :class:`_GemmLinear` runs them (what ``auto`` times for training)."""
    _nt(x, w, b, "none", gemm)
    _nt(gy, w.t(), None, "none", gemm)
    _weight_grad(x, gy, w.shape[0] >= w.shape[1], gemm)


class _GemmLinear(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs (forward, input and weight gradient) on ``gemm``, computed in the
    dtype ``work`` and returned in the inputs' dtype (``work`` = fp32 for bf16 inputs on the 'fp32' route)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gemm: str,
                work: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x2d, weight)  # in their own dtype: bf16 activations stay bf16 in memory
        ctx.has_bias, ctx.gemm, ctx.work = bias is not None, gemm, work
        b = bias.to(work) if bias is not None else None
        return _nt(x2d.to(work), weight.to(work), b, "none", gemm).to(x2d.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        work, gemm = ctx.work, ctx.gemm
        gy = gy.contiguous().to(work)
        x, w = x2d.to(work), weight.to(work)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _nt(gy, w.t(), None, "none", gemm).to(x2d.dtype)  # gy @ W (oneDNN reads the transposed view)
        if ctx.needs_input_grad[1]:
            out_f, in_f = weight.shape
            gw = _weight_grad(x, gy, out_f >= in_f, gemm).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0).to(weight.dtype)
        return gx, gw, gb, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           gelu: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then exact GELU if ``gelu``) on the fastest GEMM; any leading dims.

    ``backend``: 'auto' or a registered GEMM backend ('plain', 'onednn', ...) for this call (default:
    ``SLAKNET_LINEAR``, else 'auto').
    """
    route = _route(x, weight, bias, backend, None)  # 'plain' while tracing: no checks on proxies below
    if route != "plain" and x.is_contiguous():
        needs_grad = _needs_grad(x, weight, bias)
        if torch.is_autocast_enabled("cpu"):  # bf16 autocast (linear_backend checked): cast once, as autocast
            x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            bias = bias.to(torch.bfloat16) if bias is not None else None
            with torch.autocast("cpu", enabled=False):
                return linear(x, weight, bias, gelu, backend)
        gemm = _fp32_gemm(backend, needs_grad) if route == "fp32" else route
        work = torch.float32 if route == "fp32" else x.dtype
        x2d = x.reshape(-1, x.shape[-1])
        if not needs_grad:
            b = bias.to(work) if bias is not None else None
            y = _nt(x2d.to(work), weight.to(work), b, "gelu" if gelu else "none", gemm).to(x.dtype)
            return y.view(*x.shape[:-1], weight.shape[0])
        y = _GemmLinear.apply(x2d, weight, bias, gemm, work).view(*x.shape[:-1], weight.shape[0])
        return F.gelu(y) if gelu else y
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run on oneDNN where that is faster (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def forward_act(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """``act(self(x))``; with exact GELU the activation is fused into the GEMM when possible."""
        if (type(act) is nn.GELU and act.approximate == "none" and not has_forward_hooks(self)
                and not has_forward_hooks(act)):
            return linear(x, self.weight, self.bias, gelu=True)
        return act(self(x))


def has_forward_hooks(m: nn.Module) -> bool:
    """Fusing skips ``__call__``: only do it when no (module or global) forward hook would be bypassed."""
    g = nn.modules.module
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(g, "_global_forward_hooks", None)
                or getattr(g, "_global_forward_pre_hooks", None))
