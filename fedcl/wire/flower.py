"""What every Flower process of fedcl needs from its environment (server and client alike)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def flower_environment(*, flwr_home: Path) -> None:
    """Environment for Flower processes: no telemetry or update checks, our interpreter's tools first."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ.setdefault("FLWR_HOME", str(flwr_home))
    bindir = str(Path(sys.executable).parent)  # flower-superexec / flwr-clientapp of this installation
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path if path else bindir
