import copy
import dataclasses
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fedcl.augment import TwoViewAugment
from fedcl.data import make_synthetic
from fedcl.models import build_model, canonical_state_dict
from fedcl.train import (
    INSECURE_REPRODUCIBLE,
    RoundRecipe,
    encode,
    local_round,
    resolve_device,
    train_centralized,
)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_images=96, num_classes=4, seed=0)


RECIPE = RoundRecipe(epochs=1, batch_size=32, lr=1e-3, temperature=0.2, key_encoder="global",
                     in_batch_negatives=True, num_push=40)


def _round(model, images, negatives="default", **kw):
    """local_round with RECIPE; keyword arguments named like a recipe field change that field."""
    if isinstance(negatives, str):
        negatives = F.normalize(torch.randn(64, 16), dim=1)
    fields = {k: kw.pop(k) for k in list(kw) if k in RoundRecipe.__dataclass_fields__}
    kw = {"augment": TwoViewAugment(), "device": "cpu", "seed": 0, **kw}
    return local_round(model, images, negatives, replace(RECIPE, **fields), **kw)


def test_round_outputs(data):
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    before = canonical_state_dict(model)
    res = _round(model, data.images)
    assert set(res.state) == set(before)
    assert any(not torch.equal(res.state[k], before[k]) for k in before)  # it trained
    assert res.embeddings.shape == (40, 16)
    torch.testing.assert_close(res.embeddings.norm(dim=1), torch.ones(40))
    m = res.metrics
    assert m["num_examples"] == 96 and m["steps"] == 3 and m["negatives_used"] == 64
    assert m["loss"] > 0


def test_pushed_embeddings_come_from_the_round_model(data):
    torch.manual_seed(0)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    round_model = copy.deepcopy(model)
    res = _round(model, data.images, num_push=96, augment=TwoViewAugment(crop_scale=(1.0, 1.0), flip=False,
                 brightness=0.0, contrast=0.0, blur_prob=0.0, noise_std=0.0))
    # identity augmentation: embeddings must equal the round model's encoding (order is a permutation)
    want = encode(round_model, data.images, device=torch.device("cpu"))
    trained = encode(model, data.images, device=torch.device("cpu"))
    # (near-identity: the crop still resamples, so compare which model explains them better)
    sims_round = (res.embeddings @ want.T).max(dim=1).values
    sims_trained = (res.embeddings @ trained.T).max(dim=1).values
    assert sims_round.min() > 0.99
    assert sims_round.mean() > sims_trained.mean()


@pytest.mark.parametrize("key_encoder,in_batch", [("global", False), ("online", True), ("online", False)])
def test_modes_and_tiny_batches(data, key_encoder, in_batch):
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    res = _round(model, data.images[:5], batch_size=1, key_encoder=key_encoder, in_batch_negatives=in_batch,
                 num_push=0)
    assert res.metrics["steps"] == 5 and res.embeddings.shape == (0, 16)
    assert torch.isfinite(torch.tensor(res.metrics["loss"]))


def test_no_negatives_global_key(data):
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    res = _round(model, data.images, negatives=None, in_batch_negatives=True)
    assert res.metrics["negatives_used"] == 0 and res.metrics["loss"] > 0


def test_dp_refuses_in_batch_negatives(data):
    model = build_model(in_channels=1, width=8)
    with pytest.raises(ValueError, match="in_batch_negatives"):
        _round(model, data.images, dp=object())


def test_centralized_loss_decreases(data):
    torch.manual_seed(0)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    hist = train_centralized(model, data.images,
                             RoundRecipe(epochs=4, batch_size=32, lr=1e-3, temperature=0.5),
                             augment=TwoViewAugment(), device=torch.device("cpu"), progress=False)
    assert len(hist) == 4 and hist[-1] < hist[0]


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def _nearby_copy(model, scale):
    """A copy of ``model`` with every parameter moved by scale x N(0, 1) noise."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def _manual_queue_term(q, k, negatives, t):
    # independent InfoNCE: -log(exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.n_j/t))), mean over rows
    pos = torch.exp((q * k).sum(1) / t)
    neg = torch.exp(q @ negatives.T / t).sum(1)
    return (-torch.log(pos / (pos + neg))).mean()


def _loss_inputs():
    """A model, a different frozen key model near it, two views of 6 images, 10 queue entries and the
    four embeddings (q1, q2, k1, k2) that the losses are checked against."""
    torch.manual_seed(0)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    key_model = _nearby_copy(model, 0.05)
    v1, v2 = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    negs = F.normalize(torch.randn(10, 16), dim=1)
    return model, key_model, v1, v2, negs, (model(v1), model(v2), key_model(v1), key_model(v2))


def test_contrastive_loss_frozen_keys_is_symmetric_infonce_and_online_keys_without_queue_is_ntxent():
    from fedcl.losses import nt_xent
    from fedcl.train import contrastive_loss

    model, key_model, v1, v2, negs, (q1, q2, k1, k2) = _loss_inputs()
    got = contrastive_loss(model, key_model, v1, v2, negatives=negs, temperature=0.3, in_batch=False)
    want = 0.5 * (_manual_queue_term(q1, k2, negs, 0.3) + _manual_queue_term(q2, k1, negs, 0.3))
    torch.testing.assert_close(got, want)
    got.backward()  # the keys are detached: only the trained model gets gradients
    assert all(p.grad is None for p in key_model.parameters())
    assert any(p.grad is not None for p in model.parameters())
    # FedSimCLR: online keys, in-batch negatives, no queue
    fedsimclr = contrastive_loss(model, None, v1, v2, negatives=None, temperature=0.3, in_batch=True)
    torch.testing.assert_close(fedsimclr, nt_xent(q1, q2, temperature=0.3))


def test_fedcl_loss_is_ntxent_on_the_online_views_plus_the_frozen_key_queue_term():
    from fedcl.losses import nt_xent
    from fedcl.train import contrastive_loss

    model, key_model, v1, v2, negs, (q1, q2, k1, k2) = _loss_inputs()
    got = contrastive_loss(model, key_model, v1, v2, negatives=negs, temperature=0.3, in_batch=True)
    queue_term = 0.5 * (_manual_queue_term(q1, k2, negs, 0.3) + _manual_queue_term(q2, k1, negs, 0.3))
    torch.testing.assert_close(got, nt_xent(q1, q2, temperature=0.3) + queue_term)
    # without queue negatives (warm-up round, queue off) it is NT-Xent alone, and the key model idles
    calls = []
    key_model.register_forward_hook(lambda *a: calls.append(1))
    warm = contrastive_loss(model, key_model, v1, v2, negatives=None, temperature=0.3, in_batch=True)
    torch.testing.assert_close(warm, nt_xent(q1, q2, temperature=0.3))
    assert not calls
    got.backward()
    assert all(p.grad is None for p in key_model.parameters())


def test_queue_temperature_scales_the_queue_term_only():
    """queue_temperature divides the frozen-key queue term's logits (positive and queue entries); NT-Xent
    and the online-key loss keep ``temperature``; DP-SGD's loss, the queue term alone, takes it too."""
    from fedcl.losses import info_nce, nt_xent
    from fedcl.train import contrastive_loss

    model, key_model, v1, v2, negs, (q1, q2, k1, k2) = _loss_inputs()

    def term(t):
        return 0.5 * (_manual_queue_term(q1, k2, negs, t) + _manual_queue_term(q2, k1, negs, t))

    fedcl = contrastive_loss(model, key_model, v1, v2, negatives=negs, temperature=0.3, in_batch=True,
                             queue_temperature=0.1)
    torch.testing.assert_close(fedcl, nt_xent(q1, q2, temperature=0.3) + term(0.1))
    assert not torch.allclose(fedcl, nt_xent(q1, q2, temperature=0.3) + term(0.3))
    dp = contrastive_loss(model, key_model, v1, v2, negatives=negs, temperature=0.3, in_batch=False,
                          queue_temperature=0.1)
    torch.testing.assert_close(dp, term(0.1))
    online = contrastive_loss(model, None, v1, v2, negatives=negs, temperature=0.3, in_batch=True,
                              queue_temperature=0.1)
    want = 0.5 * (info_nce(q1, q2, negs, temperature=0.3, in_batch=True)
                  + info_nce(q2, q1, negs, temperature=0.3, in_batch=True))
    torch.testing.assert_close(online, want)
    # None: the queue term at ``temperature`` (every table before queue_temperature existed)
    torch.testing.assert_close(contrastive_loss(model, key_model, v1, v2, negatives=negs, temperature=0.3,
                                                in_batch=True, queue_temperature=None),
                               nt_xent(q1, q2, temperature=0.3) + term(0.3))


def test_local_round_trains_with_the_recipes_queue_temperature(data, monkeypatch):
    import fedcl.train as T

    seen = []
    real = T.contrastive_loss
    monkeypatch.setattr(T, "contrastive_loss",
                        lambda *a, **kw: seen.append(kw["queue_temperature"]) or real(*a, **kw))
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    _round(model, data.images, queue_temperature=0.07)
    assert seen and set(seen) == {0.07}


def test_loss_name_tells_the_settings_apart():
    from fedcl.train import loss_name

    names = {(k, b, q): loss_name(key_encoder=k, in_batch=b, queue=q)
             for k in ("global", "online") for b in (True, False) for q in (True, False)}
    assert names[("global", True, True)] == "nt-xent + frozen-key queue term"  # fedcl
    assert names[("global", True, False)] == names[("online", True, False)] == "nt-xent"  # FedSimCLR
    assert names[("global", False, True)] == "frozen-key queue term"  # fedcl under DP-SGD
    assert len({names[("global", True, True)], names[("global", False, True)], names[("online", True, True)],
                names[("online", True, False)]}) == 4


@pytest.mark.parametrize("bad,match", [
    (dict(key_encoder="ema"), "key_encoder"), (dict(optimizer="rmsprop"), "optimizer"),
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(num_push=-1), "num_push"),
    (dict(lr=0.0), "lr"), (dict(temperature=-0.1), "temperature"),
    (dict(queue_temperature=0.0), "queue_temperature"),
])
def test_round_recipe_refuses_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        RoundRecipe(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: a recipe is shared, never changed in place
        RECIPE.lr = 1.0


def test_optimizer_state_carries_adam_across_rounds(data):
    torch.manual_seed(0)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    start = canonical_state_dict(model)
    first = _round(model, data.images, lr=1e-3)
    steps = [int(s["step"]) for s in first.optimizer_state["state"].values()]
    assert steps and set(steps) == {3}  # 96 images / batch 32
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in first.optimizer_state["state"].values())

    def second(state):
        m = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
        m.load_state_dict(model.state_dict())
        return _round(m, data.images, lr=5e-4, seed=1, optimizer_state=state)

    warm, cold = second(first.optimizer_state), second(None)
    # the input is not changed
    assert set(steps) == {int(s["step"]) for s in first.optimizer_state["state"].values()}
    assert {int(s["step"]) for s in warm.optimizer_state["state"].values()} == {6}  # resumed, not restarted
    assert {int(s["step"]) for s in cold.optimizer_state["state"].values()} == {3}
    assert warm.optimizer_state["param_groups"][0]["lr"] == 5e-4  # this round's lr, not the stored one
    assert any(not torch.equal(warm.state[k], cold.state[k]) for k in warm.state)
    assert any(not torch.equal(first.state[k], start[k]) for k in start)


def test_optimizer_state_that_does_not_fit_is_refused(data):
    small = _round(build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32), data.images)
    other = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    state = copy.deepcopy(small.optimizer_state)
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="optimizer_state does not fit"):
        _round(other, data.images, optimizer_state=state)


def test_dp_round_takes_dp_steps_over_all_images_and_resumes_its_optimizer(data):
    from fedcl.privacy.dp import DPParams

    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    first = _round(model, data.images, in_batch_negatives=False, dp=dp, dp_steps=3, num_push=0)
    assert first.metrics["dp_steps"] == 3.0  # not round(1 epoch / 0.25) = 4
    assert {int(s["step"]) for s in first.optimizer_state["state"].values()} == {3}
    second = _round(model, data.images, in_batch_negatives=False, dp=dp, dp_steps=2, num_push=0,
                    optimizer_state=first.optimizer_state)
    assert {int(s["step"]) for s in second.optimizer_state["state"].values()} == {5}  # resumed, not cold
    assert _round(model, data.images, in_batch_negatives=False, dp=dp, num_push=0).metrics["dp_steps"] == 4.0
    with pytest.raises(ValueError, match="dp_steps"):
        _round(model, data.images, dp_steps=2)  # no DP
    with pytest.raises(ValueError, match="dp_steps"):
        _round(model, data.images, in_batch_negatives=False, dp=dp, dp_steps=0)

def test_dp_sgd_refuses_the_option_that_couples_examples_by_name(data):
    """in_batch_negatives is the one option left that couples examples (the others were cut: research/)."""
    from fedcl.privacy.dp import DPParams

    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    for key_encoder in ("global", "online"):
        with pytest.raises(ValueError, match="DP-SGD cannot be used with in_batch_negatives .*switch "
                                             "in_batch_negatives off"):
            _round(model, data.images, dp=dp, in_batch_negatives=True, key_encoder=key_encoder)


def _poisson_batches(data, monkeypatch, **kw) -> list[torch.Tensor]:
    import fedcl.privacy.sampling as sampling
    from fedcl.privacy.dp import DPParams

    batches: list[torch.Tensor] = []
    real = sampling.poisson_sample
    monkeypatch.setattr(sampling, "poisson_sample", lambda **a: batches.append(real(**a)) or batches[-1])
    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
    model = build_model(in_channels=1, width=4, proj_dim=16, proj_hidden=32)
    _round(model, data.images[:24], dp=dp, in_batch_negatives=False, num_push=0, seed=5, **kw)
    monkeypatch.setattr(sampling, "poisson_sample", real)
    return batches


def test_dp_batches_are_secret_unless_the_insecure_switch_says_otherwise(data, monkeypatch, caplog):
    first, second = _poisson_batches(data, monkeypatch), _poisson_batches(data, monkeypatch)
    assert len(first) == len(second) == 4
    # the same seed does not replay them
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=False))
    caplog.set_level("WARNING", logger="fedcl.privacy")
    replay = [_poisson_batches(data, monkeypatch, dp_generator=INSECURE_REPRODUCIBLE) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*replay, strict=False))
    warnings = [r.getMessage() for r in caplog.records if "insecure_reproducible_dp" in r.getMessage()]
    assert len(warnings) == 2 and all("NOT differentially private" in w for w in warnings)  # at every use
