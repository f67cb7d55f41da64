"""Flower ServerApp: rounds, aggregation, queue refresh, evaluation, checkpoints and resume.

A round r (DESIGN.md, "A round"):
1. tell the queue service the round (``Advance(r)``, coordinator token): stale entries go;
2. send the global weights and the round's settings (``fedcl.wire.protocol.RoundConfig``) to the
   sites the strategy samples; wait for their replies (``federation.round_timeout``), so a site
   that dies mid-round only drops out of this round;
3. aggregate with the configured Flower strategy (FedAvg by default, any
   ``flwr.serverapp.strategy`` class by name), evaluate the global encoder centrally (kNN on a
   labelled set, when the server has one), ``Advance(r + 1)`` so that the queue service's snapshot
   holds this round's pushes, and checkpoint atomically. A restarted ServerApp resumes at k + 1.

The loop is ours rather than ``Strategy.start``, because it needs hooks before and after each
round and a start round other than 1; the strategy's own configure/aggregate methods do the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedcl.server.checkpoint import FederationCheckpoint, checkpoint_path, find_checkpoint, save_checkpoint
from fedcl.server.metrics import MetricsLog, format_round_line, write_plots
from fedcl.server.strategy import build_strategy, restore_strategy_state, strategy_state
from fedcl.wire.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    PROTOTYPE_SITE,
    PROTOTYPES_KEY,
    PUBLIC_SITE,
    SECTIONS,
    SITE_KEY,
    RoundConfig,
    is_budget_refusal,
    parse_site_record,
)

if TYPE_CHECKING:
    from fedcl.config import FedclConfig

log = logging.getLogger("flwr.fedcl")  # a child of Flower's logger: shows up in `flwr log` and the console

QUEUE_SNAPSHOT_NAME = "queue-snapshot.npz"
ENCODER_NAME = "encoder.pt"
DEFAULT_ROUND_TIMEOUT = 3600.0


class FederationError(RuntimeError):
    """The federation cannot go on; the message says why (the last checkpoint stays valid)."""


@dataclass(frozen=True)
class QueueLink:
    """How the ServerApp reaches the queue service, and how sites are told to."""

    address: str  # host:port, as the sites reach it
    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    coordinator_token: str | None = field(default=None, repr=False)
    snapshot_path: Path | None = None  # readable from here: its digest goes into the checkpoint
    site_token_dir: Path | None = None  # the run's own loopback queue: where its sites find their tokens

    def client(self, site_id: str = "coordinator"):
        """A coordinator client; ``site_id`` names the entries it pushes (public set, prototypes)."""
        from fedcl.wire.queue_client import QueueClient

        return QueueClient(self.address, site_id=site_id, token=self.coordinator_token,
                           root_certificates=self.root_certificates if self.tls else None, timeout=30.0)

    @classmethod
    def from_config(cls, cfg, *, out_dir: Path) -> QueueLink:
        s = cfg.server
        certs = None
        if not s.insecure and s.tls_ca is not None:
            certs = Path(s.tls_ca).read_bytes()
        return cls(address=f"{s.queue_host}:{s.queue_port}", tls=not s.insecure, root_certificates=certs,
                   coordinator_token=s.coordinator_token, snapshot_path=Path(out_dir) / QUEUE_SNAPSHOT_NAME)


class RoundObserver(Protocol):
    def on_start(self, *, start_round: int, num_rounds: int, initial_knn: float | None) -> None: ...

    def on_round(self, record: dict[str, Any]) -> None: ...


@dataclass
class FederationResult:
    history: list[dict[str, Any]]
    random_init_knn: float | None
    final_knn: float | None
    encoder_path: Path
    resumed_from: int  # 0 when the run started afresh
    plots: list[Path]
    ledgers: dict[str, dict[str, Any]]
    stopped_for_privacy_budget_at_round: int | None = None  # every site refused this round on its budget


# ---------------------------------------------------------------------------------- evaluation


class CentralEvaluator:
    """kNN accuracy (k = 200, t = 0.1) of the frozen global encoder on the server's labelled set."""

    def __init__(self, *, memory_images, memory_labels, test_images, test_labels,
                 description: str = "") -> None:
        self.memory_images, self.memory_labels = memory_images, memory_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.in_channels = int(memory_images.shape[1])
        self.description = description  # which labelled set (fedcl.runtime.load_knn_sets)

    @classmethod
    def from_config(cls, cfg) -> tuple[CentralEvaluator | None, str]:
        """The evaluator, or None and the reason there is none."""
        from fedcl.data import DataError
        from fedcl.runtime import load_knn_sets

        d = cfg.data
        try:
            sets = load_knn_sets(d)  # the set fedcl train and fedcl eval use too
        except (DataError, OSError) as exc:
            return None, str(exc)
        if not sets.labelled:
            return None, f"data set {d.name!r} has no labels"
        return cls(memory_images=sets.bank.images, memory_labels=sets.bank.labels,
                   test_images=sets.test.images, test_labels=sets.test.labels,
                   description=sets.description), ""

    def knn(self, model) -> float:
        from fedcl.evaluate import extract_features, knn_accuracy

        device = torch.device("cpu")
        memory = extract_features(model, self.memory_images, device=device)  # (N, feat)
        test = extract_features(model, self.test_images, device=device)  # (M, feat)
        return knn_accuracy(memory, self.memory_labels, test, self.test_labels)


# ------------------------------------------------------------------------------- round settings


def round_config(cfg, *, rnd: int, model_spec: dict[str, Any], queue: QueueLink | None) -> RoundConfig:
    """Round ``rnd``'s settings for the sites: every section of ``cfg`` that the round config carries
    (RoundConfig narrows each to the fields a site needs), with the server's own decisions applied."""
    sections = {name: getattr(cfg, name) for name in SECTIONS}
    fresh_push = cfg.queue.fresh_push and cfg.privacy.release in ("raw", "gaussian", "prototypes")
    sections["queue"] = cfg.queue.model_copy(update={"enabled": cfg.queue.enabled and queue is not None,
                                                     "fresh_push": fresh_push})
    sections["model"] = dict(model_spec)  # in_channels resolved from the data or the checkpoint
    return RoundConfig(
        round=rnd, num_rounds=cfg.federation.num_rounds,
        queue_address=queue.address if queue is not None else "",
        queue_tls=queue.tls if queue is not None else False,
        queue_token_dir=str(queue.site_token_dir) if queue is not None and queue.site_token_dir else "",
        **sections)


# ------------------------------------------------------------------------------- release phase


PUBLIC_VIEW_SEED = 7717  # the public set's augmentation: public data, so a public seed


def public_view_generator(cfg: FedclConfig, rnd: int) -> torch.Generator:
    """The generator of round ``rnd``'s augmented views of the public reference set: public data, so
    a seed anyone can compute, a fresh draw per round and run seed."""
    return torch.Generator().manual_seed(PUBLIC_VIEW_SEED + 1_000_003 * cfg.train.seed + rnd)


@dataclass
class ReleaseState:
    """What the server keeps for the embedding releases across rounds (checkpointed)."""

    prototypes: torch.Tensor | None = None  # (P, d) merged prototypes, prototypes mode
    public_images: torch.Tensor | None = None  # (N, C, H, W) uint8, public mode (not checkpointed)

    def to_checkpoint(self) -> dict[str, Any]:
        return {} if self.prototypes is None else {"prototypes": self.prototypes.tolist()}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any] | None) -> ReleaseState:
        protos = (saved or {}).get("prototypes")
        return cls(prototypes=None if protos is None else torch.tensor(protos, dtype=torch.float32))


def load_public_images(cfg) -> torch.Tensor:
    """The server's public reference set for release mode 'public': its own copy of the data set's
    training split (``queue.public_images`` images); no site's data is involved."""
    from fedcl.data import DataError
    from fedcl.runtime import first_n, load_split

    d = cfg.data
    try:
        ds = first_n(load_split(d, split="train"), cfg.queue.public_images, seed=d.seed + 7919)
    except (DataError, OSError) as exc:
        raise FederationError(
            f"privacy.release = 'public' needs a public reference set on the server, but it cannot load "
            f"{d.name!r}: {exc}; point data.path at the public data, or choose another release mode"
        ) from None
    return ds.images


def release_phase(grid: Grid, *, rnd: int, train_messages: list[Message], arrays: ArrayRecord,
                  rc: RoundConfig, cfg, model, queue: QueueLink, state: ReleaseState,
                  timeout: float) -> dict[str, Any]:
    """Fill the queue for round ``rnd`` from the global model the sites are about to receive.

    raw / gaussian: each site of ``train_messages`` gets a query message with the global weights
    and pushes (released) embeddings of its own images under that model; prototypes: each site
    replies with noisy per-prototype sums and counts, which the server merges and pushes as
    site ``prototypes``; public: the server encodes its public reference set and pushes it as
    site ``public`` (no message to the sites). Returns what happened, for the round record.
    """
    from flwr.app import MessageType

    from fedcl.privacy.release import PrototypeRelease, init_prototypes, merge_prototypes
    from fedcl.runtime import make_augment
    from fedcl.train import encode

    mode = cfg.privacy.release
    info: dict[str, Any] = {"mode": mode, "sites_ok": 0, "sites_failed": 0, "errors": [], "pushed": 0}
    if mode == "public":
        if state.public_images is None:
            state.public_images = load_public_images(cfg)
        # one augmented view per image, as the sites' pushes are
        views = public_view_generator(cfg, rnd)
        emb = encode(model, state.public_images, device=torch.device("cpu"),
                     augment=make_augment(cfg.augment), generator=views)  # (N, d) of the global model
        with queue.client(site_id=PUBLIC_SITE) as qc:
            info["pushed"] = qc.push(emb, round=rnd, model_version=rnd - 1)
        return info
    content = {CONFIG_KEY: rc.to_config_record()}
    if mode == "prototypes":
        if state.prototypes is None:
            from fedcl.privacy.release import PROTOTYPE_SEED

            state.prototypes = init_prototypes(num=cfg.privacy.num_prototypes,
                                               dim=int(model.spec["proj_dim"]), seed=PROTOTYPE_SEED)
        content[PROTOTYPES_KEY] = ArrayRecord({"prototypes": state.prototypes.clone()})
    queries = []
    for m in train_messages:
        body = RecordDict({ARRAYS_KEY: arrays, **content})
        queries.append(
            Message(content=body, dst_node_id=m.metadata.dst_node_id, message_type=MessageType.QUERY))
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    sites, _, errors = _site_metrics(replies, queries)
    errors += _unanswered(queries, replies, timeout, "release reply")
    info.update(sites_ok=len(sites), sites_failed=len(errors), errors=errors,
                pushed=int(sum(m.get("pushed", 0.0) for m in sites.values())))
    if mode == "prototypes":
        releases = []
        for reply in replies:
            if reply.has_error() or PROTOTYPES_KEY not in reply.content.array_records:
                continue
            rec = reply.content.array_records[PROTOTYPES_KEY]
            try:
                releases.append(PrototypeRelease(sums=torch.from_numpy(rec["sums"].numpy().copy()),
                                                 counts=torch.from_numpy(rec["counts"].numpy().copy())))
            except KeyError:
                info["errors"].append(
                    f"node {reply.metadata.src_node_id}: prototype release without sums/counts")
        if releases:
            try:
                state.prototypes = merge_prototypes(releases, previous=state.prototypes,
                                                    min_count=cfg.privacy.prototype_min_count)
            except ValueError as exc:  # a malformed release: keep the previous prototypes, say why
                info["errors"].append(f"prototype merge refused: {exc}")
            else:
                with queue.client(site_id=PROTOTYPE_SITE) as qc:
                    info["pushed"] = qc.push(state.prototypes, round=rnd, model_version=rnd - 1)
    for reason in info["errors"]:
        log.warning("round %d release phase: %s", rnd, reason)
    return info


def wait_for_ray(grid: Grid, *, is_ready=None, poll_s: float = 0.1, backstop_s: float = 600.0) -> bool:
    """In Flower's simulation runtime (an ``InMemoryGrid``: `flwr run .` on a local SuperLink) the
    ServerApp thread starts before the runtime initialises Ray in the same process, and Ray starts its
    processes with a preexec_fn: fork(), which runs gRPC's fork handlers; with gRPC threads busy (the
    queue service this run serves, its clients) they can abort Ray's child or block this process, and
    gRPC was imported before fedcl could switch them off. So no gRPC is started here until Ray is up.
    True once it is (at once on any other grid); False, with a warning, after ``backstop_s``."""
    if type(grid).__name__ != "InMemoryGrid":
        return True
    if is_ready is None:
        import ray

        is_ready = ray.is_initialized
    deadline = time.monotonic() + backstop_s
    while not is_ready():
        if time.monotonic() > deadline:
            log.warning("Ray is not initialised after %.0f s; starting the queue without waiting for it",
                        backstop_s)
            return False
        time.sleep(poll_s)
    return True


def wait_for_sites(grid: Grid, minimum: int, *, poll_s: float = 1.0, log_every_s: float = 30.0) -> int:
    """Block until ``minimum`` SuperNodes are connected; returns how many are.

    Flower's FedAvg sizes its sample from the nodes connected when it is called and only then
    waits for ``min_available_nodes``: called while sites are still connecting, it would train
    round 1 on the few that came first. Waiting here first makes fraction_train count them all.
    """
    last_log = -math.inf
    while (connected := len(list(grid.get_node_ids()))) < minimum:
        if time.monotonic() - last_log >= log_every_s:
            log.info("waiting for sites: %d of federation.min_available_nodes = %d connected", connected,
                     minimum)
            last_log = time.monotonic()
        time.sleep(poll_s)
    return connected


def _node_name(node: int, names: dict[int, str] | None) -> str:
    """"site-1 (node 734...)" once the node has said which site it is, else "node 734..."."""
    site = (names or {}).get(node)
    return f"{site} (node {node})" if site else f"node {node}"


def _site_metrics(
    replies: list[Message], sent: list[Message] | None = None, names: dict[int, str] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict], list[str]]:
    """Per-site metrics and ledger summaries of the good replies; reasons of the failed ones.

    ``sent``: the messages the replies answer. An error reply Flower writes itself (a node whose
    heartbeat expired) comes from Flower's node, not the site's; it is named by the message it answers.
    ``names``: {node id: site id} of the nodes that replied before; good replies add to it, and a
    failed node is named by its site id when it is known.
    """
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent or []}
    names = {} if names is None else names
    sites: dict[str, dict[str, float]] = {}
    ledgers: dict[str, dict] = {}
    errors: list[str] = []
    for reply in replies:
        if reply.has_error():
            node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            errors.append(f"{_node_name(node, names)}: {reply.error.reason}")
            continue
        site_id, ledger = parse_site_record(reply.content.config_records.get(SITE_KEY))
        if site_id:
            names[reply.metadata.src_node_id] = site_id
        site_id = site_id or f"node-{reply.metadata.src_node_id}"
        metrics = reply.content.metric_records.get(METRICS_KEY)
        sites[site_id] = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        if ledger:
            ledgers[site_id] = ledger
    return sites, ledgers, errors


def _unanswered(sent: list[Message], replies: list[Message], timeout: float, what: str = "reply",
                names: dict[int, str] | None = None) -> list[str]:
    """A reason for each message that got no reply at all (matched by message id, not by node)."""
    answered = {r.metadata.reply_to_message_id for r in replies}
    return [f"{_node_name(m.metadata.dst_node_id, names)}: no {what} within {timeout:g} s"
            for m in sent if m.metadata.message_id not in answered]


def _weighted(sites: dict[str, dict[str, float]], key: str) -> float | None:
    pairs = [
        (m[key], m.get("num-examples", 1.0)) for m in sites.values() if key in m and math.isfinite(m[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if pairs and total > 0 else None


def _file_sha256(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _arrays_sha256(arrays: ArrayRecord) -> str:
    """Digest of a state dict's raw bytes in key order (identifies the global weights of a round)."""
    digest = hashlib.sha256()
    for key in sorted(arrays.keys()):
        a = arrays[key].numpy()
        digest.update(key.encode())
        digest.update(str(a.dtype).encode() + str(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """The same digest for a canonical state dict (e.g. a checkpoint's)."""
    return _arrays_sha256(ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def queue_rows_lost(previous: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """The queue service's restarts so far and the acknowledged rows its restarts lost since the
    previous round's stats (the service counts both, see fedcl.server.queue_service.PushJournal)."""
    before = int((previous or {}).get("rows_lost") or 0)
    lost = int(now.get("rows_lost") or 0)
    return {"queue_restarts": int(now.get("restarts") or 0), "queue_rows_lost": max(lost - before, 0)}


def _comparable_queue_stats(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("size", "current_round", "per_site", "pushed_total", "oldest_round", "newest_round")
    return {k: stats.get(k) for k in keys}


# ------------------------------------------------------------------------------------ the loop


def audit_round(path: Path | None, *, rnd: int, sites: dict[str, dict[str, float]],
                errors: list[str]) -> None:
    """Coordinator audit: each site's reported epsilon this round, and every failed or refused site."""
    if path is None:
        return
    from fedcl.server.queue_service import AuditLog

    audit = AuditLog(Path(path))  # O_APPEND lines; the queue service may write the same file
    try:
        for site, m in sorted(sites.items()):
            eps = m.get("epsilon")
            audit.write("round_epsilon", round=rnd, site=site,
                        epsilon=None if eps is None or eps < 0 else eps,
                        dp_bound=eps is not None and eps >= 0, epsilon_accounted=m.get("epsilon-accounted"))
        for reason in errors:
            audit.write("round_site_failed", round=rnd, reason=reason)
    finally:
        audit.close()


@dataclass
class _Progress:
    """What a run carries from round to round, and what a checkpoint gives back on resume."""

    history: list[dict[str, Any]] = field(default_factory=list)
    ledgers: dict[str, dict] = field(default_factory=dict)
    release: ReleaseState = field(default_factory=ReleaseState)
    random_init_knn: float | None = None
    start: int = 1  # the first round still to run


@dataclass
class _Trained:
    """One round's training phase: the settings sent, the replies and what they said."""

    rc: RoundConfig
    replies: list[Message]
    sites: dict[str, dict[str, float]]
    ledgers: dict[str, dict]
    errors: list[str]
    release_info: dict[str, Any]
    queue_at_start: dict[str, Any]
    evicted: Any
    weights_sha256: str
    t0: float


def _global_model(cfg):
    """The central evaluator (None when the server has no labelled data) and the initial global
    model, the same weights for the same ``train.seed``."""
    from fedcl.runtime import make_model

    evaluator, why_not = CentralEvaluator.from_config(cfg)
    if evaluator is None:
        log.warning("no central evaluation: %s", why_not)
    else:
        log.info("central kNN evaluation: %s", evaluator.description)
    in_channels = getattr(cfg.model, "in_channels", None) or (evaluator.in_channels if evaluator else None)
    if in_channels is None:
        raise FederationError(
            "the server cannot tell the images' channel count: it has no data to look at "
            f"({why_not}); set model.in_channels, or point data.path at a copy of the evaluation set")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)  # the same initial weights for the same seed
        model = make_model(cfg.model, in_channels=int(in_channels))
    return evaluator, model


# the settings that define what a run learns: a checkpoint written under others belongs to another run.
# Every setting of FedclConfig is in exactly one of the two tables (a test checks it, so a new setting
# has to be placed): a section name alone covers all of its settings.
RUN_DEFINING: dict[str, tuple[str, ...] | None] = {
    "augment": None, "train": None, "queue": None, "privacy": None,
    # how the sites' data is made (the partitions a site started with a partition id trains on)
    "data": ("name", "partition", "num_sites", "alpha", "classes_per_site", "max_images_per_site",
             "synthetic_images", "synthetic_classes", "clutter", "seed"),
    "federation": ("strategy", "strategy_kwargs", "fraction_train"),
}
# what may change between a kill and a resume: where the run computes, reads and writes, how long it
# runs and waits, and what the server evaluates on; the model is compared through its own spec
NOT_RUN_DEFINING = frozenset({
    "train.threads", "train.device",
    "data.path", "data.eval_split", "data.eval_max_images", "data.train_max_images",
    "federation.num_rounds", "federation.min_available_nodes", "federation.min_train_nodes",
    "federation.eval_every", "federation.round_timeout", "federation.fraction_evaluate",
    "model", "server",
})


# run-defining settings added after checkpoints existed, with the value a checkpoint written before the
# setting ran with (read from that checkpoint's own section). A new setting whose default changes what an
# older run did belongs here: without an entry, a resume from an older checkpoint would switch it silently.
FORMER_VALUES: dict[str, Callable[[dict], Any]] = {
    # 726d6d8: before it, the queue term divided by train.temperature
    "train.queue_temperature": lambda train: train.get("temperature"),
}


def config_changes(saved_json: str, now_json: str) -> list[str]:
    """``section.key: saved -> now`` for each run-defining setting that differs between two
    ``dump_config`` JSONs. A setting the saved config lacks (an older fedcl's checkpoint) takes its
    ``FORMER_VALUES`` entry, the value that run had; settings without one are skipped."""
    if not saved_json:
        return []
    saved, now = json.loads(saved_json), json.loads(now_json)
    for name, former in FORMER_VALUES.items():  # fill in what an older checkpoint's run had
        section, key = name.split(".", 1)
        old = saved.get(section)
        if old and key not in old and (value := former(old)) is not None:
            old[key] = value
    changes = []
    for section, keys in RUN_DEFINING.items():
        a, b = saved.get(section) or {}, now.get(section) or {}
        for k in sorted(set(a) & set(b)) if keys is None else keys:
            if k in a and k in b and a[k] != b[k] and f"{section}.{k}" not in NOT_RUN_DEFINING:
                changes.append(f"{section}.{k}: {a[k]!r} -> {b[k]!r}")
    return changes


def _resume_or_start(ckpt_dir: Path, *, model, evaluator: CentralEvaluator | None, queue: QueueLink | None,
                     num_rounds: int, config_json: str, strategy: Any) -> _Progress:
    """Load the last checkpoint into ``model`` (and its round-to-round state into ``strategy``) and
    return its progress, or start afresh (round 1, with the random model's kNN as the baseline)."""
    from fedcl.models import load_canonical_state_dict

    ckpt = find_checkpoint(ckpt_dir)
    if ckpt is None:
        return _Progress(random_init_knn=evaluator.knn(model) if evaluator is not None else None)
    spec = dict(model.spec)
    if ckpt.model_spec != spec:
        raise FederationError(
            f"checkpoint {checkpoint_path(ckpt_dir)} was written for model {ckpt.model_spec}, but the config "
            f"builds {spec}; move the checkpoint folder away to start afresh")
    changes = config_changes(ckpt.config_json, config_json)
    if changes:
        raise FederationError(
            f"checkpoint {checkpoint_path(ckpt_dir)} belongs to a run with other settings "
            f"({'; '.join(changes)}); resume with that run's settings, or start afresh in another output "
            "folder (--out) or after moving the checkpoint folder away")
    load_canonical_state_dict(model, ckpt.state_dict)
    restore_strategy_state(strategy, ckpt.strategy_state)
    progress = _Progress(history=list(ckpt.history), ledgers=dict(ckpt.ledgers), start=ckpt.round + 1,
                         release=ReleaseState.from_checkpoint(ckpt.queue.get("release")))
    if progress.history and progress.history[0].get("random_init_knn") is not None:
        progress.random_init_knn = progress.history[0]["random_init_knn"]
    log.info("resuming from %s: round %d of %d done", checkpoint_path(ckpt_dir), ckpt.round, num_rounds)
    if queue is not None and ckpt.queue.get("stats"):
        with queue.client() as qc:
            now = _comparable_queue_stats(qc.stats())
        saved = _comparable_queue_stats(ckpt.queue["stats"])
        if now != saved:
            log.warning("the queue service's state %s differs from the checkpoint's %s (was the queue "
                        "restarted without its snapshot?); going on with the queue as it is", now, saved)
    return progress


# Server optimizers measured with fedcl's recipe (docs/benchmarks.md, "What was tried" and "Around 2e-3"): on
# top of the sites' kept Adam state they fell behind FedAvg (FedAvgM at 0.3) or stalled (the others).
LOSING_STRATEGIES = {
    "FedAvgM": "server momentum 0.3: behind FedAvg; 0.5: stalled",
    "FedAdam": "server learning rates 1e-3 and 1e-4: stalled",
}


def _log_plan(cfg, *, queue: QueueLink | None, out_dir: Path) -> None:
    num_rounds = cfg.federation.num_rounds
    log.info("fedcl federation: %d rounds, strategy %s, queue %s; writing to %s", num_rounds,
             cfg.federation.strategy, queue.address if queue else "off", out_dir.resolve())
    if cfg.federation.strategy in LOSING_STRATEGIES:
        log.warning(
            "federation.strategy = %s lost to FedAvg in fedcl's cluttered benchmark, with each site's Adam "
            "state kept (%s; docs/benchmarks.md); use FedAvg unless you have measured otherwise",
            cfg.federation.strategy, LOSING_STRATEGIES[cfg.federation.strategy])
    if cfg.train.rounds_per_epoch > 1:  # easy to miss: the same num_rounds now trains k times less
        how = ("1/%d of an epoch's DP-SGD steps over all its images" if cfg.privacy.dpsgd
               else "on 1/%d of its images") % cfg.train.rounds_per_epoch
        log.info(
            "train.rounds_per_epoch = %d: each round a site trains %s, so %d rounds are %g local epochs per "
            "site",
            cfg.train.rounds_per_epoch, how, num_rounds,
            num_rounds * cfg.train.epochs / cfg.train.rounds_per_epoch)


def _round_record(rnd: int, trained: _Trained, *, knn: float | None, random_init_knn: float | None,
                  fed_eval: dict[str, Any], queue_info: dict[str, Any],
                  queue_loss: dict[str, Any]) -> dict[str, Any]:
    """The round's line in metrics.jsonl and the checkpoint's history."""
    sites, errors, release_info = trained.sites, trained.errors, trained.release_info
    # sites report their cumulative ε; a negative value means unbounded (a raw, non-DP release)
    epsilons = [m["epsilon"] for m in sites.values() if "epsilon" in m]
    finite_eps = [e for e in epsilons if 0 <= e < math.inf]
    # and the ε of their accounted channels alone (DP-SGD updates, DP releases), bounded even when a raw
    # release leaves the whole ε without one
    accounted = [e for m in sites.values() if 0 <= (e := m.get("epsilon-accounted", -1.0)) < math.inf]
    return {
        "round": rnd,
        "time": time.time(),
        "seconds": time.time() - trained.t0,
        "loss": _weighted(sites, "loss"),
        "knn": knn,
        "random_init_knn": random_init_knn if rnd == 1 else None,
        "negatives_used": _weighted(sites, "negatives-used"),
        "pushed": sum(m.get("pushed", 0.0) for m in sites.values()) + release_info.get("pushed", 0),
        "release_phase": {k: v for k, v in release_info.items() if k != "errors"} | (
            {"errors": release_info["errors"]} if release_info.get("errors") else {}),
        "queue_size": queue_info.get("size_in_round"),  # during the round, after its pushes
        "epsilon": max(finite_eps) if finite_eps else None,
        "epsilon_unbounded": any(e < 0 or e == math.inf for e in epsilons),
        "epsilon_accounted": max(accounted) if accounted else None,
        "sites_ok": len(sites),
        "sites_failed": len(errors),
        "errors": errors,
        "sites": sites,
        "fed_eval": fed_eval,
        "queue": queue_info.get("stats", {}),
        "queue_at_start": trained.queue_at_start,
        **queue_loss,  # queue_restarts, queue_rows_lost (since the previous round)
        "weights_sha256": trained.weights_sha256,  # of the global weights sent out this round
    }


@dataclass
class _Federation:
    """One run's fixed parts; each method is one step of a round (train, aggregate, evaluate,
    advance the queue, checkpoint), in the order ``run_federation`` calls them."""

    grid: Grid
    cfg: Any
    queue: QueueLink | None
    strategy: Any
    model: Any
    evaluator: CentralEvaluator | None
    ckpt_dir: Path
    round_timeout: float
    fraction_evaluate: float  # per-site, label-free check of the final model; 0 switches it off
    capacity_warned: bool = False
    site_names: dict[int, str] = field(default_factory=dict)  # node id -> site id, from the sites' replies

    def train(self, rnd: int, arrays: ArrayRecord, release_state: ReleaseState) -> _Trained | None:
        """Send round ``rnd`` to the sampled sites (after the release phase, when there is one) and
        collect their replies; None when every site refused on its privacy budget."""
        cfg, queue, timeout = self.cfg, self.queue, self.round_timeout
        wait_for_sites(self.grid, cfg.federation.min_available_nodes)
        t0 = time.time()
        queue_at_start: dict[str, Any] = {}
        evicted = None
        if queue is not None:
            with queue.client() as qc:
                evicted = qc.advance(rnd)
                queue_at_start = qc.stats()
        weights_sha256 = _arrays_sha256(arrays)
        rc = round_config(cfg, rnd=rnd, model_spec=dict(self.model.spec), queue=queue)
        messages = list(self.strategy.configure_train(rnd, arrays, rc.to_config_record(), self.grid))
        if (
            queue is not None
            and rc.train.num_push * len(messages) > cfg.queue.capacity
            and not self.capacity_warned
        ):
            self.capacity_warned = True  # the ring buffer would drop the first sites' pushes of a round
            log.warning(
                "%d sites x train.num_push %d exceed queue.capacity %d: negatives would come from the "
                "last sites to push only; raise queue.capacity",
                len(messages), rc.train.num_push, cfg.queue.capacity)
        release_info: dict[str, Any] = {}
        if (
            queue is not None
            and rc.use_queue_negatives
            and (rc.release_phase or cfg.privacy.release == "public")
        ):
            release_info = release_phase(self.grid, rnd=rnd, train_messages=messages, arrays=arrays, rc=rc,
                                         cfg=cfg, model=self.model, queue=queue, state=release_state,
                                         timeout=timeout)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sites, ledgers, errors = _site_metrics(replies, messages, self.site_names)
        # neither replied nor errored
        errors += _unanswered(messages, replies, timeout, names=self.site_names)
        for reason in errors:
            log.warning("round %d: a site failed: %s", rnd, reason)
        if not sites and errors and sum(is_budget_refusal(r) for r in replies) == len(errors):
            log.warning("round %d: every site refused on its privacy budget; the run stops cleanly", rnd)
            return None
        if not sites:
            raise FederationError(
                f"round {rnd}: no site completed training ({len(errors)} failed"
                f"{': ' + errors[0] if errors else ', none answered within ' + str(timeout) + ' s'})")
        return _Trained(rc=rc, replies=replies, sites=sites, ledgers=ledgers, errors=errors,
                        release_info=release_info, queue_at_start=queue_at_start, evicted=evicted,
                        weights_sha256=weights_sha256, t0=t0)

    def aggregate(self, rnd: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        """The strategy's new global weights (the old ones when it returns none), loaded into the model."""
        from fedcl.models import load_canonical_state_dict

        new_arrays, _ = self.strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        load_canonical_state_dict(self.model, arrays.to_torch_state_dict())
        return arrays

    def evaluate(self, rnd: int, arrays: ArrayRecord, rc: RoundConfig) -> tuple[float | None, dict[str, Any]]:
        """Central kNN (every ``eval_every`` rounds and the last) and, after the last round, the
        sites' label-free check (alignment, uniformity)."""
        num_rounds = self.cfg.federation.num_rounds
        fed_eval: dict[str, Any] = {}
        if rnd == num_rounds and self.fraction_evaluate > 0:
            eval_msgs = list(self.strategy.configure_evaluate(rnd, arrays, rc.to_config_record(), self.grid))
            eval_replies = list(self.grid.send_and_receive(eval_msgs, timeout=self.round_timeout))
            eval_sites, _, eval_errors = _site_metrics(eval_replies, eval_msgs, self.site_names)
            fed_eval = {"sites": eval_sites, "failed": len(eval_errors)}
            for key in ("alignment", "uniformity"):
                fed_eval[key] = _weighted(eval_sites, key)
        knn = None
        if self.evaluator is not None and (rnd % self.cfg.federation.eval_every == 0 or rnd == num_rounds):
            knn = self.evaluator.knn(self.model)
        return knn, fed_eval

    def advance_queue(self, rnd: int, trained: _Trained, progress: _Progress) -> tuple[dict, dict]:
        """``Advance(rnd + 1)`` (the service snapshots then); the queue's part of the record and
        checkpoint, and the rows a restart without snapshot lost."""
        queue = self.queue
        if queue is None:
            return {}, {}
        with queue.client() as qc:
            in_round = qc.stats()  # what the sites sampled from (max_staleness 0: gone after Advance)
            qc.advance(rnd + 1)  # the queue service snapshots on Advance
            stats = qc.stats()
        history = progress.history
        queue_loss = queue_rows_lost(history[-1].get("queue") if history else None, stats)
        if queue_loss["queue_rows_lost"]:
            log.warning("round %d: the queue service restarted without a snapshot and lost %d rows it had "
                        "acknowledged (pushes after its last Advance); this round's negatives were fewer",
                        rnd, queue_loss["queue_rows_lost"])
        queue_info = {"stats": stats, "size_in_round": in_round.get("size"),
                      "evicted_at_start": trained.evicted, "release": progress.release.to_checkpoint(),
                      "snapshot_path": str(queue.snapshot_path) if queue.snapshot_path else None,
                      "snapshot_sha256": _file_sha256(queue.snapshot_path)}
        return queue_info, queue_loss

    def checkpoint(self, rnd: int, *, queue_info: dict[str, Any], progress: _Progress,
                   config_json: str) -> None:
        from fedcl.models import canonical_state_dict

        cfg = self.cfg
        save_checkpoint(checkpoint_path(self.ckpt_dir), FederationCheckpoint(
            round=rnd, state_dict=canonical_state_dict(self.model), model_spec=dict(self.model.spec),
            queue=queue_info, ledgers=progress.ledgers, history=progress.history, config_json=config_json,
            strategy=cfg.federation.strategy, strategy_state=strategy_state(self.strategy)))


def _write_outputs(cfg, *, out_dir: Path, model, progress: _Progress, stopped_for_budget: int | None,
                   ) -> FederationResult:
    """The final encoder, the plots and summary.json, once the rounds are over."""
    from fedcl.models import save_encoder

    history, random_init_knn, start = progress.history, progress.random_init_knn, progress.start
    encoder_path = out_dir / ENCODER_NAME
    final_knn = next((r["knn"] for r in reversed(history) if r.get("knn") is not None), None)
    save_encoder(encoder_path, model=model, meta={
        "trained": "federated", "rounds": cfg.federation.num_rounds, "strategy": cfg.federation.strategy,
        "data": cfg.data.name, "final_knn": final_knn, "random_init_knn": random_init_knn,
        "queue": cfg.queue.enabled,
    })
    plots = write_plots(history, out_dir, random_init_knn=random_init_knn,
                        epsilon_budget=cfg.privacy.epsilon_budget)
    (out_dir / "summary.json").write_text(json.dumps({
        "rounds": len(history), "final_knn": final_knn, "random_init_knn": random_init_knn,
        "encoder": str(encoder_path), "resumed_from": start - 1, "ledgers": progress.ledgers,
        "stopped_for_privacy_budget_at_round": stopped_for_budget,
    }, indent=2, sort_keys=True))
    return FederationResult(history=history, random_init_knn=random_init_knn, final_knn=final_knn,
                            encoder_path=encoder_path, resumed_from=start - 1, plots=plots,
                            ledgers=progress.ledgers, stopped_for_privacy_budget_at_round=stopped_for_budget)


def run_federation(
    grid: Grid,
    *,
    config,
    out_dir: Path,
    queue: QueueLink | None,
    observer: RoundObserver | None = None,
) -> FederationResult:
    """Run (or resume) the federation of ``config`` on ``grid``; outputs go to ``out_dir``."""
    from fedcl.config import dump_config
    from fedcl.models import canonical_state_dict
    from fedcl.runtime import configure_threads

    cfg = config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(cfg.server.checkpoint_dir) if cfg.server.checkpoint_dir else out_dir / "checkpoints"
    num_rounds = cfg.federation.num_rounds
    configure_threads(cfg.train.threads)
    if not cfg.queue.enabled:
        queue = None
    evaluator, model = _global_model(cfg)
    fed = _Federation(
        grid=grid, cfg=cfg, queue=queue, model=model, evaluator=evaluator, ckpt_dir=ckpt_dir,
        round_timeout=float(getattr(cfg.federation, "round_timeout", DEFAULT_ROUND_TIMEOUT)),
        fraction_evaluate=float(getattr(cfg.federation, "fraction_evaluate", 1.0)),
        strategy=build_strategy(
            cfg.federation.strategy, fraction_train=cfg.federation.fraction_train,
            min_train_nodes=cfg.federation.min_train_nodes,
            min_available_nodes=cfg.federation.min_available_nodes,
            fraction_evaluate=float(getattr(cfg.federation, "fraction_evaluate", 1.0)),
            extra=getattr(cfg.federation, "strategy_kwargs", None)))
    config_json = dump_config(cfg)
    progress = _resume_or_start(ckpt_dir, model=model, evaluator=evaluator, queue=queue,
                                num_rounds=num_rounds, config_json=config_json, strategy=fed.strategy)
    if queue is not None and cfg.privacy.release == "public":
        progress.release.public_images = load_public_images(cfg)  # fail now, not after round 1
    _log_plan(cfg, queue=queue, out_dir=out_dir)
    metrics_log = MetricsLog(out_dir, tensorboard=cfg.server.tensorboard)
    metrics_log.reset(progress.history)
    if observer is not None:
        observer.on_start(start_round=progress.start, num_rounds=num_rounds,
                          initial_knn=progress.random_init_knn)
    arrays = ArrayRecord(canonical_state_dict(model))
    stopped_for_budget: int | None = None
    try:
        for rnd in range(progress.start, num_rounds + 1):
            trained = fed.train(rnd, arrays, progress.release)
            if trained is None:
                stopped_for_budget = rnd
                break
            progress.ledgers.update(trained.ledgers)
            arrays = fed.aggregate(rnd, arrays, trained.replies)
            knn, fed_eval = fed.evaluate(rnd, arrays, trained.rc)
            queue_info, queue_loss = fed.advance_queue(rnd, trained, progress)
            record = _round_record(rnd, trained, knn=knn, random_init_knn=progress.random_init_knn,
                                   fed_eval=fed_eval, queue_info=queue_info, queue_loss=queue_loss)
            progress.history.append(record)
            metrics_log.write(record)
            audit_round(getattr(cfg.server, "audit_log", None), rnd=rnd, sites=trained.sites,
                        errors=trained.errors)
            fed.checkpoint(rnd, queue_info=queue_info, progress=progress, config_json=config_json)
            log.info("%s", format_round_line(record, num_rounds=num_rounds))
            if observer is not None:
                observer.on_round(record)
    finally:
        metrics_log.close()
    return _write_outputs(cfg, out_dir=out_dir, model=model, progress=progress,
                          stopped_for_budget=stopped_for_budget)


# ------------------------------------------------------------------------------ the ServerApps


def load_run_config(run_config: dict[str, Any]):
    """FedclConfig from the run config's ``config-path`` (TOML, or the JSON fedcl-server writes)."""
    from pydantic import ValidationError

    from fedcl.config import ConfigError, FedclConfig, format_validation_error, load_config

    path = str(run_config.get("config-path", "") or "")
    if not path:
        return load_config(None)
    if path.endswith(".json"):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            return FedclConfig.model_validate_json(p.read_text())
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source=str(p))) from None
    return load_config(path)


def make_server_app(*, config, out_dir: Path, queue: QueueLink | None,
                    observer: RoundObserver | None = None, results: list | None = None) -> ServerApp:
    """A ServerApp with its settings baked in (``fedcl simulate``); ``results`` receives the result."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result = run_federation(grid, config=config, out_dir=out_dir, queue=queue, observer=observer)
        if results is not None:
            results.append(result)

    return server_app


app = ServerApp()


def run_with_loopback_queue(grid: Grid, *, config, out_dir: Path) -> FederationResult:
    """The federation with a queue service of its own, on 127.0.0.1, started for the run and stopped
    after it (``fedcl.server.loopback``): ``flwr run .`` when the run's config names no queue service.

    Tokens go to sites ``site-0`` .. ``site-{n-1}`` (n: the connected SuperNodes, at least
    ``data.num_sites``), each in its own owner-only file, removed with the run; the round config
    says where (``RoundConfig.queue_token_dir``), and only a simulated site on this machine reads it.
    """
    from dataclasses import replace

    from fedcl.server.loopback import loopback_queue, site_token_files

    out_dir = Path(out_dir).resolve()  # the sites read their tokens from their own processes
    connected = wait_for_sites(grid, config.federation.min_available_nodes)
    site_ids = [f"site-{i}" for i in range(max(connected, config.data.num_sites))]
    with loopback_queue(config, out_dir=out_dir, site_ids=site_ids) as (link, tokens), \
            site_token_files(out_dir, tokens) as token_dir:
        log.info(
            "no queue service is configured for this run (server.coordinator_token is unset): serving one "
            "on %s for this run only; sites on other machines cannot reach it (a deployment starts its runs "
            "with fedcl-server)",
            link.address)
        return run_federation(grid, config=config, out_dir=out_dir,
                              queue=replace(link, site_token_dir=token_dir))


def flower_runtime_env_note(environ: dict[str, str]) -> str | None:
    """One line when Flower installed this app's dependencies into a per-run environment (its
    default for a SuperLink it manages): the whole PyTorch stack again, for every run."""
    venv = environ.get("VIRTUAL_ENV", "")
    if f"{os.sep}runtime-envs{os.sep}" not in venv:
        return None
    return (
        f"Flower installed fedcl's dependencies into a per-run environment ({venv}) for this run; to run on "
        "the packages already installed, stop Flower's local SuperLink and start the next `flwr run` with "
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (docs/flower.md)")


def _after_a_local_run(context: Context, out_dir: Path) -> None:
    """On Flower's managed local SuperLink (`flwr run .`), have it stopped once this run is over,
    unless the run config says ``keep-local-superlink=true`` (docs/flower.md)."""
    from fedcl.server.flower_local import start_superlink_reaper

    if str(context.run_config.get("keep-local-superlink", False)).lower() in ("true", "1"):
        log.info("keep-local-superlink is set: Flower's local SuperLink, if this run is on it, stays up")
        return
    log.info("%s", start_superlink_reaper(context.run_id, out_dir))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """What `flwr run` starts: settings from the run config's ``config-path`` (fedcl-server writes
    one for its runs); with no queue service configured (``flwr run .`` on Flower's local
    simulation) the run serves its own on loopback."""
    cfg = load_run_config(dict(context.run_config))
    out_dir = Path(str(context.run_config.get("out-dir", "") or cfg.server.out_dir))
    log.info("fedcl: %d rounds, %s data; output in %s", cfg.federation.num_rounds, cfg.data.name,
             out_dir.resolve())
    if note := flower_runtime_env_note(dict(os.environ)):
        log.warning("%s", note)
    if cfg.queue.enabled and cfg.server.coordinator_token is None and cfg.server.site_tokens:
        # sites with tokens of their own (fedcl-client) cannot use a queue this run would serve with new ones
        reason = (
            "this config lists server.site_tokens (sites holding their own queue tokens) but no "
            "server.coordinator_token, so the run cannot drive their queue service: set "
            "server.coordinator_token (deploy/make_certs.py writes one) and start the queue with "
            "`fedcl-server queue --config FILE`, or run the whole federation with "
            "`fedcl-server --config FILE`"
        )
        log.error("%s", reason)
        raise FederationError(reason)
    wait_for_ray(grid)
    if cfg.queue.enabled and cfg.server.coordinator_token is None:
        try:
            run_with_loopback_queue(grid, config=cfg, out_dir=out_dir)
        finally:
            _after_a_local_run(context, out_dir)
        return
    queue = QueueLink.from_config(cfg, out_dir=out_dir) if cfg.queue.enabled else None
    run_federation(grid, config=cfg, out_dir=out_dir, queue=queue)


__all__ = ["CentralEvaluator", "FederationError", "FederationResult", "QueueLink", "app", "load_run_config",
           "flower_runtime_env_note", "make_server_app", "round_config", "run_federation",
           "run_with_loopback_queue", "wait_for_ray"]
