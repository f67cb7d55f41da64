import pytest

from fedcl.client.policy import PolicyViolation, enforce
from fedcl.config import ConfigError, SitePolicy, load_site_policy


def test_stricter_budget_wins_and_allowed_config_passes():
    policy = SitePolicy(epsilon_budget=4.0, max_target_epsilon=8.0)
    out = enforce(policy, {"dpsgd": True, "epsilon_budget": 10})
    assert out["epsilon_budget"] == 4.0 and out["dpsgd"] is True
    assert enforce(policy, {"epsilon_budget": 2.0})["epsilon_budget"] == 2.0


@pytest.mark.parametrize("privacy,policy,match", [
    ({"release": "raw"}, SitePolicy(allowed_release_modes=["prototypes", "public"]), "release mode 'raw'"),
    ({"dpsgd": False}, SitePolicy(require_dpsgd=True), "requires DP-SGD"),
    ({"dpsgd": True, "target_epsilon": 16}, SitePolicy(max_target_epsilon=8), "target epsilon 16"),
    ({"release": "gaussian", "release_noise_multiplier": 0.5}, SitePolicy(min_release_noise_multiplier=1.0),
     "noise multiplier 0.5"),
])
def test_asking_for_more_is_refused(privacy, policy, match):
    with pytest.raises(PolicyViolation, match=match):
        enforce(policy, privacy)


def test_policy_file_errors(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text("[policy]\nepsilon_budget = 3\nallowed_release_modes = ['public']\n")
    assert load_site_policy(f).allowed_release_modes == ["public"]
    f.write_text("[policy]\nepsilon_bugdet = 3\n")
    with pytest.raises(ConfigError, match="epsilon_bugdet"):
        load_site_policy(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_policy(tmp_path / "missing.toml")
