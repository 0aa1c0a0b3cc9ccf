"""Model registry: `create_model(name, **kw)`, `list_models()` (timm style)."""

from qnn.models.registry import create_model, is_user_model, list_models, register_model
from qnn.models import efficientnet, mobilenetv2, mobilenetv3, resnet, squeezenet, vgg  # noqa: F401  (registers them)

__all__ = ["create_model", "is_user_model", "list_models", "register_model"]
