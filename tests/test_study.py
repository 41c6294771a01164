"""Tests of the study machinery (slaknet study) on tiny budgets; the real study is not a unit test."""
from __future__ import annotations

import json
import math
import os
from collections import deque

import numpy as np
import pytest
import torch

from slaknet.errors import ConfigError
from slaknet.study.arms import (BUDGETS, build_arms, get_budget, kernel_ladder, paper_equivalent, reference_arm,
                                scaled_kernel, select_arms)
from slaknet.study.data import CentreInsideness, render_centre_insideness
from slaknet.study.model import StudyNet, receptive_radius
from slaknet.study.report import aggregate, ci95, markdown_report, mean_std, paired_difference, verdict, write_report
from slaknet.study.runner import RESULTS_FILE, band_accuracy, build_model, load_results, run_study, train_run


# ------------------------------------------------------------------------------------------- arms ----
def test_scaled_kernels_match_hand_computation():
    # paper kernels on a 56 px map scaled to 16: 31*16/56 = 8.86 -> 9, 51 -> 14.57 -> 15, 61 -> 17.43 -> 17
    assert [scaled_kernel(k, 16) for k in (31, 51, 61)] == [9, 15, 17]
    # 32 px map: 17.7 -> 17 (nearest odd of 17.71 is 17), 29.1 -> 29, 34.9 -> 35
    assert [scaled_kernel(k, 32) for k in (31, 51, 61)] == [17, 29, 35]
    assert scaled_kernel(31, 4, floor=7) == 7


def test_arms_cover_every_ablation_with_equal_depth_and_width():
    b = BUDGETS["default"]
    # 16x16 map: odd kernels 3..17 (17 = the 61-equivalent), i.e. ~10.5x10.5 .. ~59.5x59.5 at 224 px
    assert kernel_ladder(b) == [3, 5, 7, 9, 11, 13, 15, 17]
    assert paper_equivalent(3, 16) == pytest.approx(10.5) and paper_equivalent(17, 16) == pytest.approx(59.5)
    assert kernel_ladder(BUDGETS["large"])[:3] == [3, 7, 11] and {17, 29, 35} <= set(kernel_ladder(BUDGETS["large"]))
    assert reference_arm(b) == "dec15"
    arms = {a.name: a for a in build_arms(b)}
    assert set(arms) == ({f"mxm{k}" for k in range(3, 18, 2)} | {f"dec{k}" for k in range(7, 18, 2)}
                         | {"sparse", "sparse_w13", "sparse_static", "sparse_grad"})
    assert arms["mxm3"].module == "3x3" and arms["mxm5"].module == "5x5" and arms["mxm7"].module == "7x7+5x5"
    assert arms["dec7"].module == "7x5+5x7+5x5" and arms["dec15"].module == "15x5+5x15+5x5"
    assert arms["mxm15"].module == "15x15+5x5" and arms["sparse"].module == "15x5+5x15+5x5"
    assert {a.series for a in arms.values()} == {"dense", "decomposed", ""}
    assert arms["sparse_static"].fix and arms["sparse_grad"].growth == "gradient"
    assert arms["sparse_w13"].width_factor == 1.3
    models = {n: build_model(a, b) for n, a in arms.items()}
    depths = {len(m.blocks) for m in models.values()}
    assert depths == {b.depth}
    assert {m.dim for n, m in models.items() if n != "sparse_w13"} == {b.width}
    assert models["sparse_w13"].dim == round(1.3 * b.width)
    lk = models["mxm3"].blocks[0].large_kernel
    assert lk.lkb_origin.conv.weight.shape[-2:] == (3, 3) and not hasattr(lk, "LoRA1")
    big = models["mxm17"].blocks[0].large_kernel
    assert big.lkb_origin.conv.weight.shape[-2:] == (17, 17) and big.small_conv.conv.weight.shape[-2:] == (5, 5)
    assert models["dec15"].blocks[0].large_kernel.LoRA1.conv.weight.shape[-2:] == (15, 5)
    # every branch is followed by BatchNorm, in every arm
    for n, m in models.items():
        assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.blocks[0].large_kernel.modules()), n
    with pytest.raises(ConfigError):
        select_arms(b, ["nope"])
    with pytest.raises(ConfigError):
        get_budget("huge")


def test_band_edges_are_the_ladders_reach():
    b = BUDGETS["default"]
    # reach of a single block with a stride-4 stem: 4 * (1 + (M - 1) / 2) = 8, 12, ..., 36 px; the contour
    # windows spread over 0.0625 * 64 = 4 px .. 0.43 * 64 = 27.5 px
    assert b.graded and b.band_edges() == pytest.approx([4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 27.52])
    assert not get_budget("default", d_min=0.36, d_max=0.44, band=0.08).graded
    correct = np.array([1, 1, 0, 0, 1, 0], bool)
    dist = np.array([4.0, 7.9, 8.0, 12.0, 27.52, 30.0])
    # [4, 8): 2/2; [8, 12): 0/1; [12, 27.52]: 1/2 (27.52 closes the last band; 30 lies outside every band)
    assert band_accuracy(correct, dist, [4.0, 8.0, 12.0, 27.52]) == [100.0, 0.0, 50.0]
    assert band_accuracy(correct, dist, [40.0, 50.0]) == [None]


@pytest.mark.parametrize("kw,depth", [(dict(kernel_size=3), 1), (dict(kernel_size=7, small_kernel=5), 1),
                                      (dict(kernel_size=5), 2)])
def test_receptive_radius_matches_gradient_support(kw, depth):
    """The documented RF (which decides what a net *can* see) equals where the readout's input gradient is non-zero."""
    torch.manual_seed(0)
    m = StudyNet(width=4, depth=depth, stem=2, **kw).eval()
    for p in m.parameters():  # no exact zeros anywhere (layer scale etc.)
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(1, 1, 40, 40, requires_grad=True)
    m.centre_map(x).sum().backward()
    ys, xs = np.nonzero(x.grad[0, 0].abs().numpy() > 0)
    c = 20  # image centre (between pixels 19 and 20)
    half = max(c - ys.min(), ys.max() + 1 - c, c - xs.min(), xs.max() + 1 - c)
    assert half == receptive_radius(kw["kernel_size"], depth, 2)


# ------------------------------------------------------------------------------------------- data ----
def _flood_label(img: np.ndarray) -> int:
    """Independent label: 4-connected flood fill over background from the centre; reaching the border = outside."""
    bg, fg = np.median(img), img.max()
    ink = img > bg + 0.3 * (fg - bg)
    s = img.shape[0]
    seen = np.zeros_like(ink)
    q = deque([(s // 2, s // 2)])
    seen[s // 2, s // 2] = True
    while q:
        y, x = q.popleft()
        if y in (0, s - 1) or x in (0, s - 1):
            return 0
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ny, nx = y + dy, x + dx
            if not seen[ny, nx] and not ink[ny, nx]:
                seen[ny, nx] = True
                q.append((ny, nx))
    return 1


@pytest.mark.parametrize("decoy", [0.0, 1.0])
def test_centre_insideness_labels_and_distances_by_independent_check(decoy):
    size, d_min, d_max = 64, 0.36, 0.44
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    r = np.hypot(yy - size / 2, xx - size / 2)
    labels = []
    for i in range(16):
        img, label, dist = render_centre_insideness(3, "train", i, size, 0.0, d_min, d_max, decoy=decoy)
        assert img.shape == (size, size) and img.dtype == np.uint8
        labels.append(label)
        assert _flood_label(img.astype(float)) == label, i
        bg, fg = np.median(img), img.max()
        strong = img > bg + 0.3 * (fg - bg)
        assert r[strong].min() >= d_min * size - 1.0  # no ink near the centre (1 px of anti-aliasing)
        assert r[strong].min() <= d_max * size + 2.0
    assert 0 < sum(labels) < len(labels)
    a, la, _ = render_centre_insideness(3, "train", 5, size, 0.5)
    b, lb, _ = render_centre_insideness(3, "train", 5, size, 0.5)
    c, _, _ = render_centre_insideness(3, "val", 5, size, 0.5)
    assert (a == b).all() and la == lb and not (a == c).all()
    serial = CentreInsideness("val", 40, 32, 0.5, 0.25, 0.40, seed=2, decoy=0.5, workers=1)
    parallel = CentreInsideness("val", 40, 32, 0.5, 0.25, 0.40, seed=2, decoy=0.5, workers=2)
    assert torch.equal(serial.x, parallel.x) and torch.equal(serial.y, parallel.y)
    ds = CentreInsideness("train", 8, 32, 0.5, 0.3, 0.44, seed=1)
    x, y = ds.batch(torch.arange(4), augment=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 32, 32) and -1 <= float(x.min()) and float(x.max()) <= 1 and y.shape == (4,)
    with pytest.raises(ConfigError):
        CentreInsideness("train", 4, 32, d_min=0.4, d_max=0.3)


def test_graded_task_spreads_the_contour_and_keeps_ink_out_of_each_window():
    """Each image its own window: the nearest contour point spreads over the range, no ink comes closer
    than the image's window (checked on the pixels), and a band as wide as the range gives the old images."""
    size, d_min, d_max, band = 64, 0.0625, 0.43, 0.05
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    r = np.hypot(yy - size / 2, xx - size / 2)
    dists = []
    for i in range(40):
        img, label, dist = render_centre_insideness(5, "train", i, size, 0.5, d_min, d_max, decoy=0.5, band=band)
        assert _flood_label(img.astype(float)) == label, i
        bg, fg = np.median(img), img.max()
        strong = img > bg + 0.3 * (fg - bg)
        # the nearest strong ink pixel: the contour, or a decoy ring nearer in the same window (+ anti-aliasing)
        assert dist - band * size - 1.0 <= r[strong].min() <= dist + 2.0, i
        assert d_min * size <= dist <= d_max * size
        dists.append(dist)
    assert min(dists) < 9.0 and max(dists) > 22.0  # spread over the range, not one window
    a = render_centre_insideness(3, "train", 7, size, 0.5, 0.36, 0.44, decoy=0.5)
    b = render_centre_insideness(3, "train", 7, size, 0.5, 0.36, 0.44, decoy=0.5, band=0.08)
    assert (a[0] == b[0]).all() and a[1:] == b[1:]


# ------------------------------------------------------------------------------- machinery (fake) ----
ACC = {0: 60.0, 1: 70.0, 2: 80.0}  # per seed; arm offsets below


def _fake_trainer(calls):
    def trainer(arm, seed, budget, data, time_limit=None, device="cpu", progress=False, erf_dir=None):
        calls.append((arm.name, seed, time_limit))
        offset = 10.0 if arm.kernel_size > 7 else 0.0
        if erf_dir:
            os.makedirs(erf_dir, exist_ok=True)
            m = np.zeros((16, 16))
            half = min(arm.kernel_size // 2, 7)
            m[8 - half:9 + half, 8 - half:9 + half] = 1.0
            np.save(os.path.join(erf_dir, f"{arm.name}-{'time' if time_limit else 'epochs'}-s{seed}.npy"), m)
        return {"val_acc": ACC[seed] + offset - (5.0 if time_limit else 0.0), "val_loss": 0.5,
                "train_s": 2.0 + seed + (arm.kernel_size > 7), "epochs": 1.0, "kernel_size": arm.kernel_size,
                "module": arm.module, "width": 8, "rf_radius_px": 4 * arm.kernel_size, "params": 100,
                "params_nonzero": 60 if arm.sparse else 100, "erf": {"0.2": 0.1, "0.3": 0.2, "0.5": 0.3, "0.99": 0.9},
                "band_acc": [100.0, 0.0] if seed == 0 else [100.0, None]}
    return trainer


def test_study_runs_every_arm_aggregates_and_resumes(tmp_path):
    budget = get_budget("tiny", seeds=3)
    calls = []
    recs = run_study(budget, str(tmp_path), trainer=_fake_trainer(calls), command="test cmd", log=lambda s: None)
    arms = [a.name for a in build_arms(budget)]
    epoch_calls = [(a, s) for a, s, t in calls if t is None]
    assert sorted(epoch_calls) == sorted((a, s) for a in arms for s in range(3))
    # equal-time controls get the mean training time of the reference arm's equal-epoch runs
    assert reference_arm(budget) == "dec7"
    ref = np.mean([2.0 + s for s in range(3)])  # the fake's train_s of a kernel-7 arm
    time_calls = [(a, s, t) for a, s, t in calls if t is not None]
    assert sorted((a, s) for a, s, _ in time_calls) == sorted(
        (a, s) for a in budget.equal_time_arms for s in range(3))
    assert all(t == pytest.approx(ref) for _, _, t in time_calls)
    assert len(recs) == len(calls) == len(load_results(os.path.join(tmp_path, RESULTS_FILE)))
    assert all(r["command"] == "test cmd" and "machine" in r and r["wall_s"] >= 0 for r in recs)

    # aggregation against a hand computation: accuracies 60/70/80 -> mean 70, sample std 10
    rows = aggregate(recs)
    k3 = rows[("mxm3", "epochs")]
    assert k3["n"] == 3 and k3["acc_mean"] == pytest.approx(70.0) and k3["acc_std"] == pytest.approx(10.0)
    assert k3["acc_ci"] == pytest.approx(4.303 * 10.0 / math.sqrt(3))  # t(0.975, 2 df) = 4.303
    assert k3["train_s"] == pytest.approx(3.0)
    assert rows[("mxm3", "time")]["acc_mean"] == pytest.approx(65.0)
    # paired by seed: mxm9 (+10 every seed) - mxm3 = exactly 10 with no spread; sparse - mxm3 likewise 10
    assert paired_difference(rows, "mxm9", "mxm3") == (pytest.approx(10.0), pytest.approx(0.0), 3)
    assert verdict(paired_difference(rows, "mxm3", "mxm9")).endswith("no, the reverse")
    assert "not resolved" in verdict((1.0, 2.0, 3)) and verdict(None) == "not run"
    # "matches": the interval must lie within +-2 points; an interval excluding 0 is a difference
    assert verdict((0.5, 1.0, 4), "=").endswith("holds (within ±2 points)")
    assert verdict((-3.0, 1.0, 4), "=").endswith("no: lower") and verdict((0.5, 2.0, 4), "=").endswith("not resolved")
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)))
    assert mean_std([5.0]) == (5.0, None)

    # resume: nothing to do; then a lost (torn) last line is redone, and only that run
    calls.clear()
    run_study(budget, str(tmp_path), trainer=_fake_trainer(calls), log=lambda s: None)
    assert calls == []
    path = os.path.join(tmp_path, RESULTS_FILE)
    lines = open(path).read().splitlines()
    last = json.loads(lines[-1])
    with open(path, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # killed mid-write
    calls.clear()
    run_study(budget, str(tmp_path), trainer=_fake_trainer(calls), log=lambda s: None)
    assert [(a, s) for a, s, _ in calls] == [(last["arm"], last["seed"])]

    # a changed setting under the same budget name is a different run, never a reused one
    calls.clear()
    other = run_study(get_budget("tiny", seeds=1, epochs=2), str(tmp_path), trainer=_fake_trainer(calls),
                      equal_time=False, log=lambda s: None)
    assert len(calls) == len(arms) and len(other) == len(arms)
    calls.clear()
    run_study(budget, str(tmp_path), trainer=_fake_trainer(calls), log=lambda s: None)
    assert calls == []

    # table and plots (of the latest budget setting in the folder: re-run the 3-seed one last)
    with open(path, "a") as f:
        f.write(json.dumps(last) + "\n")
    paths = write_report(str(tmp_path))
    assert set(paths) == {"table", "acc_vs_kernel", "acc_by_distance", "acc_vs_nonzeros", "erf"}
    for p in paths.values():
        assert os.path.getsize(p) > 0
    md = open(paths["table"]).read()
    h = 4.303 * 10.0 / math.sqrt(3)
    # tiny: 8x8 map, so 3x3 ~ 3 * 56 / 8 = 21 at 224 px; the fake's reach is 4 * M = 12
    assert f"| 3 | 21 | 12 | 70.0 ± {h:.1f} (n=3) | - |" in md and f"80.0 ± {h:.1f} (n=3)" in md
    assert "## Accuracy per distance band" in md and "| mxm3 | 3x3 | 12 | 100 | 0 | 70.0 |" in md
    assert "## Equal training time" in md and f"65.0 ± {h:.1f} (n=3)" in md and "test cmd" in md
    assert "## The claims, as paired differences" in md and "## ERF" in md


def test_equal_time_needs_reference_arm(tmp_path):
    with pytest.raises(ConfigError, match="reference arm"):
        run_study(get_budget("tiny"), str(tmp_path), arm_names=["mxm3"], equal_time=True,
                  trainer=_fake_trainer([]), log=lambda s: None)


def test_markdown_report_single_seed_and_empty():
    assert "No finished runs" in markdown_report([])
    rec = {"budget": "tiny", "arm": "mxm7", "seed": 0, "mode": "epochs", "val_acc": 55.0, "module": "7x7",
           "series": "dense", "kernel_size": 7}
    assert "55.0 (n=1)" in markdown_report([rec])
    assert ci95([5.0]) == (5.0, None) and ci95([1.0, 3.0]) == (2.0, pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2)))


# ---------------------------------------------------------------------------------- real micro-run ----
def test_real_micro_runs_dense_sparse_and_equal_time(tmp_path):
    torch.set_num_threads(1)
    budget = get_budget("tiny")
    common = dict(seed=0, band=budget.band)
    splits = (CentreInsideness("train", 64, 32, 0.5, budget.d_min, budget.d_max, **common),
              CentreInsideness("val", 32, 32, 0.5, budget.d_min, budget.d_max, **common))
    data = lambda: splits
    arms = {a.name: a for a in build_arms(budget)}
    dense = train_run(arms["mxm3"], 0, budget, data, erf_dir=str(tmp_path))
    assert 0.0 <= dense["val_acc"] <= 100.0 and dense["steps"] == 2 and dense["params_nonzero"] == dense["params"]
    assert set(dense["erf"]) == {"0.2", "0.3", "0.5", "0.99"} and dense["rf_radius_px"] == 8
    assert len(dense["band_acc"]) == len(budget.band_edges()) - 1 and dense["large_kernel_density"] == 1.0
    erf = np.load(os.path.join(tmp_path, "mxm3-epochs-s0.npy"))
    assert erf.shape == (32, 32) and erf[:8].sum() == 0  # nothing beyond the 8 px receptive field
    sparse = train_run(arms["sparse_grad"], 0, budget, data)
    assert sparse["params_nonzero"] < sparse["params"] and 0.5 < sparse["density"] < 0.7
    timed = train_run(arms["mxm7"], 1, budget, data, time_limit=0.05)
    assert timed["steps"] >= 1 and timed["train_s"] < 5.0
    with pytest.raises(ConfigError):
        train_run(arms["sparse"], 0, budget, data, time_limit=1.0)


def test_sparse_arms_make_the_large_kernels_sparse_counted_from_the_weights():
    """The sparse claims are about sparse large kernels: count the zeros of the trained strips directly."""
    torch.set_num_threads(1)
    budget = get_budget("tiny", width=16)
    splits = (CentreInsideness("train", 64, 32, 0.5, budget.d_min, budget.d_max, seed=0, band=budget.band),
              CentreInsideness("val", 16, 32, 0.5, budget.d_min, budget.d_max, seed=0, band=budget.band))
    from slaknet.study.task import StudyTask, study_config
    from slaknet.train.trainer import Trainer

    for name in ("sparse", "sparse_w13"):
        arm = {a.name: a for a in build_arms(budget)}[name]
        cfg = study_config(budget, 0, 64, "cpu", False, None)
        trainer = Trainer(cfg, StudyTask(cfg, arm, budget, lambda: splits), out_dir=None, evaluate_during=False)
        trainer.fit()
        strips = [p for n, p in trainer.model.named_parameters() if ".LoRA" in n and n.endswith(".conv.weight")]
        assert len(strips) == 2
        for p in strips:  # every large-kernel weight has zeros, far more than chance would give
            zeros = float((p == 0).float().mean())
            assert 0.3 < zeros < 0.9, (name, zeros)
        trainer.engine.detach()


def test_parallel_runs_match_serial_runs(tmp_path):
    """--jobs 2 runs each arm in its own process: the same records (accuracy, steps, counts) as one at a time."""
    budget = get_budget("tiny", train_samples=64, val_samples=32, erf_images=0)
    arms = ["mxm3", "dec7", "sparse"]
    serial = run_study(budget, str(tmp_path / "a"), arms, equal_time=False, log=lambda s: None, progress=False)
    parallel = run_study(budget, str(tmp_path / "b"), arms, equal_time=False, log=lambda s: None, progress=False,
                         jobs=2)
    key = lambda r: r["arm"]
    for a, b in zip(sorted(serial, key=key), sorted(parallel, key=key)):
        assert a["arm"] == b["arm"] and a["val_acc"] == b["val_acc"] and a["steps"] == b["steps"]
        assert a["params_nonzero"] == b["params_nonzero"] and a["band_acc"] == b["band_acc"] and b["jobs"] == 2
    with pytest.raises(ConfigError):
        run_study(budget, str(tmp_path / "c"), arms, jobs=0, log=lambda s: None)


def test_cli_list_and_bad_arm(capsys, tmp_path):
    from slaknet.cli import main

    assert main(["study", "--list", "--budget", "short"]) == 0
    out = capsys.readouterr().out
    assert "sparse_w13" in out and "mxm17" in out and "bands 4, 8, 12, 16, 20, 24, 28 px" in out
    assert main(["study", "--budget", "tiny", "--arms", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown arm" in capsys.readouterr().err


def test_class_balance_from_cached_data(tmp_path):
    from slaknet.study.report import class_balance
    from slaknet.study.runner import StudyData

    budget = get_budget("tiny", train_samples=32, val_samples=16)
    train, val = StudyData(budget, cache_dir=str(tmp_path / "data")).get()
    frac = float(val.y.float().mean())
    rec = {"budget": "tiny", "arm": "mxm3", "seed": 0, "mode": "epochs", "val_acc": 50.0,
           "budget_config": budget.as_dict()}
    assert class_balance(str(tmp_path), [rec]) == pytest.approx(100 * max(frac, 1 - frac))
    from slaknet.study.report import band_inside_share

    lo, mid, hi = budget.band_edges()  # tiny: 3.2, 8, 12.8 px
    d, y = val.distances, val.y.numpy()
    near, far = (d >= lo) & (d < mid), (d >= mid) & (d <= hi)
    expect = [100.0 * y[m].mean() if m.any() else None for m in (near, far)]
    assert band_inside_share(str(tmp_path), [rec]) == pytest.approx(expect)
    # the cache is reused: same tensors without rendering
    again = StudyData(budget, cache_dir=str(tmp_path / "data")).get()
    assert torch.equal(again[1].x, val.x) and torch.equal(again[0].y, train.y)
