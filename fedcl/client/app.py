"""Flower ClientApp: one site's side of a fedcl round.

Per train message: load the global weights, draw K negatives from the global queue (other sites'
embeddings, at most ``max_staleness`` rounds old; none during warm-up), run
``fedcl.train.local_round``, push the embeddings of the round's global model to the queue, and
reply with the trained weights and the round's metrics.

Site settings come from Flower's node config (``fedcl-client`` sets them):

    site-id            the site's name at the queue service (also its ledger's name)
    data-path          its images: a MedMNIST .npz, a Fashion-MNIST IDX folder, or an image folder
                       (absent with a partition id: the server's demo data set at its default place)
    data-format        auto | medmnist | fashion-mnist | folder | synthetic (default auto)
    partition-id       with num-partitions: take this part of a shared demo data set
    num-partitions     (the split itself follows the server's data settings)
    max-images         use at most this many images (demo caps)
    queue-token-file   file holding the site's bearer token for the queue service
    root-certificates  CA certificate (PEM) that signed the queue service's TLS certificate
    insecure           true: plain-text queue connection (loopback tests only)
    queue-address      how this site reaches the queue, when not as the server advertises it
    state-dir          where this site keeps state that outlives a round (privacy ledger)
    policy-file        the site's own privacy policy (TOML [policy]); stricter than the server wins
    threads            torch intra-op threads
    patient-regex      image folders: the pattern that finds each file's patient id in its name
    insecure-reproducible-dp
                       true: the DP mechanisms draw from public seeds so a benchmark reproduces;
                       NOT private (warns at every use). Only the site sets it, never the server.

Flower starts a fresh ClientApp process per message in deployment, so nothing here relies on
memory across rounds: public seeds (augmentation, shares) derive from (seed, site, round), and
the ledger lives in state-dir, which every DP mode requires. The randomness of the DP
mechanisms (Poisson batches, release picks and noise, DP-SGD noise) is drawn from OS entropy in
this process (``fedcl.privacy.randomness``): the coordinator knows every seed, so it must not
be able to replay them. Under a DP mode the replies carry no un-noised statistic of the images
(no loss, alignment or uniformity); docs/privacy.md lists what they do carry and why.
In simulation (Ray) the same handlers run inside long-lived actors; ``make_client_app`` bakes in
the simulated sites' settings (data set partition, tokens) and caches the loaded data.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl.client.privacy import (
    RoundPrivacy,
    dp_mode,
    plan_round,
    record_round,
    release_prototype_sums,
    round_metrics,
)
from fedcl.client.privacy import release as release_embeddings
from fedcl.config import SitePrivacySettings
from fedcl.privacy.randomness import mechanism_generator
from fedcl.privacy.release import LazyRecords
from fedcl.wire.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    PROTOTYPES_KEY,
    SITE_KEY,
    ProtocolError,
    RoundConfig,
    budget_refusal_reply,
    site_record,
)

log = logging.getLogger("fedcl.client")


DATA_FORMATS = ("auto", "medmnist", "fashion-mnist", "folder", "synthetic")


class SiteError(RuntimeError):
    """This site cannot take part as configured; the message says what to change."""


@dataclass(frozen=True)
class SiteSettings:
    """Where a site's data, credentials and state are; validated once from the node config."""

    site_id: str
    data_path: Path | None = None
    data_format: str = "auto"
    partition_id: int | None = None
    num_partitions: int | None = None
    max_images: int | None = None
    queue_token: str | None = field(default=None, repr=False)
    root_certificates: Path | None = None
    insecure: bool = False
    queue_address: str | None = None
    state_dir: Path | None = None
    threads: int | None = None
    policy_file: Path | None = None
    patient_regex: str | None = None
    insecure_reproducible_dp: bool = False

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> SiteSettings:
        def opt_str(key: str) -> str | None:
            v = node_config.get(key)
            if v is None or v == "":
                return None
            return str(v)

        def opt_int(key: str) -> int | None:
            v = node_config.get(key)
            if v is None or v == "":
                return None
            try:
                return int(v)
            except (TypeError, ValueError):
                raise SiteError(f"node config {key}={v!r} must be an integer") from None

        partition_id, num_partitions = opt_int("partition-id"), opt_int("num-partitions")
        site_id = opt_str("site-id") or (f"site-{partition_id}" if partition_id is not None else None)
        if site_id is None:
            raise SiteError("node config has no site-id; start the site with fedcl-client --site-id NAME")
        data_format = opt_str("data-format") or "auto"
        if data_format not in DATA_FORMATS:
            raise SiteError(
                f"node config data-format={data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
        if (partition_id is None) != (num_partitions is None):
            raise SiteError("node config needs both partition-id and num-partitions, or neither")
        if partition_id is not None and not 0 <= partition_id < num_partitions:  # type: ignore[operator]
            raise SiteError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")  # type: ignore[operator]
        token = None
        token_file = opt_str("queue-token-file")
        if token_file is not None:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise SiteError(
                    f"cannot read the queue token file {token_file}: {exc.strerror or exc}") from None
            if not token:
                raise SiteError(f"queue token file {token_file} is empty")
        def flag(key: str) -> bool:
            v = node_config.get(key, False)
            return v.lower() in ("1", "true", "yes") if isinstance(v, str) else bool(v)

        insecure = flag("insecure")
        data_path = opt_str("data-path")
        certs = opt_str("root-certificates")
        state_dir = opt_str("state-dir")
        policy_file = opt_str("policy-file")
        return cls(
            site_id=site_id,
            data_path=Path(data_path) if data_path else None,
            data_format=data_format,
            partition_id=partition_id,
            num_partitions=num_partitions,
            max_images=opt_int("max-images"),
            queue_token=token,
            root_certificates=Path(certs) if certs else None,
            insecure=bool(insecure),
            queue_address=opt_str("queue-address"),
            state_dir=Path(state_dir) if state_dir else None,
            threads=opt_int("threads"),
            policy_file=Path(policy_file) if policy_file else None,
            patient_regex=opt_str("patient-regex"),
            insecure_reproducible_dp=flag("insecure-reproducible-dp"),
        )


@dataclass(frozen=True)
class SimulatedSites:
    """What ``fedcl simulate`` bakes into its ClientApp: the shared data set and the sites' tokens.

    ``config`` is the run's FedclConfig; site i is partition i of ``config.data``.
    """

    config: Any  # fedcl.config.FedclConfig (kept loose: pickled into Ray actors)
    site_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    state_root: Path | None = None
    threads: int | None = None
    insecure_reproducible_dp: bool = False  # benchmarks: public DP seeds, NOT private

    def site(self, node_config: dict[str, Any]) -> SiteSettings:
        pid = int(node_config["partition-id"])
        site_id = f"site-{pid}"
        return SiteSettings(
            site_id=site_id,
            data_format="simulation",
            partition_id=pid,
            num_partitions=int(node_config.get("num-partitions", self.config.data.num_sites)),
            queue_token=self.site_tokens.get(site_id),
            insecure=True,
            state_dir=None if self.state_root is None else self.state_root / site_id,
            threads=self.threads,
            insecure_reproducible_dp=self.insecure_reproducible_dp,
        )


# ------------------------------------------------------------------------------------ site data

# Per process; a Ray actor serves many simulated sites. Whole data sets (a few, large) are kept;
# partitions (one per site, small) live in an LRU sized for hundreds of sites, so an actor does not
# reload the data set every few sites (measured by bench/scale.py at 100 sites).
_DATA_CACHE: dict[tuple, Any] = {}
_PART_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_MAX_DATASETS, _MAX_PARTS = 4, 512


def _cached(key: tuple, load):
    partition = key[0] in ("sim-part", "demo-part", "part")
    cache = _PART_CACHE if partition else _DATA_CACHE
    if key in cache:
        if partition:
            _PART_CACHE.move_to_end(key)
        return cache[key]
    value = load()
    if partition:
        _PART_CACHE[key] = value
        while len(_PART_CACHE) > _MAX_PARTS:
            _PART_CACHE.popitem(last=False)
    else:
        if len(_DATA_CACHE) >= _MAX_DATASETS:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = value
    return value


def _detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".npz":
        return "medmnist"
    if path.is_dir() and any(path.glob("train-images-idx3-ubyte*")):
        return "fashion-mnist"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise SiteError(
            f"site data {path} is neither a .npz file nor a folder: give a MedMNIST-style .npz, a "
            "Fashion-MNIST IDX folder or an image folder (or --data-format to say which)")
    raise SiteError(
        f"site data {path} does not exist (give fedcl-client --data a .npz file or an image folder)")


def load_site_images(site: SiteSettings, rc: RoundConfig, simulated: SimulatedSites | None) -> torch.Tensor:
    """The site's training images, uint8 (N, C, H, W) (``fedcl.client.site_data.load_site_data`` decides
    which: the simulated partition, the demo set's partition, or the site's own data)."""
    from fedcl.client.site_data import load_site_data

    images = load_site_data(site, rc, simulated).images
    if images.shape[0] == 0:
        raise SiteError(f"site {site.site_id} has no images at {site.data_path}")
    return images


# ------------------------------------------------------------------------------------- privacy


def site_privacy_settings(site: SiteSettings, rc: RoundConfig) -> dict[str, Any]:
    """The server's privacy settings checked against this site's policy (fedcl.client.policy)."""
    from fedcl.client.policy import PolicyViolation, enforce
    from fedcl.config import ConfigError, load_site_policy

    try:
        policy = load_site_policy(site.policy_file)
    except ConfigError as exc:
        raise SiteError(str(exc)) from None
    try:
        return enforce(policy, rc.privacy.model_dump())
    except PolicyViolation as exc:
        raise SiteError(f"site {site.site_id}: {exc}") from None


# -------------------------------------------------------------------------------------- handlers


def _site(context: Context, simulated: SimulatedSites | None) -> SiteSettings:
    node_config = dict(context.node_config)
    if simulated is not None:
        return simulated.site(node_config)
    return SiteSettings.from_node_config(node_config)


def _round_seed(seed: int, site_id: str, rnd: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(site_id.encode()) * 1009 + rnd) % (2**31 - 1)


OPTIMIZER_KEY = "fedcl.optimizer"  # Context.state: the optimizer's tensors (train.persist_optimizer)
OPTIMIZER_META_KEY = "fedcl.optimizer.meta"  # Context.state: its param groups and which optimizer


def save_optimizer_state(context: Context, state: dict, *, optimizer: str) -> None:
    """Keep ``torch.optim.Optimizer.state_dict()`` in the node's Context.state for the next round."""
    arrays = {f"{pid}/{name}": torch.as_tensor(value).detach().cpu()
              for pid, per_param in state["state"].items() for name, value in per_param.items()}
    context.state[OPTIMIZER_KEY] = ArrayRecord(arrays)
    context.state[OPTIMIZER_META_KEY] = ConfigRecord({"optimizer": optimizer,
                                                      "param_groups": json.dumps(state["param_groups"])})


def load_optimizer_state(context: Context, *, optimizer: str) -> dict | None:
    """The state ``save_optimizer_state`` kept, or None when there is none for this optimizer."""
    if OPTIMIZER_KEY not in context.state or OPTIMIZER_META_KEY not in context.state:
        return None
    meta = context.state[OPTIMIZER_META_KEY]
    if meta.get("optimizer") != optimizer:
        return None  # the server switched optimizers: start cold
    per_param: dict[int, dict] = {}
    for key, value in context.state[OPTIMIZER_KEY].to_torch_state_dict().items():
        pid, name = key.split("/", 1)
        per_param.setdefault(int(pid), {})[name] = value
    return {"state": per_param, "param_groups": json.loads(meta["param_groups"])}


def round_share(num_images: int, rc: RoundConfig, site_id: str) -> torch.Tensor | None:
    """Indices of the images this round trains on when ``rc.train.rounds_per_epoch`` k > 1 (None: all).

    Rounds (e - 1) k + 1 ... e k make epoch e: one permutation of the site's images, drawn from
    (seed, site, epoch), split into k shares, round by round. The client process is new for every
    message, so the permutation is recomputed, never stored.
    """
    k = rc.train.rounds_per_epoch
    if k <= 1:
        return None
    epoch, part = divmod(rc.round - 1, k)
    # negative "rounds": rounds are >= 1, so this never reuses a round's seed
    gen = torch.Generator().manual_seed(_round_seed(rc.train.seed, site_id, -1 - epoch))
    return torch.randperm(num_images, generator=gen).tensor_split(k)[part]


def _build_model(rc: RoundConfig, msg: Message):
    from fedcl.models import build_model, load_canonical_state_dict

    spec = rc.model.model_dump()
    if spec["in_channels"] is None:
        raise ProtocolError(
            "round config model spec has no in_channels; is the server running the same fedcl version?")
    try:
        model = build_model(**spec)
    except TypeError as exc:
        raise ProtocolError(f"round config model spec {spec} does not build a model: {exc}") from None
    arrays = msg.content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ProtocolError("train message carries no 'arrays' record")
    state = {k: v.float() if v.is_floating_point() else v for k, v in arrays.to_torch_state_dict().items()}
    try:
        load_canonical_state_dict(model, state)
    except (ValueError, RuntimeError) as exc:
        raise ProtocolError(f"global weights do not fit the model spec {spec}: {exc}") from None
    return model


def _queue_client(site: SiteSettings, rc: RoundConfig):
    from fedcl.wire.queue_client import QueueClient

    certs = None
    if rc.queue_tls and not site.insecure:
        if site.root_certificates is None:
            raise SiteError("the queue service uses TLS: start the site with --root-certificates CA.pem "
                            "(or --insecure for a loopback test)")
        try:
            certs = site.root_certificates.read_bytes()
        except OSError as exc:
            raise SiteError(
                f"cannot read root certificates {site.root_certificates}: {exc.strerror or exc}") from None
    return QueueClient(site.queue_address or rc.queue_address, site_id=site.site_id,
                       token=_queue_token(site, rc), root_certificates=certs, timeout=30.0)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _queue_token(site: SiteSettings, rc: RoundConfig) -> str | None:
    """The site's own token; else, for a simulated site (a partition id) of a run that serves its own
    queue on this machine (``flwr run .``), the token the ServerApp left it in ``rc.queue_token_dir``."""
    if site.queue_token is not None or not rc.queue_token_dir or site.partition_id is None:
        return site.queue_token
    address = site.queue_address or rc.queue_address
    if address.rpartition(":")[0] not in LOOPBACK_HOSTS:
        return None  # a run's own queue is on loopback; never read a token file for another host
    path = Path(rc.queue_token_dir) / f"{site.site_id}.token"
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SiteError(
            f"site {site.site_id} has no token from this run's own queue service "
            f"({path}: {exc.strerror or exc}): the run made tokens for data.num_sites sites; "
            "set data.num_sites to Flower's num-supernodes") from None


def _plan(site: SiteSettings, rc: RoundConfig, images: torch.Tensor,
          groups: torch.Tensor | None) -> RoundPrivacy:
    """This round's privacy plan for the site's images (both phases of a round plan it alike).

    Refuses (SiteError, before any training) a DP mode without a state folder (the ledger would
    start from zero every message, so no budget could bind across rounds) and settings the plan
    rejects (δ >= 1/N, DP-SGD with in-batch negatives)."""
    settings = site_privacy_settings(site, rc)
    private = dp_mode(SitePrivacySettings.model_validate(settings))
    if site.state_dir is None and private:
        raise SiteError(
            f"site {site.site_id} has no state folder (node config state-dir), and under DP its "
            "privacy ledger must persist between rounds: start it with fedcl-client --state-dir DIR")
    try:
        rp = plan_round(privacy=settings, site_id=site.site_id, state_dir=site.state_dir,
                        round=rc.round, num_rounds=rc.num_rounds, epochs=rc.train.epochs,
                        batch_size=rc.train.batch_size, num_examples=int(images.shape[0]),
                        in_batch_negatives=rc.train.in_batch_negatives, groups=groups,
                        rounds_per_epoch=rc.train.rounds_per_epoch)
    except ValueError as exc:
        raise SiteError(f"site {site.site_id}: {exc}") from None
    if private and site.insecure_reproducible_dp and rp.ledger is not None:
        rp.ledger.insecure_randomness = True  # the report then says the site is not protected
    return rp


def _this_rounds_share(images: torch.Tensor, groups, rc: RoundConfig, site_id: str):
    """The images (and their groups) a site trains on this round.

    DP-SGD: every step Poisson-samples the whole data set (the rate the accountant is told), and
    shorter rounds take fewer steps instead (plan_round); other rounds train on their share."""
    share = None if rc.privacy.dpsgd else round_share(int(images.shape[0]), rc, site_id)
    if share is None:
        return images, groups
    images = images[share]
    groups = None if groups is None else groups[share]
    if images.shape[0] == 0:  # (load_site_images already refused a site with no images at all)
        raise SiteError(
            f"site {site_id} has fewer images than rounds_per_epoch ({rc.train.rounds_per_epoch})")
    return images, groups


def _push_after_training(queue, privacy, embeddings: torch.Tensor, rc: RoundConfig, *, negatives,
                         generator) -> int:
    """Release and push the round's embeddings (n, d) as the privacy settings say; rows pushed."""
    if embeddings.shape[0] == 0:
        return 0
    prototypes = None
    if privacy.settings.release == "prototypes" and rc.use_queue_negatives and negatives is not None:
        prototypes = negatives  # other sites' released (DP) prototype directions: public
    to_push = release_embeddings(privacy, embeddings, round=rc.round, prototypes=prototypes,
                                 generator=generator)
    if to_push.shape[0] == 0:
        return 0
    return queue.push(to_push, round=rc.round, model_version=rc.round)


def _train_seconds(m: dict, *, total: float, sample: float, push: float) -> dict[str, float]:
    """Where a train round's time went, from local_round's metrics and the handler's own clocks."""
    return {
        "seconds-total": total,
        "seconds-sample": sample,
        "seconds-train": float(m["seconds_augment"] + m["seconds_train"]),
        "seconds-push": push + float(m["seconds_encode_push"]),
    }


def train_handler(msg: Message, context: Context, simulated: SimulatedSites | None = None) -> Message:
    from fedcl.client.site_data import load_site_groups
    from fedcl.runtime import configure_threads, make_augment
    from fedcl.train import INSECURE_REPRODUCIBLE, RoundRecipe, local_round, resolve_device

    t_start = time.perf_counter()
    site = _site(context, simulated)
    rc = RoundConfig.from_config_record(msg.content.config_records[CONFIG_KEY])
    configure_threads(site.threads or rc.train.threads)
    images = load_site_images(site, rc, simulated)  # (N, C, H, W) uint8
    groups = load_site_groups(site, rc, simulated)  # (N,) patient ids, or None when the data has none
    images, groups = _this_rounds_share(images, groups, rc, site.site_id)
    model = _build_model(rc, msg)
    t = rc.train
    optimizer_state = load_optimizer_state(context, optimizer=t.optimizer) if t.persist_optimizer else None
    privacy = _plan(site, rc, images, groups)
    if privacy.refused:
        # say so in the reply: the ServerApp drops this site and stops when no site can go on
        record_round(privacy, round=rc.round, dp_steps=0, pushed=0)
        return budget_refusal_reply(msg, f"site {site.site_id}: {privacy.refused}")

    private = dp_mode(privacy.settings)
    # the DP mechanisms' generator: secret (OS entropy) under a DP mode; the insecure benchmark
    # switch keeps the public streams of local_round (seed) and of torch's global generator
    secret = mechanism_generator(None, private=private, insecure=site.insecure_reproducible_dp,
                                 where=f"site {site.site_id}, train phase")
    queue = _queue_client(site, rc) if rc.queue.enabled else None
    negatives = None
    t0 = time.perf_counter()
    try:
        if queue is not None and rc.use_queue_negatives:
            negatives = queue.sample(rc.queue.num_negatives, max_age=rc.queue.max_staleness)  # (n, d), n <= K
        t_sample = time.perf_counter() - t0
        push_after = queue is not None and not rc.queue.fresh_push and privacy.settings.release != "public"
        recipe = RoundRecipe(
            epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, temperature=t.temperature,
            queue_temperature=t.queue_temperature,
            key_encoder=t.key_encoder, in_batch_negatives=t.in_batch_negatives,
            num_push=t.num_push if push_after else 0, optimizer=t.optimizer, momentum=t.momentum,
            weight_decay=t.weight_decay)
        result = local_round(
            model, images, negatives, recipe, augment=make_augment(rc.augment), dp=privacy.dp,
            dp_steps=privacy.steps_planned if privacy.dp is not None else None, groups=privacy.groups,
            optimizer_state=optimizer_state, seed=_round_seed(t.seed, site.site_id, rc.round),
            dp_generator=INSECURE_REPRODUCIBLE if secret is None and private else secret,
            device=resolve_device("auto"),
        )
        if t.persist_optimizer and result.optimizer_state is not None:
            save_optimizer_state(context, result.optimizer_state, optimizer=t.optimizer)
        t0 = time.perf_counter()
        pushed = 0 if queue is None else _push_after_training(queue, privacy, result.embeddings, rc,
                                                             negatives=negatives, generator=secret)
        t_push = time.perf_counter() - t0
    finally:
        if queue is not None:
            queue.close()
    record_round(privacy, round=rc.round, dp_steps=int(result.metrics.get("dp_steps", 0)), pushed=pushed,
                 queue_enabled=rc.queue.enabled)
    m = result.metrics
    metrics = {
        "num-examples": int(m["num_examples"]),  # public (docs/privacy.md): FedAvg's weight
        **({} if private else {"loss": float(m["loss"])}),  # an exact statistic of the images: not under DP
        "steps": float(m["steps"]),
        "negatives-used": float(m["negatives_used"]),
        "pushed": float(pushed),
        "optimizer-resumed": float(optimizer_state is not None),  # train.persist_optimizer found last round's
        **_train_seconds(m, total=time.perf_counter() - t_start, sample=t_sample, push=t_push),
        **round_metrics(privacy),
    }
    content = RecordDict({
        ARRAYS_KEY: ArrayRecord(result.state),
        METRICS_KEY: MetricRecord(metrics),
        SITE_KEY: site_record(site_id=site.site_id, ledger=privacy.summary),
    })
    return Message(content=content, reply_to=msg)


def release_handler(msg: Message, context: Context, simulated: SimulatedSites | None = None) -> Message:
    """The round's release phase (fresh push): embeddings of the just-received global model.

    raw / gaussian: encode ``num_push`` of the site's images (one augmented view each) with the
    global weights of the message, release them per the privacy mode and push them to the queue
    for this round; prototypes: reply with the noisy per-prototype sums and counts against the
    prototypes in the message (the server merges them). Entered in the site's ledger; refused
    when the release, plus this round's planned DP-SGD steps, would pass the site's budget.
    """
    from fedcl.runtime import configure_threads, make_augment
    from fedcl.train import encode

    site = _site(context, simulated)
    rc = RoundConfig.from_config_record(msg.content.config_records[CONFIG_KEY])
    configure_threads(site.threads or rc.train.threads)
    from fedcl.client.site_data import load_site_groups

    images = load_site_images(site, rc, simulated)  # (N, C, H, W) uint8
    groups = load_site_groups(site, rc, simulated)  # patient ids or None: the same DP plan as training
    model = _build_model(rc, msg)
    privacy = _plan(site, rc, images, groups)
    if privacy.refused:
        return budget_refusal_reply(msg, f"site {site.site_id}: {privacy.refused}")
    mode = privacy.settings.release
    public = torch.Generator().manual_seed(
        _round_seed(rc.train.seed, site.site_id, rc.round) + 17)  # augmentation
    gen = mechanism_generator(public, private=dp_mode(privacy.settings),
                              insecure=site.insecure_reproducible_dp,
                              where=f"site {site.site_id}, release phase")  # picks and noise
    n = int(images.shape[0])
    augment = make_augment(rc.augment)
    records: dict[str, Any] = {}
    pushed = 0
    if mode == "prototypes":
        arrays = msg.content.array_records.get(PROTOTYPES_KEY)
        if arrays is None or "prototypes" not in arrays:
            raise ProtocolError("a prototypes-mode release message carries no 'prototypes' record")
        current = torch.from_numpy(arrays["prototypes"].numpy().copy()).float()
        # every image is a candidate record; only those the release Poisson-samples are encoded
        lazy = LazyRecords(n=n, dim=int(model.head[-1].out_features), embed=lambda idx: encode(
            model, images[idx], device=torch.device("cpu"), augment=augment, generator=public))
        rel = release_prototype_sums(privacy, lazy, prototypes=current, round=rc.round, generator=gen)
        if rel is not None:
            records[PROTOTYPES_KEY] = ArrayRecord({"sums": rel.sums.float(), "counts": rel.counts.float()})
            pushed = int(rel.sums.shape[0])
    else:
        pick = torch.randperm(n, generator=gen)[: rc.train.num_push]  # release selection: secret under DP
        embeddings = encode(model, images[pick], device=torch.device("cpu"), augment=augment,
                            generator=public)
        to_push = release_embeddings(privacy, embeddings, round=rc.round, prototypes=None, generator=gen)
        if to_push.shape[0] > 0:
            with _queue_client(site, rc) as queue:
                pushed = queue.push(to_push, round=rc.round, model_version=rc.round - 1)
    record_round(privacy, round=rc.round, dp_steps=0, pushed=pushed, trained=False)
    content = RecordDict({
        METRICS_KEY: MetricRecord({"num-examples": n, "pushed": float(pushed), **round_metrics(privacy)}),
        SITE_KEY: site_record(site_id=site.site_id, ledger=privacy.summary),
        **records,
    })
    return Message(content=content, reply_to=msg)


def evaluate_handler(msg: Message, context: Context, simulated: SimulatedSites | None = None) -> Message:
    """Label-free check of the global model on the site's own images: alignment and uniformity."""
    from fedcl.evaluate import alignment_uniformity
    from fedcl.runtime import configure_threads, make_augment

    site = _site(context, simulated)
    rc = RoundConfig.from_config_record(msg.content.config_records[CONFIG_KEY])
    configure_threads(site.threads or rc.train.threads)
    images = load_site_images(site, rc, simulated)
    model = _build_model(rc, msg)
    n = min(512, int(images.shape[0]))
    metrics: dict[str, float] = {"num-examples": n}
    if not dp_mode(rc.privacy):  # under DP they would be exact, un-noised statistics of the site's images
        if n < 2:
            raise SiteError(f"site {site.site_id} needs at least 2 images for uniformity, has {n}")
        align, uniform = alignment_uniformity(
            model, images[:n], augment=make_augment(rc.augment),
            device=torch.device("cpu"), seed=_round_seed(rc.train.seed, site.site_id, rc.round))
        metrics |= {"alignment": align, "uniformity": uniform}
    content = RecordDict({
        METRICS_KEY: MetricRecord(metrics),
        SITE_KEY: site_record(site_id=site.site_id, ledger=None),
    })
    return Message(content=content, reply_to=msg)


def make_client_app(*, simulated: SimulatedSites | None = None) -> ClientApp:
    """A ClientApp; ``simulated`` gives the sites of ``fedcl simulate`` (else the node config does)."""
    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train_handler(msg, context, simulated)

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return release_handler(msg, context, simulated)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_handler(msg, context, simulated)

    return client_app


# What `flwr run` / flower-supernode load (pyproject: clientapp = "fedcl.client.app:app").
app = make_client_app()

__all__ = ["SiteSettings", "SimulatedSites", "SiteError", "app", "make_client_app", "load_site_images",
           "site_privacy_settings"]
