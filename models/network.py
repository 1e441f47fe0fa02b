"""The network a :class:`~posterfusion.models.fusion.FusionConfig` describes, and the preset its images need.

Its own module so that :mod:`~posterfusion.models.fusion` (one network) and
:mod:`~posterfusion.models.ensemble` (several) never import each other: this one imports both.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from posterfusion.features.presets import preset_for
from posterfusion.models.backbones import backbone_class
from posterfusion.models.ensemble import EnsembleNet
from posterfusion.models.fusion import FusionNet, ModelConfig
from posterfusion.models.routed import RoutedNet


def build_model(config, load_weights: bool = True) -> nn.Module:
    """The network of ``config`` (an :class:`EnsembleNet` when it has several members, a :class:`RoutedNet`
    when it routes posters between two networks);
    ``load_weights=False`` skips the backbone's starting weights.

    Training starts from ``config.weights``; a bundle's Predictor loads all weights from the
    bundle itself and must never fetch the starting ones (a download at every replica start,
    or a path that exists only where training ran).
    """
    if config.routing is not None:
        side = build_model(config.model_copy(update={"routing": None}), load_weights=load_weights)
        return RoutedNet(config, side=side, cnn=build_model(config.routing.cnn, load_weights=load_weights))
    if config.members > 1:
        return EnsembleNet(config, load_weights=load_weights)
    return FusionNet(config, load_weights=load_weights)


def input_preset(config: ModelConfig, stage: Literal["train", "eval"] = "eval"):
    """The image preset of ``stage`` at ``config``'s size, normalised the way its backbone expects."""
    backbone = backbone_class(config.backbone)
    return preset_for(stage, config.size, backbone.input_mean, backbone.input_std)
