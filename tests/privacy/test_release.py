import math

import pytest
import torch
import torch.nn.functional as F

from fedcl.privacy.release import (
    LazyRecords,
    PrototypeRelease,
    clip_rows,
    init_prototypes,
    merge_prototypes,
    release_gaussian,
    release_prototypes,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_gaussian_release_noise_std_is_sigma(sigma):
    n, d = 1000, 64
    e = torch.zeros(d)
    e[3] = 1.0
    x = e.expand(n, d).clone()  # every record the same, so released - x is the noise
    released, n_sampled = release_gaussian(x, noise_multiplier=sigma, sample_rate=1.0, generator=_gen())
    assert released.shape == (n, d) and n_sampled == n
    noise = released - x
    # 64k draws: the sample std is within ~0.3% of sigma; sigma/2 or 2*sigma are far outside 3%
    assert noise.std().item() == pytest.approx(sigma, rel=0.03)
    assert noise.mean().abs().item() < 5 * sigma / math.sqrt(n * d)


def test_gaussian_release_subsamples_and_pads_with_noise_rows():
    n, d, q, sigma = 4000, 16, 0.3, 0.5
    x = torch.zeros(n, d)
    x[:, 0] = 1.0
    released, n_sampled = release_gaussian(x, noise_multiplier=sigma, sample_rate=q, generator=_gen(1))
    assert released.shape == (n, d)  # one row per record: the row count reveals nothing
    assert abs(n_sampled - q * n) < 5 * math.sqrt(n * q * (1 - q))
    # column 0 holds signal only on sampled rows; the other columns are pure noise
    assert released[:, 0].mean().item() == pytest.approx(n_sampled / n, abs=5 * sigma / math.sqrt(n))
    assert released[:, 1:].std().item() == pytest.approx(sigma, rel=0.03)
    # the rows are shuffled: signal rows are not the first n_sampled
    assert released[:n_sampled, 0].mean().item() < 0.6


def test_gaussian_release_clips_records_to_unit_norm():
    x = 10.0 * F.normalize(torch.randn(50, 8, generator=_gen(2)), dim=1)
    released, _ = release_gaussian(x, noise_multiplier=1e-6, sample_rate=1.0, generator=_gen())
    assert (released.norm(dim=1) <= 1.0 + 1e-4).all()
    assert (released.norm(dim=1) >= 1.0 - 1e-4).all()
    groups = torch.arange(50) // 5
    released, _ = release_gaussian(x, noise_multiplier=1e-6, sample_rate=1.0, generator=_gen(), groups=groups,
                                   max_per_group=4)
    # a group's (at most 4) rows move by at most 1 in L2 together: each row <= 1/2
    assert (released.norm(dim=1) <= 0.5 + 1e-4).all()


def test_clip_rows_keeps_short_rows():
    x = torch.tensor([[0.3, 0.4], [3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(clip_rows(x, max_norm=1.0), torch.tensor([[0.3, 0.4], [0.6, 0.8], [0.0, 0.0]]))


def test_prototype_release_noise_std_is_sigma_times_sqrt2():
    sigma, p, d = 0.8, 16, 32
    protos = init_prototypes(num=p, dim=d, seed=0)
    assign = torch.arange(200) % p
    x = protos[assign]  # each record sits on its prototype
    true_sums = torch.zeros(p, d).index_add_(0, assign, x)
    true_counts = torch.bincount(assign, minlength=p).float()
    sum_noise, count_noise = [], []
    gen = _gen(3)
    for _ in range(40):
        rel = release_prototypes(x, protos, noise_multiplier=sigma, sample_rate=1.0, generator=gen)
        assert rel.sums.shape == (p, d) and rel.counts.shape == (p,)
        sum_noise.append((rel.sums - true_sums).flatten())
        count_noise.append(rel.counts - true_counts)
    expected = sigma * math.sqrt(2.0)  # joint sensitivity sqrt(2) for (sum, count)
    assert torch.cat(sum_noise).std().item() == pytest.approx(expected, rel=0.03)
    assert torch.cat(count_noise).std().item() == pytest.approx(expected, rel=0.1)


def test_prototype_release_bounds_one_record_and_one_group():
    protos = init_prototypes(num=4, dim=8, seed=1)
    big = 10.0 * protos[2:3]  # one record, norm 10
    rel = release_prototypes(big, protos, noise_multiplier=1e-7, sample_rate=1.0, generator=_gen())
    assert rel.sums.norm().item() == pytest.approx(1.0, abs=1e-4)  # clipped to 1
    torch.testing.assert_close(rel.sums[2], protos[2], atol=1e-4, rtol=0)  # nearest prototype
    assert rel.counts.sum().item() == pytest.approx(1.0, abs=1e-4)
    group = protos[[0, 1, 1, 3, 3]] * 5.0  # one patient, five images
    rel = release_prototypes(group, protos, noise_multiplier=1e-7, sample_rate=1.0, generator=_gen(),
                             groups=torch.zeros(5, dtype=torch.long), max_per_group=5)
    assert rel.sums.norm().item() <= 1.0 + 1e-4
    assert rel.counts.norm().item() <= 1.0 + 1e-4
    assert rel.counts.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_prototype_release_subsamples():
    protos = init_prototypes(num=2, dim=4, seed=2)
    x = protos[torch.zeros(5000, dtype=torch.long)]
    rel = release_prototypes(x, protos, noise_multiplier=0.5, sample_rate=0.2, generator=_gen(4))
    assert rel.counts[0].item() == pytest.approx(1000, abs=5 * math.sqrt(5000 * 0.2 * 0.8) + 4)


def test_merge_normalises_sums_and_keeps_previous_where_counts_are_low():
    previous = init_prototypes(num=3, dim=4, seed=5)
    a = PrototypeRelease(sums=torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 9.0, 0]]),
                         counts=torch.tensor([3.0, 1.0, -4.0]))
    b = PrototypeRelease(sums=torch.tensor([[2.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
                         counts=torch.tensor([4.0, 1.5, 2.0]))
    merged = merge_prototypes([a, b], previous=previous, min_count=2.5)
    torch.testing.assert_close(merged[0], torch.tensor([1.0, 0, 0, 0]))  # count 7
    torch.testing.assert_close(merged[1], torch.tensor([0, 1.0, 1.0, 0]) / math.sqrt(2))  # count 2.5
    torch.testing.assert_close(merged[2], previous[2])  # noisy count -2 < 2.5: kept
    torch.testing.assert_close(merged.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(merge_prototypes([], previous=previous, min_count=1.0), previous)
    with pytest.raises(ValueError):
        merge_prototypes([PrototypeRelease(sums=torch.zeros(2, 4), counts=torch.zeros(2))], previous=previous,
                         min_count=1.0)


def test_prototypes_recover_cluster_directions_through_noise():
    d, p = 16, 4
    centres = init_prototypes(num=p, dim=d, seed=7)
    g = _gen(8)
    x = F.normalize(centres[torch.arange(4000) % p] + 0.1 * torch.randn(4000, d, generator=g), dim=1)
    start = F.normalize(centres + 0.2 * torch.randn(p, d, generator=g), dim=1)  # rough public guess
    sites = [
        release_prototypes(x[i::3], start, noise_multiplier=1.0, sample_rate=0.5, generator=g)
        for i in range(3)]
    merged = merge_prototypes(sites, previous=start, min_count=20.0)
    before = (start * centres).sum(dim=1).min().item()
    after = (merged * centres).sum(dim=1).min().item()
    assert after > 0.95 and after > before + 0.02


def test_init_prototypes_are_public_unit_vectors():
    a = init_prototypes(num=10, dim=6, seed=0)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(a, init_prototypes(num=10, dim=6, seed=0))
    assert not torch.allclose(a, init_prototypes(num=10, dim=6, seed=1))


def test_bad_inputs_are_refused():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="raw"):
        release_gaussian(x, noise_multiplier=0.0, sample_rate=1.0, generator=_gen())
    with pytest.raises(ValueError):
        release_gaussian(x, noise_multiplier=1.0, sample_rate=0.0, generator=_gen())
    with pytest.raises(ValueError, match="NaN"):
        release_gaussian(torch.full((2, 4), float("nan")), noise_multiplier=1.0, sample_rate=1.0,
                         generator=_gen())
    with pytest.raises(ValueError):
        release_prototypes(x, torch.randn(3, 5), noise_multiplier=1.0, sample_rate=1.0, generator=_gen())


def test_lazy_records_embed_only_the_sampled_rows_and_release_the_same_sums():
    protos = init_prototypes(num=4, dim=8, seed=3)
    x = F.normalize(torch.randn(1000, 8, generator=_gen(5)), dim=1)
    asked: list[int] = []

    def embed(idx: torch.Tensor) -> torch.Tensor:
        asked.append(int(idx.numel()))
        return x[idx]

    eager = release_prototypes(x, protos, noise_multiplier=0.7, sample_rate=0.1, generator=_gen(6))
    lazy = release_prototypes(LazyRecords(n=1000, dim=8, embed=embed), protos, noise_multiplier=0.7,
                              sample_rate=0.1, generator=_gen(6))
    assert len(asked) == 1 and 50 < asked[0] < 150  # about sample_rate * n rows encoded, once
    torch.testing.assert_close(lazy.sums, eager.sums)  # the same sampling and the same noise
    torch.testing.assert_close(lazy.counts, eager.counts)


def test_lazy_records_reject_embeddings_of_the_wrong_shape():
    protos = init_prototypes(num=4, dim=8, seed=3)
    bad = LazyRecords(n=100, dim=8, embed=lambda idx: torch.zeros(idx.numel(), 5))
    with pytest.raises(ValueError, match="dim 8"):
        release_prototypes(bad, protos, noise_multiplier=1.0, sample_rate=1.0, generator=_gen())
    nan = LazyRecords(n=100, dim=8, embed=lambda idx: torch.full((idx.numel(), 8), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        release_prototypes(nan, protos, noise_multiplier=1.0, sample_rate=1.0, generator=_gen())


def test_prototypes_of_the_wrong_width_are_refused_before_any_record_is_encoded():
    asked: list[int] = []

    def embed(idx):
        asked.append(idx.numel())
        return torch.zeros(idx.numel(), 8)

    for protos in (init_prototypes(num=4, dim=6, seed=3), torch.zeros(0, 8)):
        with pytest.raises(ValueError, match=r"prototypes must be \(P >= 1, 8\)"):
            release_prototypes(LazyRecords(n=100, dim=8, embed=embed), protos, noise_multiplier=1.0,
                               sample_rate=1.0, generator=_gen())
    assert asked == []
