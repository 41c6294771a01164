"""bf16 autocast on CPU: slaknet's depthwise conv and Linear against plain PyTorch under the same autocast.

References are F.conv2d / F.linear run by PyTorch's own autocast (an independent computation). Tolerances are
relative to the tensor's largest magnitude: outputs and input gradients pass through bf16 once more than
the fp32 reference sums, so 2e-2 (a few bf16 ulps at the scale of the tensor); weight gradients are sums
over the whole batch and map, compared at 3e-2. Speed is measured in benchmarks/bench_bf16.py, not here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slaknet.layers.pointwise as lin
from slaknet.layers import dispatch
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


needs_onednn = pytest.mark.skipif(lin.onednn_op() is None, reason="PyTorch built without oneDNN linear")


@pytest.fixture(params=["native", "via_fp32"])
def route(request, monkeypatch):
    """'native': the CPU's own bf16 kernels (skipped where the CPU has none: oneDNN refuses bf16 GEMMs there);
    'via_fp32': the path for CPUs without bf16 units (forced here on any CPU), fp32 kernels on bf16 values."""
    if request.param == "native":
        if not dispatch.cpu_bf16_native():
            pytest.skip("no native bf16 on this CPU")
    else:
        monkeypatch.setattr(dispatch, "cpu_bf16_native", lambda: False)
    return request.param


@needs_onednn
@pytest.mark.parametrize("cin,cout", [(124, 496), (496, 124), (249, 996), (499, 1996), (3, 5)])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_bf16_matches_f_linear_under_autocast(cin, cout, gelu, route, monkeypatch):
    # 'onednn' pins the via-fp32 route's fp32 GEMMs to oneDNN too, so the spy below sees all of them
    monkeypatch.setenv(lin.ENV_VAR, "auto" if route == "native" else "onednn")
    calls = []
    real = lin.onednn_nt
    monkeypatch.setattr(lin, "onednn_nt", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    g = torch.Generator().manual_seed(cin)
    x = torch.randn(2, 7, 5, cin, generator=g)
    w = torch.randn(cout, cin, generator=g) / cin ** 0.5
    b = torch.randn(cout, generator=g)

    def ref(x, w, b):
        y = F.linear(x, w, b)
        return F.gelu(y) if gelu else y

    y, grads = _autocast_run(lambda x, w, b: linear(x, w, b, gelu=gelu), x, w, b)
    y_ref, grads_ref = _autocast_run(ref, x, w, b)
    # forward and both gradients ran on oneDNN: in bf16 natively, in fp32 otherwise
    assert len(calls) == 3 and set(calls) == {BF16 if route == "native" else torch.float32}
    assert y.dtype == y_ref.dtype == BF16
    _close(y, y_ref, 2e-2)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype == torch.float32  # gradients land in the fp32 parameters
        _close(got, want, 3e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):  # inference: bias (+ GELU) fused in the GEMM
        _close(linear(x, w, b, gelu=gelu), ref(x, w, b), 2e-2)


@needs_onednn
def test_linear_bf16_plain_and_fp16_autocast_use_f_linear(route, monkeypatch):
    calls = []
    real = lin.onednn_nt
    monkeypatch.setattr(lin, "onednn_nt", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = torch.randn(4, 6), torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        assert linear(x, w).dtype == torch.float16
    with torch.autocast("cpu", dtype=BF16):
        assert linear(x, w, backend="plain").dtype == BF16
    assert not calls


def test_linear_bf16_tensors_without_autocast(route):
    """A model cast to bf16 (no autocast): bf16 out, fp32-accurate products of the bf16 values."""
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=g).to(BF16) for s in ((3, 11, 249), (996, 249), (996,)))
    y = linear(x, w, b, gelu=True)
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()))
    assert y.dtype == BF16
    _close(y.double(), ref, 1e-2)


# ops that do the multiply-adds: under bf16 autocast on a CPU without bf16 units none may get bf16 inputs
_MATH_OPS = {"convolution", "convolution_backward", "mm", "addmm", "bmm", "_linear_pointwise",
             "mkldnn_convolution", "_slow_conv2d_forward", "_slow_conv2d_backward"}


def _math_op_dtypes(fn) -> set:
    """{(op name, dtype of its first tensor argument)} for the multiply-add ops that ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in _MATH_OPS:
                first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                seen.add((name, first.dtype if first is not None else None))
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen


@pytest.mark.parametrize("native", [True, False])
def test_slak_training_step_under_bf16_runs_no_emulated_bf16_kernel(native, monkeypatch):
    """Without bf16 units every conv / GEMM of a SLaK training step gets fp32 operands (emulated bf16 kernels
    measured 26x slower than fp32 on an AVX2 CPU); with them (forced here; on a CPU without them PyTorch then
    emulates, fine at 32 px) the convs and GEMMs get bf16 operands. Values are checked per layer above."""
    from slaknet.models import create_model

    monkeypatch.setattr(dispatch, "cpu_bf16_native", lambda: native)
    monkeypatch.setenv(lin.ENV_VAR, "plain" if native else "auto")  # native bf16 oneDNN GEMMs can't run here
    torch.manual_seed(0)
    model = create_model("slak_pico", num_classes=3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])

    def step():
        with torch.autocast("cpu", dtype=BF16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    seen = _math_op_dtypes(step)
    bf16_ops = {name for name, dt in seen if dt == BF16}
    if native:
        assert {"convolution", "convolution_backward"} <= bf16_ops, seen
    else:
        assert not bf16_ops, f"emulated bf16 kernels ran: {sorted(bf16_ops)}"
        fp32_ops = {name for name, dt in seen if dt == torch.float32}
        assert "convolution" in fp32_ops and ({"mm", "_linear_pointwise"} & fp32_ops), seen


@pytest.mark.parametrize("route_kind", ["native", "via_fp32"])
def test_dense_conv2d_bf16_matches_float64_and_fp32_is_nn_conv2d(route_kind, monkeypatch):
    """slaknet's Conv2d (stem, downsampling) under bf16 autocast against float64 on the bf16-rounded values;
    without autocast it is nn.Conv2d bit for bit."""
    from slaknet.layers import Conv2d

    native = route_kind == "native"
    monkeypatch.setattr(dispatch, "cpu_bf16_native", lambda: native)
    torch.manual_seed(7)
    conv = Conv2d(249, 499, kernel_size=2, stride=2)
    ref_conv = nn.Conv2d(249, 499, kernel_size=2, stride=2)
    ref_conv.load_state_dict(conv.state_dict())
    x = torch.randn(2, 249, 7, 9)
    assert torch.equal(conv(x), ref_conv(x))
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        y = conv(xg)
    assert y.dtype == BF16
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(BF16)
    y.backward(gy)
    leaves = [t.detach().to(BF16).double().requires_grad_() for t in (x, conv.weight, conv.bias)]
    yd = F.conv2d(*leaves, stride=2)
    yd.backward(gy.double())
    _close(y.double(), yd.detach(), 1e-2)
    for got, want in zip((xg.grad, conv.weight.grad, conv.bias.grad), (l.grad for l in leaves)):
        _close(got.double(), want, 1e-2)
    assert conv.weight.grad.dtype == torch.float32
