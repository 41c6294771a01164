"""Deployment: export (ONNX, TorchScript, torch.export, safetensors), compact sparse checkpoints,
conversion of official release files, and dense-prediction backbones. See docs/deployment.md."""
from slaknet.deploy.export import (DEFAULT_TOLERANCE, FORMATS, ExportFormat, ExportOptions, ExportResult,
                                   ExportVerificationError, export_model, get_format, list_formats, load_exported,
                                   plain_dwconv, register_format, unregister_format, verify_export)
from slaknet.deploy.metadata import model_metadata, weight_sparsity
from slaknet.deploy.sparse_format import (SparseCheckpoint, is_sparse_checkpoint, load_sparse_checkpoint,
                                          save_sparse_checkpoint)

__all__ = ["FORMATS", "ExportFormat", "ExportOptions", "register_format", "unregister_format", "list_formats",
           "get_format", "DEFAULT_TOLERANCE", "ExportResult", "ExportVerificationError", "export_model",
           "load_exported", "plain_dwconv", "verify_export", "model_metadata", "weight_sparsity",
           "SparseCheckpoint", "is_sparse_checkpoint", "load_sparse_checkpoint", "save_sparse_checkpoint"]
