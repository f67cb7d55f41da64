"""A site's privacy for one round: DP-SGD parameters, the embedding release, and its ledger.

Everything a site releases about its data is entered in its ledger (``ledger-<site>.json`` in
the site's state folder), which survives Flower's per-message processes. Before training and
before pushing, the site asks the ledger whether the event would exceed its budget and refuses
if so: the refusal is in the reply's metrics (``budget-exhausted``) and in the log.

Release modes (what the site pushes to the queue):
    raw         the round model's embeddings, unmodified; NOT differentially private.
    gaussian    every embedding plus N(0, sigma^2) per coordinate after Poisson subsampling
                (fedcl.privacy.release.release_gaussian), re-normalised (post-processing).
    prototypes  noisy per-prototype sums and counts against public prototypes. With fresh push
                (the default) the site returns them in its release-phase reply and the server
                merges every site's into the prototypes it pushes as negatives
                (``release_prototype_sums``, ``fedcl.server.app.release_phase``); without it the site
                pushes the directions of its own noisy sums (post-processing, ``release``).
    public      nothing: the server encodes a public reference set instead. Zero epsilon.

Privacy unit ``patient``: the site's images must carry patient ids (``groups``, e.g. a .npz with
a ``train_patients`` array). DP-SGD then samples and clips whole patients (fedcl.privacy.dp) and
the ledger's unit is "group": every ε it reports is per patient. The embedding releases
(gaussian, prototypes) are per-image mechanisms: one patient's several images would be several
records, so in the patient unit they are refused (nothing released, nothing entered); raw
(not DP) and public (no private data) are unaffected.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedcl.config import SitePrivacySettings
from fedcl.privacy.dp import DPParams, noise_for_budget
from fedcl.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedcl.privacy.release import (
    PROTOTYPE_SEED,
    LazyRecords,
    PrototypeRelease,
    init_prototypes,
    release_gaussian,
    release_prototypes,
)

log = logging.getLogger("fedcl.client.privacy")



@dataclass
class RoundPrivacy:
    """What the privacy settings mean for this site's round."""

    settings: SitePrivacySettings
    ledger: PrivacyLedger | None = None
    ledger_path: Path | None = None
    dp: DPParams | None = None
    steps_planned: int = 0
    refused: str | None = None  # why the site does not train this round
    groups: torch.Tensor | None = None  # (N,) patient ids for local_round; None in the example unit
    push_refused: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any] | None:
        return None if self.ledger is None else self.ledger.summary()


def ledger_path(state_dir: Path | None, site_id: str) -> Path | None:
    return None if state_dir is None else Path(state_dir) / f"ledger-{site_id}.json"


def _release_event(s: SitePrivacySettings) -> tuple[float, float, int] | None:
    if s.release in ("gaussian", "prototypes"):
        return (s.release_noise_multiplier, s.release_sample_rate, 1)
    return None


def dp_mode(s: SitePrivacySettings) -> bool:
    """Some DP mechanism runs on the site's data: DP-SGD, or a gaussian / prototypes release."""
    return bool(s.dpsgd) or s.release in ("gaussian", "prototypes")


def plan_round(
    *, privacy: dict[str, Any], site_id: str, state_dir: Path | None, round: int, num_rounds: int,
    epochs: int, batch_size: int, num_examples: int, in_batch_negatives: bool,
    groups: torch.Tensor | None = None, rounds_per_epoch: int = 1,
) -> RoundPrivacy:
    """Open the ledger, derive DP-SGD parameters for the whole planned run, check the budget.

    groups: (N,) patient id of each of the site's images, or None when the data has none. In the
    patient unit they go to ``rp.groups`` for ``local_round``, which refuses DP-SGD without them
    (a clear error). q = expected patients per batch / patients, with expected patients per
    batch = batch_size * patients / images: a step then holds batch_size images on average, as
    in the example unit, and q equals batch_size / images.
    rounds_per_epoch: k > 1 makes a round epochs / k epochs' worth of steps, each still a Poisson
    sample of the whole data set at rate q: round_half(epochs / (q k)) steps a round.
    """
    s = SitePrivacySettings.model_validate(privacy or {})
    unit = "group" if s.unit == "patient" else "example"
    if groups is not None and groups.shape != (num_examples,):
        raise ValueError(f"site {site_id}: {tuple(groups.shape)} patient ids for {num_examples} images")
    path = ledger_path(state_dir, site_id)
    ledger = None
    if path is not None:
        ledger = PrivacyLedger.load_or_create(
            path, site_id=site_id, delta=s.delta, epsilon_budget=s.epsilon_budget, accountant=s.accountant,
            privacy_unit=unit)
    elif s.dpsgd or s.release != "raw" or s.epsilon_budget is not None:
        ledger = PrivacyLedger(site_id=site_id, delta=s.delta, epsilon_budget=s.epsilon_budget,
                               accountant=s.accountant, privacy_unit=unit)
    rp = RoundPrivacy(settings=s, ledger=ledger, ledger_path=path,
                      groups=groups.long() if s.unit == "patient" and groups is not None else None)
    num_records = num_examples
    if s.unit == "patient" and groups is not None:
        num_records = int(torch.unique(groups).numel())
    if ledger is not None:
        ledger.num_records = num_records
    if dp_mode(s) and num_records > 0 and s.delta >= 1.0 / num_records:
        # δ is the probability of failing outright; at 1/N a mechanism may publish one record in the clear
        raise ValueError(f"privacy.delta = {s.delta:g} is not below 1/N = {1.0 / num_records:.3g} for site "
                         f"{site_id}'s {num_records} {'patients' if s.unit == 'patient' else 'images'}: set "
                         f"privacy.delta well below 1/N (e.g. {0.1 / num_records:.1g})")
    if s.dpsgd:
        if in_batch_negatives:
            raise ValueError("DP-SGD was asked for with in-batch negatives; the server must send "
                             "in_batch_negatives=false (per-example clipping needs it)")
        if num_examples == 0:
            rp.refused = "no training images"
            return rp
        if s.unit == "patient" and groups is not None:
            num_patients = int(torch.unique(groups).numel())
            patients_per_batch = batch_size * num_patients / num_examples
            q = min(1.0, patients_per_batch / num_patients)
        else:
            q = min(1.0, batch_size / num_examples)
        steps = max(1, round_half(epochs / (q * max(1, rounds_per_epoch))))
        release = _release_event(s)
        reserved = [(release[0], release[1], num_rounds)] if release else []
        sigma = s.noise_multiplier if s.noise_multiplier is not None else noise_for_budget(
            target_epsilon=s.target_epsilon, target_delta=s.delta, sample_rate=q,
            total_steps=steps * num_rounds, accountant=s.accountant, reserved=reserved)
        rp.dp = DPParams(noise_multiplier=sigma, max_grad_norm=s.max_grad_norm, sample_rate=q, unit=s.unit)
        rp.steps_planned = steps
        if ledger is not None and ledger.would_exceed(extra=[(sigma, q, steps)]):
            rp.refused = (
                f"privacy budget: training round {round} would take site {site_id} to "
                f"epsilon {ledger.epsilon_if(extra=[(sigma, q, steps)]):.3f} > budget {s.epsilon_budget}")
    if rp.refused:
        log.warning("site %s refuses to train: %s", site_id, rp.refused)
    return rp


def round_half(x: float) -> int:
    return int(math.floor(x + 0.5))


def _release_allowed(rp: RoundPrivacy, *, round: int) -> bool:
    """False (and ``push_refused`` says why) when the release would pass the site's budget, or
    is a per-image DP mechanism under the patient unit."""
    event = _release_event(rp.settings)
    if event is not None and rp.settings.unit == "patient":
        rp.push_refused = (
            f"privacy unit 'patient': the {rp.settings.release} release is a per-image mechanism "
            "(one patient's images would be several records), so this site releases nothing; "
            "use release 'public', or unit 'example'")
        log.warning("site %s does not release: %s", rp.ledger.site_id if rp.ledger else "?", rp.push_refused)
        return False
    if event is None or rp.ledger is None:
        return True
    # this round's DP-SGD steps are entered after the release: count them here too
    pending = (
        [(rp.dp.noise_multiplier, rp.dp.sample_rate, rp.steps_planned)] if rp.dp and not rp.refused else [])
    if rp.ledger.would_exceed(extra=pending + [event]):
        rp.push_refused = (f"privacy budget: releasing embeddings in round {round} would exceed "
                           f"epsilon budget {rp.settings.epsilon_budget}")
        log.warning("site %s does not release: %s", rp.ledger.site_id, rp.push_refused)
        return False
    return True


def release_prototype_sums(
    rp: RoundPrivacy, embeddings: torch.Tensor | LazyRecords, *, prototypes: torch.Tensor, round: int,
    generator: torch.Generator | None,
) -> PrototypeRelease | None:
    """Prototypes mode with a server merge: the noisy per-prototype sums (P, d) and counts (P,) of
    ``embeddings`` (N, d) against the server's current ``prototypes`` (P, d, public), or None when
    the budget refuses. The Gaussian mechanism's noise covers sums and counts together.
    ``LazyRecords`` embeds only the records the release samples (the same mechanism, less work)."""
    s = rp.settings
    if s.release != "prototypes":
        raise ValueError(f"release_prototype_sums is for release mode 'prototypes', not {s.release!r}")
    if not _release_allowed(rp, round=round):
        return None
    return release_prototypes(embeddings, prototypes, noise_multiplier=s.release_noise_multiplier,
                              sample_rate=s.release_sample_rate, generator=generator)


def release(
    rp: RoundPrivacy, embeddings: torch.Tensor, *, round: int, prototypes: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """What this site may push this round, (M, d) unit norm, after the budget check."""
    s = rp.settings
    if s.release == "public" or embeddings.shape[0] == 0:
        return embeddings[:0]
    if not _release_allowed(rp, round=round):
        return embeddings[:0]
    if s.release == "raw":
        return embeddings
    if s.release == "gaussian":
        noisy, _ = release_gaussian(embeddings, noise_multiplier=s.release_noise_multiplier,
                                    sample_rate=s.release_sample_rate, generator=generator)
        return F.normalize(noisy, dim=1)  # post-processing keeps the guarantee
    # prototypes
    d = embeddings.shape[1]
    public = init_prototypes(num=s.num_prototypes, dim=d, seed=PROTOTYPE_SEED)
    if prototypes is not None and prototypes.shape[0] > 0:
        public = torch.cat([prototypes[: s.num_prototypes], public])[: s.num_prototypes]
    rel = release_prototypes(embeddings, public, noise_multiplier=s.release_noise_multiplier,
                             sample_rate=s.release_sample_rate, generator=generator)
    keep = rel.counts > 1.0  # noisy counts; a direction from (almost) nothing is noise
    sums = rel.sums[keep]
    return F.normalize(sums, dim=1) if sums.shape[0] else embeddings[:0]


def record_round(rp: RoundPrivacy, *, round: int, dp_steps: int, pushed: int, trained: bool = True,
                 queue_enabled: bool = True) -> None:
    """Enter the round's events in the ledger and persist it atomically.

    trained=False: the release phase of a round (fresh push): only the release is entered; the
    training of the same round is entered by its own call. queue_enabled=False: no release of
    any kind took place (a 'public' mode is not entered then, so the report says "none").
    """
    if rp.ledger is None:
        return
    s = rp.settings
    if trained and rp.refused is None:
        if rp.dp is not None and dp_steps > 0:
            rp.ledger.record_dpsgd(noise_multiplier=rp.dp.noise_multiplier, sample_rate=rp.dp.sample_rate,
                                   steps=dp_steps, round=round)
        elif rp.dp is None:
            rp.ledger.record_nonprivate_update(round=round)
    if pushed > 0 or (trained and s.release == "public" and queue_enabled):
        if s.release in ("gaussian", "prototypes"):
            # one invocation of the subsampled Gaussian mechanism over the site's data
            rp.ledger.record_release(mode=s.release, round=round, count=1,
                                     noise_multiplier=s.release_noise_multiplier,
                                     sample_rate=s.release_sample_rate)
        elif s.release == "raw":
            rp.ledger.record_release(mode="raw", round=round, count=pushed)
        else:
            rp.ledger.record_release(mode="public", round=round, count=0)
    if rp.ledger_path is not None:
        rp.ledger.save(rp.ledger_path)


def round_metrics(rp: RoundPrivacy) -> dict[str, float]:
    """Same keys at every site (Flower aggregates metric records key by key)."""
    eps = rp.ledger.epsilon() if rp.ledger is not None else 0.0
    s = rp.settings
    # -1 marks "no DP bound": some channel released data without DP (raw embeddings, plain SGD)
    unprotected = s.release == "raw" or not s.dpsgd
    return {
        "epsilon": -1.0 if unprotected or not math.isfinite(eps) else float(eps),
        "epsilon-accounted": float(eps) if math.isfinite(eps) else -1.0,
        "dp-noise-multiplier": float(rp.dp.noise_multiplier) if rp.dp else 0.0,
        "budget-exhausted": 1.0 if (rp.refused or rp.push_refused) else 0.0,
        "raw-release": 1.0 if rp.settings.release == "raw" else 0.0,
    }


__all__ = [
    "dp_mode",
    "RoundPrivacy",
    "plan_round",
    "release",
    "release_prototype_sums",
    "record_round",
    "round_metrics",
    "ledger_path",
    "BudgetExceeded",
]
