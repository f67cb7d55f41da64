"""A site's own limits on what the coordinator may ask of it (``fedcl-client --policy``)."""

from __future__ import annotations

from typing import Any

from fedcl.config import PrivacySettings, SitePolicy


class PolicyViolation(RuntimeError):
    """The round config asks for more than this site's policy allows; the message says what."""


def enforce(policy: SitePolicy, privacy: dict[str, Any]) -> dict[str, Any]:
    """Check the server's privacy settings against the site's policy.

    Returns the settings the site will apply: the site's own epsilon budget replaces a larger
    (or missing) one from the server. Raises PolicyViolation when the server asks for more.
    """
    s = PrivacySettings.model_validate(privacy or {})
    problems = []
    if s.release not in policy.allowed_release_modes:
        problems.append(f"release mode {s.release!r} is not allowed here (allowed: "
                        f"{', '.join(policy.allowed_release_modes)})")
    if policy.require_dpsgd and not s.dpsgd:
        problems.append("this site requires DP-SGD (privacy.dpsgd = true)")
    if s.dpsgd and policy.max_target_epsilon is not None:
        if s.noise_multiplier is None and s.target_epsilon > policy.max_target_epsilon:
            problems.append(f"target epsilon {s.target_epsilon:g} exceeds this site's maximum "
                            f"{policy.max_target_epsilon:g}")
    if s.release in ("gaussian", "prototypes") and s.release_noise_multiplier < policy.min_release_noise_multiplier:
        problems.append(f"release noise multiplier {s.release_noise_multiplier:g} is below this site's minimum "
                        f"{policy.min_release_noise_multiplier:g}")
    if problems:
        raise PolicyViolation("round config refused by the site policy: " + "; ".join(problems))
    out = s.model_dump()
    if policy.epsilon_budget is not None:
        if s.epsilon_budget is None or s.epsilon_budget > policy.epsilon_budget:
            out["epsilon_budget"] = policy.epsilon_budget
    return out
