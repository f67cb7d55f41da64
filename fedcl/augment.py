"""Batched two-view augmentation for contrastive learning, one independent draw per image.

The SimCLR recipe (Chen et al. 2020) on tensors: random resized crop, horizontal flip,
brightness/contrast jitter, Gaussian blur with a per-image probability, plus Gaussian pixel
noise. Transforms that act per image in torchvision cost a Python call per image, which
dominates on 28x28 images; here the per-image parameters are the columns of one (B, 10) uniform
draw, and the pixel noise one (B, C, H, W) normal draw.

Crop, flip and blur are separable, so for each image they collapse into one row matrix
(H_out x H_in) and one column matrix (W_out x W_in): ``out = A @ x @ B^T``, two batched matrix
products. The crop rows of A and B are bilinear interpolation weights (sampling as
``grid_sample(..., align_corners=False, padding_mode="border")``); the blur is a Gaussian band
matrix with reflected borders, multiplied in. Brightness and contrast are then one affine map
per image (with no clamp in between, brightness and contrast commute, so the order torchvision
draws at random does not matter), followed by noise and a final clamp to [0, 1].
"""

from __future__ import annotations

import math

import torch

# Columns of the per-image uniform draws.
_SCALE, _RATIO, _CX, _CY, _FLIP, _BRIGHT, _CONTRAST, _BLUR, _SIGMA, _NOISE = range(10)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def _range(name: str, value: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}, got {value}")
    return a, b


def _between(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect indices into [0, n) without repeating the edge (numpy/torch 'reflect' padding)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * n - 2
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _resample_matrices(scale: torch.Tensor, center: torch.Tensor, n: int,
                       taps: torch.Tensor | None) -> torch.Tensor:
    """(B, n_out, n_in) matrices: crop [center +- scale] (normalised), resample bilinearly, blur.

    Bilinear weights as ``grid_sample(align_corners=False, padding_mode="border")``: output i reads
    input position p_i with weight max(0, 1 - |p_i - j|) on input pixel j. A blur with taps
    (B, k) and reflected borders mixes output rows: row i = sum_t taps[t] * row reflect(i + t - k//2).
    """
    grid = (2.0 * torch.arange(n, device=scale.device, dtype=scale.dtype) + 1.0) / n - 1.0  # (n,)
    src = scale[:, None] * grid + center[:, None]  # (B, n) normalised source coordinates
    pos = (((src + 1.0) * n - 1.0) / 2.0).clamp_(0.0, n - 1.0)  # (B, n) pixel coordinates
    if taps is None:
        return _tent(pos, n)
    k = taps.shape[1]
    rows = _reflect(torch.arange(-(k // 2), n + k // 2, device=pos.device), n)  # (n + k - 1,)
    ext = _tent(pos[:, rows], n)  # (B, n + k - 1, n)
    out = ext[:, :n] * taps[:, 0, None, None]
    for t in range(1, k):
        out.addcmul_(ext[:, t : t + n], taps[:, t, None, None])
    return out


def _tent(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Bilinear weights (B, m, n) of positions pos (B, m) on pixels 0..n-1."""
    j = torch.arange(n, device=pos.device, dtype=pos.dtype)
    return (pos[:, :, None] - j).abs_().neg_().add_(1.0).clamp_(min=0.0)


class TwoViewAugment:
    """Random augmentation of a batch (B, C, H, W) in [0, 1], independently for each image.

    crop_scale: area fraction of the crop; crop_ratio: its aspect ratio (width / height), drawn
    log-uniformly; flip: mirror half the images left-right; brightness, contrast: factors drawn
    from [max(0, 1 - v), 1 + v] as torchvision's ColorJitter; blur_prob: chance that an image is
    blurred, with sigma from blur_sigma and an odd kernel of blur_kernel_size (default: about 10%
    of the image side, at least 3, as SimCLR); noise_std: each image gets Gaussian noise with a
    standard deviation drawn from [0, noise_std].
    """

    def __init__(
        self,
        *,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        brightness: float = 0.4,
        contrast: float = 0.4,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        noise_std: float = 0.05,
    ) -> None:
        self.crop_scale = _range("crop_scale", crop_scale, 1e-6, 1.0)
        self.crop_ratio = _range("crop_ratio", crop_ratio, 1e-6, math.inf)
        self.flip = bool(flip)
        if brightness < 0 or contrast < 0 or noise_std < 0:
            raise ValueError("brightness, contrast and noise_std must be >= 0")
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        if not 0.0 <= blur_prob <= 1.0:
            raise ValueError(f"blur_prob must be in [0, 1], got {blur_prob}")
        self.blur_prob = float(blur_prob)
        self.blur_sigma = _range("blur_sigma", blur_sigma, 1e-6, math.inf)
        if blur_kernel_size is not None and (blur_kernel_size < 1 or blur_kernel_size % 2 == 0):
            raise ValueError(f"blur_kernel_size must be a positive odd integer, got {blur_kernel_size}")
        self.blur_kernel_size = blur_kernel_size
        self.noise_std = float(noise_std)

    def __repr__(self) -> str:
        return (
            f"TwoViewAugment(crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, flip={self.flip}, "
            f"brightness={self.brightness}, contrast={self.contrast}, blur_prob={self.blur_prob}, "
            f"blur_sigma={self.blur_sigma}, blur_kernel_size={self.blur_kernel_size}, "
            f"noise_std={self.noise_std})"
        )

    def two_views(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views of each image: (B, C, H, W) each."""
        both = self(torch.cat([x, x]), generator=generator)  # (2B, C, H, W): one call, 2B draws
        return both[: x.shape[0]], both[x.shape[0] :]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment each image of ``x`` (float in [0, 1], or uint8 scaled by 1/255) once.

        Random numbers come from ``generator`` (on its own device; one on ``x.device`` saves a
        copy of the noise), or from torch's global generator when it is None.
        """
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1] or uint8, got {x.dtype}")
        out_dtype = x.dtype
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half on CPU: matmuls in float32
        b, c, h, w = x.shape
        if b == 0:
            return x.to(out_dtype, copy=True)
        dev, dt = x.device, x.dtype
        gen_dev = generator.device if generator is not None else dev
        u = torch.rand(b, 10, generator=generator, device=gen_dev).to(dev, dt)  # (B, 10)

        # Random resized crop (+ flip): crop width/height as fractions of the image.
        s_lo, s_hi = self.crop_scale
        area = s_lo + (s_hi - s_lo) * u[:, _SCALE]
        r_lo, r_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(r_lo + (r_hi - r_lo) * u[:, _RATIO])
        frac_w = torch.sqrt(area * ratio * (h / w))  # (B,)
        frac_h = torch.sqrt(area / ratio * (w / h))
        # A crop wider or taller than the image shrinks to fit, keeping its aspect ratio
        # (torchvision instead redraws up to 10 times, then falls back to a centre crop).
        excess = torch.maximum(frac_w, frac_h).clamp(min=1.0)
        frac_w, frac_h = frac_w / excess, frac_h / excess
        center_x = (1.0 - frac_w) * (2.0 * u[:, _CX] - 1.0)  # crop centre, normalised to [-1, 1]
        center_y = (1.0 - frac_h) * (2.0 * u[:, _CY] - 1.0)
        if self.flip:
            frac_w = torch.where(u[:, _FLIP] < 0.5, -frac_w, frac_w)  # negative scale mirrors
        taps = None
        if self.blur_prob > 0:
            apply = u[:, _BLUR] < self.blur_prob
            sigma = _between(u[:, _SIGMA], *self.blur_sigma)
            k = self.blur_kernel_size or max(3, int(0.1 * min(h, w)) | 1)
            offsets = torch.arange(k, device=dev, dtype=dt) - k // 2  # (k,)
            taps = torch.exp(-(offsets**2) / (2 * sigma[:, None] ** 2))  # (B, k)
            taps = taps / taps.sum(dim=1, keepdim=True)
            taps = torch.where(apply[:, None], taps, (offsets == 0).to(dt))  # not blurred: a delta
        rows = _resample_matrices(frac_h, center_y, h, taps)  # (B, H, H)
        cols = _resample_matrices(frac_w, center_x, w, taps)  # (B, W, W)

        # out = rows @ x @ cols^T, per image and channel
        y = torch.bmm(rows, x.transpose(1, 2).reshape(b, h, c * w))  # (B, H, C*W)
        y = torch.bmm(y.reshape(b, h * c, w), cols.transpose(1, 2))  # (B, H*C, W)
        y = y.reshape(b, h, c, w).transpose(1, 2)  # (B, C, H, W)

        # Brightness then contrast around the grey mean, fused: y -> cb * y + (1 - c) * b * mean
        bright = _between(u[:, _BRIGHT], max(0.0, 1.0 - self.brightness), 1.0 + self.brightness)
        contr = _between(u[:, _CONTRAST], max(0.0, 1.0 - self.contrast), 1.0 + self.contrast)
        if c == 3:
            grey = torch.tensordot(y.mean(dim=(2, 3)), torch.tensor(_LUMA, device=dev, dtype=dt), dims=1)
        else:
            grey = y.mean(dim=(1, 2, 3))  # (B,)
        scale = (contr * bright).view(b, 1, 1, 1)
        shift = ((1.0 - contr) * bright * grey).view(b, 1, 1, 1)
        y = y.mul_(scale).add_(shift)

        if self.noise_std > 0:
            std = (self.noise_std * u[:, _NOISE]).view(b, 1, 1, 1)
            noise = torch.randn(y.shape, generator=generator, device=gen_dev, dtype=dt).to(dev)
            y = y.add_(noise.mul_(std))
        return y.clamp_(0.0, 1.0).to(out_dtype)
