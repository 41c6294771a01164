"""The training loop behind ``slaknet train`` (single process, or DDP under torchrun).

Pieces come from timm (optimizer with weight-decay-free norms/biases/layer scale, cosine schedule with
warm-up, Mixup/CutMix, RandAugment transforms, random erasing, EMA, label-smoothing / soft-target losses)
and from :mod:`slaknet.sparse` (dynamic sparsity). This module adds run management: exact resume,
atomic checkpoints, NaN stop, logs, TensorBoard, the final safetensors export, curves and a summary.

Determinism: at the start of every epoch all RNGs are re-seeded from ``(seed, epoch, rank)`` and the data
order is a function of ``(seed, epoch)``, so resuming from an epoch-end checkpoint replays exactly what an
uninterrupted run does. Mid-epoch checkpoints (``--ckpt-every-steps``) also store the RNG states and the
position in the epoch; with ``--num-workers 0`` they resume exactly too.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from slaknet.errors import CheckpointError, ConfigError, SlaknetError
from slaknet.train import checkpoint as ckpt_io
from slaknet.train.data import (Compose, FlipRot, InsidenessDataset, Normalize, SafeImageFolder,
                                parse_data_spec)
from slaknet.train.distributed import DistInfo, ShardSampler, all_reduce_sum, barrier, init_distributed
from slaknet.train.evaluate import evaluate

__all__ = ["train", "NonFiniteLossError", "build_datasets", "fit_kernel_sizes", "build_model_from_config",
           "build_optimizer", "build_scheduler", "seed_everything", "recalibrate_bn"]

log = logging.getLogger("slaknet.train")

CKPT_LAST = "checkpoint-last.pth"
CKPT_BEST = "checkpoint-best.pth"


class NonFiniteLossError(SlaknetError):
    """The loss became NaN or infinite; the run stops and keeps the last good checkpoint."""


# ------------------------------------------------------------------------------------------- helpers ----
def seed_everything(*key: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from a tuple of integers."""
    s = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def fit_kernel_sizes(kernel_sizes: Sequence[int], small_kernel: Optional[int], input_size: int,
                     stem_stride: int = 4) -> Tuple[int, ...]:
    """Cap stage ``i``'s kernel at ``2 * map_i - 1`` (map_i = input / (stem * 2^i)), never below N + 2.

    With 'same' padding, kernel taps farther than ``map - 1`` from the centre only ever see padding, so
    the capped network computes exactly the same function with less work.
    """
    out = []
    for i, k in enumerate(kernel_sizes):
        fmap = max(1, int(math.ceil(input_size / (stem_stride * 2 ** i))))
        cap = 2 * fmap - 1
        # keep M > N so a decomposed layer stays decomposed (M == N would switch to a single M x M kernel)
        lo = small_kernel + 2 if small_kernel is not None and small_kernel < k else 1
        out.append(int(max(min(k, cap), lo)))
    return tuple(out)


def resolve_threads(value: Any) -> Optional[int]:
    """``None`` (leave torch's default), an int, or ``"auto"``: the CPU cores not already busy according
    to the 1-minute load average (at least 1), so a shared machine is not oversubscribed."""
    if value in (None, "", 0, "0"):
        return None
    if str(value).lower() == "auto":
        n = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except (OSError, AttributeError):
            busy = 0.0
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun processes on this node
        return max(1, min(n, int(n - busy + 0.5)) // per_node)
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--threads must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--threads must be a positive integer or 'auto', got {value!r}")
    return n


class SkipSampler(Sampler[int]):
    """Yields ``base``'s indices from position ``skip`` on (resume in the middle of an epoch)."""

    def __init__(self, base: Sampler, skip: int = 0) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        for i, idx in enumerate(self.base):
            if i >= self.skip:
                yield idx

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


class EpochSampler(Sampler[int]):
    """Shuffled order that is a pure function of ``(seed, epoch)``, sharded across ranks like
    DistributedSampler (padding by wrap-around so every rank has the same number of samples)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0
        self.per_rank = int(math.ceil(n / world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * (total // max(len(order), 1) + 1))[:total]
        return iter(order[self.rank:total:self.world])

    def __len__(self) -> int:
        return self.per_rank


def _collate(batch: List[Tuple[Any, ...]]) -> Tuple[torch.Tensor, ...]:
    xs = torch.stack([b[0] for b in batch])
    ys = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    if len(batch[0]) > 2:
        return xs, ys, torch.tensor([int(b[2]) for b in batch])
    return xs, ys


# ---------------------------------------------------------------------------------------------- data ----
def build_datasets(cfg: Dict[str, Any]) -> Tuple[Any, Any, List[str], Dict[str, Any]]:
    """``(train_ds, val_ds, class_names, info)`` for the configured data source."""
    kind, what = parse_data_spec(cfg["data"])
    size = int(cfg["input_size"])
    if kind == "builtin":
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        norm = Normalize(mean, std)
        common = dict(image_size=size, difficulty=cfg["difficulty"], seed=cfg["data_seed"])
        train_ds = InsidenessDataset("train", cfg["train_samples"], transform=Compose([FlipRot(), norm]), **common)
        val_ds = InsidenessDataset("val", cfg["val_samples"], transform=norm, **common)
        return train_ds, val_ds, list(train_ds.classes), {"mean": mean, "std": std, "kind": kind}
    from timm.data import create_transform

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_tf = create_transform(size, is_training=True, color_jitter=cfg["color_jitter"],
                                auto_augment=cfg["aa"], interpolation=cfg["train_interpolation"],
                                re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=cfg["recount"],
                                mean=mean, std=std)
    eval_tf = eval_transform(size, cfg.get("crop_pct"), mean, std)
    if kind == "torchvision":
        import torchvision

        cls = getattr(torchvision.datasets, what, None)
        if cls is None:
            raise ConfigError(f"torchvision has no dataset {what!r}")
        root = os.environ.get("SLAKNET_DATA_ROOT", "data")
        try:
            train_ds = cls(root, train=True, download=True, transform=train_tf)
            val_ds = cls(root, train=False, download=True, transform=eval_tf)
        except TypeError as exc:
            raise ConfigError(f"torchvision:{what} has no train/val split argument; use an image folder") from exc
        except Exception as exc:
            raise ConfigError(f"could not load torchvision:{what} into {root!r} (needs network on first use): "
                              f"{type(exc).__name__}: {exc}") from exc
        classes = list(getattr(train_ds, "classes", [str(i) for i in range(cfg.get("num_classes") or 0)]))
        return train_ds, val_ds, classes, {"mean": mean, "std": std, "kind": kind}
    root = what
    train_root = os.path.join(root, "train")
    if not os.path.isdir(train_root):
        raise ConfigError(f"{root!r} has no train/ folder (expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg)")
    val_root = cfg.get("eval_data") or os.path.join(root, "val")
    if not os.path.isdir(val_root):
        raise ConfigError(f"validation folder {val_root!r} does not exist (expected ROOT/val/CLASS/*.jpg, "
                          "or pass --eval-data-path)")
    train_ds = SafeImageFolder(train_root, train_tf, report_bad=True)
    val_ds = SafeImageFolder(val_root, eval_tf, classes=train_ds.classes, report_bad=True)
    return train_ds, val_ds, list(train_ds.classes), {"mean": mean, "std": std, "kind": kind}


def eval_transform(size: int, crop_pct: Optional[float], mean: Sequence[float], std: Sequence[float]) -> Any:
    """Resize + centre crop as in ConvNeXt's evaluation (crop_pct 0.875 below 384 px, else none)."""
    from timm.data import create_transform

    if crop_pct is None:
        crop_pct = 0.875 if size < 384 else 1.0
    return create_transform(size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=mean, std=std)


# --------------------------------------------------------------------------------------------- model ----
def build_model_from_config(cfg: Dict[str, Any], num_classes: int) -> nn.Module:
    """Create the configured SLaK variant (kernel / width / decomposition overrides applied)."""
    import slaknet
    from slaknet.models.slak import MODEL_SPECS, resolve_kernel_sizes

    name = cfg["model"]
    if name not in MODEL_SPECS:
        slaknet.create_model(name)  # raises the one-line "unknown model" error with suggestions
    spec = MODEL_SPECS[name]
    kw: Dict[str, Any] = dict(num_classes=num_classes)
    drop_path = cfg.get("drop_path")
    if drop_path is None:
        drop_path = spec.get("recommended_drop_path", 0.0)
    kw["drop_path_rate"] = float(drop_path)
    cfg["drop_path"] = float(drop_path)
    for key, arg in (("width_factor", "width_factor"), ("decompose", "decompose"),
                     ("layer_scale_init_value", "layer_scale_init_value"), ("head_init_scale", "head_init_scale")):
        if cfg.get(key) is not None:
            kw[arg] = cfg[key]
    depth = len(spec["depths"])
    small = spec.get("small_kernel", 5)
    kernels = spec.get("kernel_size", (51, 49, 47, 13))
    if cfg.get("kernel_size"):
        kernels, small = resolve_kernel_sizes(cfg["kernel_size"], small, depth)
    kernels = tuple(kernels)
    if cfg.get("fit_kernels"):
        fitted = fit_kernel_sizes(kernels, small, int(cfg["input_size"]))
        if fitted != kernels:
            log.info("kernels %s capped to %s for %d px input (same function, less compute)",
                     list(kernels), list(fitted), cfg["input_size"])
        kernels = fitted
    if cfg.get("kernel_size") or cfg.get("fit_kernels"):
        kw["kernel_size"] = kernels
        kw["small_kernel"] = small
    cfg["resolved_kernel_size"] = list(kernels) + ([small] if small is not None else [])
    return slaknet.create_model(name, **kw)


def build_optimizer(model: nn.Module, cfg: Dict[str, Any]) -> torch.optim.Optimizer:
    """timm optimizer; weight decay skips 1-D parameters (norm weights, biases, layer scale ``gamma``).

    Adam / AdamW use torch's fused kernel unless ``fused_opt`` is false (or the kernel is missing): on CPU
    it is ~3x faster than the default for-loop implementation, and it lets the sparse engine hold pruned
    weights at zero through the optimizer state instead of a pass over them after every step.
    """
    from timm.optim import create_optimizer_v2

    kw: Dict[str, Any] = {}
    name = str(cfg["opt"]).lower()
    if name in ("sgd", "momentum", "nesterov", "rmsprop"):
        kw["momentum"] = cfg["momentum"]
    elif cfg.get("opt_eps") is not None:
        kw["eps"] = cfg["opt_eps"]
    fused = name in ("adam", "adamw") and bool(cfg.get("fused_opt", True))
    try:
        if fused:
            try:
                return create_optimizer_v2(model, opt=cfg["opt"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                           fused=True, **kw)
            except (RuntimeError, ValueError, TypeError) as exc:  # no fused kernel in this torch / on this device
                log.info("fused %s not available (%s); using the default implementation", name, exc)
        return create_optimizer_v2(model, opt=cfg["opt"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], **kw)
    except (AssertionError, KeyError, ValueError) as exc:
        raise ConfigError(f"--opt {cfg['opt']!r}: {exc}") from exc


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Dict[str, Any], total_steps: int, warmup: int) -> Any:
    """Per-step schedule: linear warm-up from ~0 to ``lr`` over ``warmup`` steps, then cosine to ``min_lr``."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup, 1), lr_min=cfg["min_lr"],
                             warmup_t=warmup, warmup_lr_init=min(1e-6, cfg["lr"]), warmup_prefix=True,
                             t_in_epochs=False)


# ---------------------------------------------------------------------------------------------- logs ----
class RunLogger:
    """JSON-lines log, TensorBoard scalars and console lines (rank 0 only; no-ops elsewhere)."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool, tb_dir: Optional[str]) -> None:
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=tb_dir or os.path.join(out_dir, "tb"))
            except Exception as exc:  # tensorboard missing or broken: keep training
                print(f"TensorBoard disabled ({type(exc).__name__}: {exc})", file=sys.stderr)

    def record(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def scalars(self, step: int, values: Dict[str, Any], prefix: str = "") -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                self.tb.add_scalar(prefix + k, float(v), step)

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def plot_curves(history: List[Dict[str, Any]], path: str) -> None:
    """Learning curves (train / val loss, val top-1) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] + 1 for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    if any("val_loss" in h for h in history):
        a.plot([h["epoch"] + 1 for h in history if "val_loss" in h],
               [h["val_loss"] for h in history if "val_loss" in h], "s-", label="val loss")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    a.grid(alpha=0.3)
    for key, lab in (("val_top1", "val top-1"), ("ema_top1", "EMA top-1")):
        pts = [(h["epoch"] + 1, h[key]) for h in history if key in h]
        if pts:
            b.plot(*zip(*pts), "o-", label=lab)
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- train ----
@dataclasses.dataclass
class _State:
    epoch: int = 0              # next epoch to run (or the one in progress)
    batch_in_epoch: int = 0     # batches of `epoch` already consumed (mid-epoch checkpoints)
    step: int = 0               # optimizer steps done
    best_top1: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0        # training seconds over all sessions
    bad_images: int = 0


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: Any, batches: int, batch_size: int, device: torch.device,
                   autocast_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> int:
    """Recompute BatchNorm running statistics as the plain average over ``batches`` training batches.

    BatchNorm's running averages (momentum 0.1) lag behind weights that still change quickly, which on
    short runs can put evaluation near chance while the same weights with batch statistics are right
    ("precise BN"). Uses the first ``batches * batch_size`` training images in a fixed order (identical on
    every rank); training itself never reads running statistics, so the training trajectory is unchanged.
    Returns the number of images used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    n = min(len(dataset), int(batches) * int(batch_size)) if batches > 0 else 0
    if not bns or n < 1:
        return 0
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    try:
        for start in range(0, n, batch_size):
            xb = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, n))]).to(device)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(xb)
    finally:
        for b, mom in zip(bns, momenta):
            b.momentum = mom
        model.train(was_training)
    return n


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision in (None, "fp32"):
        return None
    if precision == "amp":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Run training as configured (see :func:`slaknet.train.config.resolve_config`); returns the summary.

    Writes checkpoints, logs, the final ``model.safetensors``, ``curves.png`` and ``summary.json`` to
    ``cfg["output_dir"]``. Raises :class:`NonFiniteLossError` on a NaN/inf loss and ``ConfigError`` /
    ``CheckpointError`` for bad settings. torch's thread count is restored afterwards.
    """
    prev_threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(prev_threads)


def _train(cfg: Dict[str, Any]) -> Dict[str, Any]:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    from slaknet.sparse import SparseEngine, config_from_args

    threads = resolve_threads(cfg.get("threads"))
    if threads:
        torch.set_num_threads(threads)
    dist_info: DistInfo = init_distributed(cfg.get("device"))
    device = dist_info.device
    main = dist_info.is_main
    out_dir = cfg["output_dir"]
    if main:
        os.makedirs(out_dir, exist_ok=True)
    barrier()

    # ---------------------------------------------------------------- resume source
    resume_path = cfg.get("resume")
    last_path = os.path.join(out_dir, CKPT_LAST)
    if not resume_path and cfg.get("auto_resume") and os.path.isfile(last_path):
        resume_path = last_path
    resumed = ckpt_io.load_training_checkpoint(resume_path) if resume_path else None
    if resumed is not None:
        old = resumed.get("config", {})
        for k in ("model", "data", "input_size", "batch_size", "update_freq", "epochs", "sparse", "seed"):
            if k in old and old[k] != cfg.get(k):
                msg = f"resume: {k} was {old[k]!r} in the checkpoint, now {cfg.get(k)!r}"
                if k in ("model", "input_size", "sparse"):
                    raise CheckpointError(msg + "; resume with the same settings (or start a new --output-dir)")
                log.warning(msg)
    if device.type == "cpu":  # what summation orders depend on: kept from the run's start, so a resume is bitwise
        from slaknet.layers import pointwise

        if resumed is not None and old.get("linear_auto") in ("onednn", "plain"):
            pointwise.pin_auto_choice(old["linear_auto"])  # the 1x1 layers' GEMM ('auto' is timed)
        if resumed is not None and str(cfg.get("threads")).lower() == "auto" and old.get("resolved_threads"):
            torch.set_num_threads(int(old["resolved_threads"]))  # 'auto' follows the machine's load
        cfg["linear_auto"] = pointwise.auto_choice()
        cfg["resolved_threads"] = torch.get_num_threads()
    precision = cfg["precision"]
    autocast_dtype = _autocast_dtype(precision, device)
    seed = int(cfg["seed"])
    seed_everything(seed, 0x5EED)

    # ---------------------------------------------------------------- data
    train_ds, val_ds, classes, data_info = build_datasets(cfg)
    num_classes = int(cfg.get("num_classes") or len(classes))
    if num_classes < len(classes):
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {len(classes)} classes in the data")
    cfg["num_classes"] = num_classes
    cfg["classes"] = classes
    bs = int(cfg["batch_size"])
    if len(train_ds) < bs * dist_info.world_size:
        raise ConfigError(f"the training set has {len(train_ds)} images, fewer than one batch "
                          f"({bs} x {dist_info.world_size} processes); lower --batch-size")
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and bs % 2:
        raise ConfigError(f"mixup/cutmix need an even --batch-size, got {bs}")
    sampler = EpochSampler(len(train_ds), seed, dist_info.rank, dist_info.world_size)
    workers = int(cfg["num_workers"])
    pin = bool(cfg["pin_mem"]) and device.type == "cuda"
    val_loader = DataLoader(val_ds, batch_size=max(bs, 64), sampler=ShardSampler(len(val_ds), dist_info.rank,
                            dist_info.world_size), num_workers=workers, pin_memory=pin, collate_fn=_collate)
    batches_per_epoch = len(sampler) // bs
    uf = int(cfg["update_freq"])
    steps_per_epoch = batches_per_epoch // uf
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch has {batches_per_epoch} batches, fewer than --update-freq {uf}")
    total_steps = steps_per_epoch * int(cfg["epochs"])
    eff_batch = bs * uf * dist_info.world_size
    if cfg.get("lr") is None:
        cfg["lr"] = 4e-3 * eff_batch / 4096
    warmup = cfg.get("warmup_steps")
    if warmup is None:
        warmup = int(round(float(cfg["warmup_epochs"]) * steps_per_epoch))
    warmup = min(int(warmup), max(total_steps - 1, 0))
    cfg.update(total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_steps=warmup,
               effective_batch=eff_batch, world_size=dist_info.world_size)

    # ---------------------------------------------------------------- model, optimizer, schedule
    model = build_model_from_config(cfg, num_classes)
    if cfg.get("finetune") and resumed is None:
        _load_finetune(model, cfg["finetune"])
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if cfg["sync_bn"] and dist_info.distributed:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif main:
            log.warning("--sync-bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); BatchNorm stays per-process")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps, warmup)
    scaler = torch.amp.GradScaler(device.type) if (autocast_dtype == torch.float16) else None

    engine = None
    sparse_cfg = config_from_args(_Namespace(cfg), total_steps=total_steps)
    if sparse_cfg is not None:
        snip = None
        if sparse_cfg.sparse_init == "snip":  # (on resume the saved masks replace SNIP's right after)
            idx = list(range(min(bs, len(train_ds))))
            xb, yb = _collate([train_ds[i] for i in idx])[:2]
            snip = (xb.to(device), yb.to(device))
        engine = SparseEngine(model, optimizer, sparse_cfg, snip_batch=snip)
    ema = None
    if cfg["model_ema"]:
        if engine is not None:
            engine.apply_masks()
        ema = ModelEmaV3(model, decay=cfg["model_ema_decay"])

    state = _State()
    if resumed is not None:
        _restore(resumed, model, optimizer, scheduler, scaler, engine, ema, state)
        if main:
            print(f"resumed from {resume_path}: epoch {state.epoch}, batch {state.batch_in_epoch}, "
                  f"step {state.step}", flush=True)
    history: List[Dict[str, Any]] = list(resumed.get("history", [])) if resumed else []
    resumed_rng = resumed.get("rng") if resumed is not None else None
    del resumed

    ddp_model: nn.Module = model
    if dist_info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    mix = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mix = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
                    switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                    label_smoothing=cfg["smoothing"], num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg["smoothing"] > 0:
        criterion = LabelSmoothingCrossEntropy(cfg["smoothing"])
    else:
        criterion = nn.CrossEntropyLoss()

    # ---------------------------------------------------------------- logging / config
    progress = cfg.get("progress")
    if progress is None:
        progress = sys.stderr.isatty()
    progress = bool(progress) and main
    logger = RunLogger(out_dir, main, bool(cfg["tensorboard"]), cfg.get("log_dir"))
    if main:
        import yaml

        from slaknet.train.config import config_keys_for_yaml

        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_keys_for_yaml(cfg), f, sort_keys=True)
        n_params = sum(p.numel() for p in model.parameters())
        logger.print(f"slaknet train: {cfg['model']} ({n_params / 1e6:.2f}M params, kernels "
                     f"{cfg['resolved_kernel_size']}) on {getattr(train_ds, 'describe', lambda: cfg['data'])()}")
        logger.print(f"  {cfg['epochs']} epochs x {steps_per_epoch} steps, batch {bs} x {uf} x "
                     f"{dist_info.world_size} = {eff_batch}, lr {cfg['lr']:.3g}, warm-up {warmup} steps, "
                     f"device {device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
                     + f", precision {precision}"
                     + (f", sparse {1 - sparse_cfg.sparsity:.2f} density, u={sparse_cfg.update_frequency}"
                        if sparse_cfg is not None else ", dense") + f" -> {out_dir}")

    def save(kind: str = "last") -> None:
        if not main:
            return
        obj = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
               "step": state.step, "best_top1": state.best_top1, "best_epoch": state.best_epoch,
               "elapsed": state.elapsed, "bad_images": state.bad_images, "rng": ckpt_io.capture_rng(),
               "config": _plain(cfg), "history": history, "classes": list(classes), "format": "slaknet-train-1"}
        if ema is not None:
            obj["model_ema"] = ema.module.state_dict()
        if scaler is not None:
            obj["scaler"] = scaler.state_dict()
        if engine is not None:
            obj["sparse"] = engine.state_dict()
        ckpt_io.atomic_save(obj, os.path.join(out_dir, CKPT_LAST))

    # ---------------------------------------------------------------- loop
    max_steps = cfg.get("max_steps")
    ckpt_every = int(cfg.get("ckpt_every_steps") or 0)
    kill_at = int(os.environ.get("SLAKNET_TEST_KILL_AT_STEP", "0") or 0)
    stop = False
    t_session = time.perf_counter()
    cpu_session = time.process_time()
    elapsed0 = state.elapsed
    while state.epoch < int(cfg["epochs"]) and not stop:
        epoch = state.epoch
        sampler.set_epoch(epoch)
        if state.batch_in_epoch and resumed_rng is not None:
            ckpt_io.restore_rng(resumed_rng)
        else:
            seed_everything(seed, epoch, dist_info.rank)
        resumed_rng = None
        loader_gen = torch.Generator()
        loader_gen.manual_seed(seed * 7919 + epoch)
        loader = DataLoader(train_ds, batch_size=bs, sampler=SkipSampler(sampler, state.batch_in_epoch * bs),
                            num_workers=workers, pin_memory=pin, drop_last=True, collate_fn=_collate,
                            generator=loader_gen, persistent_workers=False)
        ddp_model.train()
        t_epoch = time.perf_counter()
        loss_sum, loss_n, seen, bad = 0.0, 0, 0, 0
        n_batches = batches_per_epoch - state.batch_in_epoch
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=batches_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                       dynamic_ncols=True, leave=True, file=sys.stderr)
        optimizer.zero_grad(set_to_none=True)
        for bi, batch in enumerate(loader):
            if bi >= n_batches:
                break
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if len(batch) > 2:
                bad += int(batch[2].sum())
            if mix is not None:
                x, y = mix(x, y)
            if cfg["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            accum_end = (state.batch_in_epoch + 1) % uf == 0
            sync_ctx = ddp_model.no_sync() if (dist_info.distributed and not accum_end) else _null()
            with sync_ctx:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    out = ddp_model(x)
                    loss = criterion(out, y)
                lv = float(loss.detach())
                finite = torch.tensor([0.0 if math.isfinite(lv) else 1.0])
                if dist_info.distributed:
                    finite = all_reduce_sum(finite)
                if float(finite) > 0:
                    if bar is not None:
                        bar.close()
                    raise NonFiniteLossError(
                        f"loss is {lv} at epoch {epoch + 1}, optimizer step {state.step + 1} (batch {bi + 1}); "
                        f"stopped. The last good checkpoint is {os.path.join(out_dir, CKPT_LAST)}: lower --lr, "
                        "set --clip-grad, or use fp32")
                (scaler.scale(loss / uf) if scaler is not None else loss / uf).backward()
            state.batch_in_epoch += 1
            loss_sum += lv
            loss_n += 1
            seen += x.shape[0]
            if accum_end:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if engine is not None and (cfg.get("clip_grad") or engine.config.growth == "gradient"):
                    engine.mask_gradients()
                if cfg.get("clip_grad"):
                    nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                scheduler.step_update(state.step)
                if ema is not None:
                    ema.update(model, step=state.step)
                    if engine is not None:
                        engine.sync_ema(ema.module)  # masks + research-code EMA rule for regrown weights
                if bar is not None:
                    rate = seen * dist_info.world_size / max(time.perf_counter() - t_epoch, 1e-9)
                    bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{rate:.0f}")
                if ckpt_every and state.step % ckpt_every == 0 and state.batch_in_epoch < batches_per_epoch:
                    state.elapsed = elapsed0 + time.perf_counter() - t_session
                    save()
                if max_steps and state.step >= int(max_steps):
                    stop = True
                if kill_at and state.step == kill_at:  # fault injection for the kill-and-resume test
                    os.kill(os.getpid(), signal.SIGKILL)
            if bar is not None:
                bar.update(1)
            if stop:
                break
        if bar is not None:
            bar.close()
        epoch_time = time.perf_counter() - t_epoch
        sums = all_reduce_sum(torch.tensor([loss_sum, float(loss_n), float(seen), float(bad)], dtype=torch.float64))
        train_loss = float(sums[0] / max(float(sums[1]), 1.0))
        state.bad_images += int(sums[3])
        if stop and state.batch_in_epoch < batches_per_epoch:
            state.elapsed = elapsed0 + time.perf_counter() - t_session
            break  # --max-steps inside an epoch: no epoch record
        state.epoch += 1
        state.batch_in_epoch = 0
        rec: Dict[str, Any] = {"epoch": epoch, "step": state.step, "train_loss": train_loss,
                               "lr": optimizer.param_groups[0]["lr"], "epoch_time": epoch_time,
                               "train_images_per_s": float(sums[2]) / max(epoch_time, 1e-9)}
        if state.bad_images:
            rec["bad_images"] = state.bad_images
        if engine is not None:
            rec.update(density=engine.global_density(), itop_rate=engine.itop_rate(), sparse_updates=engine.update_count)
        last_epoch = state.epoch >= int(cfg["epochs"])
        if (state.epoch % int(cfg["eval_every"]) == 0) or last_epoch:
            if cfg.get("bn_recalibrate"):
                recalibrate_bn(model, train_ds, int(cfg["bn_recalibrate"]), bs, device, autocast_dtype,
                               cfg["channels_last"])
                if ema is not None:
                    recalibrate_bn(ema.module, train_ds, int(cfg["bn_recalibrate"]), bs, device, autocast_dtype,
                                   cfg["channels_last"])
            ev = evaluate(model, val_loader, device, autocast_dtype, cfg["channels_last"], progress, "val")
            rec.update(val_loss=ev["loss"], val_top1=ev["top1"], val_top5=ev["top5"])
            if ema is not None and cfg["model_ema_eval"]:
                eve = evaluate(ema.module, val_loader, device, autocast_dtype, cfg["channels_last"], progress, "val ema")
                rec.update(ema_top1=eve["top1"], ema_top5=eve["top5"], ema_loss=eve["loss"])
            if ev["top1"] > state.best_top1:
                state.best_top1, state.best_epoch = ev["top1"], epoch
                if main:
                    best = {"model": model.state_dict(), "config": _plain(cfg), "epoch": epoch, "top1": ev["top1"],
                            "classes": list(classes)}
                    if ema is not None:
                        best["model_ema"] = ema.module.state_dict()
                    ckpt_io.atomic_save(best, os.path.join(out_dir, CKPT_BEST))
        state.elapsed = elapsed0 + time.perf_counter() - t_session
        rec["elapsed"] = state.elapsed
        history.append(rec)
        msg = f"epoch {epoch + 1}/{cfg['epochs']}: train loss {train_loss:.4f}"
        if "val_top1" in rec:
            msg += f", val top-1 {rec['val_top1']:.2f}% top-5 {rec['val_top5']:.2f}% loss {rec['val_loss']:.4f}"
        if "ema_top1" in rec:
            msg += f", EMA top-1 {rec['ema_top1']:.2f}%"
        if engine is not None:
            msg += f", density {rec['density']:.3f}, ITOP {rec['itop_rate']:.3f}"
        msg += f" ({epoch_time:.0f}s, {rec['train_images_per_s']:.0f} img/s)"
        logger.print(msg)
        save()  # checkpoint first: a kill between the two never logs an epoch twice after resume
        logger.record(rec)
        logger.scalars(state.step, {k: v for k, v in rec.items() if k not in ("epoch", "step")}, "")
        if main and cfg.get("save_ckpt_freq") and state.epoch % int(cfg["save_ckpt_freq"]) == 0:
            import shutil

            shutil.copyfile(os.path.join(out_dir, CKPT_LAST), os.path.join(out_dir, f"checkpoint-{epoch}.pth"))
        barrier()

    # ---------------------------------------------------------------- final outputs
    if stop and state.batch_in_epoch:
        save()
    cfg["_cpu_seconds"] = time.process_time() - cpu_session
    summary = _finish(cfg, model, ema, engine, history, state, out_dir, main, logger, classes)
    logger.close()
    barrier()
    return summary


def _finish(cfg: Dict[str, Any], model: nn.Module, ema: Any, engine: Any, history: List[Dict[str, Any]],
            state: _State, out_dir: str, main: bool, logger: RunLogger, classes: List[str]) -> Dict[str, Any]:
    from slaknet.analysis.counting import count_model

    final = history[-1] if history else {}
    summary: Dict[str, Any] = {
        "model": cfg["model"], "data": cfg["data"], "epochs_done": state.epoch, "steps": state.step,
        "final_top1": final.get("val_top1"), "final_top5": final.get("val_top5"),
        "best_top1": state.best_top1 if state.best_top1 >= 0 else None,
        "best_epoch": state.best_epoch + 1 if state.best_epoch >= 0 else None,
        "train_seconds": round(state.elapsed, 1), "bad_images": state.bad_images,
        "cpu_seconds_this_session": round(float(cfg.pop("_cpu_seconds", 0.0)), 1),
        "torch_threads": torch.get_num_threads(),
        "chance_top1": 100.0 / max(len(classes), 1), "output_dir": out_dir,
    }
    if ema is not None and "ema_top1" in final:
        summary["final_ema_top1"] = final["ema_top1"]
    size = int(cfg["input_size"])
    try:
        counts = count_model(model, size)
        summary.update({k: v for k, v in _count_fields(counts).items()})
    except Exception as exc:  # counting is a report, never a reason to lose the run
        log.warning("parameter counting failed: %s", exc)
        nz = sum(int((p != 0).sum()) for p in model.parameters())
        summary.update(params=sum(p.numel() for p in model.parameters()), nonzero_params=nz)
    if engine is not None:
        summary.update(density=engine.global_density(), itop_rate=engine.itop_rate())
    if main:
        meta = {"model": cfg["model"], "num_classes": str(cfg["num_classes"]), "classes": json.dumps(classes),
                "data": str(cfg["data"]), "difficulty": str(cfg.get("difficulty")),
                "data_seed": str(cfg.get("data_seed")), "val_samples": str(cfg.get("val_samples")),
                "input_size": str(size), "kernel_size": json.dumps(cfg.get("resolved_kernel_size"))}
        ckpt_io.export_safetensors(model.state_dict(), os.path.join(out_dir, "model.safetensors"), meta)
        if ema is not None:
            ckpt_io.export_safetensors(ema.module.state_dict(), os.path.join(out_dir, "model_ema.safetensors"), meta)
        if history:
            try:
                plot_curves(history, os.path.join(out_dir, "curves.png"))
            except Exception as exc:
                log.warning("could not draw learning curves: %s", exc)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        lines = [f"done in {summary['train_seconds']:.0f}s: "
                 + (f"final top-1 {summary['final_top1']:.2f}% " if summary["final_top1"] is not None else "")
                 + (f"(best {summary['best_top1']:.2f}% at epoch {summary['best_epoch']}; "
                    f"chance {summary['chance_top1']:.1f}%)" if summary["best_top1"] is not None else "")]
        if "nonzero_params" in summary:
            lines.append(f"  params {summary.get('params', 0):,}, non-zero {summary['nonzero_params']:,}"
                         + (f", density {summary['density']:.3f} of sparse layers, ITOP {summary['itop_rate']:.3f}"
                            if engine is not None else ""))
        if state.bad_images:
            lines.append(f"  skipped {state.bad_images} unreadable images (see warnings)")
        lines.append(f"  outputs: {out_dir}/(model.safetensors, {CKPT_LAST}, {CKPT_BEST}, log.jsonl, curves.png, "
                     "summary.json, config.yaml, tb/)")
        logger.print("\n".join(lines))
    return summary


def _count_fields(counts: Any) -> Dict[str, Any]:
    """Parameters / non-zero parameters / MACs from :func:`slaknet.analysis.counting.count_model`."""
    return {"params": int(counts.params), "nonzero_params": int(counts.params_nonzero),
            "macs": int(counts.macs_dense), "nonzero_macs": int(counts.macs_nonzero)}


def _restore(obj: Dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, engine: Any,
             ema: Any, state: _State) -> None:
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit this model: {str(exc).splitlines()[0]}") from exc
    optimizer.load_state_dict(obj["optimizer"])
    scheduler.load_state_dict(obj["scheduler"])
    if scaler is not None and "scaler" in obj:
        scaler.load_state_dict(obj["scaler"])
    if engine is not None:
        if "sparse" not in obj:
            raise CheckpointError("the checkpoint was trained dense, but --sparse is on; resume with the same settings")
        engine.load_state_dict(obj["sparse"])
    if ema is not None and "model_ema" in obj:
        ema.module.load_state_dict(obj["model_ema"])
    state.epoch = int(obj.get("epoch", 0))
    state.batch_in_epoch = int(obj.get("batch_in_epoch", 0))
    state.step = int(obj.get("step", 0))
    state.best_top1 = float(obj.get("best_top1", -1.0))
    state.best_epoch = int(obj.get("best_epoch", -1))
    state.elapsed = float(obj.get("elapsed", 0.0))
    state.bad_images = int(obj.get("bad_images", 0))
    scheduler.step_update(state.step)


def _load_finetune(model: nn.Module, path: str) -> None:
    """Initialise from a checkpoint, dropping a classifier of a different shape (official finetune)."""
    from slaknet.models.checkpoint import extract_state_dict, read_checkpoint

    sd = extract_state_dict(read_checkpoint(path))
    own = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith("head.")]
    if bad or unexpected:
        raise CheckpointError(f"--finetune {path}: weights do not fit {type(model).__name__} "
                              f"(missing {bad[:3]}, unexpected {list(unexpected)[:3]})")


def _plain(cfg: Dict[str, Any]) -> Dict[str, Any]:
    from slaknet.train.config import config_keys_for_yaml

    return config_keys_for_yaml(cfg)


class _Namespace:
    """Attribute view of the config dict for :func:`slaknet.sparse.config_from_args`."""

    def __init__(self, d: Dict[str, Any]) -> None:
        self.__dict__.update(d)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None
