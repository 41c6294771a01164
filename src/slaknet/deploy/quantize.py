"""Post-training static int8 quantization of an exported (reparameterized) SLaK model with onnxruntime.

``slaknet export --format onnx --quantize int8 --calibration DIR`` runs, in order:

1. the ordinary fp32 ONNX export of the reparameterized model (:func:`slaknet.deploy.export_model`, verified
   against eager PyTorch with the strict fp32 tolerance), to a temporary file;
2. onnxruntime's shape inference / graph clean-up (``quant_pre_process``) and its static quantization
   (``quantize_static``): QDQ format, per-channel symmetric int8 weights, uint8 activations whose ranges
   are calibrated (min/max by default) on a few hundred of the user's images;
3. verification against the *original* eager fp32 model on the calibration images and on held-out images:
   top-1 agreement, max |logit difference| and logit correlation. int8 cannot meet the fp32 tolerance, so
   the check is ``agreement >= min_agreement`` on the held-out images (the calibration images when there
   are none).

Why onnxruntime and not PyTorch's PT2E (X86InductorQuantizer): the artefact is the ONNX file users deploy
anyway, it runs without torch, and its int8 kernels (MLAS) need no compiler at run time; see docs/speed.md
for the measurements. ``exclude="large_kernel"`` keeps the reparameterized large-kernel depthwise convs in
fp32 (their inputs and outputs are still int8-rounded where neighbours are quantized).
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from slaknet.errors import ConfigError, SlaknetError

__all__ = ["QUANTIZE_MODES", "EXCLUDE_CHOICES", "CALIBRATION_METHODS", "DEFAULT_CALIBRATION_IMAGES",
           "DEFAULT_MIN_AGREEMENT", "QuantizeResult", "QuantizationCheckError", "calibration_tensors",
           "quantize_onnx", "compare_outputs", "export_int8", "large_kernel_nodes", "onnx_runner"]

QUANTIZE_MODES = ("int8",)
EXCLUDE_CHOICES = ("none", "large_kernel")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_HELD_OUT_IMAGES = 128
DEFAULT_MIN_AGREEMENT = 0.9

Progress = Optional[Callable[[str], None]]


class QuantizationCheckError(SlaknetError):
    """The int8 model agrees with the fp32 model on fewer held-out images than required."""


@dataclass
class QuantizeResult:
    """Outcome of :func:`export_int8`: the int8 file and how close it is to the eager fp32 model."""

    path: str
    exclude: str
    calibration_method: str
    calibration_images: int
    held_out_images: int
    input_shape: Tuple[int, ...]
    min_agreement: float
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)  # "calibration" / "held_out" -> figures
    fp32_export: Dict[str, Any] = field(default_factory=dict)  # the fp32 export's check vs eager
    quantize_seconds: float = 0.0
    file_bytes: int = 0
    fp32_file_bytes: int = 0

    @property
    def checked_on(self) -> str:
        return "held_out" if "held_out" in self.metrics else "calibration"

    @property
    def agreement(self) -> float:
        return self.metrics[self.checked_on]["top1_agreement"]

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    def summary(self) -> str:
        parts = [f"{k.replace('_', '-')} ({int(m['images'])} images): top-1 agreement {m['top1_agreement']:.1%}, "
                 f"max |logit diff| {m['max_abs_diff']:.3g} (max |logit| {m['ref_max_abs']:.3g}), "
                 f"correlation {m['correlation']:.4f}" for k, m in self.metrics.items()]
        kept = "large-kernel convs kept in fp32" if self.exclude == "large_kernel" else "all convs and matmuls int8"
        return (f"int8 onnx -> {self.path} ({self.file_bytes / 2**20:.1f} MiB, fp32 {self.fp32_file_bytes / 2**20:.1f} "
                f"MiB; {kept}; {self.calibration_method} calibration on {self.calibration_images} images, "
                f"{self.quantize_seconds:.1f}s) vs eager fp32: " + "; ".join(parts))


# ------------------------------------------------------------------------------------- calibration data --
def _folder_files(root: str) -> List[str]:
    from slaknet.data import IMG_EXTENSIONS

    if not os.path.isdir(root):
        raise ConfigError(f"calibration folder {root!r} does not exist (give an image folder or 'builtin')")
    files = []
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise ConfigError(f"calibration folder {root!r} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return files


def _load_images(files: Sequence[str], size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 progress: Progress, what: str) -> torch.Tensor:
    """Photos: shorter side resized to the input size, centre crop, normalised (unreadable files skipped)."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(min(size)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    out, bad = [], 0
    for i, path in enumerate(files):
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img.load()
                out.append(tf(img.convert("RGB")))
        except Exception as exc:  # PIL raises many types for damaged files
            bad += 1
            warnings.warn(f"skipping unreadable calibration image {path}: {type(exc).__name__}: {exc}")
        if progress and ((i + 1) % 64 == 0 or i + 1 == len(files)):
            progress(f"reading {what} images: {i + 1}/{len(files)}")
    if not out:
        raise ConfigError(f"none of the {len(files)} {what} images could be read")
    return torch.stack(out)


def calibration_tensors(source: str, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                        count: int = DEFAULT_CALIBRATION_IMAGES, held_out: int = DEFAULT_HELD_OUT_IMAGES,
                        seed: int = 0, builtin_options: Optional[Dict[str, Any]] = None,
                        progress: Progress = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(calibration batch, held-out batch or None)`` of normalised ``[N, 3, H, W]`` images.

    ``source``: an image folder (searched recursively; a random ``count`` for calibration, up to ``held_out``
    of the rest for checking) or ``builtin`` (the insideness task: calibration from its train split,
    held-out from its val split; ``builtin_options`` may give ``difficulty`` and ``data_seed``).
    """
    if count < 1:
        raise ConfigError(f"--calibration-images must be >= 1, got {count}")
    if source in ("builtin", "builtin:insideness"):
        from slaknet.data import InsidenessDataset

        opts = builtin_options or {}
        if size[0] != size[1]:
            raise ConfigError(f"the built-in data is square; got input size {size}")
        kw = dict(image_size=size[0], difficulty=float(opts.get("difficulty", 0.5)),
                  seed=int(opts.get("data_seed", 0)), cache=False)
        norm = _normalizer(mean, std)
        cal = torch.stack([norm(InsidenessDataset("train", count, **kw)[i][0]) for i in range(count)])
        ho = (torch.stack([norm(InsidenessDataset("val", held_out, **kw)[i][0]) for i in range(held_out)])
              if held_out > 0 else None)
        if progress:
            progress(f"built-in data: {count} calibration + {held_out} held-out images at {size[0]} px")
        return cal, ho
    files = _folder_files(source)
    random.Random(seed).shuffle(files)
    cal = _load_images(files[:count], size, mean, std, progress, "calibration")
    rest = files[count:count + held_out]
    return cal, (_load_images(rest, size, mean, std, progress, "held-out") if rest else None)


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return lambda x: (x - m) / s


# ----------------------------------------------------------------------------------------- quantization --
def _require_onnxruntime() -> None:
    import importlib

    try:
        for name in ("onnx", "onnxruntime", "onnxruntime.quantization"):
            importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError("int8 quantization needs onnx and onnxruntime: pip install '.[export]' in the slaknet clone") from exc


def large_kernel_nodes(onnx_path: str) -> List[str]:
    """Names of the depthwise (grouped) Conv nodes: in a reparameterized SLaK these are exactly the
    large-kernel strips (stem and downsampling convs are dense)."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    return [n.name for n in graph.node
            if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def quantize_onnx(fp32_path: str, out_path: str, calibration: torch.Tensor, *, exclude: str = "none",
                  method: str = "minmax", per_channel: bool = True, reduce_range: bool = False,
                  batch_size: int = 8, op_types: Optional[Sequence[str]] = None,
                  progress: Progress = None) -> List[str]:
    """Static QDQ int8 quantization of ``fp32_path`` into ``out_path`` (onnxruntime), calibrated on
    ``calibration`` (``[N, C, H, W]``, normalised). Returns the names of the nodes left in fp32."""
    _require_onnxruntime()
    if exclude not in EXCLUDE_CHOICES:
        raise ConfigError(f"--quantize-exclude must be one of {', '.join(EXCLUDE_CHOICES)}, got {exclude!r}")
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    in_name = onnx.load(fp32_path, load_external_data=False).graph.input[0].name
    batches = [calibration[i:i + batch_size].numpy() for i in range(0, len(calibration), batch_size)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> Optional[Dict[str, Any]]:
            if self.i >= len(batches):
                return None
            self.i += 1
            done = min(self.i * batch_size, len(calibration))
            if progress and (done % 64 < batch_size or done == len(calibration)):
                progress(f"calibrating: {done}/{len(calibration)} images")
            return {in_name: batches[self.i - 1]}

    with tempfile.TemporaryDirectory(prefix="slaknet-quant-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        try:  # onnxruntime's recommended preparation: shape inference + graph clean-up
            quant_pre_process(fp32_path, pre)
        except Exception as exc:  # pragma: no cover - depends on the onnxruntime version
            warnings.warn(f"onnxruntime quant_pre_process failed ({type(exc).__name__}); quantizing as exported")
            pre = fp32_path
        excluded = large_kernel_nodes(pre) if exclude == "large_kernel" else []
        calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
        root = logging.getLogger()
        level = root.level  # onnxruntime warns on the root logger per LayerNorm weight (per-tensor fallback)
        root.setLevel(max(level, logging.ERROR))
        try:
            quantize_static(pre, out_path, _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded or None, calibrate_method=calib,
                            op_types_to_quantize=list(op_types) if op_types else None)
        finally:
            root.setLevel(level)
    return excluded


def onnx_runner(path: str, threads: Optional[int] = None, spin: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``tensor -> logits`` running ``path`` in onnxruntime on the CPU. ``spin=False`` stops
    onnxruntime's idle threads from spinning (when torch runs in the same process, e.g. in benchmarks)."""
    _require_onnxruntime()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {in_name: x.detach().cpu().numpy()})[0])


def compare_outputs(run: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module, images: torch.Tensor,
                    batch_size: int = 16) -> Dict[str, float]:
    """Top-1 agreement, max |logit diff|, max |reference logit| and logit correlation of ``run`` vs
    ``reference`` (eager, no grad) on ``images``."""
    outs, refs = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        with torch.no_grad():
            refs.append(reference(x).float())
        outs.append(run(x).float())
    out, ref = torch.cat(outs), torch.cat(refs)
    corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
    return {"images": float(len(images)), "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "max_abs_diff": float((out - ref).abs().max()), "ref_max_abs": float(ref.abs().max()),
            "correlation": float(corr)}


def export_int8(model: nn.Module, path: str, calibration: str, *, input_size: Optional[Sequence[int]] = None,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                count: int = DEFAULT_CALIBRATION_IMAGES, held_out: int = DEFAULT_HELD_OUT_IMAGES,
                exclude: str = "none", method: str = "minmax", reparameterize: str = "strips",
                batch_size: int = 2, dynamic_batch: bool = True, dynamic_spatial: bool = True,
                opset: Optional[int] = None, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                builtin_options: Optional[Dict[str, Any]] = None, metadata: Optional[Dict[str, Any]] = None,
                progress: Progress = None) -> QuantizeResult:
    """Export ``model`` (a classifier) to an int8 ONNX file at ``path`` and check it (module docstring).

    ``mean`` / ``std`` default to the model's ``pretrained_cfg``; ``input_size`` (H, W) to the model's.
    Raises :class:`QuantizationCheckError` when the top-1 agreement is below ``min_agreement``.
    """
    _require_onnxruntime()
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement must be in [0, 1], got {min_agreement}")
    if held_out < 0:
        raise ConfigError(f"--held-out-images must be >= 0, got {held_out}")
    from slaknet.deploy.export import export_model

    cfg = getattr(model, "pretrained_cfg", None) or {}
    h, w = (tuple(input_size)[-2:] if input_size else tuple(cfg.get("input_size", (3, 224, 224)))[-2:])
    mean = tuple(mean or cfg.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(std or cfg.get("std") or (0.229, 0.224, 0.225))
    cal, ho = calibration_tensors(calibration, (int(h), int(w)), mean, std, count, held_out,
                                  builtin_options=builtin_options, progress=progress)
    model = model.eval()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".slaknet-int8-", dir=folder) as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        if progress:
            progress("exporting the reparameterized fp32 model to ONNX")
        base = export_model(model, fp32, "onnx", reparameterize=reparameterize, input_size=(h, w),
                            batch_size=batch_size, dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial,
                            opset=opset, metadata=dict(metadata or {}, quantized="int8"))
        start = time.perf_counter()
        int8 = os.path.join(tmp, "int8.onnx")
        quantize_onnx(fp32, int8, cal, exclude=exclude, method=method, progress=progress)
        result = QuantizeResult(path=path, exclude=exclude, calibration_method=method, calibration_images=len(cal),
                                held_out_images=0 if ho is None else len(ho), input_shape=(1, 3, int(h), int(w)),
                                min_agreement=min_agreement, quantize_seconds=time.perf_counter() - start,
                                file_bytes=os.path.getsize(int8), fp32_file_bytes=base.file_bytes,
                                fp32_export={"max_abs_diff": base.max_abs_diff, "max_rel_diff": base.max_rel_diff})
        if progress:
            progress("checking the int8 model against eager fp32")
        run = onnx_runner(int8)
        result.metrics["calibration"] = compare_outputs(run, model, cal)
        if ho is not None:
            result.metrics["held_out"] = compare_outputs(run, model, ho)
        if not result.passed:  # nothing is written: a file that fails its check is not left for deployment
            raise QuantizationCheckError(
                f"int8 model agrees with fp32 on {result.agreement:.1%} of the {result.checked_on.replace('_', '-')} "
                f"images (< {min_agreement:.0%}); nothing written; try --quantize-exclude large_kernel, more "
                f"calibration images or --min-agreement")
        os.replace(int8, path)  # same folder: atomic
    return result
