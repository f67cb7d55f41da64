"""Every fedcl setting as a pydantic model, validated once at the edge.

Sources, later ones win: defaults < TOML file < environment (``FEDCL_SECTION__KEY``) <
command-line overrides (``section.key=value``); docs/configuration.md. Library functions never
receive these objects: the CLIs and Flower adapters unpack them into keyword arguments.

A ``Site*Settings`` section holds the fields a site needs; every round's config carries it to the
sites (``fedcl.wire.protocol.RoundConfig``), so a new site-side setting is one field there. Its
subclass, the section a FedclConfig holds, adds the fields only the server or the CLI uses.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message says where and how to fix it."""


# FEDCL_ variables that are not settings: other parts of fedcl read them, so load_config leaves
# them alone (every other FEDCL_ name must be a setting, or it is refused with a suggestion).
NON_CONFIG_ENV = {
    "FEDCL_QUEUE_TOKEN": "fedcl-client: the site's queue token (instead of --token-file)",
    "FEDCL_FUZZ_EXAMPLES": "tests: examples the queue fuzz draws (scripts/test.sh sets 400)",
    "FEDCL_E2E_PATIENCE": "tests: how many times longer the e2e tests wait (tests/e2e/helpers.py)",
}
POLICY_ENV_PREFIX = "FEDCL_POLICY_"  # the site policy's own settings (SitePolicy, below)
PLACEHOLDER = "REPLACE"  # a template value (deploy/consortium.toml) that must be replaced before a run
_PLACEHOLDER_HINTS = {  # key prefix -> what to put there
    "server.coordinator_token": "paste the tokens.toml that deploy/make_certs.py writes over the template's "
                                "credentials lines in [server]",
    "server.site_tokens": "paste the tokens.toml that deploy/make_certs.py writes over the template's "
                          "credentials lines in [server]",
}


class _PlaceholderLeft(ValueError):
    """A template placeholder is still in the configuration (load_config makes it one line)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClutterSettings(_Section):
    """data.name = "fashion-mnist-cluttered": each item at a seeded random place on a larger canvas,
    among patches cut from other items (fedcl.data.clutter; docs/benchmarks.md)."""

    canvas: int = Field(40, ge=1)  # output side, px
    scale: float = Field(1.0, gt=0)  # item side / 28 px
    patches: int = Field(3, ge=0)  # clutter patches per image
    patch_size: int = Field(10, ge=1)  # their side, px (at most 28 and at most the canvas)
    seed: int = 0  # the regime's draw; data.seed still draws the partition

    @model_validator(mode="after")
    def _fits(self) -> "ClutterSettings":
        side = round(28 * self.scale)  # Fashion-MNIST items are 28 px
        if not 1 <= side <= self.canvas:
            raise ValueError(f"a 28-px item at scale {self.scale} is {side} px and does not fit the "
                             f"{self.canvas}-px canvas; lower scale or raise canvas to at least {side}")
        if self.patch_size > min(28, self.canvas):
            raise ValueError(f"patch_size {self.patch_size} exceeds the 28-px source images or the "
                             f"{self.canvas}-px canvas; use at most {min(28, self.canvas)}")
        return self


class SiteDataSettings(_Section):
    """How a shared data set is split into sites: what a site started with a partition id needs."""

    name: Literal["fashion-mnist", "fashion-mnist-cluttered", "medmnist", "folder", "synthetic"] = (
        "fashion-mnist")
    partition: Literal["iid", "dirichlet", "pathological"] = "pathological"
    num_sites: int = Field(5, ge=1)
    alpha: float = Field(0.5, gt=0)
    classes_per_site: int = Field(2, ge=1)
    max_images_per_site: int | None = Field(2000, ge=1)
    synthetic_images: int = Field(2000, ge=10)
    synthetic_classes: int = Field(10, ge=2)
    clutter: ClutterSettings = Field(default_factory=ClutterSettings)  # fashion-mnist-cluttered only
    seed: int = 0


class DataSettings(SiteDataSettings):
    path: Path | None = None  # None: the data set's default location
    eval_split: str = "test"
    eval_max_images: int | None = Field(2000, ge=1)
    train_max_images: int | None = Field(None, ge=1)  # centralized training subset


class ModelSettings(_Section):
    arch: Literal["cnn", "resnet18"] = "cnn"
    in_channels: int | None = Field(None, ge=1)  # None: from the data (a coordinator without data sets it)
    # 16: 2.5x faster than 32 on CPU, so the demo gets 10 rounds in its 10 minutes
    width: int = Field(16, ge=4)
    proj_dim: int = Field(128, ge=2)
    proj_hidden: int = Field(256, ge=2)


class AugmentSettings(_Section):
    crop_scale_min: float = Field(0.3, gt=0, le=1)
    flip: bool = True
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    blur_prob: float = Field(0.5, ge=0, le=1)
    noise_std: float = Field(0.05, ge=0)


class SiteTrainSettings(_Section):
    """How a site trains each round (the server-only fields are in TrainSettings)."""

    epochs: int = Field(1, ge=1)  # local epochs per round (federated) or total (centralized)
    # federated: each round trains on 1/rounds_per_epoch of a site's images (disjoint shares, every
    # image once per epoch), so a round is epochs/rounds_per_epoch epochs. Shorter rounds at the same
    # compute: the frozen round model, the keys and the queue's fresh pushes are renewed more often
    # (docs/benchmarks.md, session 7). A run of R rounds trains R x epochs / rounds_per_epoch epochs.
    # Under DP-SGD a round instead takes epochs / rounds_per_epoch epochs' worth of Poisson steps,
    # each over the whole data set, so the sample rate stays the one the accountant composes.
    rounds_per_epoch: int = Field(1, ge=1)
    # federated: each site's optimizer resumes its own state (Adam's moments and step count) from
    # its previous round, kept in Flower's Context.state, instead of starting cold every round.
    # Under DP-SGD the moments come from clipped, noised gradients only (post-processing).
    persist_optimizer: bool = False
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"  # SGD at lr 0.05 collapsed the small CNN here
    lr: float = Field(3e-4, gt=0)  # 1e-3 dips kNN below random init after the first pathological round
    # (under DP-SGD every per-example gradient is clipped, and twice the first rate paid: the cluttered
    # table's epsilon = 8 row at 2e-3 against 1e-3 gained 3.05 kNN over 3 seeds. With one local step per round
    # a FedAvg round is close to one step over every site's batch; fedcl there gained 1.33 kNN at 2e-3 where
    # central SimCLR and FedSimCLR did not; docs/benchmarks.md, "The few-label gap to central")
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD only
    weight_decay: float = Field(1e-6, ge=0)
    temperature: float = Field(0.2, gt=0)
    # the queue term's temperature (its positive and the queue's negatives); NT-Xent keeps `temperature`.
    # 0.1 against 0.2: +1.03 kNN, +0.8 linear, -1.17 few-label on the cluttered pathological split at
    # 16 epochs, 3 seeds (docs/benchmarks.md, "Queue temperature 0.1")
    queue_temperature: float = Field(0.1, gt=0)
    # in-batch contrast: SimCLR's NT-Xent on the two views (gradients through both), beside the
    # queue term; couples the examples of a batch, so it must be off under DP-SGD
    in_batch_negatives: bool = True
    # the queue term's positive keys: "global", the frozen round model (fedcl, MoCo-style), or
    # "online" (the other view through the trained model; against the queue it crowds the embeddings)
    key_encoder: Literal["global", "online"] = "global"
    num_push: int = Field(512, ge=0)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None: all cores
    seed: int = 0


class TrainSettings(SiteTrainSettings):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # centralized training (a site picks its own)


class SiteQueueSettings(_Section):
    """How a site uses the queue each round (the service's own fields are in QueueSettings)."""

    enabled: bool = True
    num_negatives: int = Field(4096, ge=0)
    # Fresh push (DESIGN "Staleness"): at the start of each round after warm-up, every sampled site
    # pushes embeddings of the global model it has just received (a release phase), and only then do
    # the sites train; the negatives then come from the same model as the positive keys. Without
    # it, sites push after training and negatives are a round older than the keys (measured: the
    # projection head collapses, docs/benchmarks.md).
    fresh_push: bool = True
    max_staleness: int = Field(0, ge=0)  # rounds; 0 with fresh_push: only this round's pushes
    warmup_rounds: int = Field(1, ge=0)


class QueueSettings(SiteQueueSettings):
    capacity: int = Field(65536, ge=1)
    per_site_quota: int = Field(16384, ge=1)
    public_images: int = Field(2048, ge=1)  # privacy.release = "public": the server's reference set
    dtype: Literal["float16", "float32"] = "float16"


class SitePrivacySettings(_Section):
    """What a site's DP-SGD, releases and ledger follow (checked against its policy first)."""

    dpsgd: bool = False
    target_epsilon: float = Field(8.0, gt=0)  # for DP-SGD over the whole planned run
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    noise_multiplier: float | None = Field(None, gt=0)  # None: derived from target_epsilon
    unit: Literal["example", "patient"] = "example"
    release: Literal["raw", "prototypes", "public", "gaussian"] = "raw"
    release_noise_multiplier: float = Field(1.0, ge=0)
    release_sample_rate: float = Field(0.1, gt=0, le=1)
    num_prototypes: int = Field(64, ge=1)
    epsilon_budget: float | None = Field(None, gt=0)  # per site, all channels together
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _release_noise(self) -> "SitePrivacySettings":
        if self.release in ("gaussian", "prototypes") and self.release_noise_multiplier <= 0:
            raise ValueError(
                f"release_noise_multiplier must be > 0 for release {self.release!r} (a DP release "
                "needs noise); raise it, or use release 'raw' (not DP) or 'public'")
        return self


class PrivacySettings(SitePrivacySettings):
    # server merge: a prototype moves only with this much noisy mass
    prototype_min_count: float = Field(5.0, ge=0)


class FederationSettings(_Section):
    num_rounds: int = Field(10, ge=1)
    strategy: str = "FedAvg"
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_available_nodes: int = Field(1, ge=1)
    min_train_nodes: int = Field(1, ge=1)
    eval_every: int = Field(1, ge=1)
    round_timeout: float = Field(3600.0, gt=0)  # seconds to wait for the sites' replies
    fraction_evaluate: float = Field(1.0, ge=0, le=1)  # per-site evaluation after the last round
    strategy_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra arguments for the strategy


class ServerSettings(_Section):
    superlink_host: str = "127.0.0.1"
    superlink_port: int = Field(8000, ge=0, le=65535)
    queue_host: str = "127.0.0.1"
    queue_port: int = Field(50051, ge=0, le=65535)
    out_dir: Path = Path("runs/latest")
    checkpoint_dir: Path | None = None  # None: out_dir / "checkpoints"
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    coordinator_token: str | None = None
    site_tokens: dict[str, str] = Field(default_factory=dict)  # 16+ characters each, all distinct
    # The queue service trusts every caller that names a site: a throwaway demo on a closed network
    # only (it warns at every start). Without it, a queue with no site tokens refuses to start.
    demo_open_queue_no_auth: bool = False
    audit_log: Path | None = None  # None: out_dir / "queue-audit.jsonl" (fedcl-server), one per run folder
    tensorboard: bool = False
    # Sites shut out of the consortium: the queue service answers their token or certificate
    # PERMISSION_DENIED (audited) and, with supernode_auth, their SuperNode key is not registered.
    revoked_sites: list[str] = Field(default_factory=list)
    # Flower's SuperNode authentication: only SuperNodes whose public key is listed here (site ->
    # OpenSSH EC public key file, deploy/make_certs.py writes sites/<site>.node-key.pub) may connect.
    supernode_auth: bool = False
    supernode_keys: dict[str, Path] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _revocation_and_node_auth(self) -> "ServerSettings":
        known = set(self.site_tokens) | set(self.supernode_keys)
        unknown = sorted(set(self.revoked_sites) - known)
        if unknown and known:
            raise ValueError(
                f"server.revoked_sites names {unknown}, which are in neither server.site_tokens nor "
                "server.supernode_keys: revoke a site by the name its token or key is listed under")
        if self.supernode_auth and self.insecure:
            raise ValueError("server.supernode_auth needs TLS (Flower refuses SuperNode authentication "
                             "without it): set server.insecure = false and the tls_* paths")
        if self.supernode_auth and not self.supernode_keys:
            raise ValueError("server.supernode_auth = true but [server.supernode_keys] is empty: no site "
                             "could connect; list each site's public key file (deploy/make_certs.py "
                             "writes sites/<site>.node-key.pub)")
        if self.supernode_keys and not self.supernode_auth:
            raise ValueError("[server.supernode_keys] is set but server.supernode_auth = false: Flower would "
                             "accept any SuperNode; set server.supernode_auth = true (or remove the keys)")
        return self


class FedclConfig(BaseSettings):
    """The whole configuration of a fedcl run."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix="FEDCL_",
        env_nested_delimiter="__",
        validate_assignment=True,
    )

    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @model_validator(mode="after")
    def _consistent(self) -> "FedclConfig":
        if self.privacy.dpsgd and self.train.in_batch_negatives:
            raise ValueError(
                "privacy.dpsgd needs train.in_batch_negatives = false: with in-batch negatives one "
                "example's loss depends on other examples and per-example clipping is not valid"
            )
        if self.queue.per_site_quota > self.queue.capacity:
            raise ValueError("queue.per_site_quota must not exceed queue.capacity")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_placeholders(cls, data: Any) -> Any:
        left = _placeholders(data) if isinstance(data, dict) else []
        if left:
            key, value = left[0]
            hint = next((h for prefix, h in _PLACEHOLDER_HINTS.items() if key.startswith(prefix)),
                        "put the real value there")
            more = (
                f" (and {len(left) - 1} more: {', '.join(k for k, _ in left[1:])})" if len(left) > 1 else "")
            raise _PlaceholderLeft(f"{key} is still the template placeholder {value!r}: {hint}{more}")
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (load_config's --set overrides) > environment > the TOML file; no .env files.
        return (init_settings, env_settings, _TomlFileSource(settings_cls))


_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("fedcl_config_file_values", default=None)


class _TomlFileSource(PydanticBaseSettingsSource):
    """The TOML file load_config read: below the environment, above the defaults."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ gives the whole file at once

    def __call__(self) -> dict[str, Any]:
        return copy.deepcopy(_FILE_VALUES.get() or {})


def _placeholders(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += _placeholders(value, f"{prefix}{key}.")
        elif isinstance(value, str) and value.startswith(PLACEHOLDER):
            found.append((f"{prefix}{key}", value))
    return found


def _env_names() -> dict[str, str | None]:
    """Every FEDCL_ name a setting may have -> None, or the prefix of a table's own keys -> ''."""
    names: dict[str, str | None] = {name: None for name in NON_CONFIG_ENV}
    names.update({f"{POLICY_ENV_PREFIX}{key.upper()}": None for key in SitePolicy.model_fields})
    for section, field in FedclConfig.model_fields.items():
        names[f"FEDCL_{section.upper()}"] = None  # a whole section as JSON
        for key, sub in field.annotation.model_fields.items():
            name = f"FEDCL_{section.upper()}__{key.upper()}"
            names[name] = None
            if getattr(sub.annotation, "__origin__", None) is dict:  # a table: FEDCL_SERVER__SITE_TOKENS__A
                names[name + "__"] = ""
    return names


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Refuse a FEDCL_ variable that is no setting (a misspelled one would be ignored) with a suggestion."""
    names = _env_names()
    for var in sorted(os.environ if environ is None else environ):
        upper = var.upper()
        if not upper.startswith("FEDCL_") or upper in names:
            continue
        if any(upper.startswith(p) and upper != p for p, kind in names.items() if kind == ""):
            continue
        close = difflib.get_close_matches(upper, [n for n, kind in names.items() if kind is None], n=1,
                                          cutoff=0.7)
        hint = f": did you mean {close[0]}?" if close else "."
        raise ConfigError(
            f"environment variable {var} is not a fedcl setting{hint} Fix its name or unset it "
            "(settings are FEDCL_SECTION__KEY; docs/configuration.md lists the other FEDCL_ names)")


def _did_you_mean(model: type[BaseModel], loc: tuple) -> str:
    """' (did you mean section.key?)' for an unknown key at ``loc`` of ``model``, or ''."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)" if close else ""


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.epochs=3)")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: data.name=synthetic
    return parts, value


def _merge(base: dict, parts: list[str], value: Any) -> None:
    node = base
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(parts)}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, *, source: str,
                            model: type[BaseModel] | None = None) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            hint = (
                _did_you_mean(model or FedclConfig, e["loc"])
                or " (check the spelling; docs/configuration.md)")
            lines.append(f"  - {loc}: unknown key{hint}")
        else:
            given = e.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  - {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FedclConfig:
    """Build the configuration from an optional TOML file, the environment and overrides (later wins)."""
    check_environment()
    file_data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data: dict[str, Any] = {}
    for item in overrides:
        parts, value = _parse_override(item)
        _merge(data, parts, value)
    if overrides:
        source += " + overrides"
    if any(k.startswith("FEDCL_") for k in os.environ):
        source += " + FEDCL_* environment"
    token = _FILE_VALUES.set(file_data)
    try:
        return FedclConfig(**data)
    except ValidationError as exc:
        for e in exc.errors():
            if isinstance(left := e.get("ctx", {}).get("error"), _PlaceholderLeft):
                raise ConfigError(f"{source}: {left}") from None
        raise ConfigError(format_validation_error(exc, source=source)) from None
    finally:
        _FILE_VALUES.reset(token)


def dump_config(cfg: FedclConfig) -> str:
    """JSON of the effective configuration, for logs and checkpoints."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


class SitePolicy(BaseSettings):
    """What a site accepts from the coordinator; stricter of the two always wins.

    Loaded by ``fedcl-client --policy site.toml`` (table ``[policy]``). A round config that asks
    for more (a larger epsilon, a weaker release mode, no DP-SGD where it is required) is refused.
    """

    model_config = SettingsConfigDict(extra="forbid", env_prefix="FEDCL_POLICY_")

    epsilon_budget: float | None = Field(None, gt=0)  # the site's own total budget
    max_target_epsilon: float | None = Field(None, gt=0)  # largest DP-SGD target the site accepts
    require_dpsgd: bool = False
    allowed_release_modes: list[Literal["raw", "prototypes", "public", "gaussian"]] = Field(
        default_factory=lambda: ["raw", "prototypes", "public", "gaussian"])
    min_release_noise_multiplier: float = Field(0.0, ge=0)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # as for FedclConfig: the environment beats the policy file


def load_site_policy(path: Path | str | None) -> SitePolicy:
    check_environment()
    if path is None:
        return SitePolicy()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"site policy file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"site policy {path} is not valid TOML: {exc}") from None
    try:
        return SitePolicy(**data.get("policy", data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path), model=SitePolicy)) from None
