"""Counting against hand computations and the published figures."""
import pytest
import torch
import torch.nn as nn

import slaknet
from slaknet.analysis.counting import conv_tap_coverage, count_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, (5, 1), padding=(2, 0), groups=4, bias=False)
        self.fc = nn.Linear(4, 7)

    def forward(self, x):
        return self.fc(self.dw(self.conv(x)).mean((2, 3)))


def test_hand_computed_counts():
    m = Tiny()
    c = count_model(m, 5)
    assert c.params == (3 * 4 * 9 + 4) + 4 * 5 + (4 * 7 + 7)
    # conv 3x3 pad 1 on 5x5: 25 positions x 108 weights; per-axis in-bounds taps 4+5+4 -> 13 x 13 = 169
    # depthwise 5x1 pad 2 on 5 rows: in-bounds taps per column 3+4+5+4+3 = 19, 5 columns, 4 channels
    assert c.macs_dense == 25 * 108 + 25 * 20 + 28
    assert c.macs_inbounds == 169 * 12 + 19 * 5 * 4 + 28
    with torch.no_grad():
        m.dw.weight[:, :, 0] = 0   # top tap: in-bounds at 3 of 5 row positions
        m.fc.weight[:3] = 0
    c = count_model(m, 5)
    assert c.params_nonzero == c.params - 4 - 12 - int((m.conv.bias == 0).sum()) - int((m.fc.bias == 0).sum())
    assert c.macs_nonzero == 169 * 12 + (19 - 3) * 5 * 4 + 16
    assert c.macs_nonzero_padded == 25 * 108 + 25 * 16 + 16
    assert c.macs_dense == 25 * 108 + 25 * 20 + 28  # dense figures ignore zeros


def test_tap_coverage_small_map_under_large_kernel():
    conv = nn.Conv2d(1, 1, 13, padding=6)
    cov = conv_tap_coverage(conv, (7, 7), (7, 7))
    # every in-bounds (output, input) pair is counted exactly once: 7x7 outputs x 7x7 inputs
    assert int(cov.sum()) == 49 * 49
    assert cov[0, 0] == 1 and cov[6, 6] == 49


@pytest.mark.slow
@pytest.mark.parametrize("name,dense_m,paper_m", [("slak_tiny", 50.7, 30), ("slak_small", 91.1, 55), ("slak_base", 158.0, 95)])
def test_published_parameter_counts(name, dense_m, paper_m):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = slaknet.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 1) == dense_m
    # paper: 40% sparsity over all conv and linear weights (hand formula: keep 60% of those weights)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    nonzero = params - weights + 0.6 * weights
    assert abs(nonzero / 1e6 - paper_m) < 1.0


def test_sparsity_counts_slak_tiny():
    model = slaknet.create_model("slak_tiny")
    c = count_model(model, 64, sparsity=0.4)
    weight_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    weights = sum(p.numel() for p in model.parameters() if id(p) in weight_ids)
    others_nonzero = sum(int((p != 0).sum()) for p in model.parameters() if id(p) not in weight_ids)
    assert c.params == 50_703_838
    assert abs(c.params_nonzero - (others_nonzero + 0.6 * weights)) < 100  # per-tensor rounding only


def test_sparsity_figures_use_exact_counts():
    m = Tiny()
    c = count_model(m, 5, sparsity=0.5)
    weights = 108 + 20 + 28
    assert c.params_nonzero == c.params - weights + (54 + 10 + 14)
    with pytest.raises(ValueError):
        count_model(m, 5, sparsity=1.0)


def test_masks_override_zeros():
    m = Tiny()
    mask = torch.zeros_like(m.fc.weight, dtype=torch.bool)
    mask[0, :2] = True
    c = count_model(m, 5, masks={"fc.weight": mask})
    dense = count_model(m, 5)
    assert c.params_nonzero == dense.params_nonzero - int((m.fc.weight != 0).sum()) + 2
    assert c.macs_nonzero == dense.macs_nonzero - 28 + 2
    with pytest.raises(ValueError):
        count_model(m, 5, sparsity=0.5, masks={"fc.weight": mask})


def _hand_inbounds(kh: int, kw: int, h: int, w: int) -> int:
    """In-bounds taps of a stride-1 'same' kh x kw conv on an h x w map, by brute force over positions."""
    total = 0
    for oy in range(h):
        for ox in range(w):
            for ty in range(kh):
                for tx in range(kw):
                    iy, ix = oy + ty - kh // 2, ox + tx - kw // 2
                    total += 0 <= iy < h and 0 <= ix < w
    return total


@pytest.mark.parametrize("form", ["train", "strips", "dense"])
def test_large_kernel_counted_in_every_form(form):
    """Defect: the reparameterized two-strip form ran its strips as functions, so the counter missed them."""
    from slaknet.layers import LargeKernelConv

    c, m, n, h, w = 3, 7, 3, 5, 6
    layer = LargeKernelConv(c, m, small_kernel=n).eval()
    if form != "train":
        layer.reparameterize(merge_dense=form == "dense")
    shapes = {"train": [(m, n), (n, m), (n, n)], "strips": [(m, n), (n, m)], "dense": [(m, m)]}[form]
    counts = count_model(layer, (h, w), in_chans=c)
    assert counts.macs_inbounds == c * sum(_hand_inbounds(kh, kw, h, w) for kh, kw in shapes)
    assert counts.macs_dense == c * h * w * sum(kh * kw for kh, kw in shapes)


def test_slak_pico_strip_form_counts_all_strips():
    """slak_pico at 128 px: the strip form's in-bounds MACs are the training form's minus exactly the
    small kernels' (folded into the strips), not ~11M fewer as before."""
    model = slaknet.create_model("slak_pico").eval()
    train = count_model(model, 128)
    strips = count_model(slaknet.reparameterize_model(model), 128)
    small = 0
    for i, (d, wd) in enumerate(zip(model.depths, model.dims)):
        size = 128 // 4 // 2 ** i
        small += d * wd * _hand_inbounds(5, 5, size, size)
    assert strips.macs_inbounds == train.macs_inbounds - small


def test_counts_print_in_units_that_fit():
    from slaknet.analysis.counting import count_model, human_count

    assert [human_count(n) for n in (7, 1234, 1_082_050, 8_110_000_000)] == ["7", "1.23 K", "1.08 M", "8.11 G"]
    text = count_model(slaknet.create_model("slak_pico"), 32).table()
    assert "0.00 G" not in text and " M" in text  # a 32 px slak_pico has a few million MACs, not "0.00 G"


def test_counting_asks_auto_no_training_question(tmp_path, monkeypatch):
    """Counting runs one no-grad forward on the plain depthwise kernel: it never makes `auto` time (and cache)
    batch-1 training shapes that the run itself does not use."""
    import timm

    from slaknet.layers import autotune

    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv(autotune.ENV_BUDGET, "60")
    monkeypatch.delenv("SLAKNET_LINEAR", raising=False)
    monkeypatch.delenv("SLAKNET_DWCONV", raising=False)
    autotune.reset()
    try:
        model = timm.create_model("slak_pico", num_classes=3).train()
        count_model(model, 64)
        assert model.training  # restored
        asked = [k for k in autotune.decisions() if "/train/" in k or k.startswith("dwconv/")]
        assert asked == []
    finally:
        autotune.reset()
