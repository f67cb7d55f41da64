"""Smoke tests of the in-process federation harness (bench/fedsim.py) on tiny synthetic data."""

from __future__ import annotations

import math
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


def test_a_method_can_push_more_or_fewer_embeddings_than_the_recipe(setup):
    for push in (2, 16):  # 16: every image of a site
        method = FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0, num_push=push)
        res = run(setup, method, rounds=2)
        assert [r["negatives"] for r in res.rounds] == [0.0, 2 * push]  # the 2 other sites' pushes
        assert res.rounds[-1]["queue_size"] == 3 * push  # this round's pushes of all 3 sites


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


def test_warmup_online_trains_fedsimclr_in_the_warmup_rounds_then_the_queue(setup):
    simwarm = FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0, warmup_rounds=1,
                        warmup_online=True)
    fedsimclr = run(setup, FedMethod(queue=False, key_encoder="online"), rounds=1)
    frozen_warmup = run(setup, FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0), rounds=1)
    warm = run(setup, simwarm, rounds=1)
    ours, theirs, frozen = (canonical_state_dict(r.model) for r in (warm, fedsimclr, frozen_warmup))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # round 1 is a FedSimCLR round
    assert not all(torch.equal(ours[k], frozen[k]) for k in ours)  # not the frozen-key warm-up
    after = run(setup, simwarm, rounds=2)
    assert [r["negatives"] for r in after.rounds] == [0.0, 2 * RECIPE.num_push]  # then the queue


def test_dp_refuses_fedsimclr_warmup_rounds(setup):
    with pytest.raises(ValueError, match="warmup_online=False"):
        run(setup, FedMethod(queue=True, release="raw", in_batch_negatives=False, dp_epsilon=8.0, warmup_online=True))


def test_drift_compensation_reaches_the_loss(setup, monkeypatch):
    """FedMethod.drift_compensation / drift_kernel reach contrastive_loss as the round model and kernel."""
    import fedcl.train as train

    seen = []
    real = train.contrastive_loss

    def spy(model, key_model, v1, v2, **kw):
        seen.append((kw["drift_model"] is not None, kw["drift_kernel"], kw["negatives"] is not None))
        return real(model, key_model, v1, v2, **kw)

    monkeypatch.setattr(train, "contrastive_loss", spy)
    method = FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0, key_encoder="online",
                       online_negatives=True, drift_compensation=True, drift_kernel=0.1)
    res = run(setup, method)
    assert [r["negatives"] for r in res.rounds] == [0.0, 2 * RECIPE.num_push]
    assert seen and all(d and k == 0.1 for d, k, _ in seen)
    assert any(n for _, _, n in seen)  # round 2 trains against compensated queue negatives


def test_relational_term_reaches_the_loss(setup, monkeypatch):
    """FedMethod.relation_weight / relation_temperature reach contrastive_loss with the round model as teacher."""
    import fedcl.train as train

    seen = []
    real = train.contrastive_loss

    def spy(model, key_model, v1, v2, **kw):
        seen.append((kw["relation_model"] is not None and kw["relation_model"] is not model, kw["relation_weight"],
                     kw["relation_temperature"]))
        return real(model, key_model, v1, v2, **kw)

    monkeypatch.setattr(train, "contrastive_loss", spy)
    method = FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0, key_encoder="online",
                       online_negatives=True, queue_weight=0.0, relation_weight=3.0, relation_temperature=0.05)
    res = run(setup, method)
    assert [r["negatives"] for r in res.rounds] == [0.0, 2 * RECIPE.num_push]
    assert seen and all(teacher and w == 3.0 and t == 0.05 for teacher, w, t in seen)


def test_server_learning_rate_and_momentum_follow_fedavgm(setup, monkeypatch):
    """x1 = x0 - lr * (x0 - avg1); x2 = x1 - lr * (m * (x0 - avg1) + (x1 - avg2)), avg_r from the rounds' site states."""
    base = dict(queue=False, key_encoder="online", in_batch_negatives=True)
    averages = {}

    def capture(tag):
        def on_round(r, model, record):
            averages.setdefault(tag, []).append(canonical_state_dict(model))
        return on_round

    x0 = setup["init"]
    plain = run_federation(sites=setup["sites"], model_spec=SPEC, init_state=x0, method=FedMethod(**base),
                           recipe=RECIPE, rounds=1, seed=0, on_round=capture("plain"))
    fast = run_federation(sites=setup["sites"], model_spec=SPEC, init_state=x0,
                          method=FedMethod(**base, server_lr=2.0), recipe=RECIPE, rounds=1, seed=0,
                          on_round=capture("fast"))
    for key, avg in canonical_state_dict(plain.model).items():  # round 1 of FedAvg is the mean itself
        if avg.is_floating_point():
            torch.testing.assert_close(canonical_state_dict(fast.model)[key], x0[key] - 2.0 * (x0[key] - avg))
    # two rounds with momentum: round 2's mean is FedAvg's from x1 (recomputed from the sites' states)
    states = []
    real = fedsim.fedavg

    def spy(s, w):
        out = real(s, w)
        states.append({k: v.clone() for k, v in out.items()})  # the server step then edits ``out`` in place
        return out

    monkeypatch.setattr(fedsim, "fedavg", spy)
    run_federation(sites=setup["sites"], model_spec=SPEC, init_state=x0,
                   method=FedMethod(**base, server_lr=1.5, server_momentum=0.5), recipe=RECIPE, rounds=2, seed=0,
                   on_round=capture("momentum"))
    (x1, x2), (avg1, avg2) = averages["momentum"], states
    for key in x1:
        if x1[key].is_floating_point():
            d1 = x0[key] - avg1[key]
            torch.testing.assert_close(x1[key], x0[key] - 1.5 * d1)
            torch.testing.assert_close(x2[key], x1[key] - 1.5 * (0.5 * d1 + (x1[key] - avg2[key])))


def test_rounds_per_epoch_trains_each_image_once_per_epoch_in_shorter_rounds(setup, monkeypatch):
    """rounds_per_epoch=2: each round a site trains on half its images, the two halves of an epoch disjoint."""
    seen = []
    real = fedsim.local_round

    def spy(model, images, **kw):
        seen.append((images.clone(), kw["lr"]))
        return real(model, images, **kw)

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
    assert all(lr == RECIPE.lr for _, lr in seen)  # constant schedule


def test_cosine_schedule_decays_the_learning_rate_over_rounds(setup, monkeypatch):
    lrs = []
    real = fedsim.local_round

    def spy(model, images, **kw):
        lrs.append(kw["lr"])
        return real(model, images, **kw)

    monkeypatch.setattr(fedsim, "local_round", spy)
    recipe = replace(RECIPE, lr_schedule="cosine")
    run_federation(sites=setup["sites"][:1], model_spec=SPEC, init_state=setup["init"],
                   method=FedMethod(key_encoder="online"), recipe=recipe, rounds=4, seed=0)
    expected = [RECIPE.lr * 0.5 * (1 + math.cos(math.pi * r / 4)) for r in range(4)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == RECIPE.lr and lrs[-1] < lrs[0] / 5


def test_bad_round_recipes_are_refused(setup):
    with pytest.raises(ValueError, match="rounds_per_epoch must be >= 1"):
        run_federation(sites=setup["sites"], model_spec=SPEC, init_state=setup["init"], method=FedMethod(),
                       recipe=replace(RECIPE, rounds_per_epoch=0), rounds=1, seed=0)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        run_local_only(sites=setup["sites"], model_spec=SPEC, init_state=setup["init"],
                       recipe=replace(RECIPE, lr_schedule="linear"), rounds=1, seed=0)


def test_persist_optimizer_hands_each_site_its_own_previous_state(setup, monkeypatch):
    calls = []
    real = fedsim.local_round

    def spy(model, images, **kw):
        res = real(model, images, **kw)
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

    def spy(model, images, **kw):
        res = real(model, images, **kw)
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


def test_hard_negatives_and_predictor_reach_the_sites_round(setup, monkeypatch):
    import fedcl.train

    seen = []
    real = fedcl.train.local_round

    def spy(model, images, **kw):
        seen.append((kw["hard_negatives"], model.predictor is not None))
        return real(model, images, **kw)

    monkeypatch.setattr(fedsim, "local_round", spy)
    run(setup, FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0, hard_negatives=4), rounds=2)
    assert seen == [(4, False)] * 6
    seen.clear()
    spec = {**SPEC, "pred_hidden": 8}
    torch.manual_seed(0)
    init = canonical_state_dict(build_model(**spec))
    method = FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0, pred_hidden=8)
    res = run_federation(sites=setup["sites"], model_spec=spec, init_state=init, method=method, recipe=RECIPE,
                         rounds=2, seed=0)
    assert seen == [(0, True)] * 6 and res.model.predictor is not None
    with pytest.raises(ValueError, match="pred_hidden"):
        run(setup, method)  # SPEC has no predictor
