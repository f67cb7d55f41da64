"""A site's patient ids: aligned with its images, and carried into a patient-level DP round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from fedcl.client.app import SiteError, SiteSettings, load_site_images, train_handler
from fedcl.client.privacy import plan_round, record_round, release
from fedcl.client.site_data import load_site_data, load_site_groups
from fedcl.models import build_model, canonical_state_dict
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.wire.protocol import RoundConfig

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

N = 60


def _rc(privacy=None, *, round: int = 1, num_rounds: int = 3, **train) -> RoundConfig:
    train = dict(epochs=1, batch_size=12, lr=1e-3, momentum=0.9, weight_decay=0.0, temperature=0.2,
                 in_batch_negatives=False, key_encoder="global", num_push=0, seed=0, threads=1) | train
    return RoundConfig(
        round=round, num_rounds=num_rounds, train=train, privacy=privacy or {},
        model={"arch": "cnn", "in_channels": 1, "width": 4, "proj_dim": 8, "proj_hidden": 16},
        queue=dict(enabled=False, num_negatives=0, max_staleness=1, warmup_rounds=0, fresh_push=False),
        data={"partition": "iid", "seed": 3, "max_images_per_site": None})


def _npz(path, *, patients=True):
    """Image i is filled with the value i, so a loaded image tells which stored image it is."""
    images = np.repeat(np.arange(N, dtype=np.uint8)[:, None, None], 28, 1).repeat(28, 2)  # (N, 28, 28)
    ids = np.array([f"P{(7 * i) % 11:02d}" for i in range(N)])  # 11 patients, ids as strings
    arrays = {"train_images": images, "train_labels": np.arange(N) % 3}
    if patients:
        arrays["train_patients"] = ids
    np.savez(path, **arrays)
    return path, np.unique(ids, return_inverse=True)[1]


@pytest.mark.parametrize("how", [{}, {"max_images": 25}, {"partition_id": 1, "num_partitions": 3}])
def test_groups_stay_aligned_with_the_images_the_site_trains_on(tmp_path, how):
    path, expected = _npz(tmp_path / "site.npz")
    site = SiteSettings(site_id="h", data_path=path, **how)
    images = load_site_images(site, _rc(), None)
    data = load_site_data(site, _rc(), None)
    assert torch.equal(data.images, images)  # the same choices as fedcl.client.app.load_site_images
    groups = load_site_groups(site, _rc(), None)
    stored = images[:, 0, 0, 0].long()  # (n,) index of each image in the file
    assert torch.equal(groups, torch.from_numpy(expected)[stored])
    plain, _ = _npz(tmp_path / "plain.npz", patients=False)
    assert load_site_groups(SiteSettings(site_id="h", data_path=plain), _rc(), None) is None


@pytest.fixture
def task_identity():
    """Flower's Message needs a task identity (what a SuperNode sets)."""
    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


def _train_message(rc: RoundConfig) -> Message:
    torch.manual_seed(0)
    weights = ArrayRecord(canonical_state_dict(build_model(**rc.model.model_dump())))
    msg = Message(content=RecordDict({"arrays": weights, "config": rc.to_config_record()}),
                  message_type="train", dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def test_a_patient_level_round_through_the_client_app_spends_epsilon_per_patient(tmp_path, task_identity):
    path, expected = _npz(tmp_path / "site.npz")
    privacy = {"dpsgd": True, "unit": "patient", "noise_multiplier": 1.2, "release": "public"}
    rc = _rc(privacy)
    node = {"site-id": "h", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    reply = train_handler(_train_message(rc),
                          Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}),
                          None)
    steps = int(reply.content.metric_records["metrics"]["steps"])
    num_patients = len(np.unique(expected))
    q = (rc.train.batch_size * num_patients / N) / num_patients  # expected patients per batch / patients
    assert steps == round(rc.train.epochs / q)
    ledger = PrivacyLedger.load(tmp_path / "state" / "ledger-h.json")
    acct = RDPAccountant()
    acct.history = [(1.2, q, steps)]
    assert ledger.privacy_unit == "group"
    assert ledger.epsilon() == pytest.approx(acct.get_epsilon(delta=1e-5), rel=1e-9)


def test_patient_unit_on_data_without_patient_ids_is_a_clear_error(tmp_path, task_identity):
    path, _ = _npz(tmp_path / "plain.npz", patients=False)
    rc = _rc({"dpsgd": True, "unit": "patient", "noise_multiplier": 1.0, "release": "public"})
    node = {"site-id": "h", "data-path": str(path), "state-dir": str(tmp_path / "state")}  # DP needs one
    with pytest.raises(ValueError, match="no patient id.*train_patients"):
        train_handler(_train_message(rc), Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                                                  run_config={}), None)


def test_patient_unit_refuses_per_image_embedding_releases(tmp_path):
    groups = torch.arange(40) // 4
    for mode in ("gaussian", "prototypes"):
        rp = plan_round(privacy={"unit": "patient", "release": mode}, site_id="h", state_dir=tmp_path,
                        round=1, num_rounds=2, epochs=1, batch_size=8, num_examples=40,
                        in_batch_negatives=False, groups=groups)
        emb = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
        out = release(rp, emb, round=1, prototypes=None, generator=torch.Generator().manual_seed(0))
        assert out.shape[0] == 0 and "patient" in rp.push_refused
        record_round(rp, round=1, dp_steps=0, pushed=int(out.shape[0]))
        assert PrivacyLedger.load(tmp_path / "ledger-h.json").channels()["embeddings"]["events"] == 0


def test_a_folder_site_names_its_patients_in_file_names(tmp_path):
    """fedcl-client --patient-regex: the folder loader reads each file's patient id from its name,
    and the ids stay aligned with the images through max_images."""
    from PIL import Image

    folder = tmp_path / "site"
    folder.mkdir()
    for i in range(N):  # image i holds the value i; patient P<i mod 7>
        Image.fromarray(np.full((28, 28), i, np.uint8)).save(folder / f"P{i % 7}_scan{i:03d}.png")
    site = SiteSettings(site_id="h", data_path=folder, data_format="folder", max_images=25,
                        patient_regex=r"^(P\d+)_")
    data = load_site_data(site, _rc(), None)
    stored = data.images[:, 0, 0, 0].long()
    assert data.images.shape[0] == 25
    assert torch.equal(data.groups, stored % 7)  # P0..P6 sort as 0..6
    bad = SiteSettings(site_id="h2", data_path=folder, data_format="folder", patient_regex=r"^Q")
    with pytest.raises(SiteError, match="patient-id pattern"):
        load_site_data(bad, _rc(), None)


def test_shorter_rounds_train_disjoint_shares_that_cover_the_site_each_epoch(
    tmp_path, task_identity, monkeypatch
):
    """train.rounds_per_epoch = 3: rounds 1-3 train three disjoint thirds of the site's 60 images,
    rounds 4-6 a new permutation's thirds; the reply's num-examples is the share (FedAvg's weight)."""
    import fedcl.train

    path, _ = _npz(tmp_path / "site.npz", patients=False)
    node = {"site-id": "h", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    trained, examples = [], []
    real = fedcl.train.local_round

    def spy(model, images, *args, **kw):
        trained.append(sorted(images[:, 0, 0, 0].tolist()))  # image i is filled with the value i
        return real(model, images, *args, **kw)

    monkeypatch.setattr(fedcl.train, "local_round", spy)
    for rnd in range(1, 7):
        rc = _rc(round=rnd, num_rounds=6, rounds_per_epoch=3, in_batch_negatives=True)
        reply = train_handler(
            _train_message(rc),
            Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}), None)
        examples.append(int(reply.content.metric_records["metrics"]["num-examples"]))
    assert examples == [20] * 6
    for epoch in (trained[:3], trained[3:]):
        assert sorted(i for share in epoch for i in share) == list(range(N))  # each image once per epoch
    assert trained[:3] != trained[3:]  # a new permutation each epoch
    again = []
    monkeypatch.setattr(fedcl.train, "local_round", lambda model, images, *args, **kw: again.append(
        sorted(images[:, 0, 0, 0].tolist())) or real(model, images, *args, **kw))
    rc = _rc(round=2, num_rounds=6, rounds_per_epoch=3, in_batch_negatives=True)
    train_handler(_train_message(rc), Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                                              run_config={}), None)
    assert again == [trained[1]]  # a fresh process recomputes the same share: nothing is kept in memory


def test_a_site_with_fewer_images_than_rounds_per_epoch_is_refused_by_name_unless_dp(tmp_path, task_identity):
    """60 images and rounds_per_epoch = 61: some share is empty, and the round says why; under
    DP-SGD a round samples the whole site, so the same site trains."""
    path, _ = _npz(tmp_path / "site.npz", patients=False)
    node = {"site-id": "h", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    rc = _rc(round=61, num_rounds=61, rounds_per_epoch=61, in_batch_negatives=True)
    with pytest.raises(SiteError, match=r"site h has fewer images than rounds_per_epoch \(61\)"):
        train_handler(_train_message(rc), context, None)
    rc = _rc({"dpsgd": True, "noise_multiplier": 1.0, "release": "public"}, round=61, num_rounds=61,
             rounds_per_epoch=61)
    reply = train_handler(_train_message(rc), context, None)
    assert reply.content.metric_records["metrics"]["num-examples"] == N


def test_a_dp_round_with_shorter_rounds_samples_the_whole_site_for_fewer_steps(tmp_path, task_identity,
                                                                                monkeypatch):
    """train.rounds_per_epoch = 2 under DP-SGD: each round Poisson-samples all 60 images at q = 12/60
    for round_half(1 / (q x 2)) = round_half(2.5) = 3 (not 5) steps, the ledger holds every step, and
    ε after three rounds is the accountant's figure for 3 x 3 steps at q; round 2 resumes round 1's
    Adam state."""
    import fedcl.train

    path, _ = _npz(tmp_path / "site.npz", patients=False)
    node = {"site-id": "h", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    seen = []
    real = fedcl.train.local_round

    def spy(model, images, *args, **kw):
        seen.append((int(images.shape[0]), kw["dp_steps"], kw["optimizer_state"] is not None))
        return real(model, images, *args, **kw)

    monkeypatch.setattr(fedcl.train, "local_round", spy)
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    for rnd in (1, 2, 3):
        rc = _rc({"dpsgd": True, "noise_multiplier": 1.0, "release": "public"}, round=rnd, rounds_per_epoch=2,
                 persist_optimizer=True)
        reply = train_handler(_train_message(rc), context, None)
        assert reply.content.metric_records["metrics"]["steps"] == 3.0
    assert seen == [(N, 3, False), (N, 3, True), (N, 3, True)]
    q = 12 / N
    acct = RDPAccountant()
    acct.history = [(1.0, q, 9)]
    ledger = PrivacyLedger.load(tmp_path / "state" / "ledger-h.json")
    assert ledger.epsilon() == pytest.approx(acct.get_epsilon(delta=1e-5), rel=1e-9)


def test_persist_optimizer_keeps_the_sites_adam_state_in_its_flower_context(
    tmp_path, task_identity, monkeypatch
):
    """train.persist_optimizer: round 2 resumes round 1's Adam state from Context.state (the client
    process is new for every message, so nothing else could carry it); without it every round is cold."""
    import fedcl.train

    path, _ = _npz(tmp_path / "site.npz", patients=False)
    node = {"site-id": "h", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    given = []
    real = fedcl.train.local_round

    def spy(model, images, *args, **kw):
        given.append(kw["optimizer_state"])
        return real(model, images, *args, **kw)

    monkeypatch.setattr(fedcl.train, "local_round", spy)
    resumed = []
    for persist in (True, False):
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        for rnd in (1, 2):
            rc = _rc(round=rnd, in_batch_negatives=True, persist_optimizer=persist)
            reply = train_handler(_train_message(rc), context, None)
            resumed.append(reply.content.metric_records["metrics"]["optimizer-resumed"])
    assert resumed == [0.0, 1.0, 0.0, 0.0]  # the reply says whether the site resumed
    (first, second), (cold1, cold2) = given[:2], given[2:]
    assert first is None and cold1 is None and cold2 is None
    steps = N // 12  # 60 images, batch 12: 5 Adam steps in round 1
    assert {int(s["step"]) for s in second["state"].values()} == {steps}
    assert all(s["exp_avg"].abs().sum() > 0 for s in second["state"].values())
    assert second["param_groups"][0]["params"] == list(range(len(second["state"])))


def test_the_round_configs_training_settings_reach_local_round_as_one_recipe(
    tmp_path, task_identity, monkeypatch
):
    """Every training field of the round config arrives in local_round's RoundRecipe; num_push is 0
    when nothing is pushed after training (no queue here)."""
    import fedcl.train

    path, _ = _npz(tmp_path / "site.npz", patients=False)
    node = {"site-id": "h", "data-path": str(path), "state-dir": str(tmp_path / "state")}
    given = []
    real = fedcl.train.local_round

    def spy(model, images, negatives, recipe, **kw):
        given.append(recipe)
        return real(model, images, negatives, recipe, **kw)

    monkeypatch.setattr(fedcl.train, "local_round", spy)
    rc = _rc(round=1, in_batch_negatives=True, key_encoder="online", epochs=2, batch_size=20, lr=5e-4,
             temperature=0.3, optimizer="sgd", momentum=0.8, weight_decay=1e-5, num_push=7)
    train_handler(_train_message(rc), Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                                              run_config={}), None)
    assert given == [
        fedcl.train.RoundRecipe(epochs=2, batch_size=20, lr=5e-4, temperature=0.3, key_encoder="online",
                                in_batch_negatives=True, num_push=0, optimizer="sgd", momentum=0.8,
                                weight_decay=1e-5)
    ]
