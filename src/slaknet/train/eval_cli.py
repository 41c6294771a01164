"""``slaknet eval``: top-1 / top-5 / loss / images per second of a checkpoint on a dataset.

Accepts official SLaK checkpoints (raw or EMA weights; the architecture is read from the tensor shapes)
and slaknet's own (training checkpoints, ``checkpoint-best.pth`` or ``model.safetensors``). ``--data``
is an image folder (``ROOT/val/CLASS/*.jpg`` or ``ROOT/CLASS/*.jpg``) or ``builtin:insideness``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from slaknet.errors import ConfigError

__all__ = ["add_arguments", "run", "load_model_for_inference"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="SLaK variant (default: from the checkpoint)")
    parser.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True,
                        help="official or slaknet checkpoint (.pth / .safetensors)")
    parser.add_argument("--data", "--data-path", "--data_path", dest="data", default=None,
                        help="image folder (ROOT/val/CLASS/*.jpg or ROOT/CLASS/*.jpg) or builtin:insideness "
                             "(default: the checkpoint's training data)")
    parser.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None)
    parser.add_argument("--crop-pct", "--crop_pct", dest="crop_pct", type=float, default=None)
    parser.add_argument("--batch-size", "-b", dest="batch_size", type=int, default=64)
    parser.add_argument("--num-workers", "-j", dest="num_workers", type=int, default=4)
    parser.add_argument("--ema", dest="use_ema", type=_tri, default=None, nargs="?", const=True,
                        help="evaluate EMA weights (true) or raw ones (false); default raw when present")
    parser.add_argument("--reparam", action="store_true",
                        help="fold BN into the kernels first (inference form; same accuracy, faster)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--val-samples", dest="val_samples", type=int, default=None,
                        help="built-in data: held-out images (default: as trained)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _tri(v: Any) -> Optional[bool]:
    from slaknet.train.config import str2bool

    return str2bool(v)


def load_model_for_inference(checkpoint: str, model_name: Optional[str] = None,
                             use_ema: Optional[bool] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Model built to fit ``checkpoint`` plus what the file says about its training (config, classes)."""
    import slaknet
    from slaknet.models.checkpoint import read_checkpoint

    if not os.path.isfile(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint!r} does not exist")
    obj = read_checkpoint(checkpoint)
    meta: Dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        meta = dict(obj["config"])
        if obj.get("classes"):
            meta["classes"] = list(obj["classes"])
    if checkpoint.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(checkpoint, "pt") as f:
                md = f.metadata() or {}
            if "classes" in md:
                meta["classes"] = json.loads(md["classes"])
            if "model" in md:
                meta.setdefault("model", md["model"])
            if "input_size" in md:
                meta.setdefault("input_size", int(md["input_size"]))
            if "data" in md:
                meta.setdefault("data", md["data"])
            for k, conv in (("difficulty", float), ("data_seed", int), ("val_samples", int)):
                if md.get(k) not in (None, "None"):
                    meta.setdefault(k, conv(md[k]))
        except Exception:
            pass
    name = model_name or meta.get("model") or "slak_tiny"
    model = slaknet.create_model(name, checkpoint=checkpoint, use_ema=use_ema)
    return model.eval(), meta


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from slaknet.train.data import InsidenessDataset, Normalize, SafeImageFolder, parse_data_spec
    from slaknet.train.distributed import init_distributed
    from slaknet.train.engine import _autocast_dtype, _collate, eval_transform
    from slaknet.train.evaluate import evaluate

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, meta = load_model_for_inference(args.checkpoint, args.model, args.use_ema)
    if args.reparam:
        import slaknet

        model = slaknet.reparameterize_model(model)
    data = args.data or meta.get("data")
    if not data:
        raise ConfigError("--data is required for this checkpoint (an image folder or builtin:insideness)")
    kind, what = parse_data_spec(data)
    size = args.input_size or int(meta.get("input_size") or 224)
    if kind == "builtin":
        ds: Any = InsidenessDataset("val", args.val_samples or int(meta.get("val_samples") or 1000), size,
                                    float(meta.get("difficulty", 0.5)), int(meta.get("data_seed", 0)),
                                    transform=Normalize((0.5,) * 3, (0.5,) * 3))
        classes: List[str] = list(ds.classes)
    elif kind == "folder":
        root = os.path.join(what, "val") if os.path.isdir(os.path.join(what, "val")) else what
        tf = eval_transform(size, args.crop_pct, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        ds = SafeImageFolder(root, tf, report_bad=True)
        classes = ds.classes
    else:
        raise ConfigError("slaknet eval takes an image folder or builtin:insideness as --data")
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and n_out != len(classes) and not (n_out == 1000 and len(classes) <= 1000):
        raise ConfigError(f"the checkpoint has {n_out} outputs but {data} has {len(classes)} classes")
    trained_classes = meta.get("classes")
    if trained_classes and kind == "folder" and list(trained_classes) != list(classes):
        raise ConfigError(f"class folders of {data} differ from the classes the checkpoint was trained on")
    info = init_distributed(args.device)
    model.to(info.device)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=_collate)
    res = evaluate(model, loader, info.device, _autocast_dtype(args.precision, info.device),
                   progress=sys.stderr.isatty(), desc="eval")
    res.update(checkpoint=args.checkpoint, data=data, model=type(model).__name__, reparameterized=bool(args.reparam))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.checkpoint} on {data}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
              f"loss {res['loss']:.4f}  ({res['images']} images, {res['images_per_s']:.1f} img/s"
              + (f", {res['bad_images']} unreadable skipped" if res["bad_images"] else "") + ")")
    return 0

