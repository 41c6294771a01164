"""Inference through onnxruntime from an ONNX export made once per model and kept in the user's cache.

At batch 1 on a CPU, a small model's eager forward is mostly per-op overhead that onnxruntime does not
have (``slak_pico`` at 64 px: ~5 ms reparameterized eager vs ~0.8 ms onnxruntime, docs/speed.md "Small
models, batch 1"); a large one can be faster in torch (SLaK-T at 224 px, 1 thread: 352 ms eager vs 624 ms
onnxruntime, docs/speed.md "int8 inference"). :func:`inference_runner` picks the runtime: ``torch``,
``onnxruntime``, or ``auto``: torch off the CPU or without onnxruntime; on the CPU, whichever of the two
is faster for this architecture, input shape and thread count on this machine, timed once on the first
input by :func:`slaknet.layers.autotune.decide` (interleaved rounds, onnxruntime must win by 5%) and
cached per machine with the backend choices (``SLAKNET_AUTOTUNE_BUDGET=0``: no timing, onnxruntime). For
onnxruntime it

1. names the export by a fingerprint of the model (SHA-256 of its ``repr`` and state dict, the input
   shape, the reparameterized form and the slaknet / torch / onnxruntime versions), so any change of
   weights, architecture or versions makes a new file;
2. loads ``<cache dir>/onnx/<variant>-<fingerprint>.onnx`` (the cache folder of
   :func:`slaknet.io.cache_dir`: ``$SLAKNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/slaknet``, else
   ``~/.cache/slaknet``), or, when it is missing or does not load (a corrupt file), exports the model
   with :func:`slaknet.deploy.export.export_model` (reparameterized strips, any batch, fixed height x
   width, verified against eager) and writes it atomically. The folder keeps the :data:`MAX_CACHED` most
   recently used exports. ``SLAKNET_CACHE_DIR=off``: the export lives in a temporary folder for this
   process only;
3. checks the session against eager PyTorch on the first real input (``max|ort - torch| <= tolerance *
   max(1, max|torch|)``, the export check's rule) and falls back to torch, saying why, when it differs or
   when the export fails.

Nothing is downloaded. The result says in one line what runs and why (:attr:`InferenceRunner.note`).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from slaknet.errors import ConfigError

__all__ = ["RUNTIMES", "MAX_CACHED", "InferenceRunner", "inference_runner", "onnxruntime_version",
           "model_fingerprint", "runtime_question", "onnx_cache_folder", "cached_onnx", "scaled_difference"]

RUNTIMES = ("auto", "torch", "onnxruntime")
MAX_CACHED = 8  # exports kept in the cache folder (least recently used removed first)
INSTALL_HINT = "pip install '.[export]' in the slaknet clone"
_TEMP_FOLDER: List[str] = []  # this process's folder when the cache is off


def onnxruntime_version() -> Optional[str]:
    """onnxruntime's version, or None when it cannot be imported (the ``export`` extra is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(getattr(onnxruntime, "__version__", "unknown"))


def model_fingerprint(model: nn.Module, input_shape: Sequence[int], reparameterize: str = "strips") -> str:
    """Hex SHA-256 naming what an export depends on: architecture (``repr``), every state-dict tensor
    (names, dtypes, shapes, bytes), input ``(C, H, W)``, the reparameterized form and the versions."""
    import slaknet

    h = hashlib.sha256()
    versions = (getattr(slaknet, "__version__", "?"), torch.__version__, onnxruntime_version())
    h.update(repr((type(model).__qualname__, repr(model), tuple(int(s) for s in input_shape), reparameterize,
                   versions)).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def runtime_question(model: nn.Module, example_shape: Sequence[int]) -> str:
    """The autotune key of ``auto``'s choice between torch and onnxruntime: the architecture (``repr`` and
    state-dict shapes, not the weights' values), the input shape, torch's thread count and onnxruntime's
    version (the machine, torch and slaknet versions are the cache file's own identity)."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
    variant = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__)
    shape = "x".join(str(int(s)) for s in example_shape)
    return (f"runtime/cpu/{variant}/{h.hexdigest()[:12]}/{shape}/t{torch.get_num_threads()}/"
            f"ort{onnxruntime_version()}")


def onnx_cache_folder() -> str:
    """Where cached exports live: ``<cache dir>/onnx``, or a temporary folder removed at exit when
    ``SLAKNET_CACHE_DIR=off``."""
    from slaknet.io import cache_dir

    folder = cache_dir()
    if folder is not None:
        return os.path.join(folder, "onnx")
    if not _TEMP_FOLDER:
        _TEMP_FOLDER.append(tempfile.mkdtemp(prefix="slaknet-onnx-"))
        atexit.register(shutil.rmtree, _TEMP_FOLDER[0], True)
    return _TEMP_FOLDER[0]


def _prune(folder: str, keep: str) -> None:
    """Remove all but the MAX_CACHED most recently used exports (never ``keep``); errors are ignored."""
    try:
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".onnx")]
        files.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        for path in files[MAX_CACHED:]:
            if os.path.abspath(path) != os.path.abspath(keep):
                os.unlink(path)
    except OSError:
        pass


@dataclass
class CachedOnnx:
    """A loaded ONNX export: the file, the session's ``tensor -> tensor`` function and how it was obtained."""

    path: str
    run: Callable[[torch.Tensor], torch.Tensor]
    built: bool  # exported by this call (False: loaded from the cache)
    seconds: float  # export (when built) plus session creation
    rebuilt_reason: str = ""  # why an existing file was not used


def cached_onnx(model: nn.Module, input_shape: Sequence[int], reparameterize: str = "strips",
                tolerance: Optional[float] = None) -> CachedOnnx:
    """Load the cached ONNX export of ``model`` for inputs ``(C, H, W)`` (any batch), exporting it first
    when it is missing or unreadable (module docstring). Raises when onnxruntime or the exporter is missing
    or the export fails its check against eager (the file is then removed)."""
    from slaknet.deploy.export import DEFAULT_TOLERANCE, ExportVerificationError, export_model, load_exported

    if onnxruntime_version() is None:
        raise ConfigError(f"the onnxruntime runtime needs onnxruntime: {INSTALL_HINT}")
    c, h, w = (int(s) for s in input_shape)
    variant = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__)
    folder = onnx_cache_folder()
    path = os.path.join(folder, f"{variant}-{c}x{h}x{w}-{model_fingerprint(model, (c, h, w), reparameterize)[:20]}.onnx")
    start = time.perf_counter()
    reason = ""
    if os.path.isfile(path):
        try:
            run = load_exported(path, "onnx")
            try:
                os.utime(path)  # most recently used
            except OSError:
                pass
            return CachedOnnx(path, run, False, time.perf_counter() - start)
        except Exception as exc:  # a truncated or corrupt file: export again
            reason = f"the cached file did not load ({type(exc).__name__}); exported again"
    try:
        export_model(model, path, "onnx", reparameterize=reparameterize, input_size=(c, h, w), batch_size=2,
                     dynamic_batch=True, dynamic_spatial=False, verify=True,
                     tolerance=tolerance or DEFAULT_TOLERANCE, metadata={"cache_key": os.path.basename(path)})
    except ExportVerificationError:
        if os.path.isfile(path):
            os.unlink(path)
        raise
    _prune(folder, path)
    return CachedOnnx(path, load_exported(path, "onnx"), True, time.perf_counter() - start, reason)


def scaled_difference(out: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    """``(max|out - ref|, that / max(1, max|ref|))``: the export check's measure (NaN counts as infinite)."""
    out, ref = out.detach(), ref.detach()
    diff = float((out.float() - ref.float()).abs().max())
    if diff != diff:
        return float("inf"), float("inf")
    return diff, diff / max(1.0, float(ref.abs().max()))


@dataclass
class InferenceRunner:
    """What runs a model's inference: ``runner(x)`` returns the output tensor; ``runtime`` is ``torch`` or
    ``onnxruntime``; ``note`` says in one line what runs and why (fallbacks included)."""

    runtime: str
    note: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    path: Optional[str] = None  # the ONNX file (onnxruntime)
    max_abs_diff: Optional[float] = None  # vs eager on the checked input (onnxruntime)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _timed_choice(question: str, torch_call: Callable[[], object], ort_call: Callable[[], object]
                  ) -> Tuple[str, str]:
    """``auto``'s answer for ``question`` (timed now or cached) and a few words on how it was reached."""
    from slaknet.layers import autotune

    choice = autotune.decide(question, ("torch", "onnxruntime"),
                             lambda: {"torch": torch_call, "onnxruntime": ort_call},
                             baseline="torch", fallback="onnxruntime")
    d = autotune.lookup(question)
    if d is None or d.source == "budget":
        return choice, "auto: not timed (timing budget 0 or spent)"
    if d.medians:
        times = ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in sorted(d.medians.items()))
        return choice, f"auto: timed {'now' if d.source == 'timed' else 'earlier'} on this machine: {times}"
    return choice, f"auto: {d.source} answer for this model on this machine"


def _home(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home != "~" and path.startswith(home + os.sep) else path


def inference_runner(model: nn.Module, example: torch.Tensor, runtime: str = "auto",
                     device: Optional[torch.device] = None, tolerance: Optional[float] = None) -> InferenceRunner:
    """A runner for ``model`` (eval mode) on inputs shaped like ``example`` (``[N, C, H, W]``, any N).

    ``runtime``: ``torch`` (eager, on ``device``), ``onnxruntime`` (the cached export, CPU; a one-line
    :class:`ConfigError` when onnxruntime is not installed or ``device`` is not the CPU) or ``auto``
    (torch off the CPU or without onnxruntime, else the faster of the two: module docstring). The
    onnxruntime output on ``example`` must match eager within ``tolerance`` (default: the export tolerance,
    1e-4 scaled), else the runner falls back to torch and its ``note`` says so.
    """
    from slaknet.deploy.export import DEFAULT_TOLERANCE

    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    device = torch.device(device or "cpu")
    tolerance = tolerance or DEFAULT_TOLERANCE

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(device))

    if runtime == "onnxruntime":
        if onnxruntime_version() is None:
            raise ConfigError(f"--runtime onnxruntime needs onnxruntime: {INSTALL_HINT} (or --runtime torch)")
        if device.type != "cpu":
            raise ConfigError(f"--runtime onnxruntime runs on the CPU, not {device.type}: drop --device or use "
                              "--runtime torch")
    elif runtime == "auto":
        if device.type != "cpu":
            return InferenceRunner("torch", f"torch (auto: device {device.type})", eager)
        if onnxruntime_version() is None:
            return InferenceRunner("torch", f"torch (auto: onnxruntime is not installed; {INSTALL_HINT} for it)",
                                   eager)
        from slaknet.layers import autotune

        question = runtime_question(model, tuple(example.shape))
        known = autotune.lookup(question)
        if known is not None and known.choice == "torch":  # no export needed
            return InferenceRunner("torch", "torch (auto: faster than onnxruntime for this model on this machine, "
                                            f"timed earlier; cache {_home(autotune.cache_path() or 'off')})", eager)
    else:
        return InferenceRunner("torch", "torch (as asked)", eager)
    why = "as asked" if runtime == "onnxruntime" else "auto"
    try:
        cached = cached_onnx(model, tuple(example.shape[1:]), tolerance=tolerance)
        ref = eager(example)
        out = cached.run(example)
        diff, scaled = scaled_difference(out, ref) if out.shape == ref.shape else (float("inf"), float("inf"))
    except Exception as exc:  # export or session failure: torch still gives the answer
        first = (str(exc).strip().splitlines() or [""])[0]
        return InferenceRunner("torch", f"torch (fell back from onnxruntime, {why}: {type(exc).__name__}: {first})",
                               eager)
    if not scaled <= tolerance:
        return InferenceRunner("torch", f"torch (fell back from onnxruntime, {why}: the first input differs from "
                                        f"torch by {diff:.2e}, scaled {scaled:.2e} > tolerance {tolerance:.0e})", eager)
    if runtime == "auto":
        choice, why = _timed_choice(question, lambda: eager(example), lambda: cached.run(example))
        if choice == "torch":
            return InferenceRunner("torch", f"torch ({why})", eager)
    how = f"exported in {cached.seconds:.1f}s to" if cached.built else "cached export"
    if cached.rebuilt_reason:
        how = f"{cached.rebuilt_reason}: {how}"
    note = (f"onnxruntime ({why}; {how} {_home(cached.path)}; first input max |diff| vs torch {diff:.1e}, "
            f"tolerance {tolerance:.0e})")
    return InferenceRunner("onnxruntime", note, cached.run, cached.path, diff)
