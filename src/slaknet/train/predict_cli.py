"""``slaknet predict IMAGE... --checkpoint C``: top-k labels with probabilities.

Class names come from the checkpoint (slaknet checkpoints store the dataset's class names), else the
ImageNet names for a 1000-class model (official checkpoints), else class indices.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import torch

from slaknet.errors import ConfigError

__all__ = ["add_arguments", "run", "predict"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", default=None, help="SLaK variant (default: from the checkpoint)")
    parser.add_argument("--checkpoint", dest="checkpoint", required=True,
                        help="official or slaknet checkpoint (.pth / .safetensors)")
    parser.add_argument("--topk", "-k", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None)
    parser.add_argument("--ema", dest="use_ema", default=None, nargs="?", const="true",
                        help="use EMA weights (true/false; default raw when present)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON (one object per image in a list)")


def _class_names(meta: Dict[str, Any], n: int) -> List[str]:
    names = meta.get("classes")
    if names and len(names) == n:
        return [str(c) for c in names]
    if n == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i) for i in range(1000)]
        except Exception:
            pass
    return [str(i) for i in range(n)]


@torch.no_grad()
def predict(model: torch.nn.Module, images: List[str], transform: Any, class_names: List[str], topk: int = 5,
            device: Optional[torch.device] = None) -> List[Dict[str, Any]]:
    """Top-k ``{"label", "index", "prob"}`` for each image path (one-line errors for unreadable files)."""
    from PIL import Image, UnidentifiedImageError

    device = device or torch.device("cpu")
    out = []
    for path in images:
        if not os.path.isfile(path):
            raise ConfigError(f"image {path!r} does not exist")
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"cannot read image {path!r}: {exc}") from exc
        x = transform(img).unsqueeze(0).to(device)
        probs = model(x).float().softmax(-1)[0]
        k = min(topk, probs.numel())
        p, idx = probs.topk(k)
        out.append({"image": path, "top": [{"label": class_names[i], "index": int(i), "prob": float(q)}
                                           for q, i in zip(p.tolist(), idx.tolist())]})
    return out


def run(args: argparse.Namespace) -> int:
    from slaknet.train.config import str2bool
    from slaknet.train.eval_cli import load_model_for_inference

    if args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}")
    use_ema = None if args.use_ema is None else str2bool(args.use_ema)
    model, meta = load_model_for_inference(args.checkpoint, args.model, use_ema)
    n = int(getattr(model, "num_classes", 0) or 0)
    if n < 1:
        raise ConfigError("the checkpoint has no classifier head; it cannot predict labels")
    names = _class_names(meta, n)
    size = args.input_size or int(meta.get("input_size") or 224)
    data = str(meta.get("data") or "")
    if data.startswith("builtin:"):
        from torchvision.transforms import Compose, Normalize, Resize, ToTensor

        tf = Compose([Resize((size, size)), ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3)])
    else:
        from slaknet.train.engine import eval_transform

        tf = eval_transform(size, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    res = predict(model, args.images, tf, names, args.topk, device)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res:
            print(r["image"])
            for t in r["top"]:
                print(f"  {t['prob'] * 100:6.2f}%  {t['label']}")
    return 0
