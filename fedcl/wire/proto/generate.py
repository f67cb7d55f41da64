"""Generate (or check) the committed Python stubs of queue.proto.

    python -m fedcl.wire.proto.generate           # rewrite queue_pb2*.py(i) next to queue.proto
    python -m fedcl.wire.proto.generate --check   # exit 1 when the committed stubs are stale

Needs grpcio-tools (a dev dependency). The import of queue_pb2 in the generated
_grpc module is rewritten to a package-relative import, so the stubs work wherever
the package is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = PROTO_DIR.parents[2]  # the folder holding fedcl/
PROTO_REL = "fedcl/wire/proto/queue.proto"
GENERATED = ("queue_pb2.py", "queue_pb2.pyi", "queue_pb2_grpc.py")

# protoc writes "from fedcl.wire.proto import queue_pb2 as fedcl_dot_wire_dot_proto_dot_queue__pb2"
_ABSOLUTE_IMPORT = re.compile(r"^from fedcl\.wire\.proto import (queue_pb2 as \w+)$", re.MULTILINE)


def generate_to(out_dir: Path) -> dict[str, bytes]:
    """Run protoc on queue.proto into out_dir; return {file name: contents} after the import fix."""
    try:
        from grpc_tools import protoc
    except ImportError as err:  # dev dependency only
        raise SystemExit(
            "grpcio-tools is not installed: install the dev extras (pip install -e '.[dev]')"
        ) from err
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PACKAGE_ROOT / PROTO_REL),
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed on {PROTO_REL} (exit {status})")
    produced = out_dir / "fedcl" / "wire" / "proto"
    files: dict[str, bytes] = {}
    for name in GENERATED:
        text = (produced / name).read_text(encoding="utf-8")
        if name == "queue_pb2_grpc.py":
            text, count = _ABSOLUTE_IMPORT.subn(r"from . import \1", text)
            if count != 1:
                raise SystemExit("unexpected import line in generated queue_pb2_grpc.py")
        files[name] = text.encode("utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcl.wire.proto.generate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed stubs, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate_to(Path(tmp))
    stale = [name for name, data in fresh.items()
             if not (PROTO_DIR / name).is_file() or (PROTO_DIR / name).read_bytes() != data]
    if args.check:
        if stale:
            print(f"stale generated stubs in {PROTO_DIR}: {', '.join(stale)}; "
                  "run `python -m fedcl.wire.proto.generate`", file=sys.stderr)
            return 1
        print("generated stubs are current")
        return 0
    for name in stale:
        (PROTO_DIR / name).write_bytes(fresh[name])
    print(f"wrote {', '.join(stale)}" if stale else "generated stubs already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
