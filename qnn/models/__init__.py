"""Model registry: `create_model(name, **kw)`, `list_models()` (timm style)."""

from qnn.models.registry import create_model, is_user_model, list_models, register_model
from qnn.models import mobilenetv2, resnet, vgg  # noqa: F401  (registers the models)

__all__ = ["create_model", "is_user_model", "list_models", "register_model"]
