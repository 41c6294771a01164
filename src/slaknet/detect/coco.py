"""COCO JSON detection data: ``instances_*.json`` + an image folder, read with pycocotools.

Layout of ``--data ROOT``: ``ROOT/annotations/instances_train*.json`` with images in ``ROOT/train*/`` (or
``ROOT/images/train*/``), and the same for ``val``; ``--eval-data-path`` may name the validation JSON.
Boxes ``[x, y, w, h]`` become ``[x0, y0, x1, y1]``; masks come from polygons or RLE
(``pycocotools.mask``); crowd regions are kept as ``iscrowd=1`` targets for the metric and dropped from
the training targets (as torchvision's reference scripts do); degenerate boxes (w or h <= 1 px) are
dropped; images without annotations are kept (background-only). Class names come from ``categories``
(sorted by id; labels 1..K in that order) and are stored in the checkpoint. An unreadable image is
replaced by the next readable one and counted (distinct files) like the trainer's other datasets.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from slaknet.errors import ConfigError, import_optional

__all__ = ["CocoDetection", "coco_splits", "find_split"]

log = logging.getLogger("slaknet.detect")


def find_split(root: str, split: str) -> Tuple[str, str]:
    """``(annotation json, image folder)`` of ``split`` (train / val) under ``root``."""
    found = sorted(glob.glob(os.path.join(root, "annotations", f"instances_{split}*.json")))
    if not found:
        raise ConfigError(f"no COCO annotations for {split!r} in {root!r} (expected "
                          f"{os.path.join(root, 'annotations', f'instances_{split}*.json')})")
    ann = found[0]
    stem = os.path.basename(ann)[len("instances_"):-len(".json")]  # e.g. train2017
    return ann, _image_dir(root, stem, ann)


def _image_dir(root: str, stem: str, ann: str) -> str:
    for cand in (os.path.join(root, stem), os.path.join(root, "images", stem), os.path.join(root, "images"), root):
        if os.path.isdir(cand) and cand != os.path.join(root, "annotations"):
            return cand
    raise ConfigError(f"no image folder for {ann} (tried {os.path.join(root, stem)})")


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
        """The torchvision target of image ``index`` (boxes xyxy, labels, masks, iscrowd, area)."""
        from pycocotools import mask as mask_utils

        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.ids[index]))
        boxes, labels, masks, crowd = [], [], [], []
        for a in anns:
            x, y, bw, bh = a["bbox"]
            if bw <= 1 or bh <= 1 or (self.train and a.get("iscrowd", 0)):
                continue
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.label_of[a["category_id"]])
            crowd.append(int(a.get("iscrowd", 0)))
            seg = a.get("segmentation")
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if seg else None
            elif isinstance(seg, dict):
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
            else:
                rle = None
            masks.append(mask_utils.decode(rle).astype(np.uint8) if rle is not None else np.zeros((h, w), np.uint8))
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor(labels, dtype=torch.int64), "iscrowd": torch.tensor(crowd, dtype=torch.int64),
             "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}
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

    def describe(self) -> str:
        return f"COCO {os.path.basename(self.ann_file)}: {len(self)} images, {len(self.classes)} classes"


def coco_splits(root: str, eval_ann: Optional[str] = None, flip: bool = False) -> Tuple[CocoDetection, CocoDetection]:
    """Training and validation :class:`CocoDetection` of a COCO folder (validation labels follow training)."""
    if not os.path.isdir(root):
        raise ConfigError(f"detection data {root!r} is neither builtin:contours nor a folder")
    tr_ann, tr_dir = find_split(root, "train")
    train = CocoDetection(tr_ann, tr_dir, train=True, flip=flip)
    if eval_ann:
        va_ann, va_dir = eval_ann, _image_dir(root, os.path.basename(eval_ann)[len("instances_"):-len(".json")], eval_ann)
    else:
        va_ann, va_dir = find_split(root, "val")
    return train, CocoDetection(va_ann, va_dir, classes=train.classes)
