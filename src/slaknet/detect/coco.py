"""COCO JSON detection data: an annotation file + an image folder per split, read with pycocotools.

Two ways to name them: ``--data ROOT`` with ``ROOT/annotations/instances_train*.json`` and images in
``ROOT/train*/`` (or ``ROOT/images/train*/``), the same for ``val`` (``--eval-data-path`` may name the
validation JSON); or the files one by one, ``--train-annotations FILE --train-images DIR --val-annotations
FILE --val-images DIR`` (:func:`coco_files`). ``--val-annotations`` / ``--val-images`` may also replace a
folder's validation split.

The labels are checked when a split is opened, before any training: an annotation whose ``category_id`` is
not among the file's ``categories`` is a one-line ConfigError naming the file and the value; boxes
``[x, y, w, h]`` become ``[x0, y0, x1, y1]``, are clipped to their image (its ``width`` / ``height``) and
dropped when degenerate (width or height <= 1 px after clipping), both counted (``clipped``,
``degenerate``). Masks come from polygons or RLE (``pycocotools.mask``); a split has masks when every
non-crowd annotation has a segmentation (``has_masks``), else its targets carry boxes only. Crowd regions
are kept as ``iscrowd=1`` targets for the metric and dropped from the training targets (as torchvision's
reference scripts do); images without annotations are kept (background-only). Class names come from
``categories`` (sorted by id; labels 1..K in that order) and are stored in the checkpoint. An unreadable
image is replaced by the next readable one and counted (distinct files) like the trainer's other datasets.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from slaknet.detect.spec import has_segmentation
from slaknet.errors import ConfigError, import_optional

__all__ = ["CocoDetection", "CocoFiles", "coco_files", "coco_splits", "find_split"]

log = logging.getLogger("slaknet.detect")


def find_split(root: str, split: str) -> Tuple[str, str]:
    """``(annotation json, image folder)`` of ``split`` (train / val) under ``root``."""
    found = sorted(glob.glob(os.path.join(root, "annotations", f"instances_{split}*.json")))
    if not found:
        raise ConfigError(f"no COCO annotations for {split!r} in {root!r} (expected "
                          f"{os.path.join(root, 'annotations', f'instances_{split}*.json')}, or name the files with "
                          "--train-annotations / --train-images / --val-annotations / --val-images)")
    ann = found[0]
    stem = os.path.basename(ann)[len("instances_"):-len(".json")]  # e.g. train2017
    return ann, _image_dir(root, stem, ann)


def _image_dir(root: str, stem: str, ann: str) -> str:
    for cand in (os.path.join(root, stem), os.path.join(root, "images", stem), os.path.join(root, "images"), root):
        if os.path.isdir(cand) and cand != os.path.join(root, "annotations"):
            return cand
    raise ConfigError(f"no image folder for {ann} (tried {os.path.join(root, stem)})")


@dataclasses.dataclass(frozen=True)
class CocoFiles:
    """The annotation file and image folder of each split (``train_*`` None: the held-out split only)."""

    train_annotations: Optional[str]
    train_images: Optional[str]
    val_annotations: str
    val_images: str


def coco_files(data: Optional[str], eval_data: Optional[str] = None, options: Mapping[str, Any] = {},
               train: bool = True) -> CocoFiles:
    """Where the splits are: the files named in ``options`` (``train_annotations``, ``train_images``,
    ``val_annotations``, ``val_images``) or else the COCO folder ``data``'s layout. ``train`` False: only the
    held-out split is looked up (evaluation)."""
    tr_ann, tr_dir = options.get("train_annotations"), options.get("train_images")
    va_ann, va_dir = options.get("val_annotations"), options.get("val_images")
    folder = data if (train and not tr_ann) or not va_ann else None  # the layout is needed for a split not named
    if folder is not None and not os.path.isdir(str(folder)):
        what = ("a file: name the training JSON with --train-annotations FILE --train-images DIR"
                if os.path.isfile(str(folder)) else "neither builtin:contours nor a folder")
        raise ConfigError(f"detection data {folder!r} is {what}")
    if train and not tr_ann:
        tr_ann, tr_dir = find_split(str(folder), "train")
    if not va_ann:
        if eval_data:
            va_ann = eval_data
            va_dir = _image_dir(str(folder), os.path.basename(eval_data)[len("instances_"):-len(".json")], eval_data)
        else:
            va_ann, va_dir = find_split(str(folder), "val")
    for path, what in ((tr_ann, "annotation file"), (va_ann, "annotation file")):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"COCO {what} {path!r} does not exist")
    for path in (tr_dir, va_dir):
        if path is not None and not os.path.isdir(path):
            raise ConfigError(f"image folder {path!r} does not exist")
    return CocoFiles(tr_ann, tr_dir, str(va_ann), str(va_dir))


def _clip(box: List[float], width: Optional[float], height: Optional[float]) -> List[float]:
    x0, y0, x1, y1 = box
    if width is not None:
        x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
    if height is not None:
        y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
    return [x0, y0, x1, y1]


def _degenerate(box: List[float]) -> bool:
    return box[2] - box[0] <= 1 or box[3] - box[1] <= 1


class CocoDetection(Dataset):
    """One COCO split. Items: ``(image [3, H, W] float in [0, 1], target, unreadable count, first unreadable index)``.

    ``classes`` (category names sorted by id) may be given to map a validation split onto the training
    split's labels; a category it lacks is a ConfigError.
    """

    def __init__(self, ann_file: str, image_dir: str, classes: Optional[List[str]] = None, train: bool = False,
                 flip: bool = False) -> None:
        COCO = import_optional("pycocotools.coco", "dense", "the COCO reader").COCO
        if not os.path.isfile(ann_file):
            raise ConfigError(f"COCO annotation file {ann_file!r} does not exist")
        import contextlib
        import io

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                self.coco = COCO(ann_file)
        except Exception as exc:
            raise ConfigError(f"cannot read COCO annotations {ann_file!r}: {type(exc).__name__}: {exc}") from exc
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        self.classes = list(classes) if classes is not None else names
        missing = sorted(set(names) - set(self.classes))
        if missing:
            raise ConfigError(f"{ann_file} has categories the training data lacks: {missing[:3]}")
        self.label_of = {c["id"]: self.classes.index(c["name"]) + 1 for c in cats}
        self.ids = sorted(self.coco.getImgIds())
        self.image_dir, self.ann_file = image_dir, ann_file
        self.samples = [(os.path.join(image_dir, self.coco.imgs[i]["file_name"]), 0) for i in self.ids]
        self.train, self.flip = bool(train), bool(flip)
        self.known_bad: set = set()
        self.bad_files: List[str] = []
        self.clipped, self.degenerate = 0, 0
        self.objects: Dict[int, List[Tuple[List[float], int, int, Any]]] = {}
        self._check_labels()

    def _check_labels(self) -> None:
        """Every annotation once, before training: category ids known (else a one-line ConfigError), boxes
        clipped to their image and degenerate ones dropped (counted); ``objects`` holds what is kept per image:
        ``(box xyxy, label, iscrowd, segmentation)``."""
        known = ", ".join(str(c) for c in sorted(self.label_of)) or "none"
        solid = masked = 0
        for a in self.coco.dataset.get("annotations", []):
            cid, aid = a.get("category_id"), a.get("id")
            if cid not in self.label_of:
                raise ConfigError(f"{self.ann_file}: annotation {aid} has category_id {cid!r}, which is not among its "
                                  f"categories (ids: {known})")
            img = self.coco.imgs.get(a.get("image_id"))
            if img is None:
                continue  # an annotation of an image the file does not list (pycocotools ignores it too)
            bbox = a.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or \
                    not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
                raise ConfigError(f"{self.ann_file}: annotation {aid} has no valid bbox [x, y, w, h] (got {bbox!r})")
            x, y, bw, bh = (float(v) for v in bbox)
            box = [x, y, x + bw, y + bh]
            clipped = _clip(box, img.get("width"), img.get("height"))
            if _degenerate(clipped):
                self.degenerate += 1
                continue
            self.clipped += int(clipped != box)
            crowd = int(a.get("iscrowd", 0))
            if self.train and crowd:
                continue
            if not crowd:
                solid += 1
                masked += int(has_segmentation(a))
            self.objects.setdefault(int(a["image_id"]), []).append(
                (clipped, self.label_of[cid], crowd, a.get("segmentation")))
        self.has_masks = solid > 0 and masked == solid

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, index: int) -> Optional[torch.Tensor]:
        from PIL import Image

        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except Exception as exc:
            if path not in self.bad_files:
                self.bad_files.append(path)
                log.warning("skipping unreadable image %s (%s)", path, type(exc).__name__)
            return None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def target(self, index: int, h: int, w: int) -> Dict[str, torch.Tensor]:
        """The torchvision target of image ``index`` (boxes xyxy, labels, iscrowd; masks when the split has
        them). Boxes are clipped again to the image as read (its JSON size may be wrong)."""
        from pycocotools import mask as mask_utils

        boxes, labels, masks, crowd = [], [], [], []
        for box, label, iscrowd, seg in self.objects.get(self.ids[index], []):
            box = _clip(box, w, h)
            if _degenerate(box):
                continue
            boxes.append(box)
            labels.append(label)
            crowd.append(iscrowd)
            if not self.has_masks:
                continue
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if seg else None
            elif isinstance(seg, dict):
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
            else:
                rle = None
            masks.append(mask_utils.decode(rle).astype(np.uint8) if rle is not None else np.zeros((h, w), np.uint8))
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor(labels, dtype=torch.int64), "iscrowd": torch.tensor(crowd, dtype=torch.int64)}
        if self.has_masks:
            t["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        return t

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        from slaknet.detect.data import hflip

        bad, first_bad = 0, -1
        for k in range(len(self)):
            i = (int(index) + k) % len(self)
            x = None if i in self.known_bad else self._read(i)
            if x is not None:
                break
            bad += 1
            first_bad = i if first_bad < 0 else first_bad
        else:
            raise ConfigError(f"no readable image in {self.image_dir!r}")
        t = self.target(i, int(x.shape[1]), int(x.shape[2]))
        if self.flip and bool(torch.rand(()) < 0.5):
            x, t = hflip(x, t)
        return x, t, bad, first_bad

    def fixes(self) -> str:
        """``1 box clipped to its image, 2 degenerate boxes dropped`` ('' when none)."""
        parts = []
        if self.clipped:
            parts.append(f"{self.clipped} box{'es' if self.clipped != 1 else ''} clipped to the image")
        if self.degenerate:
            parts.append(f"{self.degenerate} degenerate box{'es' if self.degenerate != 1 else ''} (<= 1 px) dropped")
        return ", ".join(parts)

    def describe(self) -> str:
        names = ", ".join(self.classes[:6]) + (", ..." if len(self.classes) > 6 else "")
        return (f"COCO {os.path.basename(self.ann_file)}: {len(self)} images, {len(self.classes)} classes ({names}), "
                + ("boxes + masks" if self.has_masks else "boxes only"))


def coco_splits(data: Union[str, CocoFiles], eval_ann: Optional[str] = None,
                flip: bool = False) -> Tuple[CocoDetection, CocoDetection]:
    """Training and validation :class:`CocoDetection` of a COCO folder (``eval_ann``: its validation JSON) or
    of :class:`CocoFiles`; validation labels follow training."""
    files = data if isinstance(data, CocoFiles) else coco_files(data, eval_ann)
    if files.train_annotations is None or files.train_images is None:
        raise ConfigError("no training annotations given")
    train = CocoDetection(files.train_annotations, files.train_images, train=True, flip=flip)
    return train, CocoDetection(files.val_annotations, files.val_images, classes=train.classes)
