"""bench/quality.py's Markdown report: the final table only; per-round curves stay in the JSON and plots."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench.quality import aggregate, write_markdown, write_plots  # noqa: E402


def run(knn: float, rounds: int) -> dict:
    metrics = {"knn": knn, "linear": 0.7, "fewlabel": 0.6, "alignment": 0.4, "uniformity": -2.0}
    return {"metrics": metrics, "seconds": 10.0,
            "rounds": [{"round": i + 1, "knn": knn - 0.001 * (rounds - i - 1), "loss": 1.0, "drift": 0.9,
                        "epsilon": None} for i in range(rounds)]}


def test_report_has_the_final_table_and_points_to_the_curves(tmp_path):
    result = {"command": "python bench/quality.py --rounds 160",
              "splits": {"pathological": {"fedsimclr": aggregate([run(0.66, 160), run(0.68, 160)]),
                                          "fedcl": aggregate([run(0.69, 160), run(0.71, 160)])}}}
    path = tmp_path / "quality_x.md"
    write_markdown(path, result)
    text = path.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    # header, separator and one row per method: 160 rounds add no row and no column
    assert len(table) == 4, text
    assert max(line.count("|") for line in table) == 10, text
    assert "| fedcl | 70.0 ± 1.4 (n=2) |" in text
    assert "`quality_x.json`" in text and "`quality_x_rounds.png`" in text


def test_the_drift_column_is_there_only_when_a_run_measured_drift(tmp_path):
    no_drift = run(0.70, 4)
    for r in no_drift["rounds"]:
        del r["drift"]  # the shipped runner writes none
    result = {"command": "x", "splits": {"pathological": {"fedcl": aggregate([no_drift])}}}
    write_markdown(tmp_path / "q.md", result)
    text = (tmp_path / "q.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert "drift" not in text and {line.count("|") for line in table} == {9}, text
    result["splits"]["pathological"]["fedsimclr"] = aggregate([run(0.68, 4)])  # a former run with drift
    write_markdown(tmp_path / "q.md", result)
    text = (tmp_path / "q.md").read_text()
    assert "final drift" in text and "| 0.900 |" in text and "| – |" in text, text


def test_rounds_plot_skips_rounds_without_knn(tmp_path):
    # --eval-every 8: the server's curve has a kNN every 8th round only; one seed may have every round
    sparse = run(0.70, 16)
    for r in sparse["rounds"]:
        if r["round"] % 8:
            r["knn"] = None
    splits = {"pathological": {"fedcl": aggregate([sparse, run(0.68, 16)]),
                               "random": aggregate([{"metrics": run(0.6, 0)["metrics"], "seconds": 1.0,
                                                     "rounds": []}])}}
    write_plots(tmp_path / "quality", {"splits": splits})
    assert (tmp_path / "quality_rounds.png").stat().st_size > 0


def test_dp_row_with_raw_embeddings_keeps_its_accounted_epsilon_per_round(tmp_path, monkeypatch):
    """DP-SGD with the raw release: the sites' whole ε has no bound (None), the accounted channel's
    does, and the per-round record and the ε plot keep it."""
    import time

    from bench import quality
    from fedcl.server.app import _round_record, _Trained

    def server_record(rnd: int, sites: dict) -> dict:  # the coordinator's line in metrics.jsonl
        trained = _Trained(rc=None, replies=[], sites=sites, ledgers={}, errors=[], release_info={},
                           queue_at_start={}, evicted=None, weights_sha256="", t0=time.time())
        return _round_record(rnd, trained, knn=None, random_init_knn=None, fed_eval={}, queue_info={},
                             queue_loss={})

    history = [server_record(r, {"0": {"epsilon": -1.0, "epsilon-accounted": 1.5 * r},
                                 "1": {"epsilon": -1.0, "epsilon-accounted": 2.0 * r}}) for r in (1, 2)]
    assert [(r["epsilon_unbounded"], r["epsilon_accounted"]) for r in history] == [(True, 2.0), (True, 4.0)]
    records = quality.round_records(history)
    assert [(r["epsilon"], r["epsilon_accounted"]) for r in records] == [(None, 2.0), (None, 4.0)]
    nothing = server_record(1, {"0": {"epsilon": -1.0, "epsilon-accounted": -1.0}, "1": {"loss": 1.0}})
    assert quality.round_records([nothing])[0]["epsilon_accounted"] is None  # no site's ε is bounded

    from matplotlib.axes import Axes

    labels = []
    real_plot = Axes.plot

    def plot(ax, *a, **kw):
        labels.append(kw.get("label"))
        return real_plot(ax, *a, **kw)

    monkeypatch.setattr(Axes, "plot", plot)
    dp = {"metrics": run(0.5, 0)["metrics"], "seconds": 1.0, "rounds": records}
    write_plots(tmp_path / "quality", {"splits": {"pathological": {"fedcl_dp8": aggregate([dp])}}})
    assert any(lab and "fedcl_dp8 (accounted channels only" in lab for lab in labels), labels
