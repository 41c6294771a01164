"""Cheap checks of the benchmark helpers (MAC counting against hand-computed values, argument errors)."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn as nn

from slaknet.analysis.counting import conv_tap_coverage
from slaknet.bench import count_inbounds_macs
from slaknet.bench_cli import add_arguments, run
from slaknet.errors import ConfigError
from slaknet.layers import LargeKernelConv


def _inbounds_1d(size_in: int, size_out: int, k: int, stride: int, pad: int) -> int:
    conv = nn.Conv2d(1, 1, (k, 1), stride=(stride, 1), padding=(pad, 0))
    return int(conv_tap_coverage(conv, (size_in, 1), (size_out, 1)).sum())


def test_inbounds_1d_by_hand():
    assert _inbounds_1d(5, 5, 3, 1, 1) == 13  # 5 outputs x 3 taps, minus one tap at each border
    assert _inbounds_1d(4, 4, 7, 1, 3) == 16  # kernel wider than the map: every input hit by every output
    assert _inbounds_1d(8, 2, 4, 4, 0) == 8  # patchify stem: no padding


def test_count_conv_linear_and_reparameterized_strips():
    conv = nn.Conv2d(2, 2, 3, padding=1, groups=2)
    assert count_inbounds_macs(conv, torch.randn(1, 2, 4, 4)) == 2 * 10 * 10
    assert count_inbounds_macs(nn.Linear(4, 3), torch.randn(2, 5, 4)) == 10 * 12
    layer = LargeKernelConv(3, 7, small_kernel=3).eval()
    x = torch.randn(1, 3, 4, 4)
    # 7x3 + 3x7 + 3x3 branches: rows 16 (7 taps on 4 rows) x cols 10 (3 taps on 4 cols), etc.
    assert count_inbounds_macs(layer, x) == 3 * (16 * 10 + 10 * 16 + 10 * 10)
    layer.reparameterize()
    assert count_inbounds_macs(layer, x) == 3 * (16 * 10 + 10 * 16)


def test_bench_rejects_bad_arguments():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError):
        run(parser.parse_args(["--backends", "plain,warp"]))
    with pytest.raises(ConfigError):
        run(parser.parse_args(["--batch", "0"]))


def test_official_arm_same_values_in_the_official_nchw_layout(monkeypatch):
    """The 'official' baseline computes the same function, with every depthwise conv fed NCHW-contiguous
    tensors (as the official code's channels-first LayerNorm does) and plain F.conv2d / F.linear."""
    import slaknet
    import slaknet.layers.dwconv_impl  # noqa: F401
    from slaknet.bench import OFFICIAL, arm_environment, official_layout

    assert arm_environment(OFFICIAL) == {"SLAKNET_DWCONV": "plain", "SLAKNET_LINEAR": "plain"}
    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico", num_classes=10, layer_scale_init_value=1.0).eval()
    x = torch.randn(2, 3, 64, 64)
    layouts = []

    def record(mod, args):
        layouts.append(args[0].is_contiguous())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, LargeKernelConv)]
    with torch.no_grad():
        ref = model(x)
        assert not all(layouts)  # slaknet's own layout hands channels_last tensors on
        layouts.clear()
        for k, v in arm_environment(OFFICIAL).items():
            monkeypatch.setenv(k, v)
        with official_layout():
            out = model(x)
        assert layouts and all(layouts)
        after = model(x)  # the patch is undone on exit
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-5)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).backends.split(",")[0] == OFFICIAL


def test_bench_workloads_run_under_bf16_autocast():
    """--amp bf16: every workload runs under CPU autocast (one tiny model, one rep, no timing asserted)."""
    from slaknet.bench import model_workloads

    torch.manual_seed(0)
    layer = LargeKernelConv(4, 7, small_kernel=3)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = torch.randn(2, 4, 8, 8)
    dtypes = []
    model[2].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    fns, _ = model_workloads(model, x, lambda: x, lambda out: out.float().sum(), amp=torch.bfloat16)
    fns["train step"]()
    assert torch.bfloat16 in dtypes
