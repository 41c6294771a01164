"""bf16 autocast on CPU: slaknet's depthwise conv and Linear against plain PyTorch under the same autocast.

References are F.conv2d / F.linear run by PyTorch's own autocast (an independent computation). Tolerances are
relative to the tensor's largest magnitude: outputs and input gradients pass through bf16 once more than
the fp32 reference sums, so 2e-2 (a few bf16 ulps at the scale of the tensor); weight gradients are sums
over the whole batch and map, compared at 3e-2. Speed is measured in benchmarks/bench_bf16.py, not here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slaknet.layers.pointwise as lin
from slaknet.layers import LargeKernelConv, linear
from slaknet.layers.dwconv import autocast_input, depthwise_conv2d

BF16 = torch.bfloat16


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = ref.double().abs().max().item() or 1.0
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


def _autocast_run(fn, *tensors, seed: int = 0):
    """fn(*leaves) under CPU bf16 autocast, backward with a fixed bf16 output gradient; (y, grads)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    with torch.autocast("cpu", dtype=BF16):
        y = fn(*leaves)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(gy)
    return y, [t.grad if t is not None else None for t in leaves]


# (channels, map size, kernel): SLaK's odd channel counts, maps smaller than the kernel, both strip orientations
DW_SHAPES = [(124, 14, (51, 5)), (124, 9, (5, 51)), (249, 7, (49, 5)), (249, 28, (5, 49)),
             (499, 6, (47, 5)), (499, 5, (5, 47)), (13, 4, (13, 13)), (7, 3, (5, 5))]


def _fp64_reference(x, w, b, gy, pad, c):
    """F.conv2d in float64 on the bf16-rounded inputs and output gradient: the exact answer bf16 math aims at."""
    leaves = [t.to(BF16).double().requires_grad_() for t in (x, w, b)]
    y = F.conv2d(leaves[0], leaves[1], leaves[2], 1, pad, 1, c)
    y.backward(gy.to(BF16).double())
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["fast", "fft", "gemm"])
@pytest.mark.parametrize("c,hw,k", DW_SHAPES)
def test_dwconv_bf16_matches_conv2d_under_autocast(backend, c, hw, k):
    """Output and gradients under autocast against float64 on the same bf16-rounded values, 1e-2 of the
    tensor's scale (measured: <= 4.3e-3). PyTorch's own F.conv2d under the same autocast is the dtype
    reference; its bf16 *input gradient* is not used as the value reference because on CPUs without native
    bf16 it was measured 2-3% off float64 (slaknet's: 0.2-0.3%), i.e. it is the less accurate side."""
    g = torch.Generator().manual_seed(c + hw)
    x = torch.randn(2, c, hw, hw + 1, generator=g)
    w = torch.randn(c, 1, *k, generator=g) / (k[0] * k[1]) ** 0.5
    b = torch.randn(c, generator=g)
    pad = (k[0] // 2, k[1] // 2)
    y, grads = _autocast_run(lambda x, w, b: depthwise_conv2d(x, w, b, pad, backend=backend), x, w, b)
    y_ref, _ = _autocast_run(lambda x, w, b: F.conv2d(x, w, b, 1, pad, 1, c), x, w, b)
    assert y.dtype == y_ref.dtype == BF16
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))  # what _autocast_run used
    t, t_grads = _fp64_reference(x, w, b, gy, pad, c)
    _close(y.double(), t, 1e-2)
    _close(y.double(), y_ref.double(), 2e-2)  # and PyTorch's own bf16 output
    for got, ref in zip(grads, t_grads):  # input, weight (accumulated into the fp32 parameter), bias
        _close(got.double(), ref, 1e-2)
    assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32


def test_dwconv_bf16_inference_matches_conv2d():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 249, 7, 7, generator=g), torch.randn(249, 1, 5, 49, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        y = depthwise_conv2d(x, w, None, (2, 24))
        y_ref = F.conv2d(x, w, None, 1, (2, 24), 1, 249)
    _close(y, y_ref, 2e-2)


def test_autocast_input_casts_only_under_autocast():
    x = torch.randn(2, 3, 4, 4)
    assert autocast_input(x) is x
    with torch.autocast("cpu", dtype=BF16):
        assert autocast_input(x).dtype == BF16
        assert autocast_input(torch.arange(3)).dtype == torch.int64


def test_large_kernel_layer_bf16_matches_plain(monkeypatch):
    """The whole large-kernel layer (strips + small kernel + BN) in bf16, fast operator vs plain convs."""
    torch.manual_seed(2)
    layer = LargeKernelConv(13, 31, small_kernel=5, decompose=True)
    x = torch.randn(2, 13, 9, 9)
    out = {}
    for name in ("plain", "fast"):
        monkeypatch.setenv("SLAKNET_DWCONV", name)
        layer.zero_grad(set_to_none=True)
        y, (gx,) = _autocast_run(layer, x)
        out[name] = (y, gx, [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    _close(out["fast"][0], out["plain"][0], 2e-2)
    _close(out["fast"][1], out["plain"][1], 2e-2)
    assert len(out["fast"][2]) == len(out["plain"][2]) > 0
    for got, ref in zip(out["fast"][2], out["plain"][2]):
        _close(got, ref, 3e-2)


needs_bf16 = pytest.mark.skipif(lin._op() is None or not lin.bf16_supported(),
                                reason="no oneDNN linear or no native bf16 on this CPU")


@needs_bf16
@pytest.mark.parametrize("cin,cout", [(124, 496), (496, 124), (249, 996), (499, 1996), (3, 5)])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_bf16_matches_f_linear_under_autocast(cin, cout, gelu, monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "auto")
    calls = []
    real = lin._gemm
    monkeypatch.setattr(lin, "_gemm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    g = torch.Generator().manual_seed(cin)
    x = torch.randn(2, 7, 5, cin, generator=g)
    w = torch.randn(cout, cin, generator=g) / cin ** 0.5
    b = torch.randn(cout, generator=g)

    def ref(x, w, b):
        y = F.linear(x, w, b)
        return F.gelu(y) if gelu else y

    y, grads = _autocast_run(lambda x, w, b: linear(x, w, b, gelu=gelu), x, w, b)
    y_ref, grads_ref = _autocast_run(ref, x, w, b)
    assert calls and set(calls) == {BF16}  # the oneDNN bf16 GEMM ran (forward and both gradients)
    assert y.dtype == y_ref.dtype == BF16
    _close(y, y_ref, 2e-2)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype == torch.float32  # gradients land in the fp32 parameters
        _close(got, want, 3e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):  # inference: bias (+ GELU) fused in the GEMM
        _close(linear(x, w, b, gelu=gelu), ref(x, w, b), 2e-2)


@needs_bf16
def test_linear_bf16_plain_and_fp16_autocast_use_f_linear(monkeypatch):
    calls = []
    real = lin._gemm
    monkeypatch.setattr(lin, "_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = torch.randn(4, 6), torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        assert linear(x, w).dtype == torch.float16
    with torch.autocast("cpu", dtype=BF16):
        assert linear(x, w, backend="plain").dtype == BF16
    assert not calls
