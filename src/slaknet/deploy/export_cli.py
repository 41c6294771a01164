"""``slaknet export``: reparameterize, export (ONNX / TorchScript / torch.export / safetensors), verify;
optionally quantize the ONNX file to int8 (``--quantize int8 --calibration DIR``, see slaknet.deploy.quantize)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import CommonOptions, DataSettings, ModelSettings, OptimSettings, add_setting

    add_setting(parser, ModelSettings, "model", default=None,
                help="registered model name (default slak_tiny, or the checkpoint's architecture; with "
                     "--checkpoint, the file must be this variant)")
    add_setting(parser, CommonOptions, "checkpoint", default=None,
                help="weights to export (official or slaknet; architecture read from the file)")
    add_setting(parser, CommonOptions, "ema", default=None, nargs=0)
    add_setting(parser, CommonOptions, "format", default="onnx", dest="fmt")
    add_setting(parser, CommonOptions, "output_file", default=None, aliases=("--output",),
                help="file to write (default: MODEL.<format suffix>)")
    add_setting(parser, CommonOptions, "reparam", default="strips", const="strips",
                help="inference form: lean two strips per layer (default), one dense kernel, or none")
    add_setting(parser, DataSettings, "input_size", default=None, nargs="+", metavar="N",
                help="example input: H W, or one value for a square (default: the model's)")
    add_setting(parser, OptimSettings, "batch_size", default=2, help="example batch size (default 2)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size")
    parser.add_argument("--static-spatial", action="store_true", help="fix height and width")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted max|diff| / max(1, max|ref|) vs eager (default 1e-4)")
    parser.add_argument("--no-verify", action="store_true", help="skip running the exported file")
    parser.add_argument("--backbone", action="store_true",
                        help="export the multi-scale backbone (stage outputs) instead of the classifier; "
                             "--checkpoint may then also be an mmseg/mmdet file with backbone.* weights")
    parser.add_argument("--out-indices", type=int, nargs="+", default=[0, 1, 2, 3], metavar="I",
                        help="backbone stages to return (default 0 1 2 3)")
    parser.add_argument("--norm-outputs", dest="norm_outputs", action="store_const", const=True, default=None,
                        help="backbone with LayerNorms norm0..norm3 on the outputs (default: when the "
                             "checkpoint has them)")
    q = parser.add_argument_group("int8 quantization (ONNX only, onnxruntime static quantization)")
    q.add_argument("--quantize", default=None, choices=["int8"],
                   help="post-training static int8 quantization (QDQ, per-channel weights) of the ONNX file; "
                        "verified by top-1 agreement with the fp32 eager model instead of --tolerance")
    q.add_argument("--calibration", default=None, metavar="DIR",
                   help="image folder for calibration (searched recursively), or 'builtin' (the demo data)")
    q.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="images used to calibrate activation ranges (default 256)")
    q.add_argument("--held-out-images", type=int, default=128, metavar="N",
                   help="further images of the folder (builtin: val split) for the agreement check (default 128)")
    q.add_argument("--quantize-exclude", default="none", choices=["none", "large_kernel"],
                   help="keep the large-kernel depthwise convs in fp32 (default none: all int8)")
    q.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="activation range calibration (default minmax)")
    q.add_argument("--min-agreement", type=float, default=0.9,
                   help="smallest accepted top-1 agreement with fp32 on held-out images (default 0.9)")
    add_setting(parser, CommonOptions, "json", default=False, nargs=0)


def run(args: argparse.Namespace) -> int:
    from slaknet.deploy.export import default_suffix, export_model
    from slaknet.errors import ConfigError
    from slaknet.models.factory import create_model, model_from_checkpoint

    size = args.input_size
    if size is not None:
        if len(size) == 1:
            size = [size[0], size[0]]
        if len(size) != 2 or min(size) < 32:
            raise ConfigError(f"--input-size takes H W (or one value), each at least 32; got {args.input_size}")
    if args.backbone:
        from slaknet.deploy.backbone import SLaKBackbone

        if args.checkpoint:
            model = SLaKBackbone.from_checkpoint(args.checkpoint, model=args.model or "slak_tiny",
                                                 out_indices=args.out_indices,
                                                 norm_outputs=args.norm_outputs, use_ema=args.ema)
        else:
            model = SLaKBackbone(args.model or "slak_tiny", out_indices=args.out_indices, norm_outputs=bool(args.norm_outputs))
        model.eval()
    elif args.checkpoint:
        model, info, _ = model_from_checkpoint(args.checkpoint, args.model, args.ema)
        if size is None and info.input_size:  # the size it was trained at
            size = [info.input_size, info.input_size]
    else:
        model = create_model(args.model or "slak_tiny").eval()
    metadata = None
    if args.checkpoint:
        metadata = {"source_checkpoint": os.path.abspath(args.checkpoint)}
        if args.checkpoint.endswith(".safetensors"):  # carry class names / provenance of converted files
            from slaknet.deploy.convert import load_converted_metadata

            previous = load_converted_metadata(args.checkpoint)
            metadata.update({k: previous[k] for k in ("class_names", "source") if previous.get(k)})
    if args.quantize:
        _check_quantize_args(args)
    output = args.output_file or (os.path.splitext(os.path.basename(args.checkpoint))[0] if args.checkpoint
                             else args.model or "slak_tiny") + ("_backbone" if args.backbone else "") + default_suffix(args.fmt)
    if args.quantize:
        return _run_quantize(args, model, output if args.output_file else output[:-5] + "_int8.onnx", size,
                             info if args.checkpoint else None, metadata)
    result = export_model(model, output, args.fmt, reparameterize=args.reparam, input_size=size,
                          batch_size=args.batch_size, dynamic_batch=not args.static_batch,
                          dynamic_spatial=not args.static_spatial, opset=args.opset, verify=not args.no_verify,
                          tolerance=args.tolerance, metadata=metadata)
    if args.json:
        out = {k: getattr(result, k) for k in ("path", "format", "reparameterize", "input_shape", "dynamic_batch",
                                                "dynamic_spatial", "tolerance", "max_abs_diff", "max_rel_diff",
                                                "checks", "export_seconds", "file_bytes")}
        out["passed"] = result.passed if not args.no_verify else None
        out["input"] = result.input_text
        print(json.dumps(out, indent=2))
    else:
        print(result.summary() if not args.no_verify else
              f"{result.format} -> {result.path} ({result.file_bytes / 2**20:.1f} MiB; not verified); "
              f"{result.input_text}")
    return 0


def _check_quantize_args(args: argparse.Namespace) -> None:
    from slaknet.errors import ConfigError

    if args.fmt != "onnx":
        raise ConfigError(f"--quantize int8 needs --format onnx (got --format {args.fmt})")
    if args.backbone:
        raise ConfigError("--quantize int8 is for classifiers (its check compares top-1 predictions); drop --backbone")
    if not args.calibration:
        raise ConfigError("--quantize int8 needs --calibration DIR (an image folder) or --calibration builtin")
    if args.no_verify:
        raise ConfigError("--quantize int8 always checks agreement with fp32; use --min-agreement 0 to accept any")


def _run_quantize(args: argparse.Namespace, model: Any, output: str, size: Optional[List[int]], info: Any,
                  metadata: Optional[Dict[str, Any]]) -> int:
    """Export the int8 ONNX file (normalisation and built-in data settings from the checkpoint if any)."""
    import sys

    from slaknet.deploy.quantize import export_int8

    builtin = args.calibration in ("builtin", "builtin:insideness")
    mean = std = None
    if info is not None and info.mean and info.std:  # what the checkpoint was trained with
        mean, std = info.mean, info.std
    elif builtin or (info is not None and str(info.data or "").startswith("builtin")):
        from slaknet.data import BUILTIN_MEAN, BUILTIN_STD

        mean, std = BUILTIN_MEAN, BUILTIN_STD
    opts = {k: info.get(k) for k in ("difficulty", "data_seed") if info.get(k) is not None} if info else {}
    result = export_int8(model, output, args.calibration, input_size=size, mean=mean, std=std,
                         count=args.calibration_images, held_out=args.held_out_images,
                         exclude=args.quantize_exclude, method=args.calibration_method,
                         reparameterize=args.reparam, batch_size=args.batch_size,
                         dynamic_batch=not args.static_batch, dynamic_spatial=not args.static_spatial,
                         opset=args.opset, min_agreement=args.min_agreement, builtin_options=opts,
                         metadata=metadata, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        out = {k: getattr(result, k) for k in ("path", "exclude", "calibration_method", "calibration_images",
                                                "held_out_images", "min_agreement", "metrics", "fp32_export",
                                                "quantize_seconds", "file_bytes", "fp32_file_bytes")}
        out.update(format="onnx", quantize="int8", agreement=result.agreement, passed=result.passed)
        print(json.dumps(out, indent=2))
    else:
        print(result.summary())
    return 0
