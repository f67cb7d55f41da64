"""Fuzzing the queue service's request handling over real gRPC on loopback (hypothesis).

Thousands of generated requests (well-formed, malformed, unauthenticated, oversized, from the
wrong principal): the server never crashes or answers UNKNOWN/INTERNAL, every rejection carries
a proper status with a message, and the queue stays consistent (finite unit-norm rows, quotas,
capacity, stats agree with the stored rows).
"""

import os
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcl.queue import EmbeddingQueue
from fedcl.server.queue_service import CallLimits, ServeSettings, start_queue_server
from fedcl.wire.proto import queue_pb2, queue_pb2_grpc

DIM = 8
TOKENS = {"site-a": "tok-a", "site-b": "tok-b"}
COORD = "tok-coord"
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE,
}
# batches of 5-10 requests: a short run in the default tier, 400 in the e2e tier (scripts/test.sh --e2e)
EXAMPLES = int(os.environ.get("FEDCL_FUZZ_EXAMPLES", "50"))
pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def served():
    q = EmbeddingQueue(dim=DIM, capacity=256, per_site_quota=96, max_staleness=2, dtype="float32")
    serve_settings = ServeSettings(host="127.0.0.1", port=0, site_tokens=TOKENS, coordinator_token=COORD,
                                   max_message_bytes=64 * 1024,
                                   limits=CallLimits(max_workers=4, coordinator_reserve=1))
    server = start_queue_server(q, serve_settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield q, queue_pb2_grpc.EmbeddingQueueStub(channel)
    channel.close()
    server.stop(0)


def _unit_rows(rows, seed):
    x = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


tokens = st.sampled_from([None, "tok-a", "tok-b", COORD, "wrong", ""])
dtypes = st.sampled_from([0, 1, 2, 7])


@st.composite
def push_chunks(draw):
    n_chunks = draw(st.integers(0, 3))
    rnd = draw(st.integers(-2, 6))
    chunks = []
    for _ in range(n_chunks):
        rows = draw(st.integers(0, 12))
        dim = draw(st.sampled_from([DIM, DIM, DIM, 0, 3, DIM + 1]))
        dtype = draw(dtypes)
        kind = draw(st.sampled_from(["unit", "unit", "random", "nan", "short", "zeros"]))
        seed = draw(st.integers(0, 2**16))
        x = _unit_rows(rows, seed)
        if kind == "random":
            x = x * draw(st.floats(0.0, 3.0))
        elif kind == "nan" and rows:
            x[0, 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        elif kind == "zeros":
            x[:] = 0
        data = x.astype(np.float16 if dtype == 1 else np.float32).tobytes()
        if kind == "short":
            data = data[: max(0, len(data) - draw(st.integers(1, 9)))]
        chunks.append(queue_pb2.PushChunk(rows=rows, dim=dim, dtype=dtype, data=data, round=rnd,
                                          model_version=draw(st.integers(-1, 3)),
                                          request_id=draw(st.sampled_from(["", "r1", "r2"]))))
    return chunks


@st.composite
def good_push(draw):
    """A well-formed push from a site, at the queue's current round (resolved when sent)."""
    site = draw(st.sampled_from(["site-a", "site-b"]))
    dtype = draw(st.sampled_from([1, 2]))
    chunks = []
    for _ in range(draw(st.integers(1, 3))):
        rows = draw(st.integers(1, 12))
        x = _unit_rows(rows, draw(st.integers(0, 2**16)))
        chunks.append(queue_pb2.PushChunk(rows=rows, dim=DIM, dtype=dtype, round=-100,
                                          data=x.astype(np.float16 if dtype == 1 else np.float32).tobytes()))
    return ("push", TOKENS[site], site, chunks)


def good_sample():
    """A well-formed sample from a site or the coordinator: with only half the tokens valid and a
    foreign exclude_site refused, the general sample strategy drew no accepted sample in a CI run
    of 50 examples (commit 8d8d440)."""
    return st.tuples(st.just("sample"), st.sampled_from(["tok-a", "tok-b", COORD]), st.integers(0, 64),
                     st.one_of(st.none(), st.integers(0, 9)), st.just(""))


# an advance round of NEXT_ROUND - d means "the queue's current round + d" (resolved when sent)
NEXT_ROUND = -200

requests = st.one_of(
    good_push(), good_push(), good_sample(),
    st.tuples(st.just("advance"), st.just(COORD), st.integers(0, 2).map(lambda d: NEXT_ROUND - d)),
    st.tuples(st.just("push"), tokens, st.sampled_from([None, "site-a", "site-b", "site-z"]), push_chunks()),
    st.tuples(st.just("sample"), tokens, st.integers(0, 5000), st.one_of(st.none(), st.integers(0, 9)),
              st.sampled_from(["", "site-a", "x" * 300])),
    st.tuples(st.just("advance"), tokens, st.integers(-3, 12)),
    # the coordinator's own Advance: with only 1 token in 6 a short run drew no accepted Advance
    # in about 1 run of 8, and the guard below failed by chance
    st.tuples(st.just("advance"), st.just(COORD), st.integers(-3, 12)),
    st.tuples(st.just("stats"), tokens),
    st.tuples(st.just("garbage_push"), tokens, st.binary(max_size=200)),
)


SEEN: Counter = Counter()


def _metadata(token, site=None):
    md = []
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    if site is not None:
        md.append(("x-fedcl-site", site))
    return md


def _call(stub, req, current_round):
    kind = req[0]
    if kind == "push":
        _, token, site, chunks = req
        for c in chunks:
            if c.round == -100:
                c.round = current_round
        return stub.Push(iter(chunks), metadata=_metadata(token, site), timeout=5)
    if kind == "sample":
        _, token, k, max_age, exclude = req
        kw = {"k": k, "exclude_site": exclude}
        if max_age is not None:
            kw["max_age"] = max_age
        return list(stub.Sample(queue_pb2.SampleRequest(**kw), metadata=_metadata(token), timeout=5))
    if kind == "advance":
        _, token, rnd = req
        if rnd <= NEXT_ROUND:  # a well-formed advance by the coordinator
            rnd = current_round + (NEXT_ROUND - rnd)
        return stub.Advance(queue_pb2.AdvanceRequest(round=rnd), metadata=_metadata(token), timeout=5)
    if kind == "stats":
        return stub.Stats(queue_pb2.StatsRequest(), metadata=_metadata(req[1]), timeout=5)
    # arbitrary bytes decoded as a PushChunk (protobuf accepts many), else carried as data
    _, token, blob = req
    chunk = queue_pb2.PushChunk()
    try:
        chunk.ParseFromString(blob)
    except Exception:  # not parseable: the client library would refuse to send it; send an empty push
        chunk = queue_pb2.PushChunk(data=blob[:64])
    return stub.Push(iter([chunk]), metadata=_metadata(token), timeout=5)


def _check_consistent(q: EmbeddingQueue):
    st_ = q.stats()
    valid = q._valid
    rows = q._emb[valid].astype(np.float32)
    assert np.isfinite(rows).all()
    if len(rows):
        assert np.all(np.abs(np.linalg.norm(rows, axis=1) - 1) <= q.norm_tolerance + 1e-3)
    assert int(valid.sum()) == st_["size"] <= q.capacity
    per_site = st_["per_site"]
    assert sum(per_site.values()) == st_["size"]
    assert all(v <= q.per_site_quota for v in per_site.values())
    assert np.all(q._round[valid] >= q.current_round - q.max_staleness)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(batch=st.lists(requests, min_size=5, max_size=10))
def test_fuzzed_requests_never_crash_or_corrupt(served, batch):
    q, stub = served
    for req in batch:
        before = q.stats()
        try:
            _call(stub, req, q.current_round)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
            assert err.details(), f"{req[0]} rejected with {code} but no message"
        assert code in ALLOWED, f"{req[0]} gave {code}"
        SEEN[(req[0], code.name)] += 1
        if code != grpc.StatusCode.OK and req[0] in ("push", "garbage_push", "advance"):
            after = q.stats()
            assert after["size"] == before["size"] and after["per_site"] == before["per_site"]
        _check_consistent(q)


def test_fuzzing_reached_both_accepted_and_rejected_paths():
    # guards the fuzzer itself: it must have exercised real stores and every kind of refusal (the rarer
    # kinds only in the e2e tier's 400 examples: a short run missed FAILED_PRECONDITION in 3 of 4 seeds)
    assert sum(SEEN.values()) >= 5 * EXAMPLES, SEEN
    assert SEEN[("push", "OK")] > 0 and SEEN[("sample", "OK")] > 0 and SEEN[("advance", "OK")] > 0
    codes = ("INVALID_ARGUMENT", "UNAUTHENTICATED") + (("PERMISSION_DENIED", "FAILED_PRECONDITION")
                                                       if EXAMPLES >= 400 else ())
    for code in codes:
        assert sum(v for (kind, c), v in SEEN.items() if c == code) > 0, (code, SEEN)
