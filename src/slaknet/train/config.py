"""Command-line flags, YAML config and the typed, validated configuration of ``slaknet train``.

Every option has a dashed flag (``--batch-size``) and, where the official SLaK / ConvNeXt ``main.py`` has
one, the official spelling as an alias (``--batch_size``, ``--data_path``, ``--Decom True``...), so the
paper's commands translate one to one. Options left unset are filled from a *recipe*
(:mod:`slaknet.train.recipes`). A YAML file (``--config run.yaml``) holds the same keys (dashes or
underscores); flags on the command line win over the file. ``--resume CKPT`` restores every setting from
the checkpoint; options given explicitly override it (and are reported).

:func:`resolve_config` returns a frozen :class:`TrainConfig`, validated once; values that depend on the
data or the machine (steps, scaled lr, warm-up steps, fitted kernels) are computed by the trainer into a
separate plan and never written back.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

from slaknet.errors import ConfigError
from slaknet.train.recipes import RECIPES, choose_recipe, small_data_overrides

__all__ = ["add_train_arguments", "resolve_config", "TrainConfig", "RECIPES", "str2bool", "load_yaml_defaults",
           "config_keys_for_yaml", "explicit_options"]

_SPARSE_KEYS = ("sparse", "sparsity", "sparse_init", "erk_power_scale", "prune_rate", "prune_rate_final", "growth",
                "update_frequency", "redistribution", "fix", "sparse_layers", "sparse_include", "sparse_exclude",
                "sparse_optimizer_state", "sparse_masking", "sparse_seed")


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
    parser.allow_abbrev = False  # `--epoch` is an error, never silently `--epochs`
    parser.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                        help="defaults for unset options: auto (default) picks from the data: demo for the "
                             "built-in set, imagenet for big folders of big images, small for other folders; "
                             "slak_t / slak_s / slak_b are the paper's ImageNet commands")
    parser.add_argument("--task", default=None, help="training task from the task registry (default classification)")
    for add in (_data_arguments, _model_arguments, _optim_arguments, _augment_arguments, _run_arguments):
        add(parser)
    from slaknet.sparse import add_sparse_arguments

    add_sparse_arguments(parser)
    # recipe decides: the demo trains sparse by default
    parser.add_argument("--no-sparse", "--dense", dest="sparse", action="store_false",
                        help="train dense (the demo recipe trains sparse by default)")
    # every sparse option unset (None) unless given, so the recipe fills it and a resume can tell what was given
    parser.set_defaults(**{a.dest: None for a in parser._actions if a.dest in _SPARSE_KEYS})
    for a in parser._actions:
        if a.dest == "update_frequency":
            a.help = "topology update every U optimizer steps (default 100; the demo and small recipes use 25)"


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data source and loading."""
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
                   help="data-loading worker processes (default 0 built-in, 8 imagenet recipe; never more "
                        "than the CPU cores)")
    g.add_argument("--pin-mem", "--pin_mem", dest="pin_mem", type=str2bool, nargs="?", const=True, default=None,
                   help="pin host memory for GPU transfers")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """Architecture."""
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


def _optim_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer, schedule and loss."""
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


def _augment_arguments(parser: argparse.ArgumentParser) -> None:
    """Augmentation, EMA, precision and machine."""
    g = parser.add_argument_group("augmentation and machine")
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
    g.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16", "auto"],
                   help="autocast precision (default fp32; --amp = bf16 on CPU, fp16 + GradScaler on GPU; "
                        "auto = bf16 on CPUs with AMX, else fp32)")
    g.add_argument("--amp", "--use_amp", dest="amp", type=str2bool, nargs="?", const=True, default=None,
                   help="mixed precision (official --use_amp true)")
    _bool_flag(g, "--channels-last", "--channels_last", dest="channels_last", help="channels_last memory format")
    g.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--threads", default=None,
                   help="CPU threads for torch: N, or 'auto' = the cores not busy with other processes "
                        "(default for the demo; oversubscribed OpenMP threads are many times slower)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """Output folder, resume, checkpoints, evaluation and logs."""
    g = parser.add_argument_group("run management")
    g.add_argument("--output-dir", "--output_dir", "-o", dest="output_dir", default=None,
                   help="folder for checkpoints, logs and the summary (default runs/<model>-<data>)")
    g.add_argument("--log-dir", "--log_dir", dest="log_dir", default=None,
                   help="TensorBoard folder (default OUTPUT/tb)")
    g.add_argument("--resume", default=None,
                   help="continue exactly from this checkpoint, with its settings and in its run folder "
                        "(flags given here override and are reported)")
    g.add_argument("--auto-resume", "--auto_resume", dest="auto_resume", type=str2bool, nargs="?", const=True,
                   default=None, help="continue from OUTPUT/checkpoint-last.pth if it exists")
    _bool_flag(g, "--overwrite", dest="overwrite",
               help="start afresh in a non-empty output folder, deleting the old run's files first")
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every ``slaknet train`` option after recipe defaults and validation (frozen: never edited later).

    Read access also works like a mapping (``cfg["epochs"]``, ``cfg.get("lr")``) for notebooks and tests.
    ``lr`` ``None`` means the linear scaling rule (4e-3 x effective batch / 4096), applied by the trainer.
    """

    # run
    recipe: str = "demo"
    task: str = "classification"
    # task-specific settings (e.g. segmentation crop and auxiliary weight), plain JSON-able values; each
    # task reads and validates its own keys and documents them
    task_options: Optional[Dict[str, Any]] = None
    config: Optional[str] = None
    # data
    data: str = "builtin:insideness"
    data_set: Optional[str] = None
    eval_data: Optional[str] = None
    input_size: int = 64
    num_classes: Optional[int] = None
    difficulty: float = 0.5
    train_samples: int = 6000
    val_samples: int = 1000
    data_seed: int = 0
    num_workers: int = 0
    pin_mem: bool = True
    # model
    model: str = "slak_pico"
    kernel_size: Optional[List[int]] = None
    width_factor: Optional[float] = None
    decompose: Optional[bool] = None
    drop_path: Optional[float] = None
    layer_scale_init_value: float = 1e-6
    head_init_scale: float = 1.0
    bn: Optional[bool] = None
    eval_only: Optional[bool] = None
    fit_kernels: bool = False
    finetune: Optional[str] = None
    # optimisation
    epochs: int = 6
    batch_size: int = 64
    update_freq: int = 1
    opt: str = "adamw"
    fused_opt: bool = True
    opt_eps: Optional[float] = 1e-8
    momentum: float = 0.9
    lr: Optional[float] = None
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None
    smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    aa: Optional[str] = None
    color_jitter: float = 0.4
    train_interpolation: str = "bicubic"
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    crop_pct: Optional[float] = None
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    model_ema_eval: bool = False
    precision: str = "fp32"
    amp: Optional[bool] = None
    channels_last: bool = False
    seed: int = 0
    device: Optional[str] = None
    threads: Optional[str] = None
    # run management
    output_dir: str = "runs/run"
    log_dir: Optional[str] = None
    resume: Optional[str] = None
    auto_resume: bool = False
    overwrite: bool = False
    save_ckpt_freq: int = 0
    ckpt_every_steps: int = 0
    bn_recalibrate: int = 0
    eval_every: int = 1
    sync_bn: bool = False
    max_steps: Optional[int] = None
    progress: Optional[bool] = None
    tensorboard: bool = True
    # sparsity (slaknet.sparse.config_from_args reads these attributes)
    sparse: bool = False
    sparsity: float = 0.4
    sparse_init: str = "ERK"
    erk_power_scale: float = 1.0
    prune_rate: float = 0.3
    prune_rate_final: float = 0.005
    growth: str = "random"
    update_frequency: int = 100
    redistribution: str = "none"
    fix: bool = False
    sparse_layers: str = "all"
    sparse_include: Optional[str] = None
    sparse_exclude: Optional[str] = None
    sparse_optimizer_state: str = "zero"
    sparse_masking: str = "auto"
    sparse_seed: Optional[int] = None

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def as_dict(self) -> Dict[str, Any]:
        """Plain values (for YAML, JSON and checkpoints)."""
        return config_keys_for_yaml(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied and validated again."""
        return _validate(dataclasses.replace(self, **changes))

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


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


def explicit_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options given on the command line or in ``--config`` (every option's default is ``None``)."""
    names = set(TrainConfig.field_names()) - {"recipe", "config", "resume"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def resolve_config(args: argparse.Namespace, report: bool = True) -> TrainConfig:
    """Fill unset options from the checkpoint (``--resume``), then the recipe; validate; return it frozen."""
    given = explicit_options(args)
    base: Dict[str, Any] = {}
    recipe = getattr(args, "recipe", None) or "auto"
    if getattr(args, "resume", None):
        from slaknet.train.rundir import settings_from_checkpoint

        base = settings_from_checkpoint(args.resume, given, report=report)
        recipe = base.get("recipe", recipe) if recipe == "auto" else recipe
    _check_official(given)
    cfg: Dict[str, Any] = dict(base)
    cfg.update(given)
    if cfg.get("model"):
        from slaknet.models.slak import MODEL_SPECS

        if str(cfg["model"]).lower() in MODEL_SPECS:  # official names are SLaK_tiny, SLaK_small, ...
            cfg["model"] = str(cfg["model"]).lower()
    data = cfg.get("data") or RECIPES.get(recipe, {}).get("data") or "builtin:insideness"
    if recipe == "auto":
        recipe = choose_recipe(data, cfg.get("data_set"))
    defaults = dict(RECIPES[recipe])
    if recipe == "small":
        defaults.update(small_data_overrides(data))
    for k, v in defaults.items():
        if cfg.get(k) is None:
            cfg[k] = v
    cfg.update(recipe=recipe, data=data, config=getattr(args, "config", None), resume=getattr(args, "resume", None))
    if cfg.get("amp") and cfg.get("precision") in (None, "fp32"):
        cfg["precision"] = "amp"  # resolved per device by the trainer (bf16 CPU, fp16 GPU)
    if cfg.get("aa") in ("none", "None", ""):
        cfg["aa"] = None
    if isinstance(cfg.get("kernel_size"), (int, str)):
        cfg["kernel_size"] = [int(v) for v in str(cfg["kernel_size"]).split()]
    if cfg.get("output_dir") is None:
        tag = data.split(":", 1)[-1].rstrip("/").split("/")[-1] or "data"
        cfg["output_dir"] = os.path.join("runs", f"{cfg['model']}-{tag}")
    known = set(TrainConfig.field_names())
    return _validate(TrainConfig(**{k: v for k, v in cfg.items() if k in known and v is not None}))


def _check_official(given: Dict[str, Any]) -> None:
    if given.get("data") is None and given.get("data_set") not in (None, "", "builtin"):
        raise ConfigError(f"--data-set {given['data_set']} needs --data-path DIR")
    if given.get("bn") is False:
        raise ConfigError("--bn False is not supported: slaknet's large-kernel branches always use BatchNorm")
    if given.get("eval_only"):
        raise ConfigError("--eval True: use `slaknet eval --checkpoint C --data DIR` to evaluate a checkpoint")


def _validate(cfg: TrainConfig) -> TrainConfig:
    """One-line ConfigErrors for values that cannot work."""
    for k, lo in (("epochs", 1), ("batch_size", 1), ("update_freq", 1), ("input_size", 8), ("eval_every", 1)):
        if int(getattr(cfg, k)) < lo:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= {lo}, got {getattr(cfg, k)}")
    for k in ("lr", "min_lr", "weight_decay", "smoothing", "mixup", "cutmix", "reprob", "drop_path",
              "num_workers", "save_ckpt_freq", "ckpt_every_steps", "bn_recalibrate"):
        if getattr(cfg, k) is not None and float(getattr(cfg, k)) < 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
    if cfg.smoothing >= 1:
        raise ConfigError(f"--smoothing must be < 1, got {cfg.smoothing}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {cfg.max_steps}")
    if cfg.threads is not None:
        from slaknet.train.machine import resolve_threads

        resolve_threads(cfg.threads)  # raises for 0, negatives and words other than 'auto'
    from slaknet.train.tasks import get_task_class

    get_task_class(cfg.task)  # unknown task: one line naming the registered ones
    return cfg


def config_keys_for_yaml(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The resolved config as plain YAML/JSON-able values (tuples -> lists)."""
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, dict):
            v = config_keys_for_yaml(v)
        if isinstance(v, (str, int, float, bool, list, dict, type(None))):
            out[k] = v
        else:
            out[k] = str(v)
    return out
