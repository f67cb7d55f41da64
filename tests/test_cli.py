"""The ``fedcl`` command (argparse): its subcommands, their output, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from fedcl.cli import main
from fedcl.privacy.ledger import PrivacyLedger

TINY = ["data.name=synthetic", "data.synthetic_images=120", "data.train_max_images=120",
        "data.eval_max_images=60", "model.width=4", "model.proj_hidden=32", "model.proj_dim=16",
        "train.epochs=1", "train.batch_size=40", "train.threads=1"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("-s", item)]


def _site_ledger(site_id: str, *, dp: bool, release: str) -> PrivacyLedger:
    ledger = PrivacyLedger(site_id=site_id, delta=1e-5, epsilon_budget=None)
    ledger.num_records = 600
    for r in (1, 2):
        if dp:
            ledger.record_dpsgd(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=r)
        else:
            ledger.record_nonprivate_update(round=r)
        if release == "gaussian":
            ledger.record_release(mode="gaussian", noise_multiplier=2.0, sample_rate=0.1, round=r)
        else:
            ledger.record_release(mode=release, round=r, count=20)
    return ledger


def _summary_json(run_dir, ledgers: dict[str, dict]) -> None:
    """summary.json as the ServerApp writes it (fedcl.server.app._write_outputs): the sites' ledger
    summaries (``PrivacyLedger.summary()``, what each site sends in its replies) by site id."""
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({
        "rounds": 2, "final_knn": 0.5, "random_init_knn": 0.3, "encoder": str(run_dir / "encoder.pt"),
        "resumed_from": 0, "ledgers": ledgers, "stopped_for_privacy_budget_at_round": None,
    }, indent=2, sort_keys=True))


def test_privacy_reads_a_coordinators_run_folder_from_its_summary_json(tmp_path, capsys):
    """The coordinator has no site's ledger file, only what the sites reported: the same report."""
    ledgers = [_site_ledger("clinic-a", dp=True, release="gaussian"),
               _site_ledger("clinic-b", dp=False, release="raw")]
    site_dir = tmp_path / "sites"
    site_dir.mkdir()
    for ledger in ledgers:
        ledger.save(site_dir / f"ledger-{ledger.site_id}.json")
    _summary_json(tmp_path / "run", {ledger.site_id: ledger.summary() for ledger in ledgers})

    assert main(["privacy", str(site_dir)]) == 0
    from_files = capsys.readouterr().out
    assert main(["privacy", str(tmp_path / "run")]) == 0
    from_summary = capsys.readouterr().out
    assert from_summary == from_files
    assert (
        "Privacy report for site 'clinic-a'" in from_summary
        and "Privacy report for site 'clinic-b'" in from_summary)
    assert "DP-SGD, ε = " in from_summary and "Shared embeddings (gaussian)" in from_summary
    assert (
        "Shared embeddings (raw)" in from_summary and "NOT protected: trained without DP-SGD" in from_summary)


def test_privacy_from_a_summary_names_the_least_protected_release_mode_a_site_used(tmp_path, capsys):
    ledger = _site_ledger("clinic-a", dp=True, release="public")
    ledger.record_release(mode="gaussian", noise_multiplier=2.0, sample_rate=0.1, round=3)
    _summary_json(tmp_path / "run", {"clinic-a": ledger.summary()})
    assert main(["privacy", str(tmp_path / "run")]) == 0
    assert "Shared embeddings (gaussian)" in capsys.readouterr().out


def test_privacy_without_ledgers_says_where_they_are_in_one_line(tmp_path, capsys):
    _summary_json(tmp_path / "run", {})  # a run whose sites kept no ledger
    assert main(["privacy", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no ledger files found") and "summary.json" in err and err.count("\n") == 1


def test_a_summary_json_that_is_not_the_coordinators_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("[1, 2]")
    assert main(["privacy", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'summary.json'}: not a summary.json") and err.count("\n") == 1


def test_errors_are_one_line_and_red_only_on_a_terminal(capsys, monkeypatch):
    assert main(["simulate", "--engine", "spark"]) == 2
    assert capsys.readouterr().err == "error: --engine spark: choose ray or inprocess\n"
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main(["train", "-s", "model.arch=vgg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("\033[31merror: ") and "model.arch" in err and err.endswith("\033[0m\n")


def test_no_command_prints_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "eval", "simulate", "privacy"))


def test_a_missing_argument_is_refused_by_argparse_with_status_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["privacy"])  # no ledger given
    assert exc.value.code == 2 and "LEDGER" in capsys.readouterr().err


def test_train_then_eval_a_tiny_encoder(tmp_path, capsys):
    out = tmp_path / "central"
    assert main(["train", *_sets(TINY), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training cnn on 120 synthetic images for 1 epochs on cpu")
    assert lines[1].startswith("kNN accuracy: trained ") and "| random init " in lines[1]
    assert "labelled set: fit on" in lines[1]  # says which set it scored on, the one fedcl eval uses
    assert lines[2] == f"encoder written to {out / 'encoder.pt'}"
    assert (out / "metrics.jsonl").is_file()

    assert main(["eval", str(out / "encoder.pt"), *_sets(TINY), "--no-compare-random"]) == 0
    said, *table = capsys.readouterr().out.splitlines()
    assert said.startswith("labelled set: fit on") and said in lines[1]  # the same named set as fedcl train
    assert table[0].split() == ["kNN", "linear", "10/class", "align", "unif"]
    assert [row.split()[0] for row in table[1:]] == ["encoder"]  # no random-init row
    assert main(["eval", str(tmp_path / "missing.pt"), *_sets(TINY)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("error", ["FederationError", "StrategyError", "CheckpointError"])
def test_a_federation_that_cannot_go_on_is_one_line_from_simulate(capsys, monkeypatch, error):
    """e.g. a finished run's folder rerun with other settings, an unknown strategy, an unreadable
    checkpoint: the server's reason, not a traceback."""
    from fedcl.server import app, checkpoint, strategy

    cls = {"FederationError": app.FederationError, "StrategyError": strategy.StrategyError,
           "CheckpointError": checkpoint.CheckpointError}[error]

    def refuse(cfg, **kwargs):
        raise cls("checkpoint runs/latest/checkpoints/federation.pt belongs to a run with other "
                  "settings (queue.enabled: True -> False); resume with that run's settings")

    monkeypatch.setattr("fedcl.sim.simulate.run_simulation_main", refuse)
    assert main(["simulate", "-s", "queue.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint runs/latest/") and err.count("\n") == 1
