"""Site-side privacy wiring: DP parameters, releases, budget stops, ledger persistence."""

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

from fedcl.client.privacy import plan_round, record_round, release, round_metrics
from fedcl.privacy.ledger import PrivacyLedger


def _plan(tmp_path, rnd, **privacy):
    return plan_round(privacy=privacy, site_id="site-a", state_dir=tmp_path, round=rnd, num_rounds=4,
                      epochs=1, batch_size=32, num_examples=320, in_batch_negatives=False)


def _emb(n=64, d=16, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_dp_rounds_accumulate_in_the_persisted_ledger(tmp_path):
    sigma = 1.1
    for rnd in (1, 2, 3):
        rp = _plan(tmp_path, rnd, dpsgd=True, noise_multiplier=sigma, release="public")
        assert rp.dp.sample_rate == pytest.approx(0.1) and rp.steps_planned == 10
        record_round(rp, round=rnd, dp_steps=10, pushed=0)
    ledger = PrivacyLedger.load(tmp_path / "ledger-site-a.json")
    acc = RDPAccountant()
    acc.history = [(sigma, 0.1, 30)]
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert round_metrics(rp)["epsilon"] == pytest.approx(ledger.epsilon())
    raw = _plan(tmp_path, 4, dpsgd=True, noise_multiplier=sigma, release="raw")
    assert round_metrics(raw)["epsilon"] == -1.0  # raw embeddings: no DP bound, never a number
    assert round_metrics(raw)["epsilon-accounted"] == pytest.approx(ledger.epsilon())


def test_noise_from_target_epsilon_spends_the_target_over_the_planned_run(tmp_path):
    rp = _plan(tmp_path, 1, dpsgd=True, target_epsilon=8.0, release="public")
    for rnd in range(1, 5):
        rp = _plan(tmp_path, rnd, dpsgd=True, target_epsilon=8.0, release="public")
        record_round(rp, round=rnd, dp_steps=rp.steps_planned, pushed=0)
    eps = PrivacyLedger.load(tmp_path / "ledger-site-a.json").epsilon()
    assert 7.5 < eps <= 8.0 + 1e-6


def test_budget_stop_refuses_training_and_pushing(tmp_path):
    refused_at = None
    for rnd in range(1, 10):
        rp = _plan(tmp_path, rnd, dpsgd=True, noise_multiplier=1.2, epsilon_budget=3.0, release="gaussian",
                   release_noise_multiplier=2.0, release_sample_rate=0.1)
        if rp.refused:
            refused_at = rnd
            out = release(rp, _emb(), round=rnd, prototypes=None, generator=None)
            # whether or not the release alone fits, the ledger never passes the budget
            record_round(rp, round=rnd, dp_steps=0, pushed=int(out.shape[0]))
            break
        out = release(rp, _emb(), round=rnd, prototypes=None, generator=torch.Generator().manual_seed(rnd))
        record_round(rp, round=rnd, dp_steps=rp.steps_planned, pushed=int(out.shape[0]))
    # independently: the first round r whose r rounds of (DP-SGD + release) pass the budget
    expected = None
    for r in range(1, 10):
        acc = RDPAccountant()
        acc.history = [(1.2, 0.1, 10 * r), (2.0, 0.1, r)]
        if acc.get_epsilon(delta=1e-5) > 3.0:
            expected = r
            break
    assert refused_at == expected == 3
    ledger = PrivacyLedger.load(tmp_path / "ledger-site-a.json")
    assert ledger.epsilon() <= 3.0
    assert max(e.round for e in ledger.events if e.channel == "model_updates") == expected - 1
    assert round_metrics(rp)["budget-exhausted"] == 1.0


def test_release_modes(tmp_path):
    emb = _emb()
    raw = _plan(tmp_path, 1, release="raw")
    assert torch.equal(release(raw, emb, round=1, prototypes=None, generator=None), emb)
    pub = _plan(tmp_path, 1, release="public")
    assert release(pub, emb, round=1, prototypes=None, generator=None).shape[0] == 0
    g = _plan(tmp_path, 1, release="gaussian", release_noise_multiplier=1.0, release_sample_rate=1.0)
    out = release(g, emb, round=1, prototypes=None, generator=torch.Generator().manual_seed(0))
    assert out.shape == emb.shape and torch.allclose(out.norm(dim=1), torch.ones(64), atol=1e-5)
    assert (out * emb).sum(1).mean() < 0.9  # noisy
    p = _plan(tmp_path, 1, release="prototypes", num_prototypes=8, release_noise_multiplier=0.5,
              release_sample_rate=1.0)
    out = release(p, emb, round=1, prototypes=None, generator=torch.Generator().manual_seed(0))
    assert 0 < out.shape[0] <= 8 and torch.allclose(out.norm(dim=1), torch.ones(out.shape[0]), atol=1e-5)


def test_raw_release_is_recorded_as_not_protected(tmp_path):
    rp = _plan(tmp_path, 1, release="raw")
    record_round(rp, round=1, dp_steps=0, pushed=64)
    ch = PrivacyLedger.load(tmp_path / "ledger-site-a.json").channels()
    assert ch["embeddings"]["dp_protected"] is False and ch["embeddings"]["epsilon"] is None


def test_dp_with_in_batch_negatives_is_refused(tmp_path):
    with pytest.raises(ValueError, match="in_batch_negatives"):
        plan_round(privacy={"dpsgd": True}, site_id="s", state_dir=tmp_path, round=1, num_rounds=2, epochs=1,
                   batch_size=8, num_examples=80, in_batch_negatives=True)


def test_release_phase_enters_the_release_and_training_separately(tmp_path):
    from fedcl.client.privacy import release_prototype_sums

    kw = dict(dpsgd=True, noise_multiplier=1.2, release="prototypes", release_noise_multiplier=2.0,
              release_sample_rate=0.5, num_prototypes=4)
    rp = _plan(tmp_path, 1, **kw)
    protos = _emb(4, 16, seed=3)
    rel = release_prototype_sums(rp, _emb(), prototypes=protos, round=1,
                                 generator=torch.Generator().manual_seed(0))
    assert rel.sums.shape == (4, 16) and rel.counts.shape == (4,)
    record_round(rp, round=1, dp_steps=0, pushed=4, trained=False)  # the release phase
    ledger = PrivacyLedger.load(tmp_path / "ledger-site-a.json")
    assert [(e.channel, e.round) for e in ledger.events] == [("embeddings", 1)]
    rp = _plan(tmp_path, 1, **kw)  # the training message of the same round, a new process
    record_round(rp, round=1, dp_steps=rp.steps_planned, pushed=0)
    ledger = PrivacyLedger.load(tmp_path / "ledger-site-a.json")
    assert [(e.channel, e.round) for e in ledger.events] == [("embeddings", 1), ("model_updates", 1)]
    acc = RDPAccountant()
    acc.history = [(2.0, 0.5, 1), (1.2, 0.1, 10)]  # one release, then 10 DP-SGD steps
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_a_prototype_release_past_the_budget_is_refused(tmp_path):
    from fedcl.client.privacy import release_prototype_sums

    rp = _plan(tmp_path, 1, dpsgd=True, noise_multiplier=0.6, epsilon_budget=0.5, release="prototypes",
               release_noise_multiplier=0.5, release_sample_rate=1.0, num_prototypes=4)
    assert release_prototype_sums(rp, _emb(), prototypes=_emb(4, 16), round=1, generator=None) is None
    assert "would exceed" in rp.push_refused and round_metrics(rp)["budget-exhausted"] == 1.0
    with pytest.raises(ValueError, match=r"prototypes must be \(P >= 1, 16\)"):
        release_prototype_sums(_plan(tmp_path, 1, release="prototypes"), _emb(), prototypes=_emb(4, 8),
                               round=1, generator=None)


def test_the_report_of_a_site_that_never_trained_says_so(tmp_path, capsys):
    """A site whose rounds all failed before training (e.g. its queue token was refused) keeps a ledger
    with no event: ``fedcl privacy`` on its state folder says it never trained, not that it trained
    without DP-SGD."""
    from fedcl.cli import main

    rp = _plan(tmp_path, 1, dpsgd=False, release="raw")
    record_round(rp, round=1, dp_steps=0, pushed=0, trained=False)  # the release phase, then the round failed
    assert PrivacyLedger.load(tmp_path / "ledger-site-a.json").events == []
    code = main(["privacy", str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "Model updates" in output and "never trained" in output
    assert "trained without DP-SGD" not in output
    assert "Total: this site never trained and released no embedding" in output
