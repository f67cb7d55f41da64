import copy

import pytest
import torch
import torch.nn.functional as F

from fedcl.augment import TwoViewAugment
from fedcl.data import make_synthetic
from fedcl.models import build_model, canonical_state_dict
from fedcl.train import encode, local_round, resolve_device, train_centralized


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_images=96, num_classes=4, seed=0)


def _round(model, images, **kw):
    args = dict(negatives=F.normalize(torch.randn(64, 16), dim=1), epochs=1, batch_size=32, lr=1e-3,
                temperature=0.2, in_batch_negatives=True, key_encoder="global", augment=TwoViewAugment(),
                num_push=40, device="cpu", seed=0)
    args.update(kw)
    return local_round(model, images, **args)


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
    hist = train_centralized(model, data.images, epochs=4, batch_size=32, lr=1e-3, temperature=0.5,
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


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_online_negatives_loss_is_ntxent_plus_weighted_queue_term(weight):
    from fedcl.losses import nt_xent
    from fedcl.train import contrastive_loss

    torch.manual_seed(0)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    key_model = _nearby_copy(model, 0.05)  # a different frozen key model
    v1, v2 = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    negs = F.normalize(torch.randn(10, 16), dim=1)
    got = contrastive_loss(model, key_model, v1, v2, negatives=negs, temperature=0.3, in_batch=True,
                           online_negatives=True, queue_weight=weight)
    q1, q2, k1, k2 = model(v1), model(v2), key_model(v1), key_model(v2)
    want = nt_xent(q1, q2, temperature=0.3) + weight * 0.5 * (
        _manual_queue_term(q1, k2, negs, 0.3) + _manual_queue_term(q2, k1, negs, 0.3))
    torch.testing.assert_close(got, want)
    # without queue negatives (warm-up rounds) it is plain SimCLR
    none = contrastive_loss(model, key_model, v1, v2, negatives=None, temperature=0.3, in_batch=True,
                            online_negatives=True, queue_weight=weight)
    torch.testing.assert_close(none, nt_xent(q1, q2, temperature=0.3))


def test_online_negatives_round_and_refusals(data):
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    res = _round(model, data.images, online_negatives=True, queue_weight=0.5)
    assert res.metrics["negatives_used"] == 64 and torch.isfinite(torch.tensor(res.metrics["loss"]))
    with pytest.raises(ValueError, match="online_negatives"):
        _round(model, data.images, in_batch_negatives=False, online_negatives=True, dp=object())
    with pytest.raises(ValueError, match="queue_weight"):
        _round(model, data.images, queue_weight=-1.0)


def test_own_negatives_leave_out_the_batch_own_images(data, monkeypatch):
    """Each batch gets the queue plus the round model's embeddings of the site's other images:
    never an embedding of an image in the batch itself (that would be its own positive)."""
    import fedcl.train as train_mod

    images = data.images.clone()
    images[:, 0, 0, 0] = torch.arange(images.shape[0], dtype=torch.uint8)  # pixel (0, 0) names the image

    def fake_encode(model, imgs, **_):  # row = (image index, 1, 0, ...): which images were encoded
        rows = torch.zeros(imgs.shape[0], 16)
        rows[:, 0], rows[:, 1] = imgs[:, 0, 0, 0].float(), 1.0
        return rows

    seen: list[tuple[set, torch.Tensor]] = []
    real_to_float, real_loss = train_mod._to_float, train_mod.contrastive_loss
    batch: dict = {}
    monkeypatch.setattr(train_mod, "encode", fake_encode)
    monkeypatch.setattr(train_mod, "_to_float", lambda x, d: batch.update(ids=set(x[:, 0, 0, 0].tolist())) or real_to_float(x, d))
    monkeypatch.setattr(train_mod, "contrastive_loss",
                        lambda *a, negatives, **k: seen.append((batch["ids"], negatives)) or real_loss(*a, negatives=negatives, **k))
    queue = F.normalize(torch.randn(64, 16), dim=1)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    res = _round(model, images, negatives=queue, own_negatives=96, num_push=0)
    assert res.metrics["own_negatives"] == 96 and res.metrics["negatives_used"] == 64
    assert len(seen) == 3
    for ids, negs in seen:
        assert torch.equal(negs[:64], queue)  # the queue first, unchanged
        own = set(negs[64:, 0].long().tolist())
        assert len(own) == negs.shape[0] - 64 == 96 - len(ids)  # every other image, once
        assert not own & ids and own | ids == set(range(96))


def test_own_negatives_refused_under_dp(data):
    model = build_model(in_channels=1, width=8)
    with pytest.raises(ValueError, match="own_negatives"):
        _round(model, data.images, dp=object(), in_batch_negatives=False, own_negatives=8)


def test_drift_compensation_moves_the_negatives_by_the_batch_drift():
    """negatives' = normalize(n + mean(trained views) - mean(drift_model views)), with gradients."""
    from fedcl.losses import nt_xent
    from fedcl.train import contrastive_loss

    torch.manual_seed(0)
    frozen = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    model = _nearby_copy(frozen, 0.1)  # the trained model, drifted from the frozen one
    v1, v2 = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    negs = F.normalize(torch.randn(10, 16), dim=1)
    got = contrastive_loss(model, None, v1, v2, negatives=negs, temperature=0.3, in_batch=True,
                           online_negatives=True, drift_model=frozen)
    q1, q2 = model(v1), model(v2)
    drift = torch.cat([q1, q2]).mean(0) - torch.cat([frozen(v1), frozen(v2)]).mean(0).detach()
    moved = F.normalize(negs + drift, dim=1)
    want = nt_xent(q1, q2, temperature=0.3) + 0.5 * (
        _manual_queue_term(q1, q2, moved, 0.3) + _manual_queue_term(q2, q1, moved, 0.3))
    torch.testing.assert_close(got, want)
    plain = contrastive_loss(model, None, v1, v2, negatives=negs, temperature=0.3, in_batch=True,
                             online_negatives=True)
    assert not torch.allclose(got, plain)
    # the drift model equal to the trained model: nothing moves
    same = contrastive_loss(frozen, None, v1, v2, negatives=negs, temperature=0.3, in_batch=True,
                            online_negatives=True, drift_model=frozen)
    torch.testing.assert_close(same, contrastive_loss(frozen, None, v1, v2, negatives=negs, temperature=0.3,
                                                      in_batch=True, online_negatives=True))


def _manual_relation_kl(q, target, anchors, t):
    # sum_k p_k (log p_k - log q_k) per row, mean over rows; p, q = softmax of similarities / t
    p = torch.softmax(target @ anchors.T / t, dim=1)
    r = torch.softmax(q @ anchors.T / t, dim=1)
    return (p * (p.log() - r.log())).sum(1).mean()


def test_relational_term_pulls_each_view_to_the_round_models_profile_over_the_queue():
    """loss = base + w * 0.5 * (KL(p(frozen(v2)) || p(q1)) + KL(p(frozen(v1)) || p(q2))) over the queue."""
    from fedcl.losses import relation_kl
    from fedcl.train import contrastive_loss

    torch.manual_seed(0)
    frozen = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    model = _nearby_copy(frozen, 0.1)
    v1, v2 = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    negs = F.normalize(torch.randn(10, 16), dim=1)
    kwargs = dict(negatives=negs, temperature=0.3, in_batch=True, online_negatives=True, queue_weight=0.0)
    base = contrastive_loss(model, None, v1, v2, **kwargs)
    got = contrastive_loss(model, None, v1, v2, relation_model=frozen, relation_weight=2.0,
                           relation_temperature=0.2, **kwargs)
    q1, q2 = model(v1), model(v2)
    r1, r2 = frozen(v1).detach(), frozen(v2).detach()
    want = base + 2.0 * 0.5 * (_manual_relation_kl(q1, r2, negs, 0.2) + _manual_relation_kl(q2, r1, negs, 0.2))
    torch.testing.assert_close(got, want)
    assert float((got - base).detach()) > 0
    # a profile equal to its target costs nothing; the teacher gets no gradient
    torch.testing.assert_close(relation_kl(r1, r1, negs, temperature=0.2), torch.tensor(0.0))
    got.backward()
    assert all(p.grad is None for p in frozen.parameters())
    # no queue entries (the warm-up round): the term is off, the loss is the base loss
    empty = torch.zeros(0, 16)
    torch.testing.assert_close(
        contrastive_loss(model, None, v1, v2, relation_model=frozen, relation_weight=2.0,
                         **{**kwargs, "negatives": empty}),
        contrastive_loss(model, None, v1, v2, **{**kwargs, "negatives": empty}))


def test_drift_compensation_needs_online_keys(data):
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    for keys in ("global", "ema"):
        with pytest.raises(ValueError, match="drift_compensation needs key_encoder='online'"):
            _round(model, data.images, key_encoder=keys, drift_compensation=True)


def test_local_round_refuses_a_bad_relational_setting(data):
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    with pytest.raises(ValueError, match="relation_weight"):
        _round(model, data.images, relation_weight=-1.0)
    with pytest.raises(ValueError, match="relation_temperature"):
        _round(model, data.images, relation_weight=1.0, relation_temperature=0.0)


def test_ema_key_encoder(data):
    from fedcl.train import _ema_update

    a = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    b = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    want = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    _ema_update(a, b, momentum=0.9)
    for pa, w in zip(a.parameters(), want):
        torch.testing.assert_close(pa, w)
    torch.manual_seed(0)
    init = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    frozen = _round(copy.deepcopy(init), data.images, key_encoder="global", num_push=0)
    ema = _round(copy.deepcopy(init), data.images, key_encoder="ema", key_momentum=0.5, num_push=0)
    # the first step is the same (keys = round model); later keys differ, so the weights do
    assert any(not torch.equal(frozen.state[k], ema.state[k]) for k in frozen.state)
    with pytest.raises(ValueError, match="key_momentum"):
        _round(copy.deepcopy(init), data.images, key_encoder="ema", key_momentum=1.0)
    with pytest.raises(ValueError, match="key_encoder"):
        _round(copy.deepcopy(init), data.images, key_encoder="momentum")


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
    assert set(steps) == {int(s["step"]) for s in first.optimizer_state["state"].values()}  # the input is not changed
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


def test_hard_negatives_join_the_denominator_and_are_validated(data):
    torch.manual_seed(0)
    base = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    plain = _round(copy.deepcopy(base), data.images)
    hard = _round(copy.deepcopy(base), data.images, hard_negatives=8)
    assert hard.metrics["loss"] > plain.metrics["loss"]  # more (and harder) terms in each denominator
    assert any(not torch.equal(hard.state[k], plain.state[k]) for k in plain.state)
    no_queue = _round(copy.deepcopy(base), data.images, negatives=None, hard_negatives=8)
    again = _round(copy.deepcopy(base), data.images, negatives=None)
    assert no_queue.metrics["loss"] == pytest.approx(again.metrics["loss"])  # nothing to mix without a queue
    with pytest.raises(ValueError, match="hard_negatives must be >= 0"):
        _round(copy.deepcopy(base), data.images, hard_negatives=-1)
    with pytest.raises(ValueError, match="online_negatives=False"):
        _round(copy.deepcopy(base), data.images, hard_negatives=4, online_negatives=True, key_encoder="online")


def test_predictor_trains_on_queries_and_pushes_stay_projections(data):
    torch.manual_seed(0)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32, pred_hidden=24)
    round_model = copy.deepcopy(model)
    before = canonical_state_dict(model)
    res = _round(model, data.images, num_push=96, augment=TwoViewAugment(crop_scale=(1.0, 1.0), flip=False,
                 brightness=0.0, contrast=0.0, blur_prob=0.0, noise_std=0.0))
    assert any(not torch.equal(res.state[k], before[k]) for k in before if k.startswith("predictor."))
    want = encode(round_model, data.images, device=torch.device("cpu"))  # projections, no predictor
    assert (res.embeddings @ want.T).max(dim=1).values.min() > 0.99
    for bad in (dict(key_encoder="online"), dict(online_negatives=True), dict(relation_weight=1.0)):
        with pytest.raises(ValueError, match="predictor"):
            _round(copy.deepcopy(round_model), data.images, **bad)


def test_queue_temperature_divides_the_queue_logits_only(data, monkeypatch):
    """queue_temperature: q . n / 0.05 for the queue's columns, q . k / 0.2 for the positive and in-batch ones."""
    import fedcl.train
    from fedcl.losses import info_nce_logits

    negatives = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    seen = []
    real = fedcl.train.info_nce

    def spy(query, positive, negs=None, **kw):
        seen.append((query.detach(), positive.detach(), negs, info_nce_logits(query, positive, negs, **{
            k: v for k, v in kw.items() if k != "reduction"}).detach()))
        return real(query, positive, negs, **kw)

    monkeypatch.setattr(fedcl.train, "info_nce", spy)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    _round(model, data.images, negatives=negatives, queue_temperature=0.05)
    assert seen
    for q, k, negs, logits in seen:
        assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.2, atol=1e-5)
        assert torch.allclose(logits[:, 1:65], q @ negatives.T / 0.05, atol=1e-4)
        assert logits.shape[1] == 1 + 64 + q.shape[0] - 1  # the in-batch columns follow, at 0.2:
        off = ~torch.eye(q.shape[0], dtype=torch.bool)
        assert torch.allclose(logits[:, 65:], (q @ k.T)[off].view(q.shape[0], -1) / 0.2, atol=1e-5)
    for bad in ({"queue_temperature": 0.0}, {"queue_temperature": 0.1, "hard_negatives": 4}):
        with pytest.raises(ValueError, match="queue_temperature"):
            _round(copy.deepcopy(model), data.images, **bad)


COUPLING_OPTIONS = [
    ("in_batch_negatives", dict(in_batch_negatives=True)),
    ("online_negatives", dict(online_negatives=True, key_encoder="online")),
    ("own_negatives", dict(own_negatives=4)),
    ("drift_compensation", dict(drift_compensation=True, key_encoder="online")),
]


@pytest.mark.parametrize("name, options", COUPLING_OPTIONS)
def test_dp_sgd_refuses_every_option_that_couples_examples_by_name(data, name, options):
    from fedcl.privacy.dp import DPParams

    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
    model = build_model(in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    with pytest.raises(ValueError, match=f"DP-SGD cannot be used with {name} .*switch {name} off"):
        _round(model, data.images, dp=dp, **{"in_batch_negatives": False, **options})


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
    assert any(not torch.equal(a, b) for a, b in zip(first, second))  # the same seed does not replay them
    caplog.set_level("WARNING", logger="fedcl.privacy")
    replay = [_poisson_batches(data, monkeypatch, insecure_reproducible_dp=True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*replay))
    warnings = [r.getMessage() for r in caplog.records if "insecure_reproducible_dp" in r.getMessage()]
    assert len(warnings) == 2 and all("NOT differentially private" in w for w in warnings)  # at every use
