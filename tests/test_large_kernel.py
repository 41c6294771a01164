"""The large-kernel layer against an independent F.conv2d + BatchNorm-formula reference."""
import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_bn
from slaknet.errors import ConfigError
from slaknet.layers import LargeKernelConv


def ref_branch(x, weight, bn):
    """Depthwise conv with 'same' padding per dimension, then the eval-mode BatchNorm formula."""
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x, weight, None, padding=(kh // 2, kw // 2), groups=x.shape[1])
    shape = (1, -1, 1, 1)
    return ((y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def reference(layer, x):
    out = 0
    for name in ("LoRA1", "LoRA2", "lkb_origin", "small_conv"):
        if hasattr(layer, name):
            branch = getattr(layer, name)
            out = out + ref_branch(x, branch.conv.weight, branch.bn)
    return out


def sparsify_(layer, density=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(generator=g)
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < density)


# (channels, M, N, spatial): the model's strips, odd channel counts, maps smaller than the kernel
SHAPES = [(124, 51, 5, 16), (249, 49, 5, 9), (499, 47, 5, 14), (998, 13, 5, 7), (7, 31, 5, 40), (5, 7, 3, 3)]


@pytest.mark.parametrize("channels,m,n,size", SHAPES)
@pytest.mark.parametrize("decompose", [True, False])
def test_forward_matches_reference(channels, m, n, size, decompose):
    torch.manual_seed(0)
    layer = LargeKernelConv(channels, m, n, decompose=decompose)
    sparsify_(layer)
    randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, channels, size, size + 1)
    expected = reference(layer, x)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_forms_and_keys():
    assert set(dict(LargeKernelConv(4, 13, 5).named_children())) == {"LoRA1", "LoRA2", "small_conv"}
    assert set(dict(LargeKernelConv(4, 13, 5, decompose=False).named_children())) == {"lkb_origin", "small_conv"}
    # N >= M: a plain M x M conv + BN (ConvNeXt-style 7x7 baseline written as 7 with N=100 in the paper)
    single = LargeKernelConv(4, 7, 101)
    assert set(dict(single.named_children())) == {"lkb_origin"} and single.form == "single"
    assert LargeKernelConv(4, 7, None).form == "single"
    lk = LargeKernelConv(3, 51, 5)
    assert lk.LoRA1.conv.weight.shape == (3, 1, 51, 5) and lk.LoRA2.conv.weight.shape == (3, 1, 5, 51)
    assert lk.LoRA1.conv.bias is None and lk.LoRA1.conv.padding == (25, 2)


@pytest.mark.parametrize("bad", [dict(kernel_size=50), dict(small_kernel=4), dict(channels=0)])
def test_invalid_arguments(bad):
    args = dict(channels=4, kernel_size=13, small_kernel=5) | bad
    with pytest.raises(ConfigError):
        LargeKernelConv(**args)


@pytest.mark.parametrize("channels,m,n,size", SHAPES)
@pytest.mark.parametrize("decompose,merge_dense", [(True, False), (True, True), (False, False)])
def test_reparameterize_equivalence(channels, m, n, size, decompose, merge_dense):
    torch.manual_seed(1)
    layer = LargeKernelConv(channels, m, n, decompose=decompose)
    sparsify_(layer, density=0.6, seed=2)
    randomize_bn(layer, seed=3)
    layer.eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        expected = reference(layer, x)
        zeros = {k: (getattr(layer, k).conv.weight == 0).clone() for k in ("LoRA1", "LoRA2") if hasattr(layer, k)}
        layer.reparameterize(merge_dense=merge_dense)
        out = layer(x)
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, rel
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in layer.modules())
    if decompose and not merge_dense:
        # strip 2 keeps its zeros exactly; strip 1 too, outside the centre N x N where the small kernel lands
        assert torch.all(layer.lkb_strip2.weight[zeros["LoRA2"]] == 0)
        outside = zeros["LoRA1"].clone()
        c0 = (m - n) // 2
        outside[:, :, c0:c0 + n, :] = False
        assert outside.any() and torch.all(layer.lkb_strip1.weight[outside] == 0)
        assert layer.lkb_strip1.weight.shape[-2:] == (m, n)
    else:
        assert layer.lkb_reparam.weight.shape[-2:] == (m, m)
    layer.reparameterize()  # idempotent
    torch.testing.assert_close(layer(x), out)


def test_train_mode_uses_batch_statistics():
    layer = LargeKernelConv(6, 13, 5).train()
    x = torch.randn(4, 6, 10, 10) * 3 + 1
    out = layer(x)
    for name in ("LoRA1", "LoRA2", "small_conv"):
        assert getattr(layer, name).bn.num_batches_tracked.item() == 1
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
