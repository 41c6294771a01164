"""The builder of a run (:class:`slaknet.train.run.Run`): machine, output folder, resume source, data, plan,
model, optimizer, sparse engine, EMA, DDP and logging -- in a fixed order, so that every random draw happens
as it always did. The task's hooks receive the run being built.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
import torch.nn as nn

from slaknet.errors import CheckpointError, ConfigError
from slaknet.train import checkpoint as ckpt_io
from slaknet.train.distributed import barrier, init_distributed
from slaknet.train.logs import RunLogger
from slaknet.train.machine import autocast_dtype, cap_workers, keep_freed_memory, resolve_threads, seed_everything
from slaknet.train.optim import build_optimizer, build_scheduler
from slaknet.train.rundir import CKPT_LAST, prepare_output_dir
from slaknet.train.run import ResumePoint, Run, RunPlan
from slaknet.train.samplers import train_sampler

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.trainer import Trainer

__all__ = ["build_run", "load_finetune", "make_scheduler", "check_large_kernels_sparse"]

log = logging.getLogger("slaknet.train")


def build_run(tr: "Trainer") -> None:
    """Fill ``tr.run`` with everything :meth:`Trainer.fit` needs before the loop (in the order the random draws
    require); the resume checkpoint, if any, is read here, once, and restored."""
    cfg, run = tr.cfg, tr.run
    threads = resolve_threads(cfg.threads)
    if threads:
        torch.set_num_threads(threads)
    run.dist = init_distributed(cfg.device)
    run.device = run.dist.device
    if run.device.type == "cpu":
        keep_freed_memory()  # no page faults on the activations every step (speed only)
    run.resume = _resume_source(tr)
    resumed = run.resume.checkpoint if run.resume is not None else None
    tr._resumed = resumed is not None
    linear_auto = _pin_machine_choices(run, resumed)
    run.autocast = autocast_dtype(cfg.precision, run.device)
    seed_everything(int(cfg.seed), tr.task.init_seed_key)
    _setup_data(run, linear_auto)
    _setup_model(run, resumed)
    if resumed is not None:
        tr.restore(resumed)
        run.history[:] = list(resumed.get("history", []))
        tr.resume_path = run.resume.path
    tr._resumed_rng = resumed.get("rng") if resumed is not None else None
    if run.resume is not None:
        run.resume = dataclasses.replace(run.resume, checkpoint={})  # restored: do not keep the tensors alive
    del resumed
    run.model_ddp = run.model
    if run.dist.distributed:
        run.model_ddp = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    tr.task.num_classes = run.plan.num_classes
    run.mix = tr.task.batch_transform()
    run.criterion = tr.task.criterion()
    _setup_logging(tr)
    import time

    tr._cpu0 = time.process_time()


def _resume_source(tr: "Trainer") -> Optional[ResumePoint]:
    """Prepare the output folder and read the checkpoint to continue from (if any)."""
    cfg, out = tr.cfg, tr.out_dir
    path = cfg.resume
    if out and not path and cfg.auto_resume and os.path.isfile(os.path.join(out, CKPT_LAST)):
        path = os.path.join(out, CKPT_LAST)
    resumed = ckpt_io.load_training_checkpoint(path) if path else None
    if resumed is not None:
        _check_resumable(tr, path, resumed)
    if out and tr.run.dist.is_main:
        tr._created_dir = prepare_output_dir(out, resuming=resumed is not None, overwrite=bool(cfg.overwrite))
    barrier()
    if resumed is not None:
        old = resumed.get("config", {})
        for k in ("model", "input_size", "sparse"):
            if k in old and old[k] != cfg[k]:
                raise CheckpointError(f"resume: {k} was {old[k]!r} in the checkpoint, now {cfg[k]!r}; "
                                      "resume with the same settings (or start a new --output-dir)")
    return ResumePoint(path, resumed) if resumed is not None else None


def _check_resumable(tr: "Trainer", path: str, resumed: Dict[str, Any]) -> None:
    """Refuse a checkpoint of another task; stop (:class:`RunFinished`, nothing written) when the run is done."""
    from slaknet.train.run import RunFinished

    old = resumed.get("config") or {}
    task = str(old.get("task") or "classification")
    if task != tr.cfg.task_name:
        raise CheckpointError(f"{path} is a checkpoint of a {task} run, not {tr.cfg.task_name}: start a new "
                              "--output-dir (or resume it with its own command)")
    done = int(resumed.get("epoch", 0) or 0)
    if done >= int(tr.cfg.epochs) and not int(resumed.get("batch_in_epoch", 0) or 0):
        raise RunFinished(f"the run in {os.path.dirname(path) or '.'} is finished ({done}/{tr.cfg.epochs} epochs): "
                          "nothing to do (--epochs N to train further, --overwrite to start afresh)")


def _pin_machine_choices(run: "Run", resumed: Optional[Dict[str, Any]]) -> Optional[str]:
    """What summation orders depend on, kept from the run's start so that a resume is bitwise."""
    from slaknet.layers import autotune, pointwise

    old = resumed.get("config", {}) if resumed is not None else {}
    if isinstance(old.get("autotune"), dict):
        autotune.pin(old["autotune"])  # the backends 'auto' chose by timing when the run started
    if run.device.type != "cpu":
        return None
    if old.get("linear_auto") in ("onednn", "plain"):
        # a run started before the 1x1 layers' training GEMM was chosen per shape: its one GEMM for all
        pointwise.pin_auto_choice(old["linear_auto"])
    if resumed is not None and str(run.cfg.threads).lower() == "auto" and old.get("resolved_threads"):
        torch.set_num_threads(int(old["resolved_threads"]))  # 'auto' follows the machine's load
    # per shape: the answers are autotune questions, recorded with the others and pinned above on a resume
    return pointwise.pinned_choice() or "per-shape"


def _setup_data(run: "Run", linear_auto: Optional[str]) -> None:
    """Datasets, sampler, workers and the plan (steps, scaled lr, warm-up)."""
    cfg, d = run.cfg, run.dist
    run.data = run.task.build_data(run)
    classes = run.data.classes
    num_classes = int(cfg.num_classes or len(classes))
    if num_classes < len(classes):
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {len(classes)} classes in the data")
    run.batch_size = bs = int(cfg.batch_size)
    n_train = run.task.num_train_samples(run)
    if n_train < bs * d.world_size:
        raise ConfigError(f"the training set has {n_train} images, fewer than one batch "
                          f"({bs} x {d.world_size} processes); lower --batch-size")
    run.task.check(run)
    run.sampler = train_sampler(range(n_train), int(cfg.seed), d.rank, d.world_size)
    run.workers = cap_workers(int(cfg.num_workers))
    run.pin_memory = bool(cfg.pin_mem) and run.device.type == "cuda"
    batches = len(run.sampler) // bs
    uf = int(cfg.update_freq)
    steps = batches // uf
    if steps < 1:
        raise ConfigError(f"an epoch has {batches} batches, fewer than --update-freq {uf}")
    total = steps * int(cfg.epochs)
    eff = bs * uf * d.world_size
    lr = float(cfg.lr) if cfg.lr is not None else 4e-3 * eff / 4096
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(float(cfg.warmup_epochs) * steps))
    run.plan = RunPlan(world_size=d.world_size, effective_batch=eff, batches_per_epoch=batches, steps_per_epoch=steps,
                      total_steps=total, warmup=min(int(warmup), max(total - 1, 0)), lr=lr, num_classes=num_classes,
                      linear_auto=linear_auto, resolved_threads=torch.get_num_threads(), workers=run.workers)


def _setup_model(run: "Run", resumed: Optional[Dict[str, Any]]) -> None:
    """Model (finetune weights, device, memory format, SyncBN), optimizer, schedule, scaler, sparse engine, EMA."""
    import dataclasses

    from timm.utils import ModelEmaV3

    cfg, plan = run.cfg, run.plan
    model, resolved = run.task.build_model(run, plan.num_classes)
    run.plan = dataclasses.replace(plan, model=dict(resolved))
    if cfg.finetune and resumed is None:
        load_finetune(model, cfg.finetune)
    model.to(run.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and run.dist.distributed:
        if run.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif run.dist.is_main:
            log.warning("--sync-bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); BatchNorm stays per-process")
    run.model = model
    run.extra_modules = {k: m.to(run.device) for k, m in run.task.extra_modules(run).items()}
    run.optimizer = _build_optimizer(run)
    run.scheduler = make_scheduler(run)
    run.scaler = torch.amp.GradScaler(run.device.type) if run.autocast == torch.float16 else None
    run.engine = None
    run.sparse_config = run.task.sparse_config(run, run.plan.total_steps)
    if run.sparse_config is not None:
        from slaknet.sparse import SparseEngine, init_rule

        snip = None
        if init_rule(run.sparse_config.sparse_init).needs_batch:  # SNIP (on resume the saved masks replace its)
            xb, yb = run.task.snip_batch(run)
            snip = (xb.to(run.device), yb.to(run.device))
        run.engine = SparseEngine(model, run.optimizer, run.sparse_config, snip_batch=snip)
        if resumed is None:
            check_large_kernels_sparse(run.engine, cfg)
    run.ema = None
    if cfg.model_ema:
        if run.engine is not None:
            run.engine.apply_masks()
        run.ema = ModelEmaV3(model, decay=cfg.model_ema_decay)


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


def _build_optimizer(run: "Run") -> torch.optim.Optimizer:
    """The model's parameter groups (the task's, or weight decay on >= 2-D weights), plus the task's extra
    modules (same rule), in one optimizer."""
    groups = run.task.param_groups(run, run.model)
    if not run.extra_modules:
        return build_optimizer(run.model, run.cfg, lr=run.plan.lr, param_groups=groups)
    if groups is None:
        holder = nn.ModuleDict({"model": run.model, **run.extra_modules})
        return build_optimizer(holder, run.cfg, lr=run.plan.lr)
    from timm.optim import param_groups_weight_decay

    extra = nn.ModuleDict(run.extra_modules)
    return build_optimizer(run.model, run.cfg, lr=run.plan.lr,
                           param_groups=list(groups) + param_groups_weight_decay(extra, float(run.cfg.weight_decay)))


def make_scheduler(run: "Run") -> Any:
    """The task's lr schedule, or warm-up + cosine to ``min_lr``, over the plan's steps."""
    plan = run.plan
    sched = run.task.build_scheduler(run, run.optimizer, plan.total_steps, plan.warmup)
    if sched is None:
        sched = build_scheduler(run.optimizer, dict(lr=plan.lr, min_lr=run.cfg.min_lr), plan.total_steps, plan.warmup)
    return sched


def _setup_logging(tr: "Trainer") -> None:
    """Progress mode, logger, config.yaml and the run header (rank 0)."""
    from slaknet.train.reporting import header_lines

    cfg, run, main = tr.cfg, tr.run, tr.run.dist.is_main
    tty = sys.stderr.isatty()
    run.progress = bool(tty if cfg.progress is None else cfg.progress) and main
    run.progress_lines = main and not run.progress and cfg.progress is None  # no terminal: plain lines
    run.logger = RunLogger(tr.out_dir, main, bool(cfg.tensorboard), cfg.log_dir)
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
