"""The `processes` fixture: every process a test starts is stopped with its children afterwards."""

import pytest

from .helpers import Processes


@pytest.fixture
def processes(tmp_path):
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    yield procs
    procs.stop_all()


def pytest_collection_modifyitems(items):
    """End-to-end drills wait on events with generous backstops (helpers.PATIENCE): pytest-timeout's
    project default (600 s per test) would cut a drill on a loaded machine before its own, clearer
    "timed out waiting for ..." message. A module's own timeout mark (test_netns.py) wins."""
    for item in items:
        if "tests/e2e/" in item.nodeid.replace("\\", "/") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(2400))
