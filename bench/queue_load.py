"""Load test of the queue service: concurrent sites pushing and sampling on loopback.

    python bench/queue_load.py [--sites 32] [--requests 40]

Starts the real service (``fedcl-server queue``'s code, in a child process) on 127.0.0.1,
runs one thread per site that alternates Push and Sample for a fixed number of requests,
then checks the final queue against what the accepted pushes predict (per-site counts
capped by the quota, totals, evictions) and that every sampled row came from another
site. Prints requests, errors (must be 0), the consistency check and p50/p99 latency.
Exit status 1 when there were errors or the check failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.queue_client import QueueClient  # noqa: E402

COORDINATOR_TOKEN = "bench-coordinator-token-0123456789"


def site_token(i: int) -> str:
    return f"bench-site-{i:03d}-token-0123456789"


def start_queue_process(settings: dict, *, workdir: Path) -> tuple[subprocess.Popen, int]:
    """Run server/queue_cli.py with these [queue_service] settings; return (process, port)."""
    lines = ["[queue_service]"]
    tokens = settings.pop("site_tokens", {})
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}".replace("'", '"') if not isinstance(value, bool) else f"{key} = {str(value).lower()}")
    lines.append("[queue_service.site_tokens]")
    lines += [f'"{site}" = "{token}"' for site, token in tokens.items()]
    config = workdir / "queue.toml"
    config.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.queue_cli", "--config", str(config), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"queue service did not start: {line}{proc.stderr.read()}")
    return proc, int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])


def stop_queue_process(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ms = np.asarray(values) * 1e3
    return f"p50 {np.percentile(ms, 50):7.2f} ms   p99 {np.percentile(ms, 99):7.2f} ms   (n={len(ms)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=32)
    parser.add_argument("--requests", type=int, default=40, help="requests per site (half Push, half Sample)")
    parser.add_argument("--rows", type=int, default=64, help="embeddings per push")
    parser.add_argument("--k", type=int, default=512, help="negatives per sample")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--quota", type=int, default=1000, help="per-site quota (below rows * pushes to exercise it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    sites = [f"site-{i:03d}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_queue_process(
            {
                "port": 0,
                "dim": args.dim,
                "capacity": args.sites * args.quota,  # room for every site's quota: only quota evictions
                "per_site_quota": args.quota,
                "dtype": "float16",
                "insecure": True,
                "coordinator_token": COORDINATOR_TOKEN,
                "site_tokens": {site: site_token(i) for i, site in enumerate(sites)},
            },
            workdir=Path(tmp),
        )
        address = f"127.0.0.1:{port}"
        try:
            with QueueClient(address, site_id="coordinator", token=COORDINATOR_TOKEN) as coordinator:
                coordinator.advance(1)
                result = run_load(address, sites, args)
                stats = coordinator.stats()
        finally:
            stop_queue_process(proc)

    pushed = result["pushed"]
    predicted = {site: min(n, args.quota) for site, n in pushed.items() if n}
    checks = {
        "per-site counts = min(pushed, quota)": stats["per_site"] == predicted,
        "size = sum of per-site counts": stats["size"] == sum(predicted.values()),
        "pushed_total = accepted rows": stats["pushed_total"] == sum(pushed.values()),
        "quota evictions = rows over quota": stats["evicted"]["quota"] == sum(n - predicted.get(s, 0) for s, n in pushed.items()),
        "no capacity or staleness evictions": stats["evicted"]["capacity"] == 0 and stats["evicted"]["staleness"] == 0,
        "every sampled row came from another site": result["own_or_unknown_rows"] == 0,
        "every sample returned at most k rows": result["oversized_samples"] == 0,
    }
    total = sum(len(v) for v in result["latency"].values())
    print(f"queue load: {args.sites} sites x {args.requests} requests on loopback, {args.rows} rows/push, k={args.k}")
    print(f"requests      {total}   errors {result['errors']}   wall {result['wall']:.2f} s   "
          f"({total / result['wall']:.0f} req/s)")
    print(f"rows pushed   {sum(pushed.values())}   rows sampled {result['sampled_rows']}")
    print(f"final queue   size {stats['size']} (predicted {sum(predicted.values())})   "
          f"quota evictions {stats['evicted']['quota']}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"push   latency {percentiles(result['latency']['push'])}")
    print(f"sample latency {percentiles(result['latency']['sample'])}")
    print(f"all    latency {percentiles(result['latency']['push'] + result['latency']['sample'])}")
    for message in result["error_messages"][:5]:
        print(f"  error: {message}")
    ok = result["errors"] == 0 and all(checks.values())
    print("consistency", "OK" if ok else "FAILED")
    return 0 if ok else 1


def run_load(address: str, sites: list[str], args) -> dict:
    lock = threading.Lock()
    pushed_rows: dict[bytes, str] = {}  # float16 row bytes -> site that pushed it
    pushed = {site: 0 for site in sites}
    latency: dict[str, list[float]] = {"push": [], "sample": []}
    errors: list[str] = []
    samples: list[tuple[str, torch.Tensor]] = []
    barrier = threading.Barrier(len(sites))

    def site_worker(index: int, site: str) -> None:
        generator = torch.Generator().manual_seed(index)
        mine = {"push": [], "sample": []}
        try:
            client = QueueClient(address, site_id=site, token=site_token(index), timeout=30.0)
        except Exception as err:  # noqa: BLE001
            with lock:
                errors.append(f"{site}: {err}")
            return
        with client:
            barrier.wait()
            for i in range(args.requests):
                try:
                    if i % 2 == 0:
                        x = torch.nn.functional.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=1)
                        keys = [row.tobytes() for row in x.half().numpy()]
                        with lock:
                            pushed_rows.update(dict.fromkeys(keys, site))
                        start = time.perf_counter()
                        accepted = client.push(x, round=1, model_version=1)
                        mine["push"].append(time.perf_counter() - start)
                        with lock:
                            pushed[site] += accepted
                    else:
                        start = time.perf_counter()
                        negatives = client.sample(args.k, max_age=0)
                        mine["sample"].append(time.perf_counter() - start)
                        with lock:
                            samples.append((site, negatives))
                except Exception as err:  # noqa: BLE001 - counted, printed, and fail the run
                    with lock:
                        errors.append(f"{site} request {i}: {err}")
        with lock:
            for op, values in mine.items():
                latency[op].extend(values)

    threads = [threading.Thread(target=site_worker, args=(i, s), name=s) for i, s in enumerate(sites)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start

    bad_origin = oversized = sampled = 0
    for site, negatives in samples:
        sampled += negatives.shape[0]
        oversized += negatives.shape[0] > args.k
        for row in negatives.half().numpy():
            if pushed_rows.get(row.tobytes(), site) == site:  # unknown row, or the site's own
                bad_origin += 1
    return {
        "pushed": pushed,
        "latency": latency,
        "errors": len(errors),
        "error_messages": errors,
        "wall": wall,
        "own_or_unknown_rows": bad_origin,
        "oversized_samples": oversized,
        "sampled_rows": sampled,
    }


if __name__ == "__main__":
    sys.exit(main())
