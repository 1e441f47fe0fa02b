"""The fusion network: CNN poster features, optionally joined by object and metadata features.

The variants share one code path so their comparison is fair (:data:`VARIANTS` is the one list
of them): ``cnn`` uses the poster alone, ``cnn+objects`` adds detected-object features,
``cnn+metadata`` adds encoded metadata, ``fused`` adds both, and ``flags-only`` adds only the
metadata encoder's presence flags (``has_metadata``, one ``<field>_missing`` each): it separates
what the metadata *says* from the fact that a poster *has* metadata, which is itself a label
signal in this data (Documentary posters rarely have any).

Side features are projected (→ Linear → ReLU → dropout) to a few dozen dimensions before the
concatenation, so a 1280-d CNN vector cannot drown them simply by outnumbering them, and an
MLP maps the concatenation to one logit per genre (multi-label: train with
``BCEWithLogitsLoss``). Object vectors are standardised with mean/std fitted on the training
split and stored as buffers (so they travel in ``model.safetensors``); the metadata encoder
already standardises its own output.

The network splits into :attr:`FusionNet.backbone` (image → pooled features) and the head
(:meth:`FusionNet.head`: pooled features + side inputs → logits), so a frozen-backbone run can
train the head on features extracted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from posterfusion.features.object_encoding import ObjectEncoding
from posterfusion.locations import Location
from posterfusion.models.backbones import backbone_class, create_backbone
from posterfusion.models.calibration import Calibration


@dataclass(frozen=True)
class VariantSpec:
    """Which side inputs a variant reads: objects or not; metadata none, all of it, or its flags only."""

    objects: bool
    metadata: Literal["none", "full", "flags"]


VARIANTS: dict[str, VariantSpec] = {
    "cnn": VariantSpec(objects=False, metadata="none"),
    "cnn+objects": VariantSpec(objects=True, metadata="none"),
    "cnn+metadata": VariantSpec(objects=False, metadata="full"),
    "fused": VariantSpec(objects=True, metadata="full"),
    "flags-only": VariantSpec(objects=False, metadata="flags"),
}
Variant = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]


class ModelConfig(BaseModel):
    """The network a user chooses: backbone, starting weights, input size, side inputs, head.

    Training's ``model`` section (``--set model.image_size=160``); the bundle records it inside
    :class:`FusionConfig`, which adds what the data decides (genres, input widths). The defaults
    are stated here and nowhere else.
    """

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("mobilenet_v2", description="a registered backbone (`posterfusion recipes` lists them)")
    weights: str = Field("none", description="what training starts from: 'none', 'imagenet' (torchvision's "
                         "download) or a weights file (a bare name is looked up in $POSTERFUSION_WEIGHTS)")
    image_size: int | None = Field(None, ge=32, description="square input size; None: the backbone's native size")
    variant: Variant = Field("fused", description="which side inputs the network reads (VARIANTS)")
    fusion: Literal["concat", "gated", "residual"] = Field(
        "concat", description="how side inputs join the poster: concat (one MLP over everything), gated (a learned "
        "gate per side branch), residual (the poster alone gives the logits; each side input present adds a "
        "correction, exactly zero when it is missing, so a poster without side inputs is scored as CNN-only)")
    hidden: int = Field(256, ge=1, description="width of the head's hidden layer (the embedding)")
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    object_proj: int = Field(64, ge=1, description="width the object vector is projected to")
    metadata_proj: int = Field(32, ge=1, description="width the metadata vector is projected to")
    metadata_text: int = Field(0, ge=0, description="words of a poster's overview read (TF-IDF over the training "
                               "split's most frequent words; residual fusion adds a linear text correction fitted "
                               "on the training split and weighed on validation); 0: the overview is not read")
    freeze_bn: bool | None = Field(None, description="backbone BatchNorms stay in eval mode (pretrained "
                                   "statistics); None: when the weights are pretrained")
    object_encoding: ObjectEncoding = Field("bag", description="what the object branch reads of the detections: "
                                            "bag (per class: count, confidence, area) or layout (bag + where)")
    poster_from: str | None = Field(None, description="residual fusion: a trained `cnn` bundle (path or URI) whose "
                                    "poster path (backbone, hidden layer, classifier) this network keeps as is, "
                                    "frozen; only the side branches train, so a poster without side inputs is "
                                    "ranked exactly as that bundle ranks it (an ensemble's: member i keeps its "
                                    "member i)")

    @field_validator("poster_from")
    @classmethod
    def _readable_anywhere(cls, value: str | None) -> str | None:
        """A local path made absolute: the Ray Train workers read it from their own working directories."""
        return None if value is None else str(Location.parse(value).absolute())

    @property
    def size(self) -> int:
        """The input size in pixels: as set, else the backbone's native one."""
        return self.image_size or backbone_class(self.backbone).native_size

    @property
    def uses_objects(self) -> bool:
        return VARIANTS[self.variant].objects

    @property
    def uses_metadata(self) -> bool:
        return VARIANTS[self.variant].metadata != "none"

    @property
    def text_words(self) -> int:
        """How many overview words the metadata encoder keeps: ``metadata_text`` for a variant reading all of
        the metadata, 0 for one reading none or its flags only."""
        return self.metadata_text if VARIANTS[self.variant].metadata == "full" else 0


class FusionConfig(ModelConfig):
    """The network as built: the user's :class:`ModelConfig` plus what the training data decided."""

    freeze_bn: bool = Field(False, description="backbone BatchNorms stay in eval mode (pretrained statistics)")
    num_genres: int = Field(ge=1)
    object_dim: int = Field(0, ge=0)
    metadata_dim: int = Field(0, ge=0)
    metadata_flags: list[int] = Field(default_factory=list,
                                      description="columns of the metadata vector that are presence flags")
    freeze_backbone: bool = Field(False, description="the backbone is never trained (frozen-features mode)")
    members: int = Field(1, ge=1, description="networks whose logits are averaged (an ensemble; 1: one network)")
    shared_stages: int = Field(0, ge=0, description="leading backbone stages an ensemble's members share (they "
                               "were frozen while the members fine-tuned): run once per batch")
    metadata_presence: int | None = Field(None, ge=0, description="the metadata column that says a poster has "
                                          "any (residual fusion gates its correction by it)")
    text_span: tuple[int, int] | None = Field(None, description="[start, stop) of the metadata columns holding the "
                                              "overview's TF-IDF weights: the text correction reads them, the "
                                              "metadata branch the other columns")
    object_presence: int | None = Field(None, ge=0, description="the object-vector entry that is 0 when nothing "
                                        "was detected (residual fusion gates its correction by it)")
    poster_version: str | None = Field(None, description="the version (content hash) of the poster_from bundle "
                                       "whose poster path was kept")
    correction_scale: dict[Literal["objects", "metadata", "text"], float] | None = Field(
        None, description="residual fusion: each side correction's weight, fitted on validation after training "
        "(0 where validation did not support that input); None: every correction as trained (weight 1)")
    routing: Routing | None = Field(None, description="a routed bundle (`posterfusion route`): this network "
                                    "beside a `cnn` network, each poster scored by the one validation chose for "
                                    "its slice (with / without metadata)")

    @property
    def embedding_dim(self) -> int:
        """Width of the representation similarity search reads: each member's hidden layer, side by side
        (a routed bundle's: its cnn network's, the same space for every poster)."""
        return self.routing.cnn.embedding_dim if self.routing else self.hidden * self.members

    @model_validator(mode="after")
    def _inputs_match_variant(self) -> FusionConfig:
        if self.uses_objects and self.object_dim <= 0:
            raise ValueError(f"variant {self.variant!r} uses object features: object_dim must be > 0")
        if self.uses_metadata and self.metadata_dim <= 0:
            raise ValueError(f"variant {self.variant!r} uses metadata: metadata_dim must be > 0")
        if self.fusion == "residual" and ((self.uses_metadata and self.metadata_presence is None)
                                          or (self.uses_objects and self.object_presence is None)):
            raise ValueError("residual fusion needs metadata_presence / object_presence: what says a side input "
                             "is there")
        if self.poster_from and (self.fusion != "residual" or not (self.uses_objects or self.uses_metadata)):
            raise ValueError("model.poster_from keeps a cnn bundle's poster path under side corrections: it needs "
                             "fusion 'residual' and a variant with side inputs")
        if VARIANTS[self.variant].metadata == "flags" and not self.metadata_flags:
            raise ValueError("variant 'flags-only' needs metadata_flags (the encoder's flag columns)")
        if any(not 0 <= i < self.metadata_dim for i in self.metadata_flags):
            raise ValueError(f"metadata_flags must index the {self.metadata_dim} metadata columns")
        if self.text_span and not (0 <= self.text_span[0] < self.text_span[1] <= self.metadata_dim):
            raise ValueError(f"text_span must lie within the {self.metadata_dim} metadata columns")
        if self.routing and not (self.uses_metadata and self.routing.presence < self.metadata_dim):
            raise ValueError("routing by metadata needs a network that reads metadata (and its presence column)")
        if self.routing and (self.routing.cnn.size, self.routing.cnn.backbone) != (self.size, self.backbone):
            raise ValueError("a routed bundle's two networks see one input: the same backbone and image size")
        return self


TEXT_C = 4.0  # inverse L2 strength of the text model: the validation probe's one setting (benchmarks/overview_probe.py)


def fit_text_weights(words: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(genres, words)`` weights of one logistic model per genre on the training posters that have words.

    Why a model of its own rather than a trained layer: read inside the network and fine-tuned with it, the
    words' evidence faded (validation fused − cnn with metadata +0.053 / +0.033 on two seeds, against +0.049 /
    +0.041 without the words), while this linear model added to the network's logits gained +0.049 macro on
    the validation posters with an overview (benchmarks/overview_probe.py). The intercepts are left out: the
    correction is the words' evidence only, exactly 0 for a poster without one.
    """
    from sklearn.linear_model import LogisticRegression

    rows = words.any(axis=1)
    weights = np.zeros((labels.shape[1], words.shape[1]))
    for genre in range(labels.shape[1]):
        y = labels[rows, genre]
        if 0 < y.sum() < len(y):
            weights[genre] = LogisticRegression(C=TEXT_C, max_iter=2000).fit(words[rows], y).coef_[0]
    return weights


SLICES = ("with_metadata", "without_metadata")
Slice = Literal["with_metadata", "without_metadata"]


class Routing(BaseModel):
    """What a routed bundle adds to its side-input network: a ``cnn`` network, and per slice of posters (with
    any metadata field / without any) which of the two scores it and the calibration fitted on that slice.

    Why: a side-input model trained on a catalogue where most posters have metadata can rank posters
    without any worse than the CNN alone does, and on another source most posters have none. Which
    network a slice gets is chosen on validation (macro ROC-AUC on that slice), never on the test split.
    """

    model_config = ConfigDict(extra="forbid")

    cnn: FusionConfig = Field(description="the poster-only network")
    presence: int = Field(ge=0, description="the metadata column that is 1 when a poster has any metadata")
    routes: dict[Slice, Literal["cnn", "side"]] = Field(description="which network scores each slice")
    calibration: dict[Slice, Calibration] = Field(description="per slice, raw logits of its network → "
                                                  "calibrated logits (the network's own calibration, then a "
                                                  "Platt step fitted on that slice's validation posters)")
    sources: dict[Literal["cnn", "side"], dict[str, str]] = Field(
        description="each network's bundle: where it was read and its version")

    @model_validator(mode="after")
    def _every_slice(self) -> Routing:
        if set(self.routes) != set(SLICES) or set(self.calibration) != set(SLICES):
            raise ValueError(f"a routing names a network and a calibration for each of {SLICES}")
        if self.cnn.variant != "cnn" or self.cnn.routing is not None:
            raise ValueError("a routing's poster-only network is a plain `cnn` network")
        return self


class Standardise(nn.Module):
    """``(x − mean) / std`` with statistics fitted on the training split, stored as buffers."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, mean, std, floor: float = 1e-3) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).clamp(min=floor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))


class FusionNet(nn.Module):
    """Poster CNN + optional side branches → genre logits.

    ``concat``: the side branches' projections join the pooled CNN features before one MLP.
    ``gated``: the same, each side branch multiplied by a learned sigmoid gate computed from the
    whole concatenation (one scalar per branch and sample).
    ``residual``: the poster alone gives the logits (the MLP over CNN features, as the ``cnn``
    variant), and each side input *present* adds a correction computed from the poster's hidden
    features and that input; a missing input (no metadata, no detected object) adds exactly 0, so
    such a poster is scored exactly as the poster-only path scores it. Training (``split=True``)
    gives the poster-only logits and the summed correction apart, so the loss can train the
    poster path as a CNN-only model and the corrections on top of it. With ``poster_from`` the
    poster path is a trained ``cnn`` bundle's (:meth:`keep_poster_path`), frozen and without
    dropout, so only the corrections learn and a poster without side inputs gets that bundle's logits.

    Inputs a variant does not use are ignored, so callers may always pass everything.
    """

    def __init__(self, config: FusionConfig, load_weights: bool = True):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, config.weights if load_weights else "none")
        self.residual = config.fusion == "residual"
        width = self.backbone.feature_dim
        self.object_norm = self.object_branch = self.metadata_branch = self.gate = None
        if config.uses_objects:
            self.object_norm = Standardise(config.object_dim)
            self.object_branch = _projection(config.object_dim, config.object_proj, config.dropout)
            width += 0 if self.residual else config.object_proj
        if config.uses_metadata:
            self.register_buffer("metadata_columns", torch.tensor(self._metadata_columns(), dtype=torch.long),
                                 persistent=False)
            self.metadata_branch = _projection(len(self.metadata_columns), config.metadata_proj, config.dropout)
            width += 0 if self.residual else config.metadata_proj
        num_branches = int(config.uses_objects) + int(config.uses_metadata)
        if config.fusion == "gated" and num_branches:
            self.gate = nn.Linear(width, num_branches)
        self.dropout = nn.Dropout(config.dropout)
        self.hidden = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(config.hidden, config.num_genres)
        self.corrections = nn.ModuleDict()
        if self.residual:
            for name, proj in (("objects", config.object_proj), ("metadata", config.metadata_proj)):
                if (self.object_branch if name == "objects" else self.metadata_branch) is not None:
                    self.corrections[name] = nn.Sequential(
                        nn.Linear(config.hidden + proj, config.hidden // 2), nn.ReLU(inplace=True),
                        nn.Dropout(config.dropout), nn.Linear(config.hidden // 2, config.num_genres))
        self.text_correction = None
        if self.residual and config.uses_metadata and config.text_span:
            # fitted on the driver before training (set_text_weights), never trained here; no bias: an
            # overview without a known word (or none at all) adds exactly 0
            self.text_correction = nn.Linear(config.text_span[1] - config.text_span[0], config.num_genres, bias=False)
            nn.init.zeros_(self.text_correction.weight)
            self.text_correction.requires_grad_(False)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
        if config.poster_from:
            for part in self.poster_path():
                part.requires_grad_(False)
        self.train()

    def poster_path(self) -> list[nn.Module]:
        """The modules that map a poster to its poster-only logits (the whole ``cnn`` variant)."""
        return [self.backbone, self.dropout, self.hidden, self.classifier]

    def keep_poster_path(self, state: dict[str, torch.Tensor]) -> None:
        """Load the poster path from a ``cnn`` network's state dict; every one of its tensors must be there."""
        prefixes = ("backbone.", "hidden.", "classifier.")
        own = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
        missing = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
        if missing:
            raise ValueError(f"the poster bundle's network differs from this one's poster path: {missing[:3]}")
        self.load_state_dict({k: state[k] for k in own}, strict=False)

    def _metadata_columns(self) -> list[int]:
        if VARIANTS[self.config.variant].metadata == "flags":
            return list(self.config.metadata_flags)
        start, stop = self.config.text_span or (0, 0)  # the overview's words go to the text correction
        return [i for i in range(self.config.metadata_dim) if not start <= i < stop]

    def set_text_weights(self, weights) -> None:
        """The text correction's ``(genres, words)`` weights, fitted on the training split (a no-op without one)."""
        if self.text_correction is not None and weights is not None:
            self.text_correction.weight.copy_(torch.as_tensor(weights, dtype=self.text_correction.weight.dtype))

    @property
    def uses_objects(self) -> bool:
        return self.config.uses_objects

    @property
    def uses_metadata(self) -> bool:
        return self.config.uses_metadata

    def train(self, mode: bool = True) -> FusionNet:
        """A frozen backbone stays in eval mode, a kept poster path too; so do its BatchNorms under ``freeze_bn``."""
        super().train(mode)
        if self.config.poster_from:
            for part in self.poster_path():
                part.eval()
        elif self.config.freeze_backbone:
            self.backbone.eval()
        elif self.config.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm):
                    module.eval()
        return self

    def set_object_statistics(self, mean, std) -> None:
        """Training-split mean/std of the object vectors (a no-op for variants without objects)."""
        if self.object_norm is not None:
            self.object_norm.set_statistics(mean, std)

    def _sides(self, features: torch.Tensor, objects, metadata) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each side branch's projection and its presence (N, 1): 1 where the input is there."""
        sides = {}
        if self.object_branch is not None:
            objects = self._checked(objects, "objects", self.config.object_dim, features)
            present = objects[:, self.config.object_presence] > 0 if self.residual else torch.ones_like(objects[:, 0])
            sides["objects"] = (self.object_branch(self.object_norm(objects)), present[:, None].to(features.dtype))
        if self.metadata_branch is not None:
            metadata = self._checked(metadata, "metadata", self.config.metadata_dim, features)
            present = (metadata[:, self.config.metadata_presence] > 0.5 if self.residual
                       else torch.ones_like(metadata[:, 0]))
            sides["metadata"] = (self.metadata_branch(metadata[:, self.metadata_columns]),
                                 present[:, None].to(features.dtype))
        return sides

    def outputs(self, features: torch.Tensor, objects: torch.Tensor | None = None,
                metadata: torch.Tensor | None = None, text: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pooled CNN features (+ side inputs) → (penultimate ``(N, hidden)``, logits, residual correction).

        For ``residual`` fusion the logits are the poster path's and the correction (zero where no
        side input is present) is what the side inputs add, each at its ``correction_scale``; for
        the others the correction is None. ``text=False`` (training) leaves the overview's correction
        out: it was fitted on the training posters, so on them it would claim more than it knows.
        """
        sides = self._sides(features, objects, metadata)
        if self.residual:
            hidden = self.hidden(self.dropout(features))
            branches = self._corrections(hidden, sides, metadata)
            if not text:  # training: the text correction was fitted on these very posters
                branches.pop("text", None)
            zero = torch.zeros(len(features), self.config.num_genres, device=features.device, dtype=features.dtype)
            correction = residual_logits(branches | {"poster": zero}, self.config.correction_scale)
            return hidden, self.classifier(self.dropout(hidden)), correction
        projections = [projected for projected, _ in sides.values()]
        if self.gate is not None:
            gates = torch.sigmoid(self.gate(torch.cat([features, *projections], dim=1)))
            projections = [side * gates[:, i : i + 1] for i, side in enumerate(projections)]
        hidden = self.hidden(self.dropout(torch.cat([features, *projections], dim=1)))
        return hidden, self.classifier(self.dropout(hidden)), None

    def _corrections(self, hidden: torch.Tensor, sides: dict, metadata: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
        # the poster path's features enter each correction detached: only the poster-only loss shapes them
        out = {name: present * self.corrections[name](torch.cat([hidden.detach(), projected], dim=1))
               for name, (projected, present) in sides.items()}
        if self.text_correction is not None and "metadata" in out:
            start, stop = self.config.text_span
            out["text"] = sides["metadata"][1] * self.text_correction(metadata[:, start:stop].to(hidden.dtype))
        return out

    def branch_logits(self, inputs: torch.Tensor, objects: torch.Tensor | None = None,
                      metadata: torch.Tensor | None = None, pooled: bool = False) -> dict[str, torch.Tensor]:
        """Residual fusion's parts: the poster path's logits (``poster``) and each side input's correction as
        trained (unscaled, zero where that input is missing). What validation fits ``correction_scale`` on;
        :func:`residual_logits` puts them together."""
        if not self.residual:
            raise ValueError("branch logits exist for residual fusion only")
        features = inputs if pooled else self.backbone(inputs)
        hidden = self.hidden(self.dropout(features))
        return {"poster": self.classifier(self.dropout(hidden)),
                **self._corrections(hidden, self._sides(features, objects, metadata), metadata)}

    def features_to_outputs(self, features: torch.Tensor, objects: torch.Tensor | None = None,
                            metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, final logits) from pooled CNN features."""
        hidden, logits, correction = self.outputs(features, objects, metadata)
        return hidden, logits if correction is None else logits + correction

    def embed_features(self, features: torch.Tensor, objects: torch.Tensor | None = None,
                       metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled CNN features (+ side inputs) → the penultimate ``(N, hidden)`` representation."""
        return self.outputs(features, objects, metadata)[0]

    def head(self, features: torch.Tensor, objects: torch.Tensor | None = None,
             metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled CNN features (+ side inputs) → genre logits."""
        return self.features_to_outputs(features, objects, metadata)[1]

    def embed(self, images: torch.Tensor, objects: torch.Tensor | None = None,
              metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate ``(N, hidden)`` features: the representation used for similarity search."""
        return self.embed_features(self.backbone(images), objects, metadata)

    def embed_and_logits(self, images: torch.Tensor, objects: torch.Tensor | None = None,
                         metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, logits) in one pass: what the Predictor scores with (in eval mode)."""
        return self.features_to_outputs(self.backbone(images), objects, metadata)

    def forward(self, inputs: torch.Tensor, objects: torch.Tensor | None = None,
                metadata: torch.Tensor | None = None, pooled: bool = False, split: bool = False):
        """Genre logits ``(N, num_genres)``; the bundle's calibration turns them into probabilities.

        ``inputs`` are images, or with ``pooled=True`` the backbone's pooled features (head
        epochs train on stored features, through this same forward so DDP syncs their gradients).
        ``split=True`` (training): (the poster path's logits, the side inputs' correction or None).
        """
        _, logits, correction = self.outputs(inputs if pooled else self.backbone(inputs), objects, metadata,
                                             text=not split)
        if split:
            return logits, correction
        return logits if correction is None else logits + correction

    def _checked(self, side: torch.Tensor | None, name: str, dim: int, features: torch.Tensor) -> torch.Tensor:
        if side is None:
            raise ValueError(f"variant {self.config.variant!r} needs {name} features of shape (N, {dim})")
        if side.dim() != 2 or side.shape[1] != dim or side.shape[0] != features.shape[0]:
            raise ValueError(f"{name} features must have shape ({features.shape[0]}, {dim}), got {tuple(side.shape)}")
        return side.to(features.dtype)


def residual_logits(branches: dict, scale: dict[str, float] | None = None):
    """The poster path's logits plus each side correction at its weight (1 where ``scale`` names none).

    ``branches`` as :meth:`FusionNet.branch_logits` gives them (tensors or arrays alike).
    """
    scale = scale or {}
    total = branches["poster"]
    for name, correction in branches.items():
        if name != "poster":
            total = total + scale.get(name, 1.0) * correction
    return total
