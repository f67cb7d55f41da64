"""Per-round metrics of the federation: JSON lines, optional TensorBoard, plots and a table.

One record per round (also kept in the checkpoint):

    {"round": 3, "time": ..., "seconds": 41.2, "loss": 5.1, "knn": 0.62, "negatives_used": 812.0,
     "queue_size": 3000, "epsilon": null, "sites_ok": 5, "sites_failed": 0,
     "sites": {"site-0": {"loss": ..., "num-examples": ..., ...}}, "fed_eval": {...}, "queue": {...}}

``epsilon`` is the largest finite ε any site reported for the round (None when none did);
``epsilon_unbounded`` is true when some site released data without a DP guarantee (it reports a
negative ε: raw embeddings or plain SGD), shown as ∞ in the table. ``epsilon_accounted`` is the
largest ε of the sites' accounted channels alone (DP-SGD updates, DP releases; None when no channel
is accounted): with DP-SGD and raw embeddings the whole ε is ∞ and this is the updates' ε, shown
beside the ∞ ("∞ (not DP; accounted 1.50)").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fedcl.fileio import atomic_file

METRICS_FILE = "metrics.jsonl"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


class MetricsLog:
    """Appends round records to ``out_dir/metrics.jsonl`` and, when asked, to TensorBoard."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise RuntimeError(
                    "server.tensorboard = true needs the tensorboard package (pip install tensorboard)"
                ) from exc
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def reset(self, history: list[dict[str, Any]]) -> None:
        """Rewrite the file to exactly ``history`` (on resume: drop records past the checkpoint)."""
        with atomic_file(self.path, "w") as f:
            for record in history:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            step = int(record["round"])
            for key in ("loss", "knn", "negatives_used", "queue_size", "epsilon", "seconds"):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"federation/{key}", value, step)
            for site, metrics in record.get("sites", {}).items():
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.add_scalar(f"sites/{site}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def queue_start_round(history: list[dict[str, Any]]) -> int | None:
    """The first round in which the sites trained with negatives from the queue (None: none did)."""
    return next((r["round"] for r in history if (r.get("negatives_used") or 0) > 0), None)


SITE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _pyplot():
    """pyplot on the Agg backend (files only: coordinators and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def loss_figure(history: list[dict[str, Any]]):
    """Mean and per-site loss; a vertical line where queue negatives start (the loss jumps there:
    each positive then competes with many more negatives)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sites = sorted({s for r in history for s in r.get("sites", {})})
    for site in sites:
        pts = [(r["round"], r["sites"][site].get("loss")) for r in history if site in r.get("sites", {})]
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], alpha=0.4, linewidth=1)
    mean = [
        (r["round"], r["loss"]) for r in history if r.get("loss") is not None and math.isfinite(r["loss"])]
    if mean:
        ax.plot([x for x, _ in mean], [y for _, y in mean], color="black", marker="o", label="weighted mean")
    start = queue_start_round(history)
    if start is not None:
        ax.axvline(start, color="tab:orange", linestyle=":", label=f"queue negatives from round {start}")
    if mean or start is not None:
        ax.legend(fontsize="small")
    ax.set_xlabel("round")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("local training loss (thin: per site)")
    return fig


def epsilon_figure(history: list[dict[str, Any]], *, epsilon_budget: float | None = None):
    """Each site's cumulative ε, with its own marker and a small sideways offset, so that sites with the
    same ε stay visible; the budget as a horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sites = sorted({s for r in history for s in r.get("sites", {})})
    plotted = False
    for i, site in enumerate(sites):
        pts = [(r["round"], r["sites"][site].get("epsilon")) for r in history if site in r.get("sites", {})]
        pts = [(x, y) for x, y in pts if y is not None and 0 <= y < math.inf]  # negative: unbounded
        if pts:
            offset = 0.3 * (i / max(1, len(sites) - 1) - 0.5) if len(sites) > 1 else 0.0  # within ±0.15 round
            ax.plot([x + offset for x, _ in pts], [y for _, y in pts],
                    marker=SITE_MARKERS[i % len(SITE_MARKERS)], markersize=4, linewidth=1, label=site)
            plotted = True
    if epsilon_budget is not None:
        ax.axhline(epsilon_budget, color="tab:red", linestyle="--", label=f"budget ε = {epsilon_budget:g}")
    if plotted or epsilon_budget is not None:
        ax.legend(fontsize="small")
    if not plotted:
        ax.text(0.5, 0.5, "no site reported a finite ε\n(no DP accounting in this run)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.set_ylabel("ε (cumulative)")
    ax.set_title("privacy spent per site")
    rounds = [r["round"] for r in history]
    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    return fig


def write_plots(history: list[dict[str, Any]], out_dir: Path, *, random_init_knn: float | None = None,
                epsilon_budget: float | None = None) -> list[Path]:
    """accuracy.png (kNN per round), loss.png (mean and per-site loss, the queue's start),
    epsilon.png (ε per site, the budget)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    knn = [(r["round"], r["knn"]) for r in history if r.get("knn") is not None]
    if knn:
        ax.plot([x for x, _ in knn], [100 * y for _, y in knn], marker="o", label="global model")
    if random_init_knn is not None:
        ax.axhline(100 * random_init_knn, color="grey", linestyle="--", label="random init")
    if not knn:
        ax.text(0.5, 0.5, "no server-side labelled eval set", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.set_ylabel("kNN accuracy (%)")
    ax.set_title("kNN accuracy of the global encoder")
    if knn or random_init_knn is not None:
        ax.legend()
    save(fig, "accuracy.png")
    save(loss_figure(history), "loss.png")
    save(epsilon_figure(history, epsilon_budget=epsilon_budget), "epsilon.png")
    return written


TABLE_COLUMNS = ("round", "loss", "kNN acc", "negatives", "queue size", "ε", "sites", "seconds")


def _epsilon_cell(r: dict[str, Any]) -> str:
    if not r.get("epsilon_unbounded"):
        return _fmt(r.get("epsilon"), ".2f")
    accounted = r.get("epsilon_accounted")
    # 0: nothing was accounted (no DP-SGD, no DP release): the ∞ says it all
    return "∞ (not DP)" if not accounted else f"∞ (not DP; accounted {accounted:.2f})"


def table_rows(history: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows = []
    for r in history:
        knn = r.get("knn")
        rows.append((
            str(r["round"]),
            _fmt(r.get("loss"), ".3f"),
            "—" if knn is None else f"{100 * knn:.2f}%",
            _fmt(r.get("negatives_used"), ".0f"),
            _fmt(r.get("queue_size"), "d"),
            _epsilon_cell(r),
            f"{r.get('sites_ok', 0)}/{r.get('sites_ok', 0) + r.get('sites_failed', 0)}",
            _fmt(r.get("seconds"), ".1f"),
        ))
    return rows


def format_table(history: list[dict[str, Any]]) -> str:
    """A plain-text round table (what ``fedcl simulate`` prints; rich renders the same rows)."""
    rows = [TABLE_COLUMNS, *table_rows(history)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=False)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def site_epsilons(record: dict[str, Any]) -> str:
    """Each site's cumulative ε in the round, "site-0 1.23, site-1 ∞" (∞: no DP guarantee); "—" when none
    reported one."""
    parts = []
    for site, metrics in sorted(record.get("sites", {}).items()):
        eps = metrics.get("epsilon")
        if eps is None:
            continue
        parts.append(f"{site} {'∞' if eps < 0 or math.isinf(eps) else format(eps, '.2f')}")
    return ", ".join(parts) or "—"


def format_round_line(record: dict[str, Any], *, num_rounds: int) -> str:
    """The coordinator's log line for a round: the figures of ``format_table``'s row, rounded the same
    way, and ε per site:
    "round 2/10 | loss 4.631 | kNN acc 71.20% | ... | ε 1.25 (site-0 1.23, site-1 1.25)"."""
    cells = dict(zip(TABLE_COLUMNS, table_rows([record])[0], strict=True))
    per_site = site_epsilons(record)
    every_site_unbounded = all(part.endswith(" ∞") for part in per_site.split(", "))
    eps = cells["ε"] if cells["ε"] == "—" or every_site_unbounded else f"{cells['ε']} ({per_site})"
    return " | ".join(
        (f"round {record['round']}/{num_rounds}", f"loss {cells['loss']}", f"kNN acc {cells['kNN acc']}",
         f"negatives {cells['negatives']}", f"queue size {cells['queue size']}", f"ε {eps}",
         f"sites {cells['sites']}", f"{cells['seconds']} s")
    )
