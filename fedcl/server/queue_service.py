"""gRPC service around the in-memory EmbeddingQueue (fedcl.queue.v1.EmbeddingQueue).

Three layers, top to bottom:
- ``QueueHandlers``: pure handlers (proto messages in, proto messages out) over an
  EmbeddingQueue, for an already authenticated ``Principal``; they raise QueueError.
- ``_Servicer``: the one thin gRPC layer: authenticates the caller, admits the call within the
  ``CallLimits`` (a site cannot hold the threads the coordinator needs), calls a handler and maps
  QueueError/AccessError codes to gRPC status codes, writes the audit log.
- ``start_queue_server``: TLS (optionally mutual), health checking, snapshot on stop.

Pushes acknowledged after the last snapshot (taken on every Advance and on a clean stop) live
in memory only: a kill -9 or a power loss loses them. ``PushJournal`` counts them on disk, so a
restarted service knows how many rows it lost and reports it in Stats (``restarts``,
``rows_lost``); the ServerApp records that in the round's metrics.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedcl.queue import EmbeddingQueue, QueueError
from fedcl.wire.proto import queue_pb2, queue_pb2_grpc

__all__ = [
    "SERVICE_NAME",
    "AccessError",
    "AuditLog",
    "CallLimits",
    "PushJournal",
    "Principal",
    "QueueHandlers",
    "QueueServer",
    "ServeSettings",
    "start_queue_server",
    "stop_on_signal",
]

log = logging.getLogger(__name__)

SERVICE_NAME = queue_pb2.DESCRIPTOR.services_by_name["EmbeddingQueue"].full_name
COORDINATOR = "coordinator"
COORDINATOR_PUSH_SITE = "server"  # site id of coordinator pushes (public reference set) without x-fedcl-site
CHUNK_OVERHEAD_BYTES = 1024  # room for the non-data fields of a chunk message
_WIRE = {
    queue_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    queue_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
}
_WIRE_BY_NAME = {"float16": queue_pb2.DTYPE_FLOAT16, "float32": queue_pb2.DTYPE_FLOAT32}
_SEEN_REQUESTS = 4096  # push request ids remembered for idempotent retries
_SEEN_PEERS = 10000  # (peer, site) pairs remembered for "connect" audit events
SNAPSHOT_TEMP_GLOB = ".{name}.*.tmp"  # fedcl.fileio.atomic_file's temp names beside a snapshot


class AccessError(Exception):
    """Missing or wrong credentials (UNAUTHENTICATED) or a forbidden call (PERMISSION_DENIED).

    ``site``: who the credentials belong to, when that is known (for the audit log)."""

    def __init__(self, code: str, message: str, *, site: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.site = site


@dataclass(frozen=True)
class Principal:
    """Who is calling: a site (pushes and samples as ``site_id`` only) or the coordinator."""

    site_id: str
    coordinator: bool = False


def rows_per_chunk(*, dim: int, itemsize: int, max_message_bytes: int) -> int:
    rows = (max_message_bytes - CHUNK_OVERHEAD_BYTES) // (dim * itemsize)
    if rows < 1:
        raise ValueError(
            f"max_message_bytes={max_message_bytes} cannot hold one embedding of dim {dim} "
            f"({dim * itemsize} bytes + {CHUNK_OVERHEAD_BYTES} bytes overhead)"
        )
    return rows


class QueueHandlers:
    """The service's behaviour, free of gRPC: each method takes a Principal and proto messages."""

    def __init__(self, *, queue: EmbeddingQueue, max_message_bytes: int, snapshot_path: Path | None,
                 journal: PushJournal | None = None) -> None:
        self.queue = queue
        self.max_message_bytes = int(max_message_bytes)
        self.snapshot_path = snapshot_path
        self.journal = journal if journal is not None else PushJournal(None)
        self._rng = np.random.default_rng(secrets.randbits(128))
        self._rng_lock = threading.Lock()
        self._push_lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        rows_per_chunk(dim=queue.dim, itemsize=4, max_message_bytes=self.max_message_bytes)  # fail fast

    def push(self, principal: Principal, chunks: Iterable[queue_pb2.PushChunk]) -> queue_pb2.PushReply:
        """Assemble every chunk, then validate and store all rows together; nothing is stored on error."""
        limit = min(self.queue.per_site_quota, self.queue.capacity)
        parts: list[np.ndarray] = []
        first: queue_pb2.PushChunk | None = None
        total = 0
        for chunk in chunks:  # a broken stream raises here, before anything is stored
            if first is None:
                first = chunk
                if chunk.dtype not in _WIRE:
                    raise QueueError("INVALID_ARGUMENT",
                                     "push chunk dtype must be DTYPE_FLOAT16 or DTYPE_FLOAT32")
            elif (chunk.round, chunk.model_version, chunk.dim, chunk.dtype, chunk.request_id) != (
                first.round,
                first.model_version,
                first.dim,
                first.dtype,
                first.request_id,
            ):
                raise QueueError("INVALID_ARGUMENT", "all chunks of one push must carry the same round, "
                                 "model_version, dim, dtype and request_id")
            if chunk.dim != self.queue.dim:
                raise QueueError("INVALID_ARGUMENT",
                                 f"embeddings have dim {chunk.dim}, this queue holds dim {self.queue.dim}")
            wire = _WIRE[chunk.dtype]
            if len(chunk.data) != chunk.rows * chunk.dim * wire.itemsize:
                raise QueueError(
                    "INVALID_ARGUMENT",
                    f"chunk data has {len(chunk.data)} bytes, expected rows*dim*{wire.itemsize} = "
                    f"{chunk.rows * chunk.dim * wire.itemsize}",
                )
            total += chunk.rows
            if total > limit:
                raise QueueError(
                    "RESOURCE_EXHAUSTED",
                    f"push of more than {limit} embeddings exceeds the per-site quota of "
                    f"{self.queue.per_site_quota} (capacity {self.queue.capacity}); push fewer",
                )
            parts.append(np.frombuffer(chunk.data, dtype=wire).reshape(chunk.rows, chunk.dim))  # (rows, dim)
        if first is None or total == 0:
            raise QueueError("INVALID_ARGUMENT", "empty push: send at least one embedding")
        if first.total_rows and total != first.total_rows:
            # gRPC can end a cancelled client stream as if it were complete: only the count tells
            raise QueueError("ABORTED", f"push stream ended after {total} of its {first.total_rows} rows; "
                                        "nothing stored (retry the push)")
        embeddings = parts[0] if len(parts) == 1 else np.concatenate(parts)  # (N, dim)
        key = (principal.site_id, first.request_id)
        with self._push_lock:
            if first.request_id and key in self._seen:
                return queue_pb2.PushReply(accepted=self._seen[key], size=len(self.queue), duplicate=True)
            accepted = self.queue.push(
                embeddings, site_id=principal.site_id, round=first.round, model_version=first.model_version
            )
            self.journal.acknowledged(accepted)  # lost on kill -9 until the next snapshot
            if first.request_id:
                self._seen[key] = accepted
                if len(self._seen) > _SEEN_REQUESTS:
                    self._seen.popitem(last=False)
        return queue_pb2.PushReply(accepted=accepted, size=len(self.queue))

    def sample(self, principal: Principal,
               request: queue_pb2.SampleRequest) -> Iterator[queue_pb2.SampleChunk]:
        """Draw the whole sample first (errors surface before any chunk), then stream it in chunks."""
        if principal.coordinator:
            exclude = request.exclude_site or None
        elif request.exclude_site and request.exclude_site != principal.site_id:
            raise AccessError(
                "PERMISSION_DENIED",
                "a site's sample always leaves out its own entries; only the coordinator sets exclude_site",
            )
        else:
            exclude = principal.site_id
        if request.dtype == queue_pb2.DTYPE_UNSPECIFIED:
            wire_enum = _WIRE_BY_NAME[self.queue.dtype]
        elif request.dtype in _WIRE:
            wire_enum = request.dtype
        else:
            raise QueueError("INVALID_ARGUMENT", f"unknown dtype {request.dtype} in sample request")
        wire = _WIRE[wire_enum]
        max_age = request.max_age if request.HasField("max_age") else None
        with self._rng_lock:  # numpy Generators are not thread-safe
            drawn = self.queue.sample(
                request.k, exclude_site=exclude, max_age=max_age, rng=self._rng, dtype=wire.name
            )
        return self._chunks(drawn.embeddings.astype(wire, copy=False), wire_enum)

    def _chunks(self, embeddings: np.ndarray, wire_enum: int) -> Iterator[queue_pb2.SampleChunk]:
        n, dim = embeddings.shape  # (n, dim) wire dtype
        step = rows_per_chunk(dim=dim, itemsize=embeddings.itemsize, max_message_bytes=self.max_message_bytes)
        for start in range(0, max(n, 1), step):  # an empty sample is one empty chunk
            part = embeddings[start : start + step]
            yield queue_pb2.SampleChunk(
                rows=part.shape[0], dim=dim, dtype=wire_enum, data=part.tobytes(), total=n
            )

    def advance(self, principal: Principal, request: queue_pb2.AdvanceRequest) -> queue_pb2.AdvanceReply:
        if not principal.coordinator:
            raise AccessError("PERMISSION_DENIED",
                              "only the coordinator (ServerApp) may advance the queue's round")
        evicted = self.queue.advance(request.round)
        self.save_snapshot()
        return queue_pb2.AdvanceReply(evicted=evicted, current_round=self.queue.current_round,
                                      size=len(self.queue))

    def stats(self, principal: Principal, request: queue_pb2.StatsRequest) -> queue_pb2.StatsReply:
        """The coordinator sees everything; a site sees the queue's settings and its own row count only
        (other sites' names and volumes are theirs)."""
        s = self.queue.stats()
        if not principal.coordinator:
            own = s["per_site"].get(principal.site_id, 0)
            return queue_pb2.StatsReply(
                size=own, capacity=s["capacity"], dim=s["dim"], dtype=_WIRE_BY_NAME[s["dtype"]],
                current_round=s["current_round"], max_staleness=s["max_staleness"],
                per_site_quota=s["per_site_quota"], per_site={principal.site_id: own} if own else {},
            )
        reply = queue_pb2.StatsReply(
            size=s["size"],
            capacity=s["capacity"],
            dim=s["dim"],
            dtype=_WIRE_BY_NAME[s["dtype"]],
            current_round=s["current_round"],
            max_staleness=s["max_staleness"],
            per_site_quota=s["per_site_quota"],
            per_site=s["per_site"],
            pushed_total=s["pushed_total"],
            evicted_capacity=s["evicted"]["capacity"],
            evicted_quota=s["evicted"]["quota"],
            evicted_staleness=s["evicted"]["staleness"],
            restarts=self.journal.restarts,
            rows_lost=self.journal.rows_lost,
        )
        if s["oldest_round"] is not None:
            reply.oldest_round = s["oldest_round"]
            reply.newest_round = s["newest_round"]
        return reply

    def save_snapshot(self) -> None:
        if self.snapshot_path is not None:
            with self._push_lock:  # no push lands between the snapshot and the journal's reset
                self.queue.snapshot(self.snapshot_path)
                self.journal.snapshotted()


class PushJournal:
    """Rows acknowledged since the last snapshot, counted in a small file beside the snapshot.

    The count is rewritten in place after every accepted push and reset after every snapshot; it
    is not fsynced (it must outlive the process, which the page cache does; a power loss may lose
    it too). At start, a count left over means the previous run ended without a snapshot: those
    rows are lost, and ``rows_lost`` says how many. File: one line ``restarts rows_lost pending``."""

    _FORMAT = "{:020d} {:020d} {:020d}\n"  # fixed width: each update overwrites the whole line

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.restarts = 0
        self.rows_lost = 0  # over every restart of this state folder
        self.lost_at_start = 0  # by the restart that made this process
        self._pending = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is None:
            return
        try:
            fields = path.read_text(encoding="ascii").split()
            restarts, lost, pending = (int(field) for field in fields)
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise QueueError("FAILED_PRECONDITION", f"push journal {path} is not readable ({err}); delete it "
                             "(the count of rows lost at the last crash is then unknown)") from None
        else:
            self.restarts, self.lost_at_start = restarts + 1, pending
            self.rows_lost = lost + pending
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._write()

    def _write(self) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, self._FORMAT.format(self.restarts, self.rows_lost, self._pending).encode(), 0)

    def acknowledged(self, rows: int) -> None:
        with self._lock:
            self._pending += rows
            self._write()

    def snapshotted(self) -> None:
        with self._lock:
            self._pending = 0
            self._write()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def journal_path(snapshot_path: Path) -> Path:
    return snapshot_path.with_name(snapshot_path.name + ".pending")


def remove_stale_snapshot_temps(snapshot_path: Path) -> list[Path]:
    """Delete temp files that a snapshot killed mid-write left beside ``snapshot_path``."""
    removed = []
    for stale in snapshot_path.parent.glob(SNAPSHOT_TEMP_GLOB.format(name=snapshot_path.name)):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


class AuditLog:
    """Append-only JSON lines, fsynced, one per event (connect, push, sample, advance, rejection).

    Rejections are rate limited: the first from a source (peer host and claimed site) in each
    ``rejection_interval`` seconds is written, later ones are counted, and the next line of that
    source (or ``close``) carries the count of rejections since its previous line. The file
    rotates by size: past ``max_bytes`` it becomes ``<name>.1`` (older ones shift up to
    ``<name>.<backups>``, the oldest is dropped)."""

    def __init__(self, path: Path | None, *, max_bytes: int = 64 << 20, backups: int = 3,
                 rejection_interval: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._file = None
        self._path = None if path is None else Path(path)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.rejection_interval = float(rejection_interval)
        self._rejections: dict[tuple, list] = {}  # source -> [time of its last line, count since, fields]
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, event: str, **fields: object) -> None:
        if self._file is None:
            return
        with self._lock:
            self._write_locked(event, fields)

    def _write_locked(self, event: str, fields: dict) -> None:
        if self._file is None:
            return
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(record, sort_keys=True) + "\n"
        if self._file.tell() and self._file.tell() + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        assert self._path is not None and self._file is not None
        self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{index}")
            if older.exists():
                os.replace(older, self._path.with_name(f"{self._path.name}.{index + 1}"))
        if self.backups > 0:
            os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))
        else:
            self._path.unlink(missing_ok=True)
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115

    def rejection(self, *, peer: str | None, **fields: object) -> None:
        """A refused call, rate limited per source (see the class docstring)."""
        if self._file is None:
            return
        source = (_peer_host(peer), fields.get("site"))
        now = time.monotonic()
        with self._lock:
            entry = self._rejections.get(source)
            if entry is not None and now - entry[0] < self.rejection_interval:
                entry[1] += 1
                entry[2] = fields
                return
            count = 1 + (entry[1] if entry is not None else 0)
            if entry is None and len(self._rejections) >= _SEEN_PEERS:  # bounded: report and forget
                self._flush_rejections_locked()
            self._rejections[source] = [now, 0, fields]
            self._write_locked("rejection", {**fields, "peer": peer, "count": count})

    def _flush_rejections_locked(self) -> None:
        for (host, _site), (_, count, fields) in self._rejections.items():
            if count:
                self._write_locked("rejection", {**fields, "peer": host, "count": count})
        self._rejections.clear()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._flush_rejections_locked()
                self._file.close()
                self._file = None


def _peer_host(peer: str | None) -> str | None:
    """'ipv4:127.0.0.1:50312' -> 'ipv4:127.0.0.1' (every connection has a port of its own)."""
    if not peer:
        return peer
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class Authenticator:
    """Maps call metadata (and the client certificate under mutual TLS) to a Principal.

    A revoked site's valid token or certificate is answered PERMISSION_DENIED: the caller is known,
    and refused on purpose (a wrong token stays UNAUTHENTICATED)."""

    def __init__(self, *, site_tokens: dict[str, str], coordinator_token: str | None, mutual_tls: bool,
                 revoked_sites: Iterable[str] = (), demo_open_queue: bool = False) -> None:
        self._site_tokens = [(site, token.encode()) for site, token in site_tokens.items()]
        self._coordinator = coordinator_token.encode() if coordinator_token else None
        self.mutual_tls = mutual_tls
        self.revoked = frozenset(revoked_sites)
        # The demo switch: a caller that names a site is taken at its word. The coordinator is
        # never an anonymous caller: it always needs its token.
        self.open = demo_open_queue

    def __call__(self, context: grpc.ServicerContext) -> Principal:
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        claimed = metadata.get("x-fedcl-site") or None
        header = metadata.get("authorization")
        cert_site = None
        if self.mutual_tls:
            names = context.auth_context().get("x509_common_name") or []
            cert_site = names[0].decode("utf-8", "replace") if names else None
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AccessError(
                    "UNAUTHENTICATED", "malformed authorization header: send 'authorization: Bearer <token>'"
                )
            presented = token.strip().encode()
            if self._coordinator is not None and hmac.compare_digest(presented, self._coordinator):
                return Principal(site_id=claimed or COORDINATOR_PUSH_SITE, coordinator=True)
            site = None
            for name, known in self._site_tokens:  # compare with every token: timing says nothing
                if hmac.compare_digest(presented, known):
                    site = name
            if site is None:
                raise AccessError("UNAUTHENTICATED", "unknown token: check the site's queue token")
            if cert_site is not None and cert_site != site:
                raise AccessError(
                    "PERMISSION_DENIED",
                    f"the token is site {site!r}'s but the client certificate is {cert_site!r}'s")
        elif cert_site is not None:
            site = cert_site
        elif self.open and claimed:
            if claimed in self.revoked:  # no credentials to check, but a revoked name is still refused
                raise AccessError("PERMISSION_DENIED", f"site {claimed!r} is revoked (server.revoked_sites)",
                                  site=claimed)
            return Principal(site_id=claimed, coordinator=False)
        else:
            raise AccessError("UNAUTHENTICATED", "missing credentials: send 'authorization: Bearer <token>'")
        if site in self.revoked:
            raise AccessError("PERMISSION_DENIED", f"site {site!r} is revoked (server.revoked_sites): the "
                              "consortium no longer accepts its credentials; ask the coordinator", site=site)
        if claimed is not None and claimed != site:
            raise AccessError("PERMISSION_DENIED", f"site {site!r} cannot act as site {claimed!r}", site=site)
        return Principal(site_id=site)


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code)


@dataclass(frozen=True)
class CallLimits:
    """What one caller may hold of the service, so that no site can starve the coordinator.

    Site calls may occupy at most ``max_workers - coordinator_reserve`` threads (beyond: UNAVAILABLE,
    which clients retry with backoff) and ``per_site_calls`` of them per site (beyond:
    RESOURCE_EXHAUSTED); the coordinator's calls are only held to the deadlines. Every call is cut
    after ``call_timeout`` seconds, and a stream after ``stream_idle_timeout`` seconds without a
    message. gRPC itself refuses calls past ``max_concurrent_rpcs`` (queued ones included)."""

    max_workers: int = 96
    coordinator_reserve: int = 8
    per_site_calls: int = 4
    call_timeout: float = 300.0
    stream_idle_timeout: float = 30.0
    max_concurrent_rpcs: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.coordinator_reserve < self.max_workers:
            raise ValueError(f"coordinator_reserve ({self.coordinator_reserve}) must be at least 1 and below "
                             f"max_workers ({self.max_workers})")
        if self.per_site_calls < 1 or self.call_timeout <= 0 or self.stream_idle_timeout <= 0:
            raise ValueError("per_site_calls, call_timeout and stream_idle_timeout must be positive")
        if self.max_concurrent_rpcs < self.max_workers:
            raise ValueError(f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) must be at least max_workers "
                             f"({self.max_workers})")


class _Call:
    """One admitted call: when it started, when its stream last moved, why it was cut."""

    def __init__(self, principal: Principal, context: grpc.ServicerContext, method: str) -> None:
        self.principal = principal
        self.context = context
        self.method = method
        self.started = self.moved = time.monotonic()
        self.cut: str | None = None  # set by the deadline watcher before it cancels the call

    def touch(self) -> None:
        self.moved = time.monotonic()


class _Admission:
    """Counts calls in flight per site, refuses those over the limits, and cuts overdue calls."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._site_slots = limits.max_workers - limits.coordinator_reserve
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._per_site: dict[str, int] = {}
        self._site_calls = 0
        self._stop = threading.Event()
        self._tick = min(0.5, limits.stream_idle_timeout / 4, limits.call_timeout / 4)
        self._watcher = threading.Thread(target=self._watch, name="queue-deadlines", daemon=True)
        self._watcher.start()

    def enter(self, principal: Principal, context: grpc.ServicerContext, method: str) -> _Call:
        call = _Call(principal, context, method)
        with self._lock:
            if not principal.coordinator:
                held = self._per_site.get(principal.site_id, 0)
                if held >= self.limits.per_site_calls:
                    raise QueueError(
                        "RESOURCE_EXHAUSTED",
                        f"site {principal.site_id!r} already has {held} calls in "
                        f"flight (the per-site limit); finish or cancel one first")
                if self._site_calls >= self._site_slots:
                    raise QueueError(
                        "UNAVAILABLE",
                        f"queue service busy ({self._site_calls} site calls in flight); retry with backoff")
                self._per_site[principal.site_id] = held + 1
                self._site_calls += 1
            self._calls.add(call)
        return call

    def leave(self, call: _Call) -> None:
        with self._lock:
            if call not in self._calls:
                return
            self._calls.discard(call)
            if not call.principal.coordinator:
                site = call.principal.site_id
                self._site_calls -= 1
                self._per_site[site] -= 1
                if not self._per_site[site]:
                    del self._per_site[site]

    def _watch(self) -> None:
        limits = self.limits
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                overdue = [c for c in self._calls if c.cut is None and (
                    now - c.started > limits.call_timeout or now - c.moved > limits.stream_idle_timeout)]
                for c in overdue:
                    c.cut = (f"{c.method} ran past the server's call_timeout of {limits.call_timeout:g} s"
                             if now - c.started > limits.call_timeout else
                             f"{c.method} stream sent nothing for stream_idle_timeout = "
                             f"{limits.stream_idle_timeout:g} s")
            for c in overdue:
                c.context.cancel()  # unblocks the handler's read or write with an RpcError

    def close(self) -> None:
        self._stop.set()


class _Servicer(queue_pb2_grpc.EmbeddingQueueServicer):
    """The thin gRPC layer: authenticate, admit, call the pure handler, map errors to status codes, audit."""

    def __init__(self, handlers: QueueHandlers, authenticate: Authenticator, audit: AuditLog,
                 admission: _Admission) -> None:
        self._handlers = handlers
        self._authenticate = authenticate
        self._audit = audit
        self._admission = admission
        self._peers: set[tuple[str, str]] = set()
        self._peers_lock = threading.Lock()

    def _principal(self, context: grpc.ServicerContext, method: str) -> Principal:
        try:
            principal = self._authenticate(context)
        except AccessError as err:
            self._audit.rejection(method=method, peer=context.peer(), site=err.site, code=err.code,
                                  reason=err.message)
            context.abort(_status(err.code), err.message)
        key = (context.peer(), principal.site_id)
        with self._peers_lock:
            first = key not in self._peers
            if first:
                if len(self._peers) >= _SEEN_PEERS:  # bounded: a long-running service forgets old peers
                    self._peers.clear()
                self._peers.add(key)
        if first:
            self._audit.write("connect", site=principal.site_id, coordinator=principal.coordinator,
                              peer=context.peer())
        return principal

    def _admit(self, context: grpc.ServicerContext, method: str) -> _Call:
        principal = self._principal(context, method)
        try:
            return self._admission.enter(principal, context, method)
        except QueueError as err:
            self._reject(context, method, principal, err)

    def _reject(self, context, method: str, principal: Principal, err: Exception, round: int | None = None,
                call: _Call | None = None) -> None:
        if call is not None and call.cut is not None:  # the deadline watcher cancelled it
            code, message = "DEADLINE_EXCEEDED", f"{call.cut}; cut by the queue service, nothing stored"
        elif isinstance(err, (QueueError, AccessError)):
            code, message = err.code, err.message
        elif isinstance(err, grpc.RpcError):  # the client's stream broke: nothing was stored
            code, message = "CANCELLED", "push stream broken before it completed; nothing stored"
        else:
            log.exception("queue service: %s failed", method, exc_info=err)
            code, message = (
                "INTERNAL",
                f"{method} failed inside the queue service ({type(err).__name__}); nothing stored",
            )
        self._audit.rejection(method=method, peer=context.peer(), site=principal.site_id, round=round,
                              code=code, reason=message)
        context.abort(_status(code), message)

    def Push(self, request_iterator, context):
        call = self._admit(context, "Push")
        principal = call.principal
        seen: dict[str, int] = {}

        def chunks():  # remembers the pushed round for the audit log; each chunk resets the idle clock
            for chunk in request_iterator:
                call.touch()
                seen.setdefault("round", chunk.round)
                yield chunk
            if call.cut is not None:  # a cancelled stream can end like a complete one: store nothing
                raise QueueError("DEADLINE_EXCEEDED", call.cut)

        try:
            reply = self._handlers.push(principal, chunks())
        except Exception as err:  # noqa: BLE001 - every failure becomes a status; nothing was stored
            self._reject(context, "Push", principal, err, round=seen.get("round"), call=call)
        finally:
            self._admission.leave(call)
        self._audit.write(
            "push",
            site=principal.site_id,
            round=seen.get("round"),
            count=reply.accepted,
            duplicate=reply.duplicate or None,
        )
        return reply

    def Sample(self, request, context):
        call = self._admit(context, "Sample")
        principal = call.principal
        try:
            try:
                chunks = self._handlers.sample(principal, request)
            except (QueueError, AccessError) as err:
                self._reject(context, "Sample", principal, err, round=self._handlers.queue.current_round)
            count = 0
            for chunk in chunks:
                count = chunk.total
                yield chunk  # blocks while the reader does not read: the deadlines still apply
                call.touch()
        finally:
            self._admission.leave(call)
        self._audit.write("sample", site=principal.site_id, round=self._handlers.queue.current_round,
                          count=count)

    def Advance(self, request, context):
        call = self._admit(context, "Advance")
        principal = call.principal
        try:
            reply = self._handlers.advance(principal, request)
        except (QueueError, AccessError) as err:
            self._reject(context, "Advance", principal, err, round=request.round)
        except OSError as err:  # the round moved but the snapshot failed: retrying the same round is safe
            self._audit.write("rejection", method="Advance", code="INTERNAL",
                              reason=f"snapshot failed: {err}")
            context.abort(grpc.StatusCode.INTERNAL,
                          f"queue snapshot failed: {err}; retry Advance with the same round")
        finally:
            self._admission.leave(call)
        self._audit.write("advance", site=principal.site_id, round=reply.current_round, count=reply.evicted)
        return reply

    def Stats(self, request, context):
        call = self._admit(context, "Stats")
        try:
            return self._handlers.stats(call.principal, request)
        finally:
            self._admission.leave(call)


class QueueServer:
    """A running queue service: ``.port``, ``.stop(grace)`` (snapshots), ``.wait()``."""

    def __init__(self, *, server: grpc.Server, port: int, handlers: QueueHandlers, health_servicer,
                 audit: AuditLog, admission: _Admission) -> None:
        self._server = server
        self.port = port
        self.handlers = handlers
        self._health = health_servicer
        self._audit = audit
        self._admission = admission
        self._stopped = False
        self._stop_lock = threading.Lock()

    @property
    def queue(self) -> EmbeddingQueue:
        return self.handlers.queue

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (letting calls in flight finish within ``grace`` seconds), then snapshot."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._admission.close()
        try:
            self.handlers.save_snapshot()
        finally:
            self.handlers.journal.close()
            self._audit.write("stop", size=len(self.queue), round=self.queue.current_round)
            self._audit.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def serve_until(self, stop: threading.Event, *, grace: float = 5.0) -> None:
        """Serve until ``stop`` is set (see ``stop_on_signal``), then stop and snapshot."""
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.stop(grace=grace)

    def __enter__(self) -> QueueServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


@contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs; the old handlers come back after."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class ServeSettings:
    """How the queue service listens and whom it lets in; checked when built.

    TLS when ``tls_cert``/``tls_key`` (PEM bytes) are given; mutual TLS (client certificate CN =
    site id) when ``client_ca`` is given too. Sites authenticate with ``site_tokens`` or client
    certificates; only ``demo_open_queue`` lets a site in by its name alone. The coordinator always
    needs ``coordinator_token``. Calls with the token or certificate of a site in ``revoked_sites``
    are refused with PERMISSION_DENIED. Commands build these through
    ``fedcl.server.queue_cli.serve_queue``, which validates the user's settings first."""

    coordinator_token: str = field(repr=False)
    site_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free one
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    client_ca: bytes | None = field(default=None, repr=False)
    snapshot_path: Path | None = None
    max_message_bytes: int = 4 << 20
    audit_log: Path | None = None
    revoked_sites: tuple[str, ...] = ()
    demo_open_queue: bool = False
    limits: CallLimits = CallLimits()
    audit_max_bytes: int = 64 << 20
    audit_backups: int = 3
    rejection_interval: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "site_tokens", dict(self.site_tokens))
        object.__setattr__(self, "revoked_sites", tuple(sorted(set(self.revoked_sites))))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (mutual TLS) needs tls_cert and tls_key")
        if not self.coordinator_token:
            raise ValueError(
                "coordinator_token is required: the coordinator (ServerApp) is never an anonymous caller")
        if not self.site_tokens and self.client_ca is None and not self.demo_open_queue:
            raise ValueError(
                "no site credentials: give site_tokens or client_ca (an open queue needs demo_open_queue)")
        tokens = list(self.site_tokens.values()) + [self.coordinator_token]
        if len(set(tokens)) != len(tokens) or any(not t for t in tokens):
            raise ValueError("every site token and the coordinator token must be non-empty and distinct")
        if COORDINATOR in self.revoked_sites or COORDINATOR_PUSH_SITE in self.revoked_sites:
            raise ValueError(
                f"revoked_sites may not name the coordinator ({COORDINATOR!r}, {COORDINATOR_PUSH_SITE!r})")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _bind(server: grpc.Server, settings: ServeSettings) -> int:
    """Add the listening port (TLS or not); the bound port number, or OSError when it is taken."""
    address = settings.address
    try:
        if settings.tls_cert is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key, settings.tls_cert)], root_certificates=settings.client_ca,
                require_client_auth=settings.client_ca is not None,
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc raises RuntimeError when the port is taken
        raise OSError(f"queue service cannot listen on {address}: {err}") from err
    if not bound:
        raise OSError(f"queue service cannot listen on {address}")
    return bound


def start_queue_server(queue: EmbeddingQueue, settings: ServeSettings) -> QueueServer:
    """Serve ``queue`` as ``settings`` say. With a ``snapshot_path``, temp files of a snapshot
    killed mid-write are removed and a ``PushJournal`` beside it counts the rows a crash would lose."""
    s = settings
    removed: list[Path] = []
    journal = PushJournal(None)
    if s.snapshot_path is not None:
        removed = remove_stale_snapshot_temps(Path(s.snapshot_path))
        journal = PushJournal(journal_path(Path(s.snapshot_path)))
    handlers = QueueHandlers(queue=queue, max_message_bytes=s.max_message_bytes,
                             snapshot_path=s.snapshot_path, journal=journal)
    audit = AuditLog(s.audit_log, max_bytes=s.audit_max_bytes, backups=s.audit_backups,
                     rejection_interval=s.rejection_interval)
    authenticate = Authenticator(site_tokens=dict(s.site_tokens), coordinator_token=s.coordinator_token,
                                 mutual_tls=s.client_ca is not None, revoked_sites=list(s.revoked_sites),
                                 demo_open_queue=s.demo_open_queue)
    options = [
        ("grpc.max_receive_message_length", int(s.max_message_bytes)),
        ("grpc.max_send_message_length", int(s.max_message_bytes)),
        ("grpc.so_reuseport", 0),
    ]
    admission = _Admission(s.limits)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=s.limits.max_workers, thread_name_prefix="queue"),
        options=options, maximum_concurrent_rpcs=s.limits.max_concurrent_rpcs)
    queue_pb2_grpc.add_EmbeddingQueueServicer_to_server(_Servicer(handlers, authenticate, audit, admission),
                                                        server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = _bind(server, s)
    except OSError:
        admission.close()
        journal.close()
        raise
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    audit.write(
        "start", port=bound, size=len(queue), round=queue.current_round,
        tls=s.tls_cert is not None, mutual_tls=s.client_ca is not None, open=authenticate.open,
        revoked_sites=list(s.revoked_sites) or None, restarts=journal.restarts,
        rows_lost=journal.lost_at_start or None, stale_temp_files=[p.name for p in removed] or None,
    )
    if journal.lost_at_start:
        log.warning(
            "queue service: the previous run ended without a snapshot; the %d rows acknowledged after "
            "its last snapshot are lost",
            journal.lost_at_start)
    log.info("queue service listening on %s (port %d)", s.host, bound)
    return QueueServer(server=server, port=bound, handlers=handlers, health_servicer=health_servicer,
                       audit=audit, admission=admission)
