"""Datasets for ``slaknet train``: a built-in long-range benchmark, image folders, torchvision datasets.

The built-in benchmark (:class:`InsidenessDataset`, ``--data builtin:insideness``) needs no download:
every image is drawn procedurally from ``(seed, split, index)``. Each image shows one closed, wiggly
contour and one red marker dot; the label says whether the dot lies inside (1) or outside (0) the contour.
Deciding that needs information from far away from the dot (the contour may be half an image away and
its local shape alone is ambiguous), which is what large receptive fields are for. Be careful with claims,
though: a net's stem and downsampling alone can give a small-kernel net a receptive field larger than a
small image, so compare architectures at equal depth, width, normalization, training time and seeds.

``difficulty`` in [0, 1] scales the contour's wiggliness (number and amplitude of harmonics), the
background clutter (open distractor arcs) and the pixel noise. The ``val`` split uses disjoint seeds.

Image folders (ImageNet layout ``ROOT/train/CLASS/*.jpg``, ``ROOT/val/CLASS/*.jpg``) go through
:class:`SafeImageFolder`, which skips unreadable / corrupt images with a warning and counts them.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torchvision.transforms as _tvt
from torch.utils.data import Dataset

from slaknet.errors import ConfigError

BUILTIN_MEAN = BUILTIN_STD = (0.5, 0.5, 0.5)  # the built-in insideness images are normalised to [-1, 1]

__all__ = ["InsidenessDataset", "SafeImageFolder", "render_insideness", "dump_pngs", "BUILTIN_TASKS",
           "IMG_EXTENSIONS", "parse_data_spec", "list_image_files"]

log = logging.getLogger("slaknet.train")

BUILTIN_TASKS = ("insideness",)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLITS = {"train": 0, "val": 1, "test": 2}


# ------------------------------------------------------------------------------------- built-in task ----
@functools.lru_cache(maxsize=None)
def _angles() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """theta (720 angles), cos(theta), sin(theta): the same for every curve (computed once, read-only)."""
    theta = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    out = (theta, np.cos(theta), np.sin(theta))
    for t in out:
        t.flags.writeable = False
    return out


@functools.lru_cache(maxsize=None)
def _harmonic_angles(n_harm: int) -> Tuple[np.ndarray, np.ndarray]:
    """ks = 2..n_harm+1 and ks[:, None] * theta[None] (read-only, shared by all curves with n_harm harmonics)."""
    ks = np.arange(2, 2 + n_harm, dtype=np.float64)
    kt = ks[:, None] * _angles()[0][None]
    ks.flags.writeable = kt.flags.writeable = False
    return ks, kt


def _curve_params(rng: np.random.Generator, size: int, difficulty: float,
                  center: Optional[Tuple[float, float]] = None) -> Dict[str, Any]:
    """The random draws of :func:`_curve` before its base radius: harmonics, phases and centre."""
    n_harm = 2 + int(round(difficulty * 5))
    amp = 0.18 + 0.32 * difficulty
    ks, kt = _harmonic_angles(n_harm)
    a = rng.uniform(0.2, 1.0, n_harm) / np.sqrt(ks - 1)
    a *= amp / a.sum()
    phi = rng.uniform(0, 2 * math.pi, n_harm)
    if center is None:
        center = (rng.uniform(0.38, 0.62) * size, rng.uniform(0.38, 0.62) * size)
    return dict(ks=ks, kt=kt, a=a, phi=phi, cx=center[0], cy=center[1])


def _curve_r_max(p: Dict[str, Any], size: int) -> float:
    """The largest base radius that keeps the whole curve 2 px inside the frame: the smallest of the quotients
    (frame distance / direction) over all angles and both axes (min is exact in any order)."""
    _, cos_t, sin_t = _angles()
    shape = 1.0 + (p["a"][:, None] * np.cos(p["kt"] + p["phi"][:, None])).sum(0)
    r_max = math.inf
    for d, c in ((cos_t * shape, p["cx"]), (sin_t * shape, p["cy"])):
        pos, neg = d > 1e-9, d < -1e-9
        if pos.any():
            r_max = min(r_max, float(((size - 3 - c) / d[pos]).min()))
        if neg.any():
            r_max = min(r_max, float(((2 - c) / d[neg]).min()))
    return r_max


def _curve_done(p: Dict[str, Any], size: int, r0_draw: float) -> Dict[str, Any]:
    return dict(ks=p["ks"], a=p["a"], phi=p["phi"], cx=p["cx"], cy=p["cy"], r0=min(_curve_r_max(p, size), r0_draw))


def _curve(rng: np.random.Generator, size: int, difficulty: float,
           center: Optional[Tuple[float, float]] = None, scale: float = 1.0) -> Dict[str, Any]:
    """Random star-shaped closed curve r(theta) = R0 (1 + sum_k a_k cos(k theta + phi_k)).

    Computes exactly what the straightforward version does (same random draws, same float operations per
    element): the angle grids are computed once, and the largest base radius is a minimum over the same
    quotients taken without the per-angle temporary array.
    """
    p = _curve_params(rng, size, difficulty, center)
    return _curve_done(p, size, rng.uniform(0.30, 0.42) * size * scale)


def _surely_rejected(p: Dict[str, Any], r0_hi: float, pt: Tuple[float, float], margin: float, label: int,
                     size: int) -> bool:
    """Whether the dot test of :func:`render_insideness` fails for this candidate whatever its base radius
    ``r0 = min(r_max, r0_hi)`` turns out to be, so that ``r_max`` (720 angles) need not be computed.

    The test passes iff ``label`` and ``r0 g - rho >= M`` or not ``label`` and ``rho - r0 g >= M``, with g the
    curve's shape at the dot's angle, rho the dot's distance from the centre and ``M = margin sqrt(1 +
    (g'/g)^2)``: monotone in r0, which lies in ``[min(lo, r0_hi), r0_hi]`` with ``lo`` = the frame distance
    of the centre over the largest possible shape (``1 + sum a``). Only a failure by more than 1e-6 (float
    rounding is ~1e-13 here) counts as sure; anything else is decided by the exact test.
    """
    dx, dy = pt[0] - p["cx"], pt[1] - p["cy"]
    rho = math.hypot(dx, dy)
    arg = p["ks"] * math.atan2(dy, dx) + p["phi"]
    g = 1.0 + float((p["a"] * np.cos(arg)).sum())
    gp = float((p["a"] * p["ks"] * np.sin(arg)).sum())
    if g <= 1e-3:
        return False
    m = margin * math.sqrt(1.0 + (gp / g) ** 2)
    if label:  # the largest possible r0 must already fall short
        return r0_hi * g + 1e-6 < rho + m
    frame = min(size - 3 - p["cx"], p["cx"] - 2, size - 3 - p["cy"], p["cy"] - 2)
    lo = min(frame / (1.0 + float(p["a"].sum())), r0_hi)
    return lo > 0 and rho - lo * g + 1e-6 < m  # the smallest possible r0 must already fail


def _radius(c: Dict[str, Any], theta: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """r(theta) and dr/dtheta."""
    arg = c["ks"][:, None] * theta.reshape(1, -1) + c["phi"][:, None]
    r = c["r0"] * (1.0 + (c["a"][:, None] * np.cos(arg)).sum(0))
    dr = -c["r0"] * ((c["a"] * c["ks"])[:, None] * np.sin(arg)).sum(0)
    return r.reshape(theta.shape), dr.reshape(theta.shape)


def _curve_distance(c: Dict[str, Any], xs: np.ndarray, ys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Approximate perpendicular distance of points to the curve, and signed radial offset (<0 inside)."""
    dx, dy = xs - c["cx"], ys - c["cy"]
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    r, dr = _radius(c, theta)
    off = rho - r
    return np.abs(off) / np.sqrt(1.0 + (dr / np.maximum(r, 1e-6)) ** 2), off


def render_insideness(seed: int, split: str, index: int, size: int = 64,
                      difficulty: float = 0.5) -> Tuple[np.ndarray, int]:
    """One sample of the insideness task: ``(HxWx3 uint8 image, label)``; deterministic in its arguments."""
    rng = np.random.default_rng([int(seed), _SPLITS[split], int(index), 0x51A4])
    label = int(rng.integers(2))
    width = max(1.0, size / 64.0) * (1.0 + 0.4 * rng.random())
    margin = max(2.0, size * (0.06 - 0.03 * difficulty)) + width
    # The dot is placed uniformly first and the contour is then drawn until the dot falls on the wanted
    # side, so the dot's position in the frame says nothing about the label (no centre/corner shortcut).
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    pt = (float(rng.uniform(0.12, 0.88) * size), float(rng.uniform(0.12, 0.88) * size))
    c = None
    for _ in range(400):
        # the draws of _curve(rng, size, difficulty, scale=..., center=...), in the same order; the base
        # radius (a minimum over 720 angles) is only computed for candidates the dot test may accept
        scale = rng.uniform(0.55, 1.0)
        params = _curve_params(rng, size, difficulty, (rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size))
        r0_draw = rng.uniform(0.30, 0.42) * size * scale
        if _surely_rejected(params, r0_draw, pt, margin, label, size):
            continue
        cand = _curve_done(params, size, r0_draw)
        d, off = _curve_distance(cand, np.array([pt[0]]), np.array([pt[1]]))
        if d[0] >= margin and (off[0] < 0) == bool(label):
            c = cand
            break
    if c is None:  # rare: move the dot along a ray from the last contour's centre instead
        c = _curve_done(params, size, r0_draw)
        t = rng.uniform(0, 2 * math.pi)
        r, _ = _radius(c, np.array([t]))
        rho = r[0] * 0.5 if label else r[0] + margin
        pt = (float(np.clip(c["cx"] + rho * math.cos(t), 1, size - 1)),
              float(np.clip(c["cy"] + rho * math.sin(t), 1, size - 1)))
    # background, clutter and contour (grey levels with random contrast)
    bg = rng.uniform(0.0, 0.35)
    fg = rng.uniform(0.65, 1.0)
    ink = np.zeros((size, size))
    d, _ = _curve_distance(c, xx, yy)
    ink = np.maximum(ink, np.clip(width / 2 + 0.5 - d, 0.0, 1.0))
    n_arcs = int(round(difficulty * 3 * rng.random()))
    for _ in range(n_arcs):  # open arcs: pieces of other curves, so "a line nearby" is no shortcut
        o = _curve(rng, size, difficulty, scale=rng.uniform(0.3, 0.7),
                   center=(rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size))
        start, span = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.6)
        ang = np.arctan2(yy - o["cy"], xx - o["cx"])
        on = np.mod(ang - start, 2 * math.pi) < span
        da, _ = _curve_distance(o, xx, yy)
        dd, _ = _curve_distance(o, np.array([pt[0]]), np.array([pt[1]]))
        if dd[0] < margin:  # keep the marker clear of distractors too
            continue
        ink = np.maximum(ink, on * np.clip(width / 2 + 0.5 - da, 0.0, 1.0))
    img = np.empty((size, size, 3))
    img[:] = bg + (fg - bg) * ink[..., None]
    rad = max(1.5, size / 40.0)
    dot = np.clip(rad + 0.5 - np.hypot(xx - pt[0], yy - pt[1]), 0.0, 1.0)[..., None]
    img = img * (1 - dot) + dot * np.array([1.0, 0.1, 0.1])
    img += rng.normal(0.0, 0.02 + 0.06 * difficulty, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def _persist_path(ds: "InsidenessDataset") -> Optional[str]:
    """The disk-cache file of a built-in split (None when ``SLAKNET_CACHE_DIR=off``): named by a hash of
    everything the images depend on, including the rendering code itself and numpy's version."""
    import hashlib
    import inspect

    from slaknet.io import cache_dir

    folder = cache_dir()
    if folder is None:
        return None
    try:
        code = "".join(inspect.getsource(f) for f in (render_insideness, _curve, _curve_params, _curve_r_max,
                                                       _curve_done, _surely_rejected, _radius, _curve_distance,
                                                       _angles, _harmonic_angles))
    except (OSError, TypeError):  # no source files (e.g. a frozen install): no disk cache, render as always
        return None
    ident = repr((ds.seed, ds.split, ds.num_samples, ds.image_size, ds.difficulty, np.__version__, code))
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return os.path.join(folder, "data", f"insideness-{ds.split}-{ds.image_size}px-{ds.num_samples}-{digest}.npz")


class InsidenessDataset(Dataset):
    """Built-in long-range benchmark: is the red dot inside the closed contour? (classes outside/inside).

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint seeds).
        num_samples: images in this split.
        image_size: side in pixels (16-512; 32-256 recommended).
        difficulty: 0 (smooth blob, clean) to 1 (wiggly contour, distractor arcs, noise).
        seed: dataset seed (independent of the training seed).
        transform: optional callable on the ``[3, H, W]`` float tensor in [0, 1].
        cache: keep rendered images in memory (uint8), so later epochs cost nothing.
        persist: also keep them on disk (with ``cache``): once every image of the split has been rendered,
            the images are written to ``$SLAKNET_CACHE_DIR/data`` (default ``~/.cache/slaknet/data``; not
            written when ``SLAKNET_CACHE_DIR=off``), and a later dataset with the same seed, split, size,
            difficulty and count, the same rendering code and the same numpy version loads them instead of
            rendering (:attr:`loaded` is then True). The images are the ones rendering gives, byte for byte.
    """

    classes = ["outside", "inside"]

    def __init__(self, split: str = "train", num_samples: int = 6000, image_size: int = 64,
                 difficulty: float = 0.5, seed: int = 0, transform: Optional[Callable] = None,
                 cache: bool = True, persist: bool = False) -> None:
        if split not in _SPLITS:
            raise ConfigError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if not 16 <= int(image_size) <= 512:
            raise ConfigError(f"built-in dataset image size must be in [16, 512], got {image_size}")
        if not 0.0 <= float(difficulty) <= 1.0:
            raise ConfigError(f"difficulty must be in [0, 1], got {difficulty}")
        if int(num_samples) < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.split, self.num_samples = split, int(num_samples)
        self.image_size, self.difficulty, self.seed = int(image_size), float(difficulty), int(seed)
        self.transform = transform
        self.cache = cache
        self._cache: Dict[int, Tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._persist_path = _persist_path(self) if (cache and persist) else None
        self.loaded = self._persist_path is not None and self._load_persisted()

    def _load_persisted(self) -> bool:
        path = self._persist_path
        if path is None or not os.path.isfile(path):
            return False
        try:
            with np.load(path) as f:
                images, labels = f["images"], f["labels"]
        except Exception as exc:  # corrupt / unreadable: render again (and rewrite it)
            log.info("built-in data: ignoring unreadable cache file %s (%s)", path, exc)
            return False
        n, s = self.num_samples, self.image_size
        if images.shape != (n, s, s, 3) or images.dtype != np.uint8 or labels.shape != (n,):
            log.info("built-in data: ignoring cache file %s of the wrong shape", path)
            return False
        self._cache = {i: (images[i], int(labels[i])) for i in range(n)}
        self._persist_path = None  # nothing left to write
        return True

    def _write_persisted(self) -> None:
        """Write every rendered image (all are in memory) to the cache file, atomically; best effort."""
        path, self._persist_path = self._persist_path, None
        if path is None:
            return
        from slaknet.io import atomic_path

        try:
            images = np.stack([self._cache[i][0] for i in range(self.num_samples)])
            labels = np.array([self._cache[i][1] for i in range(self.num_samples)], dtype=np.int64)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, images=images, labels=labels)
        except OSError as exc:  # read-only or full disk: the run goes on with the images in memory
            log.info("built-in data: could not write the cache file %s (%s)", path, exc)

    def __len__(self) -> int:
        return self.num_samples

    def raw(self, index: int) -> Tuple[np.ndarray, int]:
        """The uint8 HxWx3 image and label of ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        hit = self._cache.get(index)
        if hit is None:
            hit = render_insideness(self.seed, self.split, index, self.image_size, self.difficulty)
            if self.cache:
                with self._lock:
                    self._cache[index] = hit
                    complete = self._persist_path is not None and len(self._cache) == self.num_samples
                if complete:
                    self._write_persisted()
        return hit

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img, label = self.raw(index)
        x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, label

    def __getitems__(self, indices: List[int]) -> List[Tuple[torch.Tensor, int]]:
        """``[self[i] for i in indices]``, computed for the whole batch at once where the transform allows
        (none, :class:`Normalize`, or :class:`Compose` of :class:`FlipRot` / :class:`Normalize`, the built-in
        pipelines): per image only the flip draw (same random numbers, same order) and a flip of the uint8
        pixels; the conversion to float, /255 and the normalisation run once on the batch. The same values
        bit for bit (the same correctly rounded elementwise operations, flips commute with them); PyTorch's
        DataLoader calls it for a batch (~10 ms less per demo batch of 64 than item by item)."""
        steps = _batch_steps(self.transform)
        if steps is None or not indices or type(self).__getitem__ is not InsidenessDataset.__getitem__:
            return [self[i] for i in indices]
        flip = bool(steps) and isinstance(steps[0], FlipRot)
        imgs, labels = [], []
        for i in indices:
            img, label = self.raw(int(i))
            t = torch.from_numpy(img).permute(2, 0, 1)
            imgs.append(dihedral(t, int(torch.randint(0, 8, (1,)).item())) if flip else t)
            labels.append(label)
        xb = torch.stack(imgs).float().div_(255.0)
        for step in steps[1:] if flip else steps:
            xb = step(xb)
        return list(zip(xb.unbind(0), labels))

    def describe(self) -> str:
        return (f"built-in insideness task, split {self.split}: {self.num_samples} images "
                f"{self.image_size}x{self.image_size}, difficulty {self.difficulty}, seed {self.seed}")


def dump_pngs(dataset: InsidenessDataset, out_dir: str, count: int = 16) -> List[str]:
    """Write the first ``count`` images of ``dataset`` as PNGs named ``{index}_{class}.png``; returns paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(min(count, len(dataset))):
        img, label = dataset.raw(i)
        p = os.path.join(out_dir, f"{dataset.split}_{i:05d}_{dataset.classes[label]}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def dihedral(x: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r``-th (0-7) of the 8 flips/transposes of the last two axes (the square's symmetries)."""
    if r & 1:
        x = x.flip(-1)
    if r & 2:
        x = x.flip(-2)
    if r & 4:
        x = x.transpose(-1, -2)
    return x


class FlipRot:
    """Random horizontal/vertical flip and 90-degree rotation of a CHW tensor (insideness is invariant)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return dihedral(x, int(torch.randint(0, 8, (1,)).item()))


def _batch_steps(transform: Optional[Callable]) -> Optional[List[Any]]:
    """The transform as a list of steps that :meth:`InsidenessDataset.__getitems__` can run on a batch
    (an optional leading :class:`FlipRot`, then :class:`Normalize` steps), or None."""
    if transform is None:
        return []
    steps = list(transform.transforms) if type(transform) is Compose else [transform]
    ok = all(type(t) is Normalize for t in steps[1:]) and (type(steps[0]) in (FlipRot, Normalize) if steps else True)
    return steps if ok else None


# torchvision's transforms work on CHW tensors and compute exactly ``(x - mean) / std`` like the hand-written
# ones they replace (the built-in data's trajectory is unchanged); FlipRot stays: torchvision has no
# uniform draw over the square's 8 symmetries in one random number.
Normalize = _tvt.Normalize
Compose = _tvt.Compose


# -------------------------------------------------------------------------------------- image folders --
def list_image_files(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Classes (sub-folder names, sorted) and ``(path, class_index)`` samples of an image-folder root.

    Raises ConfigError (one line) for a missing root, no class folders, or an empty class folder.
    """
    if not os.path.isdir(root):
        raise ConfigError(f"data folder {root!r} does not exist (expected ROOT/CLASS/*.jpg)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(f"no class folders in {root!r} (expected ROOT/CLASS/*.jpg)")
    samples: List[Tuple[str, int]] = []
    for ci, c in enumerate(classes):
        files = []
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            files += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            raise ConfigError(f"class folder {os.path.join(root, c)!r} holds no images "
                              f"({', '.join(IMG_EXTENSIONS[:4])}, ...); remove it or add images")
        samples += [(f, ci) for f in files]
    return classes, samples


class SafeImageFolder(Dataset):
    """ImageNet-layout folder dataset that skips unreadable images instead of crashing the run.

    A corrupt or unreadable file is reported once (warning) and replaced by the next readable sample;
    ``bad_files`` lists them and ``num_bad`` counts them (per process). With ``report_bad=True`` an item is
    ``(x, target, bad)`` (unreadable files met on the way); with ``with_index=True`` also the index of the
    first of them (-1 if none), so a trainer can count *distinct* files across worker processes, ranks and
    epochs, and put them into ``known_bad`` (indices skipped without being read again).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, classes: Optional[List[str]] = None,
                 report_bad: bool = False, with_index: bool = False) -> None:
        found, samples = list_image_files(root)
        if classes is not None and found != list(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise ConfigError(f"class folders of {root!r} differ from the training classes "
                              f"(missing {missing[:3]}, extra {extra[:3]})")
        self.root, self.classes, self.samples = root, found, samples
        self.class_to_idx = {c: i for i, c in enumerate(found)}
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.report_bad, self.with_index = report_bad, with_index
        self.bad_files: List[str] = []
        self.known_bad: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img.convert("RGB")

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        n = len(self.samples)
        bad, first = 0, -1
        for k in range(min(n, 50)):
            path, target = self.samples[(index + k) % n]
            if (index + k) % n in self.known_bad:
                continue  # known unreadable: neither read nor counted again
            try:
                img = self._load(path)
            except Exception as exc:  # PIL raises many types for damaged files
                bad += 1
                first = (index + k) % n if first < 0 else first
                if path not in self.bad_files:
                    self.bad_files.append(path)
                    log.warning("skipping unreadable image %s: %s: %s", path, type(exc).__name__,
                                str(exc).splitlines()[0] if str(exc) else "")
                continue
            x = self.transform(img) if self.transform is not None else img
            if self.with_index:
                return x, target, bad, first
            return (x, target, bad) if self.report_bad else (x, target)
        raise RuntimeError(f"50 consecutive unreadable images in {self.root!r} around index {index}")

    @property
    def num_bad(self) -> int:
        return len(self.bad_files)

    def describe(self) -> str:
        return f"image folder {self.root}: {len(self.samples)} images, {len(self.classes)} classes"


def parse_data_spec(spec: str) -> Tuple[str, str]:
    """``builtin:insideness`` -> ("builtin", "insideness"); ``torchvision:CIFAR10`` ->
    ("torchvision", "CIFAR10"); anything else is an image-folder path ("folder", path)."""
    if spec.startswith("builtin:") or spec in BUILTIN_TASKS:
        task = spec.split(":", 1)[1] if ":" in spec else spec
        if task not in BUILTIN_TASKS:
            raise ConfigError(f"unknown built-in dataset {task!r}; available: {', '.join(BUILTIN_TASKS)}")
        return "builtin", task
    if spec.startswith("torchvision:"):
        return "torchvision", spec.split(":", 1)[1]
    return "folder", spec
