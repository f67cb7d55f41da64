"""The ``fedcl`` command: train (centralized baseline), eval, simulate (the federation), privacy,
stop-local-superlink (Flower's managed local SuperLink, when a run kept it:
`flwr run . --run-config keep-local-superlink=true`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn


class CliError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def _load(config: Path | None, overrides: list[str]):
    from fedcl.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))


def train(args: argparse.Namespace) -> None:
    """Centralized SimCLR baseline: train, export the encoder, compare with random init."""
    cfg = _load(args.config, args.overrides)
    import torch

    from fedcl.data import DataError
    from fedcl.evaluate import evaluate_encoder
    from fedcl.models import save_encoder
    from fedcl.runtime import (
        JsonlLog,
        configure_threads,
        first_n,
        load_knn_sets,
        load_split,
        make_augment,
        make_model,
    )
    from fedcl.train import RoundRecipe, resolve_device, train_centralized

    out: Path = args.out
    configure_threads(cfg.train.threads)
    try:
        device = resolve_device(cfg.train.device)
        train_set = first_n(load_split(cfg.data, split="train"), cfg.data.train_max_images,
                            seed=cfg.data.seed)
        knn_sets = load_knn_sets(cfg.data)  # the labelled set fedcl eval and the coordinator use
    except (DataError, RuntimeError) as exc:
        _fail(str(exc))
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg.model, in_channels=train_set.images.shape[1])
    random_model = make_model(cfg.model, in_channels=train_set.images.shape[1])
    random_model.load_state_dict(model.state_dict())
    augment = make_augment(cfg.augment)
    log = JsonlLog(out / "metrics.jsonl")
    print(f"training {cfg.model.arch} on {train_set.images.shape[0]} {cfg.data.name} images for "
          f"{cfg.train.epochs} epochs on {device}", flush=True)
    start = time.time()
    t = cfg.train
    recipe = RoundRecipe(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, temperature=t.temperature,
                         optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay)
    train_centralized(
        model, train_set.images, recipe, augment=augment, device=device, seed=t.seed,
        on_epoch=lambda e, loss: log.write({"epoch": e, "loss": loss, "seconds": time.time() - start}),
    )
    save_encoder(out / "encoder.pt", model=model, meta={"trained": "centralized", "epochs": cfg.train.epochs,
                                                        "data": cfg.data.name})
    if knn_sets.labelled:
        kw = dict(**knn_sets.as_kwargs(), device=device, linear=False)
        trained = evaluate_encoder(model, **kw)["knn"]
        rand = evaluate_encoder(random_model, **kw)["knn"]
        log.write({"final_knn": trained, "random_init_knn": rand})
        print(f"kNN accuracy: trained {trained:.4f} | random init {rand:.4f} ({knn_sets.description})")
    print(f"encoder written to {out / 'encoder.pt'}")


def eval_cmd(args: argparse.Namespace) -> None:
    """kNN, linear-probe and few-label accuracy of a frozen encoder on a labelled set."""
    cfg = _load(args.config, args.overrides)
    import torch

    from fedcl.data import DataError
    from fedcl.evaluate import evaluate_encoder
    from fedcl.models import build_model, load_encoder
    from fedcl.runtime import configure_threads, load_knn_sets, make_augment
    from fedcl.train import resolve_device

    configure_threads(cfg.train.threads)
    try:
        model, meta = load_encoder(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    try:
        knn_sets = load_knn_sets(cfg.data)  # the labelled set fedcl train and the coordinator use
    except DataError as exc:
        _fail(str(exc))
    if not knn_sets.labelled:
        _fail(f"evaluation needs labels; data set {cfg.data.name!r} has none")
    device = resolve_device(cfg.train.device)
    print(knn_sets.description)
    kw = dict(**knn_sets.as_kwargs(), device=device, augment=make_augment(cfg.augment), seed=cfg.data.seed)
    rows = [("encoder", evaluate_encoder(model, **kw))]
    if args.compare_random:
        torch.manual_seed(cfg.train.seed)
        rows.append(("random init", evaluate_encoder(build_model(**model.spec), **kw)))
    print(f"{'':12s} {'kNN':>7s} {'linear':>7s} {'10/class':>8s} {'align':>6s} {'unif':>6s}")
    for name, r in rows:
        print(f"{name:12s} {r['knn']:7.4f} {r['linear']:7.4f} {r['fewlabel']:8.4f} "
              f"{r['alignment']:6.3f} {r['uniformity']:6.3f}")


def simulate(args: argparse.Namespace) -> None:
    """The federation on one machine: Flower's simulation engine + the queue service on loopback."""
    if args.engine not in ("ray", "inprocess"):
        _fail(f"--engine {args.engine}: choose ray or inprocess")
    cfg = _load(args.config, args.overrides)
    from fedcl.sim.simulate import run_simulation_main  # Flower lives in server/, imported only here

    try:
        run_simulation_main(cfg, out_dir=args.out or cfg.server.out_dir, engine=args.engine)
    except Exception as exc:  # user-facing errors are raised with clear messages by the driver
        from fedcl.data import DataError
        from fedcl.server.app import FederationError
        from fedcl.server.checkpoint import CheckpointError
        from fedcl.server.strategy import StrategyError

        if isinstance(exc, (DataError, FileNotFoundError, FederationError, StrategyError, CheckpointError)):
            _fail(str(exc))
        raise


def _describe_ledger(ledger) -> str:
    """The report of one site from its full ledger file (every event)."""
    from fedcl.privacy.ledger import EMBEDDINGS, MODEL_UPDATES
    from fedcl.privacy.report import describe_privacy

    updates = [e for e in ledger.events if e.channel == MODEL_UPDATES]
    releases = [e for e in ledger.events if e.channel == EMBEDDINGS]
    dp_enabled = bool(updates) and all(e.dp_protected for e in updates)
    mode = releases[-1].mode if releases else "none"  # no release event: the queue was off (or unused)
    return describe_privacy(dp_enabled=dp_enabled, release_mode=mode, ledger_summary=ledger.summary())


# a summary lists the release modes a site used, not their order: name the least protected one
_WEAKEST_FIRST = ("raw", "gaussian", "prototypes", "public")


def _describe_summary(summary: dict) -> str:
    """The report of one site from the ledger summary it sent the coordinator
    (``PrivacyLedger.summary()``)."""
    from fedcl.privacy.ledger import EMBEDDINGS, MODEL_UPDATES
    from fedcl.privacy.report import describe_privacy

    channels = summary.get("channels", {})
    updates, releases = channels.get(MODEL_UPDATES, {}), channels.get(EMBEDDINGS, {})
    dp_enabled = updates.get("dp_protected") is True  # every update trained with DP-SGD (None: no update)
    modes = set(releases.get("modes", []))
    mode = next((m for m in _WEAKEST_FIRST if m in modes), "none")
    return describe_privacy(dp_enabled=dp_enabled, release_mode=mode, ledger_summary=summary)


def _summary_ledgers(run_dir: Path) -> list[dict]:
    """The sites' ledger summaries a coordinator's summary.json holds ([] without one)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return []
    try:
        ledgers = json.loads(path.read_text()).get("ledgers", {})
    except (OSError, ValueError, AttributeError) as exc:
        _fail(f"{path}: not a summary.json written by the coordinator ({exc})")
    if not isinstance(ledgers, dict) or not all(isinstance(s, dict) for s in ledgers.values()):
        _fail(f"{path}: its 'ledgers' is not a mapping of site id to ledger summary")
    return [{"site_id": site, **s} for site, s in sorted(ledgers.items())]


def privacy(args: argparse.Namespace) -> None:
    """What is protected and what is not, per site and per channel, in plain words."""
    from fedcl.privacy.ledger import PrivacyLedger

    reports = []  # (where, what): a ledger file, or a site's summary in a run's summary.json
    for p in args.ledgers:
        files = sorted(p.rglob("ledger*.json")) if p.is_dir() else [p]
        reports += [(f, None) for f in files]
        if p.is_dir() and not files:
            reports += [(p / "summary.json", s) for s in _summary_ledgers(p)]
    if not reports:
        _fail("no ledger files found (they are written as ledger-<site>.json in the run's state folder, and "
              "the coordinator's run folder holds them in summary.json)")
    for where, summary in reports:
        try:
            print(_describe_summary(summary) if summary is not None
                  else _describe_ledger(PrivacyLedger.load(where)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _fail(f"{where}: {exc}")
        print("")


def stop_local_superlink(args: argparse.Namespace) -> None:
    """Stop the local SuperLink `flwr run .` started and keeps, if it has no unfinished run
    (docs/flower.md)."""
    from fedcl.server.flower_local import LocalSuperLinkError, local_superlink_port
    from fedcl.server.flower_local import stop_local_superlink as stop

    try:
        print(stop(args.port if args.port is not None else local_superlink_port()), flush=True)
    except LocalSuperLinkError as exc:
        _fail(str(exc))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcl", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func, *, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        sp.set_defaults(func=func)
        if config:
            sp.add_argument("--config", "-c", type=Path, help="TOML config file")
            sp.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                            metavar="SECTION.KEY=VALUE", help="override a setting (repeatable)")
        return sp

    command("train", train).add_argument("--out", type=Path, default=Path("runs/central"),
                                         help="output folder (default: runs/central)")
    ev = command("eval", eval_cmd)
    ev.add_argument("checkpoint", type=Path, help="encoder checkpoint written by fedcl train/simulate")
    ev.add_argument("--compare-random", action=argparse.BooleanOptionalAction, default=True,
                    help="also evaluate a random-init encoder of the same shape (default: on)")
    sim = command("simulate", simulate)
    sim.add_argument("--out", type=Path, help="output folder (default: server.out_dir)")
    sim.add_argument(
        "--engine", default="ray",
        help="ray: Flower's simulation engine, sites in parallel; "
        "inprocess: the same apps in this process, one site after "
        "another (default: ray)")
    command("stop-local-superlink", stop_local_superlink, config=False).add_argument(
        "--port", type=int, help="its port (default: Flower's, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT or 39091)")
    command("privacy", privacy, config=False).add_argument(
        "ledgers", type=Path, nargs="+", metavar="LEDGER", help="site ledger files (JSON) or a run folder")
    return p


def _print_error(message: str) -> None:
    red = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    print(f"\033[31merror: {message}\033[0m" if red else f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except CliError as exc:
        _print_error(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
