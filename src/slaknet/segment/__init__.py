"""``slaknet segment``: semantic segmentation with SLaK backbones (SLaK encoder + UperNet from
segmentation_models_pytorch, the paper's FCN auxiliary head), trained by the shared Trainer.

Pieces: :mod:`.data` (the built-in closed-contours-among-decoys set, ADE20K-layout and images/masks
folders, paired augmentation), :mod:`.model` (the network, backbone initialisation, layer-wise lr decay),
:mod:`.metrics` (mIoU from a confusion matrix), :mod:`.task` (the ``segmentation`` task), :mod:`.infer`
(checkpoint reading, sliding window, pictures) and :mod:`.cli` (the command). See docs/segmentation.md.
"""

from slaknet.lazy import lazy_exports

_EXPORTS = {
    "ContourSegmentation": "slaknet.segment.data",
    "SegmentationFolder": "slaknet.segment.data",
    "render_contours": "slaknet.segment.data",
    "SegmentationNet": "slaknet.segment.model",
    "build_segmentation_model": "slaknet.segment.model",
    "load_backbone": "slaknet.segment.model",
    "layer_decay_groups": "slaknet.segment.model",
    "confusion_matrix": "slaknet.segment.metrics",
    "scores": "slaknet.segment.metrics",
    "SegmentationTask": "slaknet.segment.task",
    "load_segmentation_checkpoint": "slaknet.segment.infer",
    "slide_logits": "slaknet.segment.infer",
    "predict_logits": "slaknet.segment.infer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
