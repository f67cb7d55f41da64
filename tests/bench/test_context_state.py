"""bench/context_state.py measures what persist_optimizer puts into a Flower Context."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench.context_state import main, measure  # noqa: E402


def test_the_serialized_context_holds_both_adam_moments_of_every_parameter():
    m = measure("cnn", 4, 1, 28, repeats=1)
    assert m["params"] > 0
    # two float32 moments per parameter, plus a small overhead (keys, step counts, param groups)
    assert m["raw_bytes"] <= m["bytes"] < 1.2 * m["raw_bytes"] + 64 * 1024


def test_the_script_writes_its_table(tmp_path, monkeypatch):
    import bench.context_state as cs

    monkeypatch.setattr(cs, "ENCODERS", [("cnn", 4, 1, 28)])
    out = tmp_path / "context_state.txt"
    assert main(["--repeats", "1", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[-1].startswith("cnn w4")


def test_no_serialization_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
