"""Frozen-encoder evaluation: kNN, linear probe, few-label probe, alignment and uniformity."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.augment import TwoViewAugment


@torch.no_grad()
def extract_features(
    model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """L2-normalised backbone features (N, feat_dim) of uint8 images (N, C, H, W)."""
    was_training = model.training
    model.eval().to(device)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device).float().div_(255.0)
        out.append(F.normalize(model.features(x).float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "feat_dim", 0))


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 200, temperature: float = 0.1,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted kNN (Wu et al. 2018, InstDisc): votes exp(sim / t) over the k nearest by cosine."""
    if test_features.shape[0] == 0:
        raise ValueError("kNN needs at least one test example")
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one labelled training example")
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    k = min(k, train_features.shape[0])
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start:start + chunk] @ train_features.T  # (b, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], c)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += int((votes.argmax(1) == test_labels[start:start + chunk]).sum())
    return correct / test_features.shape[0]


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                          test_features: torch.Tensor, test_labels: torch.Tensor, *, c: float = 1.0,
                          max_iter: int = 1000) -> float:
    """Multinomial logistic regression on frozen, standardised features (scikit-learn, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, xte = train_features.numpy(), test_features.numpy()
    if len(np.unique(train_labels.numpy())) < 2:
        raise ValueError("a linear probe needs labels of at least two classes")
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(scaler.transform(xtr), train_labels.numpy())
    return float((clf.predict(scaler.transform(xte)) == test_labels.numpy()).mean())


def few_label_indices(labels: torch.Tensor, *, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` random indices of each class (fewer where a class has fewer)."""
    rng = np.random.default_rng(seed)
    lab = labels.numpy()
    picks = [
        rng.choice(np.flatnonzero(lab == cls), size=min(per_class, int((lab == cls).sum())), replace=False)
        for cls in np.unique(lab)]
    return torch.from_numpy(np.sort(np.concatenate(picks)))


def alignment_uniformity(
    model: nn.Module, images: torch.Tensor, *, augment: TwoViewAugment, device: torch.device, seed: int = 0,
    alpha: float = 2.0, t: float = 2.0,
) -> tuple[float, float]:
    """Wang & Isola 2020 on the projection output: E||f(x)-f(y)||^alpha over positive pairs,
    and log E exp(-t ||f(x)-f(y)||^2) over all pairs. Lower is better for both."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval().to(device)
    with torch.no_grad():
        x = images.to(device).float().div_(255.0)
        v1, v2 = augment.two_views(x, generator=gen if device.type == "cpu" else None)
        z1, z2 = model(v1).float().cpu(), model(v2).float().cpu()
    model.train(was_training)
    align = (z1 - z2).norm(dim=1).pow(alpha).mean().item()
    sq = torch.pdist(z1, p=2).pow(2)
    uniform = sq.mul(-t).exp().mean().log().item()
    return align, uniform


def evaluate_encoder(
    model: nn.Module,
    *,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    device: torch.device,
    augment: TwoViewAugment | None = None,
    few_label_per_class: int = 10,
    linear: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """All the frozen-encoder metrics, accuracies as fractions."""
    ftr = extract_features(model, train_images, device=device)
    fte = extract_features(model, test_images, device=device)
    out = {"knn": knn_accuracy(ftr, train_labels, fte, test_labels)}
    if linear:
        out["linear"] = linear_probe_accuracy(ftr, train_labels, fte, test_labels)
        few = few_label_indices(train_labels, per_class=few_label_per_class, seed=seed)
        out["fewlabel"] = linear_probe_accuracy(ftr[few], train_labels[few], fte, test_labels)
    if augment is not None:
        n = min(1024, test_images.shape[0])
        out["alignment"], out["uniformity"] = alignment_uniformity(
            model, test_images[:n], augment=augment, device=device, seed=seed)
    return out
