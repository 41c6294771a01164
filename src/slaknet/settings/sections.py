"""The general sections of a training configuration: data, model, optimisation, augmentation, run.

Each field is the one declaration of its setting (default, help, allowed values; see
:func:`slaknet.settings.setting`). A recipe overrides some of them; the task adds its own options section
and the sparse engine its :class:`slaknet.sparse.SparseConfig`. Defaults here are the neutral values a
recipe starts from; help texts name the recipes' values where they differ.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from slaknet.errors import ConfigError
from slaknet.settings.fields import setting

__all__ = ["DataSettings", "ModelSettings", "OptimSettings", "AugmentSettings", "RunSettings", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "fp16", "auto", "amp")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how they are loaded."""

    source: Optional[str] = setting(None, "the data: a built-in set (builtin:NAME), a folder, or torchvision:NAME "
                                          "(default: the task's built-in set)", metavar="DATA", key="data")
    data_set: Optional[str] = setting(None, "official alias: IMNET / image_folder mean an image folder at --data",
                                      metavar="NAME")
    eval_data: Optional[str] = setting(None, "validation folder (default DATA/val)", metavar="DIR")
    input_size: int = setting(64, "training / evaluation image side in pixels (recipe small: the images' own "
                                  "size)", low=8)
    num_classes: Optional[int] = setting(None, "number of classes (default: from the data)", low=1)
    difficulty: float = setting(0.5, "built-in data: difficulty in [0, 1]", low=0.0, high=1.0)
    train_samples: int = setting(6000, "built-in data: training images", low=1)
    val_samples: int = setting(1000, "built-in data: held-out images", low=1)
    data_seed: int = setting(0, "built-in data: seed of the generated images")
    num_workers: int = setting(0, "data-loading worker processes (never more than the CPU cores)", low=0,
                               short=("-j",))
    pin_mem: bool = setting(True, "pin host memory for GPU transfers")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The network."""

    name: str = setting("slak_pico", "model name (SLaK variants: see `slaknet info`; any timm name where the "
                                     "task allows)", metavar="NAME", key="model")
    kernel_size: Optional[List[int]] = setting(None, "large kernel per stage, optionally followed by the small "
                                                     "kernel N (official: 51 49 47 13 5)", metavar="K")
    width_factor: Optional[float] = setting(None, "width multiplier (paper: 1.3)", low=0.0, low_open=True)
    decompose: Optional[bool] = setting(None, "decomposed M x N + N x M strips (official --Decom True)")
    drop_path: Optional[float] = setting(None, "stochastic depth rate (default: the model's recommended value)", low=0.0, high=1.0,
                                         high_open=True)
    layer_scale_init_value: float = setting(1e-6, "layer scale init value", low=0.0)
    head_init_scale: float = setting(1.0, "scale of the classifier's initial weights", low=0.0)
    fit_kernels: bool = setting(False, "cap each stage's kernel at 2*feature_map-1 for --input-size (identical "
                                       "function, less compute)")
    finetune: Optional[str] = setting(None, "initialise from this checkpoint (the classifier may differ)",
                                      metavar="CKPT")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """Optimizer, schedule, batch and weight averaging."""

    epochs: int = setting(6, "training epochs", low=1)
    batch_size: int = setting(64, "per-process batch size", low=1, short=("-b",))
    update_freq: int = setting(1, "gradient accumulation steps (official --update_freq)", low=1)
    opt: str = setting("adamw", "optimizer name for timm.optim.create_optimizer_v2")
    fused_opt: bool = setting(True, "Adam/AdamW on torch's fused kernel: one pass per step, and the sparse engine "
                                    "then keeps pruned weights at zero without a pass of its own")
    opt_eps: Optional[float] = setting(1e-8, "optimizer epsilon", low=0.0)
    momentum: float = setting(0.9, "SGD momentum", low=0.0)
    lr: Optional[float] = setting(None, "peak learning rate (default: 4e-3 x effective batch / 4096)", low=0.0)
    min_lr: float = setting(1e-6, "learning rate at the end of the cosine schedule", low=0.0)
    warmup_epochs: float = setting(0.0, "warm-up epochs", low=0.0)
    warmup_steps: Optional[int] = setting(None, "warm-up optimizer steps (overrides --warmup-epochs)", low=0)
    weight_decay: float = setting(0.05, "AdamW weight decay (not on norms, biases, layer scale)", low=0.0)
    clip_grad: Optional[float] = setting(None, "clip the gradient norm to this value (off by default)", low=0.0,
                                         low_open=True)
    model_ema: bool = setting(False, "keep an exponential moving average of the weights")
    model_ema_decay: float = setting(0.9999, "EMA decay", low=0.0, high=1.0)
    model_ema_eval: bool = setting(False, "also evaluate the EMA each epoch")


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Training augmentation and loss smoothing (image-folder classification)."""

    smoothing: float = setting(0.0, "label smoothing", low=0.0, high=1.0, high_open=True)
    mixup: float = setting(0.0, "mixup alpha", low=0.0)
    cutmix: float = setting(0.0, "cutmix alpha", low=0.0)
    mixup_prob: float = setting(1.0, "probability of mixup or cutmix per batch", low=0.0, high=1.0)
    mixup_switch_prob: float = setting(0.5, "probability of cutmix instead of mixup", low=0.0, high=1.0)
    mixup_mode: str = setting("batch", "how mixup parameters are drawn", choices=("batch", "pair", "elem"))
    aa: Optional[str] = setting(None, "RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (none: off)", metavar="POLICY")
    color_jitter: float = setting(0.4, "colour jitter strength", low=0.0)
    train_interpolation: str = setting("bicubic", "resize interpolation in training",
                                       choices=("bicubic", "bilinear", "nearest", "random"))
    reprob: float = setting(0.0, "random erasing probability", low=0.0, high=1.0)
    remode: str = setting("pixel", "random erasing mode", choices=("pixel", "rand", "const"))
    recount: int = setting(1, "random erasing count", low=1)
    crop_pct: Optional[float] = setting(None, "evaluation centre-crop fraction (default 0.875 below 384 px)",
                                        low=0.0, high=1.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Machine, precision, output folder, checkpoints, evaluation and logs."""

    output_dir: Optional[str] = setting(None, "output folder (default runs/<model>-<data>)", short=("-o",),
                                        metavar="DIR")
    seed: int = setting(0, "run seed")
    device: Optional[str] = setting(None, "cpu, cuda, cuda:1 (default: cuda if available)", metavar="DEVICE")
    threads: Optional[str] = setting(None, "CPU threads for torch: N, or 'auto' = the cores not busy with other "
                                           "processes (oversubscribed OpenMP threads are many times slower)",
                                     metavar="N")
    precision: str = setting("fp32", "autocast precision: fp32, bf16, fp16, auto (bf16 on CPUs with AMX, else "
                                     "fp32) or amp (bf16 on CPU, fp16 + GradScaler on GPU)", choices=PRECISIONS)
    amp: Optional[bool] = setting(None, "mixed precision (official --use_amp true; same as --precision amp)")
    channels_last: bool = setting(False, "channels_last memory format")
    log_dir: Optional[str] = setting(None, "TensorBoard folder (default OUTPUT/tb)", metavar="DIR")
    resume: Optional[str] = setting(None, "continue exactly from this checkpoint, with its settings and in its run "
                                          "folder (options given here override and are reported)", metavar="CKPT")
    auto_resume: bool = setting(False, "continue from OUTPUT/checkpoint-last.pth if it exists")
    overwrite: bool = setting(False, "start afresh in a non-empty output folder, deleting the old run's files "
                                     "first")
    save_ckpt_freq: int = setting(0, "keep a numbered checkpoint every N epochs (checkpoint-last.pth is always "
                                     "written)", low=0)
    ckpt_every_steps: int = setting(0, "also write checkpoint-last.pth every N optimizer steps (mid-epoch, exact "
                                       "resume)", low=0)
    bn_recalibrate: int = setting(0, "before each evaluation, recompute BatchNorm statistics over this many "
                                     "training batches (precise BN; 0 = off)", low=0, metavar="BATCHES")
    eval_every: int = setting(1, "evaluate every N epochs", low=1)
    sync_bn: bool = setting(False, "SyncBatchNorm under DDP")
    max_steps: Optional[int] = setting(None, "stop after this many optimizer steps (smoke tests; schedules keep "
                                             "--epochs)", low=1)
    progress: Optional[bool] = setting(None, "show progress bars (default: when stderr is a terminal)")
    tensorboard: bool = setting(True, "write TensorBoard scalars")

    def check(self) -> None:
        if self.threads is not None:
            t = str(self.threads).strip().lower()
            if t != "auto" and (not t.isdigit() or int(t) < 1):
                raise ConfigError(f"--threads must be a positive integer or 'auto', got {self.threads!r}")
