"""Aggregation over seeds, the markdown results table and the plots of a study's output folder."""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from slaknet.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.study.arms import Budget

__all__ = ["aggregate", "mean_std", "ci95", "t975", "paired_difference", "verdict", "markdown_report", "write_report",
           "class_balance", "budget_of", "SPARSE_SECTIONS", "CLAIMS"]

ERF_KEYS = ("0.2", "0.3", "0.5", "0.99")
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# (title, arms, what the comparison asks): the sparse comparisons at the 51-equivalent
SPARSE_SECTIONS: Tuple[Tuple[str, Tuple[str, ...], str], ...] = (
    ("Sparsity", ("{ref}", "sparse", "sparse_w13"),
     "dense vs sparse at the same width (fewer non-zeros) vs sparse at 1.3x width (about the dense non-zeros)"),
    ("Dynamic vs static masks", ("sparse", "sparse_static"), "prune-and-regrow vs masks fixed at initialisation"),
    ("Random vs gradient growth", ("sparse", "sparse_grad"), "regrowth criterion"),
)
# (the paper's claim, arm a, arm b, expectation): ">" a beats b; "=" a matches b (within EQUIVALENCE points);
# judged by the paired (same seed) difference a - b and its 95% interval
CLAIMS: Tuple[Tuple[str, str, str, str], ...] = (
    ("sparse + 1.3x wider beats dense at about equal non-zeros", "sparse_w13", "{ref}", ">"),
    ("sparse at the same width keeps dense accuracy with fewer non-zeros", "sparse", "{ref}", "="),
    ("dynamic masks beat static masks", "sparse", "sparse_static", ">"),
    ("gradient regrowth is no better than random (the paper keeps random)", "sparse_grad", "sparse", "="),
    ("the decomposed 51-equivalent keeps the dense kernel's accuracy", "{ref}", "{ref_mxm}", "="),
    ("the 61-equivalent beats the 51-equivalent (decomposed)", "{ref61}", "{ref}", ">"),
)
EQUIVALENCE = 2.0  # points: "matches" holds when the whole 95% interval lies within +-2 points


def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1 in the denominator; ``None`` for a single value)."""
    v = [float(x) for x in values]
    if not v:
        return float("nan"), None
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def ci95(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and the half-width of its 95% t-interval over seeds (``None`` for fewer than two values)."""
    m, s = mean_std(values)
    return m, None if s is None else t975(len(values) - 1) * s / math.sqrt(len(values))


def aggregate(records: Iterable[Dict[str, Any]]) -> "OrderedDict[Tuple[str, str], Dict[str, Any]]":
    """``{(arm, mode): row}`` with mean / std / 95% interval over seeds of accuracy, the mean accuracy per
    distance band and the means of time, counts, ERF.

    When a results file holds the same ``(arm, seed, mode)`` twice (e.g. after copying files together),
    the later record wins.
    """
    latest: "OrderedDict[Tuple[str, str, int], Dict[str, Any]]" = OrderedDict()
    for r in records:
        latest[(r["arm"], r["mode"], int(r["seed"]))] = r
    groups: "OrderedDict[Tuple[str, str], List[Dict[str, Any]]]" = OrderedDict()
    for (arm, mode, _), r in latest.items():
        groups.setdefault((arm, mode), []).append(r)
    out: "OrderedDict[Tuple[str, str], Dict[str, Any]]" = OrderedDict()
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: int(r["seed"]))
        accs = [float(r["val_acc"]) for r in rs]
        acc_m, acc_s = mean_std(accs)
        row: Dict[str, Any] = {"arm": key[0], "mode": key[1], "n": len(rs), "seeds": [int(r["seed"]) for r in rs],
                               "acc_mean": acc_m, "acc_std": acc_s, "acc_ci": ci95(accs)[1], "accs": accs,
                               "series": rs[0].get("series", ""), "sparse": bool(rs[0].get("sparse"))}
        for f in ("train_s", "wall_s", "epochs", "params", "params_nonzero", "rf_radius_px", "kernel_size", "width",
                  "val_loss", "density", "large_kernel_density"):
            vals = [float(r[f]) for r in rs if r.get(f) is not None]
            row[f] = sum(vals) / len(vals) if vals else None
        bands = [r["band_acc"] for r in rs if r.get("band_acc")]
        row["band_acc"] = ([_mean_or_none([b[i] for b in bands]) for i in range(len(bands[0]))] if bands else None)
        row["module"] = rs[0].get("module", "")
        erfs = [r["erf"] for r in rs if r.get("erf")]
        row["erf"] = {k: sum(e[k] for e in erfs) / len(erfs) for k in erfs[0]} if erfs else None
        out[key] = row
    return out


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    v = [float(x) for x in values if x is not None]
    return sum(v) / len(v) if v else None


def paired_difference(rows: Dict[Tuple[str, str], Dict[str, Any]], a: str, b: str,
                      mode: str = "epochs") -> Optional[Tuple[float, Optional[float], int]]:
    """Mean of ``acc(a) - acc(b)`` over the seeds both arms ran (same seed: same data order and
    initialisation stream), the half-width of its 95% interval and the number of pairs; None without pairs."""
    ra, rb = rows.get((a, mode)), rows.get((b, mode))
    if ra is None or rb is None:
        return None
    acc_b = dict(zip(rb["seeds"], rb["accs"]))
    diffs = [x - acc_b[s] for s, x in zip(ra["seeds"], ra["accs"]) if s in acc_b]
    if not diffs:
        return None
    m, h = ci95(diffs)
    return m, h, len(diffs)


def verdict(diff: Optional[Tuple[float, Optional[float], int]], expect: str = ">") -> str:
    """The paired difference ``a - b`` in words: its mean and 95% interval and whether the claim holds.

    ``expect`` ``>``: holds when the whole interval is above 0, reversed when it is below 0; ``=``: holds when
    the whole interval lies within +-:data:`EQUIVALENCE` points, fails when it excludes 0; anything else is
    not resolved at this number of seeds.
    """
    if diff is None:
        return "not run"
    m, h, n = diff
    if h is None:
        return f"{m:+.1f} points (n={n}, no interval)"
    lo, hi = m - h, m + h
    if expect == "=":
        words = ("holds (within ±2 points)" if -EQUIVALENCE <= lo and hi <= EQUIVALENCE else
                 f"no: {'lower' if hi < 0 else 'higher'}" if lo > 0 or hi < 0 else "not resolved")
    else:
        words = "holds" if lo > 0 else ("no, the reverse" if hi < 0 else "not resolved")
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] (n={n}): {words}"


def _fmt_acc(row: Optional[Dict[str, Any]]) -> str:
    """``mean ± 95% half-width (n=seeds)``."""
    if row is None:
        return "-"
    if row["acc_ci"] is None:
        return f"{row['acc_mean']:.1f} (n=1)"
    return f"{row['acc_mean']:.1f} ± {row['acc_ci']:.1f} (n={row['n']})"


def _fmt_s(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 10 else f"{v:.0f}")


def _fmt_int(v: Optional[float]) -> str:
    return "-" if v is None else f"{int(round(v)):,}"


def _machines(records: Sequence[Dict[str, Any]]) -> List[str]:
    seen: "OrderedDict[str, List[float]]" = OrderedDict()
    for r in records:
        m = r.get("machine") or {}
        key = (f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')} with "
               f"{m.get('torch_threads', '?')} thread(s)" + (f", GPU {m['gpu']}" if m.get("gpu") else ""))
        seen.setdefault(key, []).extend((m.get("loadavg") or [])[:1])
    lines = []
    for k, loads in seen.items():
        load = f"; 1-min load average during runs {min(loads):.1f}-{max(loads):.1f}" if loads else ""
        lines.append(k + load)
    return lines


def budget_of(records: Sequence[Dict[str, Any]]) -> Optional["Budget"]:
    """The budget stored with the latest record (None for records without one, e.g. hand-made ones)."""
    from slaknet.study.arms import Budget

    if not records or not records[-1].get("budget_config"):
        return None
    cfg = dict(records[-1]["budget_config"])
    cfg["equal_time_arms"] = tuple(cfg.get("equal_time_arms", ()))
    try:
        return Budget(**cfg)
    except TypeError:
        return None


def _cached_val(out_dir: str, records: Sequence[Dict[str, Any]]
                ) -> Optional[Tuple["Budget", np.ndarray, np.ndarray]]:
    """The budget and the held-out labels and contour distances from the study's cached data, if present."""
    from slaknet.study.runner import StudyData

    budget = budget_of(records)
    if budget is None:
        return None
    path = os.path.join(out_dir, "data", f"data-{StudyData(budget).key()}.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return budget, z["val_y"], z["val_d"]


def class_balance(out_dir: str, records: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Share (%) of the majority class in the held-out split of the study's cached data, if present.

    A net that cannot see the contour predicts one class, so its accuracy is this share or 100 minus it,
    not exactly 50%.
    """
    cached = _cached_val(out_dir, records)
    if cached is None:
        return None
    frac = float(np.mean(cached[1]))
    return 100.0 * max(frac, 1.0 - frac)


def band_inside_share(out_dir: str, records: Sequence[Dict[str, Any]]) -> Optional[List[Optional[float]]]:
    """Share (%) of *inside* images per distance band of the held-out split (from the cached data), so a
    net that sees nothing and always answers one class is read correctly: it scores this or 100 minus it."""
    from slaknet.study.runner import band_accuracy

    cached = _cached_val(out_dir, records)
    if cached is None or not cached[0].graded:
        return None
    budget, y, d = cached
    return band_accuracy(y.astype(bool), d, budget.band_edges())


def _arm_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    lines = ["| arm | kernel module | reach px | width | non-zero params | large-kernel density | accuracy % "
             "| epochs | train s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lkd = r.get("large_kernel_density")
        lines.append(f"| {r['arm']} | {r['module']} | {_fmt_int(r['rf_radius_px'])} | {_fmt_int(r['width'])} | "
                     f"{_fmt_int(r['params_nonzero'])} | {'-' if lkd is None else f'{lkd:.2f}'} | {_fmt_acc(r)} | "
                     f"{(r['epochs'] or 0):.1f} | {_fmt_s(r['train_s'])} |")
    return lines + [""]


def _names(budget: Optional["Budget"]) -> Dict[str, str]:
    """Placeholders of the section and claim templates: the 51-equivalent decomposed and dense arms."""
    from slaknet.study.arms import reference_arm, scaled_kernel

    ref = reference_arm(budget) if budget is not None else "dec15"
    k61 = scaled_kernel(61, budget.feature_map, 3) if budget is not None else 17
    return {"ref": ref, "ref_mxm": "mxm" + ref[3:], "ref61": f"dec{k61}"}


def markdown_report(records: Sequence[Dict[str, Any]], majority: Optional[float] = None,
                    inside_share: Optional[Sequence[Optional[float]]] = None) -> str:
    """The results as markdown: setup, kernel scaling (overall and per distance band), equal time, the
    sparse comparisons, the claims as paired differences with 95% intervals, ERF ratios, provenance."""
    if not records:
        return "# slaknet study\n\nNo finished runs yet.\n"
    rows = aggregate(records)
    budget = budget_of(records)
    names = _names(budget)
    b = records[-1].get("budget_config", {})
    size = b.get("image_size", "?")
    lines = [f"# slaknet study: budget `{records[-1]['budget']}`", ""]
    if budget is not None:
        window = (f"each image draws its own {budget.band * size:.1f} px window for the contour's nearest point, "
                  f"the windows spread uniformly over {budget.d_min * size:.0f}-{budget.d_max * size:.1f} px from "
                  "the centre; no ink (decoys and clutter included) comes closer than the window"
                  if budget.graded else
                  f"nearest ink {budget.d_min * size:.0f}-{budget.d_max * size:.0f} px from the centre")
        lines += [f"Task: is the centre of a {size} px image inside a closed contour? {window[0].upper()}{window[1:]} "
                  f"(difficulty {budget.difficulty}, decoy probability {budget.decoy}), {budget.train_samples} "
                  f"training / {budget.val_samples} held-out images, chance = 50%"
                  + (f" (majority class of the held-out split: {majority:.1f}%)." if majority else "."),
                  f"Net: stride-{budget.stem} stem, {budget.depth} SLaK block(s) of width {budget.width} at one "
                  f"{budget.feature_map}x{budget.feature_map} resolution, BatchNorm after every depthwise kernel, "
                  f"readout at the centre (no global pool); {budget.epochs} epochs, batch {budget.batch_size}, AdamW "
                  f"lr {budget.lr}, sparse arms {budget.sparsity:.0%} sparse (ERK; stem and head dense), topology "
                  f"update every {budget.update_frequency} steps.", ""]
    lines += ["Accuracy: held-out top-1 in %, mean ± half-width of the 95% t-interval over seeds (n seeds). Reach: "
              "theoretical receptive-field half-width around the centre in px. Time: training seconds per run on "
              "the machine below.", ""]
    lines += _scaling_section(rows, budget)
    lines += _band_section(rows, budget, inside_share)
    timed = [(a, r) for (a, m), r in rows.items() if m == "time"]
    if timed:
        lines += ["## Equal training time", "",
                  f"_the small-kernel controls trained for the mean training time of {names['ref']} (more epochs "
                  "when they are cheaper)_", "",
                  "| arm | kernel module | reach px | accuracy %, equal epochs | accuracy %, equal time | epochs "
                  "| train s |", "|---|---|---:|---:|---:|---:|---:|"]
        for a, r in timed:
            lines.append(f"| {a} | {r['module']} | {_fmt_int(r['rf_radius_px'])} | {_fmt_acc(rows.get((a, 'epochs')))} "
                         f"| {_fmt_acc(r)} | {(r['epochs'] or 0):.1f} | {_fmt_s(r['train_s'])} |")
        lines.append("")
    for title, arms, what in SPARSE_SECTIONS:
        present = [rows[(a.format(**names), "epochs")] for a in arms if (a.format(**names), "epochs") in rows]
        if len(present) < 2:
            continue
        lines += [f"## {title}", "", f"_{what}_", ""] + _arm_table(present)
    claims = [(c, a.format(**names), b_.format(**names), e) for c, a, b_, e in CLAIMS]
    claims = [(c, a, b_, e, paired_difference(rows, a, b_)) for c, a, b_, e in claims]
    claims = [x for x in claims if x[4] is not None]
    if claims:
        lines += ["## The claims, as paired differences", "",
                  "_accuracy of the first arm minus the second, seed by seed (same data order and initialisation "
                  "stream), in points: mean [95% t-interval]; a claim that one arm beats the other holds when the "
                  "whole interval is above 0, a claim that they match when it lies within ±2 points_", "",
                  "| the paper's claim | arms | difference: verdict |", "|---|---|---|"]
        lines += [f"| {c} | {a} - {b_} | {verdict(d, e)} |" for c, a, b_, e, d in claims]
        lines.append("")
    erf_rows = [r for (a, m), r in rows.items() if m == "epochs" and r.get("erf")]
    if erf_rows:
        lines += ["## ERF: high-contribution area ratio of the trained models", "",
                  "_share of the image area in the smallest centred square holding t of the (log-scaled) "
                  "contribution; larger = wider effective receptive field; mean over seeds_", "",
                  "| arm | kernel module | " + " | ".join(f"t={float(k):.0%}" for k in ERF_KEYS) + " |",
                  "|---|---|" + "---:|" * len(ERF_KEYS)]
        for r in erf_rows:
            lines.append(f"| {r['arm']} | {r['module']} | "
                         + " | ".join(f"{r['erf'].get(k, float('nan')):.3f}" for k in ERF_KEYS) + " |")
        lines.append("")
    lines += ["## Provenance", ""]
    cmds = sorted({r.get("command") or "(python API)" for r in records})
    lines += [f"- command: `{c}`" for c in cmds]
    lines += [f"- machine: {m}" for m in _machines(records)]
    total = sum(float(r.get("wall_s", 0)) for r in records)
    jobs = max(int(r.get("jobs", 1)) for r in records)
    lines += [f"- {len(records)} runs, {total / 60:.1f} min of run wall time in total"
              + (f" ({jobs} runs at a time, so about {total / 60 / jobs:.1f} min of elapsed time)" if jobs > 1 else "")
              + "; per-run numbers in results.jsonl", ""]
    return "\n".join(lines)


def _ladder(rows: Dict[Tuple[str, str], Dict[str, Any]], series: str, mode: str = "epochs") -> List[Dict[str, Any]]:
    return sorted((r for (a, m), r in rows.items() if m == mode and r.get("series") == series),
                  key=lambda r: r["kernel_size"] or 0)


def _scaling_section(rows: Dict[Tuple[str, str], Dict[str, Any]], budget: Optional["Budget"]) -> List[str]:
    from slaknet.study.arms import paper_equivalent

    dense, dec = _ladder(rows, "dense"), _ladder(rows, "decomposed")
    if not dense and not dec:
        return []
    by_k: "OrderedDict[int, Dict[str, Dict[str, Any]]]" = OrderedDict()
    for series, rs in (("dense", dense), ("decomposed", dec)):
        for r in rs:
            by_k.setdefault(int(r["kernel_size"]), {})[series] = r
    fmap = budget.feature_map if budget is not None else None
    lines = ["## Kernel scaling (equal epochs)", "",
             "_one dense M x M kernel (plus the 5x5 above 5: the undecomposed form) and SLaK's decomposition "
             "M x 5 + 5 x M + 5 x 5, each branch with BatchNorm; the equivalent is the kernel spanning the same share "
             "of the 56 x 56 stage-1 map of a 224 px image_", "",
             "| M | ≈ at 224 px | reach px | dense M x M: accuracy % | decomposed: accuracy % | non-zero params "
             "(dense / decomposed) | train s (dense / decomposed) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for k in sorted(by_k):
        d, c = by_k[k].get("dense"), by_k[k].get("decomposed")
        any_ = d or c
        eq = f"{paper_equivalent(k, fmap):.0f}" if fmap else "-"
        lines.append(f"| {k} | {eq} | {_fmt_int(any_['rf_radius_px'])} | {_fmt_acc(d)} | {_fmt_acc(c)} | "
                     f"{_fmt_int(d and d['params_nonzero'])} / {_fmt_int(c and c['params_nonzero'])} | "
                     f"{_fmt_s(d and d['train_s'])} / {_fmt_s(c and c['train_s'])} |")
    return lines + [""]


def _band_section(rows: Dict[Tuple[str, str], Dict[str, Any]], budget: Optional["Budget"],
                  inside_share: Optional[Sequence[Optional[float]]] = None) -> List[str]:
    if budget is None or not budget.graded:
        return []
    edges = budget.band_edges()
    arms = [r for r in _ladder(rows, "dense") + _ladder(rows, "decomposed") if r.get("band_acc")]
    if not arms:
        return []
    heads = [f"{lo:.0f}-{hi:.0f} px" for lo, hi in zip(edges[:-1], edges[1:])]
    lines = ["## Accuracy per distance band (equal epochs)", "",
             "_held-out accuracy of the images whose contour's nearest point lies in each band, mean over seeds; "
             "a net should be at chance beyond its reach and above it within; the last row gives each band's "
             "share of inside images, so a net that sees nothing and always answers \"outside\" scores 100 "
             "minus it_", "",
             "| arm | kernel module | reach px | " + " | ".join(heads) + " | all |",
             "|---|---|---:|" + "---:|" * (len(heads) + 1)]
    for r in arms:
        cells = ["-" if v is None else f"{v:.0f}" for v in r["band_acc"]]
        lines.append(f"| {r['arm']} | {r['module']} | {_fmt_int(r['rf_radius_px'])} | " + " | ".join(cells)
                     + f" | {r['acc_mean']:.1f} |")
    if inside_share and len(inside_share) == len(heads):
        lines.append("| inside images, % | | | " + " | ".join("-" if v is None else f"{v:.0f}" for v in inside_share)
                     + " | |")
    return lines + [""]


# ------------------------------------------------------------------------------------------- plots ----
def _plot_acc_vs_kernel(rows: Dict[Tuple[str, str], Dict[str, Any]], path: str, chance: float = 50.0) -> None:
    """Accuracy vs kernel size: the dense and the decomposed ladder (95% intervals), equal-time controls."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    series = (("dense", "epochs", "o-", "dense M x M (+5x5)", -0.08), ("decomposed", "epochs", "s-",
              "decomposed M x 5 + 5 x M + 5 x 5", 0.08), ("dense", "time", "o", "dense, equal time", -0.24),
              ("decomposed", "time", "s", "decomposed, equal time", 0.24))
    for name, mode, fmt, label, shift in series:
        pts = _ladder(rows, name, mode)
        if not pts:
            continue
        ax.errorbar([r["kernel_size"] + shift for r in pts], [r["acc_mean"] for r in pts],
                    yerr=[r["acc_ci"] or 0.0 for r in pts], fmt=fmt, capsize=3, label=label, alpha=0.85,
                    mfc="none" if mode == "time" else None)
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("kernel size M on the feature map")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy vs kernel size (mean and 95% interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_bands(rows: Dict[Tuple[str, str], Dict[str, Any]], edges: Sequence[float], path: str) -> None:
    """Accuracy per distance band, one line per kernel size, dense and decomposed side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    mids = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    for ax, name in zip(axes, ("dense", "decomposed")):
        pts = [r for r in _ladder(rows, name) if r.get("band_acc")]
        cmap = __import__("matplotlib").colormaps["viridis"]
        for i, r in enumerate(pts):
            color = cmap(i / max(len(pts) - 1, 1))
            ys = [np.nan if v is None else v for v in r["band_acc"]]
            ax.plot(mids, ys, "o-", color=color, label=f"M={int(r['kernel_size'])} (reach {int(r['rf_radius_px'])})")
        ax.axhline(50.0, color="grey", ls="--", lw=1)
        ax.set_title(f"{name} kernels")
        ax.set_xlabel("distance of the contour from the centre (px)")
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("held-out accuracy (%)")
    _save(fig, path)


def _plot_acc_vs_nonzeros(rows: Dict[Tuple[str, str], Dict[str, Any]], path: str, chance: float = 50.0) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    pts = [r for (a, m), r in rows.items() if m == "epochs" and r.get("params_nonzero")]
    same: Dict[int, int] = {}
    for r in pts:
        sparse = r.get("density") is not None
        ax.errorbar([r["params_nonzero"]], [r["acc_mean"]], yerr=[r["acc_std"] or 0.0], fmt="^" if sparse else "o",
                    color="tab:red" if sparse else "tab:blue", capsize=3, alpha=0.85)
        k = int(round(r["params_nonzero"]))
        n = same.get(k, 0)  # equal non-zeros (sparse variants): stack the labels
        same[k] = n + 1
        ax.annotate(r["arm"], (r["params_nonzero"], r["acc_mean"]),
                    textcoords="offset points", xytext=(6, 4 - 11 * n), fontsize=7)
    ax.axhline(chance, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("non-zero parameters after training (log)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy vs non-zero parameters (blue dense, red sparse)")
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def _save(fig: Any, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or "png")


def _erf_pair(rows: Dict[Tuple[str, str], Dict[str, Any]], erf_dir: str) -> List[Tuple[str, np.ndarray]]:
    """Seed-averaged ERF matrices of the dense 7x7 (else the smallest kernel) and the largest decomposed
    kernel (else the largest dense one) with saved maps."""
    cands = []
    for r in _ladder(rows, "dense") + _ladder(rows, "decomposed"):
        a = r["arm"]
        mats = []
        for s in r["seeds"]:
            p = os.path.join(erf_dir, f"{a}-epochs-s{s}.npy")
            if os.path.isfile(p):
                mats.append(np.load(p, allow_pickle=False))
        if mats:
            cands.append((f"{a} ({r['module']}, acc {r['acc_mean']:.0f}%)", np.mean(mats, axis=0)))
    if len(cands) < 2:
        return []
    small = next((c for c in cands if c[0].startswith("mxm7 ")), cands[0])  # the ConvNeXt 7x7 when present
    return [small, cands[-1]] if cands[-1] is not small else []


def write_report(out_dir: str, records: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, str]:
    """Write ``results.md``, ``acc_vs_kernel.png``, ``acc_vs_nonzeros.png`` and ``erf.png`` (when ERF
    maps exist) into ``out_dir``; returns ``{name: path}``."""
    from slaknet.study.runner import RESULTS_FILE, load_results

    if records is None:
        records = load_results(os.path.join(out_dir, RESULTS_FILE))
        if records:  # one table per budget setting: that of the latest record
            key = "budget_id" if "budget_id" in records[-1] else "budget"
            records = [r for r in records if r.get(key) == records[-1].get(key)]
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    md = os.path.join(out_dir, "results.md")
    with atomic_path(md) as tmp, open(tmp, "w") as f:
        f.write(markdown_report(records, class_balance(out_dir, records), band_inside_share(out_dir, records)))
    paths["table"] = md
    if not records:
        return paths
    rows = aggregate(records)
    paths["acc_vs_kernel"] = os.path.join(out_dir, "acc_vs_kernel.png")
    _plot_acc_vs_kernel(rows, paths["acc_vs_kernel"])
    budget = budget_of(records)
    if budget is not None and budget.graded and any(r.get("band_acc") for r in rows.values()):
        paths["acc_by_distance"] = os.path.join(out_dir, "acc_by_distance.png")
        _plot_bands(rows, budget.band_edges(), paths["acc_by_distance"])
    paths["acc_vs_nonzeros"] = os.path.join(out_dir, "acc_vs_nonzeros.png")
    _plot_acc_vs_nonzeros(rows, paths["acc_vs_nonzeros"])
    pair = _erf_pair(rows, os.path.join(out_dir, "erf"))
    if pair:
        from slaknet.analysis.erf import plot_erf_comparison

        paths["erf"] = os.path.join(out_dir, "erf.png")
        plot_erf_comparison(pair, paths["erf"])
    return paths
