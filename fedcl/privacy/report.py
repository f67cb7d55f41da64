"""Plain-words privacy report of one site, per channel, from ``PrivacyLedger.summary()``."""

from __future__ import annotations

from typing import Any

_UNIT_WORDS = {"example": "one training image", "group": "one patient (all of their images)"}


def _eps(x: float | None) -> str:
    return "unbounded" if x is None else f"{x:.3g}"


def describe_privacy(
    *,
    dp_enabled: bool,
    release_mode: str,
    ledger_summary: dict[str, Any] | None,
) -> str:
    """Report what each channel reveals about a site's data and what is and is not protected.

    dp_enabled: model updates are trained with DP-SGD. release_mode: "raw" | "prototypes" |
    "gaussian" | "public". ledger_summary: ``PrivacyLedger.summary()`` (None: no ledger kept).
    """
    if release_mode not in ("raw", "prototypes", "gaussian", "public"):
        raise ValueError(f"unknown release mode {release_mode!r}")
    s = ledger_summary or {}
    delta = s.get("delta")
    at = f" at δ = {delta:g}" if delta is not None else ""
    channels = s.get("channels", {})
    unit = s.get("privacy_unit", "example")
    lines = [f"Privacy report for site {s['site_id']!r}" if "site_id" in s else "Privacy report"]
    if s:
        lines.append(f"  accountant {s.get('accountant', '?').upper()}, privacy unit: {_UNIT_WORDS.get(unit, unit)}")

    # channel 1: model updates
    mu = channels.get("model_updates", {})
    if dp_enabled:
        if mu.get("dp_protected") is False:
            text = ("NOT protected: some rounds' updates were trained without DP-SGD "
                    f"(rounds {mu.get('rounds')}), so no ε bounds this channel")
        elif mu.get("events"):
            text = (f"differentially private (DP-SGD with Opacus): ε = {_eps(mu.get('epsilon'))}{at} "
                    f"over {mu.get('steps', 0)} noisy steps")
        else:
            text = "differentially private (DP-SGD); nothing released yet (ε = 0)"
    else:
        text = ("NOT protected: trained without DP-SGD; weights can memorise and leak training images "
                "(membership, reconstruction) to the coordinator")
    lines.append(f"Model updates: {text}.")

    # channel 2: shared embeddings
    em = channels.get("embeddings", {})
    if release_mode == "raw" or em.get("dp_protected") is False:
        text = ("NOT differentially private: per-image embeddings leave the site; trusted consortium "
                "only (TLS, authenticated sites). An embedding of a private image is not covered by the "
                "model's DP guarantee")
    elif release_mode == "public":
        text = "no private data released (the server encodes a public reference set); ε = 0"
    elif release_mode == "prototypes":
        text = (f"differentially private: noisy per-prototype sums and counts (subsampled Gaussian), "
                f"ε = {_eps(em.get('epsilon', 0.0))}{at} on their own")
    else:
        text = (f"differentially private: each embedding with Gaussian noise (subsampled, zero-out "
                f"adjacency), ε = {_eps(em.get('epsilon', 0.0))}{at} on their own; at useful ε these "
                "negatives are close to random directions")
    lines.append(f"Shared embeddings ({release_mode}): {text}.")

    # total
    protected = [c for c in (mu, em) if c.get("dp_protected") is not False]
    all_dp = dp_enabled and release_mode != "raw" and len(protected) == 2
    if s:
        budget = s.get("epsilon_budget")
        budget_text = (f" Budget ε = {budget:g}, remaining {_eps(s.get('remaining'))}." if budget is not None
                       else " No budget set.")
        if all_dp:
            lines.append(f"Total: ε = {_eps(s.get('epsilon'))}{at} for everything this site released "
                         f"(all events composed in one accountant).{budget_text}")
        else:
            lines.append(f"Total: the DP-accounted events compose to ε = {_eps(s.get('epsilon'))}{at}, "
                         f"but the site is NOT protected overall: a channel above has no DP guarantee."
                         f"{budget_text}")

    what = "the content of each " + ("patient's images" if unit == "group" else "image")
    if all_dp:
        lines.append(f"Protected: {what}, against the coordinator, the other sites and the network, "
                     "up to the ε above.")
    else:
        lines.append("Protected: raw images never leave the site; TLS protects traffic from the network.")
    lines.append("Not protected: the number of images at the site (sent in the clear for FedAvg weighting), "
                 "the site's participation and timing, and anything the site shares outside fedcl.")
    return "\n".join(lines)
