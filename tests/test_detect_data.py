"""slaknet.detect on the user's own COCO files: data named by file, --recipe auto / --detector auto read the
annotations, one input-size knob, bad labels found before training, labelled prediction pictures, summary.json.
The data are written by the tests (a boxes-only COCO JSON with out-of-image and degenerate boxes, files outside
the annotations/ layout); runs are tiny (slak_pico, a few 40 x 60 images, small heads)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from slaknet.cli import main as cli_main
from slaknet.errors import ConfigError

# small heads as tests/test_detect.py's SMALL, without max_size (it follows the input size here)
HEADS = dict(fpn_channels=16, rpn_batch=16, roi_batch=16, rpn_pre_nms_train=50, rpn_post_nms_train=20,
             rpn_pre_nms_test=50, rpn_post_nms_test=20, box_head_size=16, mask_channels=8, mask_layers=1,
             detections=10)
QUIET = ["--threads", "1", "--progress", "false", "--tensorboard", "false", "--num-workers", "0"]
for _k, _v in HEADS.items():
    QUIET += ["--" + _k.replace("_", "-"), str(_v)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _run(argv, capsys):
    rc = cli_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _images(folder, names, h=40, w=60):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[5 + i % 3:25, 10:30] = 200
        arr[20:35, 35 + i % 5:55] = 120
        Image.fromarray(arr).save(os.path.join(folder, name))


def _boxes_only(path, names, unknown_category=False, bad_boxes=True, masks=False):
    """A COCO JSON with boxes only (no segmentation) for ``names`` (40 x 60 images): categories 1 "cat", 3 "dog";
    with ``bad_boxes`` one box partly outside its image (clipped) and two degenerate ones (one wholly outside,
    one of zero width); ``unknown_category``: one annotation of category 99."""
    images = [{"id": i + 1, "file_name": n, "height": 40, "width": 60} for i, n in enumerate(names)]
    anns = []
    for im in images:
        anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": 1, "bbox": [10, 6, 20, 19],
                     "iscrowd": 0, "area": 380})
        anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": 3, "bbox": [36, 20, 19, 15],
                     "iscrowd": 0, "area": 285})
    if masks:
        for a in anns:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    if bad_boxes:
        anns += [{"id": 900, "image_id": 1, "category_id": 3, "bbox": [50, 30, 20, 20], "iscrowd": 0, "area": 400},
                 {"id": 901, "image_id": 2, "category_id": 1, "bbox": [70, 10, 10, 10], "iscrowd": 0, "area": 100},
                 {"id": 902, "image_id": 2, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0, "area": 0}]
    if unknown_category:
        anns.append({"id": 903, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0, "area": 25})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def _own_files(root, **kw):
    """Annotation files and image folders outside the annotations/ layout: labels/{train,val}.json, pics/."""
    train = [f"t{i}.png" for i in range(6)]
    val = [f"v{i}.png" for i in range(3)]
    _images(root / "pics", train + val)
    flags = ["--train-annotations", _boxes_only(root / "labels" / "train.json", train, **kw),
             "--train-images", str(root / "pics"),
             "--val-annotations", _boxes_only(root / "labels" / "val.json", val, **kw), "--val-images", str(root / "pics")]
    return flags


def _label_text(arr):
    """Pixels of white text on a red tag (anti-aliased: (255, v, v), v >= 128): no image here has them."""
    r, g, b = (arr[..., i].astype(int) for i in range(3))
    return (r == 255) & (g == b) & (g >= 128)


# ------------------------------------------------------------------------------------------------ reader ----
def test_boxes_only_reader_clips_and_drops_bad_boxes(tmp_path):
    from slaknet.detect.coco import CocoDetection

    ann = _boxes_only(tmp_path / "a" / "train.json", ["t0.png", "t1.png"])
    _images(tmp_path / "imgs", ["t0.png", "t1.png"])
    ds = CocoDetection(ann, str(tmp_path / "imgs"), train=True)
    assert ds.classes == ["cat", "dog"] and not ds.has_masks
    assert (ds.clipped, ds.degenerate) == (1, 2)
    assert "1 box clipped to the image" in ds.fixes() and "2 degenerate boxes" in ds.fixes()
    x, t, bad, _ = ds[0]
    assert x.shape == (3, 40, 60) and bad == 0 and "masks" not in t  # boxes only: no empty masks made up
    assert t["boxes"].tolist() == [[10, 6, 30, 25], [36, 20, 55, 35], [50, 30, 60, 40]]  # the last one clipped
    assert t["labels"].tolist() == [1, 2, 2]
    _, t, _, _ = ds[1]
    assert t["boxes"].shape == (2, 4)  # the wholly outside and the zero-width boxes are gone


def test_unknown_category_is_one_line_before_training(tmp_path, capsys):
    root = tmp_path / "coco"  # the annotations/instances_* layout still works, and is checked the same way
    _images(root / "train2017", ["a.png", "b.png"])
    _images(root / "val2017", ["c.png"])
    _boxes_only(root / "annotations" / "instances_train2017.json", ["a.png", "b.png"], unknown_category=True)
    _boxes_only(root / "annotations" / "instances_val2017.json", ["c.png"])
    out = tmp_path / "run"
    rc, _, err = _run(["detect", "train", "--data", str(root), "-o", str(out), "--max-steps", "1"] + QUIET, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "instances_train2017.json" in lines[0] and "category_id 99" in lines[0] and "ids: 1, 3" in lines[0]
    assert not out.exists()  # found before anything was written


# ------------------------------------------------------------------------------ configuration and recipes ----
def test_recipe_auto_reads_the_annotations(tmp_path):
    import slaknet
    from slaknet.train.config import config_from_argv

    flags = _own_files(tmp_path)
    cfg = config_from_argv(flags, "detection")
    assert cfg.recipe == "det_small" and cfg["data"] == flags[1]  # the data are the training file
    assert cfg.data.input_size == 64 and cfg.optim.batch_size == 2 and cfg.optim.epochs == 100  # from 6 x 40 px
    assert cfg.task.detector == "auto" and cfg.task.fpn_channels == 64
    # a bigger data set of big images: the paper's recipe
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg", "height": 800, "width": 1200}
                                          for i in range(20)], "annotations": [], "categories": []}))
    cfg = slaknet.config("detection", train_annotations=str(big), train_images=str(tmp_path),
                         val_annotations=str(big), val_images=str(tmp_path))
    assert cfg.recipe == "coco" and cfg.data.input_size == 800


def test_input_size_sets_train_test_and_max_size():
    import slaknet
    from slaknet.detect.task import DetectionTask

    opts = DetectionTask(slaknet.config("detection", recipe="det_demo", input_size=128)).opts
    assert opts["train_sizes"] == [128] and opts["test_size"] == 128 and opts["max_size"] == 213  # 1333/800
    opts = DetectionTask(slaknet.config("detection", input_size=128, max_size=150, test_size=96)).opts
    assert opts["max_size"] == 150 and opts["test_size"] == 96 and opts["train_sizes"] == [128]  # explicit wins
    opts = DetectionTask(slaknet.config("detection", recipe="coco", input_size=640)).opts
    assert opts["train_sizes"] == list(range(384, 641, 32)) and opts["max_size"] == 1066  # coco: 0.6-1 x input


@pytest.mark.parametrize("extra, message", [
    (["--train-annotations", "x.json"], "--train-annotations FILE and --train-images DIR go together"),
    (["--train-annotations", "x.json", "--train-images", "d"], "needs the held-out split too"),
    (["--data", "root", "--train-annotations", "x.json", "--train-images", "d", "--val-annotations", "y.json",
      "--val-images", "d"], "both name the training data"),
    (["--recipe", "det_demo", "--train-annotations", "x.json", "--train-images", "d", "--val-annotations", "y.json",
      "--val-images", "d"], "but the data is builtin:contours"),
])
def test_file_options_errors_are_one_line(tmp_path, capsys, extra, message):
    rc, _, err = _run(["detect", "train", "-o", str(tmp_path / "x")] + extra, capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_mask_rcnn_without_masks_is_one_line(tmp_path, capsys):
    flags = _own_files(tmp_path)
    rc, _, err = _run(["detect", "train", "-o", str(tmp_path / "run"), "--detector", "mask_rcnn", "--max-steps",
                       "1"] + flags + QUIET, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "--detector mask_rcnn needs instance masks" in lines[0] and "train.json" in lines[0]


# -------------------------------------------------------------------------------------------- a whole run ----
def test_own_files_boxes_only_train_eval_predict(tmp_path, capsys):
    flags = _own_files(tmp_path)
    out = tmp_path / "run"
    rc, text, err = _run(["detect", "train", "-o", str(out), "--epochs", "1"] + flags + QUIET, capsys)
    assert rc == 0, err
    # the header: what --recipe auto and --detector auto chose and why, the effective sizes, the label fixes
    assert "recipe det_small: input 64 px" in text
    assert "det_small sized from 6 training images of ~40 px" in text
    assert "faster_rcnn + FPN (auto: boxes only), shorter side 64, test 64, max 107 px" in text
    assert "train: 1 box clipped to the image, 2 degenerate boxes (<= 1 px) dropped" in text
    assert "classes (cat, dog), boxes only" in text and "mask AP" not in text
    summary = json.load(open(out / "summary.json"))
    assert summary["num_classes"] == 2 and summary["classes"] == ["cat", "dog"]
    assert summary["detector"] == "faster_rcnn" and 0.0 <= summary["best_box_ap"] <= 100.0
    assert summary["clipped_boxes"] == {"train": 1, "val": 1} and summary["degenerate_boxes"] == {"train": 2, "val": 2}
    ck = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert ck["classes"] == ["cat", "dog"]
    assert not any(k.startswith("roi_heads.mask") for k in ck["model"])  # a box detector
    # eval on the held-out files the run recorded, and on files named here
    for extra in ([], ["--val-annotations", flags[5], "--val-images", flags[7]]):
        rc, text, err = _run(["detect", "eval", "--checkpoint", str(out / "checkpoint-best.pth"), "--json",
                              "--threads", "1"] + extra, capsys)
        assert rc == 0, err
        res = json.loads(text)
        assert res["images"] == 3 and res["detector"] == "faster_rcnn" and "mask_map" not in res
        assert res["map"] == pytest.approx(summary["best_box_ap"], abs=1e-6)
    # predictions: class names and scores in the JSON and drawn on the picture
    rc, text, err = _run(["detect", "predict", str(tmp_path / "pics" / "v0.png"), "--checkpoint",
                          str(out / "model.safetensors"), "-o", str(tmp_path / "pred"), "--score-thresh", "0",
                          "--threads", "1"], capsys)
    assert rc == 0, err
    pred = json.load(open(tmp_path / "pred" / "predictions.json"))[0]
    assert pred["boxes"] and set(pred["names"]) <= {"cat", "dog"}
    from PIL import Image

    with Image.open(tmp_path / "pred" / "v0.png") as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape == (40, 60, 3) and _label_text(arr).sum() > 10  # names and scores drawn


def test_masks_in_the_files_give_mask_rcnn(tmp_path):
    import slaknet
    from slaknet.detect.task import DetectionTask

    flags = _own_files(tmp_path, masks=True, bad_boxes=False)
    cfg = slaknet.config("detection", **{flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, 8, 2)})
    task = DetectionTask(cfg)
    data = task.build_data(None)
    assert data.train.has_masks and task.opts["detector"] == "mask_rcnn"
    assert "masks" in data.train[0][1]


# ---------------------------------------------------------------------------------------------- drawing ----
def test_prediction_pictures_carry_names_and_scores():
    from slaknet.detect.inference import draw_detections

    img = torch.zeros(3, 48, 64)
    rec = {"boxes": [[4.0, 4.0, 60.0, 44.0]], "scores": [0.87], "names": ["dog"]}
    drawn = draw_detections(img, rec)
    plain = draw_detections(img, rec, labels=False)
    assert drawn.shape == (3, 48, 64) and drawn.dtype == torch.uint8
    text = (drawn != plain).any(0)
    assert text[4:20, 4:50].sum() > 20  # the label "dog 0.87" at the box's top-left corner
    assert _label_text(drawn.permute(1, 2, 0).numpy()).sum() > 10


def test_masks_in_training_only_score_the_held_out_split_on_boxes(tmp_path, capsys):
    flags = _own_files(tmp_path, masks=True, bad_boxes=False)
    _boxes_only(tmp_path / "labels" / "val.json", [f"v{i}.png" for i in range(3)], bad_boxes=False)  # no masks
    out = tmp_path / "run"
    rc, text, err = _run(["detect", "train", "-o", str(out), "--epochs", "1"] + flags + QUIET, capsys)
    assert rc == 0, err
    assert "mask_rcnn + FPN (auto: the data have masks)" in text and "mask AP" not in text
    rec = [json.loads(x) for x in open(out / "log.jsonl")][-1]
    assert "val_map" in rec and "val_mask_map" not in rec
