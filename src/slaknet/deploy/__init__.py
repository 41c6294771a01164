"""Deployment: export (ONNX, TorchScript, torch.export, safetensors), compact sparse checkpoints,
conversion of official release files, and dense-prediction backbones. See docs/deployment.md."""

from slaknet.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_TOLERANCE": "slaknet.deploy.export",
    "FORMATS": "slaknet.deploy.export",
    "ExportFormat": "slaknet.deploy.export",
    "ExportOptions": "slaknet.deploy.export",
    "ExportResult": "slaknet.deploy.export",
    "ExportVerificationError": "slaknet.deploy.export",
    "export_model": "slaknet.deploy.export",
    "get_format": "slaknet.deploy.export",
    "list_formats": "slaknet.deploy.export",
    "load_exported": "slaknet.deploy.export",
    "plain_dwconv": "slaknet.deploy.export",
    "register_format": "slaknet.deploy.export",
    "unregister_format": "slaknet.deploy.export",
    "verify_export": "slaknet.deploy.export",
    "InferenceRunner": "slaknet.deploy.runtime",
    "inference_runner": "slaknet.deploy.runtime",
    "model_metadata": "slaknet.deploy.metadata",
    "weight_sparsity": "slaknet.deploy.metadata",
    "SparseCheckpoint": "slaknet.deploy.sparse_format",
    "is_sparse_checkpoint": "slaknet.deploy.sparse_format",
    "load_sparse_checkpoint": "slaknet.deploy.sparse_format",
    "save_sparse_checkpoint": "slaknet.deploy.sparse_format",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["FORMATS", "ExportFormat", "ExportOptions", "register_format", "unregister_format", "list_formats",
           "get_format", "DEFAULT_TOLERANCE", "ExportResult", "ExportVerificationError", "export_model",
           "load_exported", "plain_dwconv", "verify_export", "InferenceRunner", "inference_runner", "model_metadata", "weight_sparsity",
           "SparseCheckpoint", "is_sparse_checkpoint", "load_sparse_checkpoint", "save_sparse_checkpoint"]
