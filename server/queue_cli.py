"""Run the queue service on its own: ``fedcl-server queue --config FILE``.

The config file is TOML with a ``[queue_service]`` table (other tables are left to
their own readers)::

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
    site-a = "..."

Restores ``snapshot_path`` when it exists, snapshots on every Advance and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedcl.queue import EmbeddingQueue, QueueError

__all__ = ["QueueServiceSettings", "queue_main", "load_queue_settings", "QueueConfigError"]

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
    site_tokens: dict[str, str] = Field(default_factory=dict)
    revoked_sites: list[str] = Field(default_factory=list)  # token holders or certificate CNs shut out

    @model_validator(mode="after")
    def _consistent(self) -> QueueServiceSettings:
        for site in self.revoked_sites:
            if not re.match(_SITE_ID, site):
                raise ValueError(f"site id {site!r} in revoked_sites: use letters, digits, '_', '.', '-' (at most 64)")
        if self.client_ca is None and (unknown := sorted(set(self.revoked_sites) - set(self.site_tokens))):
            raise ValueError(f"revoked_sites names {unknown}, which have no token in site_tokens "
                             "(and without client_ca no certificate names them either)")
        if self.per_site_quota > self.capacity:
            raise ValueError(f"per_site_quota ({self.per_site_quota}) cannot exceed capacity ({self.capacity})")
        if self.max_message_bytes < self.dim * 4 + 1024:
            raise ValueError(f"max_message_bytes ({self.max_message_bytes}) cannot hold one embedding of dim {self.dim}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.tls_cert is None and not self.insecure:
            raise ValueError(
                "TLS is required: set tls_cert and tls_key (deploy/ has a certificate script), "
                "or insecure = true for a loopback test"
            )
        for site, token in self.site_tokens.items():
            if not re.match(_SITE_ID, site):
                raise ValueError(f"site id {site!r} in site_tokens: use letters, digits, '_', '.', '-' (at most 64)")
            if len(token) < _MIN_TOKEN:
                raise ValueError(f"the token of site {site!r} is shorter than {_MIN_TOKEN} characters")
        tokens = list(self.site_tokens.values()) + ([self.coordinator_token] if self.coordinator_token else [])
        if len(set(tokens)) != len(tokens):
            raise ValueError("every site token and the coordinator token must be distinct")
        if (self.site_tokens or self.client_ca is not None) and self.coordinator_token is None:
            raise ValueError("coordinator_token is required when sites authenticate (the ServerApp uses it for Advance)")
        if not self.insecure and not self.site_tokens and self.client_ca is None:
            raise ValueError("no site credentials: set [queue_service.site_tokens] or client_ca (mutual TLS)")
        return self


class _ConfigFile(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other tables belong to other parts of fedcl-server
    queue_service: QueueServiceSettings


def _format_validation(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "queue_service"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


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
        raise QueueConfigError(f"invalid settings in {path}:\n{_format_validation(err)}") from None
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
                f"queue snapshot {settings.snapshot_path} was written with {name} = {getattr(queue, name)!r} but the "
                f"config says {getattr(settings, name)!r}; set it back, or move the snapshot away to start empty"
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


def queue_main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 after a clean stop, 2 for a config error)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Serve the global embedding queue over gRPC.")
    parser.add_argument("--config", type=Path, required=True, help="TOML file with a [queue_service] table")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)

    from server.queue_service import start_queue_server, stop_on_signal  # grpc only once the arguments are fine

    try:
        settings = load_queue_settings(args.config)
        tls_cert = _read(settings.tls_cert, "tls_cert")
        tls_key = _read(settings.tls_key, "tls_key")
        client_ca = _read(settings.client_ca, "client_ca")
        queue = _load_queue(settings)
    except QueueConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    _steady_malloc()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.insecure:
        print(f"{PROG}: warning: TLS is off (insecure = true); use this on loopback only", file=sys.stderr)
    try:
        server = start_queue_server(
            queue=queue,
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
            revoked_sites=settings.revoked_sites,
        )
    except (OSError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1

    with stop_on_signal() as stop:
        print(
            f"queue service listening on {settings.host}:{server.port} "
            f"({'TLS' if tls_cert else 'insecure'}, {len(queue)} entries, round {queue.current_round})",
            flush=True,
        )
        server.serve_until(stop, grace=5.0)
    print(f"queue service stopped ({len(queue)} entries"
          f"{', snapshot ' + str(settings.snapshot_path) if settings.snapshot_path else ''})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(queue_main())
