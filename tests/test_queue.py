"""The in-memory embedding queue (fedcl.queue), without any networking."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcl.queue import EmbeddingQueue, QueueError, SnapshotError

DIM = 8


def unit(n: int, *, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)  # (n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(**overrides) -> EmbeddingQueue:
    kwargs = dict(dim=DIM, capacity=32, per_site_quota=16, max_staleness=2, dtype="float32")
    kwargs.update(overrides)
    return EmbeddingQueue(**kwargs)


def everything(q: EmbeddingQueue) -> tuple[np.ndarray, list[str], np.ndarray]:
    """All entries, sorted by their bytes so two queues can be compared regardless of slot order."""
    s = q.sample(q.capacity, exclude_site=None, max_age=None, rng=np.random.default_rng(0), dtype=None)
    keys = [row.tobytes() + site.encode() + bytes(str(r), "ascii")
            for row, site, r in zip(s.embeddings, s.site_ids, s.rounds, strict=True)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return s.embeddings[order], [s.site_ids[i] for i in order], s.rounds[order]


def same_state(a: EmbeddingQueue, b: EmbeddingQueue) -> bool:
    ea, sa, ra = everything(a)
    eb, sb, rb = everything(b)
    return a.stats() == b.stats() and ea.tobytes() == eb.tobytes() and sa == sb and np.array_equal(ra, rb)


def rows_as_set(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


# ---------------------------------------------------------------- push / sample


def test_float32_round_trip_is_bitwise():
    q = make()
    x = unit(10)
    assert q.push(x, site_id="a", round=0, model_version=3) == 10
    s = q.sample(100, exclude_site="b", max_age=None, rng=np.random.default_rng(1))
    assert len(s) == 10 and s.embeddings.dtype == np.float32
    assert rows_as_set(s.embeddings) == rows_as_set(x)
    assert s.site_ids == ["a"] * 10
    assert set(s.model_versions.tolist()) == {3}


def test_float16_storage_keeps_rows_to_half_precision():
    q = make(dtype="float16")
    x = unit(10)
    q.push(x, site_id="a", round=0, model_version=0)
    s = q.sample(10, exclude_site=None, max_age=None, rng=np.random.default_rng(0))
    assert rows_as_set(s.embeddings) == rows_as_set(x.astype(np.float16).astype(np.float32))
    assert q.sample(10, exclude_site=None, max_age=None, dtype=None).embeddings.dtype == np.float16


def test_sample_excludes_own_site():
    q = make()
    q.push(unit(5, seed=1), site_id="a", round=0, model_version=0)
    q.push(unit(6, seed=2), site_id="b", round=0, model_version=0)
    s = q.sample(100, exclude_site="a", max_age=None, rng=np.random.default_rng(0))
    assert s.site_ids == ["b"] * 6
    assert rows_as_set(s.embeddings) == rows_as_set(unit(6, seed=2))
    # an unknown site excludes nothing
    assert len(q.sample(100, exclude_site="zzz", max_age=None)) == 11


def test_sample_max_age():
    q = make(max_staleness=5)
    q.push(unit(3, seed=1), site_id="a", round=0, model_version=0)
    q.advance(2)
    q.push(unit(4, seed=2), site_id="a", round=1, model_version=1)
    q.push(unit(5, seed=3), site_id="a", round=2, model_version=2)
    ages = {age: len(q.sample(100, exclude_site=None, max_age=age)) for age in (0, 1, 2, 3)}
    assert ages == {0: 5, 1: 9, 2: 12, 3: 12}
    s = q.sample(100, exclude_site=None, max_age=1, rng=np.random.default_rng(0))
    assert set(s.rounds.tolist()) == {1, 2}


def test_sample_returns_fewer_without_replacement():
    q = make()
    q.push(unit(7), site_id="a", round=0, model_version=0)
    s = q.sample(5, exclude_site=None, max_age=None, rng=np.random.default_rng(0))
    assert len(s) == 5 and len(rows_as_set(s.embeddings)) == 5
    assert len(q.sample(50, exclude_site=None, max_age=None)) == 7
    assert len(q.sample(0, exclude_site=None, max_age=None)) == 0
    assert q.sample(3, exclude_site="a", max_age=None).embeddings.shape == (0, DIM)


def test_sample_is_uniform():
    q = make(capacity=10, per_site_quota=10)
    x = unit(10)
    q.push(x, site_id="a", round=0, model_version=0)
    index = {row.tobytes(): i for i, row in enumerate(x)}
    rng = np.random.default_rng(123)
    counts = np.zeros(10)
    draws = 2000
    for _ in range(draws):
        for row in q.sample(3, exclude_site=None, max_age=None, rng=rng).embeddings:
            counts[index[row.tobytes()]] += 1
    expected = draws * 3 / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30.0  # 9 degrees of freedom: p < 0.001 beyond 27.9


def test_sample_arguments_are_checked():
    q = make()
    with pytest.raises(QueueError) as err:
        q.sample(-1, exclude_site=None, max_age=None)
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(QueueError):
        q.sample(1, exclude_site=None, max_age=-2)


# --------------------------------------------------------- capacity and quota


def test_capacity_evicts_oldest_first():
    q = make(capacity=10, per_site_quota=10)
    q.push(unit(6, seed=1), site_id="a", round=0, model_version=0)
    q.push(unit(6, seed=2), site_id="b", round=0, model_version=0)
    stats = q.stats()
    assert stats["size"] == 10 and stats["per_site"] == {"a": 4, "b": 6}
    assert stats["evicted"]["capacity"] == 2
    kept_a = q.sample(10, exclude_site="b", max_age=None).embeddings
    assert rows_as_set(kept_a) == rows_as_set(unit(6, seed=1)[2:])  # the two oldest rows of a went


def test_quota_makes_room_from_the_sites_own_oldest_entries():
    q = make(capacity=32, per_site_quota=8)
    q.push(unit(5, seed=9), site_id="b", round=0, model_version=0)
    first, second = unit(6, seed=1), unit(5, seed=2)
    q.push(first, site_id="a", round=0, model_version=0)
    q.push(second, site_id="a", round=0, model_version=0)
    stats = q.stats()
    assert stats["per_site"] == {"b": 5, "a": 8}
    assert stats["evicted"] == {"capacity": 0, "quota": 3, "staleness": 0}
    kept_a = q.sample(32, exclude_site="b", max_age=None).embeddings
    assert rows_as_set(kept_a) == rows_as_set(np.concatenate([first[3:], second]))
    assert len(q.sample(32, exclude_site="a", max_age=None)) == 5  # b untouched


def test_push_larger_than_quota_is_refused():
    q = make(per_site_quota=4)
    q.push(unit(2), site_id="a", round=0, model_version=0)
    before = q.stats()
    with pytest.raises(QueueError) as err:
        q.push(unit(5), site_id="a", round=0, model_version=0)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert q.stats() == before


# ------------------------------------------------------------------- rounds


def test_advance_evicts_by_age():
    q = make(max_staleness=2, capacity=64, per_site_quota=64)
    for r in range(4):
        q.advance(r)
        q.push(unit(3, seed=r), site_id="a", round=r, model_version=r)
    assert q.stats()["size"] == 9  # round 0 went at round 3 (3 rounds old > max_staleness 2)
    assert q.stats()["evicted"]["staleness"] == 3
    assert q.advance(4) == 3  # round 1 is now 3 rounds old
    assert q.stats()["evicted"]["staleness"] == 6
    assert set(q.sample(64, exclude_site=None, max_age=None).rounds.tolist()) == {2, 3}
    assert q.advance(4) == 0  # same round again: nothing more
    assert q.advance(10) == 6 and len(q) == 0
    assert q.stats()["oldest_round"] is None


def test_advance_cannot_go_back():
    q = make()
    q.advance(3)
    with pytest.raises(QueueError) as err:
        q.advance(2)
    assert err.value.code == "FAILED_PRECONDITION"
    assert q.current_round == 3


# ------------------------------------------------------------ bad pushes


def _bad_pushes():
    x = unit(4)
    nan, inf, big = x.copy(), x.copy(), x.copy()
    nan[3, 2] = np.nan
    inf[1, 0] = np.inf
    big[2] *= 1.5
    return [
        ("wrong dim", dict(embeddings=unit(4, dim=DIM + 1)), "INVALID_ARGUMENT"),
        ("nan", dict(embeddings=nan), "INVALID_ARGUMENT"),
        ("inf", dict(embeddings=inf), "INVALID_ARGUMENT"),
        ("non-unit norm", dict(embeddings=big), "INVALID_ARGUMENT"),
        ("zero vector", dict(embeddings=np.zeros((2, DIM), np.float32)), "INVALID_ARGUMENT"),
        ("empty", dict(embeddings=np.zeros((0, DIM), np.float32)), "INVALID_ARGUMENT"),
        ("1-d", dict(embeddings=x[0]), "INVALID_ARGUMENT"),
        ("integer dtype", dict(embeddings=np.ones((2, DIM), np.int32)), "INVALID_ARGUMENT"),
        ("list", dict(embeddings=x.tolist()), "INVALID_ARGUMENT"),
        ("oversized", dict(embeddings=unit(17)), "RESOURCE_EXHAUSTED"),
        ("unknown site", dict(site_id="zzz"), "NOT_FOUND"),
        ("empty site id", dict(site_id=""), "INVALID_ARGUMENT"),
        ("future round", dict(round=6), "FAILED_PRECONDITION"),
        ("stale round", dict(round=2), "FAILED_PRECONDITION"),
        ("negative round", dict(round=-1), "INVALID_ARGUMENT"),
        ("bool round", dict(round=True), "INVALID_ARGUMENT"),
        ("negative model version", dict(model_version=-1), "INVALID_ARGUMENT"),
    ]


@pytest.mark.parametrize("case,overrides,code", _bad_pushes(), ids=[c[0] for c in _bad_pushes()])
def test_rejected_push_changes_nothing(case, overrides, code):
    q = make(sites={"a", "b"}, max_staleness=2, per_site_quota=16)
    q.advance(5)
    q.push(unit(3, seed=7), site_id="b", round=5, model_version=1)
    q.push(unit(2, seed=8), site_id="a", round=4, model_version=1)
    reference = make(sites={"a", "b"}, max_staleness=2, per_site_quota=16)
    reference.advance(5)
    reference.push(unit(3, seed=7), site_id="b", round=5, model_version=1)
    reference.push(unit(2, seed=8), site_id="a", round=4, model_version=1)
    kwargs = dict(embeddings=unit(4), site_id="a", round=5, model_version=2)
    kwargs.update(overrides)
    embeddings = kwargs.pop("embeddings")
    with pytest.raises(QueueError) as err:
        q.push(embeddings, **kwargs)
    assert err.value.code == code
    assert str(err.value)  # says why
    assert same_state(q, reference)
    # and the queue still works as before
    q.push(unit(1, seed=11), site_id="a", round=5, model_version=2)
    assert q.stats()["per_site"] == {"a": 3, "b": 3}


def test_float16_overflow_is_rejected_not_stored():
    q = make(dtype="float16")
    x = np.zeros((1, DIM))
    x[0, 0] = 1e6  # finite in float64, Inf in float16
    with pytest.raises(QueueError) as err:
        q.push(x, site_id="a", round=0, model_version=0)
    assert err.value.code == "INVALID_ARGUMENT" and len(q) == 0


def test_constructor_rejects_bad_settings():
    for bad in (dict(dim=0), dict(capacity=0), dict(per_site_quota=0), dict(max_staleness=-1),
                dict(dtype="int8"), dict(norm_tolerance=0.0)):
        with pytest.raises(ValueError):
            make(**bad)


def test_memory_of_a_million_float16_rows_is_within_budget():
    q = EmbeddingQueue(dim=128, capacity=1_000_000, per_site_quota=8192, max_staleness=5, dtype="float16")
    raw = 1_000_000 * 128 * 2
    assert raw <= q.nbytes <= 1.3 * raw
    assert q._emb.nbytes == raw  # embeddings are stored as float16, not float32


# ------------------------------------------------------------------ snapshot


def _filled(**overrides) -> EmbeddingQueue:
    q = make(**overrides)
    q.push(unit(5, seed=1), site_id="a", round=0, model_version=0)
    q.advance(1)
    q.push(unit(4, seed=2), site_id="b", round=1, model_version=1)
    q.push(unit(3, seed=3), site_id="a", round=1, model_version=1)
    return q


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_snapshot_restore_round_trip(tmp_path, dtype):
    q = _filled(dtype=dtype, per_site_quota=6)
    path = tmp_path / "state" / "queue.npz"
    q.snapshot(path)
    r = EmbeddingQueue.restore(path)
    assert same_state(q, r)
    assert [p.name for p in path.parent.iterdir()] == ["queue.npz"]  # no temp file left
    # the restored queue goes on with the same rules: a's oldest entry makes room
    for queue in (q, r):
        queue.push(unit(1, seed=4), site_id="a", round=1, model_version=2)
    assert same_state(q, r)
    assert r.stats()["per_site"] == {"a": 6, "b": 4}


def test_snapshot_keeps_fixed_sites(tmp_path):
    q = make(sites={"a", "b"})
    q.snapshot(tmp_path / "q.npz")
    r = EmbeddingQueue.restore(tmp_path / "q.npz")
    assert r.fixed_sites and r.stats()["per_site"] == {"a": 0, "b": 0}
    with pytest.raises(QueueError) as err:
        r.push(unit(1), site_id="c", round=0, model_version=0)
    assert err.value.code == "NOT_FOUND"


def test_snapshot_overwrites_atomically(tmp_path):
    path = tmp_path / "q.npz"
    make().snapshot(path)
    q = _filled()
    q.snapshot(path)
    assert same_state(EmbeddingQueue.restore(path), q)


def _rewrite(path, *, header=None, arrays=None, drop=None, extra=None):
    with np.load(path, allow_pickle=False) as npz:
        content = {name: npz[name] for name in npz.files}
    if header is not None:
        h = json.loads(content["header"].tobytes())
        h.update(header)
        content["header"] = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)
    content.update(arrays or {})
    for name in drop or ():
        content.pop(name)
    content.update(extra or {})
    with open(path, "wb") as f:
        np.savez(f, **content)


def _corruptions():
    def truncate(p):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    def flip_byte(p):
        data = bytearray(p.read_bytes())
        data[len(data) // 3] ^= 0xFF
        p.write_bytes(bytes(data))

    def not_npz(p):
        p.write_bytes(b"this is not a snapshot\n" * 10)

    def changed_rows(p):
        with np.load(p) as npz:
            emb = npz["embeddings"].copy()
        emb[0] = emb[1]
        _rewrite(p, arrays={"embeddings": emb})

    def wrong_version(p):
        _rewrite(p, header={"version": 99})

    def wrong_format(p):
        _rewrite(p, header={"format": "something-else"})

    def missing_array(p):
        _rewrite(p, drop=["seq"])

    def pickled_array(p):
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        with zipfile.ZipFile(p, "a") as z:
            z.writestr("evil.npy", buf.getvalue())

    def bad_header_json(p):
        _rewrite(p, arrays={"header": np.frombuffer(b"{not json", dtype=np.uint8)})

    def future_rounds(p):
        with np.load(p) as npz:
            rounds = npz["rounds"].copy()
            header = json.loads(npz["header"].tobytes())
        rounds[0] = 99
        arrays = {"rounds": rounds}
        with np.load(p) as npz:
            content = {n: npz[n] for n in npz.files if n != "header"}
        content.update(arrays)
        from fedcl.queue import _checksum  # a consistent checksum: the range check must catch it

        header["sha256"] = _checksum(content)
        _rewrite(p, header=header, arrays=arrays)

    return [truncate, flip_byte, not_npz, changed_rows, wrong_version, wrong_format, missing_array,
            pickled_array, bad_header_json, future_rounds]


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_restore_refuses_corrupt_snapshots(tmp_path, corrupt):
    path = tmp_path / "q.npz"
    _filled().snapshot(path)
    corrupt(path)
    with pytest.raises(SnapshotError) as err:
        EmbeddingQueue.restore(path)
    assert err.value.code == "FAILED_PRECONDITION"
    assert str(path) in str(err.value)


def test_restore_missing_file(tmp_path):
    with pytest.raises(SnapshotError) as err:
        EmbeddingQueue.restore(tmp_path / "nope.npz")
    assert err.value.code == "NOT_FOUND"


# ------------------------------------------- random operations vs a plain model


class ListModel:
    """The queue's rules written as plainly as possible: a list of entries in insertion order."""

    def __init__(self, *, capacity, quota, staleness):
        self.capacity, self.quota, self.staleness = capacity, quota, staleness
        self.entries: list[tuple[str, int]] = []  # (site, round), oldest first
        self.round = 0

    def push(self, site, n, round):
        if (
            n == 0
            or n > min(self.quota, self.capacity)
            or round > self.round
            or self.round - round > self.staleness
        ):
            return False
        own = [i for i, e in enumerate(self.entries) if e[0] == site]
        drop = set(own[: max(0, len(own) + n - self.quota)])
        self.entries = [e for i, e in enumerate(self.entries) if i not in drop]
        overflow = len(self.entries) + n - self.capacity
        if overflow > 0:
            self.entries = self.entries[overflow:]
        self.entries += [(site, round)] * n
        return True

    def advance(self, round):
        if round < self.round:
            return False
        self.round = round
        self.entries = [e for e in self.entries if round - e[1] <= self.staleness]
        return True


operation = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(["a", "b", "c"]), st.integers(0, 9), st.integers(-1, 1)),
    st.tuples(st.just("advance"), st.integers(-1, 2)),
    st.tuples(st.just("restart")),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, max_size=30), st.integers(4, 20), st.integers(1, 12), st.integers(0, 3))
def test_random_operations_match_the_list_model(ops, capacity, quota, staleness):
    q = EmbeddingQueue(dim=4, capacity=capacity, per_site_quota=quota, max_staleness=staleness,
                       dtype="float32")
    model = ListModel(capacity=capacity, quota=quota, staleness=staleness)
    for op in ops:
        if op[0] == "push":
            _, site, n, offset = op
            round = max(0, model.round + offset)
            ok = model.push(site, n, round)
            try:
                rows = unit(n, dim=4) if n else np.zeros((0, 4), np.float32)
                q.push(rows, site_id=site, round=round, model_version=0)
                assert ok
            except QueueError:
                assert not ok
        elif op[0] == "restart":
            with tempfile.TemporaryDirectory() as tmp:
                q.snapshot(Path(tmp) / "q.npz")
                q = EmbeddingQueue.restore(Path(tmp) / "q.npz")
        else:
            round = model.round + op[1]
            ok = model.advance(round)
            try:
                q.advance(round)
                assert ok
            except QueueError:
                assert not ok
        s = q.sample(capacity, exclude_site=None, max_age=None)
        assert sorted(zip(s.site_ids, s.rounds.tolist(), strict=False)) == sorted(model.entries)
