"""Aggregation over seeds, the markdown results table and the plots of a study's output folder."""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from slaknet.io import atomic_path

__all__ = ["aggregate", "mean_std", "markdown_report", "write_report", "class_balance", "SECTIONS"]

# (title, arms, mode, what the comparison asks)
SECTIONS: Tuple[Tuple[str, Tuple[str, ...], str, str], ...] = (
    ("Kernel scaling (equal epochs)", ("k3_bn", "k7_bn", "lk_small", "lk31", "lk51", "lk61", "lk51_mxm"), "epochs",
     "small kernels with BN and the SLaK module with only small kernels vs large kernels scaled to the input; "
     "decomposed vs undecomposed at the 51-equivalent"),
    ("Equal training time", ("k3_bn", "k7_bn", "lk_small"), "time",
     "the controls trained for the mean training time of lk51 (more epochs when they are cheaper)"),
    ("Sparsity", ("lk51", "lk51_sparse", "lk51_sparse_w13"), "epochs",
     "dense vs sparse at the same width (fewer non-zeros) vs sparse at 1.3x width (about the same non-zeros)"),
    ("Dynamic vs static masks", ("lk51_sparse", "lk51_sparse_static"), "epochs",
     "prune-and-regrow vs masks fixed at initialisation"),
    ("Random vs gradient growth", ("lk51_sparse", "lk51_sparse_grad"), "epochs", "regrowth criterion"),
)
ERF_KEYS = ("0.2", "0.3", "0.5", "0.99")


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1 in the denominator; ``None`` for a single value)."""
    v = [float(x) for x in values]
    if not v:
        return float("nan"), None
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def aggregate(records: Iterable[Dict[str, Any]]) -> "OrderedDict[Tuple[str, str], Dict[str, Any]]":
    """``{(arm, mode): row}`` with mean / std over seeds of accuracy and the means of time, counts, ERF.

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
        acc_m, acc_s = mean_std([r["val_acc"] for r in rs])
        row: Dict[str, Any] = {"arm": key[0], "mode": key[1], "n": len(rs), "seeds": [int(r["seed"]) for r in rs],
                               "acc_mean": acc_m, "acc_std": acc_s, "accs": [float(r["val_acc"]) for r in rs]}
        for f in ("train_s", "wall_s", "epochs", "params", "params_nonzero", "rf_radius_px", "kernel_size", "width",
                  "val_loss", "density"):
            vals = [float(r[f]) for r in rs if r.get(f) is not None]
            row[f] = sum(vals) / len(vals) if vals else None
        row["module"] = rs[0].get("module", "")
        erfs = [r["erf"] for r in rs if r.get("erf")]
        row["erf"] = {k: sum(e[k] for e in erfs) / len(erfs) for k in erfs[0]} if erfs else None
        out[key] = row
    return out


def _fmt_acc(row: Dict[str, Any]) -> str:
    if row["acc_std"] is None:
        return f"{row['acc_mean']:.1f} (n=1)"
    return f"{row['acc_mean']:.1f} ± {row['acc_std']:.1f} (n={row['n']})"


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


def class_balance(out_dir: str, records: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Share (%) of the majority class in the held-out split of the study's cached data, if present.

    A net that cannot see the contour predicts one class, so its accuracy is this share or 100 minus it,
    not exactly 50%.
    """
    if not records or not records[-1].get("budget_config"):
        return None
    from slaknet.study.arms import Budget
    from slaknet.study.runner import StudyData

    cfg = dict(records[-1]["budget_config"])
    cfg["equal_time_arms"] = tuple(cfg.get("equal_time_arms", ()))
    try:
        budget = Budget(**cfg)
    except TypeError:
        return None
    path = os.path.join(out_dir, "data", f"data-{StudyData(budget).key()}.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        frac = float(np.mean(z["val_y"]))
    return 100.0 * max(frac, 1.0 - frac)


def markdown_report(records: Sequence[Dict[str, Any]], majority: Optional[float] = None) -> str:
    """The results as markdown: setup, one table per comparison, ERF ratios, provenance."""
    if not records:
        return "# slaknet study\n\nNo finished runs yet.\n"
    rows = aggregate(records)
    b = records[-1].get("budget_config", {})
    size = b.get("image_size", "?")
    lines = [f"# slaknet study: budget `{records[-1]['budget']}`", ""]
    if b:
        lines += [f"Task: is the centre of a {size} px image inside a closed contour? Nearest ink "
                  f"{b['d_min'] * size:.0f}-{b['d_max'] * size:.0f} px from the centre (difficulty {b['difficulty']}, "
                  f"decoy probability {b.get('decoy', 0)}), "
                  f"{b['train_samples']} training / {b['val_samples']} held-out images, chance = 50%"
                  + (f" (majority class of the held-out split: {majority:.1f}%, so a net that always answers "
                     f"one class scores {100 - majority:.1f}% or {majority:.1f}%)." if majority else "."),
                  f"Net: stride-{b['stem']} stem, {b['depth']} SLaK block(s) of width {b['width']} at one "
                  f"{size // b['stem']}x{size // b['stem']} resolution, readout at the centre (no global pool); "
                  f"{b['epochs']} epochs, batch {b['batch_size']}, AdamW lr {b['lr']}, sparsity {b['sparsity']:.0%} "
                  f"(stem and head dense), topology update every {b['update_frequency']} steps.", ""]
    lines += ["Accuracy: held-out top-1 in %, mean ± sample std over seeds. RF: theoretical receptive-field "
              "half-width around the centre in px. Time: training seconds per run on the machine below.", ""]
    for title, arms, mode, what in SECTIONS:
        present = [rows[(a, mode)] for a in arms if (a, mode) in rows]
        if not present:
            continue
        lines += [f"## {title}", "", f"_{what}_", "",
                  "| arm | kernel module | RF px | width | non-zero params | accuracy % | epochs | train s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in present:
            lines.append(f"| {r['arm']} | {r['module']} | {_fmt_int(r['rf_radius_px'])} | {_fmt_int(r['width'])} | "
                         f"{_fmt_int(r['params_nonzero'])} | {_fmt_acc(r)} | "
                         f"{(r['epochs'] or 0):.1f} | {_fmt_s(r['train_s'])} |")
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
    lines += [f"- {len(records)} runs, {total / 60:.1f} min of run wall time in total; per-run numbers in "
              "results.jsonl", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots ----
def _plot_acc_vs_kernel(rows: Dict[Tuple[str, str], Dict[str, Any]], path: str, chance: float = 50.0) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    styles = {"epochs": ("o", "equal epochs", 0.0), "time": ("s", "equal training time", 0.25)}
    for mode, (marker, label, shift) in styles.items():
        pts = [r for (a, m), r in rows.items() if m == mode and a in SECTIONS[0][1]]
        if not pts:
            continue
        pts.sort(key=lambda r: (r["kernel_size"] or 0, r["arm"]))
        xs, seen = [], {}
        for r in pts:  # same kernel size (7x7 and the 7x5 SLaK module): spread sideways, label each
            k = r["kernel_size"] or 0
            xs.append(k + shift + 0.12 * seen.get(k, 0))
            seen[k] = seen.get(k, 0) + 1
        ax.errorbar(xs, [r["acc_mean"] for r in pts], yerr=[r["acc_std"] or 0.0 for r in pts], fmt=marker,
                    capsize=3, label=label, alpha=0.85)
        for x, r in zip(xs, pts):
            ax.annotate(r["arm"] + (" (time)" if mode == "time" else ""), (x, r["acc_mean"]),
                        textcoords="offset points", xytext=(4, 4 if mode == "epochs" else -10), fontsize=7)
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("large kernel size M (per block)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy vs kernel size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    """Seed-averaged ERF matrices of the smallest- and the largest-kernel arm with saved maps."""
    cands = []
    for a in ("k3_bn", "k7_bn", "lk_small", "lk31", "lk51", "lk61"):
        r = rows.get((a, "epochs"))
        if r is None:
            continue
        mats = []
        for s in r["seeds"]:
            p = os.path.join(erf_dir, f"{a}-epochs-s{s}.npy")
            if os.path.isfile(p):
                mats.append(np.load(p, allow_pickle=False))
        if mats:
            cands.append((f"{a} ({r['module']}, acc {r['acc_mean']:.0f}%)", np.mean(mats, axis=0)))
    if len(cands) < 2:
        return []
    small = cands[1] if cands[0][0].startswith("k3_bn") and len(cands) > 2 else cands[0]  # 7x7 when present
    return [small, cands[-1]]


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
        f.write(markdown_report(records, class_balance(out_dir, records)))
    paths["table"] = md
    if not records:
        return paths
    rows = aggregate(records)
    paths["acc_vs_kernel"] = os.path.join(out_dir, "acc_vs_kernel.png")
    _plot_acc_vs_kernel(rows, paths["acc_vs_kernel"])
    paths["acc_vs_nonzeros"] = os.path.join(out_dir, "acc_vs_nonzeros.png")
    _plot_acc_vs_nonzeros(rows, paths["acc_vs_nonzeros"])
    pair = _erf_pair(rows, os.path.join(out_dir, "erf"))
    if pair:
        from slaknet.analysis.erf import plot_erf_comparison

        paths["erf"] = os.path.join(out_dir, "erf.png")
        plot_erf_comparison(pair, paths["erf"])
    return paths
