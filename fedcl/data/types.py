"""The in-memory image set every loader returns, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class DataError(ValueError):
    """Data a user pointed fedcl at is missing or malformed; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageSet:
    """Images held in memory as uint8, with optional labels and group (patient) ids.

    images: uint8 (N, C, H, W); labels: int64 (N,) or None (unlabeled site data);
    classes: class names, ``classes[labels[i]]`` names image i; groups: int64 (N,) or None,
    the patient or group each image belongs to (the privacy unit for medical data).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    groups: torch.Tensor | None = None

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(
                f"ImageSet.images must be a uint8 tensor (N, C, H, W), got "
                f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
            )
        if x.shape[1] not in (1, 3):
            raise ValueError(f"ImageSet.images must have 1 or 3 channels, got {x.shape[1]}")
        n = x.shape[0]
        for name in ("labels", "groups"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(
                    f"ImageSet.{name} must be an int64 tensor of shape ({n},), got "
                    f"{type(t).__name__} {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}"
                )
        if self.labels is not None and n > 0:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or (self.classes and hi >= len(self.classes)):
                raise ValueError(
                    f"ImageSet.labels must lie in [0, {len(self.classes)}), got [{lo}, {hi}]"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels_numpy(self) -> np.ndarray:
        """Labels as int64 numpy (N,), for the partitioners; a clear error if the set is unlabeled."""
        if self.labels is None:
            raise DataError("this image set has no labels; use scheme='iid' or labeled data")
        return self.labels.numpy()

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> "ImageSet":
        """The images at ``indices`` (in that order), with their labels and groups."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageSet(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            classes=list(self.classes),
            groups=None if self.groups is None else self.groups[idx],
        )

    def as_float(self) -> torch.Tensor:
        """Images as float32 in [0, 1], (N, C, H, W)."""
        return self.images.float().div_(255.0)
