"""Run the queue service on its own: ``fedcl-server queue --config FILE``.

FILE is the fedcl config every command reads (then ``queue`` is ``serve-queue``: the queue
settings come from server.*, queue.* and model.proj_dim, and ``--set``, ``--out-dir`` and
``--listen`` apply), or a file with a ``[queue_service]`` table, for the settings the fedcl
config does not have (client_ca for mutual TLS, the call limits; docs/configuration.md)::

    [queue_service]
    host = "0.0.0.0"
    port = 50051
    dim = 128
    tls_cert = "certs/queue.pem"
    tls_key = "certs/queue.key"
    coordinator_token = "..."
    snapshot_path = "state/queue.npz"
    audit_log = "state/queue-audit.jsonl"

    revoked_sites = ["site-c"]      # their token / certificate CN is refused (PERMISSION_DENIED)

    [queue_service.site_tokens]
    site-a = "..."                  # at least 16 characters, each token distinct

Restores ``snapshot_path`` when it exists, snapshots on every Advance and on SIGTERM/SIGINT.

``serve_queue`` is the one way every command starts the service: ``fedcl-server queue`` from
this table, ``fedcl-server serve-queue`` and ``fedcl-server run`` from the consortium config
through ``settings_from_fedcl_config`` (the same validation, with the errors naming the
consortium config's keys). A queue without site credentials exists only with
``demo_open_queue_no_auth = true``, which warns at every start.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from fedcl.queue import EmbeddingQueue, QueueError

__all__ = ["QueueServiceSettings", "queue_main", "load_queue_settings", "QueueConfigError", "serve_queue",
           "settings_from_fedcl_config"]

PROG = "fedcl-server queue"
_SITE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MIN_TOKEN = 16


class QueueConfigError(Exception):
    """A config file that cannot be used; the message says what to fix."""


class QueueServiceSettings(BaseModel):
    """The ``[queue_service]`` table."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    dim: int = Field(128, ge=1, le=65536)
    capacity: int = Field(65536, ge=1, le=100_000_000)
    per_site_quota: int = Field(8192, ge=1)
    max_staleness: int = Field(5, ge=0)
    dtype: Literal["float16", "float32"] = "float16"
    norm_tolerance: float = Field(0.01, gt=0.0, lt=1.0)
    max_message_bytes: int = Field(4 << 20, ge=64 << 10, le=1 << 30)
    snapshot_path: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    insecure: bool = False
    coordinator_token: str | None = Field(None, min_length=_MIN_TOKEN)
    audit_log: Path | None = None
    audit_max_bytes: int = Field(64 << 20, ge=4096)  # the audit log rotates past this size
    audit_backups: int = Field(3, ge=0, le=100)
    site_tokens: dict[str, str] = Field(default_factory=dict)
    revoked_sites: list[str] = Field(default_factory=list)  # token holders or certificate CNs shut out
    # Sites get in by naming themselves, with no credential: for a throwaway demo on a closed network
    # only. Every start prints a warning. The coordinator still needs coordinator_token.
    demo_open_queue_no_auth: bool = False
    # Limits no single site can exhaust (fedcl.server.queue_service.CallLimits)
    max_workers: int = Field(96, ge=2, le=4096)
    coordinator_reserve: int = Field(8, ge=1)  # threads site calls never take: Advance and Stats get through
    per_site_calls: int = Field(4, ge=1)  # concurrent calls of one site; beyond: RESOURCE_EXHAUSTED
    call_timeout: float = Field(300.0, gt=0)  # seconds any call may run
    stream_idle_timeout: float = Field(30.0, gt=0)  # seconds a stream may go without a message
    max_concurrent_rpcs: int = Field(512, ge=2)  # gRPC refuses calls past this many, queued ones included

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> QueueServiceSettings:
        names = (info.context or {}).get("names", {})

        def key(name: str) -> str:  # the setting as the user's config file spells it
            return names.get(name, name)

        if not self.coordinator_reserve < self.max_workers:
            raise ValueError(f"coordinator_reserve ({self.coordinator_reserve}) must be below max_workers "
                             f"({self.max_workers})")
        if self.max_concurrent_rpcs < self.max_workers:
            raise ValueError(f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) must be at least max_workers "
                             f"({self.max_workers})")
        for site in self.revoked_sites:
            if not re.match(_SITE_ID, site):
                raise ValueError(
                    f"site id {site!r} in revoked_sites: use letters, digits, '_', '.', '-' (at most 64)")
        if (self.client_ca is None and not self.demo_open_queue_no_auth
                and (unknown := sorted(set(self.revoked_sites) - set(self.site_tokens)))):
            raise ValueError(
                f"{key('revoked_sites')} names {unknown}, which have no token in {key('site_tokens')} "
                "(and without client_ca no certificate names them either)")
        if self.per_site_quota > self.capacity:
            raise ValueError(
                f"per_site_quota ({self.per_site_quota}) cannot exceed capacity ({self.capacity})")
        if self.max_message_bytes < self.dim * 4 + 1024:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) cannot hold one embedding of dim {self.dim}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"set both {key('tls_cert')} and {key('tls_key')}, or neither")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError(f"client_ca (mutual TLS) needs {key('tls_cert')} and {key('tls_key')}")
        if self.tls_cert is None and not self.insecure:
            raise ValueError(
                f"TLS is required: set {key('tls_cert')} and {key('tls_key')} "
                f"(deploy/ has a certificate script), or {key('insecure')} = true for a loopback test"
            )
        for site, token in self.site_tokens.items():
            if not re.match(_SITE_ID, site):
                raise ValueError(
                    f"site id {site!r} in {key('site_tokens')}: use letters, digits, '_', '.', '-' "
                    "(at most 64)")
            if len(token) < _MIN_TOKEN:
                raise ValueError(
                    f"{key('site_tokens')}.{site} is shorter than {_MIN_TOKEN} characters: give every "
                    'site a long random token (python -c "import secrets; '
                    'print(secrets.token_urlsafe(24))")')
        by_token: dict[str, list[str]] = {}
        for site, token in self.site_tokens.items():
            by_token.setdefault(token, []).append(f"{key('site_tokens')}.{site}")
        if self.coordinator_token is not None:
            by_token.setdefault(self.coordinator_token, []).append(key("coordinator_token"))
        if shared := [holders for holders in by_token.values() if len(holders) > 1]:
            raise ValueError(f"{' and '.join(shared[0])} have the same token: every site and the coordinator "
                             "need a token of their own")
        if self.coordinator_token is None:
            raise ValueError(
                f"{key('coordinator_token')} is required (16+ characters): the ServerApp uses it for "
                "Advance, and no caller without it is the coordinator")
        if not self.site_tokens and self.client_ca is None and not self.demo_open_queue_no_auth:
            raise ValueError(
                f"no site credentials: set [{key('site_tokens')}] (a 16+ character token per site) or "
                f"client_ca (mutual TLS); an open queue that trusts every caller needs "
                f"{key('demo_open_queue_no_auth')} = true (demos only)")
        return self

    def limits(self):
        from fedcl.server.queue_service import CallLimits

        return CallLimits(max_workers=self.max_workers, coordinator_reserve=self.coordinator_reserve,
                          per_site_calls=self.per_site_calls, call_timeout=self.call_timeout,
                          stream_idle_timeout=self.stream_idle_timeout,
                          max_concurrent_rpcs=self.max_concurrent_rpcs)


class _ConfigFile(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other tables belong to other parts of fedcl-server
    queue_service: QueueServiceSettings


def _format_validation(
    err: ValidationError, names: dict[str, str] | None = None, *, table: str = "queue_service"
) -> str:
    lines = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"]]
        if loc and names and loc[0] in names:
            loc[0] = names[loc[0]]
        where = ".".join(loc) or table
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and item["loc"]:  # only [queue_service] keys can be extra
            close = difflib.get_close_matches(str(item["loc"][-1]), list(QueueServiceSettings.model_fields),
                                              n=1)
            message = "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
        lines.append(f"{where}: {message}")
    return "; ".join(lines)  # one line, however many settings are wrong


def _has_queue_table(path: Path) -> bool:
    """Whether ``path`` is a [queue_service] file; an unreadable one counts as one, so that
    load_queue_settings says what is wrong with it."""
    try:
        return "queue_service" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True


def load_queue_settings(path: Path) -> QueueServiceSettings:
    """Read and validate the ``[queue_service]`` table; relative paths are taken from the file's folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QueueConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise QueueConfigError(f"cannot read config file {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise QueueConfigError(f"config file {path} is not valid TOML: {err}") from None
    if "queue_service" not in raw:
        raise QueueConfigError(f"config file {path} has no [queue_service] table")
    try:
        settings = _ConfigFile.model_validate(raw).queue_service
    except ValidationError as err:
        raise QueueConfigError(f"invalid settings in {path}: {_format_validation(err)}") from None
    base = path.resolve().parent
    updates = {
        name: base / value
        for name in ("snapshot_path", "tls_cert", "tls_key", "client_ca", "audit_log")
        if (value := getattr(settings, name)) is not None and not value.is_absolute()
    }
    return settings.model_copy(update=updates)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise QueueConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None


def _load_queue(settings: QueueServiceSettings) -> EmbeddingQueue:
    """Restore the snapshot when there is one (it must match the settings), else an empty queue."""
    if settings.snapshot_path is None or not settings.snapshot_path.exists():
        return EmbeddingQueue(
            dim=settings.dim,
            capacity=settings.capacity,
            per_site_quota=settings.per_site_quota,
            max_staleness=settings.max_staleness,
            dtype=settings.dtype,
            norm_tolerance=settings.norm_tolerance,
        )
    try:
        queue = EmbeddingQueue.restore(settings.snapshot_path)
    except QueueError as err:
        raise QueueConfigError(err.message) from None
    for name in ("dim", "capacity", "per_site_quota", "max_staleness", "dtype", "norm_tolerance"):
        if getattr(queue, name) != getattr(settings, name):
            raise QueueConfigError(
                f"queue snapshot {settings.snapshot_path} was written with {name} = {getattr(queue, name)!r} "
                f"but the config says {getattr(settings, name)!r}; set it back, or move the snapshot away to "
                "start empty"
            )
    return queue


def _steady_malloc() -> None:
    """Keep glibc from holding freed message buffers: a fixed mmap threshold and two arenas.

    Measured with bench/queue_bench.py (1,000,000 x 128 float16, filled by 2 MB pushes):
    glibc's default, a threshold that grows to the largest freed block plus one arena per
    thread, left ~38 MiB of freed push buffers in the server's RSS; this leaves ~5 MiB.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_mmap_threshold, m_arena_max = -3, -8  # glibc malloc.h
        libc.mallopt(m_mmap_threshold, 128 << 10)
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# [queue_service] key -> where a consortium config (fedcl.config.FedclConfig) keeps it
FEDCL_CONFIG_NAMES = {
    "host": "server.queue_host", "port": "server.queue_port", "dim": "model.proj_dim",
    "capacity": "queue.capacity", "per_site_quota": "queue.per_site_quota",
    "max_staleness": "queue.max_staleness", "dtype": "queue.dtype", "tls_cert": "server.tls_cert",
    "tls_key": "server.tls_key", "insecure": "server.insecure",
    "coordinator_token": "server.coordinator_token", "audit_log": "server.audit_log",
    "site_tokens": "server.site_tokens", "revoked_sites": "server.revoked_sites",
    "demo_open_queue_no_auth": "server.demo_open_queue_no_auth", "snapshot_path": "server.out_dir",
}


def settings_from_fedcl_config(cfg, *, snapshot_path: Path, audit_log: Path,
                               coordinator_token: str | None = None,
                               source: str = "the config") -> QueueServiceSettings:
    """The queue service's settings from a consortium config (server.*, queue.*, model.proj_dim),
    validated like a [queue_service] table; errors name the consortium config's keys."""
    s, q = cfg.server, cfg.queue
    raw = {
        "host": s.queue_host, "port": s.queue_port, "dim": cfg.model.proj_dim, "capacity": q.capacity,
        "per_site_quota": q.per_site_quota, "max_staleness": q.max_staleness, "dtype": q.dtype,
        "snapshot_path": snapshot_path, "insecure": s.insecure,
        "tls_cert": None if s.insecure else s.tls_cert, "tls_key": None if s.insecure else s.tls_key,
        "coordinator_token": coordinator_token or s.coordinator_token, "audit_log": audit_log,
        "site_tokens": dict(s.site_tokens), "revoked_sites": list(s.revoked_sites),
        "demo_open_queue_no_auth": s.demo_open_queue_no_auth,
    }
    try:
        return QueueServiceSettings.model_validate(raw, context={"names": FEDCL_CONFIG_NAMES})
    except ValidationError as err:
        raise QueueConfigError(f"invalid queue service settings in {source}: "
                               f"{_format_validation(err, FEDCL_CONFIG_NAMES, table='server')}") from None


def serve_queue(settings: QueueServiceSettings, *, warn=None):
    """Start the queue service from validated settings: read the TLS files, restore the snapshot
    (it must be intact and match the settings), then serve. The one start path of every command.

    Raises QueueConfigError (bad files, snapshot) or OSError (the port is taken); ``warn(line)``
    receives the warnings (default: stderr), printed at every start."""
    # grpc only once the settings are fine
    from fedcl.server.queue_service import ServeSettings, start_queue_server

    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    tls_cert = _read(settings.tls_cert, "tls_cert")
    tls_key = _read(settings.tls_key, "tls_key")
    client_ca = _read(settings.client_ca, "client_ca")
    queue = _load_queue(settings)
    try:
        serve = ServeSettings(
            host=settings.host,
            port=settings.port,
            site_tokens=settings.site_tokens,
            coordinator_token=settings.coordinator_token,
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_ca=client_ca,
            snapshot_path=settings.snapshot_path,
            max_message_bytes=settings.max_message_bytes,
            audit_log=settings.audit_log,
            revoked_sites=tuple(settings.revoked_sites),
            demo_open_queue=settings.demo_open_queue_no_auth,
            limits=settings.limits(),
            audit_max_bytes=settings.audit_max_bytes,
            audit_backups=settings.audit_backups,
        )
    except ValueError as err:
        raise QueueConfigError(str(err)) from None
    try:
        server = start_queue_server(queue, serve)
    except QueueError as err:  # an unreadable push journal beside the snapshot
        raise QueueConfigError(err.message) from None
    # warnings once the service runs, at every start (a refusal stays one line)
    if settings.demo_open_queue_no_auth and not settings.site_tokens and settings.client_ca is None:
        warn(
            "WARNING: DEMO OPEN QUEUE (demo_open_queue_no_auth = true): any caller that reaches "
            f"{settings.host}:{server.port} can push and sample as any site it names. Never use this with "
            "real data: set site tokens or client certificates."
        )
    if settings.insecure:
        where = "use this on loopback only" if settings.host in ("127.0.0.1", "localhost", "::1") else (
            f"it listens on {settings.host}: tokens and embeddings cross the network in clear")
        warn(f"warning: TLS is off (insecure = true); {where}")
    return server


def queue_main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 after a clean stop, 2 for a config error)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Serve the global embedding queue over gRPC.")
    parser.add_argument("--config", type=Path, required=True,
                        help="the fedcl config (as for serve-queue), or a file with a [queue_service] table")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args, rest = parser.parse_known_args(argv)
    if not _has_queue_table(args.config):  # the config every other command reads: serve-queue's path
        from fedcl.server.cli import main

        return main(["serve-queue", "--config", str(args.config), *rest])
    if rest:
        parser.error(
            f"unrecognized arguments: {' '.join(rest)} (they go with a fedcl config, not [queue_service])")

    from fedcl.server.queue_service import stop_on_signal  # grpc only once the arguments are fine

    _steady_malloc()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_queue_settings(args.config)
        server = serve_queue(
            settings, warn=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))
    except QueueConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1

    queue = server.queue
    with stop_on_signal() as stop:
        print(
            f"queue service listening on {settings.host}:{server.port} "
            f"({'TLS' if settings.tls_cert else 'insecure'}, {len(queue)} entries, "
            f"round {queue.current_round})",
            flush=True,
        )
        server.serve_until(stop, grace=5.0)
    print(f"queue service stopped ({len(queue)} entries"
          f"{', snapshot ' + str(settings.snapshot_path) if settings.snapshot_path else ''})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(queue_main())
