"""What a run tells its user: the header, one line per epoch, the summary, the final files and message."""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, List

import torch

from slaknet.train import checkpoint as ckpt_io
from slaknet.train.rundir import CKPT_BEST, CKPT_LAST

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.trainer import Trainer

__all__ = ["header_lines", "epoch_message", "finish_run", "safetensors_metadata"]

log = logging.getLogger("slaknet.train")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _precision(name: str, dtype: Any) -> str:
    """The precision setting and, for ``auto`` / ``amp``, what it chose on this machine."""
    if name not in ("auto", "amp"):
        return name
    chosen = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return f"{name} ({chosen}{': no AMX on this CPU' if name == 'auto' and chosen == 'fp32' else ''})"


def header_lines(tr: "Trainer") -> List[str]:
    """The run header: model and data; recipe, input, augmentation, sparsity, workers; schedule and device."""
    cfg, plan, d = tr.cfg, tr.plan, tr.dist
    n_params = sum(p.numel() for p in tr.model.parameters())
    m = plan.model
    arch = ""
    if m.get("kernels"):
        arch = f"; kernels {' '.join(str(k) for k in m['kernels'])}" + (
            f", small kernel N={m['small_kernel']}" if m.get("small_kernel") is not None else "")
    lines = [f"{tr.task.command}: {cfg['model']} ({n_params / 1e6:.2f}M params{arch}) on {tr.data.description or cfg['data']}"]
    sc = tr.sparse_config
    sparse = (f"sparsity {sc.sparsity:.2f} (u={sc.update_frequency}, {_init_name(sc)}, growth {sc.growth})"
              if sc is not None else "dense")
    aug = tr.task.describe()
    workers = _plural(tr.workers, "data worker")
    if tr.workers < int(cfg.num_workers):
        workers += f" (capped from {cfg.num_workers}: {tr.workers} cores)"
    lines.append(f"  recipe {cfg.recipe}: input {tr.task.input_side()} px" + (f", {aug}" if aug else "")
                 + f", {sparse}, {workers}")
    threads = f" ({_plural(torch.get_num_threads(), 'thread')})" if tr.device.type == "cpu" else ""
    lines.append(f"  {cfg.epochs} epochs x {plan.steps_per_epoch} steps, batch {cfg.batch_size} x {cfg.update_freq} x "
                 f"{d.world_size} = {plan.effective_batch}, lr {plan.lr:.3g}, warm-up {plan.warmup} steps, "
                 f"device {tr.device}{threads}, precision {_precision(cfg.precision, tr.autocast)} -> {tr.out_dir}")
    gpus = next((r.gpus for r in cfg.spec.recipes if r.name == cfg.recipe), None)
    if gpus and plan.effective_batch != 4096:
        lines.append(f"  note: the paper ran this recipe at effective batch 4096 ({gpus} GPUs x "
                     f"{cfg.batch_size} x {cfg.update_freq}); here it is {plan.effective_batch} with lr {plan.lr:.3g} "
                     "(pass --lr to rescale, or --update-freq to match)")
    if tr.engine is not None:
        lines.append("  " + _sparse_layers_line(tr.engine.density_report()))
    lines += ["  " + line for line in tr.task.header_lines(tr.run)]
    if tr._resumed:
        st = tr.state
        where = (f"epoch {st.epoch + 1}/{cfg.epochs}, batch {st.batch_in_epoch}/{plan.batches_per_epoch}"
                 if st.batch_in_epoch else f"the start of epoch {st.epoch + 1}/{cfg.epochs}")
        lines.append(f"resumed from {tr.resume_path}: continuing at {where} (step {st.step})")
    return lines


def _init_name(sc: Any) -> str:
    """The mask initialisation as set, e.g. ``ERK`` or ``ERK power scale 0.3`` (the demo's)."""
    scale = getattr(sc, "erk_power_scale", 1.0)
    return sc.sparse_init + (f" power scale {scale:g}" if "ERK" in str(sc.sparse_init).upper() and scale != 1.0 else "")


def _sparse_layers_line(report: Dict[str, Any]) -> str:
    """How the sparsity is spread: sparse layers, sparse large-kernel weights, and the three densities."""
    dens = list(report["layers"].values())
    n_sparse = sum(1 for v in dens if v < 1.0)
    lk = report["large_kernel"]
    line = f"sparse layers: {n_sparse} of {len(dens)} candidate weights sparse"
    if lk["sparse"] + lk["dense"]:
        line += f", {lk['sparse']} of {lk['sparse'] + lk['dense']} large-kernel weights"
    return line + "; " + density_phrase(report)


def density_phrase(d: Dict[str, Any]) -> str:
    """``density (non-zero fraction): large-kernel weights 0.600, sparse layers 0.600, whole model 0.604``."""
    parts = [(label, d.get(key)) for label, key in (("large-kernel weights", "large_kernel_density"),
                                                    ("sparse layers", "sparse_layers_density"),
                                                    ("whole model", "model_density"))]
    return "density (non-zero fraction): " + ", ".join(f"{label} {v:.3f}" for label, v in parts if v is not None)


def epoch_message(tr: "Trainer", rec: Dict[str, Any]) -> str:
    """``epoch 2/6: train loss ..., val top-1 ...`` (top-5 only where the task reports it)."""
    msg = f"epoch {rec['epoch'] + 1}/{tr.cfg.epochs}: train loss {rec['train_loss']:.4f}"
    if "val_top1" in rec:
        msg += f", val top-1 {rec['val_top1']:.2f}%"
        if "val_top5" in rec:
            msg += f" top-5 {rec['val_top5']:.2f}%"
        msg += f" loss {rec['val_loss']:.4f}"
    elif tr.task.best_metric in rec:  # other tasks: their deciding metric (e.g. val_miou) and loss
        msg += f", {tr.task.best_metric.replace('_', ' ')} {rec[tr.task.best_metric]:.2f}"
        if "val_loss" in rec:
            msg += f" loss {rec['val_loss']:.4f}"
    if "ema_top1" in rec:
        msg += f", EMA top-1 {rec['ema_top1']:.2f}%"
    if tr.engine is not None:
        msg += f", sparse-layer sparsity {1 - rec['density']:.3f}, ITOP {rec['itop_rate']:.3f}"
    return msg + f" ({rec['epoch_time']:.0f}s, {rec['train_images_per_s']:.0f} img/s)"


def _summary(tr: "Trainer") -> Dict[str, Any]:
    """summary.json: the run's numbers. The best evaluation is ``best_value`` of ``best_metric`` (the task's
    deciding key, e.g. ``val_miou``), also under its own name (``best_miou``; ``best_top1`` for tasks
    decided by top-1, which also get ``final_top1`` / ``final_top5`` / ``chance_top1``)."""
    cfg, st = tr.cfg, tr.state
    final = tr.history[-1] if tr.history else {}
    metric = tr.task.best_metric
    best = st.best_metric if st.best_epoch >= 0 else None
    s: Dict[str, Any] = {
        "model": cfg["model"], "data": cfg["data"], "recipe": cfg.recipe, "epochs_done": st.epoch, "steps": st.step}
    if metric == "val_top1":
        s.update(final_top1=final.get("val_top1"), final_top5=final.get("val_top5"))
    s.update({
        "best_metric": metric, "best_value": best, "best_" + metric.split("_", 1)[-1]: best,
        "best_epoch": st.best_epoch + 1 if st.best_epoch >= 0 else None,
        "num_classes": int(tr.plan.num_classes), "classes": list(tr.data.classes),
        "train_seconds": round(st.elapsed, 1), "bad_images": len(st.bad_files), "bad_files": list(st.bad_files),
        "cpu_seconds_this_session": round(float(getattr(tr, "_cpu_seconds", 0.0)), 1),
        "torch_threads": torch.get_num_threads(), "lr": tr.plan.lr, "output_dir": tr.out_dir,
        "stopped_by": tr.stop_reason or None,
    })
    if metric == "val_top1":
        s["chance_top1"] = 100.0 / max(len(tr.data.classes), 1)
    if tr.ema is not None and "ema_top1" in final:
        s["final_ema_top1"] = final["ema_top1"]
    s.update(tr.task.summary_fields(tr.run))
    try:
        from slaknet.analysis.counting import count_model

        first_conv = next((m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        c = count_model(tr.model, tr.task.input_side(), in_chans=first_conv.in_channels if first_conv else 3)
        s.update(params=int(c.params), nonzero_params=int(c.params_nonzero), macs=int(c.macs_dense),
                 nonzero_macs=int(c.macs_nonzero))
    except Exception as exc:  # counting is a report, never a reason to lose the run
        log.warning("parameter counting failed: %s", exc)
        s.update(params=sum(p.numel() for p in tr.model.parameters()),
                 nonzero_params=sum(int((p != 0).sum()) for p in tr.model.parameters()))
    if tr.engine is not None:  # the final weights' zeros (what model.safetensors holds), each named
        s.update(density=tr.engine.global_density(), itop_rate=tr.engine.itop_rate(), **tr.engine.densities())
    else:
        s["model_density"] = s["nonzero_params"] / max(s["params"], 1)
    return s


def safetensors_metadata(tr: "Trainer") -> Dict[str, str]:
    """String metadata of ``model.safetensors``: architecture, classes, input size and normalisation."""
    cfg = tr.cfg
    meta = {"model": cfg["model"], "num_classes": str(tr.plan.num_classes), "classes": json.dumps(list(tr.data.classes)),
            "data": str(cfg["data"]), "difficulty": str(cfg.difficulty), "data_seed": str(cfg.data_seed),
            "val_samples": str(cfg.val_samples), "input_size": str(int(cfg.input_size)),
            "kernel_size": json.dumps(tr.plan.model.get("resolved_kernel_size")),
            "mean": json.dumps([float(v) for v in tr.data.mean]), "std": json.dumps([float(v) for v in tr.data.std])}
    meta.update(tr.task.metadata(tr.run))
    return meta


def _done_lines(tr: "Trainer", s: Dict[str, Any]) -> List[str]:
    out, st = tr.out_dir, tr.state
    head = f"done in {s['train_seconds']:.0f}s"
    if tr.stop_reason:
        head += f" (stopped by {tr.stop_reason} at step {st.step}, epoch {min(st.epoch + 1, tr.cfg.epochs)}/{tr.cfg.epochs})"
    if s["best_value"] is not None and tr.task.best_metric != "val_top1":
        head += f": best {tr.task.best_metric.replace('_', ' ')} {s['best_value']:.2f} at epoch {s['best_epoch']}"
    elif s["best_value"] is not None:
        head += (f": final top-1 {s['final_top1']:.2f}% " if s["final_top1"] is not None else ": ") + (
            f"(best {s['best_value']:.2f}% at epoch {s['best_epoch']}; chance {s['chance_top1']:.1f}%)")
    else:
        head += f": {_plural(st.step, 'step')}, no evaluation yet"
    lines = [head]
    if "nonzero_params" in s:
        lines.append(f"  params {s.get('params', 0):,}, non-zero {s['nonzero_params']:,}"
                     + (f"; {density_phrase(s)}, ITOP {s['itop_rate']:.3f}" if tr.engine is not None else ""))
    if st.bad_files:
        lines.append(f"  skipped {_plural(len(st.bad_files), tr.task.bad_file_word)} (listed in summary.json): "
                     + ", ".join(os.path.basename(p) for p in st.bad_files[:3]) + (", ..." if len(st.bad_files) > 3 else ""))
    if out:
        lines.append(f"  outputs in {out}: model.safetensors (last weights), {CKPT_BEST} (best), {CKPT_LAST} "
                     "(resume), log.jsonl, curves.png, summary.json, config.yaml")
        lines.append(f"  next: {tr.task.eval_command} --checkpoint {os.path.join(out, CKPT_BEST)}   |   "
                     f"{tr.task.predict_command} IMAGE --checkpoint {os.path.join(out, 'model.safetensors')}")
    return lines


def finish_run(tr: "Trainer") -> Dict[str, Any]:
    """Summary; on rank 0 with an output folder also the safetensors, curves, summary.json and message."""
    s = _summary(tr)
    if tr.dist.is_main and tr.out_dir:
        meta = safetensors_metadata(tr)
        ckpt_io.export_safetensors(tr.model.state_dict(), os.path.join(tr.out_dir, "model.safetensors"), meta)
        if tr.ema is not None:
            ckpt_io.export_safetensors(tr.ema.module.state_dict(), os.path.join(tr.out_dir, "model_ema.safetensors"), meta)
        if tr.history:
            try:
                from slaknet.train.logs import plot_curves

                plot_curves(tr.history, os.path.join(tr.out_dir, "curves.png"))
            except Exception as exc:
                log.warning("could not draw learning curves: %s", exc)
        with open(os.path.join(tr.out_dir, "summary.json"), "w") as f:
            json.dump(s, f, indent=2)
    if tr.dist.is_main and tr.out_dir:
        tr.logger.print("\n".join(_done_lines(tr, s)))
    return s
