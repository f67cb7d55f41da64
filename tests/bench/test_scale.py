"""bench/scale.py at a tiny scale: two real `fedcl simulate` federations (2 and 3 sites, 2 rounds),
each in its own process (one Ray session per process), measured and reported."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench import scale  # noqa: E402

IMAGES = 16  # per site; fewer than num_push (64), so each site pushes all 16 each round
TINY = ["data.synthetic_images=200", "data.train_max_images=100", "data.eval_max_images=50",
        "model.proj_hidden=32", "model.proj_dim=16", "train.threads=1"]


def test_growth_factors_divide_by_the_smallest_site_count():
    rows = [
        {"sites": 20, "seconds_per_round": 9.0, "server_peak_rss_mib": 1100.0, "server_cpu_per_round": 2.0,
         "cpu_per_round_total": 1.0, "ray_workers_peak_rss_sum_mib": 2000.0, "queue_size": 1280},
        {"sites": 10, "seconds_per_round": 3.0, "server_peak_rss_mib": 1000.0, "server_cpu_per_round": None,
         "cpu_per_round_total": 0.25, "ray_workers_peak_rss_sum_mib": 1000.0, "queue_size": 640},
    ]
    (g,) = scale.growth_factors(rows)
    assert (g["from_sites"], g["to_sites"], g["sites_factor"]) == (10, 20, 2.0)
    assert g["seconds_per_round"] == pytest.approx(3.0) and g["server_peak_rss_mib"] == pytest.approx(1.1)
    assert g["queue_size"] == 2.0 and g["cpu_per_round_total"] == 4.0
    assert g["server_cpu_per_round"] is None  # no measurement, no factor
    assert scale.growth_lines({"growth": [g]})[0].startswith(
        "10 -> 20 sites (x2): time/round x3.0, CPU/round (all processes) x4.0, server CPU/round n/a, "
        "server memory x1.1")


def test_a_failing_simulation_is_reported_with_its_log(tmp_path):
    overrides = scale.bench_overrides(sites=2, rounds=1, images_per_site=IMAGES, data="synthetic", width=8,
                                      batch_size=8, num_push=8,
                                      extra=["model.widht=8"])  # a typo: refused at once
    with pytest.raises(RuntimeError,
                       match=r"(?s)2 sites: the simulation failed \(exit 2\).*model\.widht: unknown key"):
        scale.run_one(sites=2, overrides=overrides, work_dir=tmp_path, timeout=120)
    from fedcl.config import ConfigError

    with pytest.raises(ConfigError, match="model.widht"):  # run_scale checks every setting before it starts
        scale.run_scale(sites=[2], rounds=1, images_per_site=IMAGES, extra=["model.widht=8"],
                        work_dir=tmp_path, progress=False)


def test_a_run_whose_ray_node_did_not_start_is_started_again(tmp_path, monkeypatch):
    calls = []

    def fake(*, sites, overrides, work_dir, timeout, bar):
        calls.append(work_dir.name)
        if len(calls) == 1:
            raise RuntimeError(
                f"{sites} sites: the simulation failed (exit 1): ray.init(\n"
                f"RuntimeError: {scale.RAY_START_TIMEOUTS[1]} /tmp/ray/session_x/gcs_server_port")
        return {"sites": sites}

    monkeypatch.setattr(scale, "_run_one", fake)
    assert scale.run_one(sites=4, overrides=[], work_dir=tmp_path, timeout=1) == {
        "sites": 4, "ray_start_retries": 1}
    assert calls == ["attempt0", "attempt1"]
    calls.clear()
    monkeypatch.setattr(scale, "_run_one", lambda **kw: (_ for _ in ()).throw(RuntimeError("other failure")))
    with pytest.raises(RuntimeError, match="other failure"):  # any other failure is not retried
        scale.run_one(sites=4, overrides=[], work_dir=tmp_path, timeout=1)


@pytest.mark.e2e  # two Ray federations
def test_scale_measures_two_real_federations(tmp_path):
    result = scale.run_scale(sites=[3, 2], rounds=2, images_per_site=IMAGES, data="synthetic", batch_size=8,
                             extra=TINY, work_dir=tmp_path / "work", timeout=500, progress=False)
    rows = result["rows"]
    assert [r["sites"] for r in rows] == [2, 3]  # sorted
    for r in rows:
        n = r["sites"]
        assert [x["round"] for x in r["rounds"]] == [1, 2]
        assert all(x["sites_ok"] == n and x["sites_failed"] == 0 for x in r["rounds"])
        assert all(x["seconds"] > 0 and x["site_seconds_sum"] > 0 for x in r["rounds"])
        assert r["cold_round_seconds"] == r["rounds"][0]["seconds"]
        assert r["seconds_per_round"] == statistics.mean(x["seconds"] for x in r["rounds"][1:])
        assert r["seconds_per_site_task"] == pytest.approx(r["seconds_per_round"] * r["parallel_actors"] / n)
        assert r["parallel_actors"] == min(n, result["cores"])
        # the server: a Python process holding torch, Flower and the queue service
        assert 100 < r["server_end_rss_mib"] <= r["server_vm_hwm_mib"]
        assert r["server_sampled_peak_rss_mib"] > 100
        assert r["server_peak_rss_mib"] == max(r["server_vm_hwm_mib"], r["server_sampled_peak_rss_mib"])
        assert r["memory_samples"] >= 2 and r["server_max_open_fds"] > 3 and r["server_max_threads"] > 1
        assert 1 <= r["ray_workers_max_processes"] and r["ray_workers_peak_rss_sum_mib"] > 100
        assert r["ray_services_peak_rss_sum_mib"] > 0
        assert r["server_cpu_per_round"] > 0 and r["ray_workers_cpu_per_round"] > 0
        assert r["cpu_per_round_total"] == pytest.approx(sum(v for k, v in r["cpu_seconds_per_round"].items()
                                                             if k != "wall"))
        by_thread = r["server_cpu_by_thread_per_round"]  # measured inside the server process itself
        assert by_thread and all(v > 0 for v in by_thread.values())
        assert r["flower_polling_cpu_per_round"] == by_thread.get(scale.FLOWER_POLLING)
        assert r["queue_size"] == n * IMAGES  # every site pushed all its images in round 2
        assert r["wall_seconds"] > r["federation_seconds"] > sum(x["seconds"] for x in r["rounds"])
        assert len(r["loadavg_before"]) == 3 and r["ray_start_retries"] in (0, 1)
    (g,) = result["growth"]
    small, large = rows
    assert (g["from_sites"], g["to_sites"], g["sites_factor"]) == (2, 3, 1.5)
    for key in scale.GROWTH_KEYS:
        if small[key] and large[key] is not None:
            assert g[key] == pytest.approx(large[key] / small[key])
        else:
            assert g[key] is None
    assert g["seconds_per_round"] > 0 and g["server_peak_rss_mib"] > 0
    assert g["queue_size"] == pytest.approx(1.5)

    result["command"] = "python bench/scale.py --sites 2,3 (test)"
    paths = scale.write_results(result, tmp_path / "out", name="scale_test")
    assert [p.name for p in paths] == ["scale_test.json", "scale_test.md", "scale_test.png"]
    assert json.loads(paths[0].read_text())["rows"][1]["queue_size"] == 3 * IMAGES
    md = paths[1].read_text()
    assert md.count("\n| 2 | ") == 1 and md.count("\n| 3 | ") == 1 and "2 -> 3 sites (x1.5)" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
