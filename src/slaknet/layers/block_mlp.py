"""The SLaK block's second half -- LayerNorm, 1x1 expansion, GELU, 1x1 projection, layer scale, residual --
and, for inference on the CPU, the same computation in row chunks that stay in cache.

86% of SLaK-T's multiply-adds are in the two 1x1 layers, and in the first stages their matrices are
narrow (124 or 249 channels against 25,088 or 6,272 pixels for 8 images at 224 px): run one layer at a
time, the 4x-wide hidden tensor is 50 MB in stage 1, larger than glibc's mmap threshold, so each one is a
fresh mapping whose every page faults on first touch, and GELU, the layer scale and the residual add
stream it again. :func:`residual_mlp` instead takes ~2,000 pixels at a time (a hidden chunk of a few MB,
reused): LayerNorm, oneDNN's GEMM with the bias fused, exact GELU, the projection GEMM, then
``shortcut + gamma * y`` in one ``addcmul`` -- the same function up to fp32 summation order.

Measured on a 2-core AMD EPYC (Zen 3), 1 thread, 8 images at 224 px, per block (docs/speed.md, "The
block's MLP for inference"): with glibc's default allocator stage 1 ~170-195 -> ~110-125 ms, stage 2
~125-170 -> ~110-135 ms, no gain from stage 3 on; with the allocator tuned as training tunes it
(``slaknet.train.machine.keep_freed_memory``: no fresh pages) only ~4% in stages 1-2. The same oneDNN
calls on all rows at once ('whole') can be faster still where oneDNN's GEMM beats MKL's at that shape
(stages 2-3 at batch 8: 88 vs 118 ms, 82 vs 104 ms), which the one per-machine answer of the 1x1 layers
(:func:`slaknet.layers.pointwise.auto_choice`, timed at batch 1) does not see. So ``auto`` times
'plain' (the unfused layers), 'fused' (chunks) and 'whole' per shape (:mod:`slaknet.layers.autotune`,
another kept only where >= 5% faster than 'plain', cached per machine): never slower than the unfused
path, whatever the allocator.

Applies to no-grad fp32 calls on the CPU outside autocast and tracing, with ``SLAKNET_LINEAR`` at
``auto`` (timed) or ``onednn`` (always fused); ``plain`` or another GEMM backend keeps every layer on its
own path. Forward hooks on the norm, the activation or the linears turn it off (they would be bypassed).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.layers import autotune, pointwise
from slaknet.layers.dispatch import autocast_dtype, backend_name, exporting

__all__ = ["mlp_branch", "residual_mlp", "fused_residual_mlp", "chunk_rows", "auto_key"]

# hidden floats per chunk: 2^20 (4 MB) keeps a chunk's hidden activations in the last-level cache
_CHUNK_HIDDEN = 1 << 20


def mlp_branch(y: torch.Tensor, norm: nn.Module, fc1: nn.Module, act: nn.Module, fc2: nn.Module,
               gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """``gamma * fc2(act(fc1(norm(y))))`` on an NCHW tensor, computed per pixel (NHWC); NCHW out."""
    y = y.permute(0, 2, 3, 1)
    forward_act = getattr(fc1, "forward_act", None)  # slaknet.layers.Linear fuses an exact GELU
    h = forward_act(norm(y), act) if forward_act is not None else act(fc1(norm(y)))
    y = fc2(h)
    if gamma is not None:
        y = y * gamma
    return y.permute(0, 3, 1, 2)


def chunk_rows(hidden: int) -> int:
    """Pixels per chunk for a hidden width: about 4 MB of hidden activations, at least 256 rows."""
    return max(256, _CHUNK_HIDDEN // max(hidden, 1))


def fused_residual_mlp(shortcut2d: torch.Tensor, y2d: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear,
                       fc2: nn.Linear, gamma: Optional[torch.Tensor], rows: Optional[int] = None) -> torch.Tensor:
    """``shortcut + gamma * fc2(gelu(fc1(norm(y))))`` on ``(pixels, channels)`` matrices, ``rows`` pixels at
    a time (oneDNN GEMMs with the bias fused); returns a new ``(pixels, channels)`` tensor."""
    m, c = y2d.shape
    rows = rows or chunk_rows(fc1.out_features)
    out = torch.empty_like(shortcut2d)
    w1, b1, w2, b2 = fc1.weight, fc1.bias, fc2.weight, fc2.bias
    for start in range(0, m, rows):
        t = F.layer_norm(y2d[start:start + rows], (c,), norm.weight, norm.bias, norm.eps)
        # GELU as its own pass over the cached chunk: oneDNN's fused erf-GELU post-op is 40-50% slower than
        # the GEMM alone on an AVX2 Zen 3, F.gelu after it 10-25% (docs/speed.md)
        h = F.gelu(pointwise.onednn_nt(t, w1, b1, "none"))
        o = pointwise.onednn_nt(h, w2, b2, "none")
        if gamma is not None:
            torch.addcmul(shortcut2d[start:start + rows], o, gamma, out=out[start:start + rows])
        else:
            torch.add(shortcut2d[start:start + rows], o, out=out[start:start + rows])
    return out


def auto_key(rows: int, channels: int, hidden: int) -> str:
    """The question ``auto`` times (and caches) for this MLP shape with the current number of threads."""
    return (f"block-mlp/forward/cpu/float32/t{torch.get_num_threads()}/m{min(rows, pointwise.MAX_TIMED_ROWS)}"
            f"/c{channels}/h{hidden}")


def _applies(shortcut: torch.Tensor, y: torch.Tensor, norm: nn.Module, fc1: nn.Module, act: nn.Module,
             fc2: nn.Module, gamma: Optional[torch.Tensor]) -> bool:
    if exporting() or pointwise.onednn_op() is None:  # tracers must see the plain ops
        return False
    if not (type(norm) is nn.LayerNorm and isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
            and type(act) is nn.GELU and act.approximate == "none"):
        return False
    if norm.weight is None or norm.bias is None or fc1.bias is None or fc2.bias is None:
        return False
    if any(pointwise.has_forward_hooks(m) for m in (norm, fc1, act, fc2)):
        return False
    tensors = [shortcut, y, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    if gamma is not None:
        tensors.append(gamma)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors) or autocast_dtype("cpu"):
        return False
    c = y.shape[1]
    return (shortcut.shape == y.shape and y.dim() == 4 and norm.normalized_shape == (c,)
            and fc1.in_features == c and fc2.out_features == c
            and y.permute(0, 2, 3, 1).is_contiguous() and shortcut.permute(0, 2, 3, 1).is_contiguous())


def residual_mlp(shortcut: torch.Tensor, y: torch.Tensor, norm: nn.Module, fc1: nn.Module, act: nn.Module,
                 fc2: nn.Module, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """``shortcut + mlp_branch(y, ...)`` (no drop path: inference), through the chunked path where it
    applies and is chosen (module docstring); the result is channels_last when the fused path ran."""
    name = backend_name(None, pointwise.ENV_VAR, pointwise.backend_names(), "linear")
    if name in ("auto", "onednn") and _applies(shortcut, y, norm, fc1, act, fc2, gamma):
        n, c, h, w = y.shape
        y2d, s2d = y.permute(0, 2, 3, 1).reshape(-1, c), shortcut.permute(0, 2, 3, 1).reshape(-1, c)
        choice = "fused" if name == "onednn" else _choose(s2d, y2d, norm, fc1, act, fc2, gamma)
        if choice != "plain":
            rows = y2d.shape[0] if choice == "whole" else None
            out = fused_residual_mlp(s2d, y2d, norm, fc1, fc2, gamma, rows=rows)
            return out.view(n, h, w, c).permute(0, 3, 1, 2)
    return shortcut + mlp_branch(y, norm, fc1, act, fc2, gamma)


def _choose(s2d: torch.Tensor, y2d: torch.Tensor, norm: nn.Module, fc1: nn.Module, act: nn.Module,
            fc2: nn.Module, gamma: Optional[torch.Tensor]) -> str:
    """'plain', 'fused' (in chunks) or 'whole' (the same oneDNN calls on all rows at once) for this shape:
    timed once per machine (>= 5% faster to replace plain)."""
    m, c = y2d.shape
    key = auto_key(m, c, fc1.out_features)
    chunked = chunk_rows(fc1.out_features) < min(m, pointwise.MAX_TIMED_ROWS)
    names = ["plain", "fused", "whole"] if chunked else ["plain", "fused"]

    def candidates() -> Dict[str, Callable[[], object]]:
        pointwise.auto_choice("forward")  # the unfused path's own GEMM question: decided before timing
        rows = min(m, pointwise.MAX_TIMED_ROWS)
        s, y = s2d[:rows], y2d[:rows]
        y4, s4 = y.view(1, rows, 1, c).permute(0, 3, 1, 2), s.view(1, rows, 1, c).permute(0, 3, 1, 2)

        def plain() -> object:
            with torch.no_grad():
                return s4 + mlp_branch(y4, norm, fc1, act, fc2, gamma)

        def fused() -> object:
            with torch.no_grad():
                return fused_residual_mlp(s, y, norm, fc1, fc2, gamma)

        def whole() -> object:
            with torch.no_grad():
                return fused_residual_mlp(s, y, norm, fc1, fc2, gamma, rows=rows)
        return {"plain": plain, "fused": fused, "whole": whole}

    return autotune.decide(key, names, candidates, baseline="plain", device="cpu")
