"""Image presets: poster bytes → uint8 tensor, and uint8 tensors → normalised model input.

One definition is shared by training, batch scoring and serving (as in torchvision's
reference presets), so a poster is decoded, resized and normalised identically everywhere:
a model scored with a slightly different resize or mean silently loses accuracy.

Decoding and augmentation are split on purpose: :func:`decode_poster` runs once per poster
(in Ray Data workers or the request handler) and yields compact uint8 ``size × size``
tensors; the presets then run on whole batches inside the training or scoring loop.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from posterfusion.features.catalogue import decode_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Triple = tuple[float, float, float]


def decode_poster(data: bytes, size: int) -> torch.Tensor:
    """Decode image bytes to a uint8 ``(3, size, size)`` RGB tensor.

    Raises ``PosterDecodeError`` (a ValueError) with the same reason codes the ingest check
    reports, because it is the same decoder (:func:`features.catalogue.decode_rgb`).
    """
    return image_to_tensor(decode_rgb(data), size)


def image_to_tensor(image, size: int) -> torch.Tensor:
    """A decoded PIL image → uint8 ``(3, size, size)`` RGB tensor.

    Posters are about 2:3; they are squashed to a square, the usual choice for poster genre
    models (a centre crop would cut titles and faces off). PIL's bilinear resize filters over
    the whole source footprint, so downscaling does not alias.
    """
    from PIL import Image

    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_float_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """uint8 (or float in [0, 1]) CHW / NCHW → float NCHW in [0, 1], and whether it was single."""
    single = images.dim() == 3
    if single:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (3, H, W) or (N, 3, H, W) image tensor, got {tuple(images.shape)}")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return images, single


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class EvalPreset(BaseModel):
    """Deterministic preset for validation, scoring and serving: resize if needed, normalise."""

    size: int = Field(128, ge=8)
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, single = _to_float_batch(images)
        if batch.shape[-2:] != (self.size, self.size):
            batch = torch.nn.functional.interpolate(batch, size=(self.size, self.size), mode="bilinear",
                                                    align_corners=False, antialias=True)
        batch = _normalise(batch, self.mean, self.std)
        return batch[0] if single else batch


class TrainPreset(BaseModel):
    """Per-sample random resized crop, horizontal flip and colour jitter on a uint8 batch.

    The defaults suit posters: crops keep at least 70 % of the poster (its composition — a
    face, a title block, a landscape — is the cue), aspect changes stay mild, and colour
    jitter is light with no hue shift, because colour itself carries genre (dark horror,
    bright comedy) and a strong jitter would teach the model to ignore it.

    torchvision's v2 transforms draw one set of parameters per call, so a batch would share one
    crop; looping per sample is slow on CPU. Here the crop and flip are one batched
    ``affine_grid``/``grid_sample`` and the jitter is batched arithmetic, each sample with its own
    draw. Hue is shifted by a rotation about the grey axis, a cheap linear stand-in for the HSV
    round trip that is close for the small shifts used here.
    """

    size: int = Field(128, ge=8)
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (4 / 5, 5 / 4)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = Field(0.1, ge=0.0)
    contrast: float = Field(0.1, ge=0.0)
    saturation: float = Field(0.1, ge=0.0)
    hue: float = Field(0.0, ge=0.0, le=0.5)
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, single = _to_float_batch(images)
        batch = self._crop_and_flip(batch, generator)
        batch = self._jitter(batch, generator).clamp_(0.0, 1.0)
        batch = _normalise(batch, self.mean, self.std)
        return batch[0] if single else batch

    def _crop_and_flip(self, batch: torch.Tensor, generator) -> torch.Tensor:
        """Random resized crop (area fraction ``scale``, aspect ``ratio``) + flip, as one resample."""
        n = batch.shape[0]
        area = _uniform(n, *self.scale, generator)
        log_ratio = _uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), generator)
        aspect = torch.exp(log_ratio)
        width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - width) * _uniform(n, -1.0, 1.0, generator)  # centre in [-1, 1] coordinates
        cy = (1 - height) * _uniform(n, -1.0, 1.0, generator)
        flip = torch.where(torch.rand(n, generator=generator) < self.hflip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = height, cy
        theta = theta.to(batch.device, batch.dtype)
        grid = torch.nn.functional.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        return torch.nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="border",
                                               align_corners=False)

    def _jitter(self, batch: torch.Tensor, generator) -> torch.Tensor:
        """Brightness, contrast, then saturation and hue as one per-sample 3×3 colour matrix."""
        n = batch.shape[0]

        def factor(strength: float) -> torch.Tensor:
            return _uniform(n, 1 - strength, 1 + strength, generator).clamp(min=0).to(batch)

        batch = (batch * factor(self.brightness).view(n, 1, 1, 1)).clamp_(0, 1)
        mean_grey = (batch.mean(dim=(2, 3)) @ batch.new_tensor(_LUMA)).view(n, 1, 1, 1)
        batch = (mean_grey + factor(self.contrast).view(n, 1, 1, 1) * (batch - mean_grey)).clamp_(0, 1)
        matrix = _saturation_matrix(factor(self.saturation))
        if self.hue > 0:
            matrix = _hue_matrix(_uniform(n, -self.hue, self.hue, generator).to(batch)) @ matrix
        return (matrix @ batch.flatten(2)).view_as(batch)


def _uniform(n: int, low: float, high: float, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as torchvision's rgb_to_grayscale


def _saturation_matrix(factor: torch.Tensor) -> torch.Tensor:
    """Per-sample ``grey + factor · (rgb − grey)`` as a (n, 3, 3) matrix."""
    eye = torch.eye(3, dtype=factor.dtype, device=factor.device)
    to_grey = factor.new_tensor(_LUMA).expand(3, 3)
    factor = factor.view(-1, 1, 1)
    return factor * eye + (1 - factor) * to_grey


def _hue_matrix(shift: torch.Tensor) -> torch.Tensor:
    """Rotate colours about the grey axis by ``shift`` turns, per sample (Rodrigues' formula).

    A linear stand-in for torchvision's HSV hue shift (same sign and scale of ``hue_factor``):
    both turn colours around grey, the HSV one along a hexagon rather than a circle.
    """
    angle = (shift * 2 * math.pi).view(-1, 1, 1)
    eye = torch.eye(3, dtype=shift.dtype, device=shift.device)
    grey = torch.full((3, 3), 1 / 3, dtype=shift.dtype, device=shift.device)
    cross = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=shift.dtype, device=shift.device) / math.sqrt(3)
    return torch.cos(angle) * eye + (1 - torch.cos(angle)) * grey + torch.sin(angle) * cross


def preset_for(name: Literal["train", "eval"] | str, size: int, mean: Triple = IMAGENET_MEAN,
               std: Triple = IMAGENET_STD) -> TrainPreset | EvalPreset:
    """The preset for a stage: ``"train"`` augments, ``"eval"`` (scoring, serving) does not.

    ``mean``/``std`` are the backbone's input normalisation (``Backbone.input_mean``/``input_std``).
    """
    if name == "train":
        return TrainPreset(size=size, mean=mean, std=std)
    if name == "eval":
        return EvalPreset(size=size, mean=mean, std=std)
    raise ValueError(f"unknown preset {name!r}: expected 'train' or 'eval'")
