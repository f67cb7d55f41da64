"""A site's training data: the one place that decides which images (and patient ids) a site uses.

``fedcl.client.app.load_site_images`` is ``load_site_data(...).images``, so the ids stay aligned with
the images; tests/client/test_site_data.py checks that both agree.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # fedcl.client.app imports this module's function lazily; no import cycle at runtime
    from fedcl.client.app import SimulatedSites, SiteSettings
    from fedcl.data import ImageSet
    from fedcl.wire.protocol import RoundConfig


def load_site_data(site: SiteSettings, rc: RoundConfig, simulated: SimulatedSites | None) -> ImageSet:
    """The site's training ImageSet: images (N, C, H, W) uint8 with their patient ids, if any."""
    from fedcl.client.app import SiteError, _cached, _detect_format
    from fedcl.config import DataSettings
    from fedcl.data import DataError, load_dataset
    from fedcl.runtime import first_n, load_split, site_partition

    try:
        if site.data_format == "simulation":
            assert simulated is not None
            d = simulated.config.data
            full = _cached(("sim", d.model_dump_json()), lambda: load_split(d, split="train"))
            return _cached(("sim-part", d.model_dump_json(), site.partition_id),
                           lambda: site_partition(d, full, site_index=int(site.partition_id)))
        fmt = site.data_format
        if fmt == "auto" and site.data_path is None and site.partition_id is not None:
            d = DataSettings.model_validate({**rc.data.model_dump(), "num_sites": site.num_partitions})
            full = _cached(("demo", d.model_dump_json()), lambda: load_split(d, split="train"))
            return _cached(("demo-part", d.model_dump_json(), site.partition_id),
                           lambda: site_partition(d, full, site_index=int(site.partition_id)))
        if fmt == "synthetic":
            seed = (
                rc.data.seed if site.partition_id is not None else zlib.crc32(site.site_id.encode())
            )
            full = _cached(
                ("synthetic", seed), lambda: load_dataset(name="synthetic", split="train", seed=seed))
        else:
            if site.data_path is None:
                raise SiteError("node config has no data-path; start the site with fedcl-client --data PATH")
            if fmt == "auto":
                fmt = _detect_format(site.data_path)
            full = _cached((fmt, str(site.data_path), site.patient_regex),
                           lambda: load_dataset(name=fmt, path=site.data_path, split="train",
                                                group_regex=site.patient_regex))
        if site.partition_id is not None:
            d = DataSettings.model_validate(
                {**rc.data.model_dump(), "name": fmt if fmt != "auto" else "folder",
                 "num_sites": site.num_partitions}
            )
            full = _cached(("part", fmt, str(site.data_path), d.model_dump_json(), site.partition_id),
                           lambda: site_partition(d, full, site_index=int(site.partition_id)))
        return first_n(full, site.max_images, seed=zlib.crc32(site.site_id.encode()))
    except DataError as exc:
        raise SiteError(f"site {site.site_id}: {exc}") from None


def load_site_groups(site: SiteSettings, rc: RoundConfig,
                     simulated: SimulatedSites | None) -> torch.Tensor | None:
    """int64 (N,) patient id of each image ``load_site_images`` returns, or None when the site's
    data carries no patient ids (see fedcl.data.medmnist: a ``train_patients`` array)."""
    return load_site_data(site, rc, simulated).groups
