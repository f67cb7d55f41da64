import pytest

from fedcl.privacy.ledger import PrivacyLedger
from fedcl.privacy.report import describe_privacy


def _ledger(*, release: str, dp: bool = True) -> PrivacyLedger:
    ledger = PrivacyLedger(site_id="clinic-3", delta=1e-5, epsilon_budget=8.0)
    for r in range(2):
        if dp:
            ledger.record_dpsgd(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=r)
        else:
            ledger.record_nonprivate_update(round=r)
        if release in ("prototypes", "gaussian"):
            ledger.record_release(mode=release, noise_multiplier=2.0, sample_rate=0.1, round=r)
        else:
            ledger.record_release(mode=release, round=r, count=64)
    return ledger


def _line(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))


def test_raw_release_is_reported_as_not_differentially_private():
    ledger = _ledger(release="raw")
    text = describe_privacy(dp_enabled=True, release_mode="raw", ledger_summary=ledger.summary())
    emb = _line(text, "Shared embeddings")
    assert "NOT differentially private" in emb and "trusted consortium only" in emb
    model = _line(text, "Model updates")
    assert f"{ledger.channels()['model_updates']['epsilon']:.3g}" in model
    assert "NOT protected overall" in _line(text, "Total")
    assert "clinic-3" in text


def test_all_dp_channels_report_their_epsilon_and_the_total():
    ledger = _ledger(release="prototypes")
    s = ledger.summary()
    text = describe_privacy(dp_enabled=True, release_mode="prototypes", ledger_summary=s)
    assert f"{s['channels']['embeddings']['epsilon']:.3g}" in _line(text, "Shared embeddings")
    total = _line(text, "Total")
    assert f"{s['epsilon']:.3g}" in total and "one accountant" in total and "remaining" in total
    assert "NOT" not in text.split("Not protected")[0]


def test_no_dpsgd_and_public_release():
    ledger = _ledger(release="public", dp=False)
    text = describe_privacy(dp_enabled=False, release_mode="public", ledger_summary=ledger.summary())
    assert "NOT protected" in _line(text, "Model updates")
    assert "no private data released" in _line(text, "Shared embeddings")


def test_gaussian_mode_and_no_ledger():
    text = describe_privacy(dp_enabled=True, release_mode="gaussian", ledger_summary=None)
    assert "differentially private" in _line(text, "Shared embeddings")
    with pytest.raises(ValueError):
        describe_privacy(dp_enabled=True, release_mode="blur", ledger_summary=None)
