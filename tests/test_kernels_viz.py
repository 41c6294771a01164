"""Kernel / density pictures from state dicts: effective kernels and densities against independent counts."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import torch.nn as nn

from slaknet.analysis import kernels
from slaknet.errors import CheckpointError
from slaknet.layers import LargeKernelConv


class _Block(nn.Module):
    def __init__(self, c: int, m: int, n, decompose: bool = True) -> None:
        super().__init__()
        self.large_kernel = LargeKernelConv(c, m, small_kernel=n, decompose=decompose)
        self.pwconv1 = nn.Linear(c, 2 * c)


class _TinyNet(nn.Module):
    """Official-layout names: stages.{i}.{j}.large_kernel.*, stages.{i}.{j}.pwconv1, downsample_layers."""

    def __init__(self, decompose: bool = True) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Conv2d(3, 4, 2, 2), nn.Conv2d(4, 6, 2, 2)])
        self.stages = nn.ModuleList([nn.Sequential(_Block(4, 11, 3, decompose), _Block(4, 11, 3, decompose)),
                                     nn.Sequential(_Block(6, 7, 3, decompose))])
        self.head = nn.Linear(6, 5)


def _randomize(net: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.2)


def _sparsify(net: nn.Module, keep: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2 and "small_conv" not in name:
                p.mul_((torch.rand(p.shape, generator=g) < keep).float())


def _impulse_kernel(layer: LargeKernelConv) -> torch.Tensor:
    """The layer's effective kernel measured by running it: eval mode, response to a unit impulse minus
    the response to zero (the bias), flipped (a cross-correlation answers an impulse with its flip)."""
    layer.eval()
    m = layer.kernel_size
    size = 2 * m + 1
    x = torch.zeros(1, layer.channels, size, size)
    with torch.no_grad():
        base = layer(x)
        x[..., m, m] = 1.0
        resp = (layer(x) - base)[0, :, m - m // 2:m + m // 2 + 1, m - m // 2:m + m // 2 + 1]
    return resp.flip(-1, -2)


@pytest.mark.parametrize("decompose", [True, False])
def test_effective_kernels_match_the_layer(decompose):
    net = _TinyNet(decompose)
    _randomize(net)
    _sparsify(net, 0.5)
    layers = kernels.find_kernel_layers(net.state_dict())
    assert [(l.name, l.stage, l.block) for l in layers] == [
        ("stages.0.0.large_kernel", 0, 0), ("stages.0.1.large_kernel", 0, 1), ("stages.1.0.large_kernel", 1, 0)]
    blocks = [net.stages[0][0], net.stages[0][1], net.stages[1][0]]
    for info, block in zip(layers, blocks):
        assert info.bn_folded
        torch.testing.assert_close(info.effective, _impulse_kernel(block.large_kernel), rtol=1e-5, atol=1e-6)


def test_reparameterized_forms_give_the_same_kernels():
    net = _TinyNet()
    _randomize(net)
    _sparsify(net, 0.5)
    net.eval()
    ref = [l.effective for l in kernels.find_kernel_layers(net.state_dict())]
    for merge_dense in (False, True):
        copy = _TinyNet()
        copy.load_state_dict(net.state_dict())
        copy.eval()
        for mod in copy.modules():
            if isinstance(mod, LargeKernelConv):
                mod.reparameterize(merge_dense=merge_dense)
        got = kernels.find_kernel_layers(copy.state_dict())
        assert len(got) == 3
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.effective, b, rtol=1e-5, atol=1e-6)


def test_densities_match_hand_counts():
    net = _TinyNet()
    _sparsify(net, 0.3)
    sd = net.state_dict()
    dens = {d.name: d for d in kernels.weight_densities(sd)}
    # a large-kernel layer counts every branch (strips + small kernel) together
    prefix = "stages.0.1.large_kernel"
    parts = [sd[f"{prefix}.{b}.conv.weight"] for b in ("LoRA1", "LoRA2", "small_conv")]
    nz = sum(int((p != 0).sum()) for p in parts)
    total = sum(p.numel() for p in parts)
    assert total == 4 * (11 * 3 * 2 + 9)
    assert dens[prefix].kind == "large_kernel" and dens[prefix].numel == total and dens[prefix].nonzero == nz
    w = sd["stages.0.1.pwconv1.weight"]
    assert dens["stages.0.1.pwconv1"].kind == "linear"
    assert dens["stages.0.1.pwconv1"].density == pytest.approx(float((w != 0).float().mean()))
    assert dens["downsample_layers.1"].kind == "conv" and dens["downsample_layers.1"].stage == 1
    assert "head" in dens
    # nothing from inside the large-kernel layers is listed twice, no BN/bias entries
    assert not any(".LoRA1" in n or ".bn" in n for n in dens)


def test_load_official_style_wrappers(tmp_path):
    net = _TinyNet()
    _sparsify(net, 0.4)
    sd = net.state_dict()
    wrapped = {"model": {"module." + k: v for k, v in sd.items()},
               "model_ema": {k: torch.zeros_like(v) for k, v in sd.items()},
               "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    raw = kernels.load_state_dict(str(path))
    assert set(raw) == set(sd)
    torch.testing.assert_close(raw["stages.0.0.large_kernel.LoRA1.conv.weight"],
                               sd["stages.0.0.large_kernel.LoRA1.conv.weight"])
    ema = kernels.load_state_dict(str(path), prefer_ema=True)
    assert float(ema["head.weight"].abs().sum()) == 0.0
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": sd}, nested)
    assert set(kernels.load_state_dict(str(nested))) == set(sd)
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    assert set(kernels.load_state_dict(str(st))) == set(sd)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        kernels.load_state_dict(str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        kernels.load_state_dict(str(junk))
    notdict = tmp_path / "list.pth"
    torch.save([1, 2, 3], notdict)
    with pytest.raises(CheckpointError):
        kernels.load_state_dict(str(notdict))
    with pytest.raises(CheckpointError, match="no large-kernel layers"):
        kernels.plot_kernel_magnitude([], str(tmp_path / "x.png"))


def _cli(argv):
    from slaknet.analysis import kernels_cli

    parser = argparse.ArgumentParser()
    kernels_cli.add_arguments(parser)
    return kernels_cli.run(parser.parse_args(argv))


def test_cli_writes_pictures_and_json(tmp_path, capsys):
    net = _TinyNet()
    _randomize(net)
    _sparsify(net, 0.5)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": net.state_dict()}, path)
    out = tmp_path / "out"
    assert _cli([str(path), "--output-dir", str(out), "--channels", "3"]) == 0
    text = capsys.readouterr().out
    assert "stages.1.0.large_kernel" in text and "large-kernel density" in text
    for name in ("density.png", "kernels_magnitude.png", "kernels_channels.png", "kernels_sparsity.png"):
        p = out / name
        assert p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "kernels.json").read_text())
    assert summary["num_large_kernel_layers"] == 3
    lk = kernels.find_kernel_layers(net.state_dict())
    expected = sum(l.nonzero for l in lk) / sum(l.numel for l in lk)
    assert summary["large_kernel_density"] == pytest.approx(expected)
    assert [l["kernel_size"] for l in summary["layers"]] == [[11, 11], [11, 11], [7, 7]]


def test_report_on_a_model_without_large_kernels(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    summary = kernels.kernel_report(net, str(tmp_path))
    assert summary["num_large_kernel_layers"] == 0 and summary["overall_density"] == 1.0
    assert os.path.getsize(summary["files"]["density"]) > 1000


def test_slaknet_model_state_dict():
    slaknet = pytest.importorskip("slaknet")
    if "slak_pico" not in slaknet.list_models():
        pytest.skip("models not available")
    model = slaknet.create_model("slak_pico")
    layers = kernels.find_kernel_layers(model.state_dict())
    assert len(layers) == 5
    assert [l.kernel_size for l in layers] == [(31, 31), (29, 29), (27, 27), (27, 27), (13, 13)]
    assert all(l.density == 1.0 for l in layers)


def _pico_sparse_large_kernels(keep: float = 0.4):
    """slak_pico with its large-kernel strips (not the small kernels) pruned to about ``keep``."""
    import slaknet

    net = slaknet.create_model("slak_pico")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".large_kernel.LoRA" in name and name.endswith("conv.weight"):
                p.mul_((torch.rand(p.shape, generator=g) < keep).float())
    return net


def test_compact_sparse_checkpoint_is_read(tmp_path):
    """Defect: the kernel pictures had their own reader, which read slaknet's compact sparse format as raw
    stored tensors (0 large-kernel layers, density 1.0). Expected: the decoded dense tensors."""
    from slaknet.deploy import save_sparse_checkpoint

    net = _pico_sparse_large_kernels()
    path = tmp_path / "sparse.safetensors"
    save_sparse_checkpoint(path, net)
    sd = net.state_dict()
    # independent count: non-zeros of every large-kernel branch over their sizes
    lk = [k for k in sd if ".large_kernel." in k and k.endswith("conv.weight")]
    expected = sum(int((sd[k] != 0).sum()) for k in lk) / sum(sd[k].numel() for k in lk)
    summary = kernels.kernel_report(str(path), str(tmp_path / "out"))
    assert summary["num_large_kernel_layers"] == sum(net.depths) == 5
    assert summary["large_kernel_density"] == pytest.approx(expected, abs=1e-12)
    assert summary["large_kernel_density"] < 0.7


def test_old_decom_names_are_renamed(tmp_path):
    """Defect: ``Decom1`` / ``Decom2`` (older releases) were not renamed, so their strips went unseen."""
    net = _pico_sparse_large_kernels()
    old = {k.replace(".LoRA1.", ".Decom1.").replace(".LoRA2.", ".Decom2."): v for k, v in net.state_dict().items()}
    torch.save({"model": old}, tmp_path / "old.pth")
    layers = kernels.find_kernel_layers(kernels.load_state_dict(str(tmp_path / "old.pth")))
    assert len(layers) == 5
    assert all(set(layer.branches) == {"LoRA1", "LoRA2", "small_conv"} for layer in layers)
