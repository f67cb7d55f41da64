"""Cluttered Fashion-MNIST: each item at a random place on a larger canvas, among patches of other items.

After the cluttered translated MNIST of Mnih et al. 2014 ("Recurrent Models of Visual Attention"):
an item no longer sits at a fixed place, and other items' fragments lie around it, so raw pixels
(and any template at a fixed position) stop being a good representation, while the task stays
cheap on a CPU. Every draw comes from one numpy ``default_rng(seed)`` in a fixed order (item
positions, then for each patch its donor image, source window and destination), so the images
depend on the seed and the input only: the same on any machine (PCG64 is platform-independent;
at ``scale`` 1 no arithmetic touches a pixel value; any other scale resizes in float64).

Patches and the item are composited with a pixel-wise maximum (the images are light on black),
so no patch hides the item and the order of painting does not matter.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedcl.data.idx import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist
from fedcl.data.types import DataError, ImageSet

_CHUNK = 8192  # images composited at a time, to bound the int64 index scratch (about 50 MB per array)


@dataclass(frozen=True)
class Clutter:
    """The regime's parameters (``[data.clutter]`` in the config).

    canvas: side of the square output image in pixels; scale: item side as a fraction of the
    source side (1.0: 28 px items); patches: clutter patches per image; patch_size: their side in
    pixels, cut from the source images; seed: the draw (independent of the partition seed).
    """

    canvas: int = 40
    scale: float = 1.0
    patches: int = 3
    patch_size: int = 10
    seed: int = 0


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear resampling weights, pixel centres aligned (align_corners=False)."""
    pos = ((np.arange(n_out) + 0.5) * n_in / n_out - 0.5).clip(0, n_in - 1)  # (n_out,) source coordinates
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(n_in)[None, :]))


def _items(src: np.ndarray, side: int) -> np.ndarray:
    """The source images (N, H, W) resized to (N, side, side) uint8 (unchanged when already that size)."""
    if src.shape[1:] == (side, side):
        return src
    rows, cols = _resize_matrix(src.shape[1], side), _resize_matrix(src.shape[2], side)
    out = np.empty((len(src), side, side), np.uint8)
    for start in range(0, len(src), _CHUNK):
        x = src[start:start + _CHUNK].astype(np.float64)
        out[start:start + _CHUNK] = np.clip(np.rint(rows @ x @ cols.T), 0, 255)
    return out


def _paste_max(flat: np.ndarray, canvas: int, index: np.ndarray, top: np.ndarray, left: np.ndarray,
               tiles: np.ndarray) -> None:
    """flat (N * canvas^2,) uint8: paint tiles (n, s, s) at (top, left) of the canvases ``index`` (n,),
    by max."""
    s = tiles.shape[1]
    ar = np.arange(s)
    rows = (top[:, None] + ar)[:, :, None]  # (n, s, 1)
    cols = (left[:, None] + ar)[:, None, :]  # (n, 1, s)
    at = (index[:, None, None] * canvas + rows) * canvas + cols  # (n, s, s) flat positions, distinct per call
    flat[at] = np.maximum(flat[at], tiles)


def make_cluttered(base: ImageSet, *, canvas: int = 40, scale: float = 1.0, patches: int = 3,
                   patch_size: int = 10, seed: int) -> ImageSet:
    """Each image of ``base`` (1 channel, uint8) placed at a random position on a ``canvas`` x ``canvas``
    black image, with ``patches`` windows of ``patch_size`` px cut from other images of ``base`` at
    random places; labels, classes and groups are kept. Returns uint8 (N, 1, canvas, canvas)."""
    n, c, h, w = base.images.shape
    side = int(round(h * scale))
    if c != 1 or h != w:
        raise DataError(f"clutter needs square 1-channel images, got {c}x{h}x{w}")
    if not 1 <= side <= canvas:
        raise DataError(
            f"clutter: a {h}-px image at scale {scale} is {side} px, which does not fit the "
            f"{canvas}-px canvas; use a scale in ({0.5 / h:.3g}, {canvas / h:.3g}] or a larger canvas")
    if patches < 0 or not 1 <= patch_size <= min(h, canvas):
        raise DataError(f"clutter: patches must be >= 0 and patch_size in [1, {min(h, canvas)}] (the source "
                        f"image and the canvas); got {patches} patches of {patch_size} px")
    if patches and n == 1:
        raise DataError(
            "clutter: patches are cut from other images, and the set holds only one; use patches = 0")
    rng = np.random.default_rng(seed)
    src = base.images[:, 0].numpy()
    top, left = rng.integers(0, canvas - side + 1, size=(2, n))
    donor = rng.integers(0, max(n - 1, 1), size=(n, patches))
    donor += donor >= np.arange(n)[:, None]  # never the image itself: (n, patches) in [0, n) \ {i}
    src_at = rng.integers(0, h - patch_size + 1, size=(2, n, patches))  # window corner in the donor
    dst_at = rng.integers(0, canvas - patch_size + 1, size=(2, n, patches))  # its place on the canvas
    items = _items(src, side)
    out = np.zeros(n * canvas * canvas, np.uint8)
    ar = np.arange(patch_size)
    for start in range(0, n, _CHUNK):
        idx = np.arange(start, min(start + _CHUNK, n))
        for p in range(patches):
            rows = (src_at[0, idx, p][:, None] + ar)[:, :, None]
            cols = (src_at[1, idx, p][:, None] + ar)[:, None, :]
            tiles = src[donor[idx, p][:, None, None], rows, cols]  # (n, patch_size, patch_size)
            _paste_max(out, canvas, idx, dst_at[0, idx, p], dst_at[1, idx, p], tiles)
        _paste_max(out, canvas, idx, top[idx], left[idx], items[idx])
    return ImageSet(images=torch.from_numpy(out.reshape(n, 1, canvas, canvas)), labels=base.labels,
                    classes=list(base.classes), groups=base.groups)


def load_fashion_mnist_cluttered(*, root: Path | str = DEFAULT_FASHION_MNIST_ROOT, split: str = "train",
                                 clutter: Clutter | None = None) -> ImageSet:
    """Fashion-MNIST ``split`` in the clutter regime; train and test draw from different streams
    (crc32 of the split name, stable across processes) and take patches from their own split only."""
    clutter = clutter or Clutter()
    base = load_fashion_mnist(root=root, split=split)
    seed = (clutter.seed * 1_000_003 + zlib.crc32(split.encode())) % 2**63
    return make_cluttered(base, canvas=clutter.canvas, scale=clutter.scale, patches=clutter.patches,
                          patch_size=clutter.patch_size, seed=seed)
