"""``fedcl simulate``: the federation on one machine.

The queue service runs on loopback in this process (a gRPC server thread, with per-site tokens),
Flower's simulation engine (Ray) runs N virtual sites, each on its own partition of the
configured data set (default: Fashion-MNIST, 5 sites, 2 classes each), and the ServerApp runs
the rounds in a thread here. ``engine="inprocess"`` (``fedcl simulate --engine inprocess``) runs
the same ServerApp and ClientApp without Ray, one site after another in this process
(``fedcl.sim.inprocess``). Prints a progress bar, a round table and a one-line summary; writes
metrics.jsonl, plots, checkpoints and encoder.pt (loadable by ``fedcl eval``) under ``out_dir``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from fedcl.server.metrics import format_table


class _Progress:
    """tqdm bar over rounds; the round table comes at the end."""

    def __init__(self, *, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled, self.bar = stream, enabled, None

    def on_start(self, *, start_round: int, num_rounds: int, initial_knn: float | None) -> None:
        from tqdm.auto import tqdm

        if start_round > 1:
            print(f"resuming at round {start_round} of {num_rounds}", file=self.stream, flush=True)
        if initial_knn is not None:
            print(f"random-init kNN accuracy: {100 * initial_knn:.2f}%", file=self.stream, flush=True)
        self.bar = tqdm(total=num_rounds, initial=start_round - 1, desc="rounds", unit="round",
                        file=self.stream, disable=not self.enabled, dynamic_ncols=True)

    def on_round(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{record['loss']:.3f}" if record.get("loss") is not None else "—"}
        if record.get("knn") is not None:
            post["kNN"] = f"{100 * record['knn']:.1f}%"
        if record.get("queue_size") is not None:
            post["queue"] = record["queue_size"]
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def _quiet_flower(verbose: bool):
    """Flower logs every message exchange at INFO; the simulation prints its own progress."""
    logger = logging.getLogger("flwr")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _start_ray(init_args: dict[str, Any], *, stream: TextIO, attempts: int = 3) -> None:
    """Start Ray before Flower does, retrying: Ray gives a raylet 30 s to register, which a busy
    machine can miss ("The current node timed out during startup"). Flower then reuses this Ray."""
    import ray

    pythonpath = os.pathsep.join(sys.path)  # as Flower's RayBackend passes it to the workers
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
                     **init_args)
            return
        except Exception as exc:  # Ray raises plain Exception for a startup timeout
            ray.shutdown()
            if attempt == attempts:
                raise RuntimeError(
                    f"Ray (Flower's simulation engine) did not start in {attempts} tries: {exc} "
                    "Is the machine overloaded? Try again when it is quieter.") from None
            print(f"Ray did not start ({str(exc).splitlines()[0]}); trying again ({attempt + 1}/{attempts})",
                  file=stream, flush=True)
            time.sleep(5.0 * attempt)


def _cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def site_threads(cfg) -> int:
    """Torch threads per site: ``train.threads``, else the cores shared among the sites Ray runs at
    once. The in-process engine uses the same count, one site at a time: the sites then compute as
    under Ray, and a busy machine is not oversubscribed (on 2 shared cores at load 9 to 14, the 3
    rounds of ``bench/inprocess_vs_ray.py`` took 215 s in-process with 2 threads per site, 24 s
    with 1)."""
    cores = _cpu_count()
    return cfg.train.threads or max(1, cores // max(1, min(cfg.data.num_sites, cores)))


def with_num_sites(config, num_sites: int | None):
    """``config`` with ``data.num_sites`` replaced (None: as configured)."""
    if num_sites is None:
        return config
    return config.model_copy(update={"data": config.data.model_copy(update={"num_sites": int(num_sites)})})


@contextmanager
def loopback_federation(cfg, *, out_dir: Path, threads: int | None):
    """What both engines of ``fedcl simulate`` share: the queue service on loopback for the run
    (``fedcl.server.loopback.loopback_queue``: per-site tokens; restored from its snapshot when the
    run resumes) and the simulated sites' settings, with their tokens.

    Yields ``(QueueLink or None, SimulatedSites)``; stops the queue service on the way out.
    """
    from fedcl.client.app import SimulatedSites
    from fedcl.server.loopback import loopback_queue

    site_ids = [f"site-{i}" for i in range(cfg.data.num_sites)]
    with loopback_queue(cfg, out_dir=out_dir, site_ids=site_ids) as (link, site_tokens):
        yield link, SimulatedSites(config=cfg, site_tokens=site_tokens, state_root=out_dir / "sites",
                                   threads=threads)


ENGINES = ("ray", "inprocess")


def _print_summary(result, *, seconds: float, out_dir: Path, stream: TextIO) -> None:
    """The round table, a budget stop if there was one, and the one-line summary."""
    from fedcl.server.app import ENCODER_NAME

    print("", file=stream)
    print(format_table(result.history), file=stream)
    rand = "—" if result.random_init_knn is None else f"{100 * result.random_init_knn:.2f}%"
    final = "—" if result.final_knn is None else f"{100 * result.final_knn:.2f}%"
    if result.stopped_for_privacy_budget_at_round is not None:
        print(
            f"\nthe run stops at round {result.stopped_for_privacy_budget_at_round}: every site refused it "
            "on its privacy budget (fedcl privacy shows each site's ledger)", file=stream)
    print(
        f"\nfedcl simulate: {len(result.history)} rounds in {seconds:.0f} s | kNN accuracy {final} "
        f"(random init {rand}) | encoder {out_dir / ENCODER_NAME} | plots {out_dir}",
        file=stream, flush=True)


def run_simulation_main(
    config,
    *,
    out_dir: Path,
    num_sites: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    stream: TextIO | None = None,
    engine: str = "ray",
) -> dict[str, Any]:
    """Run (or resume) the federation of ``config`` with ``num_sites`` simulated sites.

    ``engine``: "ray" (Flower's simulation engine, sites in parallel) or "inprocess"
    (``fedcl.sim.inprocess.InProcessGrid``: the same apps, one site after another, no Ray).
    Returns the summary (also written to ``out_dir/summary.json``): rounds, final and random-init
    kNN accuracy, the encoder path, seconds, the round history.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core notes about fork() under Ray
    # Ray starts its processes with a preexec_fn, i.e. fork(), after the queue service's gRPC threads are
    # up; gRPC's fork handlers can then abort the child or block this process. No child of ours uses gRPC
    # before exec, so they are switched off.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    # Flower (and with it gRPC, which reads both variables once) is imported only from here on
    from fedcl.client.app import make_client_app
    from fedcl.server.app import make_server_app

    stream = stream or sys.stdout
    cfg = with_num_sites(config, num_sites)
    n_sites = cfg.data.num_sites
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    parallel = max(1, min(n_sites, _cpu_count()))  # Ray actors
    threads = site_threads(cfg)
    observer = _Progress(stream=stream, enabled=progress)
    results: list = []  # receives the FederationResult
    with loopback_federation(cfg, out_dir=out_dir, threads=threads) as (link, simulated):
        server_app = make_server_app(config=cfg, out_dir=out_dir, queue=link, observer=observer,
                                     results=results)
        client_app = make_client_app(simulated=simulated)
        print(f"fedcl simulate: {n_sites} sites, {cfg.federation.num_rounds} rounds, {cfg.data.name} "
              f"({cfg.data.partition}), queue {'on' if link else 'off'}, engine {engine}; "
              f"output in {out_dir}",
              file=stream, flush=True)
        t0 = time.time()
        try:
            with _quiet_flower(verbose):
                if engine == "ray":
                    _run_ray(server_app, client_app, n_sites=n_sites, parallel=parallel, verbose=verbose,
                             stream=stream)
                else:
                    from fedcl.sim.inprocess import run_apps

                    run_apps(server_app, client_app, num_nodes=n_sites)
        finally:
            observer.close()
    seconds = time.time() - t0
    if not results:
        raise RuntimeError("the simulation ended without a result from the ServerApp (see the log above)")
    result = results[0]

    _print_summary(result, seconds=seconds, out_dir=out_dir, stream=stream)
    return {
        "rounds": len(result.history),
        "final_knn": result.final_knn,
        "random_init_knn": result.random_init_knn,
        "encoder": str(result.encoder_path),
        "out_dir": str(out_dir),
        "seconds": seconds,
        "resumed_from": result.resumed_from,
        "plots": [str(p) for p in result.plots],
        "history": result.history,
    }


def _run_ray(server_app, client_app, *, n_sites: int, parallel: int, verbose: bool, stream: TextIO) -> None:
    """Flower's simulation engine: ``n_sites`` virtual nodes, ``parallel`` Ray actors of one CPU each."""
    import ray
    from flwr.simulation import run_simulation

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": parallel, "num_gpus": 0, "logging_level": "ERROR",
                      "log_to_driver": bool(verbose)},
    }
    try:
        _start_ray(backend_config["init_args"], stream=stream)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites,
                       backend_config=backend_config, verbose_logging=verbose)
    finally:
        if ray.is_initialized():  # Flower shuts it down when it gets that far
            ray.shutdown()
