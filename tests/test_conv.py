"""slaknet.layers.Conv2d: the patch-GEMM route of patchify convs equals nn.Conv2d (values and gradients)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slaknet.layers import conv as conv_mod
from slaknet.layers.conv import Conv2d


def _grads(m: Conv2d, x: torch.Tensor, gy: torch.Tensor):
    x = x.clone().requires_grad_()
    m.zero_grad()
    y = m(x)
    y.backward(gy)
    return y, x.grad, m.weight.grad.clone(), m.bias.grad.clone()


def test_patch_gemm_equals_conv_in_float64_tolerance():
    torch.manual_seed(0)
    for cin, cout, k, size in ((32, 64, 2, 16), (37, 11, 2, 7), (5, 6, 4, 13), (3, 8, 3, 9)):
        m = Conv2d(cin, cout, k, stride=k)
        x = torch.randn(3, cin, size, size).contiguous(memory_format=torch.channels_last)
        ho = size // k
        gy = torch.randn(3, cout, ho, ho).contiguous(memory_format=torch.channels_last)
        calls = []
        orig = conv_mod.patch_linear
        conv_mod.patch_linear = lambda *a: calls.append(1) or orig(*a)
        try:
            got = _grads(m, x, gy)
        finally:
            conv_mod.patch_linear = orig
        assert calls, "the patch-GEMM route was not taken"
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        xd = x.double().requires_grad_()
        wd, bd = m.weight.detach().double().requires_grad_(), m.bias.detach().double().requires_grad_()
        yd = F.conv2d(xd, wd, bd, stride=k)
        yd.backward(gy.double())
        for a, b in zip(got, (yd, xd.grad, wd.grad, bd.grad)):
            assert a.shape == b.shape
            assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_patch_gemm_only_where_it_applies():
    m = Conv2d(8, 8, 2, stride=2)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert m._patch_gemm_applies(x)
    assert not m._patch_gemm_applies(x.detach().contiguous())  # NCHW input, no gradient: the conv
    with torch.no_grad():
        assert not m._patch_gemm_applies(x)  # inference: the conv
    assert not Conv2d(8, 8, 3, stride=2)._patch_gemm_applies(x)  # overlapping windows
    assert not Conv2d(8, 8, 2, stride=2, padding=1)._patch_gemm_applies(x)
    conv_mod.PATCH_GEMM = False
    try:
        assert not m._patch_gemm_applies(x)
    finally:
        conv_mod.PATCH_GEMM = True
