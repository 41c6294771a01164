"""Building blocks of slaknet's fast depthwise convolution (stride 1, odd kernel, 'same' padding).

Every function here computes exactly what ``F.conv2d(..., groups=C)`` or its gradients compute, by a
different route that the backends choose per device and shape (see :mod:`slaknet.layers.dwconv`):

* forward / input gradient: PyTorch's own depthwise kernel, but fed in the memory layout in which the
  fast kernel accepts the shape. oneDNN's NCHW depthwise kernel refuses a left padding above 6 and
  falls back to im2col + GEMM (~10x slower for a 5 x 51 strip); its channels_last kernel has no such
  limit. The input gradient is the forward conv of the output gradient with the flipped kernel.
* weight gradient: ``dW[c, i, j] = sum_{n, y, x} xpad[n, c, y + i, x + j] * gy[n, c, y, x]``, a
  cross-correlation of the input with the output gradient, summed over the batch. PyTorch's CPU kernel
  for it only has a fast path for kernel widths <= 3; we use either

  - ``fft``: one real 2-D FFT of the input and of the output gradient, a product summed over the batch
    in frequency space, one inverse FFT per channel, cropped to the kernel (cost independent of the
    kernel size), or
  - ``gemm``: per channel one matrix product between the input rows (shifted along the short kernel
    axis) and the output-gradient rows along the long axis, then the kernel taps are the sums along the
    diagonals of that product (a Toeplitz / banded formulation that runs at GEMM speed).

All three are exact up to floating-point summation order (checked against F.conv2d in the tests).

bf16 tensors on a CPU without native bf16 are computed in fp32 and rounded back to bf16
(:func:`slaknet.layers.dispatch.bf16_via_fp32`): PyTorch's emulated bf16 depthwise kernel is ~30x slower.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from slaknet.layers import dispatch
from slaknet.layers.backends import ConvFn, InputGradFn, WeightGradFn

__all__ = ["conv_forward", "forward_reroutes", "input_grad", "weight_grad", "weight_grad_fft", "weight_grad_gemm",
           "weight_grad_plain", "weight_grad_by_rule", "choose_weight_grad", "DepthwiseConvFunction"]

# oneDNN's NCHW depthwise forward kernel accepts a left (width) padding up to this value.
_ONEDNN_MAX_LEFT_PAD = 6
# keep the temporaries of the GEMM weight gradient below this many elements (chunked over channels)
_GEMM_CHUNK_ELEMS = 1 << 24


def forward_reroutes(x: torch.Tensor, padding: Tuple[int, int]) -> bool:
    """Whether :func:`conv_forward` runs these inputs in channels_last instead of as given (otherwise it is
    exactly ``F.conv2d``): a CPU input not in channels_last with a width padding oneDNN's NCHW kernel refuses."""
    return x.device.type == "cpu" and padding[1] > _ONEDNN_MAX_LEFT_PAD \
        and not x.is_contiguous(memory_format=torch.channels_last)


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 padding: Tuple[int, int]) -> torch.Tensor:
    """Depthwise 'same' conv, choosing the memory layout in which the backend kernel is fast.

    The result has the input's memory format (NCHW-contiguous in, NCHW-contiguous out), like F.conv2d.
    """
    if dispatch.bf16_via_fp32(x):
        b32 = bias.float() if bias is not None else None
        return conv_forward(x.float(), weight.float(), b32, padding).to(x.dtype)
    c = weight.shape[0]
    ph, pw = padding
    if forward_reroutes(x, padding):
        # the NCHW kernel would fall back to im2col; channels_last has a direct kernel for any padding
        xc = x.contiguous(memory_format=torch.channels_last)
        out = F.conv2d(xc, weight, bias, 1, (ph, pw), 1, c)
        return out.contiguous()
    return F.conv2d(x, weight, bias, 1, (ph, pw), 1, c)


def weight_grad_plain(x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor,
                      padding: Tuple[int, int]) -> torch.Tensor:
    """PyTorch's own depthwise weight gradient (the reference path)."""
    c = weight.shape[0]
    return torch.ops.aten.convolution_backward(
        gy, x, weight, None, [1, 1], list(padding), [1, 1], False, [0, 0], c, [False, True, False])[1]


@functools.lru_cache(maxsize=None)
def _smooth_size(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3, 5 (fast FFT lengths)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def weight_grad_fft(x: torch.Tensor, gy: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Weight gradient ``[C, 1, kh, kw]`` by FFT cross-correlation (computed in fp32 at least)."""
    n, c, h, w = x.shape
    ph, pw = kh // 2, kw // 2
    # circular correlation of length L is alias-free for lags |d| <= p when L >= size + p (and >= k)
    lh, lw = _smooth_size(max(h + ph, kh)), _smooth_size(max(w + pw, kw))
    work = torch.promote_types(x.dtype, torch.float32)
    fx = torch.fft.rfft2(x.to(work), s=(lh, lw))
    fg = torch.fft.rfft2(gy.to(work), s=(lh, lw))
    # sum over the batch: sum_n fx * conj(fg), done in place to keep memory low
    prod = fx.mul_(fg.conj()).sum(0)
    del fx, fg
    corr = torch.fft.irfft2(prod, s=(lh, lw))  # corr[c, d] = sum x[y + d] * gy[y] (circular lags)
    # lags -ph..ph live at indices L-ph..L-1 and 0..ph; roll them into 0..k-1
    corr = torch.roll(corr, shifts=(ph, pw), dims=(1, 2))[:, :kh, :kw]
    return corr.unsqueeze(1).to(x.dtype)


def _weight_grad_gemm_long_h(x: torch.Tensor, gy: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """GEMM weight gradient with the long kernel axis along H (``x``, ``gy`` may be any strided views)."""
    n, c, h, w = x.shape
    ph, pw = kh // 2, kw // 2
    k = n * w
    out = x.new_empty((c, kw, kh))
    per_channel = kw * h * k + k * h + kw * h * (h + 2 * ph)
    step = max(1, _GEMM_CHUNK_ELEMS // max(1, per_channel))
    xp = F.pad(x, (pw, pw)) if pw else x  # zero-pad along the short (W) axis only
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        cc = c1 - c0
        # A[c, j * h + yx, (n, x)] = xpad[n, c, yx, x + j]
        a = xp[:, c0:c1].unfold(3, w, 1).permute(1, 3, 2, 0, 4).reshape(cc, kw * h, k)
        b = gy[:, c0:c1].permute(1, 0, 3, 2).reshape(cc, k, h)  # B[c, (n, x), y] = gy[n, c, y, x]
        s = torch.bmm(a, b).view(cc, kw, h, h)  # S[c, j, yx, y] = sum_{n,x} xpad[.., yx, x+j] gy[.., y, x]
        del a, b
        # dW[c, i, j] = sum_y S[c, j, y + i - ph, y]: transpose to [.., y, yx], zero-pad yx by ph on both
        # sides, then a strided view walks the diagonals (row stride + 1)
        sp = F.pad(s.transpose(2, 3), (ph, ph))
        del s
        span = h + 2 * ph
        diag = sp.as_strided((cc, kw, h, kh), (kw * h * span, h * span, span + 1, 1))
        out[c0:c1] = diag.sum(2, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
        del sp, diag
    return out.transpose(1, 2).reshape(c, 1, kh, kw)


# maps of at most this many pixels (8x8) take the flat-row form of the banded GEMM (no kw-fold copy of the input)
_GEMM_FLAT_MAX_PIXELS = 64
# ... except strips with the long axis along W, which take the all-pairs form there (_weight_grad_pairs)
_GEMM_PAIRS = True


def _weight_grad_gemm_flat(x: torch.Tensor, gy: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The banded-GEMM weight gradient without the short-axis-shifted copy of the input (for tiny maps).

    Per channel, the rows of the (zero-padded) input and of the output gradient are laid end to end along
    the short kernel axis over the whole batch (``m = (n, position)``); a shift of the short axis by ``s``
    is then a shift of that flat index, i.e. a strided view, and one batched GEMM per short-axis tap gives
    ``S[s, c, y, yx] = sum_m gy[c, y, m] * xpad[c, yx, m + s]``. The output gradient is zero past each row's
    end, so no product crosses from one image or row into the next. The long-axis taps are then the
    diagonal sums of ``S``, as in :func:`_weight_grad_gemm_long_h`.
    """
    n, c, h, w = x.shape
    ph, pw = kh // 2, kw // 2
    if kh >= kw:  # long axis H: matrix rows y, flat index m = (n, x') with x' along the padded width
        wp = w + 2 * pw
        xt = x.new_zeros((c, h, n, wp))
        xt[..., pw:pw + w] = x.permute(1, 2, 0, 3)
        gt = gy.new_zeros((c, h, n, wp))
        gt[..., :w] = gy.permute(1, 2, 0, 3)
        flat = (n - 1) * wp + w  # the last nonzero output-gradient position + 1
        xf, gf = xt.view(c, h, n * wp), gt.view(c, h, n * wp)[:, :, :flat]
        long, short, plong = h, kw, ph
        pairs = [(gf, xf[:, :, s:s + flat].transpose(1, 2)) for s in range(kw)]
    else:  # long axis W: matrix rows x, flat index m = (n, y') with y' along the padded height
        hp = h + 2 * ph
        xt = x.new_zeros((c, n, hp, w))
        xt[:, :, ph:ph + h] = x.permute(1, 0, 2, 3)
        gt = gy.new_zeros((c, n, hp, w))
        gt[:, :, :h] = gy.permute(1, 0, 2, 3)
        flat = (n - 1) * hp + h
        xf, gf = xt.view(c, n * hp, w), gt.view(c, n * hp, w)[:, :flat]
        long, short, plong = w, kh, pw
        pairs = [(gf.transpose(1, 2), xf[:, s:s + flat]) for s in range(kh)]
    span = long + 2 * plong
    sp = x.new_zeros((short, c, long, span))  # S[s, c, y, yx], zero-padded by plong along yx
    for s, (a, b) in enumerate(pairs):
        sp[s, :, :, plong:plong + long] = torch.bmm(a, b)
    klong = 2 * plong + 1
    diag = sp.as_strided((short, c, long, klong), (c * long * span, long * span, span + 1, 1))
    out = diag.sum(2)  # [short, c, klong]: dW along the long axis for each short-axis tap
    if kh >= kw:
        return out.permute(1, 2, 0).reshape(c, 1, kh, kw)
    return out.permute(1, 0, 2).reshape(c, 1, kh, kw)


@functools.lru_cache(maxsize=64)
def _pair_taps(h: int, w: int, kh: int, kw: int, dtype: torch.dtype) -> torch.Tensor:
    """0/1 matrix ``[(h w)^2, kh kw]``: which kernel tap each (input pixel, output pixel) pair belongs to."""
    ph, pw = kh // 2, kw // 2
    y2, x2, y, x = torch.meshgrid(*(torch.arange(n) for n in (h, w, h, w)), indexing="ij")
    i, j = y2 - y + ph, x2 - x + pw
    ok = (i >= 0) & (i < kh) & (j >= 0) & (j < kw)
    taps = torch.zeros(h * w * h * w, kh * kw, dtype=dtype)
    taps[torch.arange(h * w * h * w)[ok.flatten()], (i * kw + j).flatten()[ok.flatten()]] = 1
    return taps


def _weight_grad_pairs(x: torch.Tensor, gy: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Weight gradient of a tiny map from all (input pixel, output pixel) products summed over the batch:
    ``P[c, p', p] = sum_n x[n, c, p'] gy[n, c, p]`` (one batched GEMM), then each tap is the sum of the pairs
    at its offset (one GEMM with a 0/1 matrix). ``(h w)^2`` products per channel instead of ``h w kh kw``."""
    n, c, h, w = x.shape
    xc = x.permute(1, 0, 2, 3).reshape(c, n, h * w)
    gc = gy.permute(1, 0, 2, 3).reshape(c, n, h * w)
    pairs = torch.bmm(xc.transpose(1, 2), gc)  # [c, p', p]
    return torch.mm(pairs.view(c, -1), _pair_taps(h, w, kh, kw, x.dtype)).view(c, 1, kh, kw)


def weight_grad_gemm(x: torch.Tensor, gy: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Weight gradient ``[C, 1, kh, kw]`` by banded (Toeplitz) batched GEMMs along the long kernel axis."""
    n, _, h, w = x.shape
    if h * w <= _GEMM_FLAT_MAX_PIXELS and x.dtype in (torch.float32, torch.float64):
        # measured on the demo's maps (docs/speed.md, "The demo's training step"): the flat form wins for
        # strips along H and squares; along W it does not, and the all-pairs form wins when the batch is
        # at least the map's pixel count (its batched GEMM then has a useful depth), e.g. not for SLaK-T's
        # 7x7 maps at batch 8
        if kh >= kw:
            return _weight_grad_gemm_flat(x, gy, kh, kw)
        if _GEMM_PAIRS and n >= h * w:
            return _weight_grad_pairs(x, gy, kh, kw)
    if kh >= kw:
        return _weight_grad_gemm_long_h(x, gy, kh, kw)
    g = _weight_grad_gemm_long_h(x.transpose(2, 3), gy.transpose(2, 3), kw, kh)
    return g.transpose(2, 3).contiguous()


def choose_weight_grad(device_type: str, n: int, c: int, h: int, w: int, kh: int, kw: int) -> str:
    """The weight-gradient method for a shape: 'fft', 'gemm' or 'plain'.

    Rules of thumb from measurements (docs/speed.md). CPU (2-core Zen4, oneDNN): PyTorch's kernel is fast
    only for kernel width <= 3; for strips on small maps the banded GEMM wins, otherwise the FFT. CUDA
    (H100, cuDNN): cuDNN is best for small square kernels, FFT / GEMM are 1.6-3.5x faster for strips.
    """
    long_k, short_k = max(kh, kw), min(kh, kw)
    strip = short_k <= 7 and long_k >= 3 * short_k
    if device_type == "cuda":
        if not strip:
            return "plain"
        return "gemm" if long_k >= 31 and h * w <= 32 * 32 else "fft"
    if device_type != "cpu":
        return "plain"
    if kh * kw <= 9 and kw <= 3:
        return "plain"
    if strip and h * w <= 32 * 32:
        return "gemm"
    return "fft"


def weight_grad(method: str, x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor,
                padding: Tuple[int, int]) -> torch.Tensor:
    """Dispatch to one weight-gradient method (see module docstring)."""
    if dispatch.bf16_via_fp32(x):
        return weight_grad(method, x.float(), gy.float(), weight.float(), padding).to(weight.dtype)
    kh, kw = weight.shape[-2:]
    if method == "gemm" and x.shape[2] * x.shape[3] <= _GEMM_FLAT_MAX_PIXELS and (
            kh >= kw or (_GEMM_PAIRS and x.shape[0] >= x.shape[2] * x.shape[3])):
        pass  # the small-map forms gather from any layout themselves
    elif method in ("fft", "gemm"):
        # both read whole rows/planes: NCHW-contiguous copies are cheaper than strided (channels_last) access
        x, gy = x.contiguous(), gy.contiguous()
    if method == "fft":
        return weight_grad_fft(x, gy, kh, kw)
    if method == "gemm":
        return weight_grad_gemm(x, gy, kh, kw)
    return weight_grad_plain(x, gy, weight, padding)


def input_grad(gy: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int]) -> torch.Tensor:
    """Input gradient of the 'same'-padded odd-kernel depthwise conv: the forward conv of the output
    gradient with the flipped kernel (so it gets the forward's fast layout too)."""
    return conv_forward(gy, weight.flip(-2, -1), None, padding)


def weight_grad_by_rule(x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor,
                        padding: Tuple[int, int]) -> torch.Tensor:
    """The weight gradient by the method :func:`choose_weight_grad` picks for this shape (``fast``)."""
    n, c, h, w = x.shape
    method = choose_weight_grad(x.device.type, n, c, h, w, weight.shape[2], weight.shape[3])
    return weight_grad(method, x, gy, weight, padding)


class DepthwiseConvFunction(torch.autograd.Function):
    """Depthwise 'same' conv as one autograd node with chosen pieces: ``wgrad`` is a weight-gradient method
    name ('fft', 'gemm', 'plain') or function ``(x, gy, weight, padding)``; ``forward_fn`` /
    ``input_grad_fn`` default to the layout-aware :func:`conv_forward` / :func:`input_grad` (a registered
    backend passes its own, :mod:`slaknet.layers.backends`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # type: ignore[override]
                padding: Tuple[int, int], wgrad: Union[str, WeightGradFn], forward_fn: Optional[ConvFn] = None,
                input_grad_fn: Optional[InputGradFn] = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.wgrad = wgrad
        ctx.input_grad_fn = input_grad_fn or input_grad
        ctx.has_bias = bias is not None
        return (forward_fn or conv_forward)(x, weight, bias, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = ctx.input_grad_fn(gy, weight, ctx.padding)
        if ctx.needs_input_grad[1]:
            if isinstance(ctx.wgrad, str):
                gw = weight_grad(ctx.wgrad, x, gy, weight, ctx.padding)
            else:
                gw = ctx.wgrad(x, gy, weight, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None
