"""``slaknet export``: reparameterize, export (ONNX / TorchScript / torch.export / safetensors), verify."""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="registered model name (default slak_tiny, or the checkpoint's architecture; with "
                             "--checkpoint, the file must be this variant)")
    parser.add_argument("--checkpoint", default=None,
                        help="weights to export (official or slaknet; architecture read from the file)")
    parser.add_argument("--ema", dest="use_ema", action="store_true", default=None, help="take the EMA weights")
    parser.add_argument("--format", dest="fmt", default="onnx",
                        help="onnx (default; needs pip install 'slaknet[export]'), torchscript, exported-program, "
                             "safetensors, or a format added with slaknet.deploy.register_format")
    parser.add_argument("-o", "--output", default=None, help="output file (default: MODEL.<format suffix>)")
    parser.add_argument("--reparameterize", default="strips", choices=["strips", "dense", "none"],
                        help="inference form: lean two strips per layer (default), one dense kernel, or none")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N",
                        help="example input: H W, or one value for a square (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=2, help="example batch size (default 2)")
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
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


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
                                                 norm_outputs=args.norm_outputs, use_ema=args.use_ema)
        else:
            model = SLaKBackbone(args.model or "slak_tiny", out_indices=args.out_indices, norm_outputs=bool(args.norm_outputs))
        model.eval()
    elif args.checkpoint:
        model, info, _ = model_from_checkpoint(args.checkpoint, args.model, args.use_ema)
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
    output = args.output or (os.path.splitext(os.path.basename(args.checkpoint))[0] if args.checkpoint
                             else args.model or "slak_tiny") + ("_backbone" if args.backbone else "") + default_suffix(args.fmt)
    result = export_model(model, output, args.fmt, reparameterize=args.reparameterize, input_size=size,
                          batch_size=args.batch_size, dynamic_batch=not args.static_batch,
                          dynamic_spatial=not args.static_spatial, opset=args.opset, verify=not args.no_verify,
                          tolerance=args.tolerance, metadata=metadata)
    if args.json:
        out = {k: getattr(result, k) for k in ("path", "format", "reparameterize", "input_shape", "dynamic_batch",
                                                "dynamic_spatial", "tolerance", "max_abs_diff", "max_rel_diff",
                                                "checks", "export_seconds", "file_bytes")}
        out["passed"] = result.passed if not args.no_verify else None
        print(json.dumps(out, indent=2))
    else:
        print(result.summary() if not args.no_verify else
              f"{result.format} -> {result.path} ({result.file_bytes / 2**20:.1f} MiB; not verified)")
    return 0
