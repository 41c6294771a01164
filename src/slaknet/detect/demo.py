"""``slaknet detect`` without arguments: SLaK vs its 7x7 twin on "closed contours among open decoys".

Both models are Mask R-CNN with the same FPN and heads, trained by the shared Trainer with the same
recipe (``det_demo``), data, steps and seed; only the backbone's depthwise kernels differ (``slak_pico``:
31/29/27/13 with a 5x5 branch, capped to the 96 px feature maps; ``slak_pico_k7``: 7x7, same depth and
width). Prints box / mask AP and wall time per model and writes a picture (image, ground truth, SLaK,
7x7) of a few held-out images.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

import torch

__all__ = ["run_demo", "demo_config"]

MODELS = (("SLaK (slak_pico, large kernels)", "slak_pico"), ("7x7 twin (slak_pico_k7)", "slak_pico_k7"))


def demo_config(model: str, out: str, epochs: Optional[int] = None, train_samples: Optional[int] = None,
                threads: Optional[str] = None) -> Any:
    """The ``det_demo`` configuration of one demo model (fresh run folder ``out``)."""
    import slaknet

    given = {k: v for k, v in dict(epochs=epochs, train_samples=train_samples, threads=threads).items() if v}
    return slaknet.config("detection", recipe="det_demo", model=model, output_dir=out, overwrite=True,
                          tensorboard=False, **given)


def _picture(runs: List[Dict[str, Any]], path: str, n: int = 4) -> None:
    from torchvision.utils import make_grid

    from slaknet.detect.data import ContourDetection
    from slaknet.detect.inference import LoadedDetector, draw_detections, predict_images, save_png

    ds = ContourDetection("val", n, runs[0]["cfg"].data.input_size, runs[0]["cfg"].data.data_seed)
    tiles = []
    for i in range(n):
        x, t = ds.item(i)
        gt = {"boxes": t["boxes"].tolist(), "scores": [1.0] * len(t["boxes"]), "names": ["gt"] * len(t["boxes"]),
              "_masks": t["masks"].bool()}
        row = [(x.clamp(0, 1) * 255).to(torch.uint8), draw_detections(x, gt, "lime", labels=False)]
        for r in runs:
            det = LoadedDetector(r["model"].eval(), ["closed contour"], r["opts"])
            row.append(draw_detections(x, predict_images(det, [x], 0.5)[0], "red", labels=False))  # 96 px tiles
        tiles += row
    grid = make_grid(torch.stack(tiles), nrow=2 + len(runs), padding=2, pad_value=255)
    save_png(grid, path)


def run_demo(out_root: str = "runs/detect-demo", epochs: Optional[int] = None, train_samples: Optional[int] = None,
             threads: Optional[str] = None) -> int:
    """Train both models, print the comparison table and write ``OUT/predictions.png``."""
    from slaknet.detect.report import APLines
    from slaknet.train.trainer import Trainer

    print("slaknet detect demo: Mask R-CNN on 'closed contours among open decoys' (96 px); a decoy is a curve "
          "with gaps, locally identical to an object: telling them apart needs the whole curve.", flush=True)
    runs: List[Dict[str, Any]] = []
    for label, model in MODELS:
        cfg = demo_config(model, os.path.join(out_root, model), epochs, train_samples, threads)
        print(f"\n== {label}", flush=True)
        t0 = time.perf_counter()
        tr = Trainer(cfg, callbacks=[APLines()])
        tr.fit()
        wall = time.perf_counter() - t0
        final = tr.history[-1] if tr.history else {}
        runs.append(dict(label=label, cfg=cfg, model=tr.model, opts=tr.task.opts, wall=wall,
                         map=final.get("val_map", float("nan")), map50=final.get("val_map50", float("nan")),
                         mask_map=final.get("val_mask_map", float("nan")), steps=tr.state.step,
                         params=sum(p.numel() for p in tr.model.parameters())))
    print("\nheld-out images: COCO AP@[.50:.95] (percent), same data / steps / seed for both")
    print(f"{'model':36s} {'box AP':>7s} {'AP50':>6s} {'mask AP':>8s} {'params':>8s} {'steps':>6s} {'wall':>7s}")
    for r in runs:
        print(f"{r['label']:36s} {r['map']:7.1f} {r['map50']:6.1f} {r['mask_map']:8.1f} {r['params'] / 1e6:7.2f}M "
              f"{r['steps']:6d} {r['wall']:6.0f}s")
    print("one seed, 100 held-out images: differences of a few AP points are within seed noise here. At 96 px the "
          "7x7 twin's receptive field already spans the image by stage 3 and Mask R-CNN's RoI head sees each "
          "candidate curve whole, so this demo shows the pipeline working, not the paper's COCO gain.")
    pic = os.path.join(out_root, "predictions.png")
    _picture(runs, pic)
    try:
        load = os.getloadavg()
        load_text = f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    except OSError:
        load_text = ""
    print(f"picture: {pic} (columns: image, ground truth, " + ", ".join(r["label"].split(" (")[0] for r in runs)
          + f"); {load_text}")
    return 0
