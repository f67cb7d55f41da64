import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedcl.privacy.ledger import BudgetExceeded, PrivacyLedger

DELTA = 1e-5


def _rdp(history):
    acct = RDPAccountant()
    acct.history = list(history)
    return acct.get_epsilon(delta=DELTA)


def _ledger(budget=None, accountant="rdp"):
    return PrivacyLedger(site_id="site-a", delta=DELTA, epsilon_budget=budget, accountant=accountant)


def test_cumulative_epsilon_is_one_composition_not_rounds_times_one_round():
    sigma, q, steps, rounds = 1.1, 0.02, 50, 6
    ledger = _ledger()
    for r in range(rounds):
        ledger.record_dpsgd(noise_multiplier=sigma, sample_rate=q, steps=steps, round=r)
    one_go = _rdp([(sigma, q, rounds * steps)])
    assert ledger.epsilon() == pytest.approx(one_go, rel=1e-12)
    assert ledger.history == [(sigma, q, rounds * steps)]  # the Opacus accountant holds it all
    assert ledger.accountant.get_epsilon(delta=DELTA) == pytest.approx(one_go, rel=1e-12)
    one_round = _rdp([(sigma, q, steps)])
    assert ledger.events[0].epsilon_after == pytest.approx(one_round, rel=1e-12)
    assert ledger.epsilon() < 0.75 * rounds * one_round  # composition is sublinear


def test_all_channels_compose_in_one_accountant():
    ledger = _ledger()
    expected_history = []
    for r in range(3):
        ledger.record_dpsgd(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=r)
        ledger.record_release(mode="prototypes", noise_multiplier=2.0, sample_rate=0.1, round=r, count=1)
        expected_history += [(1.0, 0.01, 100), (2.0, 0.1, 1)]
    assert ledger.epsilon() == pytest.approx(_rdp(expected_history), rel=1e-12)
    ch = ledger.channels()
    assert ch["model_updates"]["epsilon"] == pytest.approx(_rdp([(1.0, 0.01, 300)]), rel=1e-12)
    assert ch["embeddings"]["epsilon"] == pytest.approx(_rdp([(2.0, 0.1, 3)]), rel=1e-12)
    assert max(ch["model_updates"]["epsilon"], ch["embeddings"]["epsilon"]) < ledger.epsilon()
    assert ledger.epsilon() < ch["model_updates"]["epsilon"] + ch["embeddings"]["epsilon"]
    assert ch["model_updates"]["dp_protected"] and ch["embeddings"]["dp_protected"]


def test_prv_accountant_matches_opacus():
    ledger = _ledger(accountant="prv")
    ledger.record_dpsgd(noise_multiplier=1.2, sample_rate=0.05, steps=40, round=0)
    ledger.record_release(mode="gaussian", noise_multiplier=3.0, sample_rate=1.0, round=0)
    acct = PRVAccountant()
    acct.history = [(1.2, 0.05, 40), (3.0, 1.0, 1)]
    assert ledger.epsilon() == pytest.approx(acct.get_epsilon(delta=DELTA), rel=1e-9)


def test_budget_stops_at_the_round_the_accountant_says():
    sigma, q, steps, budget = 1.2, 0.02, 30, 2.0
    # independently: the first round whose cumulative ε would pass the budget
    expected_stop = next(r for r in range(1, 1000) if _rdp([(sigma, q, r * steps)]) > budget)
    ledger = _ledger(budget=budget)
    stop = None
    for r in range(1, 1000):
        if ledger.would_exceed(extra=[(sigma, q, steps)]):
            stop = r
            break
        ledger.record_dpsgd(noise_multiplier=sigma, sample_rate=q, steps=steps, round=r)
    assert stop == expected_stop > 1
    spent = ledger.epsilon()
    assert spent <= budget
    with pytest.raises(BudgetExceeded) as err:
        ledger.record_dpsgd(noise_multiplier=sigma, sample_rate=q, steps=steps, round=stop)
    msg = str(err.value)
    assert "site-a" in msg and f"{budget:g}" in msg
    assert err.value.would_reach == pytest.approx(_rdp([(sigma, q, stop * steps)]), rel=1e-12)
    with pytest.raises(BudgetExceeded):
        ledger.record_release(mode="gaussian", noise_multiplier=0.5, sample_rate=1.0, round=stop)
    assert len(ledger.events) == stop - 1  # nothing recorded after the stop
    assert ledger.epsilon() == spent
    assert ledger.remaining() == pytest.approx(budget - spent)


def test_raw_release_is_marked_not_protected_never_zero():
    ledger = _ledger(budget=5.0)
    ledger.record_dpsgd(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=0)
    before = ledger.epsilon()
    ledger.record_release(mode="raw", round=0, count=256)
    ch = ledger.channels()["embeddings"]
    assert ch["dp_protected"] is False
    assert ch["epsilon"] is None
    assert ch["unprotected_events"] == 1
    assert ledger.epsilon() == before  # the DP figure is unchanged; the report says what it misses
    assert ledger.events[-1].dp_protected is False
    json.dumps(ledger.summary(), allow_nan=False)


def test_public_release_costs_nothing_and_nonprivate_training_is_flagged():
    ledger = _ledger()
    ledger.record_release(mode="public", round=0, count=500)
    assert ledger.epsilon() == 0.0
    ch = ledger.channels()
    assert ch["embeddings"]["dp_protected"] is True and ch["embeddings"]["epsilon"] == 0.0
    assert ch["model_updates"]["dp_protected"] is None  # nothing released yet
    ledger.record_nonprivate_update(round=0)
    assert ledger.channels()["model_updates"]["dp_protected"] is False
    assert ledger.channels()["model_updates"]["epsilon"] is None


def test_save_load_round_trip_preserves_epsilon_exactly(tmp_path):
    ledger = _ledger(budget=50.0)
    for r in range(4):
        ledger.record_dpsgd(noise_multiplier=0.83, sample_rate=0.0137, steps=73, round=r)
        ledger.record_release(mode="prototypes", noise_multiplier=1.7, sample_rate=0.1, round=r)
        ledger.record_release(mode="raw", round=r, count=10)
    path = tmp_path / "ledgers" / "site-a.json"
    ledger.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["site-a.json"]  # no temp file left
    loaded = PrivacyLedger.load(path)
    assert loaded.epsilon() == ledger.epsilon()
    assert loaded.events == ledger.events
    assert loaded.history == ledger.history
    assert loaded.channels() == ledger.channels()
    # continuing after a restart gives the same ε as never stopping
    for lg in (ledger, loaded):
        lg.record_dpsgd(noise_multiplier=0.83, sample_rate=0.0137, steps=73, round=4)
    assert loaded.epsilon() == ledger.epsilon()
    loaded.save(path)
    assert PrivacyLedger.load(path).epsilon() == ledger.epsilon()


def test_tampered_or_foreign_ledger_is_refused(tmp_path):
    ledger = _ledger()
    ledger.record_dpsgd(noise_multiplier=1.0, sample_rate=0.1, steps=100, round=0)
    path = tmp_path / "l.json"
    ledger.save(path)
    state = json.loads(path.read_text())
    state["accountant"]["history"][0][2] = 1  # pretend fewer steps were taken
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="corrupt"):
        PrivacyLedger.load(path)
    other = PrivacyLedger(site_id="site-b", delta=DELTA, epsilon_budget=None)
    with pytest.raises(ValueError, match="site-a"):
        other.load_state_dict(ledger.state_dict())
    ledger.save(path)
    with pytest.raises(ValueError, match="site-a"):
        PrivacyLedger.load_or_create(path, site_id="site-b", delta=DELTA, epsilon_budget=None)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger.load_or_create(path, site_id="site-a", delta=DELTA, epsilon_budget=None,
                                     accountant="prv")
    resumed = PrivacyLedger.load_or_create(path, site_id="site-a", delta=DELTA, epsilon_budget=9.0)
    assert resumed.epsilon() == ledger.epsilon() and resumed.epsilon_budget == 9.0
    with pytest.raises(FileNotFoundError):
        PrivacyLedger.load(tmp_path / "missing.json")


def test_bad_records_are_refused_and_change_nothing():
    ledger = _ledger()
    with pytest.raises(ValueError, match="raw"):
        ledger.record_release(mode="gaussian", noise_multiplier=0.0, sample_rate=0.1, round=0)
    with pytest.raises(ValueError):
        ledger.record_release(mode="prototypes", round=0)  # no noise parameters
    with pytest.raises(ValueError):
        ledger.record_release(mode="blurred", round=0)
    with pytest.raises(ValueError):
        ledger.record_dpsgd(noise_multiplier=1.0, sample_rate=2.0, steps=1, round=0)
    assert ledger.events == [] and ledger.epsilon() == 0.0
    assert not math.isinf(ledger.epsilon_if(extra=[(1.0, 0.1, 10)]))
    assert ledger.would_exceed(extra=[(0.5, 1.0, 100)]) is False  # no budget: never
