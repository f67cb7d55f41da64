import copy
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn

from fedcl.losses import info_nce
from fedcl.privacy.dp import (
    DPParams,
    DPTrainer,
    PerExampleGradientError,
    check_per_example,
    dp_training_batches,
    group_poisson_sample,
    make_dp_training,
    make_private,
    noise_for_budget,
    release_dp_training,
)

ENGINES = ["fedcl", "opacus"]

# torch warns once that the first layer's backward hook sees no input gradient: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DIM = 8
TEMPERATURE = 0.2


class TinyEncoder(nn.Module):
    """GroupNorm CNN: (B, 1, 8, 8) -> (B, DIM) unit norm."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.act = nn.ReLU(inplace=True)  # in place on purpose: prepare_model must handle it
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, DIM)

    def forward(self, x):
        h = self.pool(self.act(self.norm(self.conv(x)))).flatten(1)  # (B, 16)
        return F.normalize(self.fc2(torch.tanh(self.fc1(h))), dim=1)


def _data(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    v1 = torch.rand(b, 1, 8, 8, generator=g)
    v2 = (v1 + 0.3 * torch.rand(b, 1, 8, 8, generator=g)).clamp(0, 1)
    negs = F.normalize(torch.randn(20, DIM, generator=g), dim=1)  # fixed external negatives
    return v1, v2, negs


def _per_example_grads(model, v1, v2, negs):
    """Reference: autograd on each example alone (its loss uses only its own two views)."""
    out = []
    params = [p for p in model.parameters()]
    for i in range(v1.shape[0]):
        loss = info_nce(model(v1[i : i + 1]), model(v2[i : i + 1]), negs, temperature=TEMPERATURE)
        out.append(torch.autograd.grad(loss, params))
    return [torch.stack([g[j] for g in out]) for j in range(len(params))]  # per param: (B, *shape)


def _wrapped(params, *, expected, seed=0, engine="fedcl"):
    torch.manual_seed(seed)
    model = TinyEncoder()
    reference = copy.deepcopy(model)
    gsm, opt = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), params=params, expected_batch_size=expected,
        generator=torch.Generator().manual_seed(seed), engine=engine,
    )
    return model, reference, gsm, opt


@pytest.mark.parametrize("engine", ENGINES)
def test_two_forward_calls_give_b_rows_equal_to_true_per_example_gradients(engine):
    b = 5
    v1, v2, negs = _data(b)
    model, reference, gsm, _ = _wrapped(DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1),
                                        expected=b, engine=engine)
    loss = info_nce(gsm(v1), gsm(v2), negs, temperature=TEMPERATURE)  # mean over B
    loss.backward()
    check_per_example(gsm, batch_size=b)
    expected = _per_example_grads(reference, v1, v2, negs)
    for p, ref in zip(model.parameters(), expected, strict=False):
        assert p.grad_sample.shape == (b, *p.shape)  # B rows, not 2B
        torch.testing.assert_close(p.grad_sample, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_stacked_two_view_batch_is_refused(engine):
    b = 4
    v1, v2, negs = _data(b)
    _, _, gsm, _ = _wrapped(DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1), expected=b,
                            engine=engine)
    z = gsm(torch.cat([v1, v2]))  # (2B, d): one view per "example" -> clipped per view
    info_nce(z[:b], z[b:], negs, temperature=TEMPERATURE).backward()
    assert next(gsm.parameters()).grad_sample.shape[0] == 2 * b
    with pytest.raises(PerExampleGradientError, match="stacked"):
        check_per_example(gsm, batch_size=b)


@pytest.mark.parametrize("engine", ENGINES)
def test_forward_that_does_not_reach_the_loss_is_refused(engine):
    b = 3
    v1, v2, negs = _data(b)
    _, _, gsm, _ = _wrapped(DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1), expected=b,
                            engine=engine)
    q, k = gsm(v1), gsm(v2)
    gsm(v1)  # a third call whose output is dropped
    info_nce(q, k, negs, temperature=TEMPERATURE).backward()
    with pytest.raises(PerExampleGradientError):
        check_per_example(gsm, batch_size=b)


def _norms(grad_samples):
    b = grad_samples[0].shape[0]
    return torch.stack([g.reshape(b, -1).norm(dim=1) for g in grad_samples], dim=1).norm(dim=1)  # (B,)


@pytest.mark.parametrize("engine", ENGINES)
def test_clipping_bounds_each_example_gradient(engine):
    b, clip = 6, 0.02
    v1, v2, negs = _data(b, seed=1)
    model, _, gsm, opt = _wrapped(DPParams(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.1),
                                  expected=b, engine=engine)
    info_nce(gsm(v1), gsm(v2), negs, temperature=TEMPERATURE).backward()
    check_per_example(gsm, batch_size=b)
    raw = [p.grad_sample.clone() for p in model.parameters()]
    norms = _norms(raw)
    assert (norms > clip).sum() >= 3  # the bound is actually exercised
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = [g * factors.view(-1, *[1] * (g.dim() - 1)) for g in raw]
    assert (_norms(clipped) <= clip * (1 + 1e-5)).all()
    opt.pre_step()  # clip, add (zero) noise, scale by 1 / expected batch size
    for p, c in zip(model.parameters(), clipped, strict=False):
        torch.testing.assert_close(p.grad * b, c.sum(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("unit", ["example", "patient"])
def test_noise_std_is_noise_multiplier_times_max_grad_norm(unit):
    sigma, clip = 0.7, 2.0
    params = DPParams(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=0.1, unit=unit)
    torch.manual_seed(0)
    model = TinyEncoder(hidden=64)
    gsm, opt, check = make_dp_training(
        model, torch.optim.SGD(model.parameters(), lr=0.0), params=params, num_examples=100,
        groups=torch.arange(100) // 4 if unit == "patient" else None,
        generator=torch.Generator().manual_seed(3),
    )
    samples = []
    for _ in range(20):  # empty batches: the update is noise only
        check(torch.zeros(0, dtype=torch.long))
        opt.pre_step()
        samples.append(torch.cat([(p.grad * opt.expected_batch_size).flatten() for p in model.parameters()]))
        opt.zero_grad(set_to_none=True)
    std = torch.cat(samples).std().item()  # ~ 20 * 1000 draws
    assert std == pytest.approx(sigma * clip, rel=0.05)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_batch_step_then_normal_step(engine):
    params = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2)
    torch.manual_seed(0)
    model = TinyEncoder()
    before = [p.detach().clone() for p in model.parameters()]
    gsm, opt, check = make_dp_training(model, torch.optim.SGD(model.parameters(), lr=0.1), params=params,
                                       num_examples=10, generator=torch.Generator().manual_seed(0),
                                       engine=engine)
    v1, v2, negs = _data(3)
    for b in (0, 3, 0, 2):  # the loop forwards empty batches too
        opt.zero_grad(set_to_none=True)
        info_nce(gsm(v1[:b]), gsm(v2[:b]), negs, temperature=TEMPERATURE).backward()
        check(b)
        if b:
            assert next(gsm.parameters()).grad_sample.shape[0] == b
        opt.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=False)]
    assert all(changed)  # noise moved every parameter
    release_dp_training(model, gsm)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_poisson_batches_include_each_example_with_the_sample_rate():
    n, q = 200, 0.1
    gen = torch.Generator().manual_seed(0)
    batches = list(dp_training_batches(num_examples=n, sample_rate=q, epochs=30, generator=gen))
    assert len(batches) == round(30 / q)
    sizes = torch.tensor([b.numel() for b in batches], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(q * n, rel=0.03)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.2)  # binomial, not fixed
    counts = torch.bincount(torch.cat(batches), minlength=n).float() / len(batches)
    assert counts.mean().item() == pytest.approx(q, rel=0.03)
    gen = torch.Generator().manual_seed(1)
    tiny = list(dp_training_batches(num_examples=10, sample_rate=0.05, steps=200, generator=gen))
    empty = sum(b.numel() == 0 for b in tiny)
    assert 0.5 * 200 < empty < 0.7 * 200  # P(empty) = 0.95^10 = 0.60


def test_group_sampling_for_releases_takes_whole_groups_capped():
    groups = torch.tensor([5] * 6 + [7] * 2 + [9] * 1)
    gen = torch.Generator().manual_seed(0)
    hits = {5: 0, 7: 0, 9: 0}
    for _ in range(2000):
        idx = group_poisson_sample(groups=groups, sample_rate=0.3, max_per_group=3, generator=gen)
        sel = groups[idx]
        for g in hits:
            k = int((sel == g).sum())
            assert k in (0, min(3, int((groups == g).sum())))  # all (capped) or nothing
            hits[g] += k > 0
    for g in hits:
        assert hits[g] / 2000 == pytest.approx(0.3, abs=0.04)


def test_noise_for_budget_meets_the_target():
    q, steps, target, delta = 0.01, 2000, 2.0, 1e-5
    sigma = noise_for_budget(target_epsilon=target, target_delta=delta, sample_rate=q, total_steps=steps)
    acct = RDPAccountant()
    acct.history = [(sigma, q, steps)]
    eps = acct.get_epsilon(delta=delta)
    assert target - 0.05 < eps <= target


def test_noise_for_budget_leaves_room_for_planned_releases():
    q, steps, target, delta = 0.01, 2000, 3.0, 1e-5
    reserved = [(2.0, 0.1, 20)]  # e.g. one prototype release in each of 20 rounds
    sigma = noise_for_budget(target_epsilon=target, target_delta=delta, sample_rate=q, total_steps=steps,
                             reserved=reserved)
    acct = RDPAccountant()
    acct.history = [(sigma, q, steps), *reserved]
    assert target - 0.05 < acct.get_epsilon(delta=delta) <= target
    alone = noise_for_budget(target_epsilon=target, target_delta=delta, sample_rate=q, total_steps=steps)
    assert sigma > alone
    with pytest.raises(ValueError, match="reserved"):
        noise_for_budget(target_epsilon=0.5, target_delta=delta, sample_rate=q, total_steps=steps,
                         reserved=[(0.5, 1.0, 20)])


def test_batchnorm_model_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, DIM))
    with pytest.raises(ValueError, match="GroupNorm"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     params=DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1),
                     expected_batch_size=4)


def test_params_are_validated():
    with pytest.raises(ValueError):
        DPParams(noise_multiplier=1.0, max_grad_norm=0.0, sample_rate=0.1)
    with pytest.raises(ValueError):
        DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.5)
    with pytest.raises(ValueError):
        DPParams(noise_multiplier=-1.0, max_grad_norm=1.0, sample_rate=0.1)


def test_trainer_runs_a_round_and_reports_its_accounting():
    torch.manual_seed(0)
    model = TinyEncoder()
    params = DPParams(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.25)
    trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), params=params, num_examples=12,
                        generator=torch.Generator().manual_seed(0))
    images = torch.rand(12, 1, 8, 8)
    _, _, negs = _data(1)
    for idx in trainer.batches(steps=8):
        if idx.numel():
            x = images[idx]
            info_nce(trainer.module(x), trainer.module(x.flip(3)), negs, temperature=TEMPERATURE).backward()
        trainer.step(idx)
    assert trainer.accounting() == (1.1, 0.25, 8)
    assert trainer.expected_batch_size == pytest.approx(3.0)
    plain = trainer.detach()
    with torch.no_grad():
        assert plain is model and math.isfinite(float(model(images).sum()))


def test_noise_for_budget_searches_once_per_plan(monkeypatch):
    """A site plans the same run every round: the search (seconds per call) runs once per plan, and a
    different plan or reserved release is searched anew, with the same answer as a fresh search."""
    import fedcl.privacy.dp as dp

    dp._noise_for_budget.cache_clear()
    calls = []
    real = dp.get_noise_multiplier
    monkeypatch.setattr(dp, "get_noise_multiplier", lambda **kw: calls.append(kw) or real(**kw))
    plan = dict(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.02, total_steps=500)
    first = noise_for_budget(**plan)
    assert noise_for_budget(**plan) == first and len(calls) == 1
    assert noise_for_budget(**{**plan, "total_steps": 600}) > first and len(calls) == 2
    with_release = noise_for_budget(**plan, reserved=[(2.0, 0.1, 5)])
    assert with_release > first and len(calls) == 2  # the reserved path composes in the ledger's accountant
    dp._noise_for_budget.cache_clear()
    assert noise_for_budget(**plan) == first and len(calls) == 3
