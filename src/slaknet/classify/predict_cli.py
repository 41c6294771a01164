"""``slaknet predict IMAGE... --checkpoint C``: top-k labels with probabilities.

Class names, input size and normalisation come from the checkpoint when slaknet stored them, else the
ImageNet names for a 1000-class model (official checkpoints), else class indices. Unreadable images are
reported and skipped; the others are still predicted (exit status 2 when any image failed).

``--runtime`` (default ``auto``: on the CPU with onnxruntime installed, the faster of torch and onnxruntime
for this model, timed once per machine; else torch). onnxruntime runs an ONNX export of the
reparameterized model made once per model and cached (:mod:`slaknet.deploy.runtime`), checked against
torch on the first image; one line on stderr says which runtime ran and why.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from slaknet.errors import ConfigError

__all__ = ["add_arguments", "run", "predict", "predict_files"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.classify.eval_cli import add_checkpoint_arguments
    from slaknet.settings import AugmentSettings, CommonOptions, DataSettings, add_setting

    parser.add_argument("images", nargs="+", help="image files")
    add_checkpoint_arguments(parser)
    parser.add_argument("--topk", "-k", type=int, default=5, help="labels per image (default 5, at most the classes)")
    add_setting(parser, DataSettings, "input_size", default=None,
                help="image side in pixels (default: the checkpoint's training input size, else 224)")
    add_setting(parser, AugmentSettings, "crop_pct", default=None,
                help="centre-crop fraction of photos (default: the checkpoint's, else 0.875 below 384 px)")
    add_setting(parser, CommonOptions, "json", default=False, nargs=0,
                help="print JSON (one object per image in a list)")
    add_setting(parser, CommonOptions, "runtime", default="auto")


def _class_names(classes: Optional[List[str]], n: int) -> List[str]:
    if classes and len(classes) == n:
        return [str(c) for c in classes]
    if n == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i) for i in range(1000)]
        except Exception:
            pass
    return [str(i) for i in range(n)]


def _open_rgb(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ConfigError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"cannot read image {path!r}: {exc}") from exc


def predict_files(model: Any, images: List[str], transform: Any, class_names: List[str], topk: int = 5,
                  device: Any = None, runtime: str = "torch", report: Optional[Callable[[str], None]] = None
                  ) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    """Top-k ``{"label", "index", "prob"}`` per readable image, and ``(path, reason)`` per unreadable one.

    ``runtime``: ``torch``, ``onnxruntime`` or ``auto`` (:func:`slaknet.deploy.runtime.inference_runner`;
    chosen on the first readable image, which also checks onnxruntime against torch); ``report`` receives
    the one-line note saying which runtime runs and why.
    """
    import torch

    from slaknet.deploy.runtime import inference_runner

    device = torch.device(device or "cpu")
    out, bad = [], []
    runner = None
    for path in images:
        try:
            img = _open_rgb(path)
        except ConfigError as exc:
            bad.append((path, str(exc)))
            continue
        x = transform(img).unsqueeze(0)
        if runner is None:
            runner = inference_runner(model, x, runtime, device)
            if report is not None:
                report(runner.note)
        with torch.no_grad():
            probs = runner(x.to(device)).float().softmax(-1)[0]
        p, idx = probs.topk(min(topk, probs.numel()))
        out.append({"image": path, "top": [{"label": class_names[i], "index": int(i), "prob": float(q)}
                                           for q, i in zip(p.tolist(), idx.tolist())]})
    return out, bad


def predict(model: Any, images: List[str], transform: Any, class_names: List[str], topk: int = 5,
            device: Any = None, runtime: str = "torch") -> List[Dict[str, Any]]:
    """Top-k ``{"label", "index", "prob"}`` for each image path; a one-line error for an unreadable file.

    ``runtime`` as in :func:`predict_files` (``torch`` here; the command's default is ``auto``)."""
    out, bad = predict_files(model, images, transform, class_names, topk, device, runtime)
    if bad:
        raise ConfigError(bad[0][1])
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from slaknet.classify.eval_cli import inference_transform, load_model_for_inference, normalisation, set_threads

    if args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}")
    set_threads(args.threads)
    model, info, _ = load_model_for_inference(args.checkpoint, args.model, args.ema)
    n = int(getattr(model, "num_classes", 0) or 0)
    if n < 1:
        raise ConfigError("the checkpoint has no classifier head; it cannot predict labels")
    builtin = str(info.data or "").startswith("builtin:")
    size = args.input_size or info.input_size or 224
    tf = inference_transform(size, args.crop_pct or info.crop_pct, *normalisation(info, builtin), builtin)
    default_device = "cuda" if torch.cuda.is_available() and args.runtime != "onnxruntime" else "cpu"
    device = torch.device(args.device or default_device)
    model.to(device)

    def report(note: str) -> None:
        print(f"slaknet predict: runtime {note}", file=sys.stderr)

    res, bad = predict_files(model, args.images, tf, _class_names(info.classes, n), args.topk, device,
                             args.runtime, report)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res:
            print(r["image"])
            for t in r["top"]:
                print(f"  {t['prob'] * 100:6.2f}%  {t['label']}")
    for _, reason in bad:
        print(f"slaknet predict: skipped: {reason}", file=sys.stderr)
    if bad:
        print(f"slaknet predict: {len(bad)} of {len(args.images)} images could not be read", file=sys.stderr)
        return 2  # a user's file: the exit code of every user mistake
    return 0
