import pytest

from fedcl.config import ConfigError, FedclConfig, load_config


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, FedclConfig)
    assert cfg.data.name == "fashion-mnist" and cfg.data.num_sites == 5 and cfg.data.partition == "pathological"


def test_file_env_and_overrides_precedence(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 3\nlr = 0.1\n[data]\nname = 'synthetic'\n")
    monkeypatch.setenv("FEDCL_TRAIN__BATCH_SIZE", "64")
    cfg = load_config(f, ["train.lr=0.5", "queue.num_negatives=128"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.5 and cfg.train.batch_size == 64
    assert cfg.data.name == "synthetic" and cfg.queue.num_negatives == 128


def test_typo_names_the_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "train.learning_rate" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epochs='many'"])
    assert "train.epochs" in str(e.value) and "many" in str(e.value)


def test_unknown_section_and_bad_literal():
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, ["trian.epochs=2"])
    with pytest.raises(ConfigError, match="privacy.release"):
        load_config(None, ["privacy.release=leaky"])


def test_dp_with_in_batch_negatives_is_refused():
    with pytest.raises(ConfigError, match="in_batch_negatives"):
        load_config(None, ["privacy.dpsgd=true", "train.in_batch_negatives=true"])
    cfg = load_config(None, ["privacy.dpsgd=true", "train.in_batch_negatives=false"])
    assert cfg.privacy.dpsgd


def test_shorter_rounds_and_kept_optimizers_are_checked_and_allowed_with_dp():
    with pytest.raises(ConfigError, match="rounds_per_epoch"):
        load_config(None, ["train.rounds_per_epoch=0"])
    assert load_config(None, ["train.rounds_per_epoch=4"]).train.rounds_per_epoch == 4
    # options that lost in docs/benchmarks.md are gone from the config (research/ describes them)
    with pytest.raises(ConfigError, match=r"train.hard_negatives: unknown key"):
        load_config(None, ["train.hard_negatives=4"])
    # DP-SGD: shorter rounds take fewer Poisson steps over the whole data set (fedcl.client.privacy.plan_round)
    cfg = load_config(None, ["privacy.dpsgd=true", "train.in_batch_negatives=false", "train.rounds_per_epoch=2",
                             "train.persist_optimizer=true"])
    assert cfg.train.rounds_per_epoch == 2 and cfg.train.persist_optimizer


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_prints_one_paragraph_not_a_traceback(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "c.toml"
    f.write_text("[model]\narch = 'vgg'\n")
    r = subprocess.run([sys.executable, "-m", "fedcl.cli", "train", "--config", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "model.arch" in r.stderr and "Traceback" not in r.stderr


def test_shipped_example_configs_are_valid():
    from pathlib import Path

    from fedcl.config import load_site_policy

    root = Path(__file__).resolve().parents[1] / "deploy"
    cfg = load_config(root / "consortium.toml")
    assert cfg.privacy.dpsgd and not cfg.train.in_batch_negatives and not cfg.server.insecure
    assert load_site_policy(root / "site-policy.toml").require_dpsgd
    assert load_config(root / "compose" / "fedcl.toml").server.site_tokens
