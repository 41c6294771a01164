"""Checkpoint layer: reading, describing and writing SLaK weights (below models, deploy and analysis).

Imports only torch, safetensors, numpy, :mod:`slaknet.errors` and :mod:`slaknet.io`, so every other
package can use it without import cycles.

* :mod:`~slaknet.checkpoints.schema`: the branch names of a large-kernel layer, old-name renames;
* :mod:`~slaknet.checkpoints.reader`: the one reader (all layouts, wrappers, prefixes, sparse format);
* :mod:`~slaknet.checkpoints.arch`: state dict -> :class:`ArchSpec`;
* :mod:`~slaknet.checkpoints.info`: training facts stored with a checkpoint (input size, classes, ...);
* :mod:`~slaknet.checkpoints.sparse_format`: slaknet's compact sparse safetensors format;
* :mod:`~slaknet.checkpoints.writer`: atomic torch / safetensors writers;
* :mod:`~slaknet.checkpoints.bn`: BatchNorm folding.
"""
from slaknet.checkpoints.arch import ArchSpec, describe_state_dict
from slaknet.checkpoints.bn import fold_batchnorm, fold_state_bn
from slaknet.checkpoints.info import TrainingInfo, read_training_info
from slaknet.checkpoints.reader import (CheckpointNotFoundError, extract_state_dict, normalize_key, read_checkpoint,
                                        read_state_dict)
from slaknet.checkpoints.sparse_format import (SparseCheckpoint, is_sparse_checkpoint, load_sparse_checkpoint,
                                               read_safetensors_metadata, save_sparse_checkpoint)
from slaknet.checkpoints.writer import save_torch, write_safetensors

__all__ = ["ArchSpec", "describe_state_dict", "fold_batchnorm", "fold_state_bn", "TrainingInfo",
           "read_training_info", "CheckpointNotFoundError", "extract_state_dict", "normalize_key",
           "read_checkpoint", "read_state_dict", "SparseCheckpoint", "is_sparse_checkpoint",
           "load_sparse_checkpoint", "read_safetensors_metadata", "save_sparse_checkpoint", "save_torch",
           "write_safetensors"]
