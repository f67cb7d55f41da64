"""A synthetic labeled image set for tests and quick demos, deterministic by seed.

Each class is a sinusoidal grating with its own orientation and spatial frequency (and, with 3
channels, its own colour tint); each image draws its own phase, contrast, small orientation and
frequency jitter, and pixel noise. Orientations lie in (0, 90) degrees so that a horizontal flip
(theta -> 180 - theta) never maps one class onto another, and frequencies differ by 2x so that a
random resized crop (at most about 1.8x zoom at scale 0.3) does not either: the classes stay
separable under the augmentations of ``fedcl.augment``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedcl.data.types import DataError, ImageSet

_CHUNK = 4096  # images generated at a time, to bound float32 scratch memory


def _class_layout(num_classes: int) -> tuple[int, int]:
    num_freqs = 1 if num_classes <= 4 else 2 if num_classes <= 8 else 3
    return math.ceil(num_classes / num_freqs), num_freqs  # (orientations, frequencies)


def make_synthetic(
    *,
    num_images: int,
    num_classes: int,
    image_size: int = 28,
    channels: int = 1,
    seed: int,
    num_groups: int | None = None,
) -> ImageSet:
    """``num_images`` images of ``num_classes`` balanced classes, uint8 (N, channels, S, S).

    num_groups: also draw a group (patient) id in [0, num_groups) for each image.
    """
    if num_images < 0 or num_classes < 1 or image_size < 4 or channels not in (1, 3):
        raise DataError(
            "make_synthetic needs num_images >= 0, num_classes >= 1, image_size >= 4 and "
            f"channels 1 or 3; got {num_images}, {num_classes}, {image_size}, {channels}"
        )
    if num_groups is not None and num_groups < 1:
        raise DataError(f"num_groups must be >= 1, got {num_groups}")
    rng = np.random.default_rng(seed)
    num_orient, _ = _class_layout(num_classes)
    classes = np.arange(num_classes)
    theta_c = (np.pi / 2) * ((classes % num_orient) + 0.5) / num_orient  # (K,)
    freq_c = 1.5 * 2.0 ** (classes // num_orient)  # cycles per image, (K,)
    tint_c = 0.55 + 0.45 * rng.random((num_classes, channels))  # (K, C); 1 channel: brightness

    labels = rng.permutation(np.arange(num_images) % num_classes)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size  # (S,)
    v, u = np.meshgrid(coords, coords, indexing="ij")  # rows, cols: (S, S)
    images = np.empty((num_images, channels, image_size, image_size), np.uint8)
    for start in range(0, num_images, _CHUNK):
        y = labels[start : start + _CHUNK]
        n = len(y)
        theta = theta_c[y] + rng.uniform(-0.05, 0.05, n)  # about +-3 degrees
        freq = freq_c[y] * rng.uniform(0.9, 1.1, n)
        phase = rng.uniform(0, 2 * np.pi, n)
        amp = rng.uniform(0.6, 1.0, n)
        proj = np.cos(theta)[:, None, None] * u + np.sin(theta)[:, None, None] * v  # (n, S, S)
        wave = np.cos(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
        gray = 0.5 + 0.5 * amp[:, None, None] * wave  # (n, S, S) in [0, 1]
        img = gray[:, None] * tint_c[y][:, :, None, None]  # (n, C, S, S)
        img = img + rng.normal(0.0, 0.04, img.shape)
        images[start : start + n] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)

    groups = None
    if num_groups is not None:
        groups = torch.from_numpy(rng.integers(0, num_groups, num_images).astype(np.int64))
    return ImageSet(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=[f"class{c}" for c in range(num_classes)],
        groups=groups,
    )
