import pytest

from fedcl.cli import main
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.privacy.report import THREAT_MODEL, describe_privacy


def _ledger(*, release: str | None, dp: bool = True, num_records: int | None = 600,
            delta: float = 1e-5) -> PrivacyLedger:
    ledger = PrivacyLedger(site_id="clinic-3", delta=delta, epsilon_budget=8.0)
    ledger.num_records = num_records
    for r in range(2):
        if dp:
            ledger.record_dpsgd(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=r)
        else:
            ledger.record_nonprivate_update(round=r)
        if release in ("prototypes", "gaussian"):
            ledger.record_release(mode=release, noise_multiplier=2.0, sample_rate=0.1, round=r)
        elif release is not None:
            ledger.record_release(mode=release, round=r, count=64)
    return ledger


def _line(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))


def _report(release: str, *, dp: bool = True, **kw) -> str:
    ledger = _ledger(release=None if release == "none" else release, dp=dp, **kw)
    return describe_privacy(dp_enabled=dp, release_mode=release, ledger_summary=ledger.summary())


def test_every_report_states_the_threat_model_and_the_unprotected_channels():
    for mode in ("raw", "gaussian", "prototypes", "public", "none"):
        text = _report(mode)
        assert THREAT_MODEL in text and "honest-but-curious coordinator" in text
        assert "knows every configuration value and seed" in text
        assert "NOT protected" in _line(text, "- Counts -> the coordinator")
        assert "NOT protected" in _line(text,
                                        "- Timings and participation -> the coordinator and the network")
        assert _line(text, "- This ledger summary -> the coordinator")


def test_raw_release_goes_to_the_other_sites_and_is_not_differentially_private():
    ledger = _ledger(release="raw")
    text = describe_privacy(dp_enabled=True, release_mode="raw", ledger_summary=ledger.summary())
    emb = _line(text, "- Shared embeddings (raw)")
    assert (
        "every other site" in emb and "NOT differentially private" in emb and "trusted consortium only" in emb
    )
    model = _line(text, "- Model updates")
    assert f"{ledger.channels()['model_updates']['epsilon']:.3g}" in model
    assert "NOT protected overall" in _line(text, "Total")
    assert "against the coordinator" not in _line(text, "Protected")
    assert "clinic-3" in text


@pytest.mark.parametrize("mode, words", [
    ("prototypes", "noisy per-prototype sums and counts"),
    ("gaussian", "each embedding with Gaussian noise"),
])
def test_dp_release_modes_report_their_recipients_epsilon_and_the_total(mode, words):
    ledger = _ledger(release=mode)
    s = ledger.summary()
    text = describe_privacy(dp_enabled=True, release_mode=mode, ledger_summary=s)
    emb = _line(text, f"- Shared embeddings ({mode})")
    assert words in emb and "other site" in emb and f"{s['channels']['embeddings']['epsilon']:.3g}" in emb
    assert "NOT" not in emb and "NOT" not in _line(text, "- Model updates")
    total = _line(text, "Total")
    assert f"{s['epsilon']:.3g}" in total and "one accountant" in total and "remaining" in total
    protected = _line(text, "Protected")
    assert "against the coordinator, the other sites and the network" in protected
    assert "not the counts, timings and participation" in protected
    assert "no loss, alignment or uniformity" in _line(text, "- Reply metrics")


def test_public_release_without_dpsgd_reports_the_updates_reaching_every_site():
    text = _report("public", dp=False)
    model = _line(text, "- Model updates")
    assert "NOT protected" in model and "every other site through the aggregate model" in model
    assert "no embedding of a private image leaves the site" in _line(text, "- Shared embeddings (public)")
    assert "NOT protected" in _line(text, "- Reply metrics") and "loss" in _line(text, "- Reply metrics")


def test_a_run_with_the_queue_off_is_not_reported_as_public():
    text = _report("none")
    emb = _line(text, "- Shared embeddings (none)")
    assert "queue is off" in emb and "public" not in emb


def test_delta_is_compared_with_one_over_n():
    assert "is below 1/N = 0.00167 (N = 600 images)" in _report("public")
    weak = _report("public", num_records=50, delta=0.05)
    assert "δ = 0.05 is NOT below 1/N = 0.02 (N = 50 images)" in weak
    assert "not compared with 1/N" in _report("public", num_records=None)


def test_no_ledger_and_unknown_modes():
    text = describe_privacy(dp_enabled=True, release_mode="gaussian", ledger_summary=None)
    assert "Gaussian noise" in _line(text, "- Shared embeddings")
    with pytest.raises(ValueError):
        describe_privacy(dp_enabled=True, release_mode="blur", ledger_summary=None)


def test_fedcl_privacy_reports_a_ledger_without_releases_as_none(tmp_path, capsys):
    ledger = _ledger(release=None)
    ledger.save(tmp_path / "ledger-clinic-3.json")
    assert main(["privacy", str(tmp_path)]) == 0, capsys.readouterr().err
    output = capsys.readouterr().out
    assert "- Shared embeddings (none)" in output and "(public)" not in output
    assert "is below 1/N" in output  # num_records survives the ledger file


def test_a_site_that_ran_with_insecure_reproducible_dp_is_not_reported_as_protected(tmp_path):
    ledger = _ledger(release="prototypes")
    ledger.insecure_randomness = True
    ledger.save(tmp_path / "ledger.json")
    s = PrivacyLedger.load(tmp_path / "ledger.json").summary()
    text = describe_privacy(dp_enabled=True, release_mode="prototypes", ledger_summary=s)
    assert "insecure_reproducible_dp" in _line(text, "Randomness: NOT secret")
    assert "public seeds: NOT secret" in _line(text, "- Model updates")
    assert "NOT protected overall" in _line(text, "Total")
    assert "against the coordinator" not in _line(text, "Protected")
