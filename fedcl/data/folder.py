"""A site's own images from a folder.

Layout as torchvision's ``ImageFolder``: one subfolder per class (``root/<class>/<file>``), class
indices in sorted folder-name order. A folder holding image files directly and no subfolders is
read as unlabeled data (``labels=None``), the usual case for a site's private images.

Pixels: 8-bit grayscale, RGB(A) and palette images are read as they are; 16-bit grayscale
(medical PNG/TIFF) is scaled from the raw 16-bit values to uint8 (``v * 255 / 65535``, or
per-image min-max with ``scale16="minmax"`` for 12-bit data stored in 16 bits). PIL's own
``convert("L")`` clips 16-bit values above 255 to white, so it is not used for them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedcl.data.types import DataError, ImageSet

_GRAY_MODES = {"1", "L", "LA"}
_COLOR_MODES = {"RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}


def _is_image(p: Path, extensions: tuple[str, ...]) -> bool:
    return p.is_file() and p.suffix.lower() in extensions


def _scale16(v: np.ndarray, scale16: str) -> np.ndarray:
    v = v.astype(np.int64)
    if scale16 == "minmax":
        lo, hi = int(v.min()), int(v.max())
        if hi == lo:
            return np.zeros(v.shape, np.uint8)
        return ((v - lo) * 255 + (hi - lo) // 2) // (hi - lo)
    return (v * 255 + 32767) // 65535  # round(v * 255 / 65535): 65535 -> 255, 257 -> 1


def _read_pixels(path: Path, *, scale16: str) -> np.ndarray:
    """uint8 (H, W) for grayscale files, (H, W, 3) for colour files."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode.startswith("I;16") or mode == "I":
                raw = np.asarray(img)
                if raw.size and (raw.min() < 0 or raw.max() > 65535):
                    raise DataError(
                        f"{path}: 32-bit integer pixels outside 0..65535 are not supported; "
                        "save the image as 8- or 16-bit"
                    )
                return _scale16(raw, scale16).astype(np.uint8)
            if mode in _GRAY_MODES:
                return np.asarray(img.convert("L"))
            if mode in _COLOR_MODES:
                rgb = np.asarray(img.convert("RGB"))
                grey_palette = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
                if mode in ("P", "PA") and grey_palette:
                    return rgb[..., 0].copy()
                return rgb
            raise DataError(f"{path}: image mode {mode!r} is not supported; save it as 8/16-bit grey or RGB")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as an image ({exc}); remove or replace the file") from None


def _to_chw(pixels: np.ndarray, channels: int) -> np.ndarray:
    if pixels.ndim == 2:
        return np.repeat(pixels[None], channels, axis=0)  # grey -> (C, H, W)
    if channels == 3:
        return pixels.transpose(2, 0, 1)
    # RGB -> luminance, ITU-R 601-2 weights as PIL's convert("L")
    lum = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(lum), 0, 255).astype(np.uint8)[None]


def load_image_folder(
    *,
    path: Path | str,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    scale16: Literal["full", "minmax"] = "full",
    group_regex: str | None = None,
) -> ImageSet:
    """Read every image under ``path`` into memory.

    channels: None keeps grey as 1 channel unless any file is colour (then 3); 1 or 3 forces it.
    image_size: resize every image to this (bilinear); None requires all images to share a size.
    group_regex: a pattern searched in each file name (without extension) whose first group (or
    whole match) is the file's patient/group id, e.g. ``r"^(P\\d+)_"``; ids are numbered in
    sorted order of the matched strings.
    """
    # torchvision's own class discovery, so that class indices match an ImageFolder of the same root
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(path)
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, got {channels}")
    if scale16 not in ("full", "minmax"):
        raise DataError(f"scale16 must be 'full' or 'minmax', got {scale16!r}")
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; pass the folder holding the site's images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass the folder holding the site's images")

    classes: list[str] = []
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        try:
            classes, class_to_idx = find_classes(str(root))
            samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise DataError(
                f"image folder {root}: {exc}. Put each class's images in its own subfolder "
                f"(root/<class>/<image>), with extensions {', '.join(IMG_EXTENSIONS)}"
            ) from None
        files = [(Path(p), c) for p, c in samples]
        if not files:
            raise DataError(f"image folder {root} holds no images in its class subfolders")
    else:
        files = [(p, -1) for p in sorted(root.iterdir()) if _is_image(p, IMG_EXTENSIONS)]
        if not files:
            raise DataError(
                f"image folder {root} is empty: no image files ({', '.join(IMG_EXTENSIONS)}) and "
                "no class subfolders in it"
            )

    pixels = [_read_pixels(p, scale16=scale16) for p, _ in files]
    if channels is None:
        channels = 3 if any(px.ndim == 3 for px in pixels) else 1
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        pixels = [
            px if px.shape[:2] == (h, w) else np.asarray(Image.fromarray(px).resize((w, h), Image.BILINEAR))
            for px in pixels
        ]
    for (p, _), px in zip(files, pixels, strict=False):
        if px.shape[:2] != pixels[0].shape[:2]:
            raise DataError(
                f"images under {root} differ in size ({files[0][0]}: {pixels[0].shape[:2]}, "
                f"{p}: {px.shape[:2]}); pass image_size to resize them all"
            )
    images = torch.from_numpy(np.stack([_to_chw(px, channels) for px in pixels]))  # (N, C, H, W)

    labels = torch.tensor([c for _, c in files], dtype=torch.int64) if classes else None
    groups = None
    if group_regex is not None:
        try:
            pattern = re.compile(group_regex)
        except re.error as exc:
            raise DataError(
                f"patient-id pattern {group_regex!r} is not a valid regular expression: {exc}") from None
        names = []
        for p, _ in files:
            m = pattern.search(p.stem)
            if m is None:
                raise DataError(f"{p}: file name does not match the patient-id pattern {group_regex!r}; "
                                "every image needs its patient id in its name")
            names.append(m.group(1) if m.groups() else m.group(0))
        ids = {name: i for i, name in enumerate(sorted(set(names)))}
        groups = torch.tensor([ids[n] for n in names], dtype=torch.int64)
    return ImageSet(images=images, labels=labels, classes=classes, groups=groups)
