"""Export a SLaK model to ONNX, TorchScript, a torch.export program or safetensors, and verify the result.

Every export runs the same three steps:

1. **Reparameterize** a copy of the model (eval mode): by default the lean two-strip form (``strips``:
   an M x N and an N x M depthwise conv per layer, BatchNorms and the small kernel folded in), or one
   dense M x M kernel per layer (``dense``), or not at all (``none``).
2. **Export** with the depthwise conv forced to its plain ``F.conv2d`` backend (``SLAKNET_DWCONV=plain``
   for the duration), so the artefact holds standard convolutions only: ONNX ``Conv``, ``aten.conv2d``.
   Batch size is dynamic, and so are height and width where the format allows it (ONNX and
   exported-program: 64 to 4096 px in multiples of 32; TorchScript traces are shape-generic).
3. **Verify**: run the saved artefact (onnxruntime for ONNX, the loaded program/module for the others)
   on random inputs (the export shape, another batch size and, when dynamic, another spatial size)
   and compare with the *original* eager PyTorch model. The check passes when
   ``max|out - ref| <= tolerance * max(1, max|ref|)``; the default tolerance is 1e-4 (float32), about
   100x the differences observed (reparameterization and export only change summation order).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from slaknet.errors import ConfigError, SlaknetError
from slaknet.io import atomic_path

__all__ = ["FORMATS", "REPARAM_FORMS", "DEFAULT_TOLERANCE", "ExportResult", "ExportVerificationError", "ExportFormat",
           "ExportOptions", "register_format", "unregister_format", "list_formats", "get_format",
           "export_model", "load_exported", "verify_export", "plain_dwconv", "default_suffix"]

REPARAM_FORMS = ("strips", "dense", "none")
DEFAULT_TOLERANCE = 1e-4
META_KEY = "slaknet"
MAX_SPATIAL = 4096


class ExportVerificationError(SlaknetError):
    """The exported artefact's outputs differ from eager PyTorch by more than the tolerance."""


@dataclass(frozen=True)
class ExportFormat:
    """An export format: ``export(model, sample, path, options)`` writes the file, ``load(path, model_name)``
    returns a function ``tensor -> output`` that runs it (used for verification).

    ``dynamic_shapes``: the exporter takes torch.export dynamic shapes (``options.dynamic_shapes``), so
    batch / spatial sizes are made dynamic where possible; ``shape_generic``: the artefact runs at any
    input shape anyway (verified at other shapes too); ``strict_suffix``: the path must end in ``suffix``.
    """

    name: str
    suffix: str
    export: Callable[[nn.Module, torch.Tensor, str, "ExportOptions"], None]
    load: Callable[[str, Optional[str]], Callable[[torch.Tensor], Any]]
    dynamic_shapes: bool = False
    shape_generic: bool = False
    strict_suffix: bool = False


@dataclass
class ExportOptions:
    """What an exporter gets besides the model: dynamic shapes (or None), the metadata record, ONNX opset."""

    dynamic_shapes: Optional[Dict[str, Dict[int, Any]]]
    metadata: Dict[str, Any]
    opset: Optional[int] = None


_FORMATS: Dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat, replace: bool = False) -> ExportFormat:
    """Add an export format (``slaknet export --format NAME`` and :func:`export_model` then accept it)."""
    if fmt.name in _FORMATS and not replace:
        raise ConfigError(f"export format {fmt.name!r} is already registered (pass replace=True)")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove a registered export format (no error when it is not registered)."""
    _FORMATS.pop(name, None)


def list_formats() -> Tuple[str, ...]:
    """Names of the registered export formats."""
    return tuple(_FORMATS)


def get_format(name: str) -> ExportFormat:
    """The registered format ``name`` (one-line error naming the others)."""
    if name not in _FORMATS:
        raise ConfigError(f"unknown export format {name!r}; choose from {', '.join(_FORMATS)}")
    return _FORMATS[name]


def default_suffix(fmt: str) -> str:
    """The file-name ending used for ``fmt`` when no output path is given."""
    return get_format(fmt).suffix


@contextlib.contextmanager
def plain_dwconv() -> Iterator[None]:
    """Run every depthwise conv through plain ``F.conv2d`` inside the block, in this thread only (for
    tracing, export and their verification; the process environment is left alone)."""
    from slaknet.layers.dwconv import use_backend

    with use_backend("plain"):
        yield


@dataclass
class ExportResult:
    """Outcome of :func:`export_model`: where the file is and how close it is to eager PyTorch."""

    path: str
    format: str
    reparameterize: str  # the form the exported model has: "strips", "dense" or "none"
    input_shape: Tuple[int, ...]
    dynamic_batch: bool
    dynamic_spatial: bool
    tolerance: float
    max_abs_diff: float = float("nan")
    max_rel_diff: float = float("nan")  # max_abs_diff / max(1, max|ref|), compared with the tolerance
    checks: List[Dict[str, Any]] = field(default_factory=list)
    export_seconds: float = 0.0
    file_bytes: int = 0
    fixed_reason: str = ""  # why height and width are fixed where dynamic ones were asked for

    @property
    def input_text(self) -> str:
        """What input the artefact takes: dynamic or fixed batch, dynamic or fixed height x width."""
        b, c, h, w = self.input_shape
        batch = "any batch" if self.dynamic_batch else f"batch fixed at {b}"
        if self.dynamic_spatial:
            side = f"any height / width that is a multiple of 32 from 64 to {MAX_SPATIAL} px"
        else:
            side = f"height x width fixed at {h}x{w}" + (f" ({self.fixed_reason})" if self.fixed_reason else "")
        return f"input {c} channels, {batch}, {side}"

    @property
    def passed(self) -> bool:
        return self.max_rel_diff <= self.tolerance

    def summary(self) -> str:
        shapes = ", ".join(f"{tuple(c['shape'])}: {c['max_abs_diff']:.2e}" for c in self.checks)
        form = "not reparameterized" if self.reparameterize == "none" else f"{self.reparameterize} form"
        return (f"{self.format} -> {self.path} ({self.file_bytes / 2**20:.1f} MiB, {form}, "
                f"exported in {self.export_seconds:.1f}s); max |diff| vs eager {self.max_abs_diff:.3e} "
                f"(scaled {self.max_rel_diff:.2e}, tolerance {self.tolerance:.0e}) [{shapes}]; {self.input_text}")


def _sample_shape(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        stem = getattr(model, "downsample_layers", None)
        chans = stem[0][0].in_channels if stem is not None else 3
        size = (chans,) + size
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"input size must be (C, H, W) or (H, W), got {tuple(input_size)}")
    return size  # type: ignore[return-value]


def _prepare(model: nn.Module, reparameterize: str) -> nn.Module:
    if reparameterize not in REPARAM_FORMS:
        raise ConfigError(f"reparameterize must be one of {', '.join(REPARAM_FORMS)}, got {reparameterize!r}")
    from slaknet.models.factory import reparameterize_model

    if reparameterize == "none":
        return copy.deepcopy(model).eval()
    return reparameterize_model(model, merge_dense=reparameterize == "dense", inplace=False)


def _spatial_dynamic_ok(h: int, w: int) -> bool:
    return h % 32 == 0 and w % 32 == 0 and h >= 64 and w >= 64


def _dynamic_shapes(batch: bool, spatial: bool, h: int, w: int) -> Optional[Dict[str, Dict[int, Any]]]:
    from torch.export import Dim

    dims: Dict[int, Any] = {}
    if batch:
        dims[0] = Dim("batch", min=1, max=4096)
    if spatial:
        dims[2] = 32 * Dim("h32", min=2, max=MAX_SPATIAL // 32)
        dims[3] = 32 * Dim("w32", min=2, max=MAX_SPATIAL // 32)
    return {"x": dims} if dims else None


def _forward_arg_name(model: nn.Module) -> str:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params else "x"


def _export_onnx(model: nn.Module, sample: torch.Tensor, path: str, dyn: Optional[Dict], meta: Dict[str, Any],
                 opset: Optional[int]) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo-based ONNX exporter needs it)
    except ImportError as exc:
        raise ConfigError("ONNX export needs onnx and onnxscript: pip install '.[export]' in the slaknet clone") from exc
    with torch.no_grad():
        n_out = len(_as_list(model(sample)))
    names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    kwargs: Dict[str, Any] = dict(dynamo=True, input_names=["input"], output_names=names, verbose=False)
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    if dyn is not None:
        name = _forward_arg_name(model)
        kwargs["dynamic_shapes"] = {name: dyn["x"]}
    program = torch.onnx.export(model, (sample,), None, **kwargs)
    try:  # record the model card in the ONNX file's metadata_props
        program.model.metadata_props[META_KEY] = json.dumps(meta, default=str)
    except Exception:  # pragma: no cover - depends on the onnx_ir version
        pass
    program.save(path, external_data=False)


def _export_torchscript(model: nn.Module, sample: torch.Tensor, path: str, meta: Dict[str, Any]) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but still widely deployed
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, (sample,), check_trace=False)
        torch.jit.save(traced, path, _extra_files={"slaknet.json": json.dumps(meta, default=str)})


def _export_program(model: nn.Module, sample: torch.Tensor, path: str, dyn: Optional[Dict],
                    meta: Dict[str, Any]) -> None:
    if dyn is not None:
        dyn = {_forward_arg_name(model): dyn["x"]}
    program = torch.export.export(model, (sample,), dynamic_shapes=dyn)
    torch.export.save(program, path, extra_files={"slaknet.json": json.dumps(meta, default=str)})


def _export_safetensors(model: nn.Module, path: str, meta: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path, metadata={META_KEY: json.dumps(meta, default=str)})  # path: already a temporary file


def _load_onnx(path: str, model_name: Optional[str]) -> Callable[[torch.Tensor], Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name

    def run_onnx(x: torch.Tensor) -> Any:
        outs = [torch.from_numpy(o) for o in session.run(None, {in_name: x.detach().cpu().numpy()})]
        return outs[0] if len(outs) == 1 else outs

    return run_onnx


def _module_runner(module: nn.Module, plain: bool = False) -> Callable[[torch.Tensor], Any]:
    def run_module(x: torch.Tensor) -> Any:
        with torch.no_grad(), plain_dwconv() if plain else contextlib.nullcontext():
            return module(x)

    return run_module


def _load_torchscript(path: str, model_name: Optional[str]) -> Callable[[torch.Tensor], Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _module_runner(torch.jit.load(path, map_location="cpu").eval())


def _load_program(path: str, model_name: Optional[str]) -> Callable[[torch.Tensor], Any]:
    return _module_runner(torch.export.load(path).module())


def _load_safetensors(path: str, model_name: Optional[str]) -> Callable[[torch.Tensor], Any]:
    meta = _safetensors_meta(path)
    if meta.get("kind") == "backbone":
        from slaknet.deploy.backbone import SLaKBackbone

        module = SLaKBackbone.from_checkpoint(path, out_indices=meta["out_indices"], norm_outputs=meta["norm_outputs"],
                                              pad_input=meta.get("pad_input", "pad"))
    else:
        from slaknet.models.factory import create_model

        module = create_model(model_name or meta.get("variant") or "slak_tiny", checkpoint=path)
    return _module_runner(module.eval(), plain=True)


def load_exported(path: str, fmt: str, model_name: Optional[str] = None) -> Callable[[torch.Tensor], Any]:
    """Load an exported artefact as a function ``tensor -> tensor`` (or list of tensors for a backbone);
    ONNX runs in onnxruntime."""
    spec = get_format(fmt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported file not found: {path}")
    return spec.load(path, model_name)


def _safetensors_meta(path: str) -> Dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def _verify_shapes(shape: Tuple[int, ...], dynamic_batch: bool, dynamic_spatial: bool) -> List[Tuple[int, ...]]:
    n, c, h, w = shape
    shapes = [shape]
    if dynamic_batch:
        shapes.append((1 if n != 1 else 3, c, h, w))
    if dynamic_spatial:
        shapes.append((1, c, h + 32, max(64, w - 32) if w > 64 else w + 64))
    return shapes


def _as_list(out: Any) -> List[torch.Tensor]:
    """A model output (tensor, or list/tuple of tensors such as a backbone's feature maps) as a list."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise ConfigError(f"export supports models returning a tensor or a list of tensors, got {type(out).__name__}")


def verify_export(run: Callable[[torch.Tensor], Any], reference: nn.Module,
                  shapes: Sequence[Tuple[int, ...]], tolerance: float = DEFAULT_TOLERANCE,
                  seed: int = 0) -> Tuple[float, float, List[Dict[str, Any]]]:
    """Run ``run`` and eager ``reference`` on random inputs of each shape; return the largest differences.

    Outputs may be tensors or lists of tensors (backbones); the worst element counts. Returns ``(max_abs_diff, max_scaled_diff, per_shape)`` where the scaled difference divides by
    ``max(1, max|ref|)``. Does not raise; :func:`export_model` compares with the tolerance.
    """
    g = torch.Generator().manual_seed(seed)
    reference = reference.eval()
    worst_abs = worst_rel = 0.0
    checks = []
    for shape in shapes:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            refs = _as_list(reference(x))
        outs = _as_list(run(x))
        if len(outs) != len(refs) or any(tuple(o.shape) != tuple(r.shape) for o, r in zip(outs, refs)):
            raise ExportVerificationError(
                f"exported model returned shapes {[tuple(o.shape) for o in outs]} for input {tuple(shape)}, "
                f"eager PyTorch {[tuple(r.shape) for r in refs]}")
        diff = max(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, refs))
        ref_max = max(float(r.abs().max()) for r in refs)
        scale = max(1.0, ref_max)
        checks.append({"shape": list(shape), "max_abs_diff": diff, "ref_max_abs": ref_max})
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
        if diff != diff:  # NaN
            worst_abs = worst_rel = float("inf")
    return worst_abs, worst_rel, checks


def export_model(model: nn.Module, path: Union[str, os.PathLike], fmt: str = "onnx", *,
                 reparameterize: str = "strips", input_size: Optional[Sequence[int]] = None, batch_size: int = 2,
                 dynamic_batch: bool = True, dynamic_spatial: bool = True, opset: Optional[int] = None,
                 verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                 metadata: Optional[Dict[str, Any]] = None) -> ExportResult:
    """Reparameterize a copy of ``model``, export it to ``path`` in ``fmt``, and verify it (module docstring).

    ``input_size``: ``(C, H, W)`` or ``(H, W)`` of the example input (default: the model's
    ``pretrained_cfg``). For ONNX and exported-program, a dynamic batch needs an example batch of at least
    2 (torch.export specialises size-1 dimensions; smaller values are raised to 2), and dynamic
    height/width need an example of at least 64 px in multiples of 32; otherwise the spatial size is fixed
    (the result's ``dynamic_spatial`` is then False).
    Raises :class:`ExportVerificationError` when the scaled difference exceeds ``tolerance``.
    """
    spec = get_format(fmt)
    path = os.fspath(path)
    if tolerance <= 0:
        raise ConfigError(f"tolerance must be positive, got {tolerance}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if spec.strict_suffix and not path.endswith(spec.suffix):
        raise ConfigError(f"a {fmt} export needs a path ending in {spec.suffix}, got {path!r}")
    c, h, w = _sample_shape(model, input_size)
    if dynamic_batch and batch_size < 2 and spec.dynamic_shapes:
        batch_size = 2
    fixed_reason = ""
    if dynamic_spatial and spec.dynamic_shapes and not _spatial_dynamic_ok(h, w):
        # torch.export cannot put a size of one 32-px unit into a dynamic range: keep the model's own size
        dynamic_spatial = False
        fixed_reason = (f"dynamic sizes need an example that is a multiple of 32 of at least 64 px; export with "
                        f"--input-size {max(64, -(-max(h, w) // 32) * 32)} for sizes from 64 px up")
    if not (spec.dynamic_shapes or spec.shape_generic):  # a fixed-shape artefact
        if dynamic_spatial:
            fixed_reason = f"the {fmt} format fixes the shape"
        dynamic_batch = dynamic_spatial = False
    was_training = model.training
    p = next(iter(model.parameters()), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        # exports are made and verified on the CPU in float32 (runtimes convert further if asked)
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    try:
        result = _export_eval(model.eval(), path, fmt, reparameterize, c, h, w, batch_size, dynamic_batch,
                              dynamic_spatial, opset, verify, tolerance, metadata)
        result.fixed_reason = fixed_reason
        return result
    finally:
        model.train(was_training)


def _export_eval(model: nn.Module, path: str, fmt: str, reparameterize: str, c: int, h: int, w: int,
                 batch_size: int, dynamic_batch: bool, dynamic_spatial: bool, opset: Optional[int], verify: bool,
                 tolerance: float, metadata: Optional[Dict[str, Any]]) -> ExportResult:
    spec = get_format(fmt)
    deploy = _prepare(model, reparameterize)
    from slaknet.deploy.metadata import model_metadata

    meta = model_metadata(deploy)
    if hasattr(deploy, "out_indices") and hasattr(deploy, "norm_outputs"):  # a SLaKBackbone
        meta.update(kind="backbone", out_indices=list(deploy.out_indices), norm_outputs=deploy.norm_outputs,
                    pad_input=deploy.pad_input, out_channels=deploy.out_channels, reductions=deploy.reductions)
    meta.update({"export_format": fmt, "dynamic_batch": dynamic_batch, "dynamic_spatial": dynamic_spatial,
                 "example_input": [batch_size, c, h, w]})
    if metadata:
        meta.update(metadata)
    sample = torch.randn(batch_size, c, h, w)
    result = ExportResult(path=path, format=fmt, reparameterize=meta.get("reparameterized") or "none",
                          input_shape=(batch_size, c, h, w), dynamic_batch=dynamic_batch,
                          dynamic_spatial=dynamic_spatial, tolerance=tolerance)
    start = time.perf_counter()
    try:
        with atomic_path(path) as tmp, torch.no_grad(), plain_dwconv():
            dyn = _dynamic_shapes(dynamic_batch, dynamic_spatial, h, w) if spec.dynamic_shapes else None
            spec.export(deploy, sample, tmp, ExportOptions(dyn, meta, opset))
    except SlaknetError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SlaknetError(f"{fmt} export failed: {type(exc).__name__}: {first}") from exc
    result.export_seconds = time.perf_counter() - start
    result.file_bytes = os.path.getsize(path)
    if verify:
        run = load_exported(path, fmt, model_name=meta.get("variant"))
        shapes = _verify_shapes(result.input_shape, dynamic_batch or spec.shape_generic,
                                dynamic_spatial or spec.shape_generic)
        result.max_abs_diff, result.max_rel_diff, result.checks = verify_export(run, model, shapes, tolerance)
        if not result.passed:
            raise ExportVerificationError(
                f"{fmt} export of {path} differs from eager PyTorch by {result.max_abs_diff:.3e} "
                f"(scaled {result.max_rel_diff:.2e} > tolerance {tolerance:.0e})")
    return result


# the built-in formats (late-bound through the module's functions, so they can be patched in tests)
register_format(ExportFormat("onnx", ".onnx", lambda m, x, p, o: _export_onnx(m, x, p, o.dynamic_shapes, o.metadata, o.opset),
                             lambda p, n: _load_onnx(p, n), dynamic_shapes=True))
register_format(ExportFormat("torchscript", ".torchscript.pt", lambda m, x, p, o: _export_torchscript(m, x, p, o.metadata),
                             lambda p, n: _load_torchscript(p, n), shape_generic=True))
register_format(ExportFormat("exported-program", ".pt2",
                             lambda m, x, p, o: _export_program(m, x, p, o.dynamic_shapes, o.metadata),
                             lambda p, n: _load_program(p, n), dynamic_shapes=True))
register_format(ExportFormat("safetensors", ".safetensors", lambda m, x, p, o: _export_safetensors(m, p, o.metadata),
                             lambda p, n: _load_safetensors(p, n), shape_generic=True, strict_suffix=True))
FORMATS = list_formats()  # the built-in names (register_format adds more; list_formats() has them all)
