"""Plain-words privacy report of one site, per channel and per recipient, from ``PrivacyLedger.summary()``.

Threat model (docs/privacy.md): an honest-but-curious coordinator that knows every configuration
value and seed, the other sites, and an observer on the network. Every channel that leaves the
site is listed with who receives it and what protects it; no line claims more than the ledger's
accounting supports.
"""

from __future__ import annotations

from typing import Any

_UNIT_WORDS = {"example": "one training image", "group": "one patient (all of their images)"}
RELEASE_MODES = ("raw", "prototypes", "gaussian", "public", "none")

THREAT_MODEL = (
    "Threat model: an honest-but-curious coordinator that knows every configuration value and seed, "
    "the other sites, and an observer on the network. Raw images never leave the site."
)


def _eps(x: float | None) -> str:
    return "unbounded" if x is None else f"{x:.3g}"


def _delta_line(delta: float | None, n: int | None, unit: str) -> str | None:
    if delta is None:
        return None
    if not n:
        return f"δ = {delta:g}; the site's record count is not in the ledger, so δ is not compared with 1/N."
    what = "patients" if unit == "group" else "images"
    if delta < 1.0 / n:
        return f"δ = {delta:g} is below 1/N = {1.0 / n:.3g} (N = {n} {what})."
    return (f"δ = {delta:g} is NOT below 1/N = {1.0 / n:.3g} (N = {n} {what}): a mechanism could publish one "
            "record in the clear with that probability, so the ε below means little.")


def describe_privacy(
    *,
    dp_enabled: bool,
    release_mode: str,
    ledger_summary: dict[str, Any] | None,
) -> str:
    """Report what each channel reveals about a site's data, to whom, and what is and is not protected.

    dp_enabled: model updates are trained with DP-SGD. release_mode: "raw" | "prototypes" |
    "gaussian" | "public", or "none" when no embedding left the site (queue off, or nothing
    released yet). ledger_summary: ``PrivacyLedger.summary()`` (None: no ledger kept).
    """
    if release_mode not in RELEASE_MODES:
        raise ValueError(f"unknown release mode {release_mode!r}; one of {', '.join(RELEASE_MODES)}")
    s = ledger_summary or {}
    delta = s.get("delta")
    at = f" at δ = {delta:g}" if delta is not None else ""
    channels = s.get("channels", {})
    unit = s.get("privacy_unit", "example")
    insecure = bool(s.get("insecure_randomness"))
    lines = _header_lines(s, delta=delta, unit=unit, insecure=insecure)
    lines.append("Channels (what leaves the site -> who receives it: what protects it):")
    mu = channels.get("model_updates", {})
    em = channels.get("embeddings", {})
    # a ledger with no model update: the site never trained (its rounds failed first, or none asked it yet)
    never_trained = bool(s) and not dp_enabled and not mu.get("events")
    lines.append(
        _model_updates_line(mu, dp_enabled=dp_enabled, insecure=insecure, at=at, never_trained=never_trained))
    lines.append(_embeddings_line(em, release_mode=release_mode, at=at))
    lines += _other_channel_lines(private=dp_enabled or release_mode in ("gaussian", "prototypes"))
    all_dp = (dp_enabled and not insecure and release_mode in ("gaussian", "prototypes", "public", "none")
              and mu.get("dp_protected") is not False and em.get("dp_protected") is not False)
    nothing_left = never_trained and not em.get("events")
    lines += _total_lines(s, all_dp=all_dp, at=at, unit=unit, nothing_left=nothing_left)
    return "\n".join(lines)


def _header_lines(s: dict[str, Any], *, delta, unit: str, insecure: bool) -> list[str]:
    lines = [f"Privacy report for site {s['site_id']!r}" if "site_id" in s else "Privacy report",
             THREAT_MODEL]
    if s:
        lines.append(
            f"Accountant {s.get('accountant', '?').upper()}, privacy unit: {_UNIT_WORDS.get(unit, unit)}.")
        delta_line = _delta_line(delta, s.get("num_records"), unit)
        if delta_line:
            lines.append(delta_line)
    if insecure:
        lines.append(
            "Randomness: NOT secret: this site ran with insecure_reproducible_dp, so its Poisson batches "
            "and noise came from seeds the coordinator knows; no ε below holds against it.")
    return lines


def _model_updates_line(mu: dict[str, Any], *, dp_enabled: bool, insecure: bool, at: str,
                        never_trained: bool = False) -> str:
    recipients = ("the coordinator (this site's own update, in the clear to it), the other sites (inside the "
                  "aggregate model), the network (TLS)")
    if dp_enabled and mu.get("dp_protected") is False:
        text = ("NOT protected: some rounds' updates were trained without DP-SGD "
                f"(rounds {mu.get('rounds')}), so no ε bounds this channel")
    elif dp_enabled and mu.get("events"):
        source = "public seeds: NOT secret" if insecure else "the site's OS entropy"
        text = (f"DP-SGD, ε = {_eps(mu.get('epsilon'))}{at} on its own over {mu.get('steps', 0)} noisy steps "
                f"(Poisson batches and noise drawn from {source})")
    elif dp_enabled:
        text = "DP-SGD; no update released yet (ε = 0)"
    elif never_trained:
        text = "never trained: the ledger records no model update, so none has left the site yet"
    else:
        text = ("NOT protected: trained without DP-SGD; the weights can memorise and leak training images "
                "(membership, reconstruction), and they reach every other site through the aggregate model")
    return f"- Model updates -> {recipients}: {text}."


def _embeddings_line(em: dict[str, Any], *, release_mode: str, at: str) -> str:
    if release_mode == "raw" or em.get("dp_protected") is False:
        text = (
            "-> the queue service (run by the coordinator) and every other site (as negatives), the network "
            "(TLS): NOT differentially private: per-image embeddings of private images, for a trusted "
            "consortium only; the model's DP guarantee does not cover them")
    elif release_mode == "public":
        text = ("-> nobody: no embedding of a private image leaves the site (the server encodes a public "
                "reference set); ε = 0")
    elif release_mode == "none":
        text = "-> nobody: no embedding left the site (the queue is off, or nothing was released yet)"
    elif release_mode == "prototypes":
        text = (
            f"-> the coordinator (it merges them) and, merged, every other site: noisy per-prototype sums "
            f"and counts (subsampled Gaussian, secret sampling and noise), ε = {_eps(em.get('epsilon', 0.0))}"
            f"{at} on their own")
    else:
        text = (
            f"-> the queue service (coordinator) and every other site: each embedding with Gaussian noise "
            f"(subsampled, zero-out adjacency, secret sampling and noise), ε = {_eps(em.get('epsilon', 0.0))}"
            f"{at} on their own; at useful ε these rows are close to random directions")
    return f"- Shared embeddings ({release_mode}) {text}."


def _other_channel_lines(*, private: bool) -> list[str]:
    lines = []
    if private:
        lines.append(
            "- Reply metrics -> the coordinator: under DP no loss, alignment or uniformity is sent; what "
            "is sent (steps, negatives used, records pushed, noise multiplier, ε) follows from the "
            "configuration, N and the queue, not from the images' content.")
    else:
        lines.append(
            "- Reply metrics -> the coordinator: NOT protected: the training loss and the alignment and "
            "uniformity are exact statistics of the site's images.")
    lines.append(
        "- Counts -> the coordinator: NOT protected: the number of images N (FedAvg's weight), treated "
        "as public.")
    lines.append("- Timings and participation -> the coordinator and the network: NOT protected (seconds per "
                 "phase, when the site answers).")
    lines.append("- This ledger summary -> the coordinator: ε, steps, δ and N, which follow from the "
                 "configuration and N only.")
    return lines


def _total_lines(s: dict[str, Any], *, all_dp: bool, at: str, unit: str,
                 nothing_left: bool = False) -> list[str]:
    lines = []
    what = "the content of each " + ("patient's images" if unit == "group" else "image")
    if s:
        budget = s.get("epsilon_budget")
        budget_text = (f" Budget ε = {budget:g}, remaining {_eps(s.get('remaining'))}." if budget is not None
                       else " No budget set.")
        if nothing_left:
            return [
                f"Total: this site never trained and released no embedding: no model update or embedding "
                f"has left it (ε = 0).{budget_text}",
                "Protected: raw images never leave the site. The channels above marked NOT protected apply "
                "from the first round the site trains in."]
        if all_dp:
            lines.append(
                f"Total: ε = {_eps(s.get('epsilon'))}{at} for the model updates and embedding releases "
                f"together (all DP events composed in one accountant).{budget_text}")
        else:
            lines.append(
                f"Total: the DP-accounted events compose to ε = {_eps(s.get('epsilon'))}{at}, but the "
                f"site is NOT protected overall: a channel above has no DP guarantee.{budget_text}")
    if all_dp:
        lines.append(
            f"Protected: {what}, in the model updates and embedding releases, against the coordinator, "
            "the other sites and the network, up to the ε above; not the counts, timings and "
            "participation.")
    else:
        lines.append(
            "Protected: raw images never leave the site; TLS protects traffic from the network. No ε "
            "bounds what the channels marked NOT protected reveal.")
    return lines
