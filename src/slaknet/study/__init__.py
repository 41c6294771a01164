"""``slaknet study``: the paper's ablations in miniature (kernel scaling, sparsity, masks, growth, ERF).

Pieces: :mod:`.data` (a centre-readout insideness task whose contour keeps a chosen distance from the
image centre), :mod:`.model` (a single-resolution SLaK-block net that reads its answer at the centre),
:mod:`.arms` (the ablation arms and budgets), :mod:`.runner` (training, resumable JSON-lines results) and
:mod:`.report` (mean +- std over seeds, markdown table, plots). See docs/study.md.
"""

from slaknet.lazy import lazy_exports

_EXPORTS = {
    "ARMS": "slaknet.study.arms",
    "BUDGETS": "slaknet.study.arms",
    "Arm": "slaknet.study.arms",
    "Budget": "slaknet.study.arms",
    "build_arms": "slaknet.study.arms",
    "get_budget": "slaknet.study.arms",
    "select_arms": "slaknet.study.arms",
    "CentreInsideness": "slaknet.study.data",
    "render_centre_insideness": "slaknet.study.data",
    "StudyNet": "slaknet.study.model",
    "receptive_radius": "slaknet.study.model",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["ARMS", "BUDGETS", "Arm", "Budget", "build_arms", "get_budget", "select_arms", "CentreInsideness",
           "render_centre_insideness", "StudyNet", "receptive_radius"]
