"""Patient-level DP-SGD: whole patients sampled, each patient's summed gradient clipped to C,
the accountant run with the patients' sample rate."""

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn

import fedcl.privacy.dp as dp
from fedcl.augment import TwoViewAugment
from fedcl.losses import info_nce
from fedcl.models import build_model
from fedcl.privacy.dp import DPParams, DPTrainer, dp_training_batches, make_dp_training
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.train import RoundRecipe, local_round

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DIM = 8
# patient 0 holds 8 images, patients 1..4 one or two each
GROUPS = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 3, 4, 4])


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(16, DIM)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1)  # (B, 16)
        return F.normalize(self.fc(h), dim=1)


def _views(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    v1 = torch.rand(n, 1, 8, 8, generator=g)
    v2 = (v1 + 0.3 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1)
    negs = F.normalize(torch.randn(20, DIM, generator=g), dim=1)
    return v1, v2, negs


def _flat_update(model, opt):
    """The noiseless clipped sum of the step (p.grad is that sum / expected batch size)."""
    return torch.cat([(p.grad * opt.expected_batch_size).flatten() for p in model.parameters()])


@pytest.mark.parametrize("engine", ["fedcl", "opacus"])
def test_a_patients_whole_contribution_is_bounded_by_max_grad_norm(engine):
    clip = 0.01
    v1, v2, negs = _views(GROUPS.numel(), seed=3)

    def step(batch):
        torch.manual_seed(0)
        model = TinyEncoder()
        params = DPParams(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5, unit="patient")
        module, opt, check = make_dp_training(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                              params=params, num_examples=GROUPS.numel(), groups=GROUPS,
                                              engine=engine)
        info_nce(module(v1[batch]), module(v2[batch]), negs, temperature=0.2).backward()
        per_example = [p.grad_sample.clone() for p in model.parameters()]  # (B, ...) before the patient sums
        check(batch)
        assert next(model.parameters()).grad_sample.shape[0] == torch.unique(GROUPS[batch]).numel()
        opt.pre_step()
        return _flat_update(model, opt), per_example

    only_0 = (GROUPS == 0).nonzero(as_tuple=True)[0]
    update, per_example = step(only_0)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example], 1).norm(dim=1)  # (8,)
    assert (norms > clip).all()  # the bound is exercised on every image
    # per-example clipping at C would let this patient move the model by far more than C
    clipped = [g * (clip / norms).clamp(max=1).view(-1, *[1] * (g.dim() - 1)) for g in per_example]
    assert torch.cat([g.sum(0).flatten() for g in clipped]).norm() > 3 * clip
    assert update.norm() <= clip * (1 + 1e-4)

    # adjacency: with and without patient 0 (all its images), the sums differ by at most C
    everyone = torch.arange(GROUPS.numel())
    others = (GROUPS != 0).nonzero(as_tuple=True)[0]
    with_0, _ = step(everyone)
    without_0, _ = step(others)
    assert (with_0 - without_0).norm() <= clip * (1 + 1e-4)
    torch.testing.assert_close(with_0 - without_0, update, rtol=1e-3, atol=1e-7)


def test_sampling_takes_all_images_of_sampled_patients_and_none_of_the_others():
    groups = torch.tensor([3] * 7 + [5] * 2 + [8] * 1 + [9] * 4 + [11] * 3)
    q, steps = 0.3, 3000
    patients = groups.unique()
    hits = torch.zeros(patients.numel())
    sizes = []
    for idx in dp_training_batches(num_examples=groups.numel(), sample_rate=q, steps=steps,
                                   generator=torch.Generator().manual_seed(0), groups=groups):
        chosen = groups[idx]
        for i, p in enumerate(patients):
            k = int((chosen == p).sum())
            assert k in (0, int((groups == p).sum()))  # all of its images or none
            hits[i] += k > 0
        sizes.append(int(idx.numel()))
    assert torch.allclose(hits / steps, torch.full_like(hits, q), atol=0.03)  # each patient with rate q
    assert sum(sizes) / steps == pytest.approx(q * groups.numel(), rel=0.05)  # q * N images on average


def test_local_round_samples_and_clips_per_patient(monkeypatch):
    images = torch.randint(0, 256, (14, 1, 28, 28), dtype=torch.uint8)
    seen = {}

    def recording(**kwargs):
        seen["groups"] = kwargs.get("groups")
        batches = list(dp_training_batches(**kwargs))
        seen["batches"] = batches
        return iter(batches)

    monkeypatch.setattr(dp, "dp_training_batches", recording)
    sums = []
    real_sum = dp.sum_per_patient
    monkeypatch.setattr(dp, "sum_per_patient", lambda module, *, groups: sums.append(groups.clone()) or
                        real_sum(module, groups=groups))
    params = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, unit="patient")
    torch.manual_seed(0)
    recipe = RoundRecipe(epochs=2, batch_size=4, lr=1e-3, temperature=0.2, in_batch_negatives=False,
                         key_encoder="global", num_push=0)
    res = local_round(build_model(in_channels=1, width=4, proj_dim=8, proj_hidden=16), images,
                      F.normalize(torch.randn(16, 8), dim=1), recipe,
                      augment=TwoViewAugment(crop_scale=(0.5, 1.0)), dp=params, groups=GROUPS)
    assert torch.equal(seen["groups"], GROUPS)
    assert len(seen["batches"]) == res.metrics["dp_steps"] == 4  # epochs / q
    for idx in seen["batches"]:
        for p in GROUPS.unique():
            assert int((GROUPS[idx] == p).sum()) in (0, int((GROUPS == p).sum()))
    non_empty = [b for b in seen["batches"] if b.numel()]
    assert len(sums) == len(non_empty) and all(
        torch.equal(s, GROUPS[b]) for s, b in zip(sums, non_empty, strict=False))
    assert res.metrics["dp_sample_rate"] == 0.5 and res.metrics["dp_patients"] == 5


def test_epsilon_of_a_patient_level_run_equals_opacus_rdp_for_the_patients_sample_rate():
    sigma, steps, delta = 1.3, 25, 1e-5
    num_patients = int(GROUPS.unique().numel())
    q = 2 / num_patients  # 2 patients expected per batch
    torch.manual_seed(0)
    model = TinyEncoder()
    params = DPParams(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=q, unit="patient")
    trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), params=params,
                        num_examples=GROUPS.numel(), groups=GROUPS,
                        generator=torch.Generator().manual_seed(0))
    v1, v2, negs = _views(GROUPS.numel())
    for idx in trainer.batches(steps=steps):
        if idx.numel():
            info_nce(trainer.module(v1[idx]), trainer.module(v2[idx]), negs, temperature=0.2).backward()
        trainer.step(idx)
    assert trainer.accounting() == (sigma, q, steps)  # the patients' rate, not the images'
    ledger = PrivacyLedger(site_id="h", delta=delta, epsilon_budget=None, privacy_unit="group")
    noise_multiplier, sample_rate, done = trainer.accounting()
    ledger.record_dpsgd(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=done, round=1)
    acct = RDPAccountant()
    acct.history = [(sigma, q, steps)]
    assert ledger.epsilon() == pytest.approx(acct.get_epsilon(delta=delta), rel=1e-9)
    assert ledger.summary()["privacy_unit"] == "group"


def test_patient_unit_without_patient_ids_is_a_clear_error():
    model = TinyEncoder()
    params = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, unit="patient")
    with pytest.raises(ValueError, match="no patient id"):
        make_dp_training(model, torch.optim.SGD(model.parameters(), lr=0.1), params=params, num_examples=14)
    with pytest.raises(ValueError, match="no patient id"):
        DPTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), params=params, num_examples=14)
    images = torch.zeros(14, 1, 28, 28, dtype=torch.uint8)
    recipe = RoundRecipe(epochs=1, batch_size=4, lr=1e-3, temperature=0.2, in_batch_negatives=False,
                         key_encoder="global", num_push=0)
    kwargs = dict(augment=TwoViewAugment())
    with pytest.raises(ValueError, match="no patient id.*train_patients"):
        local_round(build_model(in_channels=1, width=4), images, None, recipe, dp=params, **kwargs)
    with pytest.raises(ValueError, match="shape \\(14,\\)"):
        local_round(build_model(in_channels=1, width=4), images, None, recipe, dp=params, groups=GROUPS[:5],
                    **kwargs)
    example = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    with pytest.raises(ValueError, match="unit is 'example'"):
        local_round(build_model(in_channels=1, width=4), images, None, recipe, dp=example, groups=GROUPS,
                    **kwargs)
