"""The coordinator's round log: the round table's figures, ε per site, each line once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedcl.server.metrics import format_round_line, format_table, site_epsilons

REPO = Path(__file__).resolve().parents[2]

RECORD = {
    "round": 2, "loss": 0.8781178951263428, "knn": 0.71234, "negatives_used": 812.4, "queue_size": 3000,
    "epsilon": 1.25341, "epsilon_unbounded": False, "sites_ok": 2, "sites_failed": 1, "seconds": 41.234,
    "sites": {"site-1": {"epsilon": 1.25341, "loss": 0.9}, "site-0": {"epsilon": 1.2312, "loss": 0.8}},
}


def test_the_round_line_has_the_tables_rounded_figures_and_epsilon_per_site():
    line = format_round_line(RECORD, num_rounds=10)
    assert line == ("round 2/10 | loss 0.878 | kNN acc 71.23% | negatives 812 | queue size 3000 | "
                    "ε 1.25 (site-0 1.23, site-1 1.25) | sites 2/3 | 41.2 s")
    row = format_table([RECORD]).splitlines()[2].split()
    assert row[1] == "0.878" and row[2] == "71.23%" and row[5] == "1.25"  # the same figures as the table


def test_the_round_line_says_which_site_is_not_dp_and_when_no_site_reports_epsilon():
    record = dict(RECORD, epsilon_unbounded=True,
                  sites={"site-0": {"epsilon": 1.5}, "site-1": {"epsilon": -1.0}})
    assert "| ε ∞ (not DP) (site-0 1.50, site-1 ∞) |" in format_round_line(record, num_rounds=3)
    no_dp = dict(record, sites={"site-0": {"epsilon": -1.0}, "site-1": {"epsilon": -1.0}})
    assert "| ε ∞ (not DP) |" in format_round_line(no_dp, num_rounds=3)  # said once, not per site
    # DP-SGD with raw embeddings: the whole ε has no bound, the updates' ε is said beside it
    dpsgd_raw = dict(no_dp, epsilon_accounted=2.345)
    assert "| ε ∞ (not DP; accounted 2.35) |" in format_round_line(dpsgd_raw, num_rounds=3)
    assert "| ε ∞ (not DP) |" in format_round_line(dict(no_dp, epsilon_accounted=0.0), num_rounds=3)
    plain = dict(RECORD, epsilon=None, sites={"site-0": {"loss": 0.8}}, knn=None, loss=None)
    line = format_round_line(plain, num_rounds=3)
    assert "| ε — |" in line and "loss — | kNN acc — |" in line
    assert site_epsilons(plain) == "—"


def test_flower_log_lines_come_out_once_after_opacus_is_imported():
    """Opacus calls logging.basicConfig when imported: the root logger then printed every Flower line
    (the round log among them) a second time. Imported through fedcl.privacy, it leaves the root alone."""
    code = ("import logging, flwr.common.logger, fedcl.privacy.ledger\n"
            "logging.getLogger('flwr.fedcl').info('round 1/2 | loss 0.878')\n"
            "print('root handlers', len(logging.getLogger().handlers))\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    both = out.stdout + out.stderr
    assert both.count("round 1/2 | loss 0.878") == 1, both
    assert "root handlers 0" in out.stdout
