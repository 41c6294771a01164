"""``slaknet detect``: train / eval / predict a SLaK detector (no arguments: the CPU demo, SLaK vs 7x7).

Examples::

    slaknet detect                                         # ~5 min demo: closed contours among open decoys
    slaknet detect train -o runs/det                       # the demo data, one model, all `slaknet train` flags
    slaknet detect train --data /data/coco --backbone-checkpoint SLaK_tiny_checkpoint.pth --model slak_tiny
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

__all__ = ["add_arguments", "run", "train_config"]


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("demo (no sub-command)")
    g.add_argument("--demo-output", dest="demo_output", default="runs/detect-demo",
                   help="folder of the demo's two runs and picture (default runs/detect-demo)")
    g.add_argument("--demo-epochs", dest="demo_epochs", type=int, default=None, help="epochs per model")
    g.add_argument("--demo-train-samples", dest="demo_train_samples", type=int, default=None)
    g.add_argument("--demo-threads", dest="demo_threads", default=None, help="torch threads (default auto)")


def _detection_train_arguments(p: argparse.ArgumentParser) -> None:
    from slaknet.detect.options import DETECTORS

    g = p.add_argument_group("detection")
    g.add_argument("--detector", default=None, choices=list(DETECTORS), help="torchvision detector (mask_rcnn)")
    g.add_argument("--backbone-checkpoint", dest="backbone_checkpoint", default=None,
                   help="start the backbone from a SLaK classification checkpoint (official or slaknet)")
    g.add_argument("--train-sizes", dest="train_sizes", type=int, nargs="+", default=None,
                   help="shorter image sides sampled per batch (multi-scale; coco recipe 480..800)")
    g.add_argument("--task-option", dest="task_option_list", action="append", default=[], metavar="KEY=VALUE",
                   help="any detection option (docs/detection.md), e.g. --task-option anchor_sizes=8,16,32,64,128")


def _add_train(sub: Any) -> None:
    from slaknet.train.config import add_train_arguments

    p = sub.add_parser("train", help="train a detector with the shared trainer (all `slaknet train` flags)",
                       allow_abbrev=False)
    add_train_arguments(p)
    for a in p._actions:  # the detection recipes instead of the classification ones
        if a.dest == "recipe":
            a.help = "defaults for unset options: auto (det_demo for builtin:contours, else coco), det_demo, coco"
        if a.dest == "data":
            a.help = "builtin:contours (default) or a COCO folder (annotations/instances_{train,val}*.json + images)"
    _detection_train_arguments(p)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="box / mask AP of a detector checkpoint on a dataset", allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="checkpoint-best.pth / checkpoint-last.pth / model.safetensors")
    p.add_argument("--data", default=None, help="builtin:contours or a COCO folder (default: the checkpoint's data)")
    p.add_argument("--val-samples", dest="val_samples", type=int, default=None, help="built-in data: images")
    p.add_argument("--batch-size", "-b", dest="batch_size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="boxes / scores / labels (JSON) and a PNG with boxes drawn per image",
                       allow_abbrev=False)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", "-o", default="predictions", help="folder for IMAGE.png and predictions.json")
    p.add_argument("--score-thresh", dest="score_thresh", type=float, default=0.5,
                   help="minimum score to report / draw (default 0.5)")
    p.add_argument("--device", default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _demo_arguments(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)


def _apply_yaml(args: argparse.Namespace) -> None:
    """Options left at their defaults are taken from ``--config`` (YAML; the command line wins)."""
    if not getattr(args, "config", None):
        return
    from slaknet.train.config import add_train_arguments, load_yaml_defaults

    fresh = argparse.ArgumentParser(add_help=False)
    add_train_arguments(fresh)
    _detection_train_arguments(fresh)
    defaults = vars(fresh.parse_args([]))
    for dest, value in load_yaml_defaults(args.config, fresh).items():
        if dest == "task_option_list":  # the file's options first, the command line's after (they win)
            value = [value] if isinstance(value, str) else list(value)
            args.task_option_list = value + list(args.task_option_list or [])
        elif getattr(args, dest, None) == defaults.get(dest):
            setattr(args, dest, value)


def train_config(args: argparse.Namespace) -> Any:
    """The resolved :class:`TrainConfig` of ``slaknet detect train`` (detection recipes, task options merged)."""
    from slaknet.detect.options import parse_option
    from slaknet.train.config import resolve_config

    _apply_yaml(args)
    args.task = "detection"
    if getattr(args, "recipe", "auto") in (None, "auto") and not getattr(args, "resume", None):
        data = getattr(args, "data", None)
        args.recipe = "det_demo" if data in (None, "builtin:contours", "contours") else "coco"
    if args.recipe not in ("auto", "det_demo", "coco") and not getattr(args, "resume", None):
        raise ConfigError(f"--recipe {args.recipe} is a classification recipe; detection has det_demo and coco")
    given: Dict[str, Any] = {}
    for text in getattr(args, "task_option_list", []) or []:
        given.update(parse_option(text))
    for key in ("detector", "backbone_checkpoint", "train_sizes"):
        if getattr(args, key, None) is not None:
            given[key] = getattr(args, key)
    if getattr(args, "finetune", None):
        raise ConfigError("detection: give the backbone's classification checkpoint as --backbone-checkpoint, "
                          "not --finetune")
    cfg = resolve_config(args)
    opts = dict(cfg.task_options or {})
    opts.update(given)
    from slaknet.detect.options import resolve_options

    resolve_options(opts, int(cfg.input_size))  # one-line errors before anything is built
    return cfg.replace(task="detection", task_options=opts)


def _run_train(args: argparse.Namespace) -> int:
    import logging

    from slaknet.detect.report import APLines
    from slaknet.train.distributed import cleanup
    from slaknet.train.trainer import Trainer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = train_config(args)
    try:
        Trainer(cfg, callbacks=[APLines()]).fit()
    finally:
        cleanup()
    return 0


def _device(name: Any) -> Any:
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _run_eval(args: argparse.Namespace) -> int:
    from slaknet.detect.inference import load_detector
    from slaknet.detect.metrics import evaluate_detector
    from slaknet.detect.task import build_detection_data

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    dev = _device(args.device)
    det = load_detector(args.checkpoint, device=dev)
    c = det.config
    data = args.data or c.get("data")
    if not data:
        raise ConfigError("--data is required for this checkpoint (builtin:contours or a COCO folder)")
    ns = argparse.Namespace(data=data, input_size=int(c.get("input_size") or det.options["test_size"]),
                            train_samples=1, val_samples=args.val_samples or int(c.get("val_samples") or 100),
                            data_seed=int(c.get("data_seed") or 0), eval_data=c.get("eval_data") if not args.data else None)
    ds = build_detection_data(ns, dict(det.options, hflip=False)).val
    if list(getattr(ds, "classes", det.classes)) != det.classes:
        raise ConfigError(f"the classes of {data} differ from the checkpoint's ({len(det.classes)} classes)")
    res = evaluate_detector(det.model, ds, dev, args.batch_size, masks=det.masks)
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

    dev = _device(args.device)
    det = load_detector(args.checkpoint, device=dev)
    os.makedirs(args.output, exist_ok=True)
    records: List[Dict[str, Any]] = []
    for path in args.images:
        img = read_image(path)
        rec = predict_images(det, [img], args.score_thresh, dev)[0]
        png = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        save_png(draw_detections(img, rec), png)
        rec.pop("_masks", None)
        records.append(dict(image=path, drawn=png, **rec))
        print(f"{path}: {len(rec['boxes'])} detections -> {png}")
    out = os.path.join(args.output, "predictions.json")
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

    return run_demo(args.demo_output, epochs=args.demo_epochs, train_samples=args.demo_train_samples,
                    threads=args.demo_threads)
