"""bench/compare.py tabulates and plots the same methods across quality.py result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench.compare import main  # noqa: E402


def _results(path: Path, cells: dict[str, list[float]]) -> None:
    split = {
        m: {"knn": {"mean": sum(v) / len(v), "std": 0.01, "n": len(v), "values": v}} for m, v in cells.items()
    }
    path.write_text(json.dumps({"command": "x", "splits": {"pathological": split}}))


def test_compare_writes_a_table_and_a_plot(tmp_path, capsys):
    _results(tmp_path / "quality_a.json", {"fedcl": [0.65, 0.67], "central": [0.70, 0.71]})
    _results(tmp_path / "quality_b.json", {"fedcl": [0.66, 0.68], "fedsimclr": [0.66]})
    out = tmp_path / "cmp"
    assert main(["--variants", "base=_a,short=_b", "--methods", "fedcl,fedsimclr", "--reference", "central",
                 "--results", str(tmp_path), "--out", str(out)]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert "| fedcl | 66.0 ± 1.0 (n=2) (65.00 / 67.00) | 67.0 ± 1.0 (n=2) (66.00 / 68.00) |" in table
    assert "| fedsimclr | – | 66.0 ± 1.0 (n=1) (66.00) |" in table
    assert "central 70.5 (from 'base')" in table
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_compare_names_a_missing_results_file(tmp_path):
    with pytest.raises(SystemExit, match="quality_missing.json"):
        main(["--variants", "x=_missing", "--methods", "fedcl", "--results", str(tmp_path),
              "--out", str(tmp_path / "c")])


def test_a_variant_can_name_its_own_split(tmp_path):
    path = tmp_path / "quality_s.json"
    cell = lambda v: {"knn": {"mean": v, "std": 0.0, "n": 1, "values": [v]}}  # noqa: E731
    path.write_text(json.dumps({"command": "x", "splits": {"pathological": {"fedcl": cell(0.6)},
                                                           "iid": {"fedcl": cell(0.7)}}}))
    out = tmp_path / "cmp"
    assert main(["--variants", "non-IID=_s,IID=_s@iid", "--methods", "fedcl", "--results", str(tmp_path),
                 "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| fedcl | 60.0 ± 0.0 (n=1) (60.00) | 70.0 ± 0.0 (n=1) (70.00) |" in table
    assert "splits non-IID: pathological, IID: iid" in table
    with pytest.raises(SystemExit, match="no split 'dirichlet0.1'"):
        main(["--variants", "x=_s@dirichlet0.1", "--methods", "fedcl", "--results", str(tmp_path),
              "--out", str(out)])
