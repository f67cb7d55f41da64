"""Side by side: one metric of the same methods under several recipe variants of bench/quality.py.

    python bench/compare.py --variants "whole rounds=_s7_base,cosine lr=_s7_cos,k=2=_s7_rpe2" \
        --methods fedsimclr,fedcl,fedcl_noqueue,fedcl_mixonline_dc --reference central,random \
        --out bench/results/quality_s7_compare

Each variant is ``label=tag``: the results file ``<results>/quality<tag>.json`` that one
``bench/quality.py --tag <tag>`` run (or its ``--cached-only`` rebuild) wrote; ``label=tag@split``
reads that variant's ``split`` instead of ``--split`` (then put central and random in ``--methods``:
a reference line holds for one split only). Reference methods
(not trained by the federation, such as central SimCLR) are drawn as horizontal lines from the
first variant that has them. Writes ``<out>.md`` (mean ± std, per-seed values, n) and ``<out>.png``
(grouped bars with one dot per seed), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_variant(path: Path, split: str) -> dict:
    if not path.is_file():
        raise SystemExit(f"no results file {path}: run bench/quality.py with that --tag first")
    data = json.loads(path.read_text())
    if split not in data.get("splits", {}):
        raise SystemExit(f"{path} has no split {split!r} (it has {sorted(data.get('splits', {}))})")
    return data["splits"][split]


def per_seed(cell: dict, metric: str) -> list[float]:
    """The metric's per-seed values when the results file lists them, else []."""
    values = cell.get(metric, {}).get("values")
    return [float(v) for v in values] if values else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", required=True, help="comma-separated label=tag or label=tag@split")
    p.add_argument("--methods", required=True)
    p.add_argument("--reference", default="", help="methods drawn as lines (e.g. central,random)")
    p.add_argument("--split", default="pathological")
    p.add_argument("--metric", default="knn")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes <out>.md and <out>.png")
    a = p.parse_args(argv)
    variants = []
    splits = []
    for item in (v for v in a.variants.split(",") if v):
        if "=" not in item:
            print(f"variant {item!r} is not label=tag", file=sys.stderr)
            return 2
        label, tag = item.rsplit("=", 1)
        tag, _, split = tag.partition("@")
        splits.append(split or a.split)
        variants.append((label, tag, load_variant(a.results / f"quality{tag}.json", splits[-1])))
    methods = [m for m in a.methods.split(",") if m]
    refs = [m for m in a.reference.split(",") if m]

    split_text = f"split {splits[0]}" if len(set(splits)) == 1 else "splits " + ", ".join(
        f"{label}: {sp}" for (label, _, _), sp in zip(variants, splits, strict=False))
    lines = [f"{a.metric} (%), {split_text}, mean ± std over seeds (n); per seed in brackets\n",
             "| method | " + " | ".join(label for label, _, _ in variants) + " |",
             "|---|" + "---|" * len(variants)]
    bars: dict[str, list[tuple[float, float, list[float]] | None]] = {}
    for m in methods:
        cells, row = [], []
        for _, _, results in variants:
            cell = results.get(m, {}).get(a.metric)
            if cell is None:
                cells.append("–")
                row.append(None)
                continue
            seeds = per_seed(results[m], a.metric)
            extra = f" ({' / '.join(f'{100 * v:.2f}' for v in seeds)})" if seeds else ""
            cells.append(
                f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f} (n={cell.get('n', '?')}){extra}")
            row.append((cell["mean"], cell["std"], seeds))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
        bars[m] = row
    ref_values = {}
    for r in refs:
        for label, _, results in variants:
            if r in results and a.metric in results[r]:
                ref_values[r] = (results[r][a.metric]["mean"], label)
                break
    if ref_values:
        lines.append("\nReferences (one recipe for all variants): " + ", ".join(
            f"{r} {100 * v:.1f} (from '{label}')" for r, (v, label) in ref_values.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(variants), 4.2))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        for i, cell in enumerate(bars[m]):
            if cell is None:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            mean, std, seeds = cell
            ax.bar(x, 100 * mean, width, yerr=100 * std, color=f"C{j}", capsize=2,
                   label=m if i == next(k for k, c in enumerate(bars[m]) if c is not None) else None)
            ax.scatter([x] * len(seeds), [100 * s for s in seeds], s=8, color="black", zorder=3)
    for k, (r, (v, _)) in enumerate(ref_values.items()):
        ax.axhline(100 * v, color="grey", linestyle=["--", ":", "-."][k % 3], linewidth=1, label=r)
    ax.set_xticks(range(len(variants)), [label for label, _, _ in variants])
    values = [100 * s for row in bars.values() for c in row if c for s in (c[2] or [c[0]])]
    values += [100 * v for v, _ in ref_values.values()]
    if values:
        ax.set_ylim(min(values) - 2, max(values) + 1.5)
    ax.set_ylabel(f"{a.metric} (%)")
    ax.set_title(
        f"{splits[0] if len(set(splits)) == 1 else 'per variant'}: {a.metric} by variant (dots: seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars fill the axes
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)
    print(f"wrote {a.out.with_suffix('.md')} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
