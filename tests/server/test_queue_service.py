"""The queue gRPC service against a real server on 127.0.0.1, through fedcl/wire/queue_client.py."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcl.queue import EmbeddingQueue
from fedcl.server.queue_service import Principal, QueueHandlers, ServeSettings, start_queue_server
from fedcl.wire.proto import queue_pb2, queue_pb2_grpc
from fedcl.wire.queue_client import QueueClient, QueueServiceError

DIM = 16
TOKENS = {"site-a": "token-a-0123456789abcdef", "site-b": "token-b-0123456789abcdef"}
COORD = "token-coordinator-0123456789"
REPO = Path(__file__).resolve().parents[2]


def unit(n: int, *, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)  # (n, dim)


def rows(x: torch.Tensor) -> list[bytes]:
    return sorted(row.numpy().tobytes() for row in x)


def make_queue(**overrides) -> EmbeddingQueue:
    kwargs = dict(dim=DIM, capacity=256, per_site_quota=64, max_staleness=2, dtype="float32")
    kwargs.update(overrides)
    return EmbeddingQueue(**kwargs)


@pytest.fixture
def serve(tmp_path):
    """serve(queue=..., **start_queue_server overrides) -> QueueServer; stopped after the test."""
    servers = []

    def start(queue: EmbeddingQueue | None = None, **overrides):
        kwargs = dict(
            host="127.0.0.1",
            port=0,
            site_tokens=TOKENS,
            coordinator_token=COORD,
            tls_cert=None,
            tls_key=None,
            client_ca=None,
            snapshot_path=tmp_path / "queue.npz",
            max_message_bytes=64 << 10,
            audit_log=tmp_path / "audit.jsonl",
        )
        kwargs.update(overrides)
        server = start_queue_server(queue if queue is not None else make_queue(), ServeSettings(**kwargs))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def clients():
    made = []

    def connect(server, site: str, *, token: str | None = "default", **kwargs) -> QueueClient:
        if token == "default":
            token = COORD if site == "coordinator" else TOKENS.get(site)
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("max_message_bytes", 64 << 10)
        client = QueueClient(f"127.0.0.1:{server.port}", site_id=site, token=token, **kwargs)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


def refused(call) -> grpc.StatusCode:
    with pytest.raises(QueueServiceError) as err:
        call()
    assert err.value.details  # a reason comes with every refusal
    return err.value.code


# ------------------------------------------------------------- data path


def test_float32_round_trip_is_bitwise_across_chunks(serve, clients):
    server = serve()
    a, b = clients(server, "site-a"), clients(server, "site-b")
    x = unit(60)
    assert a.push(x, round=0, model_version=0) == 60
    got = b.sample(100)
    assert got.dtype == torch.float32 and got.shape == (60, DIM)
    assert rows(got) == rows(x)


def test_large_push_and_sample_are_chunked_under_the_message_limit(serve, clients):
    queue = make_queue(dim=128, capacity=4096, per_site_quota=4096)
    server = serve(queue=queue)
    a = clients(server, "site-a", max_message_bytes=64 << 10)
    b = clients(server, "site-b", max_message_bytes=64 << 10)
    x = unit(1500, dim=128)  # 768 KB as float32: at least 12 chunks each way
    assert a.push(x, round=0, model_version=0) == 1500
    assert rows(b.sample(2000)) == rows(x)
    handlers = QueueHandlers(queue=queue, max_message_bytes=64 << 10, snapshot_path=None)
    chunks = list(
        handlers.sample(Principal("site-b"), queue_pb2.SampleRequest(k=2000, dtype=queue_pb2.DTYPE_FLOAT32)))
    assert len(chunks) >= 12 and all(c.ByteSize() <= 64 << 10 for c in chunks)
    assert sum(c.rows for c in chunks) == 1500 and {c.total for c in chunks} == {1500}


def test_float16_queue_returns_half_precision_rows(serve, clients):
    server = serve(queue=make_queue(dtype="float16"))
    a, b = clients(server, "site-a", wire_dtype="float16"), clients(server, "site-b")
    x = unit(20)
    a.push(x, round=0, model_version=0)
    assert rows(b.sample(20)) == rows(x.half().float())


def test_sample_excludes_own_site_and_respects_max_age(serve, clients):
    server = serve(queue=make_queue(max_staleness=5))
    a, b, coord = clients(server, "site-a"), clients(server, "site-b"), clients(server, "coordinator")
    xa0 = unit(5, seed=1)
    a.push(xa0, round=0, model_version=0)
    coord.advance(2)
    xa2, xb2 = unit(7, seed=2), unit(3, seed=3)
    a.push(xa2, round=2, model_version=2)
    b.push(xb2, round=2, model_version=2)
    assert rows(a.sample(100)) == rows(xb2)
    assert rows(b.sample(100)) == rows(torch.cat([xa0, xa2]))
    assert rows(b.sample(100, max_age=1)) == rows(xa2)
    assert b.sample(4).shape == (4, DIM)
    assert len(coord.sample(100)) == 15  # the coordinator excludes nobody unless it asks


def test_quota_and_eviction_on_advance(serve, clients):
    server = serve(queue=make_queue(per_site_quota=10, max_staleness=1))
    a, coord = clients(server, "site-a"), clients(server, "coordinator")
    first, second = unit(8, seed=1), unit(6, seed=2)
    a.push(first, round=0, model_version=0)
    a.push(second, round=0, model_version=0)
    stats = coord.stats()
    assert stats["per_site"] == {"site-a": 10} and stats["evicted"]["quota"] == 4
    assert rows(coord.sample(100)) == rows(torch.cat([first[4:], second]))
    assert refused(lambda: a.push(unit(11), round=0, model_version=0)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert coord.advance(1) == 0
    a.push(unit(2, seed=3), round=1, model_version=1)
    assert coord.advance(2) == 8  # the round-0 entries are now 2 rounds old
    stats = coord.stats()
    assert stats["size"] == 2 and stats["current_round"] == 2 and stats["evicted"]["staleness"] == 8


def test_snapshot_on_advance_and_stop_restores_after_restart(serve, clients, tmp_path):
    snapshot = tmp_path / "queue.npz"
    server = serve(snapshot_path=snapshot)
    a, coord = clients(server, "site-a"), clients(server, "coordinator")
    x = unit(9)
    coord.advance(1)
    assert snapshot.is_file()
    a.push(x, round=1, model_version=1)
    before = coord.stats()
    server.stop(grace=1.0)
    assert not a.health()

    restored = serve(queue=EmbeddingQueue.restore(snapshot), snapshot_path=snapshot)
    b, coord2 = clients(restored, "site-b"), clients(restored, "coordinator")
    after = coord2.stats()
    # a clean stop loses nothing
    assert (
        after.pop("restarts"), after.pop("rows_lost"), before.pop("restarts"), before.pop("rows_lost")
    ) == (1, 0, 0, 0)
    assert after == before
    assert rows(b.sample(50)) == rows(x)


# ------------------------------------------------------------- bad input


def _raw_push(server, chunks, *, token=TOKENS["site-a"], site="site-a"):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = queue_pb2_grpc.EmbeddingQueueStub(channel)
        metadata = [("authorization", f"Bearer {token}"), ("x-fedcl-site", site)]
        return stub.Push(iter(chunks), timeout=5.0, metadata=metadata)
    finally:
        channel.close()


def _chunk(x: np.ndarray, **fields) -> queue_pb2.PushChunk:
    x = np.asarray(x, dtype="<f4")
    base = dict(rows=x.shape[0], dim=x.shape[1], dtype=queue_pb2.DTYPE_FLOAT32, data=x.tobytes(), round=0)
    base.update(fields)
    return queue_pb2.PushChunk(**base)


def _bad_inputs():
    good = unit(4).numpy()
    nan, inf, big = good.copy(), good.copy(), good.copy()
    nan[1, 1] = np.nan
    inf[2, 3] = -np.inf
    big[0] *= 2.0
    return {
        "wrong dim": (
            lambda c, s: c["site-a"].push(unit(4, dim=DIM + 2), round=1, model_version=0), "INVALID_ARGUMENT",
        ),
        "nan": (lambda c, s: c["site-a"].push(torch.from_numpy(nan), round=1, model_version=0),
                "INVALID_ARGUMENT"),
        "inf": (lambda c, s: c["site-a"].push(torch.from_numpy(inf), round=1, model_version=0),
                "INVALID_ARGUMENT"),
        "non-unit norm": (lambda c, s: c["site-a"].push(torch.from_numpy(big), round=1, model_version=0),
                          "INVALID_ARGUMENT"),
        "empty": (
            lambda c, s: c["site-a"].push(torch.zeros(0, DIM), round=1, model_version=0), "INVALID_ARGUMENT"),
        "more rows than the quota": (
            lambda c, s: c["site-a"].push(unit(65), round=1, model_version=0), "RESOURCE_EXHAUSTED"),
        "message over max_message_bytes": (
            lambda c, s: _raw_push(s, [_chunk(good[:1], round=1, data=bytes(100 << 10))]),
            "RESOURCE_EXHAUSTED"),
        "unknown site": (lambda c, s: c["site-c"].push(unit(4), round=1, model_version=0), "NOT_FOUND"),
        "future round": (
            lambda c, s: c["site-a"].push(unit(4), round=5, model_version=0), "FAILED_PRECONDITION"),
        "stale round": (
            lambda c, s: c["site-a"].push(unit(4), round=0, model_version=0), "FAILED_PRECONDITION"),
        "byte count not rows*dim": (
            lambda c, s: _raw_push(s, [_chunk(good, round=1, data=good.tobytes()[:-4])]), "INVALID_ARGUMENT"),
        "dtype unspecified": (
            lambda c, s: _raw_push(s, [_chunk(good, round=1, dtype=queue_pb2.DTYPE_UNSPECIFIED)]),
            "INVALID_ARGUMENT"),
        "chunks disagree on round": (
            lambda c, s: _raw_push(s, [_chunk(good, round=1), _chunk(good, round=0)]), "INVALID_ARGUMENT"),
        "bad second chunk": (
            lambda c, s: _raw_push(s, [_chunk(good, round=1), _chunk(nan, round=1)]), "INVALID_ARGUMENT"),
        "no token": (lambda c, s: c["anonymous"].push(unit(4), round=1, model_version=0), "UNAUTHENTICATED"),
        "wrong token": (lambda c, s: c["wrong"].push(unit(4), round=1, model_version=0), "UNAUTHENTICATED"),
        "malformed authorization": (
            lambda c, s: _raw_push(s, [_chunk(good, round=1)], token="x y z"), "UNAUTHENTICATED"),
        "site pushes as another site": (
            lambda c, s: c["a-as-b"].push(unit(4), round=1, model_version=0), "PERMISSION_DENIED"),
        "site calls advance": (lambda c, s: c["site-a"].advance(3), "PERMISSION_DENIED"),
        "advance backwards": (lambda c, s: c["coordinator"].advance(0), "FAILED_PRECONDITION"),
        "site samples without token": (lambda c, s: c["anonymous"].sample(3), "UNAUTHENTICATED"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_gets_its_status_and_changes_nothing(serve, clients, case):
    queue = make_queue(sites={"site-a", "site-b"}, max_staleness=0)
    tokens = dict(TOKENS, **{"site-c": "token-c-0123456789abcdef"})  # authenticated, but not a queue site
    server = serve(queue=queue, site_tokens=tokens)
    c = {
        "site-a": clients(server, "site-a"),
        "site-c": clients(server, "site-c", token=tokens["site-c"]),
        "anonymous": clients(server, "site-a", token=None),
        "wrong": clients(server, "site-a", token="not-a-real-token-000000"),
        "a-as-b": clients(server, "site-b", token=TOKENS["site-a"]),
        "coordinator": clients(server, "coordinator"),
    }
    c["coordinator"].advance(1)
    c["site-a"].push(unit(3, seed=5), round=1, model_version=1)
    before = c["coordinator"].stats()
    stored = rows(c["coordinator"].sample(1000))
    call, code = _bad_inputs()[case]
    with pytest.raises((QueueServiceError, grpc.RpcError)) as err:
        call(c, server)
    got = err.value.code if isinstance(err.value, QueueServiceError) else err.value.code()
    assert got == getattr(grpc.StatusCode, code)
    assert c["coordinator"].stats() == before
    assert rows(c["coordinator"].sample(1000)) == stored


def test_a_push_shorter_than_it_announced_is_refused(serve, clients):
    server = serve()
    coord = clients(server, "coordinator")
    before = coord.stats()
    good = unit(8).numpy()
    with pytest.raises(grpc.RpcError) as err:
        _raw_push(server, iter([_chunk(good[:4], total_rows=8)]))  # ends cleanly, 4 rows short
    assert err.value.code() == grpc.StatusCode.ABORTED and "after 4 of its 8 rows" in err.value.details()
    assert coord.stats() == before


def test_broken_push_stream_stores_nothing(serve, clients, tmp_path):
    server = serve()
    a, coord = clients(server, "site-a"), clients(server, "coordinator")
    before = coord.stats()
    good = unit(8).numpy()

    def broken():  # announces 12 rows, as the real client does, and dies after 8
        yield _chunk(good[:4], total_rows=12)
        yield _chunk(good[4:], total_rows=12)
        raise ConnectionError("site crashed mid-push")

    with pytest.raises(grpc.RpcError) as err:
        _raw_push(server, broken())
    # the client's gRPC cancels a call whose request iterator raised (and reports UNKNOWN)
    assert err.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
    audit = tmp_path / "audit.jsonl"
    # the server sees either the cancellation or (a gRPC race) a stream that looks ended after 8 of the
    # announced 12 rows; either way it refuses, on its own thread (slow when loaded)
    refused = ('"code": "CANCELLED"', '"code": "ABORTED"')
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and not any(r in audit.read_text() for r in refused):
        time.sleep(0.02)
    assert any(r in audit.read_text() for r in refused), audit.read_text()
    assert '"event": "push"' not in audit.read_text()
    assert coord.stats() == before
    assert a.push(unit(2, seed=1), round=0, model_version=0) == 2
    assert coord.stats()["per_site"] == {"site-a": 2}


def test_retried_push_with_same_request_id_is_stored_once(serve, clients):
    server = serve()
    coord = clients(server, "coordinator")
    chunk = _chunk(unit(5).numpy(), request_id="r-1")
    first, again = _raw_push(server, [chunk]), _raw_push(server, [chunk])
    assert (first.accepted, first.duplicate) == (5, False)
    assert (again.accepted, again.duplicate) == (5, True)
    assert coord.stats()["size"] == 5


def test_site_cannot_sample_another_sites_entries_as_its_own(serve, clients):
    server = serve()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = queue_pb2_grpc.EmbeddingQueueStub(channel)
    metadata = [("authorization", f"Bearer {TOKENS['site-a']}")]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Sample(queue_pb2.SampleRequest(k=3, exclude_site="site-b"), metadata=metadata, timeout=5))
    channel.close()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------- client behaviour


def test_client_retries_unavailable_until_the_server_is_up(serve, clients):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timer = threading.Timer(0.6, lambda: serve(port=port))
    timer.start()
    client = QueueClient(f"127.0.0.1:{port}", site_id="site-a", token=TOKENS["site-a"], timeout=2.0,
                         retries=8, backoff=0.1)
    try:
        assert client.push(unit(3), round=0, model_version=0) == 3
    finally:
        timer.join()
        client.close()


def test_client_does_not_retry_other_errors(serve, clients):
    server = serve()
    a = clients(server, "site-a", backoff=2.0, retries=3)
    start = time.monotonic()
    assert refused(lambda: a.push(unit(3) * 3, round=0, model_version=0)) == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - start < 1.0  # one backoff would already take >= 1 s


def test_client_gives_up_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = QueueClient(f"127.0.0.1:{port}", site_id="site-a", timeout=1.0, retries=2, backoff=0.05)
    assert refused(lambda: client.sample(3)) == grpc.StatusCode.UNAVAILABLE
    assert not client.health()
    client.close()


# ------------------------------------------------------------- health, audit


def test_health_check_serving(serve, clients):
    server = serve()
    assert clients(server, "site-a").health()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    channel.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_audit_log_records_every_kind_of_event(serve, clients, tmp_path):
    server = serve()
    a, b, coord = clients(server, "site-a"), clients(server, "site-b"), clients(server, "coordinator")
    a.push(unit(4), round=0, model_version=0)
    b.sample(2)
    coord.advance(1)
    with pytest.raises(QueueServiceError):
        a.push(unit(4) * 2, round=1, model_version=0)
    server.stop(grace=1.0)
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert {"start", "connect", "push", "sample", "advance", "rejection", "stop"} <= set(kinds)
    push = next(e for e in events if e["event"] == "push")
    assert (push["site"], push["round"], push["count"]) == ("site-a", 0, 4)
    sample = next(e for e in events if e["event"] == "sample")
    assert (sample["site"], sample["count"]) == ("site-b", 2)
    rejection = next(e for e in events if e["event"] == "rejection")
    assert (
        rejection["site"] == "site-a"
        and rejection["code"] == "INVALID_ARGUMENT"
        and "norm" in rejection["reason"])


def test_demo_open_queue_trusts_site_names_but_never_makes_an_anonymous_caller_the_coordinator(
    serve, clients
):
    server = serve(site_tokens={}, demo_open_queue=True)
    a = clients(server, "site-a", token=None)
    b = clients(server, "site-b", token=None)
    a.push(unit(3), round=0, model_version=0)
    assert len(b.sample(10)) == 3 and len(a.sample(10)) == 0
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")  # no site header, no token
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            queue_pb2_grpc.EmbeddingQueueStub(channel).Advance(queue_pb2.AdvanceRequest(round=5), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        refused(lambda: clients(server, "coordinator", token=None).advance(5))
        == grpc.StatusCode.PERMISSION_DENIED)
    # nothing moved; the token still works
    assert clients(server, "coordinator").stats()["current_round"] == 0


def test_an_open_queue_needs_the_demo_switch(serve):
    with pytest.raises(ValueError, match="demo_open_queue"):
        serve(site_tokens={})


# ------------------------------------------------------------- revocation


def test_revoked_site_is_refused_permission_denied_audited_and_changes_nothing(serve, clients, tmp_path):
    server = serve(revoked_sites=["site-b"])
    a, b, coord = clients(server, "site-a"), clients(server, "site-b"), clients(server, "coordinator")
    a.push(unit(4), round=0, model_version=0)
    before = coord.stats()
    for call in (lambda: b.push(unit(3, seed=1), round=0, model_version=0), lambda: b.sample(4), b.stats):
        with pytest.raises(QueueServiceError) as err:
            call()
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "site 'site-b' is revoked" in err.value.details
    # a wrong token is still "who are you?", not "you are refused"
    stranger = clients(server, "site-b", token="not-a-token-of-this-consortium")
    assert refused(stranger.stats) == grpc.StatusCode.UNAUTHENTICATED
    assert coord.stats() == before  # nothing of site-b's got in
    assert len(a.sample(10)) == 0  # and site-a, not revoked, goes on as before
    server.stop(grace=1.0)
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["revoked_sites"] == ["site-b"]
    denied = [e for e in events if e["event"] == "rejection" and e.get("site") == "site-b"]
    # rate limited per source: the first refusal is written at once, the later two as one counted line
    assert denied[0]["method"] == "Push" and sum(e["count"] for e in denied) == 3
    assert all(e["code"] == "PERMISSION_DENIED" and "revoked" in e["reason"] for e in denied)
    assert not [
        e for e in events if e["event"] in ("connect", "push", "sample") and e.get("site") == "site-b"]


def test_revoked_certificate_common_name_is_refused_under_mutual_tls(serve, clients):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(cn="fedcl test CA", key=ca_key, issuer_cn="fedcl test CA", issuer_key=ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _cert(
        cn="localhost", key=server_key, issuer_cn="fedcl test CA", issuer_key=ca_key, ca=False, server=True
    )
    site_key = ec.generate_private_key(ec.SECP256R1())
    site_cert = _cert(cn="site-c", key=site_key, issuer_cn="fedcl test CA", issuer_key=ca_key, ca=False,
                      client=True)
    server = serve(tls_cert=server_cert, tls_key=_pem_key(server_key), client_ca=ca, revoked_sites=["site-c"])
    c = clients(server, "site-c", token=None, root_certificates=ca, client_certificate=site_cert,
                client_key=_pem_key(site_key))
    with pytest.raises(QueueServiceError) as err:
        c.push(unit(3), round=0, model_version=0)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details


def test_revocation_applies_in_open_mode_and_never_to_the_coordinator(serve, clients):
    server = serve(site_tokens={}, demo_open_queue=True, revoked_sites=["site-b"])
    assert (
        refused(lambda: clients(server, "site-b", token=None).sample(1)) == grpc.StatusCode.PERMISSION_DENIED)
    assert len(clients(server, "site-a", token=None).sample(1)) == 0
    with pytest.raises(ValueError, match="coordinator"):
        serve(revoked_sites=["coordinator"])


# ------------------------------------------------------------------- TLS


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(*, cn: str, key, issuer_cn: str, issuer_key, ca: bool, server: bool = False, client: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _self_signed_server():
    key = ec.generate_private_key(ec.SECP256R1())
    return (_cert(cn="localhost", key=key, issuer_cn="localhost", issuer_key=key, ca=True, server=True),
            _pem_key(key))


def test_tls_with_self_signed_certificate(serve, clients):
    cert, key = _self_signed_server()
    server = serve(tls_cert=cert, tls_key=key)
    a = clients(server, "site-a", root_certificates=cert)
    b = clients(server, "site-b", root_certificates=cert)
    assert a.health()
    a.push(unit(5), round=0, model_version=0)
    assert rows(b.sample(5)) == rows(unit(5))
    # plaintext and an untrusted certificate do not get through
    plain = clients(server, "site-a", retries=0, timeout=2.0)
    assert refused(lambda: plain.sample(1)) == grpc.StatusCode.UNAVAILABLE
    other_cert, _ = _self_signed_server()
    untrusted = clients(server, "site-a", root_certificates=other_cert, retries=0, timeout=2.0)
    assert refused(lambda: untrusted.sample(1)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_certificate_names_the_site(serve, clients):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(cn="fedcl test CA", key=ca_key, issuer_cn="fedcl test CA", issuer_key=ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _cert(
        cn="localhost", key=server_key, issuer_cn="fedcl test CA", issuer_key=ca_key, ca=False, server=True
    )
    site_key = ec.generate_private_key(ec.SECP256R1())
    site_cert = _cert(cn="site-a", key=site_key, issuer_cn="fedcl test CA", issuer_key=ca_key, ca=False,
                      client=True)
    server = serve(tls_cert=server_cert, tls_key=_pem_key(server_key), client_ca=ca)
    mtls = dict(root_certificates=ca, client_certificate=site_cert, client_key=_pem_key(site_key))
    a = clients(server, "site-a", token=None, **mtls)
    a.push(unit(3), round=0, model_version=0)
    coord = clients(server, "coordinator", **mtls)
    assert coord.stats()["per_site"] == {"site-a": 3}
    assert len(a.sample(10)) == 0  # the certificate's site is excluded from its own sample
    # a certificate for site-a with site-b's token, or claiming site-b, is refused
    b_token = clients(server, "site-b", token=TOKENS["site-b"], **mtls)
    assert (
        refused(lambda: b_token.push(unit(3), round=0, model_version=0)) == grpc.StatusCode.PERMISSION_DENIED)
    claims_b = clients(server, "site-b", token=None, **mtls)
    assert (
        refused(lambda: claims_b.push(unit(3), round=0, model_version=0)) == grpc.StatusCode.PERMISSION_DENIED
    )
    # no client certificate: the handshake fails
    no_cert = clients(server, "site-a", root_certificates=ca, retries=0, timeout=2.0)
    assert refused(lambda: no_cert.sample(1)) == grpc.StatusCode.UNAVAILABLE
    assert coord.stats()["per_site"] == {"site-a": 3}


# ------------------------------------------------------------- the CLI


def _run_cli(config: Path, **kwargs) -> subprocess.Popen:
    code = "import sys; from fedcl.server.queue_cli import queue_main; sys.exit(queue_main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=REPO, **kwargs,
    )


def _write_config(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    "body,message",
    [
        ("[queue_service]\ninsecure = true\nbogus = 1\n", "bogus"),
        ("[queue_service]\nport = 70000\ninsecure = true\n", "port"),
        ("[queue_service]\n[queue_service.site_tokens]\nsite-a = 'token-a-0123456789abcdef'\n",
         "TLS is required"),
        ("[queue_service]\ninsecure = true\ncoordinator_token = 'short'\n", "coordinator_token"),
        ("[queue_service]\ninsecure = true\ntls_cert = 'missing.pem'\n", "tls_key"),
        (
            "[queue_service]\ntls_cert = 'missing.pem'\ntls_key = 'missing.key'\n"
            "coordinator_token = 'c-0123456789abcdef'\n"
            "[queue_service.site_tokens]\nsite-a = 'token-a-0123456789abcdef'\n",
            "missing.pem",
        ),
        ("[queue_service\n", "not valid TOML"),
        (
            "[queue_service]\ninsecure = true\ncoordinator_token = 'c-0123456789abcdef'\n"
            "revoked_sites = ['site-z']\n[queue_service.site_tokens]\nsite-a = 'token-a-0123456789abcdef'\n",
            "site-z",
        ),
        ("[queue_service]\ninsecure = true\nsnapshot_pth = 'q.npz'\n",
         "snapshot_pth: unknown key (did you mean snapshot_path?)"),
    ],
    ids=["unknown-key", "bad-port", "no-tls", "short-token", "cert-without-key", "missing-cert-file",
         "bad-toml", "unknown-revoked-site", "unknown-key-did-you-mean"],
)
def test_cli_config_errors_exit_2_with_one_clear_message(tmp_path, capsys, body, message):
    from fedcl.server.queue_cli import queue_main

    assert queue_main(["--config", str(_write_config(tmp_path / "queue.toml", body))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("fedcl-server queue: error:")


def test_cli_config_error_in_a_real_process_has_no_traceback(tmp_path):
    proc = _run_cli(_write_config(tmp_path / "queue.toml", "[queue_service]\ninsecure = true\nbogus = 1\n"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "bogus" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_cli_serves_snapshots_on_sigterm_and_restores(tmp_path):
    config = _write_config(
        tmp_path / "queue.toml",
        f"""
        [queue_service]
        port = 0
        dim = {DIM}
        capacity = 128
        per_site_quota = 64
        dtype = "float32"
        insecure = true
        snapshot_path = "state/queue.npz"
        audit_log = "state/audit.jsonl"
        coordinator_token = "{COORD}"

        [queue_service.site_tokens]
        site-a = "{TOKENS['site-a']}"
        site-b = "{TOKENS['site-b']}"
        """,
    )

    def start():
        proc = _run_cli(config)
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        return proc, int(line.split("127.0.0.1:")[1].split()[0])

    proc, port = start()
    try:
        with QueueClient(f"127.0.0.1:{port}", site_id="site-a", token=TOKENS["site-a"]) as a:
            assert a.health()
            a.push(unit(7), round=0, model_version=0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (tmp_path / "state" / "queue.npz").is_file()

    proc, port = start()
    try:
        with QueueClient(f"127.0.0.1:{port}", site_id="site-b", token=TOKENS["site-b"]) as b:
            assert rows(b.sample(10)) == rows(unit(7))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0

    # the snapshot no longer matches a changed config: refused with a clear message
    config.write_text(config.read_text().replace(f"dim = {DIM}", "dim = 32"))
    proc = _run_cli(config)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "dim" in err and "Traceback" not in err


def test_cli_serves_tls_with_certificate_paths_relative_to_the_config(tmp_path):
    cert, key = _self_signed_server()
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "queue.pem").write_bytes(cert)
    (tmp_path / "certs" / "queue.key").write_bytes(key)
    config = _write_config(
        tmp_path / "queue.toml",
        f"""
        [queue_service]
        port = 0
        dim = {DIM}
        tls_cert = "certs/queue.pem"
        tls_key = "certs/queue.key"
        coordinator_token = "{COORD}"

        [queue_service.site_tokens]
        site-a = "{TOKENS['site-a']}"
        """,
    )
    proc = _run_cli(config)
    try:
        line = proc.stdout.readline()
        assert "(TLS," in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with QueueClient(f"127.0.0.1:{port}", site_id="site-a", token=TOKENS["site-a"],
                         root_certificates=cert) as a:
            assert a.push(unit(3), round=0, model_version=0) == 3
            assert a.stats()["dtype"] == "float16"  # the documented default
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# ------------------------------------------------------------- what a site sees, audit wear, leftovers


def test_a_sites_stats_show_only_its_own_counts(serve, clients):
    server = serve()
    a, b, coord = clients(server, "site-a"), clients(server, "site-b"), clients(server, "coordinator")
    a.push(unit(3), round=0, model_version=0)
    b.push(unit(2, seed=1), round=0, model_version=0)
    mine = a.stats()
    assert mine["per_site"] == {"site-a": 3} and mine["size"] == 3
    assert mine["pushed_total"] == 0 and mine["oldest_round"] is None  # nothing about the others
    assert b.stats()["per_site"] == {"site-b": 2}
    assert coord.stats()["per_site"] == {"site-a": 3, "site-b": 2} and coord.stats()["size"] == 5


def test_rejections_are_audited_once_per_source_and_interval_with_a_count(serve, tmp_path):
    server = serve()
    flood = 60
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = queue_pb2_grpc.EmbeddingQueueStub(channel)
    start = time.monotonic()
    with channel:
        for _ in range(flood):
            with pytest.raises(grpc.RpcError):
                stub.Stats(queue_pb2.StatsRequest(), metadata=[("authorization", "Bearer wrong-token")],
                           timeout=10)
    elapsed = time.monotonic() - start
    server.stop(grace=1.0)
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    lines = [e for e in events if e["event"] == "rejection"]
    assert sum(e["count"] for e in lines) == flood  # every refusal counted
    assert len(lines) <= 2 + elapsed / 10.0  # one line per 10 s interval, plus the count flushed at the stop
    assert all(e["peer"].startswith("ipv") and e["code"] == "UNAUTHENTICATED" for e in lines)


def test_the_audit_log_rotates_by_size(serve, clients, tmp_path):
    server = serve(audit_max_bytes=4096, audit_backups=2)
    a = clients(server, "site-a")
    for i in range(150):  # ~140 bytes per push line: ~20 KiB in all, more than the 3 files hold
        a.push(unit(1, seed=i), round=0, model_version=0)
    server.stop(grace=1.0)
    log = tmp_path / "audit.jsonl"
    files = [log, log.with_name("audit.jsonl.1"), log.with_name("audit.jsonl.2")]
    assert all(f.exists() and f.stat().st_size <= 4096 for f in files)
    assert not log.with_name("audit.jsonl.3").exists()
    for f in files:  # whole JSON lines in every file
        assert all(json.loads(line)["event"] for line in f.read_text().splitlines())


def test_stale_snapshot_temp_files_are_removed_at_start(serve, tmp_path):
    stale = [tmp_path / ".queue.npz.k3j9x.tmp", tmp_path / ".queue.npz.a81q.tmp"]
    other = tmp_path / ".other.npz.k3j9x.tmp"
    for path in (*stale, other):
        path.write_bytes(b"half a snapshot")
    server = serve()
    assert not any(p.exists() for p in stale) and other.exists()
    server.stop(grace=1.0)
    start = next(json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "start")
    assert sorted(start["stale_temp_files"]) == sorted(p.name for p in stale)
