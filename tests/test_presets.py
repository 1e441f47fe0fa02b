"""Image presets: decode to uint8 squares, deterministic eval, per-sample random train augmentation."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from posterfusion.features.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalPreset,
    TrainPreset,
    decode_poster,
    image_to_tensor,
    preset_for,
)

from support import jpeg_bytes, noisy_jpeg_bytes


def test_decode_gives_a_uint8_rgb_square():
    image = decode_poster(jpeg_bytes(color=(200, 30, 30), size=(60, 90)), 64)
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert abs(int(image[0].float().mean()) - 200) <= 3 and int(image[1].float().mean()) < 40


def test_decode_converts_greyscale_and_png():
    buffer = io.BytesIO()
    Image.new("L", (40, 60), 128).save(buffer, "PNG")
    image = decode_poster(buffer.getvalue(), 32)
    assert image.shape == (3, 32, 32) and int(image.min()) == int(image.max()) == 128
    assert torch.equal(image_to_tensor(Image.new("L", (40, 60), 128), 32), image)  # already-decoded images


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty_file"),
    (b"definitely not an image", "not_an_image"),
    (noisy_jpeg_bytes(1)[:600], "truncated_image"),
])
def test_bad_bytes_raise_value_error_with_the_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_poster(data, 32)


def test_decompression_bomb_is_rejected_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, "PNG")  # 64 Mpx > MAX_PIXELS, a few kB compressed
    with pytest.raises(ValueError, match="image_too_large"):
        decode_poster(buffer.getvalue(), 32)


def batch(n=4, size=64):
    return torch.stack([decode_poster(noisy_jpeg_bytes(seed, size=(48, 72)), size) for seed in range(n)])


def test_eval_preset_is_deterministic_and_normalises():
    images = batch()
    preset = EvalPreset(size=64)
    out = preset(images)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 64, 64)
    assert torch.equal(out, preset(images))
    expected = (images[0, 1].float() / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    torch.testing.assert_close(out[0, 1], expected)
    assert preset(images[0]).shape == (3, 64, 64)  # a single CHW image works too
    assert EvalPreset(size=32)(images).shape == (4, 3, 32, 32)  # other sizes are resized


def test_train_preset_is_random_per_call_and_per_sample():
    images = batch().expand(4, 3, 64, 64).clone()
    images[:] = images[0]  # four copies of one poster
    preset = TrainPreset(size=64)
    first, second = preset(images), preset(images)
    assert first.dtype == torch.float32 and first.shape == (4, 3, 64, 64)
    assert not torch.equal(first, second)
    assert not torch.equal(first[0], first[1])  # each sample draws its own crop and jitter
    low = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    high = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert low - 1e-4 <= float(first.min()) and float(first.max()) <= high + 1e-4
    assert abs(float(first.mean()) - float(EvalPreset(size=64)(images).mean())) < 0.5


def test_train_preset_without_augmentation_equals_eval_and_seeds_reproduce():
    images = batch()
    plain = TrainPreset(size=64, scale=(1, 1), ratio=(1, 1), hflip=0, brightness=0, contrast=0, saturation=0, hue=0)
    torch.testing.assert_close(plain(images), EvalPreset(size=64)(images), atol=1e-4, rtol=0)
    flipped = TrainPreset(size=64, scale=(1, 1), ratio=(1, 1), hflip=1, brightness=0, contrast=0, saturation=0,
                          hue=0)
    torch.testing.assert_close(flipped(images), EvalPreset(size=64)(images).flip(-1), atol=1e-4, rtol=0)
    preset = TrainPreset(size=64)
    a = preset(images, generator=torch.Generator().manual_seed(0))
    b = preset(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_preset_for():
    assert isinstance(preset_for("train", 96), TrainPreset) and preset_for("train", 96).size == 96
    assert isinstance(preset_for("eval", 96), EvalPreset)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_for("serve", 96)
