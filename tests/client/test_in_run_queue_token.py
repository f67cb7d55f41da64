"""Which queue token a site presents: its own, or (a simulated site of a run that serves its own queue
on loopback, ``flwr run .``) the one the ServerApp left it; never a token file for another host."""

from __future__ import annotations

import pytest

from fedcl.client.app import SiteError, SiteSettings, _queue_token
from fedcl.wire.protocol import RoundConfig


def _rc(**over) -> RoundConfig:
    values = dict(round=2, num_rounds=2, queue_address="127.0.0.1:40001", queue_tls=False)
    values.update(over)
    return RoundConfig(**values)


def _simulated(**over) -> SiteSettings:
    return SiteSettings.from_node_config({"partition-id": 1, "num-partitions": 2, **over})


def test_a_simulated_site_reads_the_token_the_run_left_it(tmp_path):
    (tmp_path / "site-1.token").write_text("tok-for-site-1\n")
    assert _queue_token(_simulated(), _rc(queue_token_dir=str(tmp_path))) == "tok-for-site-1"


def test_a_site_with_its_own_token_keeps_it(tmp_path):
    (tmp_path / "site-1.token").write_text("tok-for-site-1")
    own = tmp_path / "own.token"
    own.write_text("own-token")
    assert (
        _queue_token(_simulated(**{"queue-token-file": str(own)}), _rc(queue_token_dir=str(tmp_path)))
        == "own-token")


def test_no_token_file_is_read_for_a_queue_on_another_host(tmp_path):
    (tmp_path / "site-1.token").write_text("tok-for-site-1")
    rc = _rc(queue_token_dir=str(tmp_path), queue_address="queue.example.org:50051")
    assert _queue_token(_simulated(), rc) is None
    deployed = SiteSettings.from_node_config({"site-id": "site-1"})  # not a simulated site: no partition id
    assert _queue_token(deployed, _rc(queue_token_dir=str(tmp_path))) is None


def test_a_site_the_run_made_no_token_for_is_told_what_to_change(tmp_path):
    with pytest.raises(SiteError,
                       match=r"site-1 has no token from this run's own queue service .*data.num_sites"):
        _queue_token(_simulated(), _rc(queue_token_dir=str(tmp_path)))
