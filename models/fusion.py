"""The fusion network: CNN poster features, optionally joined by object and metadata features.

The four variants share one code path so their comparison is fair: ``cnn`` uses the poster
alone, ``cnn+objects`` adds detected-object features, ``cnn+metadata`` adds encoded metadata,
``fused`` adds both. Side features are projected (LayerNorm → Linear → ReLU → dropout) to a
few dozen dimensions before the concatenation, so a 1024-d CNN vector cannot drown them simply
by outnumbering them, and an MLP maps the concatenation to one logit per genre (multi-label:
train with ``BCEWithLogitsLoss``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from posterfusion.models.backbones import create_backbone

Variant = Literal["cnn", "cnn+objects", "cnn+metadata", "fused"]


class FusionConfig(BaseModel):
    backbone: str = "densenet121"
    weights: str = Field("none", description="'none', 'imagenet' or a local weights file")
    variant: Variant = "fused"
    fusion: Literal["concat", "gated"] = "concat"
    num_genres: int = Field(ge=1)
    object_dim: int = Field(0, ge=0)
    metadata_dim: int = Field(0, ge=0)
    object_proj: int = Field(64, ge=1)
    metadata_proj: int = Field(32, ge=1)
    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    freeze_backbone: bool = False

    @property
    def uses_objects(self) -> bool:
        return self.variant in ("cnn+objects", "fused")

    @property
    def uses_metadata(self) -> bool:
        return self.variant in ("cnn+metadata", "fused")

    @model_validator(mode="after")
    def _inputs_match_variant(self) -> FusionConfig:
        if self.uses_objects and self.object_dim <= 0:
            raise ValueError(f"variant {self.variant!r} uses object features: object_dim must be > 0")
        if self.uses_metadata and self.metadata_dim <= 0:
            raise ValueError(f"variant {self.variant!r} uses metadata: metadata_dim must be > 0")
        return self


def _side_branch(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """LayerNorm first: object counts and metadata flags come on very different scales."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))


class FusionNet(nn.Module):
    """Poster CNN + optional side branches → MLP → genre logits.

    With ``fusion="gated"`` every side branch is multiplied by a learned sigmoid gate computed
    from the whole concatenation (one scalar per branch and sample). Most posters have no
    metadata and many have no detected objects; the gate lets the network learn to turn a
    branch down for those samples instead of letting uninformative inputs shift the hidden
    layer, and the gate values show how much each branch is relied on.

    Inputs a variant does not use are ignored, so callers may always pass everything.
    """

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, config.weights)
        width = self.backbone.feature_dim
        self.object_branch = self.metadata_branch = self.gate = None
        if config.uses_objects:
            self.object_branch = _side_branch(config.object_dim, config.object_proj, config.dropout)
            width += config.object_proj
        if config.uses_metadata:
            self.metadata_branch = _side_branch(config.metadata_dim, config.metadata_proj, config.dropout)
            width += config.metadata_proj
        num_branches = int(config.uses_objects) + int(config.uses_metadata)
        if config.fusion == "gated" and num_branches:
            self.gate = nn.Linear(width, num_branches)
        self.dropout = nn.Dropout(config.dropout)
        self.hidden = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(config.hidden, config.num_genres)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @property
    def uses_objects(self) -> bool:
        return self.config.uses_objects

    @property
    def uses_metadata(self) -> bool:
        return self.config.uses_metadata

    def train(self, mode: bool = True) -> FusionNet:
        """A frozen backbone stays in eval mode, so its BatchNorm statistics stay frozen too."""
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()
        return self

    def embed(self, images: torch.Tensor, objects: torch.Tensor | None = None,
              metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate ``(N, hidden)`` features: the fused representation used for similarity search."""
        parts = [self.backbone(images)]
        sides = []
        if self.object_branch is not None:
            sides.append(self.object_branch(self._checked(objects, "objects", self.config.object_dim, images)))
        if self.metadata_branch is not None:
            sides.append(self.metadata_branch(self._checked(metadata, "metadata", self.config.metadata_dim, images)))
        if self.gate is not None:
            gates = torch.sigmoid(self.gate(torch.cat(parts + sides, dim=1)))
            sides = [side * gates[:, i : i + 1] for i, side in enumerate(sides)]
        fused = torch.cat(parts + sides, dim=1)
        return self.hidden(self.dropout(fused))

    def forward(self, images: torch.Tensor, objects: torch.Tensor | None = None,
                metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Genre logits ``(N, num_genres)``; apply a sigmoid for per-genre probabilities."""
        return self.classifier(self.dropout(self.embed(images, objects, metadata)))

    def _checked(self, features: torch.Tensor | None, name: str, dim: int, images: torch.Tensor) -> torch.Tensor:
        if features is None:
            raise ValueError(f"variant {self.config.variant!r} needs {name} features of shape (N, {dim})")
        if features.dim() != 2 or features.shape[1] != dim or features.shape[0] != images.shape[0]:
            raise ValueError(f"{name} features must have shape ({images.shape[0]}, {dim}), got {tuple(features.shape)}")
        return features.to(images.dtype)


def build_model(config: FusionConfig) -> FusionNet:
    return FusionNet(config)
