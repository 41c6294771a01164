"""The Trainer: one loop with every run guarantee, for any :class:`~slaknet.train.tasks.base.Task`.

Shared here: optimizer (timm, no weight decay on norms / biases / layer scale), per-step warm-up + cosine
schedule (timm), gradient accumulation, AMP (autocast + GradScaler for fp16), DDP, the dynamic sparse
engine, EMA, NaN stop, exact resume (also mid-epoch and after SIGKILL), Ctrl-C checkpoints, distinct
unreadable-file counting, logs (JSON lines, TensorBoard, progress, curves, summary) and callbacks.

Determinism: at the start of every epoch all RNGs are re-seeded from ``(seed, epoch, rank)`` and the data
order is a function of ``(seed, epoch)``, so resuming from an epoch-end checkpoint replays exactly what an
uninterrupted run does. Mid-epoch checkpoints (``--ckpt-every-steps``, Ctrl-C) also store the RNG states,
the position in the epoch and the epoch's partial loss sums; items made by data-loader workers are a function of
``(seed, epoch, index)`` (:class:`slaknet.train.samplers.SeededItems`), so mid-epoch resumes are exact with any
number of workers.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from slaknet.errors import CheckpointError, SlaknetError
from slaknet.train import checkpoint as ckpt_io
from slaknet.train.distributed import all_reduce_sum, barrier
from slaknet.train.logs import StepProgress
from slaknet.train.machine import seed_everything
from slaknet.train.rundir import CKPT_BEST, CKPT_LAST, remove_created_dir, resume_command
from slaknet.train.run import Run, RunFinished, RunPlan, TrainState

__all__ = ["Trainer", "TrainState", "RunPlan", "Run", "Callback", "NonFiniteLossError"]


class NonFiniteLossError(SlaknetError):
    """The loss became NaN or infinite; the run stops and keeps the last good checkpoint."""


class Callback:
    """Hooks called by :meth:`Trainer.fit` (override what you need; ``trainer.stop = True`` ends the run)."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", loss: float) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", record: Dict[str, Any]) -> None: ...
    def on_train_end(self, trainer: "Trainer", summary: Dict[str, Any]) -> None: ...


class _Interrupt:
    """First Ctrl-C: ask the loop to checkpoint and stop; a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C raises KeyboardInterrupt
        print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again aborts at once)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class Trainer:
    """Train ``task`` as configured by ``cfg`` (:class:`slaknet.train.config.Config`).

    ``out_dir`` (default ``cfg.output_dir``; ``None``: write nothing) receives checkpoints, logs, the final
    safetensors, curves and the summary. ``evaluate_during`` False skips evaluation (the caller evaluates).
    """

    def __init__(self, cfg: Any, task: Any = None, out_dir: Any = "config", callbacks: Sequence[Callback] = (),
                 evaluate_during: bool = True) -> None:
        from slaknet.train.tasks import get_task_class

        self.cfg = cfg
        self.task = task if task is not None else get_task_class(cfg.task_name)(cfg)
        self.out_dir: Optional[str] = cfg.output_dir if out_dir == "config" else out_dir
        self.callbacks = list(callbacks)
        self.evaluate_during = evaluate_during
        self.state = TrainState()
        # the run's parts (model, optimizer, data, plan...): one typed object, built by setup.build_run
        self.run = Run(cfg=cfg, task=self.task, out_dir=self.out_dir, state=self.state)
        self.stop = False
        self.stop_reason = ""
        self._interrupt = _Interrupt()
        self._created_dir = False
        self._started = False

    def __getattr__(self, name: str) -> Any:
        """The run's parts read through the trainer (``trainer.model``, ``trainer.plan``...): see :class:`Run`."""
        if name.startswith("__") or name == "run":
            raise AttributeError(name)
        run = self.__dict__.get("run")
        if run is not None and name in run.__dataclass_fields__:
            return getattr(run, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.run.history

    # ------------------------------------------------------------------------------------- public ----
    def fit(self) -> Dict[str, Any]:
        """Run training; returns the summary. torch's thread count is restored afterwards."""
        prev_threads = torch.get_num_threads()
        self._interrupt.install()
        try:
            try:
                self._setup()
            except RunFinished as done:
                return self._finished_summary(str(done))
            self._started = True
            for cb in self.callbacks:
                cb.on_train_start(self)
            self._loop()
            summary = self._finish()
            for cb in self.callbacks:
                cb.on_train_end(self, summary)
            return summary
        except BaseException:
            if not self._started and self.dist_main:
                remove_created_dir(self.out_dir, self._created_dir)
            raise
        finally:
            self._interrupt.restore()
            if self.run.logger is not None:
                self.run.logger.close()
            torch.set_num_threads(prev_threads)

    def _finished_summary(self, message: str) -> Dict[str, Any]:
        """The stored summary of a finished run that was asked to resume (its files are left as they are)."""
        import json

        if self.dist_main:
            print(message, file=sys.stderr, flush=True)
        path = os.path.join(self.out_dir or ".", "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                return dict(json.load(f), already_finished=True)
        return {"already_finished": True}

    def replan(self, total_steps: int, warmup: int) -> None:
        """Re-plan the schedule for ``total_steps`` (e.g. a time budget measured after the first steps)."""
        from slaknet.train.setup import make_scheduler

        self.run.plan = dataclasses.replace(self.plan, total_steps=int(total_steps), warmup=int(warmup))
        self.run.scheduler = make_scheduler(self.run)
        self.scheduler.step_update(self.state.step)

    @property
    def dist_main(self) -> bool:
        return getattr(self, "dist", None) is None or self.dist.is_main

    # -------------------------------------------------------------------------------------- setup ----
    def _setup(self) -> None:
        from slaknet.train.setup import build_run

        build_run(self)

    # --------------------------------------------------------------------------------------- loop ----
    def _loop(self) -> None:
        cfg, st = self.cfg, self.state
        self._t_session = time.perf_counter()
        self._elapsed0 = st.elapsed
        while st.epoch < int(cfg.epochs) and not self.stop:
            complete = self._train_epoch(st.epoch)
            st.elapsed = self._elapsed0 + time.perf_counter() - self._t_session
            if not complete:
                break
            self._end_epoch(st.epoch)
        if self.stop and st.batch_in_epoch:
            self._merge_bad_files()
            self.save()

    def _begin_epoch(self, epoch: int) -> StepProgress:
        st = self.state
        if st.batch_in_epoch and self._resumed_rng is not None:
            ckpt_io.restore_rng(self._resumed_rng)
        else:
            seed_everything(int(self.cfg.seed), epoch, self.dist.rank)
            st.loss_sum, st.loss_n, st.seen = 0.0, 0, 0
        self._resumed_rng = None
        self._new_bad: set = set()
        self.model_ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        return StepProgress(self.progress, self.progress_lines, self.plan.batches_per_epoch, st.batch_in_epoch,
                            f"epoch {epoch + 1}/{self.cfg.epochs}", note=self._first_epoch_note(epoch))

    def _first_epoch_note(self, epoch: int) -> str:
        if epoch == 0 and getattr(self.data.train, "cache", False) and not getattr(self.data.train, "loaded", False) \
                and not self._resumed:
            return "the first epoch also renders the built-in images (kept in memory, later epochs are faster)"
        return ""

    def _train_epoch(self, epoch: int) -> bool:
        """One epoch from ``state.batch_in_epoch`` on; False when the run stopped inside it."""
        st, uf = self.state, int(self.cfg.update_freq)
        bar = self._begin_epoch(epoch)
        t_epoch = time.perf_counter()
        n_batches = self.plan.batches_per_epoch - st.batch_in_epoch
        try:
            for bi, batch in enumerate(self.task.train_batches(self.run, epoch, st.batch_in_epoch)):
                if bi >= n_batches:
                    break
                accum_end = (st.batch_in_epoch + 1) % uf == 0
                lv = self._forward_backward(batch, accum_end, epoch, bi)
                st.batch_in_epoch += 1
                st.loss_sum, st.loss_n = st.loss_sum + lv, st.loss_n + 1
                st.seen += len(batch[0])
                if accum_end:
                    self._optimizer_step()
                    bar.set(loss=f"{st.loss_sum / st.loss_n:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                    self._after_step(lv)
                bar.update()
                if self.stop:
                    break
        finally:
            bar.close()
        self._epoch_time = time.perf_counter() - t_epoch
        return st.batch_in_epoch >= self.plan.batches_per_epoch

    def _forward_backward(self, batch: Sequence[torch.Tensor], accum_end: bool, epoch: int, bi: int) -> float:
        dev, uf = self.device, int(self.cfg.update_freq)
        x, y = self.task.move_batch(self.run, batch)
        if len(batch) > 3 and isinstance(batch[3], torch.Tensor):  # (x, y, unreadable count, first bad index)
            self._new_bad.update(int(i) for i in batch[3].tolist() if int(i) >= 0)
        if self.mix is not None:
            x, y = self.mix(x, y)
        if self.cfg.channels_last and isinstance(x, torch.Tensor):
            x = x.contiguous(memory_format=torch.channels_last)
        no_sync = self.dist.distributed and not accum_end
        with (self.model_ddp.no_sync() if no_sync else nullcontext()):
            with torch.autocast(dev.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss = self.task.training_loss(self.run, self.model_ddp, x, y)
            lv = float(loss.detach())
            flags = torch.tensor([0.0 if math.isfinite(lv) else 1.0, 1.0 if self._interrupt.requested else 0.0])
            if self.dist.distributed:
                flags = all_reduce_sum(flags)
            if float(flags[0]) > 0:
                raise NonFiniteLossError(
                    f"loss is {lv} at epoch {epoch + 1}, optimizer step {self.state.step + 1} (batch {bi + 1}); "
                    f"stopped. The last good checkpoint is {os.path.join(self.out_dir or '.', CKPT_LAST)}: lower "
                    "--lr, set --clip-grad, or use fp32")
            self._interrupt_all = float(flags[1]) > 0
            (self.scaler.scale(loss / uf) if self.scaler is not None else loss / uf).backward()
        return lv

    def _optimizer_step(self) -> None:
        cfg, engine = self.cfg, self.engine
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if engine is not None:
            engine.before_clip(bool(cfg.clip_grad))  # masks gradients when clipping or the criterion needs it
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(self.state.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)
            if engine is not None:
                engine.sync_ema(self.ema.module)

    def _after_step(self, loss: float) -> None:
        st, cfg = self.state, self.cfg
        every = int(cfg.ckpt_every_steps or 0)
        if every and st.step % every == 0 and st.batch_in_epoch < self.plan.batches_per_epoch:
            st.elapsed = self._elapsed0 + time.perf_counter() - self._t_session
            self._merge_bad_files()
            self.save()
        if cfg.max_steps and st.step >= int(cfg.max_steps):
            self.stop, self.stop_reason = True, f"--max-steps {cfg.max_steps}"
        if getattr(self, "_interrupt_all", False):
            self._on_interrupt()
        for cb in self.callbacks:
            cb.on_step_end(self, loss)

    def _on_interrupt(self) -> None:
        st = self.state
        st.elapsed = self._elapsed0 + time.perf_counter() - self._t_session
        self._merge_bad_files()
        self.save()
        barrier()
        if self.dist.is_main and self.out_dir:
            print(f"interrupted in epoch {st.epoch + 1}/{self.cfg.epochs} at step {st.step}: saved "
                  f"{os.path.join(self.out_dir, CKPT_LAST)}\nresume with: {resume_command(self.out_dir)}",
                  file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    def _merge_bad_files(self) -> None:
        """Add this epoch's newly met unreadable files (all ranks) to the run's distinct list."""
        new = sorted(getattr(self, "_new_bad", set()))
        if self.dist.distributed:
            import torch.distributed as tdist

            gathered: List[Any] = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, new)
            new = sorted({i for part in gathered for i in part})
        samples = getattr(self.data.train, "samples", None)
        known = set(self.state.bad_files)
        for i in new:
            path = samples[i][0] if samples is not None else str(i)
            if path not in known:
                self.state.bad_files.append(path)
                known.add(path)
        if hasattr(self.data.train, "known_bad"):
            self.data.train.known_bad.update(new)
        self._new_bad = set()

    def _end_epoch(self, epoch: int) -> None:
        from slaknet.train.reporting import epoch_message

        st = self.state
        self._merge_bad_files()
        sums = all_reduce_sum(torch.tensor([st.loss_sum, float(st.loss_n), float(st.seen)], dtype=torch.float64))
        st.epoch += 1
        st.batch_in_epoch = 0
        rec: Dict[str, Any] = {"epoch": epoch, "step": st.step, "train_loss": float(sums[0] / max(float(sums[1]), 1.0)),
                               "lr": self.optimizer.param_groups[0]["lr"], "epoch_time": self._epoch_time,
                               "train_images_per_s": float(sums[2]) / max(self._epoch_time, 1e-9)}
        if st.bad_files:
            rec["bad_images"] = len(st.bad_files)
        if self.engine is not None:
            rec.update(density=self.engine.global_density(), itop_rate=self.engine.itop_rate(),
                       sparse_updates=self.engine.update_count)
        last = st.epoch >= int(self.cfg.epochs)
        if self.evaluate_during and (st.epoch % int(self.cfg.eval_every) == 0 or last):
            self._evaluate_into(rec, epoch)
        st.elapsed = self._elapsed0 + time.perf_counter() - self._t_session
        rec["elapsed"] = st.elapsed
        self.history.append(rec)
        self.logger.print(epoch_message(self, rec))
        self.save()  # checkpoint first: a kill between the two never logs an epoch twice after resume
        self.logger.record(rec)
        self.logger.scalars(st.step, {k: v for k, v in rec.items() if k not in ("epoch", "step")}, "")
        if self.dist.is_main and self.out_dir and self.cfg.save_ckpt_freq and st.epoch % int(self.cfg.save_ckpt_freq) == 0:
            import shutil

            shutil.copyfile(os.path.join(self.out_dir, CKPT_LAST), os.path.join(self.out_dir, f"checkpoint-{epoch}.pth"))
        for cb in self.callbacks:
            cb.on_epoch_end(self, rec)
        barrier()

    def _evaluate_into(self, rec: Dict[str, Any], epoch: int) -> None:
        from slaknet.train.bn import recalibrate_bn

        cfg = self.cfg
        if cfg.bn_recalibrate:
            for m in [self.model] + ([self.ema.module] if self.ema is not None else []):
                recalibrate_bn(m, self.data.train, int(cfg.bn_recalibrate), self.batch_size, self.device,
                               self.autocast, cfg.channels_last)
        ev = self.task.evaluate(self.run, self.model, "val")
        rec.update({f"val_{k}": v for k, v in ev.items()})
        if self.ema is not None and cfg.model_ema_eval:
            eve = self.task.evaluate(self.run, self.ema.module, "val ema")
            rec.update({f"ema_{k}": v for k, v in eve.items()})
        metric = rec.get(self.task.best_metric)
        if metric is not None and metric > self.state.best_metric:
            self.state.best_metric, self.state.best_epoch = metric, epoch
            if self.dist.is_main and self.out_dir:
                best = {"model": self.model.state_dict(), "config": self.stored_config(), "epoch": epoch,
                        "top1": metric, "metric": self.task.best_metric, "classes": list(self.data.classes)}
                if self.ema is not None:
                    best["model_ema"] = self.ema.module.state_dict()
                ckpt_io.atomic_save(best, os.path.join(self.out_dir, CKPT_BEST))

    # -------------------------------------------------------------------------------- checkpoints ----
    def stored_config(self) -> Dict[str, Any]:
        """The config plus the plan and the data's normalisation, as stored in checkpoints."""
        from slaknet.layers import autotune

        d = self.cfg.to_stored()
        d.update(self.plan.as_dict())
        d["autotune"] = autotune.answers()  # the backends chosen by timing: a resume pins them
        d.update(mean=list(self.data.mean), std=list(self.data.std), num_classes=self.plan.num_classes)
        return d

    def save(self) -> None:
        """Write ``checkpoint-last.pth`` atomically (rank 0)."""
        if not self.dist.is_main or not self.out_dir:
            return
        st = self.state
        obj = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scheduler": self.scheduler.state_dict(), "rng": ckpt_io.capture_rng(),
               "config": self.stored_config(), "history": self.history, "classes": list(self.data.classes),
               "format": "slaknet-train-2", "best_top1": st.best_metric, **dataclasses.asdict(st)}
        obj["bad_images"] = len(st.bad_files)
        if self.ema is not None:
            obj["model_ema"] = self.ema.module.state_dict()
        if self.scaler is not None:
            obj["scaler"] = self.scaler.state_dict()
        if self.engine is not None:
            obj["sparse"] = self.engine.state_dict()
        if self.extra_modules:
            obj["task_modules"] = {k: m.state_dict() for k, m in self.extra_modules.items()}
        ckpt_io.atomic_save(obj, os.path.join(self.out_dir, CKPT_LAST))

    def restore(self, obj: Dict[str, Any]) -> None:
        """Load a training checkpoint into model, optimizer, schedule, scaler, sparse engine, EMA and state."""
        self.task.check_resume(self.run, obj)
        try:
            self.model.load_state_dict(obj["model"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit this model: {str(exc).splitlines()[0]}") from exc
        self.optimizer.load_state_dict(obj["optimizer"])
        self.scheduler.load_state_dict(obj["scheduler"])
        if self.scaler is not None and "scaler" in obj:
            self.scaler.load_state_dict(obj["scaler"])
        if self.engine is not None:
            if "sparse" not in obj:
                raise CheckpointError("the checkpoint was trained dense, but --sparse is on; resume with the same settings")
            self.engine.load_state_dict(obj["sparse"])
        for k, m in self.extra_modules.items():
            if k not in obj.get("task_modules", {}):
                raise CheckpointError(f"the checkpoint has no state for the task's module {k!r}; resume with the "
                                      "same task settings")
            m.load_state_dict(obj["task_modules"][k])
        if self.ema is not None and "model_ema" in obj:
            self.ema.module.load_state_dict(obj["model_ema"])
        st = self.state
        for f in dataclasses.fields(TrainState):
            if f.name in obj:
                setattr(st, f.name, type(getattr(st, f.name))(obj[f.name]))
        if "best_metric" not in obj:  # checkpoints of slaknet <= 0.x
            st.best_metric = float(obj.get("best_top1", -1.0))
        if hasattr(self.data.train, "known_bad") and st.bad_files:
            paths = {p: i for i, (p, _) in enumerate(getattr(self.data.train, "samples", []))}
            self.data.train.known_bad.update(paths[p] for p in st.bad_files if p in paths)
        self.scheduler.step_update(st.step)

    # ------------------------------------------------------------------------------------- finish ----
    def _finish(self) -> Dict[str, Any]:
        from slaknet.train.reporting import finish_run

        self._cpu_seconds = time.process_time() - self._cpu0
        summary = finish_run(self)
        barrier()
        return summary

