"""Wall time of one small federation under both engines of `fedcl simulate`: in-process vs Ray.

    python bench/inprocess_vs_ray.py [--sites 3] [--rounds 3] [--images-per-site 300] [--repeats 1]
                                     [--threads N]

Both engines run the same shipped code (``fedcl.sim.simulate.run_simulation_main``: the ServerApp
loop, the ClientApp handlers, the queue gRPC service on loopback), on the same configuration and
seed: Fashion-MNIST, pathological split (2 classes per site), a CNN of width 8, queue on, kNN on
500 + 500 images after every round. Each run is a fresh Python process, so both pay the same
imports. Threads (``--threads`` sets ``train.threads``; unset): both give each site
cores / min(sites, cores) torch threads (``fedcl.sim.simulate.site_threads``); Ray runs
min(sites, cores) sites at once, in-process one.

Measured per engine (median over ``--repeats``, runs alternating between the engines):

* process: the whole `python` process, imports included, as a user waits for it;
* federation: ``run_simulation_main``'s own clock: engine start (Ray's, for Ray), every round,
  the per-site evaluation, the encoder and the plots;
* rounds: the sum of the rounds' ``seconds`` in metrics.jsonl (the ServerApp's clock, from the
  queue's Advance to the checkpoint), and round 1 apart (Ray starts its actors then).

Also the final kNN accuracy and the largest per-round loss difference between the engines (the
queue service draws negatives in a random order, so the floats may differ slightly). Writes
``bench/results/inprocess_vs_ray.txt``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENGINES = ("inprocess", "ray")


def overrides(args) -> list[str]:
    return [
        "data.name=fashion-mnist", "data.partition=pathological", f"data.num_sites={args.sites}",
        f"data.max_images_per_site={args.images_per_site}", "data.eval_max_images=500",
        "data.train_max_images=500", "model.width=8", "train.batch_size=64", "train.num_push=64",
        "queue.num_negatives=256", f"federation.num_rounds={args.rounds}",
    ] + ([f"train.threads={args.threads}"] if args.threads else [])


def child(engine: str, out: Path, items: list[str]) -> None:
    """One run, in this (fresh) process; prints its figures as one JSON line."""
    from fedcl.config import load_config
    from fedcl.sim.simulate import run_simulation_main

    summary = run_simulation_main(load_config(None, items), out_dir=out, progress=False, stream=io.StringIO(),
                                  engine=engine)
    history = summary["history"]
    print(json.dumps({
        "federation_s": summary["seconds"],
        "rounds_s": sum(r["seconds"] for r in history),
        "round1_s": history[0]["seconds"],
        "losses": [r["loss"] for r in history],
        "final_knn": summary["final_knn"],
    }))


def run_once(engine: str, args, tmp: Path, k: int) -> dict:
    out = tmp / f"{engine}-{k}"
    argv = [sys.executable, __file__, "--child", engine, "--out", str(out), "--", *overrides(args)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": f"{REPO}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the {engine} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"process_s": process_s, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images-per-site", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="train.threads (default: each engine's per-site default)")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("items", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.items)
        return

    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory(prefix="inprocess_vs_ray-") as tmp:
        for k in range(args.repeats):
            for engine in ENGINES if k % 2 == 0 else ENGINES[::-1]:
                runs[engine].append(run_once(engine, args, Path(tmp), k))
                print(f"{engine:9s} run {k + 1}: {runs[engine][-1]['process_s']:.1f} s", flush=True)

    def median(engine: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[engine])

    rows = [("process (imports included)", "process_s"), ("federation (run_simulation_main)", "federation_s"),
            ("rounds (sum of round seconds)", "rounds_s"), ("round 1", "round1_s")]
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    lines = [
        f"in-process vs Ray: one federation, {args.sites} sites x {args.rounds} rounds, Fashion-MNIST "
        f"pathological, {args.images_per_site} images per site, CNN width 8, queue on, train.threads "
        f"{args.threads or 'unset'}",
        f"{cores} cores, load average {load:.1f} at the end; median of {args.repeats} run(s) per engine, "
        "each a fresh process",
        "",
        f"{'seconds':34s} {'in-process':>10s} {'Ray':>8s} {'Ray / in-process':>17s}",
    ]
    for label, key in rows:
        a, b = median("inprocess", key), median("ray", key)
        lines.append(f"{label:34s} {a:10.1f} {b:8.1f} {b / a:17.2f}")
    diffs = [abs(x - y) for r_in, r_ray in zip(runs["inprocess"], runs["ray"], strict=False)
             for x, y in zip(r_in["losses"], r_ray["losses"], strict=False)]
    lines += [
        "",
        f"final kNN accuracy: in-process {[round(100 * r['final_knn'], 2) for r in runs['inprocess']]} %, "
        f"Ray {[round(100 * r['final_knn'], 2) for r in runs['ray']]} %",
        f"largest per-round loss difference between the engines: {max(diffs):.2e}",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    out = REPO / "bench" / "results" / "inprocess_vs_ray.txt"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
