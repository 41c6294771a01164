"""Command-line flags, YAML config and recipe defaults of ``slaknet train``.

Every option has a dashed flag (``--batch-size``) and, where the official SLaK / ConvNeXt ``main.py`` has
one, the official spelling as an alias (``--batch_size``, ``--data_path``, ``--Decom True``...), so the
paper's commands translate one to one. Options left unset are filled from a *recipe*:

* ``demo`` (default for the built-in dataset): a short CPU run of a small SLaK variant with dynamic
  sparsity, plain flips/rotations as augmentation, no mixup, no EMA;
* ``imagenet`` (default for image folders / torchvision data): the ConvNeXt / SLaK ImageNet recipe:
  AdamW lr 4e-3 at effective batch 4096 (scaled linearly), weight decay 0.05 (not on norms, biases and
  layer scale), 20 warm-up epochs then cosine, label smoothing 0.1, mixup 0.8 / cutmix 1.0,
  RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, drop path per model size, EMA 0.9999.

A YAML file (``--config run.yaml``) holds the same keys (dashes or underscores); flags on the command line
win over the file. The fully resolved configuration is stored in every checkpoint and as
``config.yaml`` in the output folder.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from slaknet.errors import ConfigError

__all__ = ["add_train_arguments", "resolve_config", "RECIPES", "str2bool", "load_yaml_defaults"]


def str2bool(v: Any) -> bool:
    """Official-style boolean flag values: ``true/false``, ``1/0``, ``yes/no`` (any case)."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "t", "yes", "y", "on"):
        return True
    if s in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def _bool_flag(g: Any, *names: str, dest: str, help: str) -> None:
    g.add_argument(*names, dest=dest, type=str2bool, nargs="?", const=True, default=None, help=help)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """All ``slaknet train`` flags (defaults ``None`` = taken from the recipe)."""
    parser.add_argument("--config", default=None, help="YAML file of options (flags on the command line win)")
    parser.add_argument("--recipe", default="auto", choices=["auto", "demo", "imagenet"],
                        help="defaults for unset options: demo (built-in data) or imagenet (real data); "
                             "auto picks by --data (default)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", "--data-path", "--data_path", dest="data", default=None,
                   help="builtin:insideness (default), an image folder ROOT with train/ and val/ "
                        "sub-folders (ImageNet layout), or torchvision:NAME (e.g. torchvision:CIFAR10)")
    g.add_argument("--data-set", "--data_set", dest="data_set", default=None,
                   help="official alias: IMNET / image_folder mean an image folder at --data-path")
    g.add_argument("--eval-data-path", "--eval_data_path", dest="eval_data", default=None,
                   help="validation folder (default ROOT/val)")
    g.add_argument("--input-size", "--input_size", "--img-size", dest="input_size", type=int, default=None,
                   help="training / evaluation image side (default: 64 built-in, 224 image folders)")
    g.add_argument("--num-classes", "--nb_classes", dest="num_classes", type=int, default=None,
                   help="classes (default: from the data)")
    g.add_argument("--difficulty", type=float, default=None, help="built-in dataset difficulty in [0, 1]")
    g.add_argument("--train-samples", dest="train_samples", type=int, default=None,
                   help="built-in dataset: training images (default 6000)")
    g.add_argument("--val-samples", dest="val_samples", type=int, default=None,
                   help="built-in dataset: held-out images (default 1000)")
    g.add_argument("--data-seed", dest="data_seed", type=int, default=None, help="built-in dataset seed")
    g.add_argument("--num-workers", "--num_workers", "-j", dest="num_workers", type=int, default=None,
                   help="data-loading worker processes (default 0 built-in, 8 image folders)")
    g.add_argument("--pin-mem", "--pin_mem", dest="pin_mem", type=str2bool, nargs="?", const=True, default=None,
                   help="pin host memory for GPU transfers")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="SLaK variant (default slak_pico; see `slaknet info`)")
    g.add_argument("--kernel-size", "--kernel_size", dest="kernel_size", type=int, nargs="+", default=None,
                   help="large kernel per stage, optionally followed by the small kernel N "
                        "(official: 51 49 47 13 5)")
    g.add_argument("--width-factor", "--width_factor", dest="width_factor", type=float, default=None,
                   help="width multiplier (paper: 1.3)")
    _bool_flag(g, "--Decom", "--decom", "--decompose", dest="decompose",
               help="decomposed M x N + N x M strips (official --Decom True)")
    g.add_argument("--drop-path", "--drop_path", dest="drop_path", type=float, default=None,
                   help="stochastic depth rate (imagenet recipe: the model's recommended value)")
    g.add_argument("--layer-scale-init-value", "--layer_scale_init_value", dest="layer_scale_init_value",
                   type=float, default=None, help="layer scale init (default 1e-6)")
    g.add_argument("--head-init-scale", "--head_init_scale", dest="head_init_scale", type=float, default=None)
    _bool_flag(g, "--bn", dest="bn", help="official flag: BatchNorm in the large-kernel branches (always on here)")
    _bool_flag(g, "--eval", dest="eval_only", help="official flag; use `slaknet eval` instead")
    _bool_flag(g, "--fit-kernels", dest="fit_kernels",
               help="cap each stage's kernel at 2*feature_map-1 for --input-size (identical function, less "
                    "compute; default on for the demo recipe)")
    g.add_argument("--finetune", default=None, help="initialise from this checkpoint (classifier may differ)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (demo 6, imagenet 300)")
    g.add_argument("--batch-size", "--batch_size", "-b", dest="batch_size", type=int, default=None,
                   help="per-process batch size (demo 64, imagenet 128)")
    g.add_argument("--update-freq", "--update_freq", dest="update_freq", type=int, default=None,
                   help="gradient accumulation steps (official --update_freq)")
    g.add_argument("--opt", default=None, help="optimizer name for timm.optim.create_optimizer_v2 (adamw)")
    _bool_flag(g, "--fused-opt", dest="fused_opt",
               help="Adam/AdamW on torch's fused kernel (default true): one pass per step, and the sparse "
                    "engine then keeps pruned weights at zero without a pass of its own")
    g.add_argument("--opt-eps", "--opt_eps", dest="opt_eps", type=float, default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 4e-3 x effective batch / 4096; demo 2e-3)")
    g.add_argument("--min-lr", "--min_lr", dest="min_lr", type=float, default=None)
    g.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=float, default=None)
    g.add_argument("--warmup-steps", "--warmup_steps", dest="warmup_steps", type=int, default=None,
                   help="warm-up optimizer steps (overrides --warmup-epochs)")
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=None)
    g.add_argument("--clip-grad", "--clip_grad", dest="clip_grad", type=float, default=None,
                   help="clip the gradient norm to this value (off by default)")
    g.add_argument("--smoothing", type=float, default=None, help="label smoothing (imagenet 0.1)")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (imagenet 0.8)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (imagenet 1.0)")
    g.add_argument("--mixup-prob", "--mixup_prob", dest="mixup_prob", type=float, default=None)
    g.add_argument("--mixup-switch-prob", "--mixup_switch_prob", dest="mixup_switch_prob", type=float,
                   default=None)
    g.add_argument("--mixup-mode", "--mixup_mode", dest="mixup_mode", default=None,
                   choices=["batch", "pair", "elem"])
    g.add_argument("--aa", default=None, help="RandAugment policy (imagenet rand-m9-mstd0.5-inc1; 'none' off)")
    g.add_argument("--color-jitter", "--color_jitter", dest="color_jitter", type=float, default=None)
    g.add_argument("--train-interpolation", "--train_interpolation", dest="train_interpolation", default=None)
    g.add_argument("--reprob", type=float, default=None, help="random erasing probability (imagenet 0.25)")
    g.add_argument("--remode", default=None)
    g.add_argument("--recount", type=int, default=None)
    g.add_argument("--crop-pct", "--crop_pct", dest="crop_pct", type=float, default=None)
    _bool_flag(g, "--model-ema", "--model_ema", dest="model_ema", help="keep an EMA of the weights")
    g.add_argument("--model-ema-decay", "--model_ema_decay", dest="model_ema_decay", type=float, default=None)
    _bool_flag(g, "--model-ema-eval", "--model_ema_eval", dest="model_ema_eval",
               help="also evaluate the EMA each epoch")
    g.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (default fp32; --amp = bf16 on CPU, fp16 + GradScaler on GPU)")
    g.add_argument("--amp", "--use_amp", dest="amp", type=str2bool, nargs="?", const=True, default=None,
                   help="mixed precision (official --use_amp true)")
    _bool_flag(g, "--channels-last", "--channels_last", dest="channels_last", help="channels_last memory format")
    g.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--threads", default=None,
                   help="CPU threads for torch: N, or 'auto' = the cores not busy with other processes "
                        "(default for the demo; oversubscribed OpenMP threads are many times slower)")

    g = parser.add_argument_group("run management")
    g.add_argument("--output-dir", "--output_dir", "-o", dest="output_dir", default=None,
                   help="folder for checkpoints, logs and the summary (default runs/<model>-<data>)")
    g.add_argument("--log-dir", "--log_dir", dest="log_dir", default=None,
                   help="TensorBoard folder (default OUTPUT/tb)")
    g.add_argument("--resume", default=None, help="continue exactly from this checkpoint")
    g.add_argument("--auto-resume", "--auto_resume", dest="auto_resume", type=str2bool, nargs="?", const=True,
                   default=None, help="continue from OUTPUT/checkpoint-last.pth if it exists")
    g.add_argument("--save-ckpt-freq", "--save_ckpt_freq", dest="save_ckpt_freq", type=int, default=None,
                   help="keep a numbered checkpoint every N epochs (checkpoint-last.pth is always written)")
    g.add_argument("--ckpt-every-steps", dest="ckpt_every_steps", type=int, default=None,
                   help="also write checkpoint-last.pth every N optimizer steps (mid-epoch, exact resume)")
    g.add_argument("--bn-recalibrate", dest="bn_recalibrate", type=int, default=None, metavar="BATCHES",
                   help="before each evaluation, recompute BatchNorm statistics over this many training "
                        "batches (precise BN; demo 16, imagenet 0 = off)")
    g.add_argument("--eval-every", dest="eval_every", type=int, default=None, help="evaluate every N epochs (1)")
    _bool_flag(g, "--sync-bn", "--sync_bn", dest="sync_bn", help="SyncBatchNorm under DDP")
    g.add_argument("--max-steps", dest="max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (smoke tests; schedules keep --epochs)")
    _bool_flag(g, "--progress", dest="progress", help="show progress bars (default: when stderr is a terminal)")
    _bool_flag(g, "--tensorboard", dest="tensorboard", help="write TensorBoard scalars (default on)")

    from slaknet.sparse import add_sparse_arguments

    add_sparse_arguments(parser)
    # recipe decides: the demo trains sparse by default
    parser.add_argument("--no-sparse", "--dense", dest="sparse", action="store_false",
                        help="train dense (the demo recipe trains sparse by default)")
    parser.set_defaults(sparse=None, update_frequency=None, sparsity=None)


# recipe defaults for options left at None
_COMMON: Dict[str, Any] = dict(
    model="slak_pico", opt="adamw", fused_opt=True, opt_eps=1e-8, momentum=0.9, min_lr=1e-6, weight_decay=0.05, seed=0,
    update_freq=1, clip_grad=None, layer_scale_init_value=1e-6, head_init_scale=1.0, precision="fp32",
    channels_last=False, save_ckpt_freq=0, ckpt_every_steps=0, eval_every=1, sync_bn=False, auto_resume=False,
    tensorboard=True, model_ema_decay=0.9999, model_ema_eval=False, mixup_prob=1.0, mixup_switch_prob=0.5,
    mixup_mode="batch", remode="pixel", recount=1, color_jitter=0.4, train_interpolation="bicubic",
    crop_pct=None, pin_mem=True, sparsity=0.4, update_frequency=100, data_seed=0, difficulty=0.5,
    train_samples=6000, val_samples=1000,
)
RECIPES: Dict[str, Dict[str, Any]] = {
    "demo": dict(_COMMON, data="builtin:insideness", input_size=64, epochs=6, batch_size=64, lr=2e-3,
                 warmup_epochs=0.5, smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0,
                 model_ema=False, drop_path=0.0, num_workers=0, sparse=True, update_frequency=25,
                 fit_kernels=True, threads="auto", bn_recalibrate=16),
    "imagenet": dict(_COMMON, input_size=224, epochs=300, batch_size=128, lr=None, warmup_epochs=20,
                     smoothing=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25,
                     model_ema=True, drop_path=None, num_workers=8, sparse=False, fit_kernels=False,
                     bn_recalibrate=0),
}


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a YAML config; keys are option names (dashes or underscores) or their official aliases."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    alias: Dict[str, str] = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        alias[action.dest] = action.dest
        for s in action.option_strings:
            alias[s.lstrip("-").replace("-", "_")] = action.dest
    out: Dict[str, Any] = {}
    for k, v in data.items():
        dest = alias.get(str(k).replace("-", "_"))
        if dest is None:
            raise ConfigError(f"config file {path!r}: unknown option {k!r}")
        out[dest] = v
    return out


def resolve_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Fill unset options from the recipe and derived rules; return the resolved config dict."""
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    if cfg.get("data") is None and cfg.get("data_set") not in (None, "", "builtin"):
        raise ConfigError(f"--data-set {cfg['data_set']} needs --data-path DIR")
    if cfg.get("bn") is False:
        raise ConfigError("--bn False is not supported: slaknet's large-kernel branches always use BatchNorm")
    if cfg.get("eval_only"):
        raise ConfigError("--eval True: use `slaknet eval --checkpoint C --data DIR` to evaluate a checkpoint")
    if cfg.get("model"):
        from slaknet.models.slak import MODEL_SPECS

        low = str(cfg["model"]).lower()
        if low in MODEL_SPECS:  # official names are SLaK_tiny, SLaK_small, ...
            cfg["model"] = low
    recipe = cfg.get("recipe") or "auto"
    data = cfg.get("data") or "builtin:insideness"
    if recipe == "auto":
        recipe = "demo" if data.startswith("builtin:") or data == "insideness" else "imagenet"
    cfg["recipe"] = recipe
    for k, v in RECIPES[recipe].items():
        if cfg.get(k) is None:
            cfg[k] = v
    cfg["data"] = data
    if cfg["amp"] and cfg.get("precision") in (None, "fp32"):
        cfg["precision"] = "amp"  # resolved per device by the trainer (bf16 CPU, fp16 GPU)
    for k, lo in (("epochs", 1), ("batch_size", 1), ("update_freq", 1), ("input_size", 8)):
        if int(cfg[k]) < lo:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= {lo}, got {cfg[k]}")
    for k in ("lr", "min_lr", "weight_decay", "smoothing", "mixup", "cutmix", "reprob", "drop_path"):
        if cfg.get(k) is not None and float(cfg[k]) < 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 0, got {cfg[k]}")
    if cfg.get("smoothing") is not None and cfg["smoothing"] >= 1:
        raise ConfigError(f"--smoothing must be < 1, got {cfg['smoothing']}")
    if cfg.get("aa") in ("none", "None", ""):
        cfg["aa"] = None
    if cfg.get("output_dir") is None:
        tag = data.split(":", 1)[-1].rstrip("/").split("/")[-1] or "data"
        cfg["output_dir"] = os.path.join("runs", f"{cfg['model']}-{tag}")
    return cfg


def config_keys_for_yaml(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The resolved config as plain YAML/JSON-able values (tuples -> lists)."""
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, (str, int, float, bool, list, type(None))):
            out[k] = v
        else:
            out[k] = str(v)
    return out

