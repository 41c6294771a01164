"""torchvision detectors (Mask R-CNN, Faster R-CNN, RetinaNet, FCOS) on a SLaK backbone with torchvision's FPN.

The backbone is :class:`slaknet.deploy.SLaKBackbone` (stage outputs at strides 4/8/16/32 with one
LayerNorm per stage, ``norm0..norm3``, as in the official SLaK detection backbone) followed by
:class:`torchvision.ops.FeaturePyramidNetwork` with a max-pooled fifth level (what torchvision's
``BackboneWithFPN`` builds; its ``IntermediateLayerGetter`` cannot be used because SLaK interleaves
``downsample_layers`` and ``stages``). The paper used Cascade Mask R-CNN (MMDetection); torchvision has no
cascade head, so Mask R-CNN is the default here.

Detector state dicts name the SLaK weights ``backbone.body.*``; :func:`detector_from_state_dict` reads the
backbone's architecture (depths, widths, kernels) off those tensors, so a trained detector is rebuilt
without knowing how its backbone was first initialised.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from slaknet.detect.spec import DETECTORS
from slaknet.errors import CheckpointError, ConfigError

__all__ = ["DETECTORS", "SLaKFPN", "build_detector", "backbone_from_config", "detector_from_state_dict",
           "set_test_size", "HEAD_PATTERNS"]

# parameters outside the SLaK backbone (left dense by the sparse engine unless the user says otherwise)
HEAD_PATTERNS = ["backbone.fpn.*", "rpn.*", "roi_heads.*", "head.*"]


class SLaKFPN(nn.Module):
    """SLaK stage outputs -> torchvision FPN: an ``OrderedDict`` of ``len(stages) + 1`` maps, ``out_channels`` each."""

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), int(out_channels), extra_blocks=LastLevelMaxPool())
        self.out_channels = int(out_channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _anchors(opts: Mapping[str, Any], levels: int, per_level: int) -> Any:
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = [int(s) for s in opts["anchor_sizes"]]
    if len(sizes) != levels:
        raise ConfigError(f"task option anchor_sizes needs {levels} sizes (one per FPN level), got {sizes}")
    scales = [2 ** (i / per_level) for i in range(per_level)]  # RetinaNet: 3 scales an octave apart / 3
    return AnchorGenerator(tuple(tuple(s * f for f in scales) for s in sizes),
                           tuple(tuple(float(a) for a in opts["aspect_ratios"]) for _ in sizes))


def build_detector(body: nn.Module, num_classes: int, opts: Mapping[str, Any], mean: Sequence[float],
                   std: Sequence[float]) -> nn.Module:
    """The detector ``opts["detector"]`` on ``body`` (a :class:`SLaKBackbone`), sized by the task options.

    ``num_classes`` counts the object classes; torchvision's R-CNNs add the background class 0 (labels
    are 1..num_classes), RetinaNet / FCOS use the same label range with one extra unused logit.
    """
    from torchvision.models import detection as tvd

    kind = opts["detector"]
    if kind not in DETECTORS:
        raise ConfigError(f"unknown detector {kind!r}; available: {', '.join(DETECTORS)}")
    backbone = SLaKFPN(body, int(opts["fpn_channels"]))
    levels = len(body.out_channels) + 1
    sizes = tuple(int(s) for s in opts["train_sizes"])
    common = dict(min_size=sizes, max_size=int(opts["max_size"]), image_mean=list(mean), image_std=list(std),
                  size_divisible=32)
    n = int(num_classes) + 1
    if kind == "retinanet":
        return tvd.RetinaNet(backbone, n, anchor_generator=_anchors(opts, levels, 3),
                             score_thresh=float(opts["score_thresh"]), detections_per_img=int(opts["detections"]),
                             **common)
    if kind == "fcos":
        return tvd.FCOS(backbone, n, anchor_generator=_anchors(dict(opts, aspect_ratios=[1.0]), levels, 1),
                        score_thresh=float(opts["score_thresh"]), detections_per_img=int(opts["detections"]),
                        **common)
    return _rcnn(kind, backbone, n, opts, levels, common)


def _rcnn(kind: str, backbone: SLaKFPN, n: int, opts: Mapping[str, Any], levels: int, common: Dict[str, Any]) -> nn.Module:
    from torchvision.models import detection as tvd
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    names = [str(i) for i in range(levels - 1)]  # the pooled level is for the RPN only (torchvision's choice)
    ch, rep = backbone.out_channels, int(opts["box_head_size"])
    kw = dict(rpn_anchor_generator=_anchors(opts, levels, 1),
              rpn_pre_nms_top_n_train=int(opts["rpn_pre_nms_train"]), rpn_post_nms_top_n_train=int(opts["rpn_post_nms_train"]),
              rpn_pre_nms_top_n_test=int(opts["rpn_pre_nms_test"]), rpn_post_nms_top_n_test=int(opts["rpn_post_nms_test"]),
              rpn_batch_size_per_image=int(opts["rpn_batch"]), box_batch_size_per_image=int(opts["roi_batch"]),
              box_score_thresh=float(opts["score_thresh"]), box_detections_per_img=int(opts["detections"]),
              box_roi_pool=MultiScaleRoIAlign(names, 7, 2), box_head=TwoMLPHead(ch * 49, rep),
              box_predictor=FastRCNNPredictor(rep, n), **common)
    if kind == "faster_rcnn":
        return tvd.FasterRCNN(backbone, None, **kw)
    layers = [int(opts["mask_channels"])] * int(opts["mask_layers"])
    return tvd.MaskRCNN(backbone, None, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
                        mask_head=MaskRCNNHeads(ch, layers, 1), mask_predictor=MaskRCNNPredictor(layers[-1], layers[-1], n),
                        **kw)


def backbone_from_config(cfg: Any, checkpoint: Optional[str] = None) -> nn.Module:
    """The SLaK backbone of a new detector: from ``checkpoint`` (a SLaK classification checkpoint, official
    or slaknet's, or an mmdet-style ``backbone.*`` file: architecture read from the file) or from scratch
    as the configuration's model (``cfg.model``: its model section) with its kernel / width overrides. Stage LayerNorms are new when the file has none."""
    from slaknet.deploy.backbone import SLaKBackbone

    if checkpoint:
        loaded = SLaKBackbone.from_checkpoint(checkpoint, norm_outputs=None)
        return loaded if loaded.norm_outputs else SLaKBackbone(loaded, norm_outputs=True)
    from slaknet.models.training import build_training_model

    net, _ = build_training_model(cfg.model, 0, int(cfg.data.input_size))
    return SLaKBackbone(net, norm_outputs=True)


def detector_from_state_dict(sd: Mapping[str, torch.Tensor], num_classes: int, opts: Mapping[str, Any],
                             mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Rebuild a trained detector from its state dict (backbone architecture read from ``backbone.body.*``)
    and load it strictly; a state dict that does not fit gives a one-line :class:`CheckpointError`."""
    from slaknet.deploy.backbone import SLaKBackbone

    prefix = "backbone.body."
    body_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not body_sd:
        raise CheckpointError("not a slaknet detector checkpoint (no backbone.body.* weights); train one with "
                              "`slaknet detect train`")
    body = SLaKBackbone.from_checkpoint(body_sd, norm_outputs=None)
    model = build_detector(body, num_classes, opts, mean, std)
    try:
        model.load_state_dict(dict(sd), strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[1] if len(lines) > 1 else lines[0])
        raise CheckpointError(f"checkpoint weights do not fit this detector ({opts['detector']}): {first[:200]}") from exc
    return model


def set_test_size(model: nn.Module, size: int, max_size: Optional[int] = None) -> None:
    """Make evaluation resize the shorter side to ``size`` (torchvision evaluates at ``min_size[-1]``)."""
    model.transform.min_size = (int(size),)
    if max_size is not None:
        model.transform.max_size = int(max_size)

