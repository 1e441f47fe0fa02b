"""Image backbones behind one registry: name → module giving pooled ``(N, feature_dim)`` features.

Like timm's ``create_model``: a backbone is chosen by name in a config, so training, scoring
and serving rebuild the same network from a bundle without code changes. Weights are
``"none"`` (random init), ``"imagenet"`` (torchvision's pretrained weights) or a local
``.safetensors`` / ``.pt`` / ``.pth`` file; a file may hold the full torchvision state dict
(its classifier is ignored) or a backbone's own state dict, and their keys are the same
apart from the classifier, so one loader serves both.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from posterfusion.errors import UserValueError
from posterfusion.features.presets import IMAGENET_MEAN, IMAGENET_STD
from posterfusion.weights import require_weights

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


class Backbone(nn.Module):
    """A CNN without its classifier. Subclasses set the class attributes below.

    ``input_mean``/``input_std`` say how the pretrained weights expect pixels in [0, 1] to be
    normalised (torchvision's ImageNet statistics for most; [−1, 1] for TF-trained nets) and
    ``native_size`` the image size they were trained at: the presets read both, so a backbone
    is never fed inputs scaled for another.
    """

    feature_dim: int
    imagenet_weights: str | None = None  # torchvision weights enum member, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    classifier_prefixes: tuple[str, ...] = ()  # torchvision keys to ignore when loading a full state dict
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    native_size: int = 224
    sequential_stages: bool = False  # forward == the stages() in order, then pool: a trunk can run once

    def forward_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``stages()[start:stop]`` of the forward pass, pooled when it runs to the last stage.

        Lets an ensemble whose members share their frozen lower stages run those once
        (:class:`~posterfusion.models.ensemble.EnsembleNet`). Only backbones whose stages compose
        exactly into ``forward`` (``sequential_stages``) can be split; the others run whole.
        """
        stages = self.stages()
        stop = len(stages) if stop is None else stop
        if (start, stop) == (0, len(stages)):
            return self(x)
        if not self.sequential_stages:
            raise ValueError(f"{type(self).__name__} cannot run part of its stages (sequential_stages is False)")
        for stage in stages[start:stop]:
            for block in stage:
                x = block(x)
        return _pool(x) if stop == len(stages) else x

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a loaded state dict onto this module's keys (drops the torchvision classifier)."""
        return {k: v for k, v in state.items() if not k.startswith(self.classifier_prefixes)}

    def stages(self) -> list[nn.Module]:
        """The backbone in order, input side first, in the pieces fine-tuning may unfreeze from the top.

        One piece by default; backbones whose resolution stages are known split further, so a
        recipe can train only the last stages (cheaper on a CPU: no gradients below them).
        """
        return [self]

    def train_last_stages(self, count: int | None) -> None:
        """Freeze every stage but the last ``count`` (None: train all of them)."""
        stages = self.stages()
        keep = len(stages) if count is None else count
        for i, stage in enumerate(stages):
            stage.requires_grad_(i >= len(stages) - keep)


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
            raise UserValueError(f"backbone {name!r} has no ImageNet weights; use 'none' or a weights file")
        from torchvision.models import get_weight

        return get_weight(enum_name)
    return weights_file(weights)


def weights_file(weights: str | Path) -> Path:
    """A backbone weights file (see :mod:`posterfusion.weights` for where it is looked up)."""
    path = Path(weights)
    if path.suffix not in WEIGHT_SUFFIXES:
        kinds = "/".join(WEIGHT_SUFFIXES)
        raise UserValueError(f"weights must be 'none', 'imagenet' or a {kinds} file, got {weights!r}")
    return require_weights(path, "backbone weights file")


def weights_id(weights: str) -> str:
    """A short name of the starting weights for cache keys: 'none', 'imagenet' or the file's sha256 prefix."""
    if weights in ("none", "imagenet"):
        return weights
    with open(weights_file(weights), "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:12]


def imagenet_cached(name: str) -> bool:
    """Whether torchvision's ImageNet weights for ``name`` are already in the local torch hub cache.

    Recipes use this to decide, without any network access, between ImageNet weights and
    training from scratch (and say which in their summary).
    """
    enum_name = getattr(_builder(name), "imagenet_weights", None)
    if enum_name is None:
        return False
    from torch.hub import get_dir
    from torchvision.models import get_weight

    return (Path(get_dir()) / "checkpoints" / Path(get_weight(enum_name).url).name).is_file()


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
        raise UserValueError(f"weights from {source} do not fit backbone {type(backbone).__name__}: "
                         + "; ".join(problems))
    backbone.load_state_dict(state, strict=False)


def backbone_class(name: str) -> type[Backbone]:
    """The registered class (its normalisation, native size, feature width) without building it."""
    return _builder(name)


def imagenet_classifier(weights: str | Path) -> nn.Linear:
    """The 1000-class ImageNet head of a full torchvision-layout state dict (for checking the weights)."""
    state = read_state_dict(weights_file(weights))
    weight, bias = state["classifier.1.weight"], state["classifier.1.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head


def _builder(name: str) -> Callable[[], Backbone]:
    if name not in _REGISTRY:
        raise UserValueError(f"unknown backbone {name!r}; registered: {list_backbones()}")
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

    def stages(self) -> list[nn.Module]:
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]


@register_backbone("resnet34")
class ResNet34(ResNet50):
    """torchvision's ResNet-34 up to its average pool (the seed-001 system's backbone)."""

    feature_dim = 512
    imagenet_weights = "ResNet34_Weights.IMAGENET1K_V1"

    def __init__(self):
        nn.Module.__init__(self)
        from torchvision.models import resnet34

        net = resnet34()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4


class Conv2dSame(nn.Conv2d):
    """A convolution padded like TensorFlow's ``"SAME"``: nothing before, the remainder after.

    TF pads a stride-2 convolution of an even input by one pixel on the right/bottom only;
    torchvision pads one on every side, which shifts every feature map by half a pixel and
    degrades TF-trained weights (the check image's "military uniform" 0.92 → 0.36). The
    padding depends on the input size, so it is computed per call. Parameter names are
    those of ``nn.Conv2d``: state dicts load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride, dilation in zip(reversed(x.shape[-2:]), reversed(self.kernel_size),
                                                  reversed(self.stride), reversed(self.dilation), strict=True):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


def _tf_same_padding(module: nn.Module) -> None:
    """Swap every padded strided convolution of ``module`` for :class:`Conv2dSame`, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and child.stride != (1, 1) and child.kernel_size != (1, 1):
            same = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                              child.dilation, child.groups, child.bias is not None)
            same.load_state_dict(child.state_dict())
            setattr(module, name, same)
        else:
            _tf_same_padding(child)


@register_backbone("mobilenet_v2")
class MobileNetV2(Backbone):
    """torchvision's MobileNetV2-1.0 features → global average pool (1280), TF conventions.

    Built for Google's ImageNet weights (``../shared/weights/mobilenet_v2_imagenet.safetensors``,
    the one pretrained CNN that can be had offline here): pixels scaled to [−1, 1] and
    TF-``SAME`` padding on the stride-2 convolutions, as it was trained. Its BatchNorms are
    folded into affine layers (running mean 0, var 1 − eps): fine-tune it with BatchNorm in
    eval mode (``FusionConfig.freeze_bn``), or batch statistics replace the folded ones.
    ``classifier.1.*`` of a full state dict is the ImageNet head (:func:`imagenet_classifier`).
    """

    feature_dim = 1280
    # No "imagenet": torchvision's own MobileNetV2 weights expect ImageNet mean/std and symmetric
    # padding, so they do not belong to this TF-convention network. Weights come from a file.
    classifier_prefixes = ("classifier.",)
    input_mean = (0.5, 0.5, 0.5)
    input_std = (0.5, 0.5, 0.5)
    sequential_stages = True

    def __init__(self):
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2().features
        _tf_same_padding(self.features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pool(self.features(images))

    def stages(self) -> list[nn.Module]:
        """By output resolution: 1/2, 1/4, 1/8, 1/16 (blocks 7–13), 1/32 (14–17), the 1280-wide head conv."""
        bounds = [(0, 2), (2, 4), (4, 7), (7, 14), (14, 18), (18, 19)]
        return [nn.ModuleList(self.features[a:b]) for a, b in bounds]


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
