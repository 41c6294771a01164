"""Building a run before its first step: machine, output folder, resume source, data, plan, model, optimizer,
sparse engine, EMA, DDP and logging -- in a fixed order, so that every random draw happens as it always did.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from slaknet.errors import CheckpointError, ConfigError
from slaknet.train import checkpoint as ckpt_io
from slaknet.train.distributed import barrier, init_distributed
from slaknet.train.logs import RunLogger
from slaknet.train.machine import autocast_dtype, cap_workers, resolve_threads, seed_everything
from slaknet.train.optim import build_optimizer, build_scheduler
from slaknet.train.rundir import CKPT_LAST, prepare_output_dir
from slaknet.train.samplers import train_sampler

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.trainer import Trainer

__all__ = ["setup_trainer", "load_finetune", "make_scheduler", "check_large_kernels_sparse"]

log = logging.getLogger("slaknet.train")


def setup_trainer(tr: "Trainer") -> None:
    """Everything :meth:`Trainer.fit` needs before the loop (in the order the random draws require)."""
    cfg = tr.cfg
    threads = resolve_threads(cfg.threads)
    if threads:
        torch.set_num_threads(threads)
    tr.dist = init_distributed(cfg.device)
    tr.device = tr.dist.device
    resume_path, resumed = _resume_source(tr)
    tr._resumed = resumed is not None
    linear_auto = _pin_machine_choices(tr, resumed)
    tr.autocast = autocast_dtype(cfg.precision, tr.device)
    seed_everything(int(cfg.seed), tr.task.init_seed_key)
    _setup_data(tr, linear_auto)
    _setup_model(tr, resumed)
    if resumed is not None:
        tr.restore(resumed)
        tr.history = list(resumed.get("history", []))
        tr.resume_path = resume_path
    tr._resumed_rng = resumed.get("rng") if resumed is not None else None
    del resumed
    tr.model_ddp = tr.model
    if tr.dist.distributed:
        tr.model_ddp = nn.parallel.DistributedDataParallel(
            tr.model, device_ids=[tr.device.index] if tr.device.type == "cuda" else None)
    tr.task.num_classes = tr.plan.num_classes
    tr.mix = tr.task.batch_transform()
    tr.criterion = tr.task.criterion()
    _setup_logging(tr)
    import time

    tr._cpu0 = time.process_time()


def _resume_source(tr: "Trainer") -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """Prepare the output folder and read the checkpoint to continue from (if any)."""
    cfg, out = tr.cfg, tr.out_dir
    path = cfg.resume
    if out and not path and cfg.auto_resume and os.path.isfile(os.path.join(out, CKPT_LAST)):
        path = os.path.join(out, CKPT_LAST)
    resumed = ckpt_io.load_training_checkpoint(path) if path else None
    if out and tr.dist.is_main:
        tr._created_dir = prepare_output_dir(out, resuming=resumed is not None, overwrite=bool(cfg.overwrite))
    barrier()
    if resumed is not None:
        old = resumed.get("config", {})
        for k in ("model", "input_size", "sparse"):
            if k in old and old[k] != cfg[k]:
                raise CheckpointError(f"resume: {k} was {old[k]!r} in the checkpoint, now {cfg[k]!r}; "
                                      "resume with the same settings (or start a new --output-dir)")
    return path, resumed


def _pin_machine_choices(tr: "Trainer", resumed: Optional[Dict[str, Any]]) -> Optional[str]:
    """What summation orders depend on, kept from the run's start so that a resume is bitwise."""
    if tr.device.type != "cpu":
        return None
    from slaknet.layers import pointwise

    old = resumed.get("config", {}) if resumed is not None else {}
    if old.get("linear_auto") in ("onednn", "plain"):
        pointwise.pin_auto_choice(old["linear_auto"])  # the 1x1 layers' GEMM ('auto' is timed)
    if resumed is not None and str(tr.cfg.threads).lower() == "auto" and old.get("resolved_threads"):
        torch.set_num_threads(int(old["resolved_threads"]))  # 'auto' follows the machine's load
    return pointwise.auto_choice()


def _setup_data(tr: "Trainer", linear_auto: Optional[str]) -> None:
    """Datasets, sampler, workers and the plan (steps, scaled lr, warm-up)."""
    from slaknet.train.trainer import RunPlan

    cfg, d = tr.cfg, tr.dist
    tr.data = tr.task.build_data(tr)
    classes = tr.data.classes
    num_classes = int(cfg.num_classes or len(classes))
    if num_classes < len(classes):
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {len(classes)} classes in the data")
    tr.batch_size = bs = int(cfg.batch_size)
    n_train = tr.task.num_train_samples(tr)
    if n_train < bs * d.world_size:
        raise ConfigError(f"the training set has {n_train} images, fewer than one batch "
                          f"({bs} x {d.world_size} processes); lower --batch-size")
    tr.task.check(tr)
    tr.sampler = train_sampler(range(n_train), int(cfg.seed), d.rank, d.world_size)
    tr.workers = cap_workers(int(cfg.num_workers))
    tr.pin_memory = bool(cfg.pin_mem) and tr.device.type == "cuda"
    batches = len(tr.sampler) // bs
    uf = int(cfg.update_freq)
    steps = batches // uf
    if steps < 1:
        raise ConfigError(f"an epoch has {batches} batches, fewer than --update-freq {uf}")
    total = steps * int(cfg.epochs)
    eff = bs * uf * d.world_size
    lr = float(cfg.lr) if cfg.lr is not None else 4e-3 * eff / 4096
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(float(cfg.warmup_epochs) * steps))
    tr.plan = RunPlan(world_size=d.world_size, effective_batch=eff, batches_per_epoch=batches, steps_per_epoch=steps,
                      total_steps=total, warmup=min(int(warmup), max(total - 1, 0)), lr=lr, num_classes=num_classes,
                      linear_auto=linear_auto, resolved_threads=torch.get_num_threads(), workers=tr.workers)


def _setup_model(tr: "Trainer", resumed: Optional[Dict[str, Any]]) -> None:
    """Model (finetune weights, device, memory format, SyncBN), optimizer, schedule, scaler, sparse engine, EMA."""
    import dataclasses

    from timm.utils import ModelEmaV3

    cfg, plan = tr.cfg, tr.plan
    model, resolved = tr.task.build_model(tr, plan.num_classes)
    tr.plan = dataclasses.replace(plan, model=dict(resolved))
    if cfg.finetune and resumed is None:
        load_finetune(model, cfg.finetune)
    model.to(tr.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and tr.dist.distributed:
        if tr.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif tr.dist.is_main:
            log.warning("--sync-bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); BatchNorm stays per-process")
    tr.model = model
    tr.extra_modules = {k: m.to(tr.device) for k, m in tr.task.extra_modules(tr).items()}
    tr.optimizer = _build_optimizer(tr)
    tr.scheduler = make_scheduler(tr)
    tr.scaler = torch.amp.GradScaler(tr.device.type) if tr.autocast == torch.float16 else None
    tr.engine = None
    tr.sparse_config = tr.task.sparse_config(tr, tr.plan.total_steps)
    if tr.sparse_config is not None:
        from slaknet.sparse import SparseEngine, init_rule

        snip = None
        if init_rule(tr.sparse_config.sparse_init).needs_batch:  # SNIP (on resume the saved masks replace its)
            xb, yb = tr.task.snip_batch(tr)
            snip = (xb.to(tr.device), yb.to(tr.device))
        tr.engine = SparseEngine(model, tr.optimizer, tr.sparse_config, snip_batch=snip)
        if resumed is None:
            check_large_kernels_sparse(tr.engine, cfg)
    tr.ema = None
    if cfg.model_ema:
        if tr.engine is not None:
            tr.engine.apply_masks()
        tr.ema = ModelEmaV3(model, decay=cfg.model_ema_decay)


def check_large_kernels_sparse(engine: Any, cfg: Any) -> None:
    """Refuse (``ConfigError``) a sparse run that leaves every large-kernel weight dense by default: sparsity
    from the configuration (``--sparse``), the default ``--sparse-layers all`` and a built-in initialisation.
    An explicit ``--sparse-layers`` (any value), a registered initialisation of one's own, or a task that
    builds its own engine config (sparsity off in the configuration) is respected."""
    from slaknet.sparse.init_rules import ERKInit, SnipInit, UniformInit

    if not cfg.sparse.enabled or "sparse_layers" in cfg.given or engine.config.layers != "all":
        return
    if type(engine.sparse_init) not in (UniformInit, ERKInit, SnipInit):
        return
    lk = engine.density_report()["large_kernel"]
    if lk["dense"] and not lk["sparse"]:
        raise ConfigError(
            f"--sparse-init {cfg.sparse.sparse_init} at sparsity {cfg.sparse.sparsity:g} leaves all {lk['dense']} "
            "large-kernel weights dense (only other layers are sparse): pass --sparse-init snip or a lower "
            "--erk-power-scale (the demo's 0.3) to make them sparse too, --sparse-layers large_kernel to make only "
            "them sparse, or --sparse-layers all to train with dense large kernels")


def _build_optimizer(tr: "Trainer") -> torch.optim.Optimizer:
    """The model's parameter groups (the task's, or weight decay on >= 2-D weights), plus the task's extra
    modules (same rule), in one optimizer."""
    groups = tr.task.param_groups(tr, tr.model)
    if not tr.extra_modules:
        return build_optimizer(tr.model, tr.cfg, lr=tr.plan.lr, param_groups=groups)
    if groups is None:
        holder = nn.ModuleDict({"model": tr.model, **tr.extra_modules})
        return build_optimizer(holder, tr.cfg, lr=tr.plan.lr)
    from timm.optim import param_groups_weight_decay

    extra = nn.ModuleDict(tr.extra_modules)
    return build_optimizer(tr.model, tr.cfg, lr=tr.plan.lr,
                           param_groups=list(groups) + param_groups_weight_decay(extra, float(tr.cfg.weight_decay)))


def make_scheduler(tr: "Trainer") -> Any:
    """The task's lr schedule, or warm-up + cosine to ``min_lr``, over the plan's steps."""
    plan = tr.plan
    sched = tr.task.build_scheduler(tr, tr.optimizer, plan.total_steps, plan.warmup)
    if sched is None:
        sched = build_scheduler(tr.optimizer, dict(lr=plan.lr, min_lr=tr.cfg.min_lr), plan.total_steps, plan.warmup)
    return sched


def _setup_logging(tr: "Trainer") -> None:
    """Progress mode, logger, config.yaml and the run header (rank 0)."""
    from slaknet.train.reporting import header_lines

    cfg, main = tr.cfg, tr.dist.is_main
    tty = sys.stderr.isatty()
    tr.progress = bool(tty if cfg.progress is None else cfg.progress) and main
    tr.progress_lines = main and not tr.progress and cfg.progress is None  # no terminal: plain lines
    tr.logger = RunLogger(tr.out_dir, main, bool(cfg.tensorboard), cfg.log_dir)
    if main and tr.out_dir:
        import yaml

        with open(os.path.join(tr.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(tr.cfg.as_dict(), f, sort_keys=False)  # what --config reads back
    if main:
        for line in header_lines(tr):
            tr.logger.print(line)


def load_finetune(model: nn.Module, path: str) -> None:
    """Initialise from a checkpoint, dropping a classifier of a different shape (official finetune)."""
    from slaknet.models.checkpoint import extract_state_dict, read_checkpoint

    sd = extract_state_dict(read_checkpoint(path))
    own = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            del sd[k]
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches: one line, not torch's 100-line listing
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise CheckpointError(f"--finetune {path}: weights do not fit {type(model).__name__} ({first})") from exc
    bad = [k for k in missing if not k.startswith("head.")]
    if bad or unexpected:
        raise CheckpointError(f"--finetune {path}: weights do not fit {type(model).__name__} "
                              f"(missing {bad[:3]}, unexpected {list(unexpected)[:3]})")
