"""A site's own limits on what the coordinator may ask of it (``fedcl-client --policy``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from fedcl.config import SitePolicy, SitePrivacySettings


class PolicyViolation(RuntimeError):
    """The round config asks for more than this site's policy allows; the message says what."""


def enforce(policy: SitePolicy, privacy: dict[str, Any]) -> dict[str, Any]:
    """Check the server's privacy settings against the site's policy.

    Returns the settings the site will apply. Their ``epsilon_budget`` is the smallest of the
    server's, the site's ``epsilon_budget`` and its ``max_target_epsilon``: the ledger's ε after
    each round's planned steps and releases is held to it (``fedcl.client.privacy.plan_round``),
    whatever noise multiplier or number of rounds the server sends. Raises PolicyViolation when
    the server asks for more, or sends settings that are not valid (one line naming them).
    """
    try:
        s = SitePrivacySettings.model_validate(privacy or {})
    except ValidationError as exc:
        wrong = "; ".join(f"privacy.{'.'.join(str(x) for x in e['loc']) or '(section)'}: {e['msg']}"
                          for e in exc.errors())
        raise PolicyViolation(f"round config refused: {wrong}") from None
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
    if (
        s.release in ("gaussian", "prototypes")
        and s.release_noise_multiplier < policy.min_release_noise_multiplier
    ):
        problems.append(
            f"release noise multiplier {s.release_noise_multiplier:g} is below this site's minimum "
            f"{policy.min_release_noise_multiplier:g}")
    if problems:
        raise PolicyViolation("round config refused by the site policy: " + "; ".join(problems))
    out = s.model_dump()
    caps = [c for c in (s.epsilon_budget, policy.epsilon_budget, policy.max_target_epsilon) if c is not None]
    out["epsilon_budget"] = min(caps) if caps else None
    return out
