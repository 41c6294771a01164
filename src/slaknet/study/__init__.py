"""``slaknet study``: the paper's ablations in miniature (kernel scaling, sparsity, masks, growth, ERF).

Pieces: :mod:`.data` (a centre-readout insideness task whose contour keeps a chosen distance from the
image centre), :mod:`.model` (a single-resolution SLaK-block net that reads its answer at the centre),
:mod:`.arms` (the ablation arms and budgets), :mod:`.runner` (training, resumable JSON-lines results) and
:mod:`.report` (mean +- std over seeds, markdown table, plots). See docs/study.md.
"""
from slaknet.study.arms import ARMS, BUDGETS, Arm, Budget, build_arms, get_budget, select_arms
from slaknet.study.data import CentreInsideness, render_centre_insideness
from slaknet.study.model import StudyNet, receptive_radius

__all__ = ["ARMS", "BUDGETS", "Arm", "Budget", "build_arms", "get_budget", "select_arms", "CentreInsideness",
           "render_centre_insideness", "StudyNet", "receptive_radius"]
