"""``slaknet detect``: train / eval / predict a SLaK detector (no arguments: the CPU demo, SLaK vs 7x7).

Examples::

    slaknet detect                                         # ~5 min demo: closed contours among open decoys
    slaknet detect train -o runs/det                       # the demo data, one model, all `slaknet train` flags
    slaknet detect train --data /data/coco --backbone-checkpoint SLaK_tiny_checkpoint.pth --model slak_tiny
    slaknet detect train --train-annotations train.json --train-images imgs/ --val-annotations val.json \
        --val-images imgs/ -o runs/mine                     # your own COCO files (--recipe auto reads them)
    slaknet detect eval --checkpoint runs/det/checkpoint-best.pth
    slaknet detect predict img.jpg --checkpoint runs/det/checkpoint-best.pth -o pred/

Torch-free at import (``--help``): heavy imports happen in :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

from slaknet.errors import ConfigError

from slaknet.detect.spec import SPEC

__all__ = ["add_arguments", "run"]


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from slaknet.settings import DataSettings, OptimSettings, RunSettings, add_setting

    g = p.add_argument_group("demo (no sub-command)")
    add_setting(g, RunSettings, "output_dir",
                help="folder of the demo's two runs and picture (default runs/detect-demo)")
    add_setting(g, OptimSettings, "epochs", help="demo: epochs per model (default: det_demo recipe)")
    add_setting(g, DataSettings, "train_samples", help="demo: training images (default: det_demo recipe)")
    add_setting(g, RunSettings, "threads", help="demo: torch threads (default auto)")


def _add_train(sub: Any) -> None:
    from slaknet.train.config import add_config_arguments

    p = sub.add_parser("train", help="train a detector with the shared trainer (all `slaknet train` flags)")
    add_config_arguments(p, SPEC)


def _add_eval(sub: Any) -> None:
    from slaknet.detect.spec import DetectionOptions
    from slaknet.settings import CommonOptions, DataSettings, OptimSettings, RunSettings, add_setting

    p = sub.add_parser("eval", help="box / mask AP of a detector checkpoint on a dataset", allow_abbrev=False)
    add_setting(p, CommonOptions, "checkpoint", default=None, required=True,
                help="checkpoint-best.pth / checkpoint-last.pth / model.safetensors")
    add_setting(p, DataSettings, "data", default=None,
                help="builtin:contours or a COCO folder (default: the checkpoint's data)")
    add_setting(p, DetectionOptions, "val_annotations", default=None,
                help="COCO JSON to evaluate on (with --val-images; default: the checkpoint's held-out split)")
    add_setting(p, DetectionOptions, "val_images", default=None, help="folder of --val-annotations' images")
    add_setting(p, DataSettings, "val_samples", default=None, help="built-in data: images (default: as trained)")
    add_setting(p, OptimSettings, "batch_size", default=8, help="evaluation batch size (default 8)")
    add_setting(p, RunSettings, "device", default=None)
    add_setting(p, RunSettings, "threads", default=None)
    add_setting(p, CommonOptions, "json", default=False, nargs=0, help="print the metrics as JSON")


def _add_predict(sub: Any) -> None:
    from slaknet.settings import CommonOptions, RunSettings, add_setting

    p = sub.add_parser("predict", help="boxes / scores / labels (JSON) and a PNG with boxes drawn per image",
                       allow_abbrev=False)
    p.add_argument("images", nargs="+", help="image files")
    add_setting(p, CommonOptions, "checkpoint", default=None, required=True)
    add_setting(p, RunSettings, "output_dir", default="predictions",
                help="folder for IMAGE.png and predictions.json (default predictions)")
    p.add_argument("--score-thresh", dest="score_thresh", type=float, default=0.5,
                   help="minimum score to report / draw (default 0.5)")
    add_setting(p, RunSettings, "device", default=None)
    add_setting(p, RunSettings, "threads", default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _demo_arguments(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)


def _run_train(args: argparse.Namespace) -> int:
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


def _run_eval(args: argparse.Namespace) -> int:
    from slaknet.detect.inference import load_detector
    from slaknet.detect.metrics import evaluate_detector
    from slaknet.detect.task import held_out_data

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (args.val_annotations is None) != (args.val_images is None):
        raise ConfigError("--val-annotations FILE and --val-images DIR go together")
    _set_threads(args.threads)
    dev = _device(args.device)
    det = load_detector(args.checkpoint, device=dev)
    c = det.config
    given = bool(args.data or args.val_annotations)
    data = args.data or (args.val_annotations if args.val_annotations else c.get("data"))
    if not data:
        raise ConfigError("--data is required for this checkpoint (builtin:contours, a COCO folder, or "
                          "--val-annotations FILE --val-images DIR)")
    # the held-out files: given here, else the ones the run used (unless --data names other data)
    files = ({"val_annotations": args.val_annotations, "val_images": args.val_images} if args.val_annotations
             else {} if args.data else det.options)
    ds = held_out_data(data, None if given else c.get("eval_data"), files, det.classes,
                       int(c.get("input_size") or det.options["test_size"]),
                       args.val_samples or int(c.get("val_samples") or 100), int(c.get("data_seed") or 0))
    if list(getattr(ds, "classes", det.classes)) != det.classes:
        raise ConfigError(f"the classes of {data} differ from the checkpoint's ({len(det.classes)} classes)")
    res = evaluate_detector(det.model, ds, dev, args.batch_size, masks=det.masks and bool(ds.has_masks))
    res.update(checkpoint=args.checkpoint, data=data, images=len(ds), detector=det.options["detector"])
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        mask = f", mask AP {res['mask_map']:.1f}" if "mask_map" in res else ""
        print(f"{args.checkpoint} ({det.options['detector']}) on {data} ({len(ds)} images): box AP {res['map']:.1f} "
              f"(AP50 {res['map50']:.1f}, AP75 {res['map75']:.1f}){mask}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from slaknet.detect.inference import draw_detections, load_detector, predict_images, read_image, save_png
    from slaknet.io import atomic_path

    _set_threads(args.threads)
    dev = _device(args.device)
    det = load_detector(args.checkpoint, device=dev)
    os.makedirs(args.output_dir, exist_ok=True)
    records: List[Dict[str, Any]] = []
    for path in args.images:
        img = read_image(path)
        rec = predict_images(det, [img], args.score_thresh, dev)[0]
        png = os.path.join(args.output_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        save_png(draw_detections(img, rec), png)
        rec.pop("_masks", None)
        records.append(dict(image=path, drawn=png, **rec))
        print(f"{path}: {len(rec['boxes'])} detections -> {png}")
    out = os.path.join(args.output_dir, "predictions.json")
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        json.dump(records, f, indent=2)
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action == "train":
        return _run_train(args)
    if action == "eval":
        return _run_eval(args)
    if action == "predict":
        return _run_predict(args)
    from slaknet.detect.demo import run_demo

    return run_demo(getattr(args, "output_dir", None) or "runs/detect-demo", epochs=getattr(args, "epochs", None),
                    train_samples=getattr(args, "train_samples", None), threads=getattr(args, "threads", None))
