"""What the ServerApp sends a site each round, and what a site sends back.

Flower's ConfigRecord holds flat scalars and lists only, so each settings section of the round
config travels as one JSON string (parsed by pydantic, never unpickled) and is validated on arrival
with the ``fedcl.config`` model the server built it from (``extra="forbid"``); a wrong, missing or
unknown setting is a one-line ProtocolError.

Reply contract (what Flower's FedAvg accepts): one ArrayRecord ``arrays`` (the canonical state
dict), one MetricRecord ``metrics`` with ``num-examples``, and a ConfigRecord ``site`` naming the
site and carrying its privacy-ledger summary as JSON. Every site reports the same metric keys.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Error, Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fedcl.config import (
    AugmentSettings,
    ModelSettings,
    SiteDataSettings,
    SitePrivacySettings,
    SiteQueueSettings,
    SiteTrainSettings,
)

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


class RoundConfig(BaseModel):
    """Settings of one federated round, as the ServerApp decided them.

    The round's scalars, and one section per settings group: the ``fedcl.config`` model of the
    fields a site needs (``SiteTrainSettings`` and so on). Built from a FedclConfig's sections,
    each narrowed to its site part, so a site-side setting added to a section travels with no
    change here, in the server or in the client.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=1, strict=True)
    num_rounds: int = Field(ge=1, strict=True)
    queue_address: str = Field("", strict=True)  # the queue service the sites dial ("": none this run)
    queue_tls: bool = Field(False, strict=True)
    # the run's own loopback queue (`flwr run .` with no queue service configured): the folder where
    # the ServerApp left each simulated site its token, <site-id>.token (fedcl.server.loopback)
    queue_token_dir: str = Field("", strict=True)
    train: SiteTrainSettings = Field(default_factory=SiteTrainSettings)
    # queue.enabled: a queue service is linked; queue.fresh_push: a release phase in the release mode
    queue: SiteQueueSettings = Field(default_factory=SiteQueueSettings)
    # the global model's spec: build_model(**model)
    model: ModelSettings = Field(default_factory=ModelSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    # checked against the site policy
    privacy: SitePrivacySettings = Field(default_factory=SitePrivacySettings)
    # used by sites started with a partition id
    data: SiteDataSettings = Field(default_factory=SiteDataSettings)

    @field_validator("*", mode="before")
    @classmethod
    def _site_part(cls, value: Any, info: ValidationInfo) -> Any:
        """A FedclConfig section (a subclass with server-only fields) narrows to the site's fields."""
        section = SECTIONS.get(info.field_name or "")
        if section is not None and isinstance(value, BaseModel) and type(value) is not section:
            return section.model_validate(value.model_dump(include=set(section.model_fields)))
        return value

    @property
    def use_queue_negatives(self) -> bool:
        """Negatives come from the queue after the warm-up rounds (MoCo-style keys need a filled queue).

        Without in-batch negatives (DP-SGD) a warm-up round would have no negatives at all: a zero
        loss, and under DP-SGD a budget spent on pure noise. Then the queue is used from round 1
        (with fresh push, the release phase fills it before anyone trains).
        """
        warmup = self.queue.warmup_rounds if self.train.in_batch_negatives else 0
        return self.queue.enabled and self.queue.num_negatives > 0 and self.round > warmup

    @property
    def release_phase(self) -> bool:
        """Sites push in a release phase before training (fresh push) this round."""
        return self.queue.fresh_push and self.use_queue_negatives

    def to_config_record(self) -> ConfigRecord:
        """Scalars as they are, each section as one JSON string."""
        return ConfigRecord({name: json.dumps(value.model_dump(mode="json"), sort_keys=True)
                             if name in SECTIONS else value for name, value in self})

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundConfig:
        """Every key of a RoundConfig must be there; within a section a missing key takes the model's
        default (an older server) and an unknown one is refused. Keys Flower adds itself (its
        strategies set ``server-round``) are ignored."""
        raw = dict(record)
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if name not in raw:
                raise ProtocolError(f"round config has no {name!r}{_SAME_VERSION}")
            values[name] = _parse_section(name, raw[name]) if name in SECTIONS else raw[name]
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ProtocolError(f"round config refused: {_describe(exc)}{_SAME_VERSION}") from None


_SAME_VERSION = "; is the server running the same fedcl version as this site?"

# name in the round config -> the fedcl.config model of that section (one JSON string each)
SECTIONS: dict[str, type[BaseModel]] = {
    name: f.annotation for name, f in RoundConfig.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
}


def _parse_section(name: str, raw: Any) -> BaseModel:
    """One section from its JSON string, validated strictly (a JSON 1 is no boolean)."""
    if not isinstance(raw, str):
        raise ProtocolError(f"round config section {name!r} must be a JSON string, got {type(raw).__name__}")
    try:
        return SECTIONS[name].model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ProtocolError(f"round config refused: {_describe(exc, name)}{_SAME_VERSION}") from None


def _describe(exc: ValidationError, section: str = "") -> str:
    """A pydantic error as one line: ``train.lr: Input should be greater than 0 (got -1)``."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in ((section,) if section else ()) + tuple(e["loc"])) or "(round config)"
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
            continue
        given = repr(e.get("input"))
        shown = f" (got {given})" if len(given) <= 60 and not isinstance(e.get("input"), (dict, list)) else ""
        parts.append(f"{loc}: {e['msg']}{shown}")
    return "; ".join(parts)


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
