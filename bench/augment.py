"""Images per second of fedcl's batched TwoViewAugment against torchvision.transforms.v2 per image.

Both pipelines do the same ops with the same settings: random resized crop (scale 0.3-1, ratio
3/4-4/3), horizontal flip, brightness/contrast jitter 0.4, Gaussian blur (kernel 3, sigma
0.1-2) with probability 0.5, Gaussian noise 0.05, on 28x28 Fashion-MNIST images (synthetic
images of the same shape when the Debian package is not installed). The two are timed in
alternating repeats in one run, and the medians are compared.

    python bench/augment.py [--images 4096] [--batch-size 256] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.transforms import v2

from fedcl.augment import TwoViewAugment
from fedcl.data import DataError, load_fashion_mnist, make_synthetic


def load_images(n: int) -> tuple[torch.Tensor, str]:
    """float (n, 1, 28, 28) in [0, 1], and where it came from."""
    try:
        data, source = load_fashion_mnist(split="train"), "Fashion-MNIST train"
    except DataError as exc:
        print(f"note: {exc}; using synthetic images")
        data, source = make_synthetic(num_images=n, num_classes=10, seed=0), "synthetic"
    return data.images[:n].float().div(255.0), source


def time_fedcl(aug: TwoViewAugment, x: torch.Tensor, batch_size: int, gen: torch.Generator) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        aug(x[i : i + batch_size], generator=gen)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - start)


def time_torchvision(pipeline: v2.Compose, x: torch.Tensor) -> float:
    start = time.perf_counter()
    for img in x:  # (1, 28, 28): one call per image, as in a Dataset.__getitem__
        pipeline(img)
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="images per timed fedcl repeat")
    parser.add_argument("--tv-images", type=int, default=1024, help="images per timed torchvision repeat")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both")
    parser.add_argument("--device", default="cpu",
                        help="device for fedcl's augment (torchvision runs on CPU)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, source = load_images(max(args.images, args.tv_images))
    x_fedcl = x[: args.images].to(args.device)
    x_tv = x[: args.tv_images]

    aug = TwoViewAugment(
        crop_scale=(0.3, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, brightness=0.4, contrast=0.4,
        blur_prob=0.5, blur_sigma=(0.1, 2.0), blur_kernel_size=3, noise_std=0.05,
    )  # fmt: skip
    pipeline = v2.Compose([
        v2.RandomResizedCrop(28, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ColorJitter(brightness=0.4, contrast=0.4),
        v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 2.0))], p=0.5),
        v2.GaussianNoise(sigma=0.05, clip=True),
    ])  # fmt: skip
    gen = torch.Generator(device=args.device).manual_seed(0)

    time_fedcl(aug, x_fedcl[: args.batch_size], args.batch_size, gen)  # warm-up
    time_torchvision(pipeline, x_tv[:32])
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate, so that load from other processes hits both
        ours.append(time_fedcl(aug, x_fedcl, args.batch_size, gen))
        theirs.append(time_torchvision(pipeline, x_tv))
    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
    print(f"data: {source}, 28x28, 1 channel; threads={args.threads}; fedcl device={args.device}")
    print(f"fedcl TwoViewAugment (batch {args.batch_size}): {ours_med:12,.0f} images/s  (repeats: "
          + ", ".join(f"{v:,.0f}" for v in ours) + ")")
    print(f"torchvision v2 per image:          {theirs_med:12,.0f} images/s  (repeats: "
          + ", ".join(f"{v:,.0f}" for v in theirs) + ")")
    print(f"ratio: {ours_med / theirs_med:.1f}x")


if __name__ == "__main__":
    main()
