"""Semantic segmentation (slaknet segment, issue 14): metrics against hand-computed cases, the network on any
input size, train -> checkpoint -> eval -> predict, exact resume, checkpoint errors, folder readers, the
layer-wise lr decay rule parameter by parameter, the poly schedule and the sliding window. Tiny runs:
slak_pico at 32 px, 32 images, a 16-channel decoder."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from slaknet.cli import main as cli_main
from slaknet.errors import CheckpointError, ConfigError
from slaknet.segment.data import (ContourSegmentation, PairedTransform, SegmentationFolder, find_pairs,
                                  render_contours)
from slaknet.segment.metrics import confusion_matrix, scores

TINY = ["--train-samples", "32", "--val-samples", "8", "--input-size", "32", "-b", "8", "--epochs", "2",
        "--progress", "false", "--tensorboard", "false", "--threads", "1", "--decoder-channels", "16",
        "--aux-channels", "8"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _log(out):
    return [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]


def _tiny_net(kernels=(7, 7, 7, 7), classes=2, aux=0.4):
    from slaknet.segment.model import build_segmentation_model

    torch.manual_seed(0)
    return build_segmentation_model("slak_pico", classes, "upernet", 16, aux, 8,
                                    dict(kernel_size=kernels, small_kernel=5)).eval()


# ---------------------------------------------------------------------------------------------- metrics ----
def test_miou_perfect_and_half_right_by_hand():
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    s = scores(confusion_matrix(gt.clamp(max=1), gt, 3))
    assert s["miou"] == pytest.approx(100.0) and s["pixel_acc"] == pytest.approx(100.0)
    assert np.isnan(s["iou"][2])  # class 2 is in neither: left out of the mean
    # half right: row 0 of gt [0 0 1 1] predicted [0 1 1 0] -> class 0: tp 1, fp 1, fn 1 -> IoU 1/3; same class 1
    pred = torch.tensor([[0, 1, 1, 0]])
    s = scores(confusion_matrix(pred, gt[:1], 2))
    assert s["iou"] == pytest.approx([100 / 3, 100 / 3]) and s["miou"] == pytest.approx(100 / 3)
    assert s["pixel_acc"] == pytest.approx(50.0)
    # the ignored pixel (255) never counts, whatever is predicted there
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 255]), 2)
    assert cm.tolist() == [[1, 0], [0, 1]]


# ------------------------------------------------------------------------------------------------ model ----
def test_any_input_size_equals_padding_by_hand():
    net = _tiny_net()
    x = torch.randn(1, 3, 50, 70)
    out, aux = net(x, with_aux=True)
    assert out.shape == (1, 2, 50, 70) and aux.shape == (1, 2, 50, 70)
    ref = net(F.pad(x, (0, 26, 0, 14)))[..., :50, :70]  # padded to 64 x 96 by hand, cropped back
    torch.testing.assert_close(net(x), ref)
    assert torch.equal(out, net(x))


def test_backbone_from_a_classification_checkpoint(tmp_path):
    import slaknet
    from slaknet.segment.model import load_backbone

    cls = slaknet.create_model("slak_pico", num_classes=5, kernel_size=(7, 7, 7, 7), small_kernel=5)
    path = str(tmp_path / "cls.pth")
    torch.save(cls.state_dict(), path)
    net = _tiny_net()
    load_backbone(net, path)
    for k, v in cls.state_dict().items():
        if not k.startswith(("head.", "norm.")):
            assert torch.equal(net.backbone.state_dict()[k], v), k
    other = _tiny_net(kernels=(9, 9, 9, 9))  # other kernel sizes: the large-kernel weights differ in shape
    with pytest.raises(CheckpointError, match="does not fit the encoder .*shape of"):
        load_backbone(other, path)


# ------------------------------------------------------------------------------------ train/eval/predict ----
def test_train_checkpoint_eval_predict(tmp_path, capsys):
    out, pred_dir = str(tmp_path / "run"), str(tmp_path / "pred")
    assert cli_main(["segment", "train", *TINY, "-o", out]) == 0
    text = capsys.readouterr().out
    assert "val miou" in text and "best val miou" in text
    log = _log(out)
    assert {"val_miou", "val_pixel_acc", "val_loss"} <= set(log[-1])
    best = max(r["val_miou"] for r in log)
    assert cli_main(["segment", "eval", "--checkpoint", os.path.join(out, "checkpoint-best.pth"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["miou"] == pytest.approx(best, abs=1e-6) and res["images"] == 8
    assert cli_main(["segment", "eval", "--checkpoint", os.path.join(out, "model.safetensors"), "--json",
                     "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(log[-1]["val_miou"], abs=1e-6)
    assert cli_main(["segment", "predict", "--checkpoint", os.path.join(out, "model.safetensors"),
                     "--data", "builtin:contours", "--count", "2", "--output-dir", pred_dir, "--threads", "1"]) == 0
    names = sorted(os.listdir(pred_dir))
    assert names == ["val_00000_labels.png", "val_00000_mask.png", "val_00000_side.png",
                     "val_00001_labels.png", "val_00001_mask.png", "val_00001_side.png"]
    side = np.asarray(Image.open(os.path.join(pred_dir, "val_00000_side.png")))
    assert side.shape == (32, 3 * 32 + 2 * 4, 3)  # image | truth | prediction with 4 px gaps
    labels = np.asarray(Image.open(os.path.join(pred_dir, "val_00000_labels.png")))
    mask = np.asarray(Image.open(os.path.join(pred_dir, "val_00000_mask.png")))
    from slaknet.segment.infer import palette

    assert labels.shape == (32, 32) and set(np.unique(labels)) <= {0, 1}
    assert np.array_equal(mask, palette(2)[labels])


def test_resume_equals_uninterrupted(tmp_path, capsys):
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert cli_main(["segment", "train", *TINY, "-o", ref]) == 0
    assert cli_main(["segment", "train", *TINY, "-o", cut, "--max-steps", "3"]) == 0  # mid epoch 1 (4 steps)
    assert cli_main(["segment", "train", "--resume", os.path.join(cut, "checkpoint-last.pth")]) == 0
    assert "continuing at epoch 1/2, batch 3/4" in capsys.readouterr().out
    a, b = _log(ref), _log(cut)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_miou"] for r in a] == [r["val_miou"] for r in b]
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_that_do_not_fit_give_one_line_errors(tmp_path, capsys):
    import slaknet

    cls = str(tmp_path / "cls.pth")
    torch.save(slaknet.create_model("slak_pico", num_classes=2).state_dict(), cls)
    assert cli_main(["segment", "eval", "--checkpoint", cls]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a slaknet segmentation checkpoint" in err
    out = str(tmp_path / "run")
    assert cli_main(["segment", "train", *TINY, "-o", out, "--max-steps", "1"]) == 0
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    ck["config"]["seg_model"]["decoder_channels"] = 24  # the record no longer matches the weights
    bad = str(tmp_path / "bad.pth")
    torch.save(ck, bad)
    capsys.readouterr()
    assert cli_main(["segment", "eval", "--checkpoint", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint weights do not fit this model" in err
    assert cli_main(["segment", "train", *TINY, "-o", str(tmp_path / "r2"), "--model", "slak_pico_k7",
                     "--pretrained", cls]) == 2
    assert "does not fit the encoder" in capsys.readouterr().err


def test_unknown_task_option_is_one_line(capsys):
    import slaknet

    with pytest.raises(ConfigError, match="unknown option 'decoder_chanels'"):
        slaknet.config("segmentation", decoder_chanels=3)
    with pytest.raises(ConfigError, match="--schedule must be one of poly, cosine"):
        slaknet.config("segmentation", schedule="step")
    with pytest.raises(SystemExit) as exc:
        cli_main(["segment", "train", "--decoder-chanels", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --decoder-chanels" in err


# -------------------------------------------------------------------------------------------------- data ----
def test_builtin_data_is_deterministic_and_labelled():
    a, b = render_contours(0, "train", 3, 48), render_contours(0, "train", 3, 48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], render_contours(0, "val", 3, 48)[0])
    labs = [render_contours(0, "train", i, 48)[1] for i in range(12)]
    assert all(set(np.unique(lab)) <= {0, 1, 255} for lab in labs)
    assert sum((lab == 1).any() for lab in labs) >= 6  # most images have an enclosed region
    ds = ContourSegmentation("val", 4, 48)
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.long


def _write_pair(img_path, mask_path, mask, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(img_path), exist_ok=True)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, mask.shape + (3,), dtype=np.uint8)).save(img_path)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def _object_info(root, n=150):
    """ADE20K's objectInfo150.txt: a header, then Idx Ratio Train Val Name (tab-separated)."""
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.01\t10\t1\tname{i};alias" for i in range(1, n + 1)]
    with open(os.path.join(root, "objectInfo150.txt"), "w") as f:
        f.write("\n".join(rows) + "\n")


def test_ade20k_layout_reduces_zero_label_and_leaves_corrupt_files_out(tmp_path):
    root = str(tmp_path / "ADEChallengeData2016")
    mask = np.array([[0, 1, 2, 3], [150, 0, 1, 1]] * 4, np.uint8)  # 8 x 4
    for split, names in (("training", ["a", "b", "c"]), ("validation", ["v"])):
        for i, n in enumerate(names):
            _write_pair(f"{root}/images/{split}/{n}.jpg", f"{root}/annotations/{split}/{n}.png", mask, i)
    _object_info(root)
    with open(f"{root}/images/training/b.jpg", "wb") as f:
        f.write(b"not a jpeg")
    tf = PairedTransform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.warns(UserWarning, match="skipping unreadable pair"):
        ds = SegmentationFolder(root, "train", tf, report_bad=True)  # b.jpg is left out by the scan
    assert ds.layout == "ade20k" and ds.reduce_zero_label and len(ds) == 2 and len(ds.classes) == 150
    assert ds.classes[:2] == ["name1", "name2"] and ds.labels.source == "objectInfo150.txt"
    assert [(b.path, b.kind) for b in ds.left_out] == [(f"{root}/images/training/b.jpg", "unreadable")]
    x, y, bad, first = ds[0]
    expect = np.array([[255, 0, 1, 2], [149, 255, 0, 0]] * 4)  # 0 -> ignored, others minus one
    assert y.tolist() == expect.tolist() and (bad, first) == (0, -1) and x.shape == (3, 8, 4)
    val = SegmentationFolder(root, "val", tf, classes=ds.classes)
    assert len(val) == 1 and val.classes == ds.classes and val.reduce_zero_label


def test_plain_images_masks_layout(tmp_path):
    root = str(tmp_path / "plain")
    for i in range(10):
        _write_pair(f"{root}/images/{i:02d}.jpg", f"{root}/masks/{i:02d}.png", np.full((6, 5), i % 3), i)
    _write_pair(f"{root}/images/lonely.jpg", f"{root}/other/lonely.png", np.zeros((6, 5)), 0)  # no mask
    with open(f"{root}/classes.txt", "w") as f:
        f.write("sky\nroad\ncar\n")
    layout, train = find_pairs(root, "train")
    _, val = find_pairs(root, "val")
    assert layout == "plain" and [os.path.basename(p) for p, _ in train] == [f"{i:02d}.jpg" for i in range(9)]
    assert [os.path.basename(m) for _, m in val] == ["09.png"]
    ds = SegmentationFolder(root, "train", PairedTransform((0, 0, 0), (1, 1, 1), crop=8, scale=(0.5, 0.5)))
    assert ds.classes == ["sky", "road", "car"]
    torch.manual_seed(0)
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and y.shape == (8, 8)
    assert set(y.unique().tolist()) <= {1, 255} and (y == 255).any()  # 6x5 -> 5x4 (half of short side 8): padded with 255
    with pytest.raises(ConfigError, match="neither ADE20K-style"):
        find_pairs(str(tmp_path), "train")


# ------------------------------------------------------------------------------------- optimisation ----
def test_stage_wise_layer_decay_parameter_by_parameter():
    from slaknet.segment.model import layer_decay_groups

    net = _tiny_net()
    groups = layer_decay_groups(net, weight_decay=0.05, decay_rate=0.9, num_layers=6)
    got = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in got
            got[id(p)] = (g["lr_scale"], g["weight_decay"])
    names = dict(net.named_parameters())
    assert len(got) == len(names)
    # hand-written expectation (mmseg LearningRateDecayOptimizerConstructor, stage_wise, num_layers 6 -> 8 ids):
    # stem/downsamplers id 0 -> 0.9**7, stage i -> id i+1 -> 0.9**(6-i), everything else id 7 -> 1
    for name, p in names.items():
        if name.startswith("encoder.model.model.downsample_layers."):
            scale = 0.9 ** 7
        elif name.startswith("encoder.model.model.stages.0."):
            scale = 0.9 ** 6
        elif name.startswith("encoder.model.model.stages.1."):
            scale = 0.9 ** 5
        elif name.startswith("encoder.model.model.stages.2."):
            scale = 0.9 ** 4
        elif name.startswith("encoder.model.model.stages.3."):
            scale = 0.9 ** 3
        else:
            assert name.startswith(("decoder.", "segmentation_head.", "aux_head.")), name
            scale = 1.0
        wd = 0.0 if p.ndim == 1 or name.endswith(".bias") else 0.05
        assert got[id(p)] == (pytest.approx(scale), wd), name


def test_poly_schedule_with_linear_warmup():
    from types import SimpleNamespace

    from slaknet.segment.task import SegmentationTask
    import slaknet

    cfg = slaknet.config("segmentation", schedule="poly")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-4)
    opt.param_groups[0]["lr_scale"] = 0.5
    trainer = SimpleNamespace(plan=SimpleNamespace(lr=1e-4))
    sched = SegmentationTask(cfg).build_scheduler(trainer, opt, total_steps=100, warmup=10)
    lr0 = 1e-4 * 1e-6
    for step, expect in ((0, lr0), (5, lr0 + 5 * (1e-4 - lr0) / 10), (10, 1e-4 * 0.9), (40, 1e-4 * 0.6),
                         (99, 1e-4 * 0.01)):
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * expect, rel=1e-9), step


# ------------------------------------------------------------------------------------------- inference ----
def test_sliding_window_equals_whole_image_for_a_pixelwise_net():
    from slaknet.segment.infer import predict_logits, slide_logits

    conv = nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, 45, 70)
    torch.testing.assert_close(slide_logits(conv, x, 4, crop=32, stride=21), conv(x))
    torch.testing.assert_close(predict_logits(conv, x, 4, crop=32, stride=21), conv(x))
    seen = []

    def spy(win):
        seen.append(tuple(win.shape[-2:]))
        return conv(win)

    slide_logits(spy, x, 4, crop=32, stride=21)
    assert seen == [(32, 32)] * 6  # 2 rows (0, 13) x 3 columns (0, 21, 38)


@pytest.mark.slow
def test_onnx_export_matches_eager(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli_main(["segment", "train", *TINY, "-o", out, "--max-steps", "1", "--epochs", "1"]) == 0
    onnx_path = str(tmp_path / "seg.onnx")
    assert cli_main(["segment", "export", "--checkpoint", os.path.join(out, "model.safetensors"),
                     "--output-file", onnx_path]) == 0
    assert "max |diff| vs eager" in capsys.readouterr().out
    import onnxruntime as ort

    from slaknet.segment.infer import image_tensor, load_segmentation_checkpoint

    net, spec = load_segmentation_checkpoint(os.path.join(out, "model.safetensors"))
    img, _ = render_contours(0, "val", 0, 32)
    x = image_tensor(img, spec["mean"], spec["std"])
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    assert got.shape == (1, 2, 32, 32) and np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_sparse_snip_training_through_the_shared_engine(tmp_path):
    out = str(tmp_path / "run")
    assert cli_main(["segment", "train", *TINY, "-o", out, "--epochs", "1", "--sparse", "--sparsity", "0.5",
                     "--sparse-init", "snip", "--sparse-layers", "large_kernel", "-u", "2"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["density"] == pytest.approx(0.5, abs=0.01) and s["nonzero_params"] < s["params"]


def test_folder_training_with_layer_decay_poly_and_a_corrupt_file(tmp_path, capsys):
    root, out = str(tmp_path / "data"), str(tmp_path / "run")
    for split, n in (("train", 12), ("val", 2)):
        for i in range(n):
            mask = np.zeros((40, 44), np.uint8)
            mask[:, i % 4 * 10:] = 1 + i % 2
            _write_pair(f"{root}/{split}/images/{i:02d}.png", f"{root}/{split}/masks/{i:02d}.png", mask, i)
    with open(f"{root}/train/images/03.png", "wb") as f:
        f.write(b"broken")
    with open(f"{root}/classes.txt", "w") as f:
        f.write("a\nb\nc\n")
    args = ["segment", "train", "--data", root, "--recipe", "ade20k", "--model", "slak_pico", "--kernel-size", "7", "7", "7", "7", "5",
            "--width-factor", "1.0", "--drop-path", "0", "--crop", "32", "--slide-stride", "16", "-b", "4", "--update-freq", "1",
            "--epochs", "1", "--num-workers", "0", "--progress", "false", "--tensorboard", "false", "--threads", "1",
            "--decoder-channels", "16", "--aux-channels", "8", "--lr", "1e-3", "--warmup-steps", "1", "-o", out]
    with pytest.warns(UserWarning, match="skipping unreadable pair"):
        assert cli_main(args) == 0  # ade20k recipe: layer decay 0.9 + poly schedule
    cfg = json.load(open(os.path.join(out, "summary.json")))
    assert cfg["recipe"] == "ade20k" and cfg["bad_images"] == 1 and cfg["bad_files"][0].endswith("03.png")
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["classes"] == ["a", "b", "c"] and ck["config"]["task_options"]["layer_decay"] == 0.9
    scales = sorted({round(g["lr_scale"], 6) for g in ck["optimizer"]["param_groups"]})
    assert scales == sorted({round(0.9 ** k, 6) for k in range(8) if k not in (1, 2)})  # ids 0, 1..4, 7
    assert "val miou" in capsys.readouterr().out
    # eval of the best checkpoint on the run's own folder (sliding window 32 / 16 over 40 x 44) = the trainer's record
    log = _log(out)
    assert cli_main(["segment", "eval", "--checkpoint", os.path.join(out, "checkpoint-best.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(log[-1]["val_miou"], abs=1e-6)
    pred = str(tmp_path / "pred")
    assert cli_main(["segment", "predict", f"{root}/val/images/00.png", "--masks", f"{root}/val/masks",
                     "--checkpoint", os.path.join(out, "model.safetensors"), "-o", pred]) == 0
    assert sorted(os.listdir(pred)) == ["00_labels.png", "00_mask.png", "00_side.png"]
    assert np.asarray(Image.open(os.path.join(pred, "00_side.png"))).shape == (40, 3 * 44 + 8, 3)


def test_yaml_config_and_recipe_choice(tmp_path):
    from slaknet.train.config import config_from_argv

    yml = tmp_path / "seg.yaml"
    yml.write_text("crop: 256\nlayer-decay: 0.8\nepochs: 3\n")
    cfg = config_from_argv(["--config", str(yml), "--data", str(tmp_path), "--epochs", "5"], "segmentation")
    assert cfg.recipe == "ade20k" and cfg.task_name == "segmentation" and cfg.optim.epochs == 5  # command line wins
    assert cfg.task.crop == 256 and cfg.task.layer_decay == 0.8
    assert cfg.task.slide_stride == 341 and cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 1500
    assert config_from_argv([], "segmentation").recipe == "seg_demo"


_SEGMENT_CONFIG = """
from slaknet.train.config import config_from_argv
cfg = config_from_argv(argv, "segmentation")
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    import signal

    from conftest import run_killed_at_step

    monkeypatch.setenv("SLAKNET_LINEAR", "onednn")  # same 1x1 GEMM here and in the child (inherited)
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    args = [*TINY, "--ckpt-every-steps", "2"]
    assert cli_main(["segment", "train", *args, "-o", ref]) == 0
    proc = run_killed_at_step(_SEGMENT_CONFIG, [*args, "-o", cut], step=3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(os.path.join(cut, "checkpoint-last.pth"), weights_only=True)["step"] == 2
    assert cli_main(["segment", "train", "--resume", os.path.join(cut, "checkpoint-last.pth")]) == 0
    a, b = _log(ref), _log(cut)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_miou"] for r in a] == [r["val_miou"] for r in b]
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    from conftest import run_torchrun

    out = str(tmp_path / "ddp")
    proc = run_torchrun(["segment", "train", *TINY, "--epochs", "1", "-o", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = _log(out)
    assert len(rec) == 1 and rec[0]["step"] == 2  # 32 images / (8 x 2 processes), rank 0 logs
    assert 0.0 <= rec[0]["val_miou"] <= 100.0
    assert torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)["config"]["world_size"] == 2


# -------------------------------------------------------------------------------------- your own data ----
def _scene(i, size=32):
    """A mask with background 0 and one square of class 1 or 2."""
    mask = np.zeros((size, size), np.uint8)
    top, left = 2 + (3 * i) % 12, 2 + (5 * i) % 12
    mask[top:top + 14, left:left + 14] = 1 + i % 2
    return mask


def _user_folder(root, n_train=8, n_val=3, bad_value=False, bad_size=None):
    """A plain images/ + masks/ folder as a user would make one: background 0, classes 0..2, 32 px; ``bad_value``:
    label 200 in train mask 03; ``bad_size``: ("train" | "val", stem) whose mask is 4 px too short."""
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            mask = _scene(i + (100 if split == "val" else 0))
            if bad_value and split == "train" and i == 3:
                mask[0, 0] = 200
            _write_pair(f"{root}/{split}/images/{i:02d}.png", f"{root}/{split}/masks/{i:02d}.png", mask, i)
            if bad_size == (split, f"{i:02d}"):
                Image.fromarray(mask[:-4]).save(f"{root}/{split}/masks/{i:02d}.png")
    return root


def _ade_folder(root, n=6, size=32):
    """An ADEChallengeData2016-layout folder whose label 0 covers most pixels (labels 1, 2 in small squares)."""
    for split, m in (("training", n), ("validation", 2)):
        for i in range(m):
            mask = np.zeros((size, size), np.uint8)
            mask[4:10, 4:10] = 1 + i % 2
            _write_pair(f"{root}/images/{split}/{i:02d}.jpg", f"{root}/annotations/{split}/{i:02d}.png", mask, i)
    return root


USER = ["--progress", "false", "--tensorboard", "false", "--threads", "1", "--num-workers", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A tiny run with `--recipe auto` on a user folder whose validation pair 01 has a mask of another size."""
    base = tmp_path_factory.mktemp("user")
    root, out = _user_folder(str(base / "data"), bad_size=("val", "01")), str(base / "run")
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.warns(UserWarning, match="differ in size"):
        assert cli_main(["segment", "train", "--data", root, *USER, "-o", out]) == 0
    return root, out, text.getvalue()


def test_auto_recipe_reads_a_small_folder(tmp_path, monkeypatch):
    from slaknet.segment import spec
    from slaknet.train.config import config_from_argv

    root = _user_folder(str(tmp_path / "data"))
    cfg = config_from_argv(["--data", root], "segmentation")
    assert cfg.recipe == "seg_small" and cfg["model"] == "slak_pico" and cfg.model.fit_kernels
    assert cfg.task.crop == 32 and cfg.data.input_size == 32  # the images' own size
    assert cfg.optim.epochs == 100 and cfg.optim.batch_size == 4  # from the 8 training pairs
    assert cfg.task.layer_decay is None and cfg.task.decoder_channels == 64
    assert config_from_argv(["--data", root, "--crop", "64"], "segmentation").task.crop == 64  # flags still win
    monkeypatch.setattr(spec, "BIG_PAIRS", 8)
    monkeypatch.setattr(spec, "BIG_SIDE", 32)
    assert config_from_argv(["--data", root], "segmentation").recipe == "ade20k"  # big folders of big images
    assert "ade20k from 8 training pairs of >= 32 px" in spec.explain_recipe(root, "ade20k")


def test_classes_come_from_the_data_and_label_0_is_background(tmp_path):
    root = _user_folder(str(tmp_path / "data"))
    tf = PairedTransform((0, 0, 0), (1, 1, 1))
    ds = SegmentationFolder(root, "train", tf)
    assert ds.classes == ["class_0", "class_1", "class_2"] and not ds.reduce_zero_label
    assert ds.labels.source == "the masks"
    _, y = ds[0]
    assert y.tolist() == _scene(0).astype(int).tolist()  # 0 stays a class: nothing ignored
    assert SegmentationFolder(root, "train", tf, num_classes=5).classes[-1] == "class_4"
    with open(f"{root}/classes.txt", "w") as f:
        f.write("background\nsquare\nother square\n")
    assert SegmentationFolder(root, "train", tf).classes == ["background", "square", "other square"]


def test_ade20k_layout_ignores_label_0_unless_told_otherwise(tmp_path, capsys):
    import slaknet

    root = _ade_folder(str(tmp_path / "ade"))
    tf = PairedTransform((0, 0, 0), (1, 1, 1))
    ds = SegmentationFolder(root, "train", tf)
    assert ds.reduce_zero_label and ds.classes == ["class_1", "class_2"]
    assert ds.labels.ignored_share(ds.scan) > 0.9
    ds = SegmentationFolder(root, "train", tf, reduce_zero_label=False)
    assert ds.classes == ["class_0", "class_1", "class_2"] and int(ds[0][1].max()) == 1
    cfg = slaknet.config("segmentation", data=root, reduce_zero_label=False)
    assert cfg.task.reduce_zero_label is False and cfg.recipe == "seg_small"
    plain = _user_folder(str(tmp_path / "plain"))
    assert SegmentationFolder(plain, "train", tf, reduce_zero_label=True).classes == ["class_1", "class_2"]
    # the header says what is ignored, its share, and warns that it is most pixels
    out = str(tmp_path / "run")
    assert cli_main(["segment", "train", "--data", root, *USER, "--max-steps", "1", "-o", out]) == 0
    text = capsys.readouterr().out
    assert "label 0 ignored (--reduce-zero-label: on for the ADE20K layout)" in text
    assert "ignored: 255 and 0 = 96.5% of the training pixels" in text  # 6 x 6 of 32 x 32 labelled
    assert "warning: most training pixels (96%) are ignored" in text and "--reduce-zero-label false" in text
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["reduce_zero_label"] is True and s["classes"] == ["class_1", "class_2"]


def test_a_label_beyond_the_classes_is_one_line_before_training(tmp_path, capsys):
    root, out = _user_folder(str(tmp_path / "data"), bad_value=True), str(tmp_path / "run")
    assert cli_main(["segment", "train", "--data", root, *USER, "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train/masks/03.png has label 200, beyond the 3 classes" in err
    assert "--num-classes 201" in err and not os.path.exists(out)  # no half-made run folder
    with open(f"{root}/classes.txt", "w") as f:
        f.write("a\nb\nc\n")
    assert cli_main(["segment", "train", "--data", root, *USER, "-o", out]) == 2
    assert "has label 200, beyond the 3 classes (labels 0..2; from classes.txt)" in capsys.readouterr().err


def test_masks_outside_the_scanned_sample_are_checked_as_they_load(tmp_path):
    from slaknet.segment.folders import scan_split

    root = _user_folder(str(tmp_path / "data"), bad_value=True)
    scan = scan_split(root, "train", limit=2)  # masks 00 and 04 read; 03 (label 200) is not in the sample
    assert scan.sampled and scan.scanned == 2 and 200 not in scan.counts
    ds = SegmentationFolder(root, "train", PairedTransform((0, 0, 0), (1, 1, 1)), report_bad=True, scan=scan)
    with pytest.warns(UserWarning, match="03.png has label 200"):
        _, _, bad, first = ds[3]
    assert (bad, first) == (1, 3)


def test_a_bad_pair_is_never_replaced_by_its_neighbour_at_evaluation(tmp_path):
    from slaknet.segment.infer import confusion_over
    from slaknet.segment.task import collate_segmentation
    from torch.utils.data import DataLoader

    root = _user_folder(str(tmp_path / "data"), n_val=3, bad_size=("val", "01"))
    tf = PairedTransform((0, 0, 0), (1, 1, 1))
    with pytest.warns(UserWarning, match="differ in size"):
        val = SegmentationFolder(root, "val", tf, report_bad=True, substitute=False)
    assert len(val) == 2 and [(os.path.basename(b.path), b.kind) for b in val.left_out] == [("01.png", "size")]
    # a pair that breaks after the scan (mask 02 rewritten 4 px short) is skipped and counted, not replaced
    Image.fromarray(_scene(102)[:-4]).save(f"{root}/val/masks/02.png")
    skipped = set()
    with pytest.warns(UserWarning, match="differ in size"):
        cm, _, n_pix, bad = confusion_over(nn.Conv2d(3, 3, 1), DataLoader(val, batch_size=1, collate_fn=collate_segmentation),
                                           3, torch.device("cpu"), skipped=skipped)
    assert bad == 1 and skipped == {1} and n_pix == 32 * 32 and int(cm.sum()) == 32 * 32  # only pair 00


def test_user_folder_run_header_sizes_and_summary(user_run):
    root, out, text = user_run
    assert "recipe seg_small for 8 training pairs ~32 px, plain layout (--recipe auto:" in text
    assert "classes: 3 from the masks (labels 0..2): class_0, class_1, class_2; label 0 is a class" in text
    assert "ignored: 255 = 0.0% of the training pixels" in text
    assert "sizes: training crop 32 px (--crop, kernels fitted to it); evaluation: each image whole" in text
    assert "left out before training: 1 pair (1 with mask and image sizes differing, 0 unreadable; val 1)" in text
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["best_metric"] == "val_miou" and s["best_miou"] == s["best_value"] is not None
    assert "best_top1" not in s and "chance_top1" not in s
    assert s["num_classes"] == 3 and s["classes"] == ["class_0", "class_1", "class_2"]
    assert s["size_mismatch"] == 1 and s["val_bad_images"] == 1 and s["val_bad_files"][0].endswith("val/images/01.png")
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["classes"] == s["classes"] and ck["config"]["seg_model"]["reduce_zero_label"] is False


def test_kernels_are_fitted_to_the_crop_trained_on(tmp_path, capsys):
    from slaknet.models.slak import MODEL_SPECS
    from slaknet.models.training import fit_kernel_sizes

    root, out = _user_folder(str(tmp_path / "data")), str(tmp_path / "run")
    assert cli_main(["segment", "train", "--data", root, *USER, "--max-steps", "1", "--crop", "64",
                     "--input-size", "32", "-o", out]) == 0
    text = capsys.readouterr().out
    assert "recipe seg_small: input 64 px" in text and "training crop 64 px" in text
    assert "--input-size 32 unused (folders train on the crop)" in text
    spec = MODEL_SPECS["slak_pico"]
    expect = list(fit_kernel_sizes(tuple(spec["kernel_size"]), spec.get("small_kernel", 5), 64))
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["config"]["kernels"] == expect != list(fit_kernel_sizes(tuple(spec["kernel_size"]), 5, 32))
    assert ck["config"]["seg_model"]["crop"] == 64 and ck["config"]["seg_model"]["stride"] == 43


def test_eval_counts_a_bad_pair_once(user_run, capsys):
    root, out, _ = user_run
    with pytest.warns(UserWarning, match="differ in size"):
        assert cli_main(["segment", "eval", "--checkpoint", os.path.join(out, "checkpoint-best.pth"), "--json",
                         "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 2 and res["bad_images"] == 1  # 3 pairs: 01 left out, 00 and 02 each counted once
    log = _log(out)
    assert res["miou"] == pytest.approx(log[-1]["val_miou"], abs=1e-6)


def test_predict_writes_the_good_inputs_and_reports_the_bad(user_run, tmp_path, capsys):
    root, out, _ = user_run
    bad, pred = str(tmp_path / "bad.jpg"), str(tmp_path / "pred")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    assert cli_main(["segment", "predict", bad, f"{root}/val/images/00.png", "--masks", f"{root}/val/masks",
                     "--checkpoint", os.path.join(out, "model.safetensors"), "-o", pred, "--threads", "1"]) == 2
    cap = capsys.readouterr()
    assert sorted(os.listdir(pred)) == ["00_labels.png", "00_mask.png", "00_side.png"]
    assert cap.err.count("\n") == 1 and "cannot read image" in cap.err and "bad.jpg" in cap.err
    assert "1 input failed" in cap.out
