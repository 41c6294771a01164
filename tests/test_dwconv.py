"""Exactness and dispatch tests of slaknet's depthwise conv operator against F.conv2d (independent reference)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from slaknet.errors import ConfigError
from slaknet.layers import LargeKernelConv
from slaknet.layers.dwconv import ENV_VAR, depthwise_conv2d, resolve_backend
from slaknet.layers.dwconv_impl import (_weight_grad_gemm_flat, _weight_grad_pairs, choose_weight_grad, weight_grad,
                                        weight_grad_fft, weight_grad_gemm)

FAST_BACKENDS = ["fast", "fft", "gemm"]


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """``|got - ref| <= rel * max|ref|`` elementwise (1e-5 relative to the tensor's scale, fp32)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = ref.abs().max().item() or 1.0
    err = (got - ref).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


def _reference(x, w, b, pad):
    """Outputs and gradients from plain F.conv2d in float64 (an independent computation)."""
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    y = F.conv2d(xd, wd, bd, 1, pad, 1, w.shape[0])
    gy = torch.randn_like(y)
    y.backward(gy)
    return y, gy, xd.grad, wd.grad, (bd.grad if bd is not None else None)


def _check(x, w, b, backend, rel=1e-5):
    pad = (w.shape[2] // 2, w.shape[3] // 2)
    y_ref, gy, gx_ref, gw_ref, gb_ref = _reference(x, w, b, pad)
    xg = x.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    bg = b.detach().clone().requires_grad_() if b is not None else None
    y = depthwise_conv2d(xg, wg, bg, pad, backend=backend)
    y.backward(gy.float())
    _close(y.double(), y_ref, rel)
    _close(xg.grad.double(), gx_ref, rel)
    _close(wg.grad.double(), gw_ref, rel)
    if b is not None:
        _close(bg.grad.double(), gb_ref, rel)


# (channels, map, kernel): the strip / square shapes the SLaK models use, with odd channel counts
SHAPES = [
    (124, 14, (51, 5)), (124, 14, (5, 51)), (249, 9, (49, 5)), (249, 9, (5, 49)),
    (499, 6, (47, 5)), (499, 6, (5, 47)), (998, 4, (13, 5)), (998, 4, (5, 13)),
    (12, 16, (5, 5)), (13, 16, (7, 7)), (11, 16, (13, 13)), (7, 20, (31, 31)),
    (5, 40, (51, 5)), (5, 40, (5, 51)),  # maps larger than half the kernel
]


@pytest.mark.parametrize("backend", ["fft", "gemm"])  # 'fast' picks one of these per shape (tested below)
@pytest.mark.parametrize("c,hw,k", SHAPES)
def test_exact_vs_conv2d(backend, c, hw, k):
    torch.manual_seed(hash((c, hw, k)) % 1000)
    x = torch.randn(2, c, hw, hw + 1)
    w = torch.randn(c, 1, *k)
    b = torch.randn(c) if c % 2 else None
    _check(x, w, b, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_batch_one_and_map_smaller_than_kernel(backend):
    """Also runs the automatic choice ('fast') on the SLaK-T stage-3/4 strip shapes."""
    torch.manual_seed(0)
    _check(torch.randn(1, 499, 6, 6), torch.randn(499, 1, 47, 5), None, backend)
    _check(torch.randn(1, 998, 4, 4), torch.randn(998, 1, 5, 13), None, backend)
    torch.manual_seed(1)
    _check(torch.randn(1, 31, 3, 2), torch.randn(31, 1, 51, 5), torch.randn(31), backend)
    _check(torch.randn(1, 31, 2, 7), torch.randn(31, 1, 5, 51), None, backend)
    _check(torch.randn(1, 9, 1, 1), torch.randn(9, 1, 13, 13), None, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_and_channels_last(backend):
    torch.manual_seed(2)
    base = torch.randn(3, 2 * 21, 12, 15)
    _check(base[:, ::2], torch.randn(21, 1, 5, 13), None, backend)  # channel-strided view
    _check(base[:, :21].transpose(2, 3), torch.randn(21, 1, 13, 5), None, backend)  # transposed view
    xcl = torch.randn(2, 21, 11, 11).contiguous(memory_format=torch.channels_last)
    _check(xcl, torch.randn(21, 1, 5, 31), torch.randn(21), backend)
    # output keeps the input's memory format, as F.conv2d does
    w = torch.randn(21, 1, 5, 31)
    assert depthwise_conv2d(xcl, w, None, (2, 15), backend=backend).is_contiguous(
        memory_format=torch.channels_last)
    assert depthwise_conv2d(xcl.contiguous(), w, None, (2, 15), backend=backend).is_contiguous()


@pytest.mark.slow
def test_batch_64_and_stage_like_shape():
    torch.manual_seed(3)
    _check(torch.randn(64, 24, 7, 7), torch.randn(24, 1, 13, 5), torch.randn(24), "fast")
    _check(torch.randn(2, 16, 56, 56), torch.randn(16, 1, 5, 51), None, "fast")
    _check(torch.randn(2, 16, 56, 56), torch.randn(16, 1, 51, 5), None, "fft")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bf16_autocast_cpu_matches_conv2d_autocast(backend):
    torch.manual_seed(4)
    x = torch.randn(2, 19, 14, 14)
    w = torch.randn(19, 1, 5, 31)
    outs = {}
    for name in ("plain", backend):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = depthwise_conv2d(xg, wg, None, (2, 15), backend=name)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs[name] = (y.float(), xg.grad, wg.grad)
    for got, ref in zip(outs[backend], outs["plain"]):
        assert got.dtype == ref.dtype
        _close(got.double(), ref.double(), rel=2e-2)  # bf16 precision


def test_weight_grad_methods_directly():
    """The FFT and GEMM weight gradients equal PyTorch's own, for both strip orientations."""
    torch.manual_seed(5)
    for k in ((17, 5), (5, 17), (7, 7)):
        x, gy = torch.randn(3, 6, 10, 12), torch.randn(3, 6, 10, 12)
        ref = torch.ops.aten.convolution_backward(
            gy.double(), x.double(), torch.zeros(6, 1, *k, dtype=torch.float64), None, [1, 1],
            [k[0] // 2, k[1] // 2], [1, 1], False, [0, 0], 6, [False, True, False])[1]
        _close(weight_grad_fft(x, gy, *k).double(), ref)
        _close(weight_grad_gemm(x, gy, *k).double(), ref)


def test_weight_grad_gemm_flat_form_on_tiny_maps():
    """Maps of <= 64 pixels take the flat-row banded GEMM or the all-pairs form: both equal PyTorch's own for
    both strip orientations, squares, kernels longer than the map, odd batch / channel counts and any layout."""
    torch.manual_seed(6)
    for (h, w) in ((8, 8), (4, 4), (2, 2), (1, 1), (2, 8), (3, 5), (5, 9)):
        for k in ((7, 5), (5, 7), (5, 5), (13, 5), (3, 3)):
            for cl in (False, True):
                x, gy = torch.randn(5, 37, h, w), torch.randn(5, 37, h, w)
                if cl:
                    x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
                ref = torch.ops.aten.convolution_backward(
                    gy.double(), x.double(), torch.zeros(37, 1, *k, dtype=torch.float64), None, [1, 1],
                    [k[0] // 2, k[1] // 2], [1, 1], False, [0, 0], 37, [False, True, False])[1]
                _close(weight_grad_gemm(x, gy, *k).double(), ref)
                _close(weight_grad("gemm", x, gy, torch.zeros(37, 1, *k), (k[0] // 2, k[1] // 2)).double(), ref)
                _close(_weight_grad_gemm_flat(x, gy, *k).double(), ref)
                _close(_weight_grad_pairs(x, gy, *k).double(), ref)


def test_dispatch_and_plain_selectable(monkeypatch):
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 5, 13)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(x, w, (2, 6)) == "fast"  # CPU default
    assert resolve_backend(x, w, (2, 6), "plain") == "plain"
    assert resolve_backend(x, w, (2, 6), "gemm") == "gemm"
    assert resolve_backend(x, w, (1, 6)) == "plain"  # not 'same' padding: custom op does not apply
    assert resolve_backend(x.long(), w.long(), (2, 6)) == "plain"
    monkeypatch.setenv(ENV_VAR, "plain")
    assert resolve_backend(x, w, (2, 6)) == "plain"
    monkeypatch.setenv(ENV_VAR, "fft")
    assert resolve_backend(x, w, (2, 6)) == "fft"
    assert resolve_backend(x, w, (2, 6), "plain") == "plain"  # argument beats environment
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ConfigError):
        depthwise_conv2d(x, w, None, (2, 6))
    with pytest.raises(ConfigError):
        resolve_backend(x, w, (2, 6), "nope")


def test_plain_env_really_runs_conv2d(monkeypatch):
    """With SLAKNET_DWCONV=plain no custom autograd node appears in the graph."""
    monkeypatch.setenv(ENV_VAR, "plain")
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    y = depthwise_conv2d(x, torch.randn(4, 1, 5, 13), None, (2, 6))
    assert "Convolution" in type(y.grad_fn).__name__
    monkeypatch.setenv(ENV_VAR, "fast")
    y = depthwise_conv2d(x, torch.randn(4, 1, 5, 13), None, (2, 6))
    assert "DepthwiseConvFunction" in type(y.grad_fn).__name__


def test_weight_grad_choice_rules():
    assert choose_weight_grad("cuda", 8, 124, 56, 56, 5, 5) == "plain"
    assert choose_weight_grad("cuda", 8, 124, 56, 56, 51, 5) == "fft"
    assert choose_weight_grad("cuda", 8, 499, 14, 14, 5, 47) == "gemm"
    assert choose_weight_grad("mps", 8, 124, 56, 56, 51, 5) == "plain"
    assert choose_weight_grad("cpu", 8, 124, 56, 56, 51, 5) == "fft"
    assert choose_weight_grad("cpu", 8, 499, 14, 14, 47, 5) == "gemm"
    assert choose_weight_grad("cpu", 8, 124, 56, 56, 3, 3) == "plain"


def test_logged_once(caplog, monkeypatch):
    import slaknet.layers.dwconv as mod

    monkeypatch.setattr(mod, "_logged", set())
    with caplog.at_level(logging.INFO, logger="slaknet.dwconv"):
        for _ in range(3):
            depthwise_conv2d(torch.randn(1, 2, 6, 6), torch.randn(2, 1, 5, 5), None, (2, 2), backend="fft")
    assert sum("backend 'fft'" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("backend", ["fast", "gemm"])
def test_large_kernel_layer_same_as_plain(backend, monkeypatch):
    """The whole SLaK layer (train and reparameterized forms) gives the plain path's outputs and grads."""
    torch.manual_seed(6)
    layer = LargeKernelConv(13, 15, small_kernel=5)
    x = torch.randn(2, 13, 9, 11)
    results = {}
    for name in ("plain", backend):
        monkeypatch.setenv(ENV_VAR, name)
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.square().sum().backward()
        results[name] = [y, xg.grad] + [p.grad.clone() for p in layer.parameters()]
    for got, ref in zip(results[backend], results["plain"]):
        _close(got, ref)
    layer.eval()
    monkeypatch.setenv(ENV_VAR, "plain")
    ref = layer(x)
    layer.reparameterize()
    monkeypatch.setenv(ENV_VAR, backend)
    _close(layer(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["plain", "auto"] + FAST_BACKENDS)
@pytest.mark.parametrize("c,hw,k", SHAPES[:8] + [(12, 16, (5, 5))])
def test_exact_cuda(backend, c, hw, k):
    torch.manual_seed(7)
    dev = "cuda"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(2, c, hw, hw + 1, device=dev)
    w = torch.randn(c, 1, *k, device=dev)
    _check(x, w, torch.randn(c, device=dev), backend)


def test_inference_and_tracing_paths():
    """No-grad calls skip the autograd node; tracing sees plain conv ops; both give F.conv2d's result."""
    torch.manual_seed(8)
    x, w, b = torch.randn(1, 6, 9, 9), torch.randn(6, 1, 5, 13), torch.randn(6)
    ref = F.conv2d(x.double(), w.double(), b.double(), 1, (2, 6), 1, 6)
    with torch.no_grad():
        _close(depthwise_conv2d(x, w, b, (2, 6), backend="fast").double(), ref)
    layer = LargeKernelConv(6, 13, small_kernel=5).eval()
    traced = torch.jit.trace(layer, x)
    assert "DepthwiseConvFunction" not in str(traced.graph)
    with torch.no_grad():
        _close(traced(x), layer(x))
