"""``slaknet erf``: effective receptive fields of models (or saved matrices), tables, JSON and heatmaps.

Examples::

    slaknet erf slak_tiny                                   # bundled photo, 1024 px, 50 views
    slaknet erf slak_tiny=ckpt.pth convnext_tiny --images /data/imagenet/val --num-images 50
    slaknet erf erf_out/slak_tiny.npy erf_out/convnext_tiny.npy   # re-analyse / compare saved matrices
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List

from slaknet.io import atomic_path

# heavy imports (torch, matplotlib) happen in run(), so `slaknet --help` stays fast


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import CommonOptions, DataSettings, RunSettings, add_setting

    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="a model name (slaknet or timm), NAME=CHECKPOINT for trained weights, "
                             "or a saved ERF matrix FILE.npy")
    parser.add_argument("--images", default=None, metavar="DIR|benchmark|sample",
                        help="an image folder (searched recursively, e.g. ImageNet val), 'benchmark' for "
                             "slaknet's built-in benchmark images, or 'sample' (default): views of the "
                             "photo bundled with matplotlib; nothing is downloaded")
    parser.add_argument("--num-images", type=int, default=50, help="images to average over (default 50)")
    add_setting(parser, DataSettings, "input_size", default=1024, help="input side in pixels (default 1024)")
    add_setting(parser, RunSettings, "device", default=None,
                help="cpu, cuda, cuda:1, ... or auto (the default: cuda if available)")
    add_setting(parser, RunSettings, "output_dir", default="erf_out",
                help="output folder for .npy/.json/.png (default erf_out)")
    parser.add_argument("--kwargs", default=None, metavar="JSON",
                        help='model constructor overrides for every named model, e.g. '
                             '\'{"kernel_size": [7, 7, 7, 7]}\'')
    parser.add_argument("--features-only", action="store_true",
                        help="build timm models with features_only=True and use their last map "
                             "(for models whose forward_features is not NCHW)")
    parser.add_argument("--thresholds", default="0.2,0.3,0.5,0.99",
                        help="comma-separated shares of the total for the area ratios")
    parser.add_argument("--gamma", type=float, default=0.5,
                        help="colour gamma of the heatmaps, display only (default 0.5 brightens faint "
                             "spread; 1 = linear colours as in the papers)")
    add_setting(parser, RunSettings, "seed", default=0, help="image shuffling / view sampling seed (default 0)")
    add_setting(parser, CommonOptions, "json", default=False, nargs=0,
                help="print the results as JSON instead of a table")
    add_setting(parser, RunSettings, "progress", default=True, nargs=0, help="progress bar (default)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")


def _parse_thresholds(text: str) -> List[float]:
    from slaknet.errors import ConfigError

    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < t <= 1 for t in values):
        raise ConfigError(f"--thresholds must be in (0, 1], got {text!r}")
    return values


def _build_model(name: str, checkpoint, kwargs: dict, features_only: bool):
    import slaknet
    from slaknet.checkpoints import read_state_dict
    from slaknet.errors import CheckpointError, ConfigError

    if name in slaknet.list_models():
        if features_only:
            kwargs = dict(kwargs, features_only=True)
        try:
            return slaknet.create_model(name, checkpoint=checkpoint, **kwargs)
        except CheckpointError as exc:
            if not (checkpoint and kwargs):
                raise
            # the architecture could not be inferred from the file, but the user described it:
            # build it from the overrides and load the tensors strictly
            model = slaknet.create_model(name, **kwargs)
            try:
                model.load_state_dict(read_state_dict(checkpoint), strict=True)
            except RuntimeError as load_exc:
                first = " ".join(str(load_exc).split())[:300]
                raise CheckpointError(f"{exc}; building {name} from --kwargs did not fit either: {first}") \
                    from None
            return model
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r}: not a slaknet model ({', '.join(slaknet.list_models())}) "
                          "nor a timm model")
    extra = {"features_only": True} if features_only else {}
    model = timm.create_model(name, pretrained=False, **extra, **kwargs)  # never downloads
    if checkpoint:
        slaknet.load_checkpoint(model, checkpoint)
    return model


def _load_matrix(path: str):
    import numpy as np

    from slaknet.analysis.erf import ERFResult
    from slaknet.errors import ConfigError

    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read ERF matrix {path}: {exc}") from None
    if matrix.ndim != 2:
        raise ConfigError(f"{path}: an ERF matrix must be 2-d, got shape {matrix.shape}")
    result = ERFResult(matrix=matrix.astype(np.float64), name=os.path.splitext(os.path.basename(path))[0],
                       input_size=tuple(matrix.shape))
    meta_path = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(meta_path):  # written next to the matrix by an earlier run
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            result.name = str(meta.get("name", result.name))
            result.num_images = int(meta.get("num_images", 0))
            result.num_skipped = int(meta.get("num_skipped", 0))
            result.feature_size = tuple(meta.get("feature_size", (0, 0)))
        except (OSError, ValueError):
            pass
    return result


def run(args: argparse.Namespace) -> int:
    import torch

    from slaknet.analysis import erf
    from slaknet.errors import ConfigError

    thresholds = _parse_thresholds(args.thresholds)
    if not args.gamma > 0:
        raise ConfigError(f"--gamma must be positive, got {args.gamma}")
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {args.num_images}")
    kwargs = {}
    if args.kwargs:
        try:
            kwargs = json.loads(args.kwargs)
        except ValueError as exc:
            raise ConfigError(f"--kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise ConfigError("--kwargs must be a JSON object")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    device = args.device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"

    results = []
    used_stems = set()
    for spec in args.models:
        if spec.endswith(".npy"):
            result = _load_matrix(spec)
        else:
            name, _, checkpoint = spec.partition("=")
            if checkpoint and not os.path.isfile(checkpoint):
                raise ConfigError(f"checkpoint not found: {checkpoint}")
            label = name + (f"-{os.path.splitext(os.path.basename(checkpoint))[0]}" if checkpoint else "")
            model = _build_model(name, checkpoint or None, kwargs, args.features_only)
            images = erf.resolve_images(args.images, size=args.input_size, num_images=args.num_images,
                                        seed=args.seed)
            result = erf.compute_erf(model, images, num_images=args.num_images, device=device, name=label,
                                     progress=args.progress)
            result.extra["images"] = args.images or "sample"
            if result.num_images < args.num_images:
                print(f"note: {label}: only {result.num_images} usable images (asked for {args.num_images})")
            del model
        stem = erf._safe_stem(result.name)
        while stem in used_stems:
            stem += "_"
        used_stems.add(stem)
        if not spec.endswith(".npy"):
            result.save(args.output_dir, stem, thresholds)
        erf.plot_erf(result, os.path.join(args.output_dir, stem + ".png"), thresholds, gamma=args.gamma)
        results.append(result)

    if len(results) > 1:
        erf.plot_erf_comparison(results, os.path.join(args.output_dir, "compare.png"), thresholds, gamma=args.gamma)
    summary = [r.summary(thresholds) for r in results]
    os.makedirs(args.output_dir, exist_ok=True)
    out_json = os.path.join(args.output_dir, "erf_ratios.json")
    with atomic_path(out_json) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(erf.format_ratio_table(results, thresholds))
        for r in results:
            if r.num_skipped:
                print(f"{r.name}: {r.num_skipped} image(s) skipped (NaN/inf gradient)")
        print(f"wrote {args.output_dir}/ (matrices .npy, summaries .json, heatmaps .png"
              + (", compare.png" if len(results) > 1 else "") + ", erf_ratios.json)")
    return 0
