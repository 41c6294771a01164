"""ERF computation, analysis and pictures, checked against hand computations (no trained weights)."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.analysis import erf
from slaknet.errors import ConfigError
from slaknet.layers import LargeKernelConv


def _ones_conv_stack(depth: int, in_ch: int = 3) -> nn.Sequential:
    layers = []
    for k in range(depth):
        conv = nn.Conv2d(in_ch if k == 0 else 1, 1, 3, padding=1, bias=False)
        nn.init.ones_(conv.weight)
        layers.append(conv)
    return nn.Sequential(*layers)


def _trinomial_counts(depth: int) -> np.ndarray:
    """Coefficients of (1 + x + x^2)^depth: the number of paths through `depth` all-ones 3-taps."""
    c = np.array([1.0])
    for _ in range(depth):
        c = np.convolve(c, [1.0, 1.0, 1.0])
    return c


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_ones_stack_erf_is_square_with_path_counts(depth):
    size = 21
    model = _ones_conv_stack(depth)
    images = [torch.rand(3, size, size) + 0.1 for _ in range(2)]  # positive: the centre output is > 0
    res = erf.compute_erf(model, images, progress=False)
    # independent expectation: a (2*depth+1)^2 square of 1-d path counts (outer product), x3 channels
    expected = np.zeros((size, size))
    c = _trinomial_counts(depth)
    r = depth
    expected[size // 2 - r:size // 2 + r + 1, size // 2 - r:size // 2 + r + 1] = 3 * np.outer(c, c)
    np.testing.assert_allclose(res.matrix, expected, rtol=1e-6)
    assert res.num_images == 2 and res.num_skipped == 0
    assert res.input_size == (size, size) and res.feature_size == (size, size)


def test_large_kernel_layer_support_equals_footprint():
    torch.manual_seed(0)
    m, n, size = 13, 5, 31
    layer = LargeKernelConv(2, m, small_kernel=n)
    with torch.no_grad():  # positive weights, so no contribution is ReLU'd away
        for p in layer.parameters():
            if p.ndim == 4:
                p.copy_(p.abs() + 0.01)
    res = erf.compute_erf(layer, [torch.rand(2, size, size) + 0.1], progress=False)
    # footprint drawn independently: an M x N strip, an N x M strip (the N x N kernel lies inside)
    footprint = np.zeros((size, size), dtype=bool)
    c = size // 2
    footprint[c - m // 2:c + m // 2 + 1, c - n // 2:c + n // 2 + 1] = True
    footprint[c - n // 2:c + n // 2 + 1, c - m // 2:c + m // 2 + 1] = True
    np.testing.assert_array_equal(res.matrix > 0, footprint)
    # and values: d out[centre] / d x[centre + d] of a cross-correlation is the kernel tap at d
    layer.eval()
    ref = torch.zeros(2, size, size)
    for name, mod in (("LoRA1", layer.LoRA1), ("LoRA2", layer.LoRA2), ("small_conv", layer.small_conv)):
        w, _ = mod.fused_weight_bias()
        kh, kw = w.shape[-2:]
        ref[:, c - kh // 2:c + kh // 2 + 1, c - kw // 2:c + kw // 2 + 1] += w[:, 0].detach()
    np.testing.assert_allclose(res.matrix, ref.sum(0).numpy(), rtol=1e-5, atol=1e-7)


def test_sparse_kernel_zeros_leave_holes_in_the_erf():
    size, k = 15, 7
    conv = nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
    mask = torch.zeros(k, k)
    mask[0, 0] = mask[3, 3] = mask[6, 2] = 1.0
    with torch.no_grad():
        conv.weight.copy_(mask.view(1, 1, k, k))
    res = erf.compute_erf(conv, [torch.ones(1, size, size)], progress=False)
    assert int((res.matrix > 0).sum()) == 3
    c = size // 2
    for (i, j) in [(0, 0), (3, 3), (6, 2)]:  # the kernel taps, around the centre
        assert res.matrix[c + (i - 3), c + (j - 3)] == pytest.approx(1.0)


def test_nan_images_are_skipped_and_counted():
    conv = _ones_conv_stack(1)

    def model(x):
        out = conv(x)
        # an image whose first pixel is > 5 produces a NaN gradient
        return out * torch.where(x[0, 0, 0, 0] > 5, torch.tensor(float("nan")), torch.tensor(1.0))

    good = torch.rand(3, 9, 9) + 0.1
    bad = good.clone()
    bad[0, 0, 0] = 10.0
    res = erf.compute_erf(model, [good, bad, good, bad], progress=False)
    assert res.num_images == 2 and res.num_skipped == 2
    assert np.isfinite(res.matrix).all()
    single = erf.compute_erf(model, [good], progress=False)
    np.testing.assert_allclose(res.matrix, single.matrix)
    with pytest.raises(ConfigError, match="no usable image"):
        erf.compute_erf(model, [bad], progress=False)


def test_num_images_limit_and_params_restored():
    model = _ones_conv_stack(2)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    res = erf.compute_erf(model, (torch.rand(3, 9, 9) + 0.1 for _ in range(10)), num_images=3, progress=False)
    assert res.num_images == 3
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_pooled_output_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError, match="not a \\[N, C, h, w\\] feature map"):
        erf.compute_erf(model, [torch.rand(3, 16, 16)], progress=False)


def test_timm_features_only_path():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2))
    res = erf.compute_erf(model, [torch.rand(3, 64, 64)], progress=False)
    assert res.feature_size == (8, 8)  # the last requested map (stride 8)
    assert res.matrix.shape == (64, 64) and res.matrix.sum() > 0
    # same as taking the last map by hand
    x = torch.rand(3, 64, 64)
    got, _ = erf.erf_contribution(erf.feature_extractor(model.eval()), x)
    xr = x[None].clone().requires_grad_(True)
    feats = model(xr)[-1]
    F.relu(feats[:, :, 4, 4]).sum().backward()
    np.testing.assert_allclose(got, F.relu(xr.grad).sum((0, 1)).numpy(), rtol=1e-5, atol=1e-8)


def test_forward_features_used_when_present():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _ones_conv_stack(1)

        def forward_features(self, x):
            return self.body(x)

        def forward(self, x):  # pooled: would be rejected
            return self.forward_features(x).mean((2, 3))

    res = erf.compute_erf(Net(), [torch.rand(3, 9, 9) + 0.1], progress=False)
    assert int((res.matrix > 0).sum()) == 9


def test_centred_square_on_hand_matrix():
    data = np.zeros((5, 5))
    data[1:4, 1:4] = 0.5  # inner ring: 8 cells -> 4
    data[2, 2] = 1.0
    data[0, :] = data[-1, :] = data[:, 0] = data[:, -1] = 0.5  # 16 cells -> 8 ; total 13
    assert erf.centred_square(data, 1 / 13) == (1, 1 / 25)
    assert erf.centred_square(data, 0.2) == (3, 9 / 25)  # 5/13 = 38 %
    assert erf.centred_square(data, 0.38) == (3, 9 / 25)
    assert erf.centred_square(data, 0.39) == (5, 1.0)
    assert erf.centred_square(data, 1.0) == (5, 1.0)
    assert erf.centred_square(np.zeros((3, 3)), 0.5) == (0, 0.0)


def test_area_ratios_apply_log_scaling():
    m = np.zeros((5, 5))
    m[1:4, 1:4] = 9.0  # inner ring: log10(10) = 1 -> 0.5 after scaling
    m[2, 2] = 99.0  # centre: log10(100) = 2 -> 1.0
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 9.0
    # scaled: centre 1, 8 inner ring cells 0.5 (4), 16 outer cells 0.5 (8): total 13
    np.testing.assert_allclose(erf.scale_erf(m)[2, 2], 1.0)
    np.testing.assert_allclose(erf.scale_erf(m)[1, 1], 0.5)
    ratios = erf.area_ratios(m, (0.05, 0.2, 0.3, 0.5, 0.99))
    assert ratios == {0.05: (1, 0.04), 0.2: (3, 0.36), 0.3: (3, 0.36), 0.5: (5, 1.0), 0.99: (5, 1.0)}
    # unscaled raw matrix: centre 99 of a total 99 + 8*9 + 16*9 = 315 -> 31 %
    raw = erf.area_ratios(m, (0.3, 0.32), scale=False)
    assert raw == {0.3: (1, 0.04), 0.32: (3, 0.36)}


def test_centred_square_non_square_and_even_images_clip():
    data = np.zeros((4, 8))
    data[:, 0] = 1.0  # the left column only; centre is (2, 4)
    side, ratio = erf.centred_square(data, 1.0)
    # needs half-width 4 to reach column 0: the clipped square is rows 0..3 x cols 0..7 = whole image
    assert side == 9 and ratio == 1.0
    data = np.zeros((4, 8))
    data[2, 3] = 1.0
    assert erf.centred_square(data, 1.0) == (3, 9 / 32)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_bad_threshold_rejected(bad):
    with pytest.raises(ConfigError):
        erf.centred_square(np.ones((3, 3)), bad)


def test_scale_rejects_bad_matrices():
    with pytest.raises(ConfigError):
        erf.scale_erf(np.ones(5))
    with pytest.raises(ConfigError):
        erf.scale_erf(np.full((3, 3), np.nan))
    np.testing.assert_array_equal(erf.scale_erf(np.zeros((3, 3))), np.zeros((3, 3)))


def test_sample_photo_views_are_deterministic_and_normalized():
    a = list(erf.sample_photo_images(size=32, num_images=3, seed=1))
    b = list(erf.sample_photo_images(size=32, num_images=3, seed=1))
    assert len(a) == 3 and all(t.shape == (3, 32, 32) for t in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert not torch.equal(a[1], a[2])
    # roughly ImageNet-normalized values
    assert -3.0 < float(torch.stack(a).min()) and float(torch.stack(a).max()) < 3.0


def test_benchmark_source_matches_the_training_dataset():
    data = pytest.importorskip("slaknet.data")
    imgs = list(erf.resolve_images("benchmark", size=32, num_images=2, seed=3))
    assert len(imgs) == 4 and all(t.shape == (3, 32, 32) for t in imgs)
    ds = data.InsidenessDataset(split="val", num_samples=4, image_size=32, seed=3)
    for k, img in enumerate(imgs):  # same pictures, normalized as in training (mean = std = 0.5)
        torch.testing.assert_close(img, (ds[k][0] - 0.5) / 0.5)
    big = next(iter(erf.benchmark_images(size=600, num_images=1)))  # rendered at 512, resized
    assert big.shape == (3, 600, 600) and float(big.min()) >= -1.0 and float(big.max()) <= 1.0


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    sub = tmp_path / "class_a"
    sub.mkdir()
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(sub / f"im{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="unreadable"):
        imgs = list(erf.image_folder_images(str(tmp_path), size=16))
    assert len(imgs) == 3 and all(t.shape == (3, 16, 16) for t in imgs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no images"):
        erf.image_folder_images(str(empty), size=16)
    with pytest.raises(ConfigError, match="not found"):
        erf.image_folder_images(str(tmp_path / "missing"), size=16)


def test_heatmap_and_comparison_files(tmp_path):
    a = erf.ERFResult(matrix=np.outer(np.hanning(33), np.hanning(33)) * 50, name="wide", num_images=3)
    b = ("narrow", np.outer(np.hanning(33) ** 8, np.hanning(33) ** 8) * 50)
    p1 = erf.plot_erf(a, str(tmp_path / "wide.png"))
    p2 = erf.plot_erf_comparison([a, b], str(tmp_path / "cmp" / "compare.png"))
    for p in (p1, p2):
        assert os.path.getsize(p) > 1000
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    files = a.save(str(tmp_path / "out"))
    np.testing.assert_array_equal(np.load(files["npy"]), a.matrix)
    meta = json.load(open(files["json"]))
    assert meta["name"] == "wide" and len(meta["area_ratios"]) == 4
    # the wide ERF spreads further than the narrow one at every threshold
    wide, narrow = erf.area_ratios(a.matrix), erf.area_ratios(b[1])
    assert all(wide[t][1] > narrow[t][1] for t in erf.DEFAULT_THRESHOLDS)
    table = erf.format_ratio_table([a])
    assert "wide" in table and "t=99%" in table


def test_small_erf_in_a_large_image_gets_a_zoom_window(tmp_path):
    m = np.zeros((301, 301))
    m[148:153, 148:153] = 5.0
    assert erf._zoom_side([m], erf.DEFAULT_THRESHOLDS) == 15  # 99 % square is 5 px: 2*5+1 -> min 15
    assert erf._zoom_side([np.ones((30, 30))], erf.DEFAULT_THRESHOLDS) is None
    path = erf.plot_erf(("blob", m), str(tmp_path / "blob.png"))
    assert os.path.getsize(path) > 1000


def _cli(argv):
    from slaknet.analysis import erf_cli

    parser = argparse.ArgumentParser()
    erf_cli.add_arguments(parser)
    return erf_cli.run(parser.parse_args(argv))


def test_cli_on_saved_matrices(tmp_path, capsys):
    for name, p in (("a", 1), ("b", 8)):
        np.save(tmp_path / f"{name}.npy", np.outer(np.hanning(21) ** p, np.hanning(21) ** p))
    out = tmp_path / "out"
    assert _cli([str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "t=20%" in text and "a " in text
    assert (out / "compare.png").stat().st_size > 1000 and (out / "a.png").exists()
    data = json.load(open(out / "erf_ratios.json"))
    assert [d["name"] for d in data] == ["a", "b"]
    with pytest.raises(ConfigError):
        _cli([str(tmp_path / "a.npy"), "--thresholds", "0.5,2"])
    with pytest.raises(ConfigError, match="gamma"):
        _cli([str(tmp_path / "a.npy"), "--gamma", "0"])
    assert _cli([str(tmp_path / "a.npy"), "--gamma", "1", "--output-dir", str(out / "linear")]) == 0
    assert (out / "linear" / "a.png").stat().st_size > 1000


def test_cli_on_a_model(tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "out"
    rc = _cli(["resnet18", "--features-only", "--input-size", "64", "--num-images", "2", "--output-dir", str(out),
               "--no-progress", "--json", "--kwargs", '{"out_indices": [1]}'])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["num_images"] == 2 and data[0]["input_size"] == [64, 64]
    assert data[0]["feature_size"] == [16, 16]
    assert (out / "resnet18.npy").exists() and (out / "resnet18.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="unknown model"):
        _cli(["no_such_model_xyz", "--output-dir", str(out)])


def test_cli_on_a_slaknet_checkpoint_with_fitted_kernels(tmp_path, capsys):
    slaknet = pytest.importorskip("slaknet")
    if "slak_pico" not in slaknet.list_models():
        pytest.skip("models not available")
    torch.manual_seed(0)
    # kernels fitted to a small input (as `slaknet train` does): the last stage's 5x5 is a single kernel
    kw = {"kernel_size": [15, 7, 5, 5], "num_classes": 2}
    model = slaknet.create_model("slak_pico", **kw)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, ckpt)
    out = tmp_path / "out"
    rc = _cli([f"slak_pico={ckpt}", "--kwargs", json.dumps(kw), "--images", "benchmark", "--input-size", "32",
               "--num-images", "1", "--output-dir", str(out), "--no-progress", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["name"] == "slak_pico-ckpt" and data[0]["feature_size"] == [1, 1]
    # the ERF of the loaded weights equals the ERF computed directly with the same model
    direct = erf.compute_erf(model, erf.resolve_images("benchmark", size=32, num_images=1), num_images=1,
                             progress=False)
    np.testing.assert_allclose(np.load(out / "slak_pico-ckpt.npy"), direct.matrix, rtol=1e-5, atol=1e-9)
