"""Model registry: ``create_model(name, **cfg)``; adding an architecture is adding one function.

Importing this package registers every built-in architecture.
"""

from fercore.models import cnn as _cnn  # noqa: F401  (registers the from-scratch CNNs)
from fercore.models import transfer as _transfer  # noqa: F401  (registers pretrained backbones)
from fercore.models.registry import (
    ModelConfig,
    count_parameters,
    create_model,
    list_models,
    register_model,
)

__all__ = ["ModelConfig", "count_parameters", "create_model", "list_models", "register_model"]
