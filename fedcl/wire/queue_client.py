"""Client of the queue service: push embeddings, sample negatives, advance rounds.

    with QueueClient("queue.example.org:50051", site_id="site-a", token=TOKEN,
                     root_certificates=Path("ca.pem").read_bytes()) as queue:
        negatives = queue.sample(4096, max_age=3)                  # (n, d) float32, n <= 4096
        queue.push(embeddings, round=r, model_version=r)            # (N, d) unit-norm

Calls time out after ``timeout`` seconds; UNAVAILABLE (server restarting, network blip) is
retried with exponential backoff up to ``retries`` times, nothing else is. A retried push
carries the same request id, so the server stores it once.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcl.wire.proto import queue_pb2, queue_pb2_grpc

__all__ = ["QueueClient", "QueueServiceError"]

SERVICE_NAME = queue_pb2.DESCRIPTOR.services_by_name["EmbeddingQueue"].full_name
_CHUNK_OVERHEAD_BYTES = 1024  # room for the non-data fields of a chunk
_WIRE = {"float16": (queue_pb2.DTYPE_FLOAT16, np.dtype("<f2")),
         "float32": (queue_pb2.DTYPE_FLOAT32, np.dtype("<f4"))}
_FROM_WIRE = {queue_pb2.DTYPE_FLOAT16: np.dtype("<f2"), queue_pb2.DTYPE_FLOAT32: np.dtype("<f4")}
_TORCH = {"float16": torch.float16, "float32": torch.float32}
_DTYPE_NAMES = {queue_pb2.DTYPE_FLOAT16: "float16", queue_pb2.DTYPE_FLOAT32: "float32"}
T = TypeVar("T")


class QueueServiceError(RuntimeError):
    """The queue service refused a call; ``code`` is the grpc.StatusCode, ``details`` its reason."""

    def __init__(self, *, method: str, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"queue service at {address} refused {method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class QueueClient:
    def __init__(
        self,
        address: str,
        *,
        site_id: str,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        max_message_bytes: int = 4 << 20,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        wire_dtype: str = "float32",
        backoff: float = 0.2,
    ) -> None:
        if (client_certificate is None) != (client_key is None):
            raise ValueError("give both client_certificate and client_key (mutual TLS), or neither")
        if client_certificate is not None and root_certificates is None:
            raise ValueError("mutual TLS needs root_certificates too")
        if wire_dtype not in _WIRE:
            raise ValueError(f"wire_dtype must be one of {sorted(_WIRE)}, got {wire_dtype!r}")
        self.address = address
        self.site_id = site_id
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_message_bytes = int(max_message_bytes)
        self.wire_dtype = wire_dtype
        self.backoff = float(backoff)
        self._metadata: tuple[tuple[str, str], ...] = (("x-fedcl-site", site_id),)
        if token:
            self._metadata += (("authorization", f"Bearer {token}"),)
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.http2.lookahead_bytes", self.max_message_bytes),
        ]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates,
                                                       private_key=client_key,
                                                       certificate_chain=client_certificate)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = queue_pb2_grpc.EmbeddingQueueStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ calls

    def push(self, embeddings: torch.Tensor, *, round: int, model_version: int) -> int:
        """Push unit-norm embeddings (N, d) of this site; return how many were stored (all or none)."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-D (N, d), got shape {tuple(embeddings.shape)}")
        wire_enum, wire = _WIRE[self.wire_dtype]
        # torch converts float32 -> float16 far faster than numpy; x86 and ARM are little-endian
        data = embeddings.detach().to("cpu", _TORCH[self.wire_dtype]).contiguous().numpy()  # (N, d)
        if sys.byteorder != "little":
            data = data.astype(wire)
        rows, dim = data.shape
        step = max(1, (self.max_message_bytes - _CHUNK_OVERHEAD_BYTES) // max(1, dim * wire.itemsize))
        request_id = uuid.uuid4().hex

        def chunks() -> Iterator[queue_pb2.PushChunk]:
            # an empty push is one empty chunk: the server says why
            for start in range(0, max(rows, 1), step):
                part = data[start : start + step]
                yield queue_pb2.PushChunk(
                    rows=part.shape[0], dim=dim, dtype=wire_enum, data=part.tobytes(),
                    round=round, model_version=model_version, request_id=request_id, total_rows=rows,
                )

        reply = self._call(
            "Push", lambda: self._stub.Push(chunks(), timeout=self.timeout, metadata=self._metadata))
        return int(reply.accepted)

    def sample(self, k: int, *, max_age: int | None = None) -> torch.Tensor:
        """Up to k negatives (n, d) float32 from other sites, uniformly without replacement."""
        request = queue_pb2.SampleRequest(k=k)
        if max_age is not None:
            request.max_age = max_age
        return self._call("Sample", lambda: self._read_sample(request))

    def _read_sample(self, request: queue_pb2.SampleRequest) -> torch.Tensor:
        out: torch.Tensor | None = None
        filled = 0
        for chunk in self._stub.Sample(request, timeout=self.timeout, metadata=self._metadata):
            wire = _FROM_WIRE.get(chunk.dtype)
            if wire is None or len(chunk.data) != chunk.rows * chunk.dim * wire.itemsize:
                raise self._malformed("malformed sample chunk")
            if out is None:
                out = torch.empty((chunk.total, chunk.dim), dtype=torch.float32)  # (n, d)
            if filled + chunk.rows > out.shape[0] or chunk.dim != out.shape[1]:
                raise self._malformed("sample chunks do not match the announced total")
            if chunk.rows:
                # a writable copy
                values = np.frombuffer(bytearray(chunk.data), dtype=wire).reshape(chunk.rows, chunk.dim)
                if sys.byteorder != "little":
                    values = values.astype(values.dtype.newbyteorder("="))
                # float16 -> float32 in torch: fast
                out[filled : filled + chunk.rows].copy_(torch.from_numpy(values))
            filled += chunk.rows
        if out is None or filled != out.shape[0]:
            raise self._malformed("sample stream ended early")
        return out

    def _malformed(self, details: str) -> QueueServiceError:
        return QueueServiceError(method="Sample", address=self.address, code=grpc.StatusCode.INTERNAL,
                                 details=details)

    def advance(self, round: int) -> int:
        """Move the queue to ``round`` (coordinator token only); return how many entries were evicted."""
        request = queue_pb2.AdvanceRequest(round=round)
        reply = self._call("Advance",
                           lambda: self._stub.Advance(request, timeout=self.timeout, metadata=self._metadata))
        return int(reply.evicted)

    def stats(self) -> dict:
        reply = self._call(
            "Stats",
            lambda: self._stub.Stats(queue_pb2.StatsRequest(), timeout=self.timeout, metadata=self._metadata))
        return {
            "size": reply.size,
            "capacity": reply.capacity,
            "dim": reply.dim,
            "dtype": _DTYPE_NAMES.get(reply.dtype, "unspecified"),
            "current_round": reply.current_round,
            "max_staleness": reply.max_staleness,
            "per_site_quota": reply.per_site_quota,
            "per_site": dict(reply.per_site),
            "pushed_total": reply.pushed_total,
            "evicted": {
                "capacity": reply.evicted_capacity,
                "quota": reply.evicted_quota,
                "staleness": reply.evicted_staleness,
            },
            "oldest_round": reply.oldest_round if reply.HasField("oldest_round") else None,
            "newest_round": reply.newest_round if reply.HasField("newest_round") else None,
            "restarts": reply.restarts,  # coordinator only: starts of the service from its snapshot folder
            "rows_lost": reply.rows_lost,  # acknowledged rows that restarts lost (not yet in a snapshot)
        }

    def health(self) -> bool:
        """True when the service answers SERVING to a standard gRPC health check."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                       timeout=self.timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> QueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing

    def _call(self, method: str, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(min(self.backoff * 2**attempt, 5.0) * random.uniform(0.5, 1.0))
                    continue
                details = err.details() if hasattr(err, "details") else str(err)
                raise QueueServiceError(method=method, address=self.address, code=code,
                                        details=details or "") from None
        raise AssertionError("unreachable")
