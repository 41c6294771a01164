"""Training one arm, and the resumable study loop that writes one JSON line per run.

A run is identified by ``(budget run id, arm, seed, mode)`` (the id hashes every budget setting that changes
a run, so ``--epochs 2`` in a folder of 8-epoch runs starts new runs instead of reusing old ones) with ``mode`` ``epochs`` (the budget's epochs) or
``time`` (the same wall-clock training time as the reference arm, :func:`reference_arm`). Finished runs are
appended to ``OUT/results.jsonl`` at once (flushed and fsync'ed), and a restarted study skips every run
already there, so an interrupted study loses at most the run in progress.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from slaknet.errors import ConfigError
from slaknet.io import atomic_path
from slaknet.study.arms import Arm, Budget, reference_arm, select_arms
from slaknet.study.data import CentreInsideness
from slaknet.study.model import StudyNet, receptive_radius

__all__ = ["StudyData", "build_model", "train_run", "run_study", "load_results", "run_key", "machine_info",
           "RESULTS_FILE"]

RESULTS_FILE = "results.jsonl"
TrainRunFn = Callable[..., Dict[str, Any]]


# ---------------------------------------------------------------------------------------------- data ----
class StudyData:
    """The train/val splits of a budget, rendered on first use and cached as ``.npz`` in a folder."""

    def __init__(self, budget: Budget, cache_dir: Optional[str] = None, progress: bool = False) -> None:
        self.budget, self.cache_dir, self.progress = budget, cache_dir, progress
        self._splits: Optional[Tuple[CentreInsideness, CentreInsideness]] = None
        self.load_s = 0.0  # seconds spent rendering / loading, not yet charged to a run

    def key(self) -> str:
        b = self.budget
        spec = (b.image_size, b.difficulty, b.d_min, b.d_max, b.decoy, b.data_seed, b.train_samples,
                b.val_samples, 2) + ((b.band,) if b.graded else ())
        return hashlib.sha1(repr(spec).encode()).hexdigest()[:10]

    def get(self) -> Tuple[CentreInsideness, CentreInsideness]:
        if self._splits is None:
            t0 = time.perf_counter()
            self._splits = self._load() or self._render()
            self.load_s += time.perf_counter() - t0
        return self._splits

    def take_load_time(self) -> float:
        t, self.load_s = self.load_s, 0.0
        return t

    def _path(self) -> Optional[str]:
        return os.path.join(self.cache_dir, f"data-{self.key()}.npz") if self.cache_dir else None

    def _load(self) -> Optional[Tuple[CentreInsideness, CentreInsideness]]:
        path = self._path()
        if not path or not os.path.isfile(path):
            return None
        with np.load(path, allow_pickle=False) as z:
            out = []
            for split in ("train", "val"):
                ds = CentreInsideness.__new__(CentreInsideness)
                ds.split, ds.image_size, ds.difficulty = split, self.budget.image_size, self.budget.difficulty
                ds.d_min, ds.d_max, ds.seed = self.budget.d_min, self.budget.d_max, self.budget.data_seed
                ds.decoy, ds.band = self.budget.decoy, self.budget.band
                ds.x, ds.y = torch.from_numpy(z[f"{split}_x"]), torch.from_numpy(z[f"{split}_y"])
                ds.distances = z[f"{split}_d"]
                out.append(ds)
        return out[0], out[1]

    def _render(self) -> Tuple[CentreInsideness, CentreInsideness]:
        b = self.budget
        common = dict(image_size=b.image_size, difficulty=b.difficulty, d_min=b.d_min, d_max=b.d_max,
                      seed=b.data_seed, progress=self.progress, decoy=b.decoy, band=b.band)
        tr = CentreInsideness("train", b.train_samples, **common)
        va = CentreInsideness("val", b.val_samples, **common)
        path = self._path()
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)  # type: ignore[arg-type]
            with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: no ".npz" appended
                np.savez(f, train_x=tr.x.numpy(), train_y=tr.y.numpy(), train_d=tr.distances,
                         val_x=va.x.numpy(), val_y=va.y.numpy(), val_d=va.distances)
        return tr, va


# ----------------------------------------------------------------------------------------- one run ----
def build_model(arm: Arm, budget: Budget) -> StudyNet:
    """The arm's network for the budget (same depth / width / stem / head for every arm)."""
    return StudyNet(width=budget.width, depth=budget.depth, stem=budget.stem, **arm.model_kwargs())


def _erf(model: StudyNet, ds: CentreInsideness, n: int, device: torch.device) -> np.ndarray:
    """Mean ERF map (gradient of the centre readout w.r.t. the input) over the first ``n`` val images."""
    from slaknet.analysis.erf import compute_erf

    images = (ds.batch(torch.tensor([i]))[0][0] for i in range(min(n, len(ds))))
    model.eval()
    res = compute_erf(model.centre_map, images, device=device, name="study", progress=False)
    return res.matrix


def _counts(model: torch.nn.Module, budget: Budget) -> Dict[str, int]:
    """Total and non-zero parameters (the real zeros after training) and MACs from count_model."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    out: Dict[str, Any] = {"params": int(params), "params_nonzero": int(nonzero)}
    from slaknet.sparse.selection import select_parameters

    large = [p for _, _, p in select_parameters(model, "large_kernel")]
    if large:  # the large kernels' own density, counted from the trained weights (not the engine's report)
        out["large_kernel_density"] = sum(int((p != 0).sum()) for p in large) / sum(p.numel() for p in large)
    try:
        from slaknet.analysis.counting import count_model

        c = count_model(model, budget.image_size, in_chans=1)
        out.update(macs_dense=int(c.macs_dense), macs_nonzero=int(c.macs_nonzero))
    except Exception as exc:  # counting is a report nicety; never lose a finished run over it
        out["count_error"] = f"{type(exc).__name__}: {exc}"
    return out


def train_run(arm: Arm, seed: int, budget: Budget, data: Callable[[], Tuple[CentreInsideness, CentreInsideness]],
              time_limit: Optional[float] = None, device: str = "cpu", progress: bool = False,
              erf_dir: Optional[str] = None) -> Dict[str, Any]:
    """Train ``arm`` with ``seed`` on the shared Trainer; returns the run's metrics (accuracy, loss, time,
    counts, ERF ratios).

    ``time_limit`` (seconds of training, excluding evaluation): train for that long instead of the budget's
    epochs; the cosine schedule is re-planned from the step time measured over the first steps.
    """
    from slaknet.study.task import StudyTask, study_config
    from slaknet.train.callbacks import LossCurve, TimeBudget
    from slaknet.train.trainer import Trainer

    if arm.sparse and time_limit is not None:
        raise ConfigError(f"arm {arm.name}: equal-time runs are for dense arms only")
    n_train = len(data()[0])
    cfg = study_config(budget, seed, n_train, device, progress, time_limit)
    losses = LossCurve()
    callbacks: List[Any] = [losses] + ([TimeBudget(time_limit)] if time_limit is not None else [])
    trainer = Trainer(cfg, StudyTask(cfg, arm, budget, data), out_dir=None, callbacks=callbacks,
                      evaluate_during=False)
    trainer.fit()
    model, steps_per_epoch = trainer.model, trainer.plan.steps_per_epoch
    ev = trainer.task.evaluate(trainer.run, model, per_image=True)
    rec: Dict[str, Any] = {
        "val_acc": ev["top1"], "val_loss": ev["loss"],
        "band_acc": band_accuracy(ev["correct"].numpy(), data()[1].distances, budget.band_edges()),
        "train_loss_last": float(np.mean(losses.losses[-max(1, steps_per_epoch):])),
        "steps": trainer.state.step, "epochs": trainer.state.step / steps_per_epoch, "train_s": trainer.state.elapsed,
        "kernel_size": arm.kernel_size, "module": arm.module, "width": model.dim,
        "rf_radius_px": receptive_radius(arm.kernel_size, budget.depth, budget.stem),
    }
    rec.update(_counts(model, budget))
    if trainer.engine is not None:
        e = trainer.engine
        rec.update(density=e.global_density(), itop_rate=e.itop_rate(), sparse_updates=e.update_count)
        e.detach()
    if budget.erf_images > 0:
        _save_erf(rec, model, trainer.data.val, budget, trainer.device, arm, seed, time_limit, erf_dir)
    return rec


def band_accuracy(correct: np.ndarray, distances: np.ndarray, edges: Sequence[float]) -> List[Optional[float]]:
    """Accuracy (%) of the images whose nearest contour lies in each band ``[edges[i], edges[i+1])`` (the
    last band closed); None for an empty band."""
    out: List[Optional[float]] = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        sel = (distances >= lo) & ((distances <= hi) if last else (distances < hi))
        out.append(100.0 * float(correct[sel].mean()) if sel.any() else None)
    return out


def _save_erf(rec: Dict[str, Any], model: StudyNet, val: CentreInsideness, budget: Budget, dev: torch.device,
              arm: Arm, seed: int, time_limit: Optional[float], erf_dir: Optional[str]) -> None:
    from slaknet.analysis.erf import area_ratios

    m = _erf(model, val, budget.erf_images, dev)
    rec["erf"] = {f"{t:g}": r for t, (_, r) in area_ratios(m).items()}
    if erf_dir:
        os.makedirs(erf_dir, exist_ok=True)
        name = os.path.join(erf_dir, f"{arm.name}-{'time' if time_limit else 'epochs'}-s{seed}.npy")
        with atomic_path(name) as tmp, open(tmp, "wb") as f:
            np.save(f, m)


# --------------------------------------------------------------------------------------------- study ----
def machine_info() -> Dict[str, Any]:
    """Where a run happened: host, CPU, core count, torch threads, load average (the CPU may be shared)."""
    from slaknet.layers.autotune import cpu_model

    info: Dict[str, Any] = {"host": platform.node(), "platform": platform.platform(), "cpu": cpu_model(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_key(rec: Dict[str, Any]) -> Tuple[str, str, int, str]:
    """``(budget run id, arm, seed, mode)``: a run is redone when any budget setting differs."""
    return (str(rec.get("budget_id", rec["budget"])), str(rec["arm"]), int(rec["seed"]), str(rec["mode"]))


def load_results(path: str) -> List[Dict[str, Any]]:
    """Records of a results file; a torn last line (killed mid-write) is ignored."""
    out: List[Dict[str, Any]] = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _append(path: str, rec: Dict[str, Any]) -> None:
    torn = False
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:  # a line torn by a kill has no newline: never glue a record to it
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _plan(budget: Budget, arms: Sequence[Arm], seeds: Sequence[int], equal_time: bool) -> List[Tuple[Arm, int, str]]:
    plan = [(a, s, "epochs") for a in arms for s in seeds]
    if equal_time:
        names, ref = {a.name for a in arms}, reference_arm(budget)
        if ref not in names:
            raise ConfigError(f"equal-time runs need the reference arm {ref!r} in the study "
                              "(or pass --no-equal-time)")
        plan += [(a, s, "time") for a in arms if a.name in budget.equal_time_arms for s in seeds]
    return plan


def _one_run(trainer: TrainRunFn, arm: Arm, seed: int, budget: Budget, data: "StudyData", limit: Optional[float],
             device: str, progress: bool, erf_dir: str) -> Tuple[Dict[str, Any], Dict[str, Any], float, float]:
    """One run: ``(metrics, machine, wall seconds without data loading, data seconds)``."""
    machine = machine_info()
    t0 = time.perf_counter()
    metrics = trainer(arm, seed, budget, data.get, time_limit=limit, device=device, progress=progress, erf_dir=erf_dir)
    data_s = data.take_load_time()
    return metrics, machine, time.perf_counter() - t0 - data_s, data_s


def _worker_run(trainer: TrainRunFn, arm: Arm, seed: int, budget: Budget, cache_dir: str, limit: Optional[float],
                device: str, erf_dir: str, threads: int) -> Tuple[Dict[str, Any], Dict[str, Any], float, float]:
    """:func:`_one_run` in a worker process (the data come from the folder's cache, rendered beforehand)."""
    torch.set_num_threads(threads)
    return _one_run(trainer, arm, seed, budget, StudyData(budget, cache_dir), limit, device, False, erf_dir)


Result = Tuple[Dict[str, Any], Dict[str, Any], float, float]  # metrics, machine, wall s, data s


def _execute(runs: Sequence[Tuple[Arm, int, str]], jobs: int, one: Callable[[Arm, int, Optional[float]], Result],
             worker_args: Callable[[Arm, int, Optional[float]], Tuple[Any, ...]],
             time_limit: Callable[[str], Optional[float]],
             record: Callable[[Arm, int, str, Optional[float], Result], None]) -> None:
    """Run ``runs`` (one phase) one at a time in this process (``jobs == 1``) or ``jobs`` at a time in
    spawned processes (:func:`_worker_run` with ``worker_args``), recording each as it finishes."""
    if jobs == 1:
        for arm, seed, mode in runs:
            limit = time_limit(mode)
            record(arm, seed, mode, limit, one(arm, seed, limit))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=int(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for arm, seed, mode in runs:
            limit = time_limit(mode)
            futures[pool.submit(_worker_run, *worker_args(arm, seed, limit))] = (arm, seed, mode, limit)
        try:
            for fut in as_completed(futures):
                record(*futures[fut], fut.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def run_study(budget: Budget, out_dir: str, arm_names: Optional[Sequence[str]] = None,
              seeds: Optional[Sequence[int]] = None, equal_time: Optional[bool] = None,
              trainer: TrainRunFn = train_run, command: str = "", device: str = "cpu", progress: bool = True,
              log: Callable[[str], None] = print, jobs: int = 1) -> List[Dict[str, Any]]:
    """Run every missing ``(arm, seed, mode)`` of the study and return all of this budget's records.

    ``trainer(arm, seed, budget, data, time_limit=..., device=..., progress=..., erf_dir=...)`` returns a
    run's metrics; the default trains for real, tests inject a fast fake. ``jobs``: runs at a time, each in
    its own process with the current number of torch threads (``trainer`` must then be a module-level
    function); equal-time controls start once every reference run has finished.
    """
    arms = select_arms(budget, arm_names)
    seeds = list(range(budget.seeds)) if seeds is None else [int(s) for s in seeds]
    equal_time = budget.equal_time if equal_time is None else bool(equal_time)
    if int(jobs) < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS_FILE)
    records = load_results(path)
    done = {run_key(r) for r in records}
    plan = _plan(budget, arms, seeds, equal_time)
    bid, ref = budget.run_id(), reference_arm(budget)
    todo = [(a, s, m) for a, s, m in plan if (bid, a.name, s, m) not in done]
    log(f"slaknet study: budget {budget.name}, {len(arms)} arms x {len(seeds)} seeds"
        f"{' + equal-time controls' if equal_time else ''}: {len(plan)} runs, {len(plan) - len(todo)} already in "
        f"{path}, {len(todo)} to run" + (f", {jobs} at a time" if jobs > 1 and todo else ""))
    cache_dir, erf_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "erf")
    data = StudyData(budget, cache_dir=cache_dir, progress=progress)
    before = len(records)

    def record(arm: Arm, seed: int, mode: str, limit: Optional[float], result: Result) -> None:
        metrics, machine, wall_s, data_s = result
        rec = {"budget": budget.name, "budget_id": bid, "arm": arm.name, "seed": seed, "mode": mode,
               "groups": list(arm.groups), "series": arm.series, "time_limit_s": limit, "wall_s": wall_s,
               "data_s": data_s, "jobs": int(jobs), "command": command,
               "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine, "budget_config": budget.as_dict(), "paper": arm.paper,
               "description": arm.description, "sparse": arm.sparse}
        rec.update(metrics)
        _append(path, rec)
        records.append(rec)
        log(f"[{len(records) - before}/{len(todo)}] {arm.name} seed {seed} ({mode}): val acc "
            f"{rec.get('val_acc', float('nan')):.1f}% in {wall_s:.0f}s")

    def time_limit(mode: str) -> Optional[float]:
        if mode != "time":
            return None
        times = [r["train_s"] for r in records if r.get("budget_id") == bid and r.get("seed") in seeds
                 and r.get("arm") == ref and r.get("mode") == "epochs"]
        if not times:
            raise ConfigError(f"no finished {ref} run to take the equal-time budget from")
        return float(np.mean(times))

    if jobs > 1 and todo:
        data.get()  # render (or load) once here; the workers read the cached file
        data.take_load_time()
    for phase in ("epochs", "time"):  # the equal-time controls need the reference runs' times first
        _execute([r for r in todo if r[2] == phase], int(jobs),
                 lambda a, s, lim: _one_run(trainer, a, s, budget, data, lim, device, progress, erf_dir),
                 lambda a, s, lim: (trainer, a, s, budget, cache_dir, lim, device, erf_dir, torch.get_num_threads()),
                 time_limit, record)
    return [r for r in records if r.get("budget_id") == bid]
