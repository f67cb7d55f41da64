"""The `processes` fixture: every process a test starts is stopped with its children afterwards."""

import pytest

from .helpers import Processes


@pytest.fixture
def processes(tmp_path):
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    yield procs
    procs.stop_all()
