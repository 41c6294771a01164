"""Input images for the effective-receptive-field measurement: an image folder, the sample photo that
ships with the package (random crops), or the built-in insideness benchmark. Each yields normalised
``1 x 3 x size x size`` tensors."""
from __future__ import annotations

import math
import os
import random
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slaknet.data import BUILTIN_MEAN, BUILTIN_STD
from slaknet.errors import ConfigError
from slaknet.models.slak import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def _normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=t.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=t.dtype).view(-1, 1, 1)
    return (t - m) / s


def _pil_to_tensor(img, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return _normalize(arr, mean, std)


def image_folder_images(folder: str, size: int = 1024, num_images: Optional[int] = None, seed: int = 0,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                        ) -> Iterator[torch.Tensor]:
    """Images found (recursively) under ``folder``, resized to ``size`` x ``size`` (bicubic), normalized.

    The files are shuffled with ``seed`` (ImageNet val sorted by class would otherwise give one class);
    unreadable files are skipped with a warning. Yields more than ``num_images`` images when some are
    skipped later, so the caller can still reach ``num_images`` valid ones.
    """
    if not os.path.isdir(folder):
        raise ConfigError(f"image folder not found: {folder}")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    random.Random(seed).shuffle(files)
    return _iter_files(files, size, mean, std)


def _iter_files(files: List[str], size: int, mean, std) -> Iterator[torch.Tensor]:
    import warnings

    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as img:
                yield _pil_to_tensor(img, size, mean, std)
        except OSError as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}")


def sample_photo_path() -> str:
    """Path of the natural photo bundled with matplotlib (``grace_hopper.jpg``)."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(path):
        raise ConfigError("matplotlib's sample photo grace_hopper.jpg is missing; pass --images DIR")
    return path


def sample_photo_images(size: int = 1024, num_images: int = 50, seed: int = 0,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                        ) -> Iterator[torch.Tensor]:
    """``num_images`` deterministic views of the photo that ships with matplotlib, never a download.

    Only one natural photo ships with the installed dependencies, so view 0 is the whole photo and the
    others are seeded random crops (30-100 % of the area, aspect 3/4-4/3) with random horizontal flips.
    This is a convenient offline default; an image folder (e.g. ImageNet val) gives more representative
    averages.
    """
    from PIL import Image, ImageOps

    with Image.open(sample_photo_path()) as img:
        photo = img.convert("RGB")
    rng = random.Random(seed)
    W, H = photo.size
    for k in range(num_images):
        view = photo
        if k > 0:
            area = rng.uniform(0.3, 1.0) * W * H
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw = min(W, max(16, int(round(math.sqrt(area * aspect)))))
            ch = min(H, max(16, int(round(math.sqrt(area / aspect)))))
            x0, y0 = rng.randint(0, W - cw), rng.randint(0, H - ch)
            view = photo.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                view = ImageOps.mirror(view)
        yield _pil_to_tensor(view, size, mean, std)


def benchmark_images(size: int = 1024, num_images: int = 50, seed: int = 0,
                     difficulty: float = 0.5) -> Iterator[torch.Tensor]:
    """Images of slaknet's built-in long-range benchmark (the "insideness" task of ``slaknet train``).

    Rendered procedurally from ``(seed, "val", index)`` by :class:`slaknet.data.InsidenessDataset`
    at ``min(size, 512)`` pixels (its largest size), bicubic-resized to ``size`` when larger, and
    normalized with mean = std = 0.5 as in training. Yields up to ``2 * num_images`` images (headroom
    for skipped ones).
    """
    try:
        from slaknet.data import InsidenessDataset
    except ImportError as exc:  # pragma: no cover - only in trimmed installations
        raise ConfigError("the built-in benchmark dataset (slaknet.data) is not available; "
                          "pass --images DIR or use the bundled photo") from exc
    native = max(16, min(int(size), 512))
    dataset = InsidenessDataset(split="val", num_samples=2 * num_images, image_size=native,
                                difficulty=difficulty, seed=seed, cache=False)
    for k in range(len(dataset)):
        image, _ = dataset[k]
        if image.shape[-2:] != (size, size):
            image = F.interpolate(image.unsqueeze(0), size=(size, size), mode="bicubic",
                                  align_corners=False).squeeze(0).clamp_(0.0, 1.0)
        yield _normalize(image, BUILTIN_MEAN, BUILTIN_STD)


def resolve_images(source: Optional[str], size: int = 1024, num_images: int = 50, seed: int = 0,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                   ) -> Iterator[torch.Tensor]:
    """Images for :func:`compute_erf`: ``None``/"sample" = bundled photo, "benchmark", or a folder."""
    if size < 8:
        raise ConfigError(f"input size must be at least 8 pixels, got {size}")
    if source in (None, "", "sample"):
        # headroom: NaN images are skipped, so offer twice as many views as needed
        return sample_photo_images(size, num_images * 2, seed, mean, std)
    if source == "benchmark":
        return benchmark_images(size, num_images, seed)
    return image_folder_images(source, size, num_images, seed, mean, std)
