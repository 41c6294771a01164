"""slaknet.detect: COCO AP against hand-computed values, the built-in data, SLaK + FPN detectors, the detection
task on the shared trainer (train -> checkpoint -> eval -> predict, exact resume, sparse), the COCO reader.
Tiny runs: slak_pico at 64 px, a few images, small RPN / ROI settings."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from slaknet.cli import main as cli_main
from slaknet.detect.data import ContourDetection, detection_collate, hflip, render_contours
from slaknet.detect.metrics import DetectionMeter
from slaknet.errors import CheckpointError, ConfigError

SMALL = dict(fpn_channels=16, rpn_batch=16, roi_batch=16, rpn_pre_nms_train=50, rpn_post_nms_train=20,
             rpn_pre_nms_test=50, rpn_post_nms_test=20, box_head_size=16, mask_channels=8, mask_layers=1,
             detections=10, max_size=64, anchor_sizes=[8, 16, 32, 64, 128])
TINY = ["--input-size", "64", "--train-samples", "8", "--val-samples", "4", "-b", "4", "--epochs", "1",
        "--threads", "1", "--progress", "false", "--tensorboard", "false", "--lr", "1e-3"]
for _k, _v in SMALL.items():  # detection options are ordinary typed flags
    TINY += ["--" + _k.replace("_", "-"), *map(str, _v if isinstance(_v, list) else [_v])]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _square_masks(boxes, size=20):
    m = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        m[i, y0:y1, x0:x1] = 1
    return m


# --------------------------------------------------------------------------------------------- metrics ----
def test_ap_perfect_half_and_ranked_false_positive():
    boxes = [(2, 2, 8, 8), (10, 10, 18, 18)]
    masks = _square_masks(boxes)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float), "labels": torch.tensor([1, 1]), "masks": masks}

    def ap(pred_idx, scores, extra=None):
        b = [boxes[i] for i in pred_idx] + ([extra] if extra else [])
        pm = _square_masks(b).float()[:, None]
        pred = {"boxes": torch.tensor(b, dtype=torch.float), "scores": torch.tensor(scores),
                "labels": torch.ones(len(b), dtype=torch.long), "masks": pm}
        meter = DetectionMeter(masks=True)
        meter.update([pred], [target])
        return meter.compute()

    perfect = ap([0, 1], [0.9, 0.8])
    assert perfect["map"] == pytest.approx(100.0) and perfect["mask_map"] == pytest.approx(100.0)
    # half the objects found, perfect boxes, nothing else: COCO's 101 recall points 0, .01, ..., .50 have
    # precision 1, the 50 above recall .5 have 0 -> 51 / 101 at every IoU threshold
    half = ap([0], [0.9])
    assert half["map"] == pytest.approx(100 * 51 / 101, abs=1e-3)
    assert half["map50"] == pytest.approx(100 * 51 / 101, abs=1e-3)
    assert half["mask_map"] == pytest.approx(100 * 51 / 101, abs=1e-3)
    # a false positive ranked first, then both objects: precision 0, 1/2, 2/3 at recall 0, .5, 1; the
    # interpolated precision (max to the right) is 2/3 at all 101 recall points -> AP 66.67
    ranked = ap([0, 1], [0.8, 0.7, 0.9], extra=(0, 12, 6, 19))  # the false positive scores 0.9
    assert ranked["map"] == pytest.approx(100 * 2 / 3, abs=1e-3)


# ------------------------------------------------------------------------------------------------ data ----
def test_contours_are_deterministic_and_decoys_are_not_objects():
    a, ma = render_contours(3, "train", 5, 64)
    b, mb = render_contours(3, "train", 5, 64)
    c, _ = render_contours(3, "val", 5, 64)
    assert np.array_equal(a, b) and len(ma) == len(mb) and not np.array_equal(a, c)
    ds = ContourDetection("train", 6, 64, seed=3)
    for i in range(6):
        x, t, bad, idx = ds[i]
        assert x.shape == (3, 64, 64) and bad == 0 and idx == -1
        img, masks = render_contours(3, "train", i, 64)
        bright = (img.max(-1) > 0.5)  # curve pixels (background ~0.1)
        covered = np.zeros_like(bright)
        for m in masks:
            covered |= m
        assert bright[~covered].sum() > 0  # decoy pixels exist outside every object mask
        for k, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            assert t["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert (t["labels"] == 1).all()


def test_hflip_and_collate():
    x = torch.zeros(3, 10, 20)
    t = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 4.0]]), "labels": torch.tensor([1]),
         "masks": torch.zeros(1, 10, 20, dtype=torch.uint8)}
    t["masks"][0, 1:4, 2:5] = 1
    xf, tf = hflip(x, t)
    assert tf["boxes"].tolist() == [[15.0, 1.0, 18.0, 4.0]]
    assert tf["masks"][0, 1:4, 15:18].all() and int(tf["masks"].sum()) == 9
    images, targets, bad, idx = detection_collate([(x, t, 0, -1), (x[:, :7], t, 1, 3)])
    assert [im.shape[-2] for im in images] == [10, 7] and len(targets) == 2
    assert bad.tolist() == [0, 1] and idx.tolist() == [-1, 3]


# ----------------------------------------------------------------------------------------------- model ----
def _opts(**kw):
    from slaknet.detect.spec import resolve_options

    return resolve_options(dict(SMALL, **kw), 64)


@pytest.mark.parametrize("kind", ["mask_rcnn", "faster_rcnn", "retinanet", "fcos"])
def test_detector_takes_any_input_size(kind):
    from slaknet.deploy.backbone import SLaKBackbone
    from slaknet.detect.model import build_detector

    torch.manual_seed(0)
    body = SLaKBackbone("slak_pico", norm_outputs=True, kernel_size=(7, 7, 7, 7))
    extra = dict(fpn_channels=32) if kind == "fcos" else {}  # FCOS's head: GroupNorm(32)
    model = build_detector(body, 1, _opts(detector=kind, score_thresh=0.0, **extra), (0.5,) * 3, (0.25,) * 3).eval()
    assert model.transform.size_divisible == 32
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70), torch.rand(3, 64, 64)])
    assert len(out) == 2
    for o, (h, w) in zip(out, [(50, 70), (64, 64)]):  # boxes in the original image's pixels
        b = o["boxes"]
        assert b.numel() == 0 or (b[:, 2].max() <= w + 1e-4 and b[:, 3].max() <= h + 1e-4)
        if kind == "mask_rcnn":
            assert o["masks"].shape[-2:] == (h, w)
    ds = ContourDetection("train", 2, 64)
    images, targets, _, _ = detection_collate([ds[0], ds[1]])
    losses = model.train()(images, targets)  # train mode: torchvision's loss dict
    assert losses and all(torch.isfinite(v) for v in losses.values())
    assert ("loss_mask" in losses) == (kind == "mask_rcnn")


def test_backbone_from_classification_checkpoint(tmp_path):
    import slaknet
    from slaknet.detect.model import backbone_from_config
    torch.manual_seed(1)
    clf = slaknet.create_model("slak_pico", num_classes=3, kernel_size=(9, 9, 7, 7))
    path = str(tmp_path / "clf.pth")
    torch.save({"model": clf.state_dict()}, path)
    body = backbone_from_config(slaknet.config("detection", model="slak_nano"), path)  # from the file, not --model
    own = body.state_dict()
    for k, v in clf.state_dict().items():
        if k.startswith(("stages.", "downsample_layers.")):
            assert torch.equal(own[k], v), k
    assert body.norm_outputs and "norm3.weight" in own and body.kernel_sizes == clf.kernel_sizes
    with pytest.raises(CheckpointError):
        backbone_from_config(slaknet.config("detection"), str(tmp_path / "missing.pth"))


# -------------------------------------------------------------------------------------- train / eval ----
def _run(argv, capsys):
    rc = cli_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_train_checkpoint_eval_predict(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, text, err = _run(["detect", "train", "-o", out] + TINY, capsys)
    assert rc == 0, err
    assert "mask_rcnn + FPN" in text and "val box AP" in text
    for f in ("checkpoint-best.pth", "checkpoint-last.pth", "model.safetensors", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, f)), f
    rec = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))][-1]
    assert {"val_map", "val_map50", "val_mask_map"} <= set(rec)
    for ck in ("checkpoint-best.pth", "model.safetensors"):
        rc, text, err = _run(["detect", "eval", "--checkpoint", os.path.join(out, ck), "--json", "--threads", "1"],
                             capsys)
        assert rc == 0, err
        res = json.loads(text)
        assert res["images"] == 4 and res["map"] == pytest.approx(rec["val_map"], abs=1e-6)
    img, _ = render_contours(0, "test", 0, 80)
    from PIL import Image

    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "x.png")
    rc, text, err = _run(["detect", "predict", str(tmp_path / "x.png"), "--checkpoint",
                          os.path.join(out, "checkpoint-best.pth"), "--output-dir", str(tmp_path / "pred"),
                          "--score-thresh", "0", "--threads", "1"], capsys)
    assert rc == 0, err
    preds = json.load(open(tmp_path / "pred" / "predictions.json"))
    assert preds[0]["image"].endswith("x.png") and len(preds[0]["boxes"]) == len(preds[0]["scores"])
    with Image.open(tmp_path / "pred" / "x.png") as im:
        assert im.size == (80, 80)
    # a checkpoint of another kind: one line, exit 2
    torch.save({"model": {"w": torch.zeros(1)}, "config": {"task": "classification"}}, tmp_path / "c.pth")
    rc, _, err = _run(["detect", "eval", "--checkpoint", str(tmp_path / "c.pth")], capsys)
    assert rc == 2 and "not a detection checkpoint" in err and len(err.strip().splitlines()) == 1


def test_resume_equals_uninterrupted_and_misfit_is_one_line(tmp_path, capsys):
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    two = TINY + ["--epochs", "2", "--seed", "3"]
    assert _run(["detect", "train", "-o", ref] + two, capsys)[0] == 0
    assert _run(["detect", "train", "-o", cut, "--max-steps", "3"] + two, capsys)[0] == 0  # stops mid-epoch 2
    rc, text, err = _run(["detect", "train", "--resume", os.path.join(cut, "checkpoint-last.pth")], capsys)
    assert rc == 0, err
    assert "continuing at epoch 2/2, batch 1/2 (step 3)" in text
    a = torch.load(os.path.join(ref, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(os.path.join(cut, "checkpoint-last.pth"), weights_only=True)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    la = [json.loads(x) for x in open(os.path.join(ref, "log.jsonl"))]
    lb = [json.loads(x) for x in open(os.path.join(cut, "log.jsonl"))]
    assert [r["val_map"] for r in la] == [r["val_map"] for r in lb]
    # resuming with a head of another width: the trainer's one-line "do not fit" error, exit 2
    rc, _, err = _run(["detect", "train", "--resume", os.path.join(cut, "checkpoint-last.pth"), "--epochs", "3",
                       "--fpn-channels", "8"], capsys)
    last = err.strip().splitlines()[-1]  # (after the resume notice of the overridden epochs)
    assert rc == 2 and last.startswith("slaknet detect: error: checkpoint weights do not fit this model")


def test_sparse_erk_keeps_heads_dense_and_snip_is_refused(tmp_path, capsys):
    out = str(tmp_path / "sp")
    # --sparse-layers given: ERK leaves the backbone's large kernels dense, which is refused by default
    rc, text, err = _run(["detect", "train", "-o", out, "--sparse", "--sparse-init", "ERK", "--sparsity", "0.5",
                          "--sparse-layers", "all", "--max-steps", "1"] + TINY, capsys)
    assert rc == 0, err
    sd = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)["model"]
    body = [v for k, v in sd.items() if k.startswith("backbone.body.stages.") and k.endswith("pwconv1.weight")]
    heads = [v for k, v in sd.items() if k.startswith(("rpn.", "roi_heads.")) and k.endswith("weight") and v.dim() > 1]
    zeros = sum(int((v == 0).sum()) for v in body) / sum(v.numel() for v in body)
    assert zeros > 0.2 and all(int((v == 0).sum()) == 0 for v in heads)
    rc, _, err = _run(["detect", "train", "-o", str(tmp_path / "snip"), "--sparse", "--sparse-init", "snip"] + TINY,
                      capsys)
    assert rc == 2 and "snip needs a classification batch" in err and len(err.strip().splitlines()) == 1


def test_bad_options_are_one_line(tmp_path, capsys):
    rc, _, err = _run(["detect", "train", "-o", str(tmp_path / "x")] + TINY + ["--anchor-sizes", "8", "16"], capsys)
    assert rc == 2 and "--anchor-sizes needs 5 values" in err and len(err.strip().splitlines()) == 1
    import slaknet
    from slaknet.detect.spec import resolve_options

    with pytest.raises(ConfigError, match="unknown option 'nonsense'"):
        slaknet.config("detection", nonsense=1)
    with pytest.raises(ConfigError, match="unknown option 'nonsense'"):
        resolve_options({"nonsense": 1}, 64)  # options stored in a checkpoint go through the same fields
    with pytest.raises(ConfigError, match="fcos needs --fpn-channels divisible by 32"):
        slaknet.config("detection", detector="fcos", fpn_channels=48)
    with pytest.raises(ConfigError, match="--detector must be one of"):
        slaknet.config("detection", detector="yolo")


# ------------------------------------------------------------------------------------------------ COCO ----
def _write_coco(root):
    from PIL import Image

    os.makedirs(root / "annotations")
    for split in ("train2017", "val2017"):
        os.makedirs(root / split)
        for i in range(3):
            arr = np.zeros((40, 60, 3), np.uint8)
            arr[5:25, 10:30] = 200
            Image.fromarray(arr).save(root / split / f"{i}.jpg")
        (root / split / "bad.jpg").write_bytes(b"not a jpeg")
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((20, 10), (40, 10)))))
        rle["counts"] = rle["counts"].decode()
        ann = {"images": [{"id": 7, "file_name": "0.jpg", "height": 40, "width": 60},
                          {"id": 3, "file_name": "1.jpg", "height": 40, "width": 60},
                          {"id": 9, "file_name": "2.jpg", "height": 40, "width": 60},   # no annotations
                          {"id": 5, "file_name": "bad.jpg", "height": 40, "width": 60}],
               # ids out of order: labels follow the sorted ids (cat 2 = "ring" -> 1, cat 4 = "disc" -> 2)
               "categories": [{"id": 4, "name": "disc"}, {"id": 2, "name": "ring"}],
               "annotations": [
                   {"id": 1, "image_id": 7, "category_id": 4, "bbox": [10, 5, 20, 20], "iscrowd": 0, "area": 400,
                    "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]},
                   {"id": 2, "image_id": 3, "category_id": 2, "bbox": [40, 20, 10, 10], "iscrowd": 0, "area": 100,
                    "segmentation": rle},
                   {"id": 3, "image_id": 3, "category_id": 4, "bbox": [0, 0, 8, 8], "iscrowd": 1, "area": 64,
                    "segmentation": {"size": [40, 60], "counts": [0, 8] + [32, 8] * 7 + [2400 - 288]}},
                   {"id": 4, "image_id": 7, "category_id": 2, "bbox": [1, 1, 0.5, 3], "iscrowd": 0, "area": 1,
                    "segmentation": [[1, 1, 1.5, 1, 1.5, 4]]}]}  # degenerate: dropped
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(ann, f)


def test_coco_reader(tmp_path):
    from slaknet.detect.coco import coco_splits

    _write_coco(tmp_path)
    train, val = coco_splits(str(tmp_path))
    assert train.classes == ["ring", "disc"] and len(train) == 4
    by_id = {i: k for k, i in enumerate(train.ids)}  # sorted image ids 3, 5, 7, 9
    x, t, bad, first = train[by_id[7]]
    assert x.shape == (3, 40, 60) and bad == 0
    assert t["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]] and t["labels"].tolist() == [2]
    assert abs(int(t["masks"][0].sum()) - 400) <= 45  # polygon rasterised (pycocotools' edge convention)
    _, t, _, _ = train[by_id[3]]  # RLE mask; the crowd region is not a training target
    assert t["labels"].tolist() == [1] and int(t["masks"][0].sum()) == 100 and t["iscrowd"].tolist() == [0]
    _, tv, _, _ = val[by_id[3]]  # ... but is kept (iscrowd=1) for the metric
    assert tv["iscrowd"].tolist() == [0, 1] and int(tv["masks"][1].sum()) == 64
    _, t, _, _ = train[by_id[9]]
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 40, 60)
    x, t, bad, first = train[by_id[5]]  # unreadable: the next image instead, counted
    assert bad == 1 and first == by_id[5] and train.bad_files == [str(tmp_path / "train2017" / "bad.jpg")]
    assert torch.equal(x, train[by_id[7]][0])


def test_train_on_coco_folder_keeps_class_names(tmp_path, capsys):
    _write_coco(tmp_path / "coco")
    out = str(tmp_path / "run")
    rc, text, err = _run(["detect", "train", "--data", str(tmp_path / "coco"), "-o", out, "--max-steps", "1",
                          "--train-sizes", "48", "64", "--model", "slak_pico", "--num-workers", "0"]
                         + TINY[6:] + ["--input-size", "64"], capsys)
    assert rc == 0, err
    assert "multi-scale shorter side 48-64" in text
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["classes"] == ["ring", "disc"] and ck["bad_images"] == 1


def test_recipes_and_yaml_options(tmp_path):
    from slaknet.train.config import config_from_argv

    def cfg_of(argv):
        return config_from_argv(argv, "detection")

    demo = cfg_of([])
    assert demo.recipe == "det_demo" and demo.task_name == "detection" and demo["data"] == "builtin:contours"
    (tmp_path / "coco").mkdir()
    coco = cfg_of(["--data", str(tmp_path / "coco")])
    assert coco.recipe == "coco" and coco.optim.lr == 1e-4 and coco.optim.weight_decay == 0.05
    assert coco.optim.epochs == 36 and coco.optim.opt == "adamw" and coco.task.multi_scale == 0.6
    from slaknet.detect.spec import resolve_options

    sizes = resolve_options(coco.task, coco.data.input_size)  # 480-800 step 32, test 800, longer side <= 1333
    assert sizes["train_sizes"] == list(range(480, 801, 32)) and sizes["test_size"] == 800
    assert sizes["max_size"] == 1333
    (tmp_path / "c.yaml").write_text("epochs: 2\ntask:\n  fpn_channels: 16\n  mask_layers: 1\n")
    cfg = cfg_of(["--config", str(tmp_path / "c.yaml"), "--mask-layers", "3", "--detector", "retinanet"])
    assert cfg.optim.epochs == 2 and cfg.task.fpn_channels == 16 and cfg.task.mask_layers == 3
    assert cfg.task.detector == "retinanet"
    with pytest.raises(SystemExit):  # only the detection recipes are choices of `slaknet detect train`
        cfg_of(["--recipe", "imagenet"])


def test_train_from_classification_checkpoint_then_eval(tmp_path, capsys):
    import slaknet

    torch.manual_seed(2)
    clf = slaknet.create_model("slak_pico", num_classes=5, kernel_size=(9, 9, 7, 7))
    torch.save({"model": clf.state_dict()}, tmp_path / "clf.pth")
    out = str(tmp_path / "run")
    argv = ["detect", "train", "-o", out, "--backbone-checkpoint", str(tmp_path / "clf.pth"), "--max-steps", "1"]
    rc, text, err = _run(argv + TINY + ["--lr", "0"], capsys)  # lr 0: the backbone keeps the file's weights
    assert rc == 0, err
    assert "kernels 9 9 7 7" in text
    sd = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)["model"]
    for k, v in clf.state_dict().items():
        if k.startswith(("stages.", "downsample_layers.")) and not k.endswith("num_batches_tracked") \
                and "running_" not in k:
            assert torch.equal(sd["backbone.body." + k], v), k
    rc, text, err = _run(["detect", "eval", "--checkpoint", os.path.join(out, "model.safetensors")], capsys)
    assert rc == 0 and "box AP" in text, err


_DETECT_CONFIG = """
from slaknet.train.config import config_from_argv
cfg = config_from_argv(argv, "detection")
"""


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, capsys, monkeypatch):
    import signal

    from conftest import run_killed_at_step

    # the reference runs here, the killed run in a child: pin the 1x1 GEMM so that both use the same one
    monkeypatch.setenv("SLAKNET_LINEAR", "onednn")
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    args = TINY + ["--epochs", "3", "--seed", "4", "--ckpt-every-steps", "1"]
    assert _run(["detect", "train", "-o", ref] + args, capsys)[0] == 0
    proc = run_killed_at_step(_DETECT_CONFIG, [*args, "-o", cut], step=3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ck = os.path.join(cut, "checkpoint-last.pth")
    mid = torch.load(ck, weights_only=True)
    assert mid["step"] == 3 and mid["epoch"] == 1 and mid["batch_in_epoch"] == 1  # mid-epoch 2 of 3
    assert _run(["detect", "train", "--resume", ck], capsys)[0] == 0
    a = torch.load(os.path.join(ref, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(ck, weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [h["val_map"] for h in a["history"]] == [h["val_map"] for h in b["history"]]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    from conftest import run_torchrun

    out = str(tmp_path / "ddp")
    proc = run_torchrun(["detect", "train", *TINY, "--model", "slak_pico", "-o", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert len(rec) == 1 and rec[0]["step"] == 1  # 8 images / (4 x 2 processes), rank 0 logs
    assert 0.0 <= rec[0]["val_map"] <= 100.0
    assert torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)["config"]["world_size"] == 2


def test_missing_optional_packages_fail_before_training_in_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchmetrics.detection", None)
    out = str(tmp_path / "run")
    assert cli_main(["detect", "train", *TINY, "-o", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "pip install '.[dense]' in the slaknet clone" in err[-1] and err[-1].startswith("slaknet detect: error:")
    assert not os.path.exists(out)
