"""Built-in insideness dataset: determinism, splits, labels checked by an independent flood fill, PNG dump,
and the image-folder reader (corrupt files skipped and counted, one-line errors)."""
from __future__ import annotations

import logging
import os
from collections import deque

import numpy as np
import pytest
import torch

from slaknet.errors import ConfigError
from slaknet.data import InsidenessDataset, SafeImageFolder, dump_pngs, list_image_files, render_insideness


def _flood_outside(img: np.ndarray) -> tuple[bool, bool]:
    """Independent label: flood-fill the non-contour pixels 4-connectedly from the image border and see
    whether the red dot is reached (outside). Returns (dot_reached, dot_found)."""
    f = img.astype(np.float64) / 255.0
    red = (f[..., 0] > 0.6) & (f[..., 1] < 0.45) & (f[..., 2] < 0.45) & (f[..., 0] - f[..., 1] > 0.3)
    grey = f.mean(-1)
    g = grey[~red]
    lo, hi = np.percentile(g, 5), np.percentile(g, 99.9)
    wall = (grey > lo + 0.3 * (hi - lo)) & ~red
    h, w = grey.shape
    seen = np.zeros((h, w), bool)
    q = deque()
    for y in range(h):
        for x in (0, w - 1):
            if not wall[y, x] and not seen[y, x]:
                seen[y, x] = True
                q.append((y, x))
    for x in range(w):
        for y in (0, h - 1):
            if not wall[y, x] and not seen[y, x]:
                seen[y, x] = True
                q.append((y, x))
    while q:
        y, x = q.popleft()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w and not seen[yy, xx] and not wall[yy, xx]:
                seen[yy, xx] = True
                q.append((yy, xx))
    if not red.any():
        return False, False
    ys, xs = np.nonzero(red)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    return bool(seen[cy, cx]), True


@pytest.mark.parametrize("difficulty", [0.0, 0.5])
def test_labels_agree_with_flood_fill(difficulty):
    agree, n = 0, 40
    for i in range(n):
        img, label = render_insideness(3, "train", i, 64, difficulty)
        reached, found = _flood_outside(img)
        assert found, f"sample {i}: no red marker found"
        agree += int(reached == (label == 0))
    assert agree >= n - 1, f"only {agree}/{n} labels agree with an independent flood fill"


def test_deterministic_and_splits_disjoint():
    a = InsidenessDataset("train", 4, 64, 0.5, seed=1, cache=False)
    b = InsidenessDataset("train", 4, 64, 0.5, seed=1)
    for i in range(4):
        assert np.array_equal(a.raw(i)[0], b.raw(i)[0]) and a.raw(i)[1] == b.raw(i)[1]
    v = InsidenessDataset("val", 4, 64, 0.5, seed=1)
    c = InsidenessDataset("train", 4, 64, 0.5, seed=2)
    assert not any(np.array_equal(a.raw(i)[0], v.raw(i)[0]) for i in range(4))
    assert not any(np.array_equal(a.raw(i)[0], c.raw(i)[0]) for i in range(4))


def test_sizes_balance_and_tensor_output():
    for size in (32, 96):
        img, _ = render_insideness(0, "val", 0, size, 1.0)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    ds = InsidenessDataset("train", 100, 64, 0.5, seed=0)
    labels = [ds.raw(i)[1] for i in range(100)]
    assert 30 <= sum(labels) <= 70
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1


def test_marker_position_carries_no_label():
    # the marker is placed before the contour: its distance from the image centre must not give the label
    d = {0: [], 1: []}
    for i in range(120):
        img, label = render_insideness(5, "train", i, 48, 0.5)
        f = img.astype(float)
        red = (f[..., 0] > 150) & (f[..., 1] < 110)
        ys, xs = np.nonzero(red)
        d[label].append(np.hypot(xs.mean() - 24, ys.mean() - 24))
    assert abs(np.mean(d[0]) - np.mean(d[1])) < 3.0


def test_dump_pngs(tmp_path):
    from PIL import Image

    ds = InsidenessDataset("val", 5, 32, 0.5, seed=0)
    paths = dump_pngs(ds, str(tmp_path), 3)
    assert len(paths) == 3
    for i, p in enumerate(paths):
        img, label = ds.raw(i)
        assert p.endswith(f"_{ds.classes[label]}.png")
        assert np.array_equal(np.array(Image.open(p)), img)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="difficulty"):
        InsidenessDataset(difficulty=2.0)
    with pytest.raises(ConfigError, match="image size"):
        InsidenessDataset(image_size=8)
    with pytest.raises(ConfigError, match="split"):
        InsidenessDataset(split="dev")


def _write_folder(root, classes=("a", "b"), n=3, corrupt=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    if corrupt:
        with open(os.path.join(root, corrupt), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not really a png")


def test_image_folder_skips_and_counts_corrupt(tmp_path, caplog):
    _write_folder(str(tmp_path), corrupt="a/zz_broken.png")
    ds = SafeImageFolder(str(tmp_path), transform=None, report_bad=True)
    assert len(ds) == 7 and ds.classes == ["a", "b"]
    with caplog.at_level(logging.WARNING, logger="slaknet.train"):
        items = [ds[i] for i in range(len(ds))]
    assert "zz_broken" in caplog.text and "UserWarning" not in caplog.text  # one logged line
    assert sum(b for _, _, b in items) == 1
    assert ds.num_bad == 1
    # the broken sample (a/zz_broken, index 3) was replaced by the next readable one (b/0)
    assert items[3][1] == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list_image_files(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty_root")
    with pytest.raises(ConfigError, match="no class folders"):
        list_image_files(str(tmp_path / "empty_root"))
    _write_folder(str(tmp_path / "d"))
    os.makedirs(tmp_path / "d" / "c")
    with pytest.raises(ConfigError, match="holds no images"):
        list_image_files(str(tmp_path / "d"))


def test_persisted_builtin_images_are_the_rendered_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAKNET_CACHE_DIR", str(tmp_path))
    a = InsidenessDataset("val", 12, 32, 0.5, seed=4, persist=True)
    assert not a.loaded
    first = [a.raw(i) for i in range(12)]  # the last one completes the split: written to disk
    files = os.listdir(tmp_path / "data")
    assert len(files) == 1 and files[0].startswith("insideness-val-32px-12-")
    b = InsidenessDataset("val", 12, 32, 0.5, seed=4, persist=True)
    assert b.loaded
    for i, (img, label) in enumerate(first):
        got, got_label = b.raw(i)
        assert got_label == label and np.array_equal(got, img)
        assert np.array_equal(got, render_insideness(4, "val", i, 32, 0.5)[0])
    assert not InsidenessDataset("val", 12, 32, 0.6, seed=4, persist=True).loaded  # other data: other file
    assert not InsidenessDataset("val", 11, 32, 0.5, seed=4, persist=True).loaded
    (tmp_path / "data" / files[0]).write_bytes(b"garbage")
    assert not InsidenessDataset("val", 12, 32, 0.5, seed=4, persist=True).loaded  # unreadable: rendered again
    monkeypatch.setenv("SLAKNET_CACHE_DIR", "off")
    c = InsidenessDataset("val", 2, 32, 0.5, seed=5, persist=True)
    c.raw(0), c.raw(1)
    assert not c.loaded and len(os.listdir(tmp_path / "data")) == 1


def test_getitems_is_getitem_for_the_whole_batch():
    """The batched path gives the same tensors bit for bit and draws the same random flips in the same order."""
    from slaknet.data import BUILTIN_MEAN, BUILTIN_STD, Compose, FlipRot, Normalize

    norm = Normalize(BUILTIN_MEAN, BUILTIN_STD)
    for tf in (Compose([FlipRot(), norm]), norm, None, Compose([norm]), FlipRot(), Compose([norm, FlipRot()])):
        ds = InsidenessDataset("train", 40, 32, 0.5, seed=2, transform=tf)
        idx = [3, 0, 17, 39, 5, 5, 22, 11]
        torch.manual_seed(7)
        one = [ds[i] for i in idx]
        after_one = torch.rand(1)
        torch.manual_seed(7)
        many = ds.__getitems__(idx)
        assert torch.equal(torch.rand(1), after_one)  # the same number of draws
        assert len(many) == len(one)
        for (a, la), (b, lb) in zip(one, many):
            assert la == lb and a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_wrappers_do_not_expose_the_batched_fetch():
    """DataLoader calls ``__getitems__`` when the dataset has one: wrappers with their own items must not pass
    the wrapped dataset's on, and a subclass with its own ``__getitem__`` falls back to it."""
    from slaknet.distill.cache import WithIndex
    from slaknet.train.samplers import SeededItems

    ds = InsidenessDataset("val", 4, 32, 0.5, seed=1)
    for wrapper in (WithIndex(ds), SeededItems(ds, 0, 0)):
        assert not hasattr(wrapper, "__getitems__")
        assert wrapper.split == "val"  # ordinary attributes still come through

    class Tagged(InsidenessDataset):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return x, y, "tag"

    items = Tagged("val", 4, 32, 0.5, seed=1).__getitems__([0, 1])
    assert [it[2] for it in items] == ["tag", "tag"]
