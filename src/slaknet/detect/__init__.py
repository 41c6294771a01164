"""``slaknet detect``: object detection and instance masks with a SLaK backbone (torchvision detectors + FPN).

Pieces: :mod:`.data` (the built-in "closed contours among open decoys" set, batching of target dicts),
:mod:`.coco` (COCO JSON reader), :mod:`.model` (SLaK + FPN backbone, torchvision Mask R-CNN / Faster
R-CNN / RetinaNet / FCOS), :mod:`.metrics` (COCO AP via torchmetrics / pycocotools), :mod:`.options`
(task options), :mod:`.task` (the ``detection`` training task), :mod:`.inference`, :mod:`.demo`,
:mod:`.cli`. See docs/detection.md.
"""

from slaknet.lazy import lazy_exports

_EXPORTS = {
    "ContourDetection": "slaknet.detect.data",
    "render_contours": "slaknet.detect.data",
    "detection_collate": "slaknet.detect.data",
    "SLaKFPN": "slaknet.detect.model",
    "build_detector": "slaknet.detect.model",
    "detector_from_state_dict": "slaknet.detect.model",
    "DetectionMeter": "slaknet.detect.metrics",
    "evaluate_detector": "slaknet.detect.metrics",
    "DetectionTask": "slaknet.detect.task",
    "load_detector": "slaknet.detect.inference",
    "CocoDetection": "slaknet.detect.coco",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
