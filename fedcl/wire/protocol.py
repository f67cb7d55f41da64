"""What the ServerApp sends a site each round, and what a site sends back.

Flower's ConfigRecord holds flat scalars and lists only, so the settings sections travel as JSON
strings (parsed with ``json.loads``, never unpickled) and are validated on arrival with the same
pydantic models (``extra="forbid"``) the server built them from.

Reply contract (what Flower's FedAvg accepts): one ArrayRecord ``arrays`` (the canonical state
dict), one MetricRecord ``metrics`` with ``num-examples``, and a ConfigRecord ``site`` naming the
site and carrying its privacy-ledger summary as JSON. Every site reports the same metric keys.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Error, Message

# Keys of the records in train/evaluate messages and replies.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SITE_KEY = "site"
PROTOTYPES_KEY = "prototypes"  # prototypes mode: current prototypes out, noisy sums and counts back
PROTOTYPE_SITE = "prototypes"  # the queue's site id of the merged prototypes the server pushes
PUBLIC_SITE = "public"  # the queue's site id of the server's public reference embeddings

# Metric keys every train reply carries (FedAvg needs identical key sets across replies); under a DP
# mode "loss" is left out (an exact statistic of the images; docs/privacy.md), at every site alike.
TRAIN_METRIC_KEYS = (
    "num-examples",
    "loss",
    "steps",
    "negatives-used",
    "pushed",
    "seconds-total",
    "seconds-sample",
    "seconds-train",
    "seconds-push",
)


class ProtocolError(ValueError):
    """A round message that this site cannot use (wrong or missing settings)."""


@dataclass(frozen=True)
class RoundConfig:
    """Settings of one federated round, as the ServerApp decided them."""

    round: int
    num_rounds: int
    # build_model(**model): arch, in_channels, width, proj_dim, proj_hidden
    model: dict[str, Any]
    augment: dict[str, Any]  # fedcl.config.AugmentSettings fields
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    temperature: float
    in_batch_negatives: bool
    key_encoder: str  # "global" | "online"
    num_push: int
    seed: int
    queue_enabled: bool
    queue_address: str
    queue_tls: bool
    num_negatives: int
    max_staleness: int
    warmup_rounds: int
    # fedcl.config.PrivacySettings fields; the site builds DP-SGD and releases from them
    privacy: dict[str, Any] = field(default_factory=dict)
    # how a shared demo data set is split (sites started with a partition id use it)
    partition: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    optimizer: str = "adam"  # "adam" | "sgd" (momentum applies to SGD only)
    # sites pushed in this round's release phase (a query message before train): train pushes nothing
    fresh_push: bool = False
    # each round trains on 1/rounds_per_epoch of the site's images (fedcl.client.app.round_share)
    rounds_per_epoch: int = 1
    # the site's optimizer resumes its previous round's state (fedcl.client.app, Context.state)
    persist_optimizer: bool = False
    # the run's own loopback queue (`flwr run .` with no queue service configured): the folder where
    # the ServerApp left each simulated site its token, <site-id>.token (fedcl.server.loopback)
    queue_token_dir: str = ""

    _JSON_FIELDS = ("model", "augment", "privacy", "partition")

    @property
    def use_queue_negatives(self) -> bool:
        """Negatives come from the queue after the warm-up rounds (MoCo-style keys need a filled queue).

        Without in-batch negatives (DP-SGD) a warm-up round would have no negatives at all: a zero
        loss, and under DP-SGD a budget spent on pure noise. Then the queue is used from round 1
        (with fresh push, the release phase fills it before anyone trains).
        """
        warmup = self.warmup_rounds if self.in_batch_negatives else 0
        return self.queue_enabled and self.num_negatives > 0 and self.round > warmup

    @property
    def release_phase(self) -> bool:
        """Sites push in a release phase before training (fresh push) this round."""
        return self.fresh_push and self.use_queue_negatives

    def to_config_record(self) -> ConfigRecord:
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if name in self._JSON_FIELDS:
                out[name] = json.dumps(value, sort_keys=True)
            elif value is None:
                continue  # ConfigRecord has no None; absence means None
            else:
                out[name] = value
        return ConfigRecord(out)

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundConfig:
        raw = dict(record)
        kwargs: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            if name.startswith("_"):
                continue
            if name not in raw:
                # a field with a default is optional: an older server's config lacks it
                if f.default is not MISSING:
                    kwargs[name] = f.default
                    continue
                if f.default_factory is not MISSING:
                    kwargs[name] = f.default_factory()
                    continue
                raise ProtocolError(f"round config has no {name!r}; is the server running the same fedcl version?")
            value = raw[name]
            if name in cls._JSON_FIELDS:
                if not isinstance(value, str):
                    raise ProtocolError(f"round config {name!r} must be a JSON string, got {type(value).__name__}")
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ProtocolError(f"round config {name!r} is not valid JSON: {exc}") from None
                if not isinstance(value, dict):
                    raise ProtocolError(f"round config {name!r} must be a JSON object")
            kwargs[name] = value
        cfg = cls(**kwargs)
        cfg._check_types()
        return cfg

    def _check_types(self) -> None:
        ints = ("round", "num_rounds", "epochs", "batch_size", "num_push", "seed", "num_negatives", "max_staleness",
                "warmup_rounds")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProtocolError(f"round config {name!r} must be a non-negative integer, got {v!r}")
        for name in ("lr", "momentum", "weight_decay", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ProtocolError(f"round config {name!r} must be a number, got {v!r}")
        for name in ("in_batch_negatives", "queue_enabled", "queue_tls", "fresh_push", "persist_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise ProtocolError(f"round config {name!r} must be a boolean")
        if self.optimizer not in ("adam", "sgd"):
            raise ProtocolError(f"round config optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.key_encoder not in ("global", "online"):
            raise ProtocolError(f"round config key_encoder must be 'global' or 'online', got {self.key_encoder!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ProtocolError("round config batch_size and epochs must be at least 1")
        if isinstance(self.rounds_per_epoch, bool) or not isinstance(self.rounds_per_epoch, int) \
                or self.rounds_per_epoch < 1:
            raise ProtocolError(f"round config rounds_per_epoch must be an integer >= 1, got {self.rounds_per_epoch!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ProtocolError(f"round config threads must be a positive integer, got {self.threads!r}")


def site_record(*, site_id: str, ledger: dict[str, Any] | None) -> ConfigRecord:
    """The ``site`` record of a reply: who answered, and its privacy-ledger summary (JSON)."""
    return ConfigRecord({"site-id": site_id, "ledger": json.dumps(ledger or {}, sort_keys=True)})


def parse_site_record(record: ConfigRecord | None) -> tuple[str | None, dict[str, Any]]:
    """(site id, ledger summary) of a reply's ``site`` record; (None, {}) when absent or malformed."""
    if record is None:
        return None, {}
    site_id = record.get("site-id")
    raw = record.get("ledger", "{}")
    try:
        ledger = json.loads(raw) if isinstance(raw, str) else {}
    except json.JSONDecodeError:
        ledger = {}
    return (site_id if isinstance(site_id, str) else None), (ledger if isinstance(ledger, dict) else {})

# A site whose privacy budget stops it answers with an error reply of this code (Flower's own
# ErrorCode values are small integers); the ServerApp drops the site for the round and stops the run
# cleanly when every site answers so. The reason text is for people, never matched.
BUDGET_REFUSED = 1001
BUDGET_REFUSAL = "privacy budget exhausted:"


def budget_refusal_reply(msg: Message, reason: str) -> Message:
    """The reply of a site that refuses ``msg`` on its privacy budget (it did not train or push)."""
    return Message(Error(code=BUDGET_REFUSED, reason=f"{BUDGET_REFUSAL} {reason}"), reply_to=msg)


def is_budget_refusal(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == BUDGET_REFUSED
