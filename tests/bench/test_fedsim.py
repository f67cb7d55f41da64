"""Smoke tests of the in-process federation harness (bench/fedsim.py) on tiny synthetic data."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench import fedsim  # noqa: E402
from bench.fedsim import FedMethod, Recipe, fedavg, run_federation, run_local_only  # noqa: E402
from fedcl.data import make_synthetic  # noqa: E402
from fedcl.models import build_model, canonical_state_dict  # noqa: E402

SPEC = {"arch": "cnn", "in_channels": 1, "width": 4, "proj_dim": 16, "proj_hidden": 16}
RECIPE = Recipe(batch_size=8, num_push=6, num_prototypes=4, release_sample_rate=1.0, prototype_min_count=1.0)


@pytest.fixture(scope="module")
def setup():
    ds = make_synthetic(num_images=60, num_classes=3, seed=0)
    sites = [ds.images[i * 16:(i + 1) * 16] for i in range(3)]  # 3 sites x 16 images
    torch.manual_seed(0)
    init = canonical_state_dict(build_model(**SPEC))
    return {"sites": sites, "init": init, "public": ds.images[48:60], "probe": ds.images[:8]}


def run(setup, method: FedMethod, *, rounds: int = 2, sites=None):
    return run_federation(sites=sites or setup["sites"], model_spec=SPEC, init_state=setup["init"], method=method,
                          recipe=RECIPE, rounds=rounds, seed=0, public_images=setup["public"],
                          probe_images=setup["probe"])


def test_fedavg_is_the_example_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([(1 + 12) / 4, (2 + 24) / 4]))
    assert out["n"].item() == 3  # integer buffers are copied, not averaged
    with pytest.raises(ValueError, match="one weight per state"):
        fedavg([a, b], [1.0])


def test_one_site_federation_equals_training_that_site_alone(setup):
    one = [setup["sites"][0]]
    fed = run(setup, FedMethod(queue=False, key_encoder="online"), sites=one)
    alone = run_local_only(sites=one, model_spec=SPEC, init_state=setup["init"], recipe=RECIPE, rounds=2, seed=0)[0]
    for key, value in canonical_state_dict(alone).items():
        assert torch.equal(value, canonical_state_dict(fed.model)[key]), key


def test_queue_gives_other_sites_negatives_after_warmup(setup):
    res = run(setup, FedMethod(queue=True, release="raw", warmup_rounds=1, max_staleness=2), rounds=3)
    negatives = [r["negatives"] for r in res.rounds]
    other = 2 * RECIPE.num_push  # entries of the 2 other sites per past round
    assert negatives == [0.0, other, 2 * other]  # warm-up, then 1 and 2 rounds of pushes
    assert res.rounds[-1]["queue_size"] == 3 * 3 * RECIPE.num_push
    assert all(-1.0 <= r["drift"] <= 1.0 + 1e-6 for r in res.rounds)
    assert res.rounds[-1]["epsilon_embeddings"] is None  # raw embeddings are not DP-protected
    trained = canonical_state_dict(res.model)
    assert any(not torch.equal(trained[k], v) for k, v in setup["init"].items())

    # max_staleness=1: the entries of two rounds ago are evicted, only the last round's remain
    res1 = run(setup, FedMethod(queue=True, release="raw", warmup_rounds=1, max_staleness=1), rounds=3)
    assert [r["negatives"] for r in res1.rounds] == [0.0, other, other]


def test_fresh_push_gives_negatives_of_the_current_global_model(setup, monkeypatch):
    from fedcl.augment import TwoViewAugment

    calls = []
    original = fedsim.run_local_round

    def spy(model, images, *, negatives, num_push, **kw):
        calls.append((negatives, num_push, {k: v.clone() for k, v in model.state_dict().items()}))
        return original(model, images, negatives=negatives, num_push=num_push, **kw)

    monkeypatch.setattr(fedsim, "run_local_round", spy)
    identity = TwoViewAugment(crop_scale=(1.0, 1.0), flip=False, brightness=0.0, contrast=0.0, blur_prob=0.0,
                              noise_std=0.0)
    res = run_federation(sites=setup["sites"], model_spec=SPEC, init_state=setup["init"], recipe=RECIPE, rounds=3,
                         seed=0, augment=identity, method=FedMethod(queue=True, release="raw", fresh_push=True,
                                                                    max_staleness=0, warmup_rounds=1))
    other = 2 * RECIPE.num_push  # only this round's pushes of the 2 other sites
    assert [r["negatives"] for r in res.rounds] == [0.0, other, other]
    assert all(num_push == 0 for _, num_push, _ in calls)  # sites push before training, not after
    # site 0 in round 3: its negatives are the received model's encodings of sites 1 and 2
    negatives, _, received_state = calls[-3]
    received = fedsim.model_from_state(SPEC, received_state)
    previous = fedsim.model_from_state(SPEC, calls[-6][2])  # the model of round 2
    others = torch.cat(setup["sites"][1:])
    now = fedsim.encode(received, others, device=torch.device("cpu"), augment=identity)  # (32, d)
    before = fedsim.encode(previous, others, device=torch.device("cpu"), augment=identity)
    best_now = (negatives @ now.T).max(dim=1).values
    assert best_now.min() > 0.99
    assert best_now.mean() > (negatives @ before.T).max(dim=1).values.mean()


def test_prototype_and_public_release_modes(setup):
    proto = run(setup, FedMethod(queue=True, release="prototypes"))
    assert [r["negatives"] for r in proto.rounds] == [0.0, float(RECIPE.num_prototypes)]
    last = proto.rounds[-1]
    assert last["epsilon_embeddings"] > 0 and last["epsilon_updates"] is None  # accounted; updates not DP

    public = run(setup, FedMethod(queue=True, release="public"))
    assert [r["negatives"] for r in public.rounds] == [0.0, float(setup["public"].shape[0])]
    assert public.rounds[-1]["epsilon_embeddings"] == 0.0  # no private embedding left a site
    with pytest.raises(ValueError, match="public_images"):
        run_federation(sites=setup["sites"], model_spec=SPEC, init_state=setup["init"],
                       method=FedMethod(queue=True, release="public"), recipe=RECIPE, rounds=1, seed=0)


def test_dp_run_accounts_every_round_with_the_planned_noise(setup, monkeypatch):
    from opacus.accountants import RDPAccountant

    # Opacus' noise search takes ~10 s; pin the noise and check the accounting of the run.
    monkeypatch.setattr(fedsim, "noise_for_budget", lambda **kw: 2.0)
    fedsim.dp_plan.cache_clear()
    with pytest.raises(ValueError, match="in_batch_negatives=False"):
        run(setup, FedMethod(queue=True, dp_epsilon=8.0, in_batch_negatives=True))
    res = run(setup, FedMethod(queue=True, release="raw", dp_epsilon=8.0, in_batch_negatives=False,
                               warmup_rounds=0, bootstrap_queue=True))
    fedsim.dp_plan.cache_clear()
    assert res.rounds[0]["negatives"] == 2 * RECIPE.num_push  # the round-0 pushes feed round 1
    q = RECIPE.batch_size / 16
    steps = round(RECIPE.local_epochs / q)
    acct = RDPAccountant()
    acct.history = [(2.0, q, 2 * steps)]
    assert res.rounds[-1]["epsilon_updates"] == pytest.approx(acct.get_epsilon(delta=RECIPE.delta), rel=1e-6)
    assert res.rounds[0]["epsilon_updates"] < res.rounds[-1]["epsilon_updates"]  # cumulative over rounds


def test_rounds_per_epoch_trains_each_image_once_per_epoch_in_shorter_rounds(setup, monkeypatch):
    """rounds_per_epoch=2: each round a site trains on half its images, the two halves of an epoch disjoint."""
    seen = []
    real = fedsim.local_round

    def spy(model, images, negatives, recipe, **kw):
        seen.append((images.clone(), recipe.lr))
        return real(model, images, negatives, recipe, **kw)

    monkeypatch.setattr(fedsim, "local_round", spy)
    sites = setup["sites"][:2]
    recipe = replace(RECIPE, rounds_per_epoch=2)
    run_federation(sites=sites, model_spec=SPEC, init_state=setup["init"], method=FedMethod(key_encoder="online"),
                   recipe=recipe, rounds=4, seed=0)
    assert len(seen) == 4 * 2  # rounds x sites, in round-major order
    for epoch in range(2):
        for i, site in enumerate(sites):
            halves = [seen[(2 * epoch + h) * 2 + i][0] for h in range(2)]
            assert [h.shape[0] for h in halves] == [8, 8]
            together = torch.cat(halves)
            # the two halves are the site's 16 images, each once (rows compared as bytes)
            assert sorted(bytes(x.numpy()) for x in together) == sorted(bytes(x.numpy()) for x in site)
    assert all(lr == RECIPE.lr for _, lr in seen)


def test_bad_round_recipes_are_refused(setup):
    with pytest.raises(ValueError, match="rounds_per_epoch must be >= 1"):
        run_federation(sites=setup["sites"], model_spec=SPEC, init_state=setup["init"], method=FedMethod(),
                       recipe=replace(RECIPE, rounds_per_epoch=0), rounds=1, seed=0)
    with pytest.raises(ValueError, match="rounds_per_epoch must be >= 1"):
        run_local_only(sites=setup["sites"], model_spec=SPEC, init_state=setup["init"],
                       recipe=replace(RECIPE, rounds_per_epoch=0), rounds=1, seed=0)


def test_persist_optimizer_hands_each_site_its_own_previous_state(setup, monkeypatch):
    calls = []
    real = fedsim.local_round

    def spy(model, images, *args, **kw):
        res = real(model, images, *args, **kw)
        calls.append((kw["optimizer_state"], res.optimizer_state))
        return res

    monkeypatch.setattr(fedsim, "local_round", spy)
    run_federation(sites=setup["sites"][:2], model_spec=SPEC, init_state=setup["init"],
                   method=FedMethod(key_encoder="online"), recipe=replace(RECIPE, persist_optimizer=True),
                   rounds=2, seed=0)
    (given0, out0), (given1, out1), (again0, _), (again1, _) = calls  # round-major, sites 0 and 1
    assert given0 is None and given1 is None
    assert again0 is out0 and again1 is out1  # a site's own state, not its neighbour's
    calls.clear()
    run(setup, FedMethod(key_encoder="online"))  # default: every round starts cold
    assert all(given is None for given, _ in calls)


def test_dp_with_shorter_rounds_and_kept_optimizers_samples_whole_sites_and_accounts_every_step(setup, monkeypatch):
    """DP-SGD at rounds_per_epoch = 2: each round takes half an epoch's Poisson steps, every one over
    the site's whole data set at the planned rate, and ε is the accountant's for all those steps."""
    from opacus.accountants import RDPAccountant

    monkeypatch.setattr(fedsim, "noise_for_budget", lambda **kw: 2.0)
    fedsim.dp_plan.cache_clear()
    calls = []
    real = fedsim.local_round

    def spy(model, images, *args, **kw):
        res = real(model, images, *args, **kw)
        calls.append((images.shape[0], kw["dp_steps"], kw["optimizer_state"], res))
        return res

    monkeypatch.setattr(fedsim, "local_round", spy)
    recipe = replace(RECIPE, batch_size=4, rounds_per_epoch=2, persist_optimizer=True)
    res = run_federation(sites=setup["sites"], model_spec=SPEC, init_state=setup["init"], recipe=recipe, rounds=4,
                         seed=0, method=FedMethod(queue=True, release="raw", in_batch_negatives=False, dp_epsilon=8.0,
                                                  warmup_rounds=0, fresh_push=True, max_staleness=0))
    fedsim.dp_plan.cache_clear()
    q = 4 / 16
    steps = 2  # round_half(1 epoch / (q x 2)): half of the 4 steps of a whole-epoch round
    assert [(n, s) for n, s, _, _ in calls] == [(16, steps)] * 12  # whole sites, half the steps
    assert all(r.metrics["dp_steps"] == steps for _, _, _, r in calls)
    assert all(given is None for _, _, given, _ in calls[:3])
    for site in range(3):  # round r + 1 resumes the site's own round-r state
        for r in range(3):
            assert calls[3 * (r + 1) + site][2] is calls[3 * r + site][3].optimizer_state
    acct = RDPAccountant()
    acct.history = [(2.0, q, 4 * steps)]
    assert res.rounds[-1]["epsilon_updates"] == pytest.approx(acct.get_epsilon(delta=RECIPE.delta), rel=1e-6)
