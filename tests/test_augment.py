import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from fedcl.augment import TwoViewAugment, _resample_matrices

# every random op off: the augmentation is the identity on square images
OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, brightness=0.0, contrast=0.0,
           blur_prob=0.0, noise_std=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(b=8, c=1, h=28, w=28, seed=0):
    return torch.rand(b, c, h, w, generator=gen(seed))


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (3, 3, 32, 32), (4, 1, 20, 33), (2, 3, 7, 5)])
def test_shape_range_dtype(shape):
    x = torch.rand(shape, generator=gen(1))
    y = TwoViewAugment()(x, generator=gen(2))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("h,w", [(28, 28), (16, 12)])
def test_identity_when_everything_is_off(h, w):
    x = images(c=3, h=h, w=w)
    aug = TwoViewAugment(**{**OFF, "crop_ratio": (w / h, w / h)})  # the whole image, at any shape
    torch.testing.assert_close(aug(x, generator=gen()), x, atol=1e-5, rtol=0)


def test_identical_images_get_different_draws():
    x = images(b=1).expand(16, 1, 28, 28).contiguous()
    y = TwoViewAugment()(x, generator=gen())
    diffs = (y[:, None] - y[None]).abs().flatten(2).amax(-1)  # (16, 16) max abs difference of pairs
    off_diag = diffs[~torch.eye(16, dtype=torch.bool)]
    assert float(off_diag.min()) > 1e-3  # no two outputs alike


def test_oversized_crop_shrinks_keeping_its_aspect_ratio():
    # area 1 at width/height 2 does not fit a square: the crop becomes full width, half height
    col = torch.linspace(0, 1, 28)
    x = torch.stack([col.expand(28, 28), col[:, None].expand(28, 28)])[None].expand(32, 2, 28, 28)
    y = TwoViewAugment(**{**OFF, "crop_scale": (1.0, 1.0), "crop_ratio": (2.0, 2.0)})(x, generator=gen())
    width_span = y[:, 0, 0, -1] - y[:, 0, 0, 0]  # channel 0 holds the column position
    height_span = y[:, 1, -1, 0] - y[:, 1, 0, 0]  # channel 1 the row position
    torch.testing.assert_close(width_span, torch.ones(32), atol=0.04, rtol=0)
    torch.testing.assert_close(height_span, torch.full((32,), 0.5), atol=0.04, rtol=0)


def test_same_generator_same_output_and_seed_matters():
    x = images(b=10, c=3)
    aug = TwoViewAugment()
    a, b, c = aug(x, generator=gen(7)), aug(x, generator=gen(7)), aug(x, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    v1, v2 = aug.two_views(x, generator=gen(7))
    w1, w2 = aug.two_views(x, generator=gen(7))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert v1.shape == v2.shape == x.shape and not torch.allclose(v1, v2)


def test_global_rng_without_generator():
    torch.manual_seed(3)
    a = TwoViewAugment()(images())
    torch.manual_seed(3)
    assert torch.equal(a, TwoViewAugment()(images()))


@pytest.mark.parametrize("c", [1, 3])
def test_batch_sizes_zero_and_one(c):
    aug = TwoViewAugment()
    empty = aug(torch.empty(0, c, 28, 28), generator=gen())
    assert empty.shape == (0, c, 28, 28)
    v1, v2 = aug.two_views(torch.empty(0, c, 28, 28), generator=gen())
    assert v1.shape == v2.shape == (0, c, 28, 28)
    one = aug(images(b=1, c=c), generator=gen())
    assert one.shape == (1, c, 28, 28)


def test_uint8_and_other_dtypes():
    x8 = (images(b=4) * 255).round().to(torch.uint8)
    aug = TwoViewAugment()
    torch.testing.assert_close(aug(x8, generator=gen()), aug(x8.float() / 255, generator=gen()))
    assert aug(images().double(), generator=gen()).dtype == torch.float64
    assert aug(images().half(), generator=gen()).dtype == torch.float16
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        aug(torch.rand(28, 28))
    with pytest.raises(ValueError, match="float images"):
        aug(torch.zeros(1, 1, 4, 4, dtype=torch.int32))


def test_flip_mirrors_about_half_the_images():
    x = images(b=1).expand(200, 1, 28, 28)
    y = TwoViewAugment(**{**OFF, "flip": True})(x, generator=gen())
    same = (y - x).abs().flatten(1).amax(1) < 1e-6
    mirrored = (y - x.flip(-1)).abs().flatten(1).amax(1) < 1e-6
    assert (same ^ mirrored).all()
    assert 60 < int(mirrored.sum()) < 140


@pytest.mark.parametrize("h,w", [(28, 28), (9, 14)])
def test_crop_matrices_match_grid_sample(h, w):
    b = 6
    x = images(b=b, c=2, h=h, w=w)
    scale_x = torch.tensor([1.0, 0.5, -0.7, 0.3, -1.0, 0.9])
    scale_y = torch.tensor([1.0, 0.6, 0.8, 0.3, 1.0, 0.4])
    cx = torch.tensor([0.0, 0.4, -0.2, 0.7, 0.0, 0.1])
    cy = torch.tensor([0.0, -0.3, 0.2, 0.6, 0.0, 0.5])
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = scale_x, cx, scale_y, cy
    grid = F.affine_grid(theta, [b, 2, h, w], align_corners=False)
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rows = _resample_matrices(scale_y, cy, h, None)  # (B, H, H)
    cols = _resample_matrices(scale_x, cx, w, None)  # (B, W, W)
    got = rows[:, None] @ x @ cols.transpose(1, 2)[:, None]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_crop_scale_is_an_area_fraction():
    ramp = torch.linspace(0, 1, 28).expand(64, 1, 28, 28)  # value = column position
    y = TwoViewAugment(**{**OFF, "crop_scale": (0.25, 0.25)})(ramp, generator=gen())
    span = y[:, 0, 0, -1] - y[:, 0, 0, 0]  # a quarter of the area: half the width
    torch.testing.assert_close(span, torch.full((64,), 0.5), atol=0.04, rtol=0)
    wide = TwoViewAugment(**{**OFF, "crop_scale": (0.25, 0.25), "crop_ratio": (2.0, 2.0)})(
        ramp, generator=gen())
    wide_span = wide[:, 0, 0, -1] - wide[:, 0, 0, 0]  # width / height = 2: width = sqrt(0.5)
    torch.testing.assert_close(wide_span, torch.full((64,), math.sqrt(0.5)), atol=0.04, rtol=0)


@pytest.mark.parametrize("sigma,k", [(0.8, 3), (1.7, 5)])
def test_blur_matches_torchvision(sigma, k):
    x = images(b=3, c=3, h=16, w=12)
    aug = TwoViewAugment(
        **(OFF | {"crop_ratio": (12 / 16, 12 / 16), "blur_prob": 1.0, "blur_sigma": (sigma, sigma)}),
        blur_kernel_size=k,
    )
    want = TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    torch.testing.assert_close(aug(x, generator=gen()), want, atol=1e-5, rtol=0)


def test_blur_probability_is_per_image():
    x = images(b=1).expand(300, 1, 28, 28)
    y = TwoViewAugment(**{**OFF, "blur_prob": 0.5})(x, generator=gen())
    blurred = (y - x).abs().flatten(1).amax(1) > 1e-6
    assert 100 < int(blurred.sum()) < 200
    assert float(y[blurred].std()) < float(x.std())  # blurring smooths


def test_brightness_and_contrast_factors():
    flat = torch.full((200, 1, 8, 8), 0.5)
    y = TwoViewAugment(**{**OFF, "brightness": 0.4})(flat, generator=gen())
    per_image = y.flatten(1)
    assert (per_image.std(1) < 1e-6).all()  # brightness scales the whole image
    assert float(per_image.min()) >= 0.3 - 1e-6 and float(per_image.max()) <= 0.7 + 1e-6
    assert float(per_image[:, 0].std()) > 0.05

    x = 0.4 + 0.2 * images(b=200, c=3)  # in [0.4, 0.6]: no clamping at contrast 0.4
    y = TwoViewAugment(**{**OFF, "contrast": 0.4})(x, generator=gen())
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey_x, grey_y = (x * luma).sum(1).mean((1, 2)), (y * luma).sum(1).mean((1, 2))
    torch.testing.assert_close(grey_y, grey_x, atol=1e-5, rtol=0)  # the grey mean is kept
    spread_x = (x - grey_x.view(-1, 1, 1, 1)).flatten(1).norm(dim=1)
    factor = (y - grey_y.view(-1, 1, 1, 1)).flatten(1).norm(dim=1) / spread_x
    assert float(factor.min()) >= 0.6 - 1e-4 and float(factor.max()) <= 1.4 + 1e-4
    assert float(factor.max() - factor.min()) > 0.5


def test_noise_level_is_bounded_and_per_image():
    x = torch.full((100, 1, 28, 28), 0.5)
    y = TwoViewAugment(**{**OFF, "noise_std": 0.05})(x, generator=gen())
    std = (y - x).flatten(1).std(1)
    assert float(std.max()) < 0.05 * 1.15 and float(std.min()) < 0.02 and float(std.max()) > 0.03


def test_invalid_settings():
    for kwargs in (
        {"crop_scale": (0.8, 0.2)},
        {"crop_scale": (0.0, 1.0)},
        {"blur_prob": 1.5},
        {"blur_kernel_size": 4},
        {"brightness": -0.1},
    ):
        with pytest.raises(ValueError):
            TwoViewAugment(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_given_the_same_draws():
    x = images(b=33, c=3)
    aug = TwoViewAugment(noise_std=0.0)
    cpu = aug(x, generator=gen(5))
    cuda = aug(x.cuda(), generator=gen(5))  # CPU generator: identical draws, moved to the GPU
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)
    on_device = aug(x.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert on_device.shape == x.shape and float(on_device.min()) >= 0 and float(on_device.max()) <= 1
