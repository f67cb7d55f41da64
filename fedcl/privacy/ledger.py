"""One site's privacy ledger: every release of information about its data, composed.

Every DP event (DP-SGD steps, noisy embedding releases) is a Poisson-subsampled Gaussian
mechanism (noise_multiplier, sample_rate), repeated ``steps`` times, and goes into the history
of ONE Opacus accountant (RDP or PRV), so ε at δ is cumulative over rounds and channels, not a
per-round figure and not a naive sum. Releases that are not DP (``raw`` embeddings, model
updates trained without DP-SGD) are recorded as *not protected*: their channel reports no ε
(None, meaning unbounded), never 0. ``public`` releases carry no private data and cost 0.

The budget is enforced: recording an event that would take ε above the budget raises
``BudgetExceeded`` and records nothing; ``would_exceed`` lets a site refuse before it trains.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedcl.fileio import atomic_file

FORMAT = "fedcl-privacy-ledger/1"
MODEL_UPDATES = "model_updates"
EMBEDDINGS = "embeddings"
RELEASE_MODES = ("raw", "prototypes", "gaussian", "public")
ACCOUNTANTS = ("rdp", "prv")
PRIVACY_UNITS = ("example", "group")

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class BudgetExceeded(RuntimeError):
    """Recording (or doing) this would take a site's ε above its budget."""

    def __init__(self, *, site_id: str, budget: float, delta: float, would_reach: float,
                 spent: float) -> None:
        self.site_id = site_id
        self.budget = budget
        self.delta = delta
        self.would_reach = would_reach
        self.spent = spent
        super().__init__(
            f"site {site_id!r}: privacy budget ε = {budget:g} at δ = {delta:g} would be exceeded: "
            f"ε would reach {would_reach:.4g} (spent so far {spent:.4g}). The site stops training "
            "and releasing; raise the budget or add noise to continue."
        )


@dataclass(frozen=True)
class LedgerEvent:
    """One recorded release. ``epsilon_after``: cumulative ε of all DP events at δ after it."""

    round: int
    channel: str  # MODEL_UPDATES or EMBEDDINGS
    mode: str  # "dpsgd" | "nonprivate" | one of RELEASE_MODES
    dp_protected: bool
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int  # mechanism invocations (DP-SGD steps, releases) or records released (raw)
    epsilon_after: float | None  # None: unbounded


def _check_mechanism(noise_multiplier: float, sample_rate: float, steps: int, what: str) -> Event:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(
            f"{what}: noise_multiplier must be > 0 to be accounted, got {noise_multiplier}; "
            "a release without noise is not DP (record it as mode='raw')"
        )
    if not (0 < sample_rate <= 1):
        raise ValueError(f"{what}: sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"{what}: steps must be an integer >= 0, got {steps}")
    return float(noise_multiplier), float(sample_rate), int(steps)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at RDPAccountant's default orders (pure, cached)."""
    return tuple(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
        )
    )


def _epsilon(history: list[Event], *, delta: float, mechanism: str) -> float:
    """ε at δ of ``history``; for RDP this is RDPAccountant.get_epsilon with per-step RDP cached."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if mechanism == "rdp":
        rdp = sum([np.asarray(_rdp_per_step(q, sigma)) * steps for sigma, q, steps in history])
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acct = create_accountant(mechanism=mechanism)
    acct.history = list(history)
    return float(acct.get_epsilon(delta=delta))


def _append(history: list[Event], event: Event) -> None:
    """Add ``event``, merged into the entry with the same mechanism if there is one.

    Composition is commutative (RDP adds, PRV convolves), so merging is exact and keeps the
    history as short as the number of distinct (noise_multiplier, sample_rate) pairs.
    """
    if event[2] == 0:
        return
    for i, (sigma, q, steps) in enumerate(history):
        if (sigma, q) == event[:2]:
            history[i] = (sigma, q, steps + event[2])
            return
    history.append(event)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class PrivacyLedger:
    """Privacy ledger of one site; persisted as JSON between rounds (Flower restarts clients).

    site_id: the site. delta: δ of every reported ε. epsilon_budget: None = no limit.
    accountant: "rdp" (Mironov 2017) or "prv" (Gopi et al. 2021). privacy_unit: "example" or
    "group" (patient): what one (noise_multiplier, sample_rate) event protects; all events of
    one ledger must use the same unit.
    """

    def __init__(
        self,
        *,
        site_id: str,
        delta: float,
        epsilon_budget: float | None,
        accountant: str = "rdp",
        privacy_unit: str = "example",
    ) -> None:
        if not site_id:
            raise ValueError("site_id must be a non-empty string")
        if not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if epsilon_budget is not None and not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be > 0 or None, got {epsilon_budget}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if privacy_unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}")
        self.site_id = str(site_id)
        self.delta = float(delta)
        self.epsilon_budget = None if epsilon_budget is None else float(epsilon_budget)
        self.privacy_unit = privacy_unit
        self.accountant = create_accountant(mechanism=accountant)
        self.events: list[LedgerEvent] = []
        self._epsilon = 0.0
        # how many records (images, or patients in the group unit) the site holds, when the site
        # says: the report compares δ with 1 / num_records (public under zero-out adjacency)
        self.num_records: int | None = None
        # some DP event drew its randomness from public seeds (insecure_reproducible_dp): sticky
        self.insecure_randomness = False

    # -- queries ---------------------------------------------------------------------------

    @property
    def mechanism(self) -> str:
        return self.accountant.mechanism()

    @property
    def history(self) -> list[Event]:
        return list(self.accountant.history)

    def epsilon(self) -> float:
        """Cumulative ε at ``delta`` of every DP event recorded (all channels, one accountant).

        Not-protected releases are not in this figure: see ``channels()``.
        """
        return self._epsilon

    def epsilon_if(self, *, extra: list[Event]) -> float:
        """ε after the recorded history plus ``extra`` (noise_multiplier, sample_rate, steps)."""
        history = self.history
        for i, e in enumerate(extra):
            _append(history, _check_mechanism(*e, what=f"extra[{i}]"))
        return _epsilon(history, delta=self.delta, mechanism=self.mechanism)

    def would_exceed(self, *, extra: list[Event]) -> bool:
        """True when adding ``extra`` events would take ε above the budget (never without one)."""
        if self.epsilon_budget is None:
            return False
        return self.epsilon_if(extra=extra) > self.epsilon_budget

    def ensure_within_budget(self, *, extra: list[Event]) -> None:
        """Raise BudgetExceeded if ``extra`` would take ε above the budget."""
        if self.epsilon_budget is None:
            return
        reach = self.epsilon_if(extra=extra)
        if reach > self.epsilon_budget:
            raise BudgetExceeded(
                site_id=self.site_id, budget=self.epsilon_budget, delta=self.delta,
                would_reach=reach, spent=self._epsilon,
            )

    def remaining(self) -> float | None:
        """Budget left (>= 0), or None without a budget."""
        if self.epsilon_budget is None:
            return None
        return max(0.0, self.epsilon_budget - self._epsilon)

    def channels(self) -> dict[str, dict[str, Any]]:
        """Per channel: is it DP-protected, its own ε at δ (None = not bounded), what was recorded.

        ``dp_protected`` is None for a channel with no recorded release.
        """
        out: dict[str, dict[str, Any]] = {}
        for channel in (MODEL_UPDATES, EMBEDDINGS):
            evs = [e for e in self.events if e.channel == channel]
            history: list[Event] = []
            for e in evs:
                if e.dp_protected and e.noise_multiplier is not None:
                    _append(history, (e.noise_multiplier, e.sample_rate, e.steps))
            unprotected = [e for e in evs if not e.dp_protected and e.mode != "public"]
            if not evs:
                protected, eps = None, 0.0
            elif unprotected:
                protected, eps = False, None
            else:
                protected, eps = True, _epsilon(history, delta=self.delta, mechanism=self.mechanism)
            out[channel] = {
                "dp_protected": protected,
                "epsilon": eps,
                "modes": sorted({e.mode for e in evs}),
                "events": len(evs),
                "steps": sum(e.steps for e in evs if e.dp_protected),
                "unprotected_events": len(unprotected),
                "rounds": sorted({e.round for e in evs}),
            }
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-friendly overview for reports, metrics and the CLI."""
        return {
            "site_id": self.site_id,
            "delta": self.delta,
            "accountant": self.mechanism,
            "privacy_unit": self.privacy_unit,
            "epsilon": self._epsilon,
            "epsilon_budget": self.epsilon_budget,
            "remaining": self.remaining(),
            "num_records": self.num_records,
            "insecure_randomness": self.insecure_randomness,
            "channels": self.channels(),
        }

    # -- recording ---------------------------------------------------------------------------

    def _record(self, *, channel: str, mode: str, round: int, event: Event | None, count: int) -> LedgerEvent:
        if int(round) != round or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round}")
        new_eps = self._epsilon
        if event is not None:
            history = self.history
            _append(history, event)
            new_eps = _epsilon(history, delta=self.delta, mechanism=self.mechanism)
            if self.epsilon_budget is not None and new_eps > self.epsilon_budget:
                raise BudgetExceeded(
                    site_id=self.site_id, budget=self.epsilon_budget, delta=self.delta,
                    would_reach=new_eps, spent=self._epsilon,
                )
            self.accountant.history = history
            self._epsilon = new_eps
        entry = LedgerEvent(
            round=int(round), channel=channel, mode=mode, dp_protected=event is not None or mode == "public",
            noise_multiplier=None if event is None else event[0],
            sample_rate=None if event is None else event[1],
            steps=int(count) if event is None else event[2],
            epsilon_after=_finite_or_none(new_eps),
        )
        self.events.append(entry)
        return entry

    def record_dpsgd(self, *, noise_multiplier: float, sample_rate: float, steps: int,
                     round: int) -> LedgerEvent:
        """``steps`` DP-SGD steps of a round (model-updates channel). Raises BudgetExceeded
        (recording nothing) if they would take ε above the budget."""
        event = _check_mechanism(noise_multiplier, sample_rate, steps, "record_dpsgd")
        return self._record(channel=MODEL_UPDATES, mode="dpsgd", round=round, event=event, count=steps)

    def record_nonprivate_update(self, *, round: int) -> LedgerEvent:
        """A model update trained without DP-SGD left the site: the channel is not protected."""
        return self._record(channel=MODEL_UPDATES, mode="nonprivate", round=round, event=None, count=1)

    def record_release(
        self,
        *,
        mode: str,
        round: int,
        count: int = 1,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
    ) -> LedgerEvent:
        """An embedding release (embeddings channel).

        gaussian / prototypes: ``count`` invocations of a subsampled Gaussian mechanism with
        (noise_multiplier, sample_rate) as returned by fedcl.privacy.release; accounted.
        raw: ``count`` embeddings released without DP; recorded as not protected.
        public: no private data; zero cost. For raw and public the noise arguments are ignored.
        """
        if mode not in RELEASE_MODES:
            raise ValueError(f"release mode must be one of {RELEASE_MODES}, got {mode!r}")
        if int(count) != count or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count}")
        if mode in ("gaussian", "prototypes"):
            if noise_multiplier is None or sample_rate is None:
                raise ValueError(f"a {mode!r} release needs noise_multiplier and sample_rate to be accounted")
            event = _check_mechanism(noise_multiplier, sample_rate, count, f"record_release({mode})")
            return self._record(channel=EMBEDDINGS, mode=mode, round=round, event=event, count=count)
        return self._record(channel=EMBEDDINGS, mode=mode, round=round, event=None, count=count)

    # -- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, including the accountant history."""
        acct = self.accountant.state_dict()
        return {
            "format": FORMAT,
            "site_id": self.site_id,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "privacy_unit": self.privacy_unit,
            "accountant": {"mechanism": acct["mechanism"], "history": [list(h) for h in acct["history"]]},
            "epsilon": _finite_or_none(self._epsilon),
            "num_records": self.num_records,
            "insecure_randomness": self.insecure_randomness,
            "events": [asdict(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output; the ledger must belong to the same site and use
        the same accountant and δ. The stored ε is checked against the recomputed one."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a fedcl privacy ledger (expected format {FORMAT!r})")
        if state["site_id"] != self.site_id:
            raise ValueError(f"ledger belongs to site {state['site_id']!r}, not {self.site_id!r}")
        if state["accountant"]["mechanism"] != self.mechanism:
            raise ValueError(
                f"ledger uses accountant {state['accountant']['mechanism']!r}, not {self.mechanism!r}")
        if float(state["delta"]) != self.delta:
            raise ValueError(f"ledger uses delta {state['delta']}, not {self.delta}")
        history = [_check_mechanism(*h, what="stored history") for h in state["accountant"]["history"]]
        events = [LedgerEvent(**e) for e in state["events"]]
        eps = _epsilon(history, delta=self.delta, mechanism=self.mechanism)
        stored = state.get("epsilon")
        consistent = (not math.isfinite(eps)) if stored is None else math.isclose(
            eps, float(stored), rel_tol=1e-9, abs_tol=1e-12
        )
        if not consistent:
            raise ValueError(
                f"stored ε {stored} does not match its history (recomputed {eps}); the ledger is corrupt")
        self.accountant.load_state_dict({"mechanism": self.mechanism, "history": history})
        self.epsilon_budget = None if state["epsilon_budget"] is None else float(state["epsilon_budget"])
        self.privacy_unit = state.get("privacy_unit", "example")
        self.events = events
        self._epsilon = eps if stored is None else float(stored)
        n = state.get("num_records")
        self.num_records = None if n is None else int(n)
        self.insecure_randomness = bool(state.get("insecure_randomness", False))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically: temp file in the same folder, fsync, rename, fsync folder."""
        data = json.dumps(self.state_dict(), indent=1, allow_nan=False)
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"privacy ledger {path} does not exist")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            ledger = cls(
                site_id=state["site_id"], delta=state["delta"], epsilon_budget=state["epsilon_budget"],
                accountant=state["accountant"]["mechanism"],
                privacy_unit=state.get("privacy_unit", "example"),
            )
            ledger.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a valid fedcl privacy ledger: {exc}") from None
        return ledger

    @classmethod
    def load_or_create(
        cls,
        path: str | os.PathLike[str],
        *,
        site_id: str,
        delta: float,
        epsilon_budget: float | None,
        accountant: str = "rdp",
        privacy_unit: str = "example",
    ) -> PrivacyLedger:
        """The ledger at ``path`` if it exists (checked to be this site's), else a new one.
        The configured budget wins over the stored one."""
        if Path(path).is_file():
            ledger = cls.load(path)
            if ledger.site_id != site_id:
                raise ValueError(f"{path} holds the ledger of site {ledger.site_id!r}, not {site_id!r}")
            if ledger.mechanism != accountant or ledger.delta != delta or ledger.privacy_unit != privacy_unit:
                raise ValueError(
                    f"{path} was kept with accountant={ledger.mechanism}, delta={ledger.delta}, "
                    f"unit={ledger.privacy_unit}; the configuration says accountant={accountant}, "
                    f"delta={delta}, unit={privacy_unit}. ε spent so far cannot be re-expressed: keep the "
                    "settings or start a new ledger deliberately"
                )
            ledger.epsilon_budget = epsilon_budget
            return ledger
        return cls(site_id=site_id, delta=delta, epsilon_budget=epsilon_budget, accountant=accountant,
                   privacy_unit=privacy_unit)
