"""slaknet: Sparse Large Kernel Networks (SLaK, ICLR 2023) as a library.

``import slaknet`` registers the SLaK family with timm, so ``timm.create_model("slak_tiny")`` works.
"""
__version__ = "0.1.0"

from slaknet.errors import CheckpointError, ConfigError, SlaknetError  # noqa: E402
from slaknet.models import (SLaK, create_model, list_models, load_checkpoint,  # noqa: E402
                            reparameterize_model)

__all__ = ["__version__", "SLaK", "create_model", "list_models", "load_checkpoint", "reparameterize_model",
           "SlaknetError", "ConfigError", "CheckpointError"]
