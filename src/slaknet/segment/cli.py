"""``slaknet segment``: train / evaluate / run a SLaK segmentation model (no arguments: the CPU demo).

Examples::

    slaknet segment                                    # demo: SLaK vs its 7x7 twin on the built-in contours set
    slaknet segment train --data /data/ADEChallengeData2016 --pretrained slak_tiny_300epochs.pth
    slaknet segment eval --checkpoint runs/slak_tiny-ADEChallengeData2016/checkpoint-best.pth
    slaknet segment predict photo.jpg --checkpoint runs/.../model.safetensors -o masks/

``train`` takes every ``slaknet train`` flag (progress, JSON lines, TensorBoard, resume, ``--sparse``,
torchrun...) plus the segmentation options below; its recipes are ``seg_demo`` (built-in data),
``seg_small`` (small folders of small images, sized from the data) and ``ade20k`` (big folders: the paper's
UperNet recipe). ``predict`` writes every input it can read and exits 2 at the end if any could not be.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Iterator, Tuple

from slaknet.errors import ConfigError

from slaknet.segment.spec import SPEC, SegmentationOptions

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands train / eval / predict / export; none: the demo (options below)."""
    from slaknet.settings import CommonOptions, DataSettings, OptimSettings, RunSettings, add_setting
    from slaknet.train.config import add_config_arguments

    add_setting(parser, RunSettings, "output_dir",
                help="demo: folder for both runs, the table and the pictures (default runs/seg-demo)")
    add_setting(parser, OptimSettings, "epochs", help="demo: epochs per model (default: seg_demo recipe)")
    add_setting(parser, DataSettings, "train_samples", help="demo: training images (default: seg_demo "
                                                                          "recipe)")
    add_setting(parser, RunSettings, "threads", help="demo: torch threads (default auto)")
    sub = parser.add_subparsers(dest="seg_command", metavar="{train,eval,predict,export}")
    add_config_arguments(sub.add_parser("train", help="train (all `slaknet train` flags + segmentation options)"),
                         SPEC)
    ev = sub.add_parser("eval", help="mIoU / pixel accuracy / loss of a checkpoint on a dataset", allow_abbrev=False)
    add_setting(ev, CommonOptions, "checkpoint", default=None, required=True,
                help="checkpoint-best.pth / checkpoint-last.pth / model.safetensors")
    add_setting(ev, DataSettings, "data", default=None,
                help="builtin:contours or a folder (default: the checkpoint's data)")
    add_setting(ev, DataSettings, "val_samples", default=None, help="built-in data: images (default: as trained)")
    add_setting(ev, OptimSettings, "batch_size", default=16, help="built-in data batch size (default 16)")
    add_setting(ev, RunSettings, "device", default=None)
    add_setting(ev, RunSettings, "threads", default=None)
    add_setting(ev, CommonOptions, "json", default=False, nargs=0, help="print the metrics as JSON")
    add_setting(ev, SegmentationOptions, "reduce_zero_label", default=None,
                help="the masks hold ADE20K-style labels (0 ignored, the others minus one); default: as trained")
    pr = sub.add_parser("predict", help="colourised mask PNGs (+ image | truth | prediction pictures)",
                        allow_abbrev=False)
    pr.add_argument("images", nargs="*", help="image files")
    add_setting(pr, CommonOptions, "checkpoint", default=None, required=True)
    pr.add_argument("--masks", default=None, help="folder of ground-truth masks (same stem, .png) for the images")
    add_setting(pr, SegmentationOptions, "reduce_zero_label", default=None,
                help="--masks hold ADE20K-style labels (0 ignored, the others minus one); default: as trained")
    add_setting(pr, DataSettings, "data", default=None,
                help="builtin:contours: predict its first --count validation images")
    pr.add_argument("--count", type=int, default=4)
    add_setting(pr, RunSettings, "output_dir", default="predictions",
                help="folder for the mask PNGs (default predictions)")
    add_setting(pr, RunSettings, "device", default=None)
    add_setting(pr, RunSettings, "threads", default=None)
    ex = sub.add_parser("export", help="reparameterize and export to ONNX (or another slaknet export format), "
                                       "verified against eager", allow_abbrev=False)
    add_setting(ex, CommonOptions, "checkpoint", default=None, required=True)
    add_setting(ex, CommonOptions, "output_file", default=None, required=True, aliases=("--output",),
                help="file to write (e.g. seg.onnx)")
    add_setting(ex, CommonOptions, "format", default="onnx")
    add_setting(ex, DataSettings, "input_size", default=None, nargs=2, metavar=("H", "W"),
                help="fixed input height and width (default: the training crop / input size)")
    add_setting(ex, CommonOptions, "reparam", default="strips", const="strips")


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "seg_command", None)
    if cmd == "train":
        return _train(args)
    if cmd == "eval":
        return _eval(args)
    if cmd == "predict":
        return _predict(args)
    if cmd == "export":
        return _export(args)
    from slaknet.segment.demo import run_demo

    return run_demo(getattr(args, "output_dir", None) or "runs/seg-demo", getattr(args, "epochs", None),
                    getattr(args, "train_samples", None), getattr(args, "threads", None))


def _train(args: argparse.Namespace) -> int:
    from slaknet.train.api import fit, print_config
    from slaknet.train.config import config_from_args

    cfg = config_from_args(args, SPEC)
    if args.print_config:
        return print_config(cfg)
    fit(cfg)
    return 0


def _device(name: Any) -> Any:
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _set_threads(threads: Any) -> None:
    import torch

    from slaknet.train.machine import resolve_threads

    n = resolve_threads(threads)
    if n is not None:
        torch.set_num_threads(n)


def _eval_dataset(data: str, spec: Dict[str, Any], val_samples: Any, reduce_zero_label: Any = None) -> Any:
    from slaknet.segment.data import ContourSegmentation, PairedTransform, SegmentationFolder, parse_seg_data

    kind, root = parse_seg_data(data)
    if kind == "builtin":
        return ContourSegmentation("val", int(val_samples or spec.get("val_samples") or 200),
                                   int(spec.get("input_size", 64)), int(spec.get("data_seed", 0)),
                                   spec["mean"], spec["std"])
    reduce = reduce_zero_label if reduce_zero_label is not None else spec.get("reduce_zero_label")
    return SegmentationFolder(root, "val", PairedTransform(spec["mean"], spec["std"]), classes=spec.get("classes"),
                              report_bad=True, reduce_zero_label=reduce, substitute=False)


def _eval(args: argparse.Namespace) -> int:
    import time

    from torch.utils.data import DataLoader

    from slaknet.segment.data import ContourSegmentation
    from slaknet.segment.infer import confusion_over, load_segmentation_checkpoint
    from slaknet.segment.metrics import scores
    from slaknet.segment.task import collate_segmentation

    _set_threads(args.threads)
    net, spec = load_segmentation_checkpoint(args.checkpoint)
    data = args.data or spec.get("data")
    if not data:
        raise ConfigError("--data is required for this checkpoint")
    ds = _eval_dataset(data, spec, args.val_samples, args.reduce_zero_label)
    dev = _device(args.device)
    net.to(dev)
    bs = max(1, int(args.batch_size)) if isinstance(ds, ContourSegmentation) else 1
    loader = DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=collate_segmentation)
    k = int(spec["num_classes"])
    t0 = time.perf_counter()
    cm, loss_sum, n_pix, met = confusion_over(net, loader, k, dev, spec.get("crop"), spec.get("stride"))
    bad = met + len(getattr(ds, "left_out", ()))  # with the pairs the scan set aside: each counted once, none replaced
    s = scores(cm)
    res = {"checkpoint": args.checkpoint, "data": data, "images": len(ds) - met,
           "miou": s["miou"], "pixel_acc": s["pixel_acc"], "loss": loss_sum / max(n_pix, 1.0), "bad_images": bad,
           "seconds": round(time.perf_counter() - t0, 2),
           "iou": dict(zip(spec.get("classes") or [str(i) for i in range(k)], s["iou"]))}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.checkpoint} on {data}: mIoU {res['miou']:.2f}  pixel acc {res['pixel_acc']:.2f}%  "
              f"loss {res['loss']:.4f}  ({res['images']} images, {res['seconds']:.1f}s"
              + (f", {bad} bad pairs skipped" if bad else "") + ")")
    return 0


def _read_input(path: str, args: argparse.Namespace, labels: Any) -> Tuple[str, Any, Any]:
    """``(name, uint8 image, ground truth or None)`` of an image file; a one-line ConfigError if unreadable."""
    import numpy as np
    from PIL import Image

    from slaknet.segment.folders import read_mask

    if not os.path.isfile(path):
        raise ConfigError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for damaged files
        raise ConfigError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    stem = os.path.splitext(os.path.basename(path))[0]
    mpath = os.path.join(args.masks, stem + ".png") if args.masks else None
    gt = None
    if mpath and os.path.isfile(mpath):
        try:
            gt = labels.to_labels(read_mask(mpath))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"cannot read mask {mpath}: {type(exc).__name__}: {exc}") from exc
    return stem, img, gt


def _predict_inputs(args: argparse.Namespace, spec: Dict[str, Any]) -> Iterator[Tuple[str, Any, Any]]:
    """``(name, uint8 image, ground truth or None)`` of the built-in data, then of each image file; a file
    that cannot be read yields ``(path, None, error message)``."""
    import numpy as np

    from slaknet.segment.data import parse_seg_data, render_contours
    from slaknet.segment.folders import LabelScheme

    if not args.data and not args.images:
        raise ConfigError("nothing to predict: give image files or --data builtin:contours")
    if args.data:
        if parse_seg_data(args.data)[0] != "builtin":
            raise ConfigError("predict --data takes builtin:contours; pass image files (and --masks) for folders")
        for i in range(max(1, args.count)):
            img, lab = render_contours(int(spec.get("data_seed", 0)), "val", i, int(spec.get("input_size", 64)))
            yield f"val_{i:05d}", img, lab.astype(np.int64)
    reduce = args.reduce_zero_label if args.reduce_zero_label is not None else spec.get("reduce_zero_label")
    labels = LabelScheme(list(spec.get("classes") or []), bool(reduce), "the checkpoint")
    for path in args.images:
        try:
            yield _read_input(path, args, labels)
        except ConfigError as exc:
            yield path, None, str(exc)


def _predict(args: argparse.Namespace) -> int:
    """Masks (and pictures) for every input that can be read; an input that cannot is reported in one line
    and the command exits 2 once the others are written."""
    import sys

    import torch

    from slaknet.segment.infer import colorize, image_tensor, load_segmentation_checkpoint, predict_logits, save_png
    from slaknet.segment.infer import side_by_side

    _set_threads(args.threads)
    net, spec = load_segmentation_checkpoint(args.checkpoint)
    dev = _device(args.device)
    net.to(dev)
    k = int(spec["num_classes"])
    written, with_gt, failed = [], 0, []
    for name, img, gt in _predict_inputs(args, spec):
        if img is None:
            failed.append(name)
            print(f"slaknet segment predict: error: {gt}", file=sys.stderr)
            continue
        x = image_tensor(img, spec["mean"], spec["std"]).to(dev)
        with torch.no_grad():
            pred = predict_logits(net, x, k, spec.get("crop"), spec.get("stride"))[0].argmax(0).cpu().numpy()
        out = os.path.join(args.output_dir, f"{name}_mask.png")
        save_png(colorize(pred, k), out)
        save_png(pred.astype("uint8"), os.path.join(args.output_dir, f"{name}_labels.png"))
        written.append(out)
        if gt is not None:
            with_gt += 1
            save_png(side_by_side(img, colorize(pred, k), colorize(gt, k)),
                     os.path.join(args.output_dir, f"{name}_side.png"))
    print(f"wrote {len(written)} colourised masks (NAME_mask.png; class indices in NAME_labels.png)"
          + (f" and {with_gt} image | truth | prediction pictures (NAME_side.png)" if with_gt else "")
          + f" to {os.path.abspath(args.output_dir)}"
          + (f"; {len(failed)} input{'s' if len(failed) > 1 else ''} failed (above)" if failed else ""))
    return 2 if failed else 0


def _export(args: argparse.Namespace) -> int:
    from slaknet.segment.infer import export_segmentation

    res = export_segmentation(args.checkpoint, args.output_file, args.format, args.input_size, args.reparam)
    print(res.summary())
    return 0
