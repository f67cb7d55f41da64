"""bench/quality.py: the raw-pixel row, the ε = 3 row, the clutter regime as a data set, and the
record of what produced quality.json (command, commit, CPU time)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench.quality import (  # noqa: E402
    METHODS,
    Data,
    config_key,
    federation_config,
    main,
    parse_args,
    run_config,
    run_method,
)
from fedcl.data import make_synthetic  # noqa: E402
from fedcl.evaluate import knn_accuracy  # noqa: E402
from tests.bench.test_quality_splits import MAIN_TABLE  # noqa: E402
from tests.data.test_idx import write_fashion  # noqa: E402

CLUTTERED = ["--dataset", "fashion-mnist-cluttered"]


def test_pixels_row_is_the_centred_pixels_under_the_same_probes():
    d = Data.__new__(Data)  # no files needed: the row only evaluates
    d.root = Path("/nonexistent")
    # 8 px: 64 pixels per image keeps the probes' solvers fast
    d.train = make_synthetic(num_images=400, num_classes=4, image_size=8, seed=0)
    d.test = make_synthetic(num_images=40, num_classes=4, image_size=8, seed=1)
    data = d.setup(split="iid", seed=0, num_sites=2, images_per_site=100, test_images=40)
    row = run_method("pixels", data=data, cfg={"width": 4, "rounds": 1}, split="iid", seed=0,
                     data_root=d.root, device=torch.device("cpu"), bar=None)
    assert set(row["metrics"]) == {"knn", "linear", "fewlabel", "alignment", "uniformity"}

    def centred(images: torch.Tensor) -> torch.Tensor:  # an independent reimplementation
        x = images.float().div(255).flatten(1)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)

    expected = knn_accuracy(centred(data["bank_images"]), data["bank_labels"], centred(data["test_images"]),
                            data["test_labels"], num_classes=10)
    assert row["metrics"]["knn"] == expected and row["rounds"] == [] and row["cpu_seconds"] > 0


def test_dp3_is_dp8_at_epsilon_3():
    cfg = run_config(parse_args(MAIN_TABLE)) | {"threads": 1}
    dp3, dp8 = (federation_config(METHODS[m], cfg, split="pathological", seed=0, data_root=Path("/x"))
                for m in ("fedcl_dp3", "fedcl_dp8"))
    assert dp3.privacy.dpsgd and dp3.privacy.target_epsilon == 3.0
    assert dp3.model_copy(update={"privacy": dp8.privacy}) == dp8


def test_cache_key_holds_the_data_set_and_plain_fashion_mnist_keeps_its_key():
    # the key before this change (the tables before train.queue_temperature pin it to --temperature)
    assert config_key(run_config(parse_args(MAIN_TABLE + ["--queue-temperature", "0.2"]))) == "bddaf49b40ac"
    cluttered = config_key(run_config(parse_args(MAIN_TABLE + CLUTTERED)))
    variants = {config_key(run_config(parse_args(MAIN_TABLE + CLUTTERED + extra)))
                for extra in (["--canvas", "44"], ["--item-scale", "0.8"], ["--clutter-patches", "2"],
                              ["--clutter-patch-size", "8"], ["--clutter-seed", "1"])}
    assert len(variants | {cluttered, "bddaf49b40ac"}) == 7
    config = federation_config(METHODS["fedcl"],
                               run_config(parse_args(MAIN_TABLE + CLUTTERED + ["--canvas", "44"])),
                               split="pathological", seed=0, data_root=Path("/x"))
    assert config.data.name == "fashion-mnist-cluttered" and config.data.clutter.canvas == 44


def test_cluttered_pixels_table_records_command_commit_and_cpu(tmp_path, capsys):
    write_fashion(tmp_path, n_train=60, n_test=20)
    argv = ["--data", str(tmp_path), *CLUTTERED, "--methods", "pixels", "--splits", "iid", "--seeds", "0",
            "--sites", "2", "--images-per-site", "30", "--test-images", "20",
            "--canvas", "12", "--item-scale", "0.3", "--clutter-patch-size", "4",  # 144 pixels: fast probes
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert "--methods pixels" in result["command"] and len(result["commit"].split("-")[0]) == 40
    assert result["cpu"]["runs"] == 1 and result["cpu"]["seconds"] > 0
    assert result["config"]["dataset"]["clutter"] == {"canvas": 12, "scale": 0.3, "patches": 3,
                                                      "patch_size": 4, "seed": 0}
    pixels = result["splits"]["iid"]["pixels"]
    assert {"knn", "linear", "fewlabel", "cpu_seconds"} <= set(pixels) and pixels["knn"]["n"] == 1
    assert "CPU: " in (tmp_path / "out" / "quality.md").read_text()

    capsys.readouterr()
    assert main(argv[:-1] + [str(tmp_path / "bad"), "--item-scale", "1.0"]) == 2  # 28 px item, 12 px canvas
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err == [err[-1]] and err[-1].startswith("data.clutter") and "raise canvas to at least 28" in err[-1])
    assert not (tmp_path / "bad").exists()  # refused before anything was written
