"""Segmentation folders before any training: which image / mask pairs there are, what the masks hold, and
what their labels mean. Torch-free (``--recipe auto`` reads folders with it while the configuration is
resolved); :mod:`slaknet.segment.data` builds the datasets on top.

Layouts (:func:`find_pairs`):

* ADE20K: ``ROOT/images/{training,validation}/*`` with ``ROOT/annotations/{training,validation}/*.png``;
* plain: ``ROOT/{train,val}/images/*`` with ``ROOT/{train,val}/masks/*.png`` (same stem), or ``ROOT/images`` +
  ``ROOT/masks`` (the last tenth, by sorted name, is held out).

The scan (:func:`scan_split`), before the first step: every mask of a split is read once (at most
:data:`SCAN_LIMIT` per split; beyond that an evenly spaced sample of that many) and its label values and
pixel counts are cached in memory (keyed by path, size and modification time), with the size of its image
(read from the file header). A pair whose image cannot be opened or whose mask and image sizes differ is
left out of the dataset (counted once, never replaced by another pair). Masks outside the sample are checked
in the same way as they are loaded.

Labels (:func:`label_scheme`): 255 is ignored. Label 0 is a class (background) unless ``reduce_zero_label``
is on (default: on for the ADE20K layout only), which ignores 0 and shifts every other label down by one,
as mmseg does for ADE20K. The classes are, in this order of precedence: the names in ``ROOT/classes.txt``
(one per line), ADE20K's ``ROOT/objectInfo150.txt``, ``--num-classes N``, else the labels found in the
masks: from 0 (1 with ``reduce_zero_label``) up to the highest label reached without a gap. A label beyond
the classes is a one-line error naming the mask file and the value.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from slaknet.errors import ConfigError

__all__ = ["IGNORE_INDEX", "SCAN_LIMIT", "ADE20K_NUM_CLASSES", "find_pairs", "FolderFacts", "folder_facts",
           "SplitScan", "LeftOut", "scan_split", "LabelScheme", "label_scheme", "check_labels", "default_reduce_zero_label", "read_mask",
           "image_size"]

IGNORE_INDEX = 255
ADE20K_NUM_CLASSES = 150
SCAN_LIMIT = 2000          # masks read per split before the first step (beyond: an evenly spaced sample)
_ADE_OBJECT_INFO = "objectInfo150.txt"


# ------------------------------------------------------------------------------------------ pairing ----
def _files(folder: str, exts: Sequence[str]) -> Dict[str, str]:
    return {os.path.splitext(n)[0]: os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.lower().endswith(tuple(exts)) and not n.startswith(".")}


def _pair(img_dir: str, mask_dir: str) -> List[Tuple[str, str]]:
    from slaknet.data import IMG_EXTENSIONS

    if not os.path.isdir(img_dir) or not os.path.isdir(mask_dir):
        raise ConfigError(f"expected image folder {img_dir!r} and mask folder {mask_dir!r}")
    imgs, masks = _files(img_dir, IMG_EXTENSIONS), _files(mask_dir, (".png",))
    pairs = [(imgs[k], masks[k]) for k in sorted(imgs) if k in masks]
    if not pairs:
        raise ConfigError(f"no image/mask pairs (same file stem, masks .png) in {img_dir!r} and {mask_dir!r}")
    return pairs


def find_pairs(root: str, split: str) -> Tuple[str, List[Tuple[str, str]]]:
    """``(layout, [(image, mask)])`` of ``split`` (train / val) under ``root``; one-line errors otherwise."""
    if not os.path.isdir(root):
        raise ConfigError(f"data folder {root!r} does not exist")
    ade = {"train": "training", "val": "validation"}[split]
    if os.path.isdir(os.path.join(root, "images", ade)) and os.path.isdir(os.path.join(root, "annotations")):
        return "ade20k", _pair(os.path.join(root, "images", ade), os.path.join(root, "annotations", ade))
    if os.path.isdir(os.path.join(root, split, "images")):
        return "plain", _pair(os.path.join(root, split, "images"), os.path.join(root, split, "masks"))
    if os.path.isdir(os.path.join(root, "images")):
        pairs = _pair(os.path.join(root, "images"), os.path.join(root, "masks"))
        cut = len(pairs) - max(1, len(pairs) // 10) if len(pairs) > 1 else len(pairs)
        return "plain", pairs[:cut] if split == "train" else pairs[cut:] or pairs
    raise ConfigError(f"{root!r} is neither ADE20K-style (images/{ade}, annotations/{ade}) nor images/ + "
                      f"masks/ (optionally under train/ and val/)")


# ---------------------------------------------------------------------------------- cached file reads ----
_SIZES: Dict[Tuple[str, int, int], Tuple[int, int]] = {}
_MASKS: Dict[Tuple[str, int, int], "_MaskStats"] = {}


@dataclasses.dataclass(frozen=True)
class _MaskStats:
    shape: Tuple[int, int]
    counts: Dict[int, int]     # label value -> pixels


def _key(path: str) -> Tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), int(st.st_mtime_ns), int(st.st_size)


def image_size(path: str) -> Tuple[int, int]:
    """``(height, width)`` of an image from its header (cached); raises for files PIL cannot open."""
    key = _key(path)
    if key not in _SIZES:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        _SIZES[key] = (int(h), int(w))
    return _SIZES[key]


def _raw_mask(path: str) -> Any:
    """A mask's HxW array as stored (uint8 for grey / palette PNGs); a one-line ConfigError for a colour mask."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        mask = np.asarray(im)
    if mask.ndim != 2:
        raise ConfigError(f"mask {path} is a colour image (mode {mode}); masks hold one label value per pixel "
                          "(8-bit grey or palette PNG: 0, 1, 2... and 255 for ignored pixels)")
    return mask


def read_mask(path: str) -> Any:
    """A mask as an ``int64`` HxW array of label values; a one-line ConfigError for a colour mask."""
    import numpy as np

    return _raw_mask(path).astype(np.int64)


def _mask_stats(path: str) -> _MaskStats:
    """Label values and pixel counts of a mask, read once (cached by path, size and modification time)."""
    import numpy as np

    key = _key(path)
    if key not in _MASKS:
        mask = _raw_mask(path)
        if mask.dtype == np.uint8:  # a histogram is ~50x faster than np.unique on a 512 x 512 mask
            hist = np.bincount(mask.ravel(), minlength=256)
            counts = {int(v): int(hist[v]) for v in np.flatnonzero(hist)}
        else:
            values, n = np.unique(mask, return_counts=True)
            counts = {int(v): int(c) for v, c in zip(values, n)}
        _MASKS[key] = _MaskStats((int(mask.shape[0]), int(mask.shape[1])), counts)
    return _MASKS[key]


# ---------------------------------------------------------------------------------------- folder facts ----
@dataclasses.dataclass(frozen=True)
class FolderFacts:
    """What ``--recipe auto`` looks at: the layout, the training pairs and the median short image side."""

    layout: str
    pairs: int
    side: Optional[int]

    def describe(self) -> str:
        size = f"~{self.side} px" if self.side else "of unknown size"
        return f"{self.pairs} training pairs {size}, {self.layout} layout"


def _median(values: Sequence[int]) -> Optional[int]:
    return sorted(values)[len(values) // 2] if values else None


def folder_facts(root: str, sample: int = 16) -> Optional[FolderFacts]:
    """The training pairs of ``root`` and the median short side of ``sample`` of their images (headers only);
    None when ``root`` is not a segmentation folder."""
    try:
        layout, pairs = find_pairs(root, "train")
    except ConfigError:
        return None
    sides = []
    for img, _ in pairs[::max(1, len(pairs) // sample)][:sample]:
        try:
            sides.append(min(image_size(img)))
        except Exception:  # damaged files are the scan's business, not the recipe's
            continue
    return FolderFacts(layout, len(pairs), _median(sides))


# ------------------------------------------------------------------------------------------------ scan ----
class LeftOut(NamedTuple):
    """A pair the scan set aside: its image path, ``kind`` ("size": mask and image sizes differ, or
    "unreadable") and the reason in words."""

    path: str
    kind: str
    reason: str


@dataclasses.dataclass
class SplitScan:
    """What the masks of one split hold (module docstring): the usable pairs, the pairs left out (with the
    reason), the label values found with their pixel counts and the first mask holding each."""

    root: str
    split: str
    layout: str
    pairs: List[Tuple[str, str]]
    left_out: List[LeftOut]
    found: int                           # pairs in the folder
    scanned: int                         # masks read
    counts: Dict[int, int]               # label value -> pixels over the scanned usable masks
    where: Dict[int, str]                # label value -> the first mask file holding it
    sides: List[int]                     # short sides of the scanned usable images

    @property
    def sampled(self) -> bool:
        return self.scanned < self.found

    @property
    def side(self) -> Optional[int]:
        return _median(self.sides)

    @property
    def pixels(self) -> int:
        return sum(self.counts.values())

    def describe_scan(self) -> str:
        if not self.sampled:
            return f"all {self.found} {self.split} masks"
        return f"{self.scanned} of {self.found} {self.split} masks (evenly spaced; the others are checked as they load)"


def scan_split(root: str, split: str, limit: int = SCAN_LIMIT) -> SplitScan:
    """Read the masks of ``split`` (all, or ``limit`` evenly spaced) and the sizes of their images; pairs that
    cannot be used are left out with a warning (see the module docstring)."""
    layout, pairs = find_pairs(root, split)
    step = len(pairs) / limit if len(pairs) > limit else 1.0
    chosen = {int(i * step) for i in range(min(len(pairs), limit))}
    keep: List[Tuple[str, str]] = []
    left: List[LeftOut] = []
    counts: Dict[int, int] = {}
    where: Dict[int, str] = {}
    sides: List[int] = []
    for i, (img, mask) in enumerate(pairs):
        if i not in chosen:
            keep.append((img, mask))
            continue
        try:
            ih, iw = image_size(img)
            stats = _mask_stats(mask)
        except ConfigError:
            raise
        except Exception as exc:  # PIL raises many types for damaged files
            reason = f"unreadable: {type(exc).__name__}: {exc}"
            warnings.warn(f"skipping unreadable pair {img}: {reason}")
            left.append(LeftOut(img, "unreadable", reason))
            continue
        if stats.shape != (ih, iw):
            reason = f"mask {stats.shape[0]}x{stats.shape[1]} and image {ih}x{iw} differ in size"
            warnings.warn(f"skipping pair {img}: {reason}")
            left.append(LeftOut(img, "size", reason))
            continue
        keep.append((img, mask))
        sides.append(min(ih, iw))
        for v, c in stats.counts.items():
            counts[v] = counts.get(v, 0) + c
            where.setdefault(v, mask)
    if not keep:
        raise ConfigError(f"no usable image/mask pair in the {split} split of {root!r} "
                          f"({len(left)} left out, e.g. {left[0].path}: {left[0].reason})")
    return SplitScan(root, split, layout, keep, left, len(pairs), len(chosen), counts, where, sides)


# ---------------------------------------------------------------------------------------------- labels ----
def default_reduce_zero_label(layout: str) -> bool:
    """Label 0 is ignored by default for the ADE20K layout only (its label 0 is "other")."""
    return layout == "ade20k"


@dataclasses.dataclass(frozen=True)
class LabelScheme:
    """What mask values mean: class ``i`` is label ``i`` (``i + 1`` with ``reduce_zero_label``); 255 (and 0
    with ``reduce_zero_label``) are ignored; ``source`` says where the classes came from."""

    classes: List[str]
    reduce_zero_label: bool
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def first(self) -> int:
        """The label value of class 0."""
        return 1 if self.reduce_zero_label else 0

    def ignored(self, value: int) -> bool:
        return value == IGNORE_INDEX or (self.reduce_zero_label and value == 0)

    def valid(self, value: int) -> bool:
        return self.ignored(value) or self.first <= value < self.first + self.num_classes

    def to_labels(self, mask: Any) -> Any:
        """Label values -> class indices (ignored pixels 255); ``mask`` an integer array."""
        if not self.reduce_zero_label:
            return mask
        out = mask - 1
        out[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
        return out

    def check(self, mask: Any, path: str) -> None:
        """ValueError naming ``path`` and the value when ``mask`` holds a label beyond the classes."""
        import numpy as np

        hi = self.first + self.num_classes
        bad = (mask < self.first) | (mask >= hi)
        bad &= mask != IGNORE_INDEX
        if self.reduce_zero_label:
            bad &= mask != 0
        if bad.any():
            raise ValueError(f"mask {path} has label {int(np.asarray(mask)[bad].flat[0])}, beyond the "
                             f"{self.num_classes} classes ({self.values_text()})")

    def values_text(self) -> str:
        """``labels 0..2`` / ``labels 1..150, 0 ignored``."""
        lo, hi = self.first, self.first + self.num_classes - 1
        return f"labels {lo}..{hi}" + (", 0 ignored" if self.reduce_zero_label else "")

    def ignored_share(self, scan: SplitScan) -> float:
        """Fraction of the scanned pixels of ``scan`` that are ignored."""
        total = scan.pixels
        return sum(c for v, c in scan.counts.items() if self.ignored(v)) / total if total else 0.0


def _names_file(root: str, reduce_zero_label: bool) -> Tuple[Optional[List[str]], str]:
    """Class names from ``ROOT/classes.txt`` or ADE20K's ``ROOT/objectInfo150.txt``; ``(None, "")`` if neither."""
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        with open(path) as f:
            names = [ln.strip() for ln in f if ln.strip()]
        if reduce_zero_label and len(names) == ADE20K_NUM_CLASSES + 1:
            names = names[1:]  # ADE20K's list that still names label 0 ("other")
        return names, "classes.txt"
    path = os.path.join(root, _ADE_OBJECT_INFO)
    if os.path.isfile(path):  # Idx  Ratio  Train  Val  Name (tab-separated, a header line)
        with open(path) as f:
            rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
        names = [r[-1].split(";")[0].strip() for r in rows[1:] if len(r) >= 2]
        return names or None, _ADE_OBJECT_INFO
    return None, ""


def _run_length(values: Iterable[int], first: int) -> int:
    """How many labels from ``first`` on are found without a gap (``first`` itself may be missing)."""
    found = set(values)
    v = first
    while v in found or (v == first and v + 1 in found):
        v += 1
    return v - first


def label_scheme(root: str, layout: str, scans: Sequence[SplitScan], num_classes: Optional[int] = None,
                 reduce_zero_label: Optional[bool] = None, classes: Optional[Sequence[str]] = None) -> LabelScheme:
    """The label meaning of a folder (module docstring), checked against the labels the ``scans`` found:
    a label beyond the classes is a one-line ConfigError naming the mask file and the value."""
    reduce = default_reduce_zero_label(layout) if reduce_zero_label is None else bool(reduce_zero_label)
    first = 1 if reduce else 0
    found = sorted({v for s in scans for v in s.counts if v != IGNORE_INDEX and not (reduce and v == 0)})
    if classes is not None:
        names, source = list(classes), "the checkpoint"
    else:
        names, source = _names_file(root, reduce)
        if names is not None and num_classes and num_classes > len(names):
            names += [f"class_{v}" for v in range(first + len(names), first + int(num_classes))]
        elif names is None:
            if num_classes:
                k, source = int(num_classes), "--num-classes"
            else:
                k, source = _run_length(found, first), "the masks"
            names = [f"class_{v}" for v in range(first, first + k)]
    scheme = LabelScheme(list(names), reduce, source)
    if not names:
        raise ConfigError(f"no class labels in the masks of {root!r}: every pixel is ignored (255"
                          + (" or 0, ignored by --reduce-zero-label" if reduce else "") + ")")
    check_labels(scheme, scans)
    return scheme


def check_labels(scheme: LabelScheme, scans: Sequence[SplitScan]) -> None:
    """A one-line ConfigError naming the mask file and the value for the first label (in value order) that
    the ``scans`` found beyond the classes of ``scheme``."""
    for v in sorted({v for s in scans for v in s.counts}):
        if not scheme.valid(v):
            where = next(s.where[v] for s in scans if v in s.where)
            raise ConfigError(f"mask {where} has label {v}, beyond the {scheme.num_classes} classes "
                              f"({scheme.values_text()}; from {scheme.source}): {_fix(scheme, v)}")


def _fix(scheme: LabelScheme, value: int) -> str:
    """The hint of a label-beyond-the-classes error."""
    if scheme.source == "the masks":
        return (f"the classes are the labels found without a gap; if {value} is a class, pass --num-classes "
                f"{value - scheme.first + 1} or list the class names in classes.txt, else fix the mask (255 marks "
                "ignored pixels)")
    return f"fix the mask (255 marks ignored pixels) or give more classes ({scheme.source})"
