"""Load test of the queue service: concurrent sites pushing and sampling, with and without a stalling site.

    python bench/queue_load.py [--sites 64] [--seconds 30] [--stall-streams 40] [--tls]

Starts the real service (``fedcl-server queue``'s code, in a child process) on 127.0.0.1 and
runs two phases of the same load, each on a fresh service: one thread per site alternating Push
and Sample for ``--seconds``, and a coordinator calling Stats and Advance every 50 ms. In the
second phase one more site, with its own valid token, keeps ``--stall-streams`` Push streams open
that each send one chunk and then go silent (reopening each as soon as the service ends it). Each
phase checks the final queue against what the accepted pushes predict (per-site counts capped by
the quota, totals, evictions; rows lost = predicted minus held) and that every sampled row came from
another site. Prints, side by side: errors of the honest sites, rows lost, coordinator p50/p99
latency, throughput; with ``--out`` writes them as .json and .md. Exit status 1 when an honest
site saw an error or a check failed.
"""

from __future__ import annotations

import argparse
import json
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

from fedcl.wire.queue_client import QueueClient  # noqa: E402

COORDINATOR_TOKEN = "bench-coordinator-token-0123456789"


def site_token(i: int) -> str:
    return f"bench-site-{i:03d}-token-0123456789"


def start_queue_process(settings: dict, *, workdir: Path) -> tuple[subprocess.Popen, int]:
    """Run fedcl/server/queue_cli.py with these [queue_service] settings; return (process, port)."""
    lines = ["[queue_service]"]
    tokens = settings.pop("site_tokens", {})
    for key, value in settings.items():
        lines.append(
            f"{key} = {value!r}".replace("'", '"')
            if not isinstance(value, bool)
            else f"{key} = {str(value).lower()}")
    lines.append("[queue_service.site_tokens]")
    lines += [f'"{site}" = "{token}"' for site, token in tokens.items()]
    config = workdir / "queue.toml"
    config.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcl.server.queue_cli", "--config", str(config), "--log-level", "WARNING"],
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


def _certs(workdir: Path) -> Path:
    out = workdir / "certs"
    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "make_certs.py"), "--out", str(out), "--server-name",
         "localhost", "--server-ip", "127.0.0.1"],
        check=True, capture_output=True,
    )
    return out


def run_phase(args, *, stall: bool) -> dict:
    """One fresh service under the load (and the stalling site when ``stall``); what it measured."""
    sites = [f"site-{i:03d}" for i in range(args.sites)]
    tokens = {site: site_token(i) for i, site in enumerate(sites)}
    tokens["stalling-site"] = "bench-stalling-site-token-0123456789"
    with tempfile.TemporaryDirectory() as tmp:
        settings = {
            "port": 0,
            "dim": args.dim,
            "capacity": args.sites * args.quota,  # room for every site's quota: only quota evictions
            "per_site_quota": args.quota,
            "dtype": "float16",
            "coordinator_token": COORDINATOR_TOKEN,
            "site_tokens": tokens,
            "stream_idle_timeout": args.stream_idle_timeout,
        }
        ca = None
        if args.tls:
            certs = _certs(Path(tmp))
            settings.update(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
            ca = (certs / "ca.pem").read_bytes()
        else:
            settings["insecure"] = True
        proc, port = start_queue_process(settings, workdir=Path(tmp))
        address = f"127.0.0.1:{port}"
        done = threading.Event()
        coord_latency: list[float] = []
        coord_errors: list[str] = []
        stalled = {"opened": 0, "refused": 0, "cut": 0, "closed_at_end": 0, "other": 0}

        def coordinator_loop() -> None:
            with QueueClient(address, site_id="coordinator", token=COORDINATOR_TOKEN, root_certificates=ca,
                             timeout=30.0) as coordinator:
                while not done.wait(0.05):
                    start = time.perf_counter()
                    try:
                        coordinator.stats()
                        coordinator.advance(1)  # same round: evicts nothing, but takes the coordinator's path
                    except Exception as err:  # noqa: BLE001 - counted and printed
                        coord_errors.append(str(err))
                        continue
                    coord_latency.append(time.perf_counter() - start)

        def stalling_stream(i: int) -> None:
            import grpc

            from fedcl.wire.proto import queue_pb2, queue_pb2_grpc

            channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) if ca
                       else grpc.insecure_channel(address))
            stub = queue_pb2_grpc.EmbeddingQueueStub(channel)
            metadata = (("authorization", f"Bearer {tokens['stalling-site']}"),
                        ("x-fedcl-site", "stalling-site"))
            x = torch.nn.functional.normalize(torch.randn(1, args.dim), dim=1).numpy().astype("<f2")
            chunk = queue_pb2.PushChunk(round=1, model_version=1, rows=1, dim=args.dim,
                                        dtype=queue_pb2.DTYPE_FLOAT16, data=x.tobytes(),
                                        total_rows=2)  # announces 2 rows, sends 1

            def one_chunk_then_silence():
                yield chunk
                done.wait()

            with channel:
                while not done.is_set():
                    stalled["opened"] += 1
                    try:
                        stub.Push(one_chunk_then_silence(), metadata=metadata, timeout=3600)
                        stalled["other"] += 1
                    except grpc.RpcError as err:
                        code = err.code()
                        key = (
                            "refused"
                            if code == grpc.StatusCode.RESOURCE_EXHAUSTED
                            else "cut"
                            if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
                            else "closed_at_end"
                            if code == grpc.StatusCode.ABORTED and done.is_set()
                            else "other")
                        stalled[key] += 1
                        if key == "refused":
                            done.wait(0.5)  # the attacker retries, without a busy loop on this machine

        helpers = [threading.Thread(target=coordinator_loop, name="coordinator", daemon=True)]
        if stall:
            helpers += [
                threading.Thread(target=stalling_stream, args=(i,), daemon=True)
                for i in range(args.stall_streams)]
        try:
            for thread in helpers[1:]:
                thread.start()
            if stall:
                time.sleep(1.0)  # the stalled streams are open before the honest sites start
            helpers[0].start()
            with QueueClient(address, site_id="coordinator", token=COORDINATOR_TOKEN,
                             root_certificates=ca) as c:
                c.advance(1)
            result = run_load(address, sites, args, root_certificates=ca)
            done.set()
            for thread in helpers:
                thread.join(timeout=60)
            with QueueClient(address, site_id="coordinator", token=COORDINATOR_TOKEN,
                             root_certificates=ca) as c:
                stats = c.stats()
        finally:
            done.set()
            stop_queue_process(proc)

    pushed = result["pushed"]
    predicted = {site: min(n, args.quota) for site, n in pushed.items() if n}
    checks = {
        "per-site counts = min(pushed, quota)": stats["per_site"] == predicted,
        "size = sum of per-site counts": stats["size"] == sum(predicted.values()),
        "pushed_total = accepted rows": stats["pushed_total"] == sum(pushed.values()),
        "quota evictions = rows over quota": (
            stats["evicted"]["quota"] == sum(n - predicted.get(s, 0) for s, n in pushed.items())
        ),
        "no capacity or staleness evictions": (stats["evicted"]["capacity"] == 0
                                               and stats["evicted"]["staleness"] == 0),
        "every sampled row came from another site": result["own_or_unknown_rows"] == 0,
        "every sample returned at most k rows": result["oversized_samples"] == 0,
        "nothing of the stalling site stored": "stalling-site" not in stats["per_site"],
    }
    requests = sum(len(v) for v in result["latency"].values())
    ms = np.asarray(coord_latency) * 1e3
    return {
        "stalling_site": stall,
        "requests": requests,
        "errors": result["errors"],
        "error_messages": result["error_messages"][:5],
        "rows_lost": sum(predicted.values()) - stats["size"],
        "throughput_req_s": requests / result["wall"],
        "rows_pushed_s": sum(pushed.values()) / result["wall"],
        "wall_s": result["wall"],
        "site_p50_ms": float(
            np.percentile(np.asarray(result["latency"]["push"] + result["latency"]["sample"]) * 1e3, 50)
        ),
        "site_p99_ms": float(
            np.percentile(np.asarray(result["latency"]["push"] + result["latency"]["sample"]) * 1e3, 99)
        ),
        "coordinator_calls": len(coord_latency),
        "coordinator_errors": len(coord_errors),
        "coordinator_p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "coordinator_p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
        "coordinator_max_ms": float(ms.max()) if ms.size else None,
        "stalled_streams": dict(stalled) if stall else None,
        "checks": checks,
        "ok": result["errors"] == 0 and not coord_errors and all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=64,
                        help="concurrent honest sites (one client thread each)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each phase's sites run")
    parser.add_argument("--requests", type=int, default=None, help="instead of --seconds: requests per site")
    parser.add_argument("--stall-streams", type=int, default=40, help="Push streams the stalling site holds")
    parser.add_argument("--tls", action="store_true",
                        help="serve over TLS (certificates from deploy/make_certs.py)")
    parser.add_argument("--rows", type=int, default=64, help="embeddings per push")
    parser.add_argument("--k", type=int, default=512, help="negatives per sample")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--quota", type=int, default=1000,
                        help="per-site quota (below rows * pushes to exercise it)")
    parser.add_argument("--stream-idle-timeout", type=float, default=10.0,
                        help="the service's stream_idle_timeout (default of the service: 30 s)")
    parser.add_argument("--out", type=Path, help="write the results to OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    load = os.getloadavg()
    phases = [run_phase(args, stall=False), run_phase(args, stall=True)]
    what = (
        f"{args.sites} concurrent {'TLS' if args.tls else 'insecure'} sites for "
        f"{f'{args.requests} requests' if args.requests else f'{args.seconds:g} s'} "
        f"each phase on loopback, {args.rows} rows/push, k={args.k}; "
        f"stalling site: {args.stall_streams} Push streams, one chunk each then silent "
        f"(reopened when ended; the service's stream_idle_timeout {args.stream_idle_timeout:g} s); "
        f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    rows = [
        ("honest sites' errors", "errors", "{:d}"),
        ("rows lost", "rows_lost", "{:d}"),
        ("requests (push + sample)", "requests", "{:d}"),
        ("throughput, requests/s", "throughput_req_s", "{:.0f}"),
        ("rows pushed/s", "rows_pushed_s", "{:.0f}"),
        ("site latency p50 / p99, ms", ("site_p50_ms", "site_p99_ms"), "{:.1f} / {:.1f}"),
        ("coordinator Stats+Advance calls", "coordinator_calls", "{:d}"),
        ("coordinator errors", "coordinator_errors", "{:d}"),
        ("coordinator p50 / p99 / max, ms",
         ("coordinator_p50_ms", "coordinator_p99_ms", "coordinator_max_ms"), "{:.1f} / {:.1f} / {:.1f}"),
    ]
    table = ["| | without stalling site | with stalling site |", "| --- | ---: | ---: |"]
    for label, keys, fmt in rows:
        keys = keys if isinstance(keys, tuple) else (keys,)
        cells = [fmt.format(*(p[k] if p[k] is not None else float("nan") for k in keys)) for p in phases]
        table.append(f"| {label} | {cells[0]} | {cells[1]} |")
    s = phases[1]["stalled_streams"]
    table.append(f"| stalling site's streams: opened / refused (RESOURCE_EXHAUSTED) / cut when idle / "
                 f"closed by it at the end / other | — | "
                 f"{s['opened']} / {s['refused']} / {s['cut']} / {s['closed_at_end']} / {s['other']} |")
    print(f"queue load: {what}")
    print("\n".join(table))
    for phase in phases:
        for name, ok in phase["checks"].items():
            if not ok:
                print(f"  [FAIL] {'with' if phase['stalling_site'] else 'without'} stalling site: {name}")
        for message in phase["error_messages"]:
            print(f"  error: {message}")
    ok = all(p["ok"] for p in phases)
    print("consistency", "OK" if ok else "FAILED")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"what": what, "argv": sys.argv[1:], "load_average": load, "phases": phases}, indent=1,
                       default=str)
            + "\n"
        )
        args.out.with_suffix(".md").write_text(
            f"# Queue service under load\n\n`python bench/queue_load.py {' '.join(sys.argv[1:])}`\n\n"
            f"{what}.\n\n"
            + "\n".join(table)
            + f"\n\nAll consistency checks: {'passed' if ok else 'FAILED'}.\n"
        )
    return 0 if ok else 1


def run_load(address: str, sites: list[str], args, *, root_certificates: bytes | None = None) -> dict:
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
            client = QueueClient(address, site_id=site, token=site_token(index), timeout=30.0,
                                 root_certificates=root_certificates)
        except Exception as err:  # noqa: BLE001
            with lock:
                errors.append(f"{site}: {err}")
            return
        with client:
            barrier.wait()
            end = time.perf_counter() + args.seconds
            i = -1
            while True:
                i += 1
                if (i >= args.requests) if args.requests else (time.perf_counter() >= end):
                    break
                try:
                    if i % 2 == 0:
                        x = torch.nn.functional.normalize(
                            torch.randn(args.rows, args.dim, generator=generator), dim=1)
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
