"""The global queue of negatives: a ring buffer of unit-norm embeddings with site/round metadata.

Pure numpy, no networking (the gRPC service in fedcl/server/queue_service.py wraps it). Every
push is validated completely before anything is stored, so a rejected push changes
nothing. Rules (docs: "Queue service contract"):

- capacity: when full, the oldest entries (by insertion) make room;
- per-site quota: a site's own oldest entries make room for its new ones, so no site
  floods the queue; one push larger than the quota is refused;
- staleness: ``advance(round)`` evicts entries with ``round - entry_round > max_staleness``,
  and pushes from rounds that are already that stale, or from the future, are refused;
- sampling: uniform without replacement over the eligible entries (not the caller's own
  site, not older than ``max_age`` rounds); fewer come back when fewer exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from fedcl.fileio import atomic_file

__all__ = ["EmbeddingQueue", "QueueError", "QueueSample", "SnapshotError"]

_CODES = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "NOT_FOUND", "ABORTED"})
_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
_MAX_ROUND = np.iinfo(np.int32).max  # rounds are stored as int32
_MAX_SITE_ID_LEN = 128
_NORM_BLOCK = 4096  # rows per block when checking norms: bounds the float32 temporaries (2 MB at dim 128)

SNAPSHOT_FORMAT = "fedcl-queue-snapshot"
SNAPSHOT_VERSION = 1
# name -> dtype of the arrays in a snapshot: slots [0, high water) as they lie in memory
_SNAPSHOT_ARRAYS = {
    "embeddings": None,  # the storage dtype, (n, dim)
    "site_index": np.dtype(np.int32),
    "rounds": np.dtype(np.int32),
    "model_versions": np.dtype(np.int64),
    "seq": np.dtype(np.int64),
    "valid": np.dtype(bool),
}


@cache
def _float16_to_float32_table() -> np.ndarray:
    """(65536,) float32 value of every float16 bit pattern; a gather through it is exact and,
    with numpy 2.4 on this CPU, about 2x faster than ``astype(np.float32)``."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if x.dtype == np.float16 and dtype == np.float32:
        return np.take(_float16_to_float32_table(), x.view(np.uint16))
    return x.astype(dtype, copy=False)


class QueueError(Exception):
    """A request the queue refuses; ``code`` is a gRPC status name, the message says why and what to do."""

    def __init__(self, code: str, message: str) -> None:
        if code not in _CODES:
            raise ValueError(f"unknown queue error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message


class SnapshotError(QueueError):
    """A snapshot file that is missing, corrupt or of another format."""


@dataclass(frozen=True)
class QueueSample:
    embeddings: np.ndarray  # (n, dim) float32 unless another dtype was asked for
    site_ids: list[str]  # (n,)
    rounds: np.ndarray  # (n,) int64
    model_versions: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def _check_int(value: object, name: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QueueError("INVALID_ARGUMENT", f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise QueueError("INVALID_ARGUMENT", f"{name} must be {bound}, got {value}")
    return value


class EmbeddingQueue:
    """Fixed-size store of unit-norm embeddings; thread-safe.

    Memory is preallocated: ``capacity x dim`` in the storage dtype plus 25 bytes of
    metadata per row (1,000,000 x 128 float16: 256 MB + 25 MB).
    """

    def __init__(
        self,
        *,
        dim: int,
        capacity: int,
        per_site_quota: int,
        max_staleness: int,
        dtype: str = "float16",
        norm_tolerance: float = 1e-2,
        sites: set[str] | None = None,
    ) -> None:
        if int(dim) < 1 or int(capacity) < 1 or int(per_site_quota) < 1:
            raise ValueError(
                f"dim, capacity and per_site_quota must be >= 1, got {dim}, {capacity}, {per_site_quota}")
        if int(max_staleness) < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not 0.0 < float(norm_tolerance) < 1.0:
            raise ValueError(f"norm_tolerance must be in (0, 1), got {norm_tolerance}")
        self.dim = int(dim)
        self.capacity = int(capacity)
        self.per_site_quota = int(per_site_quota)
        self.max_staleness = int(max_staleness)
        self.dtype = dtype
        self.norm_tolerance = float(norm_tolerance)
        self.fixed_sites = sites is not None

        # np.zeros maps untouched pages lazily: memory grows as the queue fills.
        self._emb = np.zeros((self.capacity, self.dim), dtype=_DTYPES[dtype])  # (capacity, dim)
        self._site = np.zeros(self.capacity, dtype=np.int32)  # index into _site_names
        self._round = np.zeros(self.capacity, dtype=np.int32)
        self._version = np.zeros(self.capacity, dtype=np.int64)
        self._seq = np.zeros(self.capacity, dtype=np.int64)  # insertion order; oldest = smallest
        self._valid = np.zeros(self.capacity, dtype=bool)

        self._site_names: list[str] = []
        self._site_index: dict[str, int] = {}
        self._site_counts: list[int] = []
        for site in sorted(sites or ()):
            self._check_site_id(site)
            self._add_site(site)
        self._size = 0
        self._high_water = 0  # slots >= this were never written: a push can take them without a scan
        self._next_seq = 0
        self._current_round = 0
        self._pushed_total = 0
        self._evicted = {"capacity": 0, "quota": 0, "staleness": 0}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- push

    def push(self, embeddings: np.ndarray, *, site_id: str, round: int, model_version: int) -> int:
        """Store embeddings (N, dim) from ``site_id``; return N. All or nothing."""
        x = self._validate_embeddings(embeddings)  # (N, dim)
        self._check_site_id(site_id)
        round = _check_int(round, "round", maximum=_MAX_ROUND)
        model_version = _check_int(model_version, "model_version", maximum=np.iinfo(np.int64).max)
        n = x.shape[0]
        with self._lock:
            if self.fixed_sites and site_id not in self._site_index:
                raise QueueError(
                    "NOT_FOUND",
                    f"unknown site {site_id!r}: this queue accepts only {sorted(self._site_names)}")
            if round > self._current_round:
                raise QueueError(
                    "FAILED_PRECONDITION",
                    f"round {round} is ahead of the queue's current round {self._current_round}; "
                    "the coordinator advances the queue before sites push for a round",
                )
            if self._current_round - round > self.max_staleness:
                raise QueueError(
                    "FAILED_PRECONDITION",
                    f"round {round} is stale: the queue is at round {self._current_round} and keeps "
                    f"embeddings at most {self.max_staleness} rounds old; recompute them with the current "
                    "model")
            # Validation is over: from here on the push cannot fail.
            site = self._site_index.get(site_id)
            if site is None:
                site = self._add_site(site_id)
            over_quota = self._site_counts[site] + n - self.per_site_quota
            if over_quota > 0:
                self._evict_oldest(self._valid & (self._site == site), over_quota, reason="quota")
            over_capacity = n - (self.capacity - self._size)
            if over_capacity > 0:
                self._evict_oldest(self._valid, over_capacity, reason="capacity")
            if self._high_water + n <= self.capacity:
                slots = slice(self._high_water, self._high_water + n)
                self._high_water += n
            else:
                slots = np.flatnonzero(~self._valid)[:n]  # (N,) ascending
                self._high_water = max(self._high_water, int(slots[-1]) + 1)
                if slots[-1] - slots[0] == n - 1:  # contiguous: a slice write avoids a gather
                    slots = slice(int(slots[0]), int(slots[0]) + n)
            self._emb[slots] = x
            self._site[slots] = site
            self._round[slots] = round
            self._version[slots] = model_version
            self._seq[slots] = np.arange(self._next_seq, self._next_seq + n, dtype=np.int64)
            self._valid[slots] = True
            self._next_seq += n
            self._size += n
            self._site_counts[site] += n
            self._pushed_total += n
            return n

    def _validate_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        if not isinstance(embeddings, np.ndarray):
            raise QueueError("INVALID_ARGUMENT",
                             f"embeddings must be a numpy array, got {type(embeddings).__name__}")
        if embeddings.dtype not in (np.float16, np.float32, np.float64):
            raise QueueError("INVALID_ARGUMENT", f"embeddings must be float16/32/64, got {embeddings.dtype}")
        if embeddings.ndim != 2:
            raise QueueError("INVALID_ARGUMENT",
                             f"embeddings must be 2-D (N, {self.dim}), got shape {embeddings.shape}")
        n, dim = embeddings.shape
        if dim != self.dim:
            raise QueueError("INVALID_ARGUMENT",
                             f"embeddings have dim {dim}, this queue holds dim {self.dim}")
        if n == 0:
            raise QueueError("INVALID_ARGUMENT", "empty push: send at least one embedding")
        if n > min(self.per_site_quota, self.capacity):
            raise QueueError(
                "RESOURCE_EXHAUSTED",
                f"push of {n} embeddings exceeds the per-site quota of {self.per_site_quota} "
                f"(capacity {self.capacity}); push fewer",
            )
        with np.errstate(over="ignore"):  # out-of-range values become Inf and fail the norm check
            x = embeddings.astype(_DTYPES[self.dtype], copy=False)  # (N, dim) storage dtype
        for start in range(0, n, _NORM_BLOCK):
            src = embeddings[start : start + _NORM_BLOCK]
            if not np.isfinite(src).all():
                row = start + int(np.flatnonzero(~np.isfinite(src).all(axis=1))[0])
                raise QueueError("INVALID_ARGUMENT", f"embedding row {row} contains NaN or Inf")
            # norms after conversion: what is stored must be unit norm
            norms = np.linalg.norm(_to_dtype(x[start : start + _NORM_BLOCK], np.dtype(np.float32)),
                                   axis=1)  # (block,)
            bad = np.flatnonzero(~(np.abs(norms - 1.0) <= self.norm_tolerance))
            if bad.size:
                row = int(bad[0])
                raise QueueError(
                    "INVALID_ARGUMENT",
                    f"embedding row {start + row} has L2 norm {float(norms[row]):.4g}, expected 1 ± "
                    f"{self.norm_tolerance}; L2-normalise embeddings before pushing",
                )
        return x

    def _check_site_id(self, site_id: object) -> None:
        if not isinstance(site_id, str) or not site_id or len(site_id) > _MAX_SITE_ID_LEN:
            raise QueueError("INVALID_ARGUMENT",
                             f"site_id must be a non-empty string of at most {_MAX_SITE_ID_LEN} characters")

    def _add_site(self, site_id: str) -> int:
        index = len(self._site_names)
        self._site_names.append(site_id)
        self._site_index[site_id] = index
        self._site_counts.append(0)
        return index

    def _evict_oldest(self, mask: np.ndarray, count: int, *, reason: str) -> None:
        candidates = np.flatnonzero(mask)
        if count < candidates.size:
            candidates = candidates[np.argpartition(self._seq[candidates], count - 1)[:count]]
        self._evict(candidates, reason=reason)

    def _evict(self, slots: np.ndarray, *, reason: str) -> None:
        self._valid[slots] = False
        self._emb[slots] = 0  # evicted embeddings leave memory and later snapshots
        counts = np.bincount(self._site[slots], minlength=len(self._site_names))
        for site in np.flatnonzero(counts):
            self._site_counts[site] -= int(counts[site])
        self._size -= int(slots.size)
        self._evicted[reason] += int(slots.size)

    # -------------------------------------------------------------- sample

    def sample(
        self,
        k: int,
        *,
        exclude_site: str | None,
        max_age: int | None,
        rng: np.random.Generator | None = None,
        dtype: str | None = "float32",
    ) -> QueueSample:
        """Up to k entries drawn uniformly without replacement.

        Leaves out ``exclude_site``'s entries (a site's own embeddings are false negatives)
        and entries more than ``max_age`` rounds old. ``dtype=None`` returns the storage dtype.
        """
        k = _check_int(k, "k")
        if max_age is not None:
            max_age = _check_int(max_age, "max_age")
        if dtype is not None and dtype not in _DTYPES:
            raise QueueError("INVALID_ARGUMENT",
                             f"dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
        rng = rng if rng is not None else np.random.default_rng()
        with self._lock:
            eligible = self._valid.copy()  # (capacity,)
            excluded = self._site_index.get(exclude_site) if exclude_site is not None else None
            if excluded is not None:
                eligible &= self._site != excluded
            if max_age is not None:
                eligible &= self._round >= self._current_round - max_age
            candidates = np.flatnonzero(eligible)
            n = min(k, candidates.size)
            chosen = (
                rng.choice(candidates, size=n, replace=False) if n else candidates[:0])  # (n,) random order
            out_dtype = _DTYPES[dtype] if dtype is not None else self._emb.dtype
            embeddings = _to_dtype(self._emb[chosen], out_dtype)  # (n, dim)
            names = np.array(self._site_names, dtype=object)
            return QueueSample(
                embeddings=embeddings,
                site_ids=names[self._site[chosen]].tolist() if n else [],
                rounds=self._round[chosen].astype(np.int64),
                model_versions=self._version[chosen].copy(),
            )

    # ------------------------------------------------------------- advance

    def advance(self, round: int) -> int:
        """Move to ``round`` and evict entries older than ``max_staleness`` rounds; return how many."""
        round = _check_int(round, "round", maximum=_MAX_ROUND)
        with self._lock:
            if round < self._current_round:
                raise QueueError("FAILED_PRECONDITION", f"cannot go back from round {self._current_round} "
                                 f"to round {round}; rounds only move forward")
            self._current_round = round
            stale = np.flatnonzero(self._valid & (self._round < round - self.max_staleness))
            if stale.size:
                self._evict(stale, reason="staleness")
            return int(stale.size)

    # --------------------------------------------------------------- stats

    @property
    def current_round(self) -> int:
        return self._current_round

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated arrays (embeddings and metadata) at full capacity."""
        arrays = (self._emb, self._site, self._round, self._version, self._seq, self._valid)
        return sum(array.nbytes for array in arrays)

    def __len__(self) -> int:
        return self._size

    def stats(self) -> dict:
        with self._lock:
            rounds = self._round[self._valid]
            return {
                "size": self._size,
                "capacity": self.capacity,
                "dim": self.dim,
                "dtype": self.dtype,
                "current_round": self._current_round,
                "max_staleness": self.max_staleness,
                "per_site_quota": self.per_site_quota,
                "per_site": dict(zip(self._site_names, self._site_counts, strict=False)),
                "pushed_total": self._pushed_total,
                "evicted": dict(self._evicted),
                "oldest_round": int(rounds.min()) if rounds.size else None,
                "newest_round": int(rounds.max()) if rounds.size else None,
            }

    # ------------------------------------------------------------ snapshot

    def snapshot(self, path: str | os.PathLike) -> None:
        """Write the queue to ``path`` (.npz plus JSON header) atomically: temp file, fsync, rename.

        Writes the slots in use so far as they lie in memory (views, no copy: a snapshot of a
        1,000,000-row queue needs no second 256 MB); pushes wait while it is written.
        """
        with self._lock, atomic_file(path) as f:
            used = self._high_water
            arrays = {
                "embeddings": self._emb[:used],
                "site_index": self._site[:used],
                "rounds": self._round[:used],
                "model_versions": self._version[:used],
                "seq": self._seq[:used],
                "valid": self._valid[:used],
            }
            header = {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "dim": self.dim,
                "capacity": self.capacity,
                "per_site_quota": self.per_site_quota,
                "max_staleness": self.max_staleness,
                "dtype": self.dtype,
                "norm_tolerance": self.norm_tolerance,
                "fixed_sites": self.fixed_sites,
                "site_names": list(self._site_names),
                "size": self._size,
                "current_round": self._current_round,
                "next_seq": self._next_seq,
                "pushed_total": self._pushed_total,
                "evicted": dict(self._evicted),
                "sha256": _checksum(arrays),
            }
            header_bytes = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
            np.savez(f, header=header_bytes, **arrays)

    @classmethod
    def restore(cls, path: str | os.PathLike) -> EmbeddingQueue:
        """Rebuild a queue from ``snapshot(path)``; raise SnapshotError for a missing or corrupt file."""
        path = Path(path)
        if not path.exists():
            raise SnapshotError("NOT_FOUND", f"queue snapshot {path} does not exist")

        def corrupt(reason: str) -> SnapshotError:
            return SnapshotError("FAILED_PRECONDITION", f"queue snapshot {path} is not usable ({reason}); "
                                 "restore it from a backup or delete it to start empty")

        if not path.is_file():
            raise corrupt("not a regular file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = set(npz.files)
                expected = {"header", *_SNAPSHOT_ARRAYS}
                if names != expected:
                    raise corrupt(f"holds arrays {sorted(names)}, expected {sorted(expected)}")
                header = json.loads(npz["header"].tobytes().decode("utf-8"))
                arrays = {name: npz[name] for name in _SNAPSHOT_ARRAYS}
        except SnapshotError:
            raise
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
            raise corrupt(f"{type(err).__name__}: {err}") from err
        if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
            raise corrupt("not a fedcl queue snapshot")
        if header.get("version") != SNAPSHOT_VERSION:
            raise corrupt(f"format version {header.get('version')!r}, "
                          f"this fedcl reads version {SNAPSHOT_VERSION}")
        try:
            queue = cls(
                dim=header["dim"],
                capacity=header["capacity"],
                per_site_quota=header["per_site_quota"],
                max_staleness=header["max_staleness"],
                dtype=header["dtype"],
                norm_tolerance=header["norm_tolerance"],
                sites=set(header["site_names"]) if header["fixed_sites"] else None,
            )
            size, current_round, next_seq = (int(header[k]) for k in ("size", "current_round", "next_seq"))
            site_names = [str(s) for s in header["site_names"]]
            evicted = {key: int(header["evicted"][key]) for key in ("capacity", "quota", "staleness")}
            pushed_total = int(header["pushed_total"])
            checksum = str(header["sha256"])
        except (KeyError, TypeError, ValueError, QueueError) as err:
            raise corrupt(f"bad header: {err}") from err
        if _checksum(arrays) != checksum:
            raise corrupt("checksum mismatch")
        used = arrays["valid"].shape[0] if arrays["valid"].ndim == 1 else -1
        storage = _DTYPES[queue.dtype]
        for name, dtype in _SNAPSHOT_ARRAYS.items():
            want = (used, queue.dim) if name == "embeddings" else (used,)
            if arrays[name].shape != want or arrays[name].dtype != (dtype or storage):
                raise corrupt(f"array {name} has shape {arrays[name].shape} {arrays[name].dtype}")
        if used > queue.capacity or len(set(site_names)) != len(site_names):
            raise corrupt("inconsistent header")
        valid = arrays["valid"]
        site, rounds, seq = arrays["site_index"][valid], arrays["rounds"][valid], arrays["seq"][valid]
        if int(valid.sum()) != size:
            raise corrupt(f"header says {size} entries, the arrays hold {int(valid.sum())}")
        if size and (
            site.min() < 0
            or site.max() >= len(site_names)
            or rounds.min() < 0
            or rounds.max() > current_round
            or seq.min() < 0
            or seq.max() >= next_seq
            or np.unique(seq).size != size
            or not np.isfinite(arrays["embeddings"][valid]).all()
        ):
            raise corrupt("entries out of range")
        counts = np.bincount(site, minlength=len(site_names))
        if counts.size and counts.max() > queue.per_site_quota:
            raise corrupt("a site holds more entries than the quota")

        queue._site_names = site_names
        queue._site_index = {name: i for i, name in enumerate(site_names)}
        queue._site_counts = counts.tolist()
        for name, target in (
            ("embeddings", queue._emb),
            ("site_index", queue._site),
            ("rounds", queue._round),
            ("model_versions", queue._version),
            ("seq", queue._seq),
            ("valid", queue._valid),
        ):
            target[:used] = arrays[name]
            arrays[name] = None  # free each loaded array as soon as it is copied
        queue._size = size
        queue._high_water = used
        queue._next_seq = next_seq
        queue._current_round = current_round
        queue._pushed_total = pushed_total
        queue._evicted = evicted
        return queue


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in _SNAPSHOT_ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()
