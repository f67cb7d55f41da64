"""Round metrics: JSON lines (rewritable on resume), TensorBoard, plots, the round table."""

from __future__ import annotations

from fedcl.server.metrics import MetricsLog, format_table, read_metrics, table_rows, write_plots


def _history():
    return [
        {"round": 1, "loss": 5.2, "knn": 0.61, "negatives_used": 0.0, "queue_size": 128, "epsilon": None,
         "sites_ok": 2, "sites_failed": 0, "seconds": 3.5,
         "sites": {"a": {"loss": 5.1, "epsilon": 0.5}, "b": {"loss": 5.3, "epsilon": 0.7}}},
        {"round": 2, "loss": 4.8, "knn": None, "negatives_used": 64.0, "queue_size": 256, "epsilon": 0.9,
         "epsilon_unbounded": True,
         "sites_ok": 1, "sites_failed": 1, "seconds": 4.0,
         "sites": {"a": {"loss": 4.8, "epsilon": -1.0}}},
    ]


def test_jsonl_append_and_reset(tmp_path):
    log = MetricsLog(tmp_path)
    for r in _history():
        log.write(r)
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]
    log.reset(_history()[:1])  # resume from a round-1 checkpoint
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    log.close()


def test_tensorboard_scalars(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write(_history()[0])
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_table_and_plots(tmp_path):
    rows = table_rows(_history())
    assert rows[0] == ("1", "5.200", "61.00%", "0", "128", "—", "2/2", "3.5")
    assert rows[1][2] == "—" and rows[1][5] == "∞ (not DP)" and rows[1][6] == "1/2"
    text = format_table(_history())
    assert text.splitlines()[0].split() == ["round", "loss", "kNN", "acc", "negatives", "queue", "size", "ε",
                                            "sites", "seconds"]
    paths = write_plots(_history(), tmp_path, random_init_knn=0.5)
    assert sorted(p.name for p in paths) == ["accuracy.png", "epsilon.png", "loss.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def _dp_history(rounds: int = 4):
    """Two sites with the same ε every round; queue negatives from round 3 (warm-up before)."""
    return [{"round": r, "loss": 1.0 if r < 3 else 5.0, "negatives_used": 0.0 if r < 3 else 256.0,
             "sites": {"a": {"loss": 1.0, "epsilon": 0.5 * r}, "b": {"loss": 1.0, "epsilon": 0.5 * r}}}
            for r in range(1, rounds + 1)]


def test_epsilon_plot_draws_the_budget_and_keeps_identical_sites_apart():
    import matplotlib.pyplot as plt

    from fedcl.server.metrics import epsilon_figure

    fig = epsilon_figure(_dp_history(), epsilon_budget=3.0)
    ax = fig.axes[0]
    budget = [line for line in ax.lines if list(line.get_ydata()) == [3.0, 3.0]]
    assert len(budget) == 1 and "budget" in budget[0].get_label()
    a, b = (next(line for line in ax.lines if line.get_label() == site) for site in ("a", "b"))
    assert list(a.get_ydata()) == list(b.get_ydata())  # the same ε ...
    assert all(
        xa != xb for xa, xb in zip(a.get_xdata(), b.get_xdata(), strict=True))  # ... drawn side by side
    assert all(abs(xa - xb) < 0.5 for xa, xb in zip(a.get_xdata(), b.get_xdata(), strict=True))  # same round
    assert a.get_marker() != b.get_marker()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"a", "b", "budget ε = 3"}
    plt.close(fig)


def test_loss_plot_marks_the_round_where_queue_negatives_start():
    import matplotlib.pyplot as plt

    from fedcl.server.metrics import loss_figure, queue_start_round

    assert queue_start_round(_dp_history()) == 3 and queue_start_round(_dp_history(2)) is None
    fig = loss_figure(_dp_history())
    vlines = [line for line in fig.axes[0].lines if list(line.get_xdata()) == [3, 3]]
    assert len(vlines) == 1 and vlines[0].get_label() == "queue negatives from round 3"
    assert "queue negatives from round 3" in {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    plt.close(fig)
    fig = loss_figure(_dp_history(2))  # no queue yet: no line
    assert not [line for line in fig.axes[0].lines if "queue" in line.get_label()]
    plt.close(fig)
