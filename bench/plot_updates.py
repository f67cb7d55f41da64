"""kNN against the number of sequential updates of the model, from finished quality tables.

A federated round of one local step moves the global model once (the mean of the sites' steps); a
central epoch moves it ceil(images / batch) times. Plotting the tables' kNN curves on that axis
shows how much of the federated-to-central gap is the number of sequential updates, which the
same compute gives the central run 5 times over at 5 sites.

    python bench/plot_updates.py bench/results/quality_budget16.json bench/results/quality_central_b320.json \
        --out bench/results/quality_budget16_updates.png

Each input is a ``bench/quality.py`` JSON; each curve is labelled with its batch size. The federated
curves are the server's kNN (its own bank of the sites' images and its own test draw), central's the
benchmark's per-epoch kNN; both are the mean over the table's seeds. Reads the tables only: no training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def updates_curve(agg: dict, config: dict, *, federated: bool) -> list[tuple[int, float]]:
    """(sequential updates, kNN %) of one method's mean curve. Federated rounds must be of one local
    step (``rounds_per_epoch`` × batch ≥ a site's images), else there is no single count per round."""
    per_epoch = config.get("rounds_per_epoch", 1)
    if federated:
        if config["images_per_site"] > per_epoch * config["batch_size"]:
            raise SystemExit("a federated round of this table takes more than one local step: "
                             "its rounds are not single updates; use a table of one-step rounds")
        return [(int(r["round"]), 100 * r["knn"]) for r in agg["rounds"] if r.get("knn") is not None]
    steps = math.ceil(config["sites"] * config["images_per_site"] / config["batch_size"])
    # central's curve is one point per epoch, stored at round = epoch × rounds_per_epoch
    return [(round(r["round"] / per_epoch * steps), 100 * r["knn"]) for r in agg["rounds"]
            if r.get("knn") is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tables", nargs="+", type=Path, help="quality JSONs (bench/quality.py)")
    p.add_argument("--split", default="pathological")
    p.add_argument("--methods", default="fedsimclr,fedcl,central", help="comma-separated, where present")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = args.methods.split(",")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for path in args.tables:
        result = json.loads(path.read_text())
        config = result["config"]
        methods = result["splits"].get(args.split, {})
        for name in wanted:
            if name not in methods or not methods[name].get("rounds"):
                continue
            federated = name != "central"
            pts = updates_curve(methods[name], config, federated=federated)
            label = f"{name} (batch {config['batch_size']}" + (
                f" per site × {config['sites']})" if federated else ")")
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=label)
            drawn += 1
    if not drawn:
        print(f"none of {wanted} has a curve on split {args.split} in {[str(t) for t in args.tables]}",
              file=sys.stderr)
        return 2
    ax.set(xscale="log", xlabel="sequential updates of the model (log scale)", ylabel="kNN accuracy (%)",
           title=f"{args.split}: kNN against sequential updates (mean of the seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
