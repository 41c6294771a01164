"""How ``auto`` picks a backend: repeated, interleaved timings with a margin, remembered per machine.

A *decision* is one question, e.g. "which depthwise-conv backend for a training call on a
``[8, 124, 56, 56]`` channels_last input with a 51x5 kernel, fp32, 1 thread?", named by a string key.
:func:`decide` answers it once per process:

1. from this process's memory, else from the per-machine cache file (below), else
2. by timing: each candidate runs once to warm up, then all candidates run in turn, alternating the
   order every round, for 3 to 7 rounds (beyond 3 only while the best candidate and ``plain`` are
   within twice the margin); calls shorter than 2 ms are repeated within one sample. A candidate that
   cannot win stops being timed (its best run above 2.5x the best median after one round, 2x later),
   one that raises is out. The fastest median wins only if it beats the baseline (``plain``) by at least
   :data:`MARGIN` (5%); otherwise the baseline is kept, so ``auto`` is not slower than ``plain`` beyond
   timing noise. Total timing per process is bounded by ``SLAKNET_AUTOTUNE_BUDGET`` seconds (default
   :data:`DEFAULT_BUDGET_S`; 0 = never time): past it, undecided questions get the caller's rule-based
   answer, which is not cached.

Cache: one small JSON file per machine, ``$SLAKNET_CACHE_DIR`` (else ``$XDG_CACHE_HOME/slaknet``, else
``~/.cache/slaknet``) ``/autotune-<id>.json``, where ``<id>`` hashes the machine identity (CPU model,
family / model / stepping and flags, logical CPU count, torch and slaknet versions), which the file also
stores. A file whose stored identity differs (another CPU or torch version), a corrupt or unreadable file
and an unwritable folder are ignored: the questions are timed again and the file is rewritten atomically
(:func:`slaknet.io.atomic_path`) where the folder allows. ``SLAKNET_CACHE_DIR=off`` disables the file.
The number of torch threads is part of every key, so 1- and 2-thread runs keep separate answers.

Only speed depends on these answers: every backend computes the same function within the tolerances of
tests/test_dwconv.py and tests/test_linear.py.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set

import torch

from slaknet.io import ENV_CACHE_DIR, atomic_path, cache_dir  # (cache_dir, ENV_CACHE_DIR: re-exported)

__all__ = ["decide", "lookup", "forget", "answers", "pin", "decisions", "stats", "reset", "generation", "cache_dir", "cache_path",
           "machine_identity", "cpu_model", "Decision", "TimingStats", "MARGIN", "DEFAULT_BUDGET_S",
           "ENV_CACHE_DIR", "ENV_BUDGET"]

ENV_BUDGET = "SLAKNET_AUTOTUNE_BUDGET"
MARGIN = 0.05  # a candidate must be >= 5% faster (median) than the baseline to replace it
DEFAULT_BUDGET_S = 90.0  # seconds of timing per process at most (SLaK-T 224 batch 8 on 1 thread: ~35 s)
MIN_ROUNDS, MAX_ROUNDS = 3, 7
MIN_SAMPLE_S, MAX_REPEAT = 0.002, 50  # one timing sample lasts >= 2 ms (short calls are repeated)
SCHEMA = 1
MAX_ENTRIES = 2000  # the file keeps the most recent answers (inputs of ever-changing sizes must not grow it forever)

logger = logging.getLogger("slaknet.autotune")


@dataclass
class Decision:
    """One answer: the chosen backend, where it came from ('timed', 'cache' or 'budget': the rule-based
    answer because the timing budget was spent) and, when timed, the median seconds per candidate."""

    choice: str
    source: str
    medians: Dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    seconds: float = 0.0
    failed: List[str] = field(default_factory=list)  # candidates that raised while timed (not cached then)


@dataclass
class TimingStats:
    """What deciding cost this process: seconds spent timing, and how many answers came from where."""

    seconds: float = 0.0
    timed: int = 0
    cached: int = 0
    budget: int = 0


_lock = threading.RLock()
_decided: Dict[str, Decision] = {}
_disk: Optional[Dict[str, dict]] = None  # the cache file's decisions, once read
_disk_path: Optional[str] = None
_warned: Set[str] = set()
_stats = TimingStats()
_generation = [0]  # bumped by forget() / reset(), so that callers can drop answers they memoized


# ----------------------------------------------------------------------------------------------- identity
@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU as precisely as the OS says: model name, vendor / family / model / stepping and a hash of the
    feature flags from /proc/cpuinfo (VMs often report a bare 'AMD EPYC'); ``platform`` elsewhere."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block describes the model
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    parts = [name or "unknown CPU"]
    ident = "/".join(fields.get(k, "") for k in ("vendor_id", "cpu family", "model", "stepping"))
    if ident.strip("/"):
        parts.append(ident)
    flags = fields.get("flags") or fields.get("Features")
    if flags:
        parts.append("flags " + hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:8])
    return ", ".join(parts)


def _slaknet_version() -> str:
    # the parent package is always imported before this module: read its version, no upward import
    return str(getattr(sys.modules.get("slaknet"), "__version__", "unknown"))


def machine_identity() -> Dict[str, object]:
    """What a cached answer is only valid for: this CPU, its logical CPU count, torch and slaknet versions."""
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count() or 0, "torch": torch.__version__,
            "slaknet": _slaknet_version(), "schema": SCHEMA}


def cache_path() -> Optional[str]:
    """This machine's cache file (one per machine identity, so machines sharing a home folder do not
    overwrite each other's answers), or None when the cache is off."""
    folder = cache_dir()
    if folder is None:
        return None
    ident = json.dumps(machine_identity(), sort_keys=True)
    return os.path.join(folder, f"autotune-{hashlib.sha1(ident.encode()).hexdigest()[:12]}.json")


def _budget() -> float:
    raw = os.environ.get(ENV_BUDGET)
    if raw is None or not raw.strip():
        return DEFAULT_BUDGET_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        _warn_once(f"budget:{raw}", "ignoring %s=%r (not a number of seconds)", ENV_BUDGET, raw)
        return DEFAULT_BUDGET_S


def _warn_once(tag: str, msg: str, *args: object) -> None:
    if tag not in _warned:
        _warned.add(tag)
        logger.info(msg, *args)


# ----------------------------------------------------------------------------------------------- the file
def _read(path: Optional[str]) -> Dict[str, dict]:
    """The valid decisions in ``path`` for this machine; {} (after one log line) for anything else."""
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        _warn_once(f"read:{path}", "ignoring the unreadable autotune cache %s (%s); it will be rewritten", path, exc)
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
        _warn_once(f"read:{path}", "ignoring the malformed autotune cache %s; it will be rewritten", path)
        return {}
    if data.get("machine") != machine_identity():
        _warn_once(f"stale:{path}", "ignoring the autotune cache %s: written for %s, this is %s; re-timing",
                   path, data.get("machine"), machine_identity())
        return {}
    return {k: v for k, v in data["decisions"].items()
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("choice"), str)}


def _load() -> Dict[str, dict]:
    global _disk, _disk_path
    path = cache_path()
    if _disk is None or path != _disk_path:
        _disk, _disk_path = _read(path), path
    return _disk


def _write(path: str, entries: Dict[str, dict]) -> None:
    if len(entries) > MAX_ENTRIES:  # keep the most recent ones ('when' sorts as text)
        keep = sorted(entries, key=lambda k: str(entries[k].get("when", "")))[-MAX_ENTRIES:]
        entries = {k: entries[k] for k in keep}
    payload = {"schema": SCHEMA, "machine": machine_identity(), "decisions": dict(sorted(entries.items()))}
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
    except OSError as exc:
        _warn_once(f"write:{path}", "cannot write the autotune cache %s (%s); answers are kept for this "
                   "process only", path, exc)


def _store(key: str, d: Decision) -> None:
    """Merge one timed answer into the file (re-read first: another process may have added answers)."""
    path = cache_path()
    if path is None:
        return
    entries = _read(path)
    entries[key] = {"choice": d.choice, "median_ms": {k: round(v * 1e3, 3) for k, v in d.medians.items()},
                    "rounds": d.rounds, "timing_s": round(d.seconds, 3),
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _load()[key] = entries[key]
    _write(path, entries)


# ----------------------------------------------------------------------------------------------- timing
def _pick(medians: Mapping[str, float], baseline: str) -> str:
    best = min(medians, key=lambda n: medians[n])
    if best != baseline and baseline in medians and medians[best] * (1.0 + MARGIN) > medians[baseline]:
        return baseline  # not a clear win: keep the baseline
    return best


def _time(candidates: Mapping[str, Callable[[], object]], baseline: str,
          sync: Optional[Callable[[], None]]) -> Decision:
    start = time.perf_counter()
    samples: Dict[str, List[float]] = {n: [] for n in candidates}

    repeat = 1

    def run(name: str) -> float:
        fn = candidates[name]
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        if sync is not None:
            sync()
        return (time.perf_counter() - t0) / repeat

    alive, warm, failed = [], [], []
    for name in candidates:  # warm-up (primitive creation, FFT plans, caches): not counted
        try:
            warm.append(run(name))
            alive.append(name)
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # cannot run these inputs: out
            logger.debug("autotune: candidate %r failed (%s)", name, exc)
            failed.append(name)
    if baseline not in alive:
        return Decision(baseline, "timed", {}, 0, time.perf_counter() - start, failed)
    # short calls: each sample repeats the call to last >= MIN_SAMPLE_S (timer and scheduler noise)
    repeat = max(1, min(MAX_REPEAT, math.ceil(MIN_SAMPLE_S / max(min(warm), 1e-7))))
    first = dict(zip(alive, warm))
    rounds = 0
    while len(alive) > 1 and rounds < MAX_ROUNDS:
        for name in (alive if rounds % 2 == 0 else alive[::-1]):
            try:
                samples[name].append(run(name))
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # e.g. out of memory: out
                logger.debug("autotune: candidate %r failed (%s)", name, exc)
                samples[name] = []
                failed.append(name)
        alive = [n for n in alive if samples[n]]
        rounds += 1
        if not alive:
            break
        meds = {n: statistics.median(samples[n]) for n in alive}
        best = min(meds.values())
        # a candidate whose best run is far above the best median cannot win: stop timing it (after one
        # round: best of warm-up and that round > 2.5x; later: best run > 2x). Noise only adds time.
        if rounds == 1:
            alive = [n for n in alive if min(samples[n][0], first[n]) <= 2.5 * best]
        else:
            alive = [n for n in alive if min(samples[n]) <= 2.0 * best]
        if rounds >= MIN_ROUNDS and alive:
            top = min(alive, key=lambda n: meds[n])
            close = baseline in alive and top != baseline and meds[baseline] <= meds[top] * (1.0 + 2 * MARGIN)
            if not close:
                break
    medians = {n: statistics.median(v) for n, v in samples.items() if v}
    choice = _pick(medians, baseline) if medians else baseline
    return Decision(choice, "timed", medians, rounds, time.perf_counter() - start, failed)


def decide(key: str, names: Sequence[str], make_candidates: Callable[[], Mapping[str, Callable[[], object]]],
           baseline: str = "plain", fallback: Optional[str] = None, device: str = "cpu") -> str:
    """The candidate to run for question ``key`` (see the module docstring).

    ``names``: the candidates that apply; ``make_candidates()`` (called only when timing is needed) maps
    each name to a zero-argument function running one representative call, which must not touch global
    state such as the RNG. ``baseline`` is kept unless another is :data:`MARGIN` faster; ``fallback``
    (default ``baseline``) answers once the timing budget is spent. ``device``: where the candidates run
    (CUDA is synchronized around each timing; autocast is off while timing).
    """
    known = _decided.get(key)  # hot path, no lock: one dict read
    if known is not None and known.choice in names:
        return known.choice
    if len(names) <= 1:
        return names[0] if names else baseline
    with _lock:
        known = _decided.get(key)
        if known is not None and known.choice in names:
            return known.choice
        cached = _load().get(key)
        if cached is not None and cached["choice"] in names:
            medians = cached.get("median_ms")
            medians = {k: v / 1e3 for k, v in medians.items() if isinstance(v, (int, float))} \
                if isinstance(medians, dict) else {}
            _decided[key] = Decision(cached["choice"], "cache", medians)
            _stats.cached += 1
            return cached["choice"]
        if _stats.seconds >= _budget():
            _warn_once("budget", "autotune budget (%s=%gs) spent: remaining choices use the built-in rules "
                       "for this process", ENV_BUDGET, _budget())
            _decided[key] = Decision(fallback or baseline, "budget")
            _stats.budget += 1
            return fallback or baseline
        if _stats.timed == 0:
            logger.info("auto: timing backends for shapes not seen on this machine yet (one-off; answers "
                        "cached in %s)", cache_path() or "memory only")
        candidates = {n: f for n, f in make_candidates().items() if n in names}
        sync = torch.cuda.synchronize if device == "cuda" else None
        if device in ("cpu", "cuda"):
            with torch.autocast(device, enabled=False):
                d = _time(candidates, baseline, sync)
        else:
            d = _time(candidates, baseline, sync)
        _stats.seconds += d.seconds
        _stats.timed += 1
        _decided[key] = d
        logger.debug("auto: %s -> %s (%s; %d rounds, %.2f s)", key, d.choice,
                     ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in d.medians.items()), d.rounds, d.seconds)
        if not d.failed:  # a failure may be passing (e.g. out of memory): time again next process
            _store(key, d)
        return d.choice


def lookup(key: str) -> Optional[Decision]:
    """The answer to ``key`` known to this process or its cache file, without timing anything."""
    with _lock:
        if key in _decided:
            return _decided[key]
        cached = _load().get(key)
        return Decision(cached["choice"], "cache") if cached is not None else None


def generation() -> int:
    """A number that changes whenever answers are forgotten (:func:`forget`, :func:`reset`)."""
    return _generation[0]


def forget(prefix: str = "") -> int:
    """Drop the answers whose key starts with ``prefix`` (all by default) from this process and from the
    cache file, so that the next calls time them again (``slaknet bench --retime``). Returns how many."""
    with _lock:
        _generation[0] += 1
        gone = [k for k in _decided if k.startswith(prefix)]
        for k in gone:
            del _decided[k]
        path = cache_path()
        entries = _read(path)
        stale = [k for k in entries if k.startswith(prefix)]
        if path is not None and (stale or os.path.exists(path)):
            for k in stale:
                del entries[k]
            _write(path, entries)
        _load()
        for k in stale:
            (_disk or {}).pop(k, None)
        return len(set(gone) | set(stale))


def answers() -> Dict[str, str]:
    """``{question: chosen backend}`` of this process (what a training checkpoint records, see :func:`pin`)."""
    with _lock:
        return {k: d.choice for k, d in _decided.items()}


def pin(chosen: Mapping[str, str]) -> None:
    """Answer these questions as given, without timing (a resumed run keeps the backends, hence the summation
    orders, it started with, whatever this machine's cache says now)."""
    with _lock:
        _generation[0] += 1
        for key, choice in chosen.items():
            _decided[str(key)] = Decision(str(choice), "pinned")


def decisions() -> Dict[str, Decision]:
    """The answers this process has used so far, by key."""
    with _lock:
        return dict(_decided)


def stats() -> TimingStats:
    """Timing cost and answer sources of this process so far (a copy)."""
    with _lock:
        return TimingStats(_stats.seconds, _stats.timed, _stats.cached, _stats.budget)


def reset() -> None:
    """Forget this process's answers and re-read the cache file on next use (the file is left alone)."""
    global _disk, _disk_path, _stats
    with _lock:
        _generation[0] += 1
        _decided.clear()
        _disk, _disk_path = None, None
        _warned.clear()
        _stats = TimingStats()
