"""Backbones, the fusion network, the model bundle and its Predictor.

``create_backbone("densenet121", weights="imagenet")`` gives pooled CNN features;
``build_model(FusionConfig(...))`` joins them with object and metadata features.
"""

from posterfusion.models.backbones import (
    Backbone,
    create_backbone,
    list_backbones,
    register_backbone,
    resolve_weights,
)
from posterfusion.models.fusion import FusionConfig, FusionNet, ModelConfig
from posterfusion.models.network import build_model

__all__ = [
    "Backbone",
    "FusionConfig",
    "FusionNet",
    "ModelConfig",
    "build_model",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "resolve_weights",
]
