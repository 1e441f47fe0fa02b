"""Image backbones behind one registry: name → module giving pooled ``(N, feature_dim)`` features.

Like timm's ``create_model``: a backbone is chosen by name in a config, so training, scoring
and serving rebuild the same network from a bundle without code changes. Weights are
``"none"`` (random init), ``"imagenet"`` (torchvision's pretrained weights) or a local
``.safetensors`` / ``.pt`` / ``.pth`` file; a file may hold the full torchvision state dict
(its classifier is ignored) or a backbone's own state dict, and their keys are the same
apart from the classifier, so one loader serves both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


class Backbone(nn.Module):
    """A CNN without its classifier. Subclasses set the class attributes below."""

    feature_dim: int
    imagenet_weights: str | None = None  # torchvision weights enum member, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    classifier_prefixes: tuple[str, ...] = ()  # torchvision keys to ignore when loading a full state dict

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a loaded state dict onto this module's keys (drops the torchvision classifier)."""
        return {k: v for k, v in state.items() if not k.startswith(self.classifier_prefixes)}


_REGISTRY: dict[str, Callable[[], Backbone]] = {}


def register_backbone(name: str):
    """Decorator registering a zero-argument builder (usually a :class:`Backbone` subclass)."""

    def register(builder):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return register


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def resolve_weights(name: str, weights: str = "none"):
    """What ``weights`` means for backbone ``name``, without loading or downloading anything.

    Returns None for ``"none"``, torchvision's weights enum member for ``"imagenet"`` and a
    :class:`~pathlib.Path` for a local weights file.
    """
    builder = _builder(name)
    if weights == "none":
        return None
    if weights == "imagenet":
        enum_name = getattr(builder, "imagenet_weights", None)
        if enum_name is None:
            raise ValueError(f"backbone {name!r} has no ImageNet weights; use 'none' or a weights file")
        from torchvision.models import get_weight

        return get_weight(enum_name)
    path = Path(weights)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"weights must be 'none', 'imagenet' or a {'/'.join(WEIGHT_SUFFIXES)} file, got {weights!r}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def create_backbone(name: str, weights: str = "none") -> Backbone:
    """Build backbone ``name`` and load ``weights`` into it (see :func:`resolve_weights`)."""
    resolved = resolve_weights(name, weights)
    backbone = _builder(name)()
    if resolved is None:
        return backbone
    if isinstance(resolved, Path):
        state = read_state_dict(resolved)
    else:  # torchvision weights enum: downloads into the torch hub cache on first use
        state = resolved.get_state_dict(progress=False, check_hash=True)
    load_backbone_state(backbone, state, source=str(weights))
    return backbone


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` one (``weights_only``, no pickled code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def load_backbone_state(backbone: Backbone, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load ``state`` strictly, naming missing, unexpected and mis-shaped keys when it does not fit."""
    state = backbone.adapt_state_dict(dict(state))
    own = backbone.state_dict()
    # BatchNorm fills in num_batches_tracked itself; old torchvision checkpoints lack it
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        problems = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("mis-shaped", mis_shaped)) if keys]
        raise ValueError(f"weights from {source} do not fit backbone {type(backbone).__name__}: "
                         + "; ".join(problems))
    backbone.load_state_dict(state, strict=False)


def _builder(name: str) -> Callable[[], Backbone]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered: {list_backbones()}")
    return _REGISTRY[name]


def _pool(features: torch.Tensor) -> torch.Tensor:
    """Global average pool: any input size gives a fixed-length vector."""
    return F.adaptive_avg_pool2d(features, 1).flatten(1)


@register_backbone("densenet121")
class DenseNet121(Backbone):
    """torchvision's DenseNet-121 features → ReLU → global average pool (its own head, minus the Linear)."""

    feature_dim = 1024
    imagenet_weights = "DenseNet121_Weights.IMAGENET1K_V1"
    classifier_prefixes = ("classifier.",)
    # torchvision's hosted checkpoint still uses the old 'norm.1'-style layer names
    _old_key = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")

    def __init__(self):
        super().__init__()
        from torchvision.models import densenet121

        self.features = densenet121().features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pool(F.relu(self.features(images)))

    def adapt_state_dict(self, state):
        state = super().adapt_state_dict(state)
        return {(m.group(1) + m.group(2) if (m := self._old_key.match(k)) else k): v for k, v in state.items()}


@register_backbone("resnet50")
class ResNet50(Backbone):
    """torchvision's ResNet-50 up to its average pool; module names match torchvision's keys."""

    feature_dim = 2048
    imagenet_weights = "ResNet50_Weights.IMAGENET1K_V2"
    classifier_prefixes = ("fc.",)

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return _pool(x)


@register_backbone("vgg16")
class VGG16(Backbone):
    """VGG-16 convolutional features → global average pool (512).

    Built from torchvision's layer list rather than ``vgg16()``, whose 120M-parameter classifier
    we would only throw away (and whose random init alone takes seconds on CPU).
    """

    feature_dim = 512
    imagenet_weights = "VGG16_Weights.IMAGENET1K_V1"
    classifier_prefixes = ("classifier.",)

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"], batch_norm=False)
        for module in self.features.modules():  # torchvision's VGG init
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pool(self.features(images))


@register_backbone("keras_cnn")
class KerasCNN(Backbone):
    """The Keras poster project's small CNN, a from-scratch baseline.

    Four blocks of 5×5 conv ('same' padding) with 16, 32, 64, 64 filters, each ReLU + 2×2 max
    pool + dropout 0.25; a global average pool replaces Keras' Flatten so any image size works;
    then dense 128 → ReLU → dropout 0.5 → 64 → ReLU.
    """

    feature_dim = 64

    def __init__(self, dropout: float = 0.25, dense_dropout: float = 0.5):
        super().__init__()
        blocks, channels = [], 3
        for filters in (16, 32, 64, 64):
            blocks += [nn.Conv2d(channels, filters, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                       nn.Dropout(dropout)]
            channels = filters
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Linear(channels, 128), nn.ReLU(inplace=True), nn.Dropout(dense_dropout),
                                  nn.Linear(128, self.feature_dim), nn.ReLU(inplace=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(_pool(self.features(images)))
