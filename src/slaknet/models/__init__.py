"""SLaK models (registered with timm on import), the model factory and checkpoint loading."""
from slaknet.models.checkpoint import (ArchSpec, describe_model, describe_state_dict, extract_state_dict,
                                       load_checkpoint, read_checkpoint)
from slaknet.models.factory import create_model, guess_variant, list_models, reparameterize_model
from slaknet.models.slak import MODEL_SPECS, RECIPE_DEFAULTS, SLaK, Block, recipe_defaults

__all__ = ["SLaK", "Block", "MODEL_SPECS", "RECIPE_DEFAULTS", "recipe_defaults", "create_model", "list_models", "reparameterize_model",
           "guess_variant", "ArchSpec", "describe_model", "describe_state_dict", "extract_state_dict",
           "load_checkpoint", "read_checkpoint"]
