import math

import pytest
import torch
import torch.nn.functional as F

from fedcl.augment import TwoViewAugment
from fedcl.data import make_synthetic
from fedcl.evaluate import (
    alignment_uniformity,
    evaluate_encoder,
    few_label_indices,
    knn_accuracy,
    linear_probe_accuracy,
)
from fedcl.models import build_model


def _clusters(n_per, c, d=8, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=1)
    labels = torch.arange(c).repeat_interleave(n_per)
    feats = F.normalize(centers[labels] + noise * torch.randn(len(labels), d, generator=g), dim=1)
    return feats, labels


def test_knn_perfect_on_separated_clusters_and_chance_on_noise():
    f, y = _clusters(30, 4)
    ft, yt = _clusters(10, 4, seed=0)
    assert knn_accuracy(f, y, ft, yt, k=20) == 1.0
    g = torch.Generator().manual_seed(1)
    rand = F.normalize(torch.randn(400, 8, generator=g), dim=1)
    yr = torch.randint(0, 4, (400,), generator=g)
    acc = knn_accuracy(rand[:300], yr[:300], rand[300:], yr[300:], k=20)
    assert acc < 0.5


def test_knn_matches_manual_vote():
    f, y = _clusters(5, 3, noise=0.8, seed=2)
    q, yq = _clusters(4, 3, noise=0.8, seed=3)
    k, t = 4, 0.1
    correct = 0
    for i in range(q.shape[0]):
        sims = f @ q[i]
        top = sims.topk(k)
        votes = torch.zeros(3)
        for s, j in zip(top.values, top.indices, strict=False):
            votes[y[j]] += math.exp(float(s) / t)
        correct += int(votes.argmax() == yq[i])
    assert knn_accuracy(f, y, q, yq, k=k, temperature=t) == pytest.approx(correct / q.shape[0])


def test_linear_and_few_label_probe():
    f, y = _clusters(40, 5, d=16, noise=0.3)
    ft, yt = _clusters(10, 5, d=16, noise=0.3)
    assert linear_probe_accuracy(f, y, ft, yt) > 0.9
    few = few_label_indices(y, per_class=3, seed=0)
    assert len(few) == 15 and torch.bincount(y[few]).tolist() == [3] * 5
    with pytest.raises(ValueError, match="two classes"):
        linear_probe_accuracy(f[:5], torch.zeros(5, dtype=torch.long), ft, yt)


def test_alignment_uniformity_ranges():
    data = make_synthetic(num_images=64, num_classes=4, seed=0)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    align, unif = alignment_uniformity(model, data.images, augment=TwoViewAugment(),
                                       device=torch.device("cpu"))
    assert 0 <= align <= 4 and -4 <= unif <= 0


def test_evaluate_encoder_all_metrics():
    tr = make_synthetic(num_images=80, num_classes=4, seed=0)
    te = make_synthetic(num_images=40, num_classes=4, seed=1)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    out = evaluate_encoder(model, train_images=tr.images, train_labels=tr.labels, test_images=te.images,
                           test_labels=te.labels, device=torch.device("cpu"), augment=TwoViewAugment(),
                           few_label_per_class=5)
    assert set(out) == {"knn", "linear", "fewlabel", "alignment", "uniformity"}
    assert all(0 <= out[k] <= 1 for k in ("knn", "linear", "fewlabel"))
