"""Image classification with SLaK: the ``classification`` task (built-in insideness data, image folders,
torchvision sets), its recipes (:mod:`.spec`), and the ``slaknet train`` / ``eval`` / ``predict`` commands."""
from slaknet.lazy import lazy_exports

_EXPORTS = {
    "ClassificationTask": "slaknet.classify.task",
    "build_datasets": "slaknet.classify.task",
    "eval_transform": "slaknet.classify.task",
    "evaluate": "slaknet.classify.evaluate",
    "inspect_folder": "slaknet.classify.spec",
    "choose_recipe": "slaknet.classify.spec",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
