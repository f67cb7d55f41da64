"""The ClientApp's site settings (node config) and how a site finds its images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcl.client.app import SiteError, SiteSettings, load_site_images, site_privacy_settings
from fedcl.wire.protocol import RoundConfig


def _rc(**data) -> RoundConfig:
    return RoundConfig(round=1, num_rounds=2,
                       data={"partition": "iid", "seed": 3, "max_images_per_site": None, **data})


def _npz(path, n=30, classes=3):
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
             train_labels=np.arange(n) % classes)
    return path


def test_node_config_is_validated(tmp_path):
    token = tmp_path / "token"
    token.write_text("  s3cret \n")
    s = SiteSettings.from_node_config(
        {"site-id": "a", "data-path": str(tmp_path), "queue-token-file": str(token), "insecure": "true",
         "threads": 2}
    )
    assert (s.site_id, s.queue_token, s.insecure, s.threads) == ("a", "s3cret", True, 2)
    assert "s3cret" not in repr(s)
    assert SiteSettings.from_node_config({"partition-id": 2, "num-partitions": 3}).site_id == "site-2"
    for bad, message in [({}, "site-id"), ({"site-id": "a", "partition-id": 1}, "both"),
                         ({"site-id": "a", "partition-id": 3, "num-partitions": 3}, "outside"),
                         ({"site-id": "a", "data-format": "jpeg"}, "data-format"),
                         ({"site-id": "a", "threads": "many"}, "integer"),
                         ({"site-id": "a", "queue-token-file": str(tmp_path / "missing")}, "token file")]:
        with pytest.raises(SiteError, match=message):
            SiteSettings.from_node_config(bad)


def test_site_images_from_an_npz_and_a_partition_of_it(tmp_path):
    path = _npz(tmp_path / "site.npz")
    whole = load_site_images(SiteSettings(site_id="a", data_path=path), _rc(), None)
    assert whole.shape == (30, 1, 28, 28) and whole.dtype == torch.uint8
    capped = load_site_images(SiteSettings(site_id="a", data_path=path, max_images=7), _rc(), None)
    assert capped.shape[0] == 7
    parts = [load_site_images(SiteSettings(site_id=f"s{i}", data_path=path, partition_id=i, num_partitions=3),
                              _rc(), None) for i in range(3)]
    assert sum(p.shape[0] for p in parts) == 30  # iid: every image in exactly one part
    flat = {bytes(img.numpy()) for p in parts for img in p}
    assert flat == {bytes(img.numpy()) for img in whole}


def test_missing_data_is_a_clear_site_error(tmp_path):
    with pytest.raises(SiteError, match="does not exist"):
        load_site_images(SiteSettings(site_id="a", data_path=tmp_path / "nope"), _rc(), None)
    with pytest.raises(SiteError, match="--data"):
        load_site_images(SiteSettings(site_id="a"), _rc(), None)


def test_site_policy_refuses_a_weaker_round_config(tmp_path):
    policy = tmp_path / "site.toml"
    policy.write_text("[policy]\nepsilon_budget = 4.0\nallowed_release_modes = ['public', 'prototypes']\n")
    site = SiteSettings(site_id="a", policy_file=policy)
    rc = RoundConfig(round=1, num_rounds=2, privacy={"release": "raw"})
    with pytest.raises(SiteError, match="release mode 'raw' is not allowed"):
        site_privacy_settings(site, rc)
    rc = RoundConfig(round=1, num_rounds=2, privacy={"release": "public", "epsilon_budget": 10.0})
    assert site_privacy_settings(site, rc)["epsilon_budget"] == 4.0
    missing = SiteSettings(site_id="a", policy_file=tmp_path / "nope.toml")
    with pytest.raises(SiteError, match="does not exist"):
        site_privacy_settings(missing, rc)


def test_a_partition_site_without_data_uses_the_servers_demo_set():
    # what `flwr run` in Flower's simulation gives a ClientApp: only partition-id and num-partitions
    site = SiteSettings.from_node_config({"partition-id": 1, "num-partitions": 2})
    rc = _rc(name="synthetic", synthetic_images=40, synthetic_classes=4, partition="iid")
    images = load_site_images(site, rc, None)
    assert site.site_id == "site-1" and images.shape == (20, 1, 28, 28)
