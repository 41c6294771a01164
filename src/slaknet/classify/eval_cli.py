"""``slaknet eval``: top-1 / top-5 / loss / images per second of a checkpoint on a dataset.

Accepts official SLaK checkpoints (raw or EMA weights; the architecture is read from the tensor shapes)
and slaknet's own (training checkpoints, ``checkpoint-best.pth`` or ``model.safetensors``), whose stored
input size, class names and normalisation are used. ``--data`` is an image folder (``ROOT/val/CLASS/*.jpg``
or ``ROOT/CLASS/*.jpg``) or ``builtin:insideness``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from slaknet.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slaknet.checkpoints.info import TrainingInfo

__all__ = ["add_arguments", "add_checkpoint_arguments", "set_threads", "run", "load_model_for_inference",
           "normalisation", "inference_transform"]

def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--model``, ``--ema`` / ``--no-ema``, ``--device`` and ``--threads``, shared by eval
    and predict (declared in :mod:`slaknet.settings`)."""
    from slaknet.settings import CommonOptions, ModelSettings, RunSettings, add_setting

    add_setting(parser, CommonOptions, "checkpoint", default=None, required=True, aliases=("--resume",))
    add_setting(parser, ModelSettings, "model", default=None,
                help="SLaK variant the checkpoint must be (default: read from the checkpoint)")
    add_setting(parser, CommonOptions, "ema", default=None, nargs=0)
    add_setting(parser, RunSettings, "device", default=None)
    add_setting(parser, RunSettings, "threads", default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import (AugmentSettings, CommonOptions, DataSettings, OptimSettings, RunSettings,
                                  add_setting)

    add_checkpoint_arguments(parser)
    add_setting(parser, DataSettings, "data", default=None,
                help="image folder (ROOT/val/CLASS/*.jpg or ROOT/CLASS/*.jpg) or builtin:insideness "
                     "(default: the checkpoint's training data)")
    add_setting(parser, DataSettings, "input_size", default=None,
                help="image side in pixels (default: the checkpoint's training input size, else 224)")
    add_setting(parser, AugmentSettings, "crop_pct", default=None,
                help="centre-crop fraction of image-folder data (default: the checkpoint's, else 0.875 below "
                     "384 px)")
    add_setting(parser, OptimSettings, "batch_size", default=64, help="evaluation batch size (default 64)")
    add_setting(parser, DataSettings, "num_workers", default=4)
    add_setting(parser, CommonOptions, "reparam", default="none", const="strips",
                help="fold the BatchNorms into the kernels first (same accuracy, faster): strips (--reparam "
                     "alone), dense, or none (default)")
    add_setting(parser, RunSettings, "precision", default="fp32")
    add_setting(parser, DataSettings, "val_samples", default=None,
                help="built-in data: held-out images (default: as trained)")
    add_setting(parser, CommonOptions, "json", default=False, nargs=0, help="print the metrics as JSON")


def set_threads(threads: Optional[str]) -> None:
    """``--threads N`` / ``auto``: torch's CPU threads (absent: torch's default)."""
    import torch

    from slaknet.train.machine import resolve_threads

    n = resolve_threads(threads)
    if n is not None:
        torch.set_num_threads(n)


def _names(classes: Sequence[str], at_most: int = 6) -> str:
    """``a, b, c`` (and ``... N in all`` for long lists), for one-line messages."""
    names = [str(c) for c in classes]
    return ", ".join(names[:at_most]) + (f", ... {len(names)} in all" if len(names) > at_most else "")


def load_model_for_inference(checkpoint: str, model_name: Optional[str] = None, use_ema: Optional[bool] = None
                             ) -> Tuple["torch.nn.Module", "TrainingInfo", str]:
    """``(model in eval mode, training info, architecture name)`` for ``checkpoint`` (see
    :func:`slaknet.models.factory.model_from_checkpoint`: an explicit ``model_name`` must fit the file)."""
    from slaknet.models.factory import model_from_checkpoint

    return model_from_checkpoint(checkpoint, model_name, use_ema)


def normalisation(info: "TrainingInfo", builtin: bool) -> Tuple[Sequence[float], Sequence[float]]:
    """Mean and std the model was trained with: stored in the checkpoint, else the data source's default."""
    from slaknet.data import BUILTIN_MEAN, BUILTIN_STD
    from slaknet.models.slak import IMAGENET_MEAN, IMAGENET_STD

    default = (BUILTIN_MEAN, BUILTIN_STD) if builtin else (IMAGENET_MEAN, IMAGENET_STD)
    return info.mean or default[0], info.std or default[1]


def inference_transform(size: int, crop_pct: Optional[float], mean: Sequence[float], std: Sequence[float],
                        builtin: bool) -> Any:
    """Built-in data: resize to ``size`` and normalise; photos: resize + centre crop (timm, bicubic)."""
    if builtin:
        from torchvision.transforms import Compose, Normalize, Resize, ToTensor

        return Compose([Resize((size, size)), ToTensor(), Normalize(mean, std)])
    from slaknet.classify.task import eval_transform

    return eval_transform(size, crop_pct, mean, std)


def _dataset(data: str, info: "TrainingInfo", args: argparse.Namespace, size: int) -> Tuple[Any, List[str]]:
    from slaknet.data import InsidenessDataset, SafeImageFolder, parse_data_spec

    kind, what = parse_data_spec(data)
    mean, std = normalisation(info, kind == "builtin")
    if kind == "builtin":
        from torchvision.transforms import Normalize

        ds: Any = InsidenessDataset("val", args.val_samples or int(info.get("val_samples") or 1000), size,
                                    float(info.get("difficulty", 0.5)), int(info.get("data_seed", 0)),
                                    transform=Normalize(mean, std))
        return ds, list(ds.classes)
    if kind != "folder":
        raise ConfigError("slaknet eval takes an image folder or builtin:insideness as --data")
    root = os.path.join(what, "val") if os.path.isdir(os.path.join(what, "val")) else what
    ds = SafeImageFolder(root, inference_transform(size, args.crop_pct or info.crop_pct, mean, std, False),
                         report_bad=True)
    if info.classes and list(info.classes) != list(ds.classes):
        raise ConfigError(f"the class folders of {data} ({_names(ds.classes)}) differ from the classes the "
                          f"checkpoint was trained on ({_names(info.classes)})")
    return ds, list(ds.classes)


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from slaknet.train.distributed import init_distributed
    from slaknet.classify.evaluate import evaluate
    from slaknet.train.machine import autocast_dtype, cap_workers

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    set_threads(args.threads)
    model, info, arch = load_model_for_inference(args.checkpoint, args.model, args.ema)
    if args.reparam != "none":
        import slaknet

        model = slaknet.reparameterize_model(model, merge_dense=args.reparam == "dense")
    data = args.data or info.data
    if not data:
        raise ConfigError("--data is required for this checkpoint (an image folder or builtin:insideness)")
    size = args.input_size or info.input_size or 224
    ds, classes = _dataset(data, info, args, size)
    n_out = getattr(model, "num_classes", None)
    if n_out is not None and n_out != len(classes) and not (n_out == 1000 and len(classes) <= 1000):
        raise ConfigError(f"the checkpoint has {n_out} outputs but {data} has {len(classes)} classes")
    dist = init_distributed(args.device)
    model.to(dist.device)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=cap_workers(args.num_workers))
    res = evaluate(model, loader, dist.device, autocast_dtype(args.precision, dist.device),
                   progress=sys.stderr.isatty(), desc="eval")
    res.update(checkpoint=args.checkpoint, data=data, model=arch, input_size=size,
               reparameterized=args.reparam != "none", reparam=args.reparam)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        top5 = f"  top-5 {res['top5']:.2f}%" if len(classes) > 5 else ""
        print(f"{args.checkpoint} ({arch}) on {data} at {size} px: top-1 {res['top1']:.2f}%{top5}  "
              f"loss {res['loss']:.4f}  ({res['images']} images, {res['images_per_s']:.1f} img/s"
              + (f", {res['bad_images']} unreadable skipped" if res["bad_images"] else "") + ")")
    return 0
