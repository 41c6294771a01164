"""Compact sparse checkpoints; the format lives in :mod:`slaknet.checkpoints.sparse_format` (kept importable here)."""
from slaknet.checkpoints.sparse_format import (FORMAT_NAME, FORMAT_VERSION, SparseCheckpoint,  # noqa: F401
                                               SparseSaveReport, decode_sparse_tensors, encode_tensor,
                                               is_sparse_checkpoint, load_sparse_checkpoint, save_sparse_checkpoint)

__all__ = ["save_sparse_checkpoint", "load_sparse_checkpoint", "SparseCheckpoint", "SparseSaveReport",
           "is_sparse_checkpoint", "decode_sparse_tensors", "encode_tensor", "FORMAT_NAME", "FORMAT_VERSION"]
