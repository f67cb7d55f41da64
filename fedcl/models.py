"""Encoders for small images and the contrastive projection head.

GroupNorm everywhere: BatchNorm mixes examples within a batch, which breaks Opacus'
per-example gradients and leaks batch statistics across sites.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from fedcl.fileio import atomic_file

_PREFIXES = ("_module.", "module.", "_orig_mod.")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class SmallCNN(nn.Module):
    """Four conv blocks, any input size (28 px Fashion-MNIST, 40 px cluttered), global average pool
    out: feat_dim = 4 * width."""

    def __init__(self, *, in_channels: int, width: int) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), _norm(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, w, 1),      # (B, w, 28, 28)
            *block(w, 2 * w, 2),            # (B, 2w, 14, 14)
            *block(2 * w, 4 * w, 2),        # (B, 4w, 7, 7)
            *block(4 * w, 4 * w, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),                   # (B, 4w)
        )
        self.feat_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _resnet18_small(*, in_channels: int, width: int) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 with a 3x3 stem, no max-pool (CIFAR-style), GroupNorm.

    ``width`` is the CNN's knob; ResNet-18 keeps its standard 64-512 channels.
    """
    net = resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(min(32, c), c))
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


class ContrastiveModel(nn.Module):
    """Backbone + 2-layer MLP projection head (SimCLR, Chen et al. 2020)."""

    def __init__(self, *, arch: str, in_channels: int, width: int, proj_dim: int, proj_hidden: int) -> None:
        super().__init__()
        if arch == "cnn":
            self.backbone: nn.Module = SmallCNN(in_channels=in_channels, width=width)
            feat_dim = self.backbone.feat_dim
        elif arch == "resnet18":
            self.backbone, feat_dim = _resnet18_small(in_channels=in_channels, width=width)
        else:
            raise ValueError(f"unknown encoder architecture {arch!r}: use 'cnn' or 'resnet18'")
        self.head = nn.Sequential(
            nn.Linear(feat_dim, proj_hidden), nn.ReLU(), nn.Linear(proj_hidden, proj_dim)
        )
        self.feat_dim = feat_dim
        self.spec: dict[str, Any] = {
            "arch": arch, "in_channels": in_channels, "width": width,
            "proj_dim": proj_dim, "proj_hidden": proj_hidden,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(x))  # (B, proj_dim)
        return F.normalize(z, dim=1)  # (B, proj_dim), unit norm


def build_model(
    *, arch: str = "cnn", in_channels: int, width: int = 32, proj_dim: int = 128, proj_hidden: int = 256,
) -> ContrastiveModel:
    return ContrastiveModel(arch=arch, in_channels=in_channels, width=width, proj_dim=proj_dim,
                            proj_hidden=proj_hidden)


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                changed = True
    return name


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The one state dict that goes over the wire and to disk: wrapper prefixes stripped, CPU."""
    return {_strip(k): v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_canonical_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a canonical state dict into a possibly wrapped model (Opacus, DDP, compile)."""
    own = model.state_dict()
    by_canonical = {_strip(k): k for k in own}
    missing = set(by_canonical) - set(state)
    unexpected = set(state) - set(by_canonical)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({by_canonical[k]: v for k, v in state.items()})


def state_to_arrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Ordered numpy arrays (sorted by key) for Flower's ArrayRecord or any raw-bytes channel."""
    return [state[k].cpu().numpy() for k in sorted(state)]


def arrays_to_state(model: nn.Module, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of ``state_to_arrays`` for the given model's keys and shapes."""
    ref = canonical_state_dict(model)
    keys = sorted(ref)
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays for this model, got {len(arrays)}")
    out = {}
    for k, a in zip(keys, arrays, strict=False):
        t = torch.from_numpy(np.ascontiguousarray(a))
        if tuple(t.shape) != tuple(ref[k].shape):
            raise ValueError(f"array for {k} has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}")
        out[k] = t.to(ref[k].dtype)
    return out


def save_encoder(path, *, model: ContrastiveModel, meta: dict[str, Any] | None = None) -> None:
    """Checkpoint that records its architecture; loads with ``torch.load(weights_only=True)``."""
    payload = {"format": "fedcl-encoder/1", "spec": dict(model.spec),
               "state_dict": canonical_state_dict(model), "meta": dict(meta or {})}
    with atomic_file(path) as f:
        torch.save(payload, f)


def read_torch_payload(path, *, fmt: str, kind: str, fix: str = "") -> dict[str, Any]:
    """The dict a fedcl ``torch.save`` wrote at ``path`` (tensors only: ``weights_only``), checked to
    carry ``format == fmt``. FileNotFoundError when absent, ValueError when unreadable or of another
    kind; ``fix`` (e.g. "; move it away to start afresh") ends the unreadable message."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or foreign file
        raise ValueError(f"checkpoint {path} is not readable ({exc}){fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path} is not a fedcl {kind} checkpoint (format {fmt!r})")
    return payload


def load_encoder(path) -> tuple[ContrastiveModel, dict[str, Any]]:
    payload = read_torch_payload(path, fmt="fedcl-encoder/1", kind="encoder")
    model = build_model(**payload["spec"])
    load_canonical_state_dict(model, payload["state_dict"])
    return model, payload.get("meta", {})
