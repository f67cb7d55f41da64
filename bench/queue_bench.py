"""Queue service costs, measured side by side in one run.

    python bench/queue_bench.py [--rows 1000000] [--repeats 50]

1. Sample 4096 x 128 over gRPC on loopback (float16 storage and wire, float32 tensor out)
   against the same draw from an in-process EmbeddingQueue holding the same rows, and
   against a plain in-process copy of the returned bytes. Target: gRPC within 5x of the
   in-process sample.
2. RSS of a queue server process holding 1,000,000 x 128 float16 against the raw bytes
   (256 MB). Target: within 1.3x. The server is the real ``fedcl-server queue`` code in a
   child process; the interpreter, numpy and gRPC are counted in its RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from queue_load import COORDINATOR_TOKEN, start_queue_process, stop_queue_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedcl.queue import EmbeddingQueue  # noqa: E402
from fedcl.wire.queue_client import QueueClient  # noqa: E402

DIM = 128
K = 4096
PUSH_ROWS = 8192
TOKENS = {"filler": "bench-filler-token-0123456789", "reader": "bench-reader-token-0123456789"}


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def batches(total: int, *, seed: int):
    """Unit-norm rows (PUSH_ROWS, DIM) float32, reproducible."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, total, PUSH_ROWS):
        n = min(PUSH_ROWS, total - start)
        yield torch.nn.functional.normalize(torch.randn(n, DIM, generator=generator), dim=1)


def median_seconds(fn, *, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def serve(rows: int, workdir: Path):
    return start_queue_process(
        {
            "port": 0,
            "dim": DIM,
            "capacity": rows,
            "per_site_quota": rows,
            "dtype": "float16",
            "insecure": True,
            "coordinator_token": COORDINATOR_TOKEN,
            "site_tokens": dict(TOKENS),
        },
        workdir=workdir,
    )


def fill(address: str, rows: int, *, seed: int) -> None:
    with QueueClient(address, site_id="filler", token=TOKENS["filler"], wire_dtype="float16",
                     timeout=60.0) as client:
        for x in batches(rows, seed=seed):
            client.push(x, round=0, model_version=0)


def bench_sample(*, queue_rows: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = serve(queue_rows, Path(tmp))
        address = f"127.0.0.1:{port}"
        try:
            fill(address, queue_rows, seed=0)
            with QueueClient(address, site_id="reader", token=TOKENS["reader"]) as reader:
                got = reader.sample(K)
                assert got.shape == (K, DIM) and got.dtype == torch.float32
                grpc_s = median_seconds(lambda: reader.sample(K), repeats=repeats)
        finally:
            stop_queue_process(proc)

    local = EmbeddingQueue(dim=DIM, capacity=queue_rows, per_site_quota=queue_rows, max_staleness=5,
                           dtype="float16")
    for x in batches(queue_rows, seed=0):
        local.push(x.numpy(), site_id="filler", round=0, model_version=0)
    rng = np.random.default_rng(0)

    def in_process():
        return torch.from_numpy(local.sample(K, exclude_site="reader", max_age=None, rng=rng).embeddings)

    local_s = median_seconds(in_process, repeats=repeats)
    result = in_process().numpy()  # (K, DIM) float32: the bytes the client ends up with
    copy_s = median_seconds(lambda: result.copy(), repeats=repeats)
    wire_mb = K * DIM * 2 / 1e6
    print(f"Sample {K} x {DIM} from a queue of {queue_rows} rows (float16 on the wire, {wire_mb:.2f} MB; "
          f"median of {repeats})")
    print(f"  gRPC on loopback        {grpc_s * 1e3:8.2f} ms")
    print(f"  in-process sample       {local_s * 1e3:8.2f} ms   gRPC / in-process = {grpc_s / local_s:5.2f}x "
          f"(target <= 5x) {'OK' if grpc_s / local_s <= 5 else 'MISSED'}")
    print(f"  in-process memcpy       {copy_s * 1e3:8.2f} ms   gRPC / memcpy     = {grpc_s / copy_s:5.1f}x "
          "(a lower bound no network path reaches)")


def bench_rss(*, rows: int) -> None:
    raw = rows * DIM * 2
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = serve(rows, Path(tmp))
        try:
            empty_rss, _ = rss_bytes(proc.pid)
            start = time.perf_counter()
            fill(f"127.0.0.1:{port}", rows, seed=1)
            fill_s = time.perf_counter() - start
            with QueueClient(f"127.0.0.1:{port}", site_id="coordinator",
                             token=COORDINATOR_TOKEN) as coordinator:
                size = coordinator.stats()["size"]  # a site's Stats shows only its own rows
            with QueueClient(f"127.0.0.1:{port}", site_id="reader", token=TOKENS["reader"]) as reader:
                sample_s = median_seconds(lambda: reader.sample(K), repeats=10)
            rss, peak = rss_bytes(proc.pid)
        finally:
            stop_queue_process(proc)
    mb = 1 / 2**20
    print(f"Server process holding {size} x {DIM} float16 (raw {raw * mb:.0f} MiB), filled in {fill_s:.1f} s "
          f"by {PUSH_ROWS}-row pushes")
    print(f"  RSS empty               {empty_rss * mb:8.1f} MiB (interpreter, numpy, gRPC)")
    print(f"  RSS full                {rss * mb:8.1f} MiB   RSS / raw = {rss / raw:5.3f}x (target <= 1.3x) "
          f"{'OK' if rss / raw <= 1.3 else 'MISSED'}")
    print(f"  RSS full - empty        {(rss - empty_rss) * mb:8.1f} MiB   "
          f"/ raw = {(rss - empty_rss) / raw:5.3f}x")
    print(f"  peak RSS (VmHWM)        {peak * mb:8.1f} MiB   / raw = {peak / raw:5.3f}x")
    print(f"  Sample {K} from it over gRPC: {sample_s * 1e3:.2f} ms (median of 10)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows held by the server for the RSS figure")
    parser.add_argument("--sample-queue-rows", type=int, default=65536,
                        help="queue size for the Sample timing")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bench_sample(queue_rows=args.sample_queue_rows, repeats=args.repeats)
    bench_rss(rows=args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
