"""A study-specific insideness task: "is the image centre inside the closed contour?".

Why not the training benchmark (:class:`slaknet.data.InsidenessDataset`) as is: there the marker
dot can sit anywhere and the contour may pass close to it, so the reach a net needs is uncontrolled, and a
global-average-pool head can read the answer from the contour's size without ever relating it to the dot.
Here the query point is always the image centre (the model reads its answer at the centre position of its
feature map, no pooling), and every contour pixel, distractor arcs included, keeps a distance between
``d_min`` and ``d_max`` (fractions of the image side) from the centre. A net whose receptive field around
the centre is smaller than ``d_min`` sees only background and noise there, so it cannot beat chance; a
net that reaches ``d_max`` sees the nearest contour. That turns "needs long range" into a number.

Images are single-channel (grey contour on a grey background with noise), drawn deterministically from
``(seed, split, index)``; the ``val`` split uses disjoint random streams.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from slaknet.errors import ConfigError
from slaknet.data import dihedral

__all__ = ["render_centre_insideness", "CentreInsideness"]

_SPLITS = {"train": 0, "val": 1, "test": 2}
_THETA = np.linspace(0.0, 2.0 * math.pi, 720, endpoint=False)


def _random_shape(rng: np.random.Generator, difficulty: float) -> Dict[str, np.ndarray]:
    """Harmonics of a star-shaped closed curve r(t) = r0 (1 + sum a_k cos(k t + phi_k))."""
    n = 2 + int(round(difficulty * 4))
    ks = np.arange(2, 2 + n, dtype=np.float64)
    a = rng.uniform(0.2, 1.0, n) / np.sqrt(ks - 1)
    a *= (0.04 + 0.16 * difficulty) / a.sum()   # total amplitude <= 0.2: r > 0, the curve stays simple
    return dict(ks=ks, a=a, phi=rng.uniform(0, 2 * math.pi, n))


def _radius(shape: Dict[str, np.ndarray], r0: float, theta: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    arg = shape["ks"][:, None] * theta.reshape(1, -1) + shape["phi"][:, None]
    r = r0 * (1.0 + (shape["a"][:, None] * np.cos(arg)).sum(0))
    dr = -r0 * ((shape["a"] * shape["ks"])[:, None] * np.sin(arg)).sum(0)
    return r.reshape(theta.shape), dr.reshape(theta.shape)


def _ink(shape: Dict[str, np.ndarray], r0: float, cx: float, cy: float, xx: np.ndarray, yy: np.ndarray,
         width: float) -> np.ndarray:
    """Anti-aliased stroke of the curve (radial distance corrected by the slope: ~perpendicular)."""
    dx, dy = xx - cx, yy - cy
    rho, t = np.hypot(dx, dy), np.arctan2(dy, dx)
    r, dr = _radius(shape, r0, t)
    d = np.abs(rho - r) / np.sqrt(1.0 + (dr / np.maximum(r, 1e-6)) ** 2)
    return np.clip(width / 2 + 0.5 - d, 0.0, 1.0)


def _place(rng: np.random.Generator, size: int, difficulty: float, inside: bool, lo: float, hi: float,
           width: float, tries: int = 2000) -> Optional[Tuple[Dict[str, np.ndarray], float, float, float, float]]:
    """A closed contour with the centre inside (or outside) it, its nearest point ``lo``-``hi`` px from
    the centre and the whole stroke inside the frame: ``(shape, r0, cx, cy, distance)`` or None."""
    q = size / 2.0
    pad = 2.0 + width
    for _ in range(tries):
        shape = _random_shape(rng, difficulty)
        if inside:
            # centre near the query; base radius aimed at a nearest-point distance drawn from [lo, hi]
            ang, off = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.04) * size
            cx, cy = q + off * math.cos(ang), q + off * math.sin(ang)
            smin = float(_radius(shape, 1.0, _THETA)[0].min())
            r0 = (rng.uniform(lo, hi) + width / 2 + off) / smin
        else:
            # a contour beside the centre: its nearest point aimed at a distance drawn from [lo, hi]
            r0 = rng.uniform(0.06, 0.3) * size
            ang, t = rng.uniform(0, 2 * math.pi), rng.uniform(lo, hi) + width / 2
            cx, cy = q + (t + r0) * math.cos(ang), q + (t + r0) * math.sin(ang)
        r, _ = _radius(shape, r0, _THETA)
        px, py = cx + r * np.cos(_THETA), cy + r * np.sin(_THETA)
        if px.min() < pad or py.min() < pad or px.max() > size - pad or py.max() > size - pad:
            continue
        dist = float(np.hypot(px - q, py - q).min()) - width / 2
        rq, _ = _radius(shape, r0, np.array([math.atan2(q - cy, q - cx)]))
        if (math.hypot(q - cx, q - cy) < float(rq[0])) == inside and lo <= dist <= hi:
            return shape, r0, cx, cy, dist
    return None


def render_centre_insideness(seed: int, split: str, index: int, size: int = 64, difficulty: float = 0.5,
                             d_min: float = 0.36, d_max: float = 0.44, max_arcs: int = 2,
                             decoy: float = 0.0, band: float = 1.0) -> Tuple[np.ndarray, int, float]:
    """One sample: ``(HxW uint8 image, label, distance of the nearest contour point from the centre in px)``.

    ``label`` is 1 when the centre ``(size/2, size/2)`` is inside a closed contour. Every ink pixel lies at
    least ``d_min * size`` from the centre; the contour's nearest point lies at most ``d_max * size`` away.
    Clutter: up to ``max_arcs`` short open arcs (their number grows with ``difficulty``), and with
    probability ``decoy`` a decoy that removes the "what is near the centre" cue: an *open* ring around
    the centre (a gap of 15-35% of its length) in outside images, an extra small closed contour far from
    the centre in inside images. With decoys, only the ring's closure (seen all around) tells the classes
    apart.

    ``band`` (a fraction of the side, graded task): when it is narrower than ``d_max - d_min``, each image
    draws its own window ``[lo, lo + band]`` with ``lo`` uniform in ``[d_min, d_max - band]``, and the rules
    above hold for that window: the distance of the nearest contour point, and so the reach a net needs,
    is spread over the whole range. A band as wide as the range draws nothing (the images of the former
    fixed-window task are unchanged).
    """
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), _SPLITS[split], int(index), 0xCE47])
    label = int(rng.integers(2))
    q = size / 2.0
    lo, hi = d_min * size, d_max * size
    width = max(1.0, size / 64.0) * (1.0 + 0.4 * rng.random())
    if band < d_max - d_min - 1e-9:  # (a band as wide as the range, up to rounding: one shared window)
        lo = rng.uniform(d_min, d_max - band) * size
        hi = lo + band * size
    placed = _place(rng, size, difficulty, bool(label), lo, hi, width)
    if placed is None:
        raise ConfigError(f"could not place a contour {d_min}-{d_max} of the side from the centre in a "
                          f"{size} px image; widen d_min/d_max")
    shape, r0, cx, cy, dist = placed
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    ink = _ink(shape, r0, cx, cy, xx, yy, width)
    if decoy > 0 and rng.random() < decoy:
        for _ in range(30):
            if label:  # a small closed contour in a corner, outside the ring
                br = rng.uniform(0.045, 0.08) * size
                off = 2.0 + width + 1.3 * br + rng.uniform(0, 0.05) * size
                bx = off if rng.random() < 0.5 else size - off
                by = off if rng.random() < 0.5 else size - off
                d_ink = _ink(_random_shape(rng, difficulty), br, bx, by, xx, yy, width)
            else:  # an open ring around the centre
                ring = _place(rng, size, difficulty, True, lo, hi, width, tries=200)
                if ring is None:
                    continue
                d_ink = _ink(ring[0], ring[1], ring[2], ring[3], xx, yy, width)
                gap = rng.uniform(0.15, 0.35) * 2 * math.pi
                ang = np.mod(np.arctan2(yy - ring[3], xx - ring[2]) - rng.uniform(0, 2 * math.pi), 2 * math.pi)
                d_ink = d_ink * (ang > gap)
            if not ((d_ink > 0) & (ink > 0)).any():  # never touching: the label stays exact
                ink = np.maximum(ink, d_ink)
                break
    n_arcs = int(round(difficulty * max_arcs * rng.random()))
    near = np.hypot(xx - q, yy - q) < lo
    for _ in range(n_arcs):  # short open arcs: "there is a line over there" alone says nothing
        for _ in range(50):
            o = _random_shape(rng, difficulty)
            ocx, ocy = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size
            arc = _ink(o, rng.uniform(0.15, 0.35) * size, ocx, ocy, xx, yy, width)
            start, span = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 2.0)
            arc = arc * (np.mod(np.arctan2(yy - ocy, xx - ocx) - start, 2 * math.pi) < span)
            if not (arc[near] > 0).any():
                ink = np.maximum(ink, arc)
                break
    bg, fg = rng.uniform(0.0, 0.35), rng.uniform(0.65, 1.0)
    img = bg + (fg - bg) * ink + rng.normal(0.0, 0.02 + 0.06 * difficulty, ink.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label, dist


def _render_chunk(job: Tuple[Tuple[Any, ...], int, int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``start..stop`` of a split (a top-level function, so worker processes can run it)."""
    (seed, split, size, difficulty, d_min, d_max, decoy, band), start, stop = job
    out = [render_centre_insideness(seed, split, i, size, difficulty, d_min, d_max, decoy=decoy, band=band)
           for i in range(start, stop)]
    return (np.stack([o[0] for o in out]), np.array([o[1] for o in out], np.int64),
            np.array([o[2] for o in out], np.float64))


class CentreInsideness:
    """All images of one split, rendered once into memory: ``x`` uint8 ``[N, 1, S, S]``, ``y`` long ``[N]``.

    ``distances`` holds each sample's nearest-contour distance from the centre (px). ``workers``: processes
    that render in parallel (0: automatic, several from 1000 images on; results are identical).
    """

    classes = ["outside", "inside"]

    def __init__(self, split: str = "train", num_samples: int = 2000, image_size: int = 64,
                 difficulty: float = 0.5, d_min: float = 0.36, d_max: float = 0.44, seed: int = 0,
                 progress: bool = False, decoy: float = 0.0, workers: int = 0, band: float = 1.0) -> None:
        if not 16 <= int(image_size) <= 512:
            raise ConfigError(f"image size must be in [16, 512], got {image_size}")
        if not 0.0 < d_min < d_max < 0.5:
            raise ConfigError(f"need 0 < d_min < d_max < 0.5, got {d_min}, {d_max}")
        if int(num_samples) < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 <= float(decoy) <= 1.0:
            raise ConfigError(f"decoy must be a probability in [0, 1], got {decoy}")
        self.split, self.image_size, self.difficulty = split, int(image_size), float(difficulty)
        self.d_min, self.d_max, self.seed = float(d_min), float(d_max), int(seed)
        if not 0.0 < float(band):
            raise ConfigError(f"band must be a positive fraction of the side, got {band}")
        self.decoy, self.band = float(decoy), float(band)
        n = int(num_samples)
        xs = np.empty((n, 1, self.image_size, self.image_size), np.uint8)
        ys = np.empty(n, np.int64)
        ds = np.empty(n, np.float64)
        if workers <= 0:  # auto: parallel only where it pays (each image is independent and deterministic)
            workers = min(os.cpu_count() or 1, 8) if n >= 1000 else 1
        args = (int(seed), split, self.image_size, float(difficulty), float(d_min), float(d_max), float(decoy),
                float(band))
        step = max(20, min(250, -(-n // (4 * workers))))
        chunks = [range(i, min(i + step, n)) for i in range(0, n, step)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=f"render {split}", leave=False)
        if workers > 1 and len(chunks) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = pool.map(_render_chunk, [(args, c.start, c.stop) for c in chunks])
                for c, (ci, cl, cd) in zip(chunks, results):
                    xs[c.start:c.stop, 0], ys[c.start:c.stop], ds[c.start:c.stop] = ci, cl, cd
                    if bar is not None:
                        bar.update(len(c))
        else:
            for c in chunks:
                ci, cl, cd = _render_chunk((args, c.start, c.stop))
                xs[c.start:c.stop, 0], ys[c.start:c.stop], ds[c.start:c.stop] = ci, cl, cd
                if bar is not None:
                    bar.update(len(c))
        if bar is not None:
            bar.close()
        self.x, self.y = torch.from_numpy(xs), torch.from_numpy(ys)
        self.distances = ds

    def __len__(self) -> int:
        return int(self.y.numel())

    def batch(self, idx: torch.Tensor, augment: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] and labels of ``idx``; with a generator, one random flip/transpose
        per batch (the centre maps to itself, so the label is unchanged)."""
        x = self.x[idx].float().div_(127.5).sub_(1.0)
        if augment is not None:
            x = dihedral(x, int(torch.randint(0, 8, (1,), generator=augment)))
        return x, self.y[idx]
