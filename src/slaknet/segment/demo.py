"""``slaknet segment`` without arguments: SLaK vs its 7x7 twin on the built-in contours set (CPU, minutes).

Both networks are ``slak_pico`` encoders (same depth, widths, norms, UperNet decoder, auxiliary head, data,
seeds, steps and schedule); one has SLaK's large decomposed kernels (31/29/27/13 with N=5, capped to what a
64 px input can use), the other a single 7x7 kernel per block (``slak_pico_k7``). The table gives their
validation mIoU and training time; ``predictions.png`` shows image | truth | SLaK | 7x7 for a few images.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["run_demo", "DEMO_MODELS"]

DEMO_MODELS = ("slak_pico", "slak_pico_k7")


def _config(model: str, out_dir: str, epochs: Optional[int], train_samples: Optional[int],
            threads: Optional[str]) -> Any:
    """The ``seg_demo`` configuration of one demo model (a fresh run folder under ``out_dir``)."""
    import slaknet

    given = {k: v for k, v in dict(epochs=epochs, train_samples=train_samples, threads=threads).items()
             if v is not None}
    return slaknet.config("segmentation", recipe="seg_demo", model=model, output_dir=os.path.join(out_dir, model),
                          overwrite=True, **given)


def _predictions_picture(trainers: List[Any], path: str, count: int = 4, zoom: int = 3) -> None:
    import torch

    from slaknet.segment.infer import colorize, image_tensor, save_png

    ds = trainers[0].data.val
    rows = []
    for i in range(min(count, len(ds))):
        img, lab = ds.raw(i)
        tiles = [img, colorize(lab, 2)]
        for tr in trainers:
            net = tr.model.eval()
            with torch.no_grad():
                pred = net(image_tensor(img, tr.data.mean, tr.data.std).to(tr.device))[0].argmax(0).cpu().numpy()
            tiles.append(colorize(pred, 2))
        sep = np.full((img.shape[0], 2, 3), 255, np.uint8)
        row: List[np.ndarray] = []
        for t in tiles:
            row += [t, sep]
        rows.append(np.concatenate(row[:-1], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    pic = np.concatenate(rows[:-1], axis=0)
    save_png(np.kron(pic, np.ones((zoom, zoom, 1), np.uint8)), path)


def _prerender(cfg: Any) -> float:
    """Render the demo's images once (both runs then read them from the shared cache); returns seconds."""
    from slaknet.segment.data import ContourSegmentation

    t = time.perf_counter()
    d = cfg.data
    print(f"rendering {d.train_samples} + {d.val_samples} built-in images ({d.input_size} px)...", flush=True)
    for split, n in (("train", d.train_samples), ("val", d.val_samples)):
        ds = ContourSegmentation(split, int(n), int(d.input_size), int(d.data_seed))
        for i in range(len(ds)):
            ds.raw(i)
    return time.perf_counter() - t


def run_demo(out_dir: str = "runs/seg-demo", epochs: Optional[int] = None, train_samples: Optional[int] = None,
             threads: Optional[str] = None) -> int:
    """Train both networks, print the table, write ``results.json`` and ``predictions.png`` to ``out_dir``."""
    from slaknet.train.trainer import Trainer

    os.makedirs(out_dir, exist_ok=True)
    load0 = os.getloadavg()
    rows: List[Dict[str, Any]] = []
    trainers = []
    t_all = time.perf_counter()
    render = _prerender(_config(DEMO_MODELS[0], out_dir, epochs, train_samples, threads))
    for model in DEMO_MODELS:
        cfg = _config(model, out_dir, epochs, train_samples, threads)
        print(f"\n=== {model} ===", flush=True)
        tr = Trainer(cfg)
        s = tr.fit()
        last = tr.history[-1] if tr.history else {}
        rows.append(dict(model=model, kernels=tr.plan.model.get("kernels"), params=s.get("params"),
                         macs=s.get("macs"), miou=last.get("val_miou"), best_miou=s.get("best_miou"),
                         pixel_acc=last.get("val_pixel_acc"), train_seconds=s.get("train_seconds"),
                         threads=s.get("torch_threads"), epochs=cfg.optim.epochs,
                         train_samples=cfg.data.train_samples, val_samples=cfg.data.val_samples,
                         input_size=cfg.data.input_size))
        trainers.append(tr)
    total = time.perf_counter() - t_all
    load1 = os.getloadavg()
    _predictions_picture(trainers, os.path.join(out_dir, "predictions.png"))
    lines = ["", "| encoder | kernels | params | MACs | val mIoU (final) | best | pixel acc | train time |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'/'.join(map(str, r['kernels'] or []))} | {r['params'] / 1e6:.2f}M | "
                     f"{r['macs'] / 1e6:.0f}M | {r['miou']:.2f} | {r['best_miou']:.2f} | {r['pixel_acc']:.2f}% | "
                     f"{r['train_seconds']:.0f}s |")
    r0 = rows[0]
    lines.append(f"\n{r0['train_samples']} training / {r0['val_samples']} validation images of {r0['input_size']} px, "
                 f"{r0['epochs']} epochs each, {r0['threads']} thread(s); total {total:.0f}s; load average "
                 f"{load0[0]:.2f} -> {load1[0]:.2f}")
    lines.append(f"rendering the {r0['train_samples'] + r0['val_samples']} images once (shared by both runs, not in "
                 f"the train times): {render:.0f}s")
    lines.append(f"pictures (image | truth | {' | '.join(DEMO_MODELS)}): {os.path.join(out_dir, 'predictions.png')}")
    print("\n".join(lines))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(rows=rows, total_seconds=total, render_seconds=render, loadavg_start=load0, loadavg_end=load1), f, indent=2)
    return 0
