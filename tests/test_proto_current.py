"""The committed gRPC stubs in fedcl/proto must match a fresh generation from queue.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fedcl.wire.proto import generate

REPO = Path(__file__).resolve().parents[1]


def test_committed_stubs_are_current():
    proc = subprocess.run([sys.executable, "-m", "fedcl.wire.proto.generate", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_check_fails_on_stale_stubs(tmp_path, monkeypatch, capsys):
    for name in generate.GENERATED:
        shutil.copy(generate.PROTO_DIR / name, tmp_path / name)
    monkeypatch.setattr(generate, "PROTO_DIR", tmp_path)
    assert generate.main(["--check"]) == 0
    stale = tmp_path / "queue_pb2_grpc.py"
    stale.write_text(stale.read_text().replace("from . import queue_pb2", "import queue_pb2"))
    assert generate.main(["--check"]) == 1
    assert "queue_pb2_grpc.py" in capsys.readouterr().err
    assert generate.main([]) == 0  # regenerating repairs it
    assert generate.main(["--check"]) == 0


def test_generated_grpc_module_imports_its_sibling_relatively():
    text = (generate.PROTO_DIR / "queue_pb2_grpc.py").read_text()
    assert "from . import queue_pb2 as" in text and "\nimport queue_pb2" not in text
