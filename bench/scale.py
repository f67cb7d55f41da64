"""How `fedcl simulate` scales with the number of sites: wall time per round and memory.

    python bench/scale.py [--sites 10,50,100] [--rounds 3] [--images-per-site 64]

For each site count, a fresh process runs the real simulation path,
``fedcl.sim.simulate.run_simulation_main``: Flower's simulation engine (Ray) with N virtual sites,
and in the same process the ServerApp (a thread) and the queue gRPC service on loopback. Each
site trains on a small slice of the data (default 64 Fashion-MNIST images, iid) with a CNN of
width 8, so the figures show the per-site and per-round costs of the federation machinery, not
those of training. Central evaluation is kept small (kNN on 500 + 200 images, last round only)
and the per-site evaluation after the last round is off (``fraction_evaluate = 0``).

Measured per site count:

* seconds per round, from ``metrics.jsonl`` (the ServerApp's own clock). Round 1 also pays for
  starting the Ray actors and loading the data there, so it is reported apart ("cold"); the
  s/round figure is the mean of rounds 2..R;
* the server's peak RSS: the larger of ``VmHWM`` of the simulate process (kernel-tracked, read by
  that process at its end) and its RSS sampled every 0.5 s (here VmHWM missed peaks by up to
  120 MiB: the kernel updates it when memory is unmapped, not when pages are dropped otherwise).
  This process hosts the ServerApp, the queue service and Flower's simulation engine; its CPU
  seconds per round are also split by thread (``bench/procstat.py``);
* Ray's processes, sampled every 0.5 s from ``/proc``: the sum of the RSS of Ray's worker
  processes (``ray::ClientAppActor`` and idle workers) and of Ray's own services (GCS, raylet,
  dashboard, agents). RSS counts pages shared between processes (torch's libraries) once per
  process, so the sums overstate physical memory.

Also CPU seconds per round of each group of processes (load-independent, unlike wall time),
and the server's open files and threads. Writes ``bench/results/scale.{json,md,png}``; reading
``/proc`` makes it Linux-only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procstat import ProcessSampler, ThreadCPU, proc_status  # noqa: E402

SCRIPT = Path(__file__).resolve()
RESULTS = REPO / "bench" / "results"
MIB = 1 << 20
FLOWER_POLLING = "add_messages_to_queue"  # flwr.server.superlink.fleet.vce.vce_api: the message dispatch loop


def bench_overrides(*, sites: int, rounds: int, images_per_site: int, data: str, width: int, batch_size: int,
                    num_push: int, extra: list[str] = ()) -> list[str]:
    """The `-s section.key=value` settings of one run (what `fedcl simulate -s ...` would take)."""
    return [
        f"data.name={data}", "data.partition=iid", f"data.num_sites={sites}",
        f"data.max_images_per_site={images_per_site}", "data.synthetic_images=2000",
        "data.train_max_images=500", "data.eval_max_images=200",  # central kNN: 500 memory, 200 test images
        f"model.width={width}", f"train.batch_size={batch_size}", f"train.num_push={num_push}",
        f"federation.num_rounds={rounds}", "federation.eval_every=1000000",  # kNN after the last round only
        # no per-site evaluation round: N more messages, not what we measure
        "federation.fraction_evaluate=0",
        # every site, every round
        f"federation.min_available_nodes={sites}", f"federation.min_train_nodes={sites}",
        *extra,
    ]


# ------------------------------------------------------------------------- the measured process


def _child(result_path: Path, out_dir: Path, overrides: list[str]) -> int:
    """One federation in this process; writes the rounds and this process's memory to result_path."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedcl.config import ConfigError, load_config
    from fedcl.sim.simulate import run_simulation_main

    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    # CPU seconds at the end of each round, taken as the round's record is written (in the writing
    # thread, so no round's work falls between two polls): by thread of this process, and by kind of
    # process in this process's tree (this server process, Ray's workers, Ray's services)
    from fedcl.server.metrics import MetricsLog

    threads, tree = ThreadCPU(), ProcessSampler(os.getpid())
    cpu_at: dict[int, dict[str, Any]] = {}
    write = MetricsLog.write

    def write_and_mark(log: MetricsLog, record: dict[str, Any]) -> None:
        write(log, record)
        round_ = int(record["round"])
        threads.mark(round_)
        tree.sample()
        cpu_at[round_] = {"time": time.time(), "cpu": tree.cpu()}

    MetricsLog.write = write_and_mark
    try:
        summary = run_simulation_main(cfg, out_dir=out_dir, progress=False, stream=sys.stdout)
    except BaseException:
        # seen here: when Ray's node fails to start in time (overloaded machine), a Flower thread keeps
        # the process alive after the error; end it so the parent sees the failure at once
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    finally:
        MetricsLog.write = write
    status = proc_status("self")
    result_path.write_text(json.dumps({
        "server_vm_hwm_bytes": status["VmHWM"], "server_vm_rss_end_bytes": status["VmRSS"],
        "seconds_total": summary["seconds"], "rounds": [_round_row(r) for r in summary["history"]],
        "server_cpu_by_thread_per_round": threads.per_steady_round(),
        "cpu_at_round_end": {str(k): v for k, v in cpu_at.items()},
    }))
    return 0


def _round_row(r: dict[str, Any]) -> dict[str, Any]:
    site_seconds = [m["seconds-total"] for m in r["sites"].values() if "seconds-total" in m]
    # queue stats after Advance(r + 1), Advance(r)
    end, start = r.get("queue") or {}, r.get("queue_at_start") or {}
    # the queue's largest size in the round: its size after the closing Advance(r + 1) plus what that
    # Advance evicted as stale (with max_staleness 0 it empties the queue: the size alone says 0)
    stale_at_end = end.get("evicted", {}).get("staleness", 0) - start.get("evicted", {}).get("staleness", 0)
    return {
        "round": r["round"], "seconds": r["seconds"], "sites_ok": r["sites_ok"],
        "sites_failed": r["sites_failed"], "errors": r["errors"][:3],
        "queue_size_after_advance": end.get("size"),
        "queue_peak_size": None if end.get("size") is None else end["size"] + stale_at_end,
        "queue_evicted": end.get("evicted"), "pushed": r["pushed"], "release_phase": r.get("release_phase"),
        "negatives_used": r["negatives_used"], "site_seconds_sum": sum(site_seconds),
        "site_seconds_median": statistics.median(site_seconds) if site_seconds else None,
    }


# ------------------------------------------------------------------------------------- one run


# Ray's own start-up deadlines (not configurable from Flower's backend config), both seen here under load:
RAY_START_TIMEOUTS = ("timed out during startup",  # ray/_private/node.py: raylet not registered within 30 s
                      "Timed out waiting for file")  # the GCS server did not write its port file in time


def _ray_did_not_start(message: str) -> bool:
    return "ray.init(" in message and any(t in message for t in RAY_START_TIMEOUTS)


def run_one(*, sites: int, overrides: list[str], work_dir: Path, timeout: float, bar=None,
            ray_start_retries: int = 2) -> dict[str, Any]:
    """Run one federation in a fresh process and measure it; raises RuntimeError when it fails.

    Ray gives its services fixed deadlines to start; on a loaded machine they can run out. Such a
    run is started again up to ``ray_start_retries`` times, and the row says so.
    """
    for attempt in range(ray_start_retries + 1):
        try:
            row = _run_one(sites=sites, overrides=overrides, work_dir=work_dir / f"attempt{attempt}",
                           timeout=timeout, bar=bar)
        except RuntimeError as exc:
            if not _ray_did_not_start(str(exc)) or attempt == ray_start_retries:
                raise
            if bar is not None:
                bar.write(f"{sites} sites: Ray did not start within its deadlines; starting the run again")
            continue
        row["ray_start_retries"] = attempt
        return row
    raise AssertionError("unreachable")


def _run_one(*, sites: int, overrides: list[str], work_dir: Path, timeout: float, bar=None) -> dict[str, Any]:
    run_dir = work_dir / f"sites{sites}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path, log_path = run_dir / "result.json", run_dir / "simulate.log"
    argv = [sys.executable, str(SCRIPT), "--child", str(result_path), "--out", str(run_dir / "run")]
    for item in overrides:
        argv += ["-s", item]
    load_before = os.getloadavg()
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        sampler = ProcessSampler(proc.pid)
        metrics, done = run_dir / "run" / "metrics.jsonl", 0
        try:
            while proc.poll() is None:
                sampler.sample()
                records = metrics.read_text().splitlines() if metrics.exists() else []
                if len(records) > done:
                    if bar is not None:
                        bar.update(len(records) - done)
                        bar.set_postfix(sites=sites, round=len(records),
                                        s=f"{json.loads(records[-1])['seconds']:.1f}")
                    done = len(records)
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"{sites} sites: no result after {timeout:.0f} s")
                time.sleep(0.5)
        except BaseException:
            os.killpg(proc.pid, 15)  # the child and the Ray processes it started (its own session)
            proc.wait()
            raise
    wall = time.time() - t0
    if proc.returncode != 0 or not result_path.exists():
        log_text = log_path.read_text()
        tail = log_text[-3000:]
        if _ray_did_not_start(log_text) and not _ray_did_not_start(tail):
            cause = next(t for t in RAY_START_TIMEOUTS if t in log_text)
            # keep the cause in the message
            tail = f"... Ray did not start: ray.init( ... {cause} ...\n{tail}"
        raise RuntimeError(
            f"{sites} sites: the simulation failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    res = json.loads(result_path.read_text())
    rounds = res["rounds"]
    failed = [r for r in rounds if r["sites_ok"] != sites or r["sites_failed"]]
    if failed:
        raise RuntimeError(f"{sites} sites: round {failed[0]['round']} had {failed[0]['sites_ok']} sites ok, "
                           f"{failed[0]['sites_failed']} failed: {failed[0]['errors']}")
    steady = rounds[1:] or rounds  # round 1 also starts the Ray actors and loads their data
    cpu_per_round = None  # CPU seconds per steady round, between the end of round 1 and of the last round
    cpu_at = res["cpu_at_round_end"]
    if len(rounds) > 1 and "1" in cpu_at and str(len(rounds)) in cpu_at:
        first, last = cpu_at["1"], cpu_at[str(len(rounds))]
        cpu_per_round = {k: (last["cpu"][k] - first["cpu"][k]) / (len(rounds) - 1) for k in first["cpu"]}
        cpu_per_round["wall"] = (last["time"] - first["time"]) / (len(rounds) - 1)
    parallel = max(1, min(sites, len(os.sched_getaffinity(0))))  # Ray actors: what simulate.py asks for
    s_round = statistics.mean(r["seconds"] for r in steady)
    site_busy = statistics.mean(r["site_seconds_sum"] for r in steady) / parallel
    return {
        "sites": sites,
        "rounds": rounds,
        "cold_round_seconds": rounds[0]["seconds"],
        "seconds_per_round": s_round,
        "steady_rounds": [r["round"] for r in steady],
        "parallel_actors": parallel,
        "seconds_per_site_task": s_round * parallel / sites,  # one site's turn on one actor
        "site_handler_share": site_busy / s_round,  # of the round, time spent inside the sites' handlers
        # VmHWM can miss a peak (seen here: 0.5 s samples up to 120 MiB above it), so the larger of the two
        "server_peak_rss_mib": max(res["server_vm_hwm_bytes"], sampler.peak["server"]) / MIB,
        "server_vm_hwm_mib": res["server_vm_hwm_bytes"] / MIB,
        "server_end_rss_mib": res["server_vm_rss_end_bytes"] / MIB,
        "server_sampled_peak_rss_mib": sampler.peak["server"] / MIB,
        "ray_workers_peak_rss_sum_mib": sampler.peak["ray_workers"] / MIB,
        "ray_workers_max_processes": sampler.max_workers,
        "ray_services_peak_rss_sum_mib": sampler.peak["ray_services"] / MIB,
        "memory_samples": sampler.samples,
        "server_max_open_fds": sampler.server_max_fds,
        "server_max_threads": sampler.server_max_threads,
        # read as each round ended: "wall" is the same span's wall time
        "cpu_seconds_per_round": cpu_per_round,
        "server_cpu_per_round": cpu_per_round["server"] if cpu_per_round else None,
        "cpu_per_round_total": (sum(v for k, v in cpu_per_round.items() if k != "wall")
                                if cpu_per_round else None),
        "server_cpu_by_thread_per_round": res["server_cpu_by_thread_per_round"],
        # Flower's simulation engine: one thread polls the LinkState for every node's next message
        "flower_polling_cpu_per_round": (res["server_cpu_by_thread_per_round"] or {}).get(FLOWER_POLLING),
        "ray_workers_cpu_per_round": cpu_per_round["ray_workers"] if cpu_per_round else None,
        "cpu_seconds_total": sampler.cpu(),
        "queue_size": max(r["queue_peak_size"] or 0 for r in rounds),  # entries held at once, at most
        "queue_evicted": rounds[-1]["queue_evicted"],
        "wall_seconds": wall,
        "federation_seconds": res["seconds_total"],
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }


GROWTH_KEYS = {"seconds_per_round": "time/round", "cpu_per_round_total": "CPU/round (all processes)",
               "server_cpu_per_round": "server CPU/round", "server_peak_rss_mib": "server memory",
               "ray_workers_peak_rss_sum_mib": "Ray workers' memory", "queue_size": "queue peak size"}


def growth_factors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's measurements divided by those of the smallest site count."""
    base = min(rows, key=lambda r: r["sites"])
    out = []
    for row in sorted(rows, key=lambda r: r["sites"]):
        if row is base:
            continue
        factors = {k: row[k] / base[k] if base[k] and row[k] is not None else None for k in GROWTH_KEYS}
        out.append(
            {"from_sites": base["sites"], "to_sites": row["sites"],
             "sites_factor": row["sites"] / base["sites"], **factors}
        )
    return out


def run_scale(*, sites: list[int], rounds: int, images_per_site: int, data: str = "fashion-mnist",
              width: int = 8, batch_size: int = 32, num_push: int = 64, extra: list[str] = (),
              work_dir: Path | None = None, timeout: float = 1800.0, progress: bool = True) -> dict[str, Any]:
    """Measure one federation per site count; returns the rows, growth factors and settings."""
    from tqdm.auto import tqdm

    if not sites or any(n < 1 for n in sites):
        raise ValueError(f"site counts must be >= 1, got {sites}")
    sites = sorted(set(sites))
    owned = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="fedcl-scale-")) if owned else Path(work_dir)
    from fedcl.config import load_config

    settings = {
        n: bench_overrides(sites=n, rounds=rounds, images_per_site=images_per_site, data=data, width=width,
                           batch_size=batch_size, num_push=num_push, extra=list(extra))
        for n in sites
    }
    for overrides in settings.values():
        load_config(None, overrides)  # a bad setting fails here, before any federation starts
    rows = []
    with tqdm(total=len(sites) * rounds, desc="rounds", unit="round", disable=not progress,
              dynamic_ncols=True) as bar:
        for n in sites:
            row = run_one(sites=n, overrides=settings[n], work_dir=work, timeout=timeout, bar=bar)
            row["overrides"] = settings[n]
            rows.append(row)
            if progress:
                bar.write(
                    f"{n:4d} sites: {row['seconds_per_round']:.1f} s/round "
                    f"(round 1: {row['cold_round_seconds']:.1f} s), "
                    f"server peak RSS {row['server_peak_rss_mib']:.0f} MiB, Ray workers "
                    f"{row['ray_workers_peak_rss_sum_mib']:.0f} MiB, load {row['loadavg_after'][0]:.1f}")
    if owned:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "growth": growth_factors(rows), "rounds": rounds,
            "images_per_site": images_per_site, "data": data, "width": width, "batch_size": batch_size,
            "num_push": num_push, "cores": len(os.sched_getaffinity(0)), "loadavg_end": list(os.getloadavg()),
            "code": _code_state(), "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def _code_state() -> dict[str, Any]:
    """The commit measured, and which tracked files differed from it (shared working tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "modified_files": modified}


# ------------------------------------------------------------------------------------- reports


def growth_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for g in result["growth"]:
        parts = [
            f"{GROWTH_KEYS[k]} x{g[k]:.1f}" if g[k] is not None else f"{GROWTH_KEYS[k]} n/a"
            for k in GROWTH_KEYS]
        lines.append(
            f"{g['from_sites']} -> {g['to_sites']} sites (x{g['sites_factor']:g}): " + ", ".join(parts))
    return lines


def table(result: dict[str, Any]) -> str:
    def num(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    head = ("| sites | s/round (rounds 2..R) | round 1 s (cold) | s per site-task | in train handlers "
            "| server CPU s/round (Flower polling) | Ray workers CPU s/round | server peak RSS MiB "
            "| Ray workers RSS MiB (sum, procs) "
            "| Ray services RSS MiB | queue peak entries | load (1 min) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        lines.append(
            f"| {r['sites']} | {r['seconds_per_round']:.1f} | {r['cold_round_seconds']:.1f} | "
            f"{r['seconds_per_site_task']:.2f} | {100 * r['site_handler_share']:.0f}% | "
            f"{num(r['server_cpu_per_round'], '.1f')} ({num(r['flower_polling_cpu_per_round'], '.1f')}) | "
            f"{num(r['ray_workers_cpu_per_round'], '.1f')} | "
            f"{r['server_peak_rss_mib']:.0f} | {r['ray_workers_peak_rss_sum_mib']:.0f} "
            f"({r['ray_workers_max_processes']}) | "
            f"{r['ray_services_peak_rss_sum_mib']:.0f} | {r['queue_size']} | "
            f"{r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f} |")
    return "\n".join(lines)


def write_results(result: dict[str, Any], out_dir: Path, *, name: str = "scale") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    rows = result["rows"]
    md = [
        f"# Scale: `fedcl simulate` with {', '.join(str(r['sites']) for r in rows)} sites", "",
        f"Command: `{result.get('command', '')}`", "",
        f"{result['rounds']} rounds, {result['images_per_site']} {result['data']} images per site (iid), "
        f"CNN width {result['width']}, batch {result['batch_size']}, {result['num_push']} pushes per site "
        f"and round, {result['cores']} cores, Ray actors = min(sites, cores). Measured at commit "
        f"{result['code']['commit'][:10]}"
        + (f" with uncommitted changes to {', '.join(result['code']['modified_files'])}"
           if result["code"]["modified_files"] else "")
        + ".",
        "", table(result), "",
    ]
    md += [f"* {line}" for line in growth_lines(result)]
    md += [""] + [
        f"* {r['sites']} sites: server process at most {r['server_max_open_fds']} open files (limit "
        f"{result['open_files_limit']}) and {r['server_max_threads']} threads; round seconds "
        + ", ".join(f"{x['seconds']:.1f}" for x in r["rounds"])
        + "; Ray worker processes "
        f"{r['ray_workers_max_processes']}"
        for r in rows]
    polling = [r for r in rows if r.get("flower_polling_cpu_per_round") is not None]
    if polling:
        md += ["", "* Flower's polling thread (CPU s/round): " + " → ".join(
            f"{r['flower_polling_cpu_per_round']:.2f} at {r['sites']} sites" for r in polling)]
    md += [""] + [f"* {r['sites']} sites, server CPU s/round by thread: " + ", ".join(
        f"{k} {v:.2f}" for k, v in list(r["server_cpu_by_thread_per_round"].items())[:5])
        for r in rows if r["server_cpu_by_thread_per_round"]]
    md += [
        "",
        "s per site-task = s/round x actors / sites. 'in train handlers' = the sites' train handler time "
        "(sum over sites / actors) as a share of the round; the rest is the release phase (when on), Flower, "
        "Ray and the ServerApp. CPU s/round: CPU seconds used between the end of round 1 and the end of the "
        "last round, per round (read by the server process as it writes each round's record); "
        "'Flower polling' is the thread of Flower's simulation engine that scans the LinkState for every "
        "node's next message every 0.1 s (vce_api.add_messages_to_queue). "
        "RSS sums count shared pages once per process. "
        "Load: the 1-minute load average before and after each run (2 cores, shared with other jobs)."]
    paths[1].write_text("\n".join(md) + "\n")

    sites = [r["sites"] for r in rows]
    fig, (ax_t, ax_c, ax_m) = plt.subplots(1, 3, figsize=(15, 4))
    ax_t.plot(sites, [r["seconds_per_round"] for r in rows], "o-", label="measured (rounds 2..R)")
    base = rows[0]
    ax_t.plot(sites, [base["seconds_per_round"] * n / base["sites"] for n in sites], "--", color="grey",
              label=f"linear from {base['sites']} sites")
    ax_t.set(xlabel="sites", ylabel="seconds per round", title="time per round")
    ax_t.legend()
    for key, label in [("ray_workers_cpu_per_round", "Ray workers"),
                       ("server_cpu_per_round", "server process"),
                       ("flower_polling_cpu_per_round", "of it Flower's polling thread")]:
        points = [(r["sites"], r[key]) for r in rows if r.get(key) is not None]
        ax_c.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    ax_c.set(xlabel="sites", ylabel="CPU seconds per round", title="CPU per round (rounds 2..R)")
    ax_c.legend()
    for key, label in [("server_peak_rss_mib", "server process peak RSS"),
                       ("ray_workers_peak_rss_sum_mib", "Ray workers, RSS sum"),
                       ("ray_services_peak_rss_sum_mib", "Ray services, RSS sum")]:
        ax_m.plot(sites, [r[key] for r in rows], "o-", label=label)
    ax_m.set(xlabel="sites", ylabel="MiB", title="memory (peak)")
    ax_m.set_ylim(bottom=0)
    ax_m.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", default="10,50,100", help="comma-separated site counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images-per-site", type=int, default=64)
    p.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "synthetic"])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-push", type=int, default=64)
    p.add_argument("-s", "--set", dest="extra", action="append", default=[],
                   help="extra section.key=value setting for every run (as `fedcl simulate -s`)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per site count")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--name", default="scale", help="output file stem")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="rebuild the table, growth factors and plot from a saved result; runs nothing")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run one federation, write here
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return _child(args.child, args.out, args.extra)

    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["growth"] = growth_factors(result["rows"])
        return _report(result, args.results, args.name)
    sites = sorted({int(s) for s in args.sites.split(",") if s.strip()})
    from fedcl.config import ConfigError

    try:
        result = run_scale(sites=sites, rounds=args.rounds, images_per_site=args.images_per_site,
                           data=args.data, width=args.width, batch_size=args.batch_size,
                           num_push=args.num_push, extra=args.extra, work_dir=args.work_dir,
                           timeout=args.timeout)
    except (ConfigError, RuntimeError, TimeoutError) as exc:
        print(f"bench/scale.py: {exc}", file=sys.stderr)
        return 1
    shown = sys.argv[1:] if argv is None else argv
    result["command"] = "python bench/scale.py " + " ".join(shlex.quote(a) for a in shown)
    return _report(result, args.results, args.name)


def _report(result: dict[str, Any], results: Path, name: str) -> int:
    paths = write_results(result, results, name=name)
    print()
    print(table(result))
    for line in growth_lines(result):
        print(line)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
