import pytest

from fedcl.config import ConfigError, FedclConfig, load_config


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, FedclConfig)
    assert (
        cfg.data.name == "fashion-mnist" and cfg.data.num_sites == 5 and cfg.data.partition == "pathological")


def test_file_env_and_overrides_precedence(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 3\nlr = 0.1\n[data]\nname = 'synthetic'\n")
    monkeypatch.setenv("FEDCL_TRAIN__BATCH_SIZE", "64")
    cfg = load_config(f, ["train.lr=0.5", "queue.num_negatives=128"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.5 and cfg.train.batch_size == 64
    assert cfg.data.name == "synthetic" and cfg.queue.num_negatives == 128


def test_environment_beats_the_file(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[federation]\nnum_rounds = 2\nstrategy = 'FedAvg'\n")
    monkeypatch.setenv("FEDCL_FEDERATION__NUM_ROUNDS", "7")
    cfg = load_config(f)
    assert cfg.federation.num_rounds == 7  # the file said 2: the environment wins
    assert cfg.federation.strategy == "FedAvg"  # the rest of the file's section stays


def test_set_beats_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[federation]\nnum_rounds = 2\n")
    monkeypatch.setenv("FEDCL_FEDERATION__NUM_ROUNDS", "7")
    assert load_config(f, ["federation.num_rounds=9"]).federation.num_rounds == 9


def test_site_policy_environment_beats_its_file(tmp_path, monkeypatch):
    from fedcl.config import load_site_policy

    f = tmp_path / "policy.toml"
    f.write_text("[policy]\nepsilon_budget = 10.0\n")
    monkeypatch.setenv("FEDCL_POLICY_EPSILON_BUDGET", "3.0")
    assert load_site_policy(f).epsilon_budget == 3.0


def test_unknown_fedcl_variable_is_refused_with_a_suggestion(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[federation]\nnum_rounds = 2\n")
    monkeypatch.setenv("FEDCL_FEDERATON__NUM_ROUNDS", "7")  # a misspelled section used to be ignored
    with pytest.raises(ConfigError) as e:
        load_config(f)
    message = str(e.value)
    assert "FEDCL_FEDERATON__NUM_ROUNDS" in message and "did you mean FEDCL_FEDERATION__NUM_ROUNDS" in message
    assert "\n" not in message


def test_fedcl_variables_that_are_not_settings_are_left_alone(monkeypatch):
    """fedcl-client's token, the tests' knobs, site policy keys and a table's entries are no typos."""
    from fedcl.config import NON_CONFIG_ENV, load_site_policy

    for name in NON_CONFIG_ENV:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("FEDCL_POLICY_REQUIRE_DPSGD", "true")
    monkeypatch.setenv("FEDCL_SERVER__SITE_TOKENS__SITE_A", "token-of-site-a-0123456789")
    assert load_config(None, ["server.demo_open_queue_no_auth=true"]).server.site_tokens == {
        "site_a": "token-of-site-a-0123456789"}
    assert load_site_policy(None).require_dpsgd
    monkeypatch.setenv("FEDCL_POLICY_REQUIRE_DPSG", "true")
    with pytest.raises(ConfigError, match="did you mean FEDCL_POLICY_REQUIRE_DPSGD"):
        load_site_policy(None)


def test_unknown_key_gets_a_did_you_mean_in_the_file_and_in_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[federaton]\nnum_rounds = 2\n[train]\nepoch = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "federaton: unknown key (did you mean federation?)" in str(e.value)
    assert "train.epoch: unknown key (did you mean train.epochs?)" in str(e.value)
    with pytest.raises(ConfigError,
                       match=r"server.site_token: unknown key \(did you mean server.site_tokens\?\)"):
        load_config(None, ["server.site_token.a='x'"])


def test_a_template_placeholder_is_named_in_one_line():
    from pathlib import Path

    template = Path(__file__).resolve().parents[1] / "deploy" / "consortium.toml"
    with pytest.raises(ConfigError) as e:
        load_config(template)
    message = str(e.value)
    assert "\n" not in message and "server.coordinator_token is still the template placeholder" in message
    assert "deploy/make_certs.py" in message and "server.site_tokens.hospital-a" in message
    # replaced (here by --set), the placeholders are gone and the template loads
    cfg = load_config(template, ["server.coordinator_token='coordinator-token-0123456789'",
                                 "server.site_tokens={hospital-a='token-a-0123456789abc', "
                                 "hospital-b='token-b-0123456789abc'}"])
    assert cfg.server.coordinator_token == "coordinator-token-0123456789"


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
    # DP-SGD: shorter rounds take fewer Poisson steps over the whole data set
    # (fedcl.client.privacy.plan_round)
    cfg = load_config(
        None,
        ["privacy.dpsgd=true", "train.in_batch_negatives=false", "train.rounds_per_epoch=2",
         "train.persist_optimizer=true"],
    )
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
    r = subprocess.run([sys.executable, "-m", "fedcl.cli", "train", "--config", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "model.arch" in r.stderr and "Traceback" not in r.stderr


def test_shipped_example_configs_are_valid():
    from pathlib import Path

    from fedcl.config import load_site_policy

    root = Path(__file__).resolve().parents[1] / "deploy"
    tokens = ["server.coordinator_token='coordinator-token-0123456789'",
              "server.site_tokens={hospital-a='token-a-0123456789abc', hospital-b='token-b-0123456789abc'}"]
    cfg = load_config(root / "consortium.toml", tokens)  # its placeholders replaced (test_make_certs pastes)
    assert cfg.privacy.dpsgd and not cfg.train.in_batch_negatives and not cfg.server.insecure
    assert load_site_policy(root / "site-policy.toml").require_dpsgd
    assert load_config(root / "compose" / "fedcl.toml").server.site_tokens
