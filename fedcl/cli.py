"""The ``fedcl`` command: train (centralized baseline), eval, simulate (the federation), privacy."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

_CONFIG = typer.Option(None, "--config", "-c", help="TOML config file")
_SET = typer.Option([], "--set", "-s", help="override a setting: section.key=value (repeatable)")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load(config: Optional[Path], overrides: list[str]):
    from fedcl.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def train(
    config: Optional[Path] = _CONFIG,
    overrides: list[str] = _SET,
    out: Path = typer.Option(Path("runs/central"), help="output folder"),
) -> None:
    """Centralized SimCLR baseline: train, export the encoder, compare with random init."""
    cfg = _load(config, overrides)
    import torch

    from fedcl.data import DataError
    from fedcl.evaluate import evaluate_encoder
    from fedcl.models import save_encoder
    from fedcl.runtime import JsonlLog, configure_threads, first_n, load_knn_sets, load_split, make_augment, make_model
    from fedcl.train import RoundRecipe, resolve_device, train_centralized

    configure_threads(cfg.train.threads)
    try:
        device = resolve_device(cfg.train.device)
        train_set = first_n(load_split(cfg.data, split="train"), cfg.data.train_max_images, seed=cfg.data.seed)
        knn_sets = load_knn_sets(cfg.data)  # the labelled set fedcl eval and the coordinator use
    except (DataError, RuntimeError) as exc:
        _fail(str(exc))
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg.model, in_channels=train_set.images.shape[1])
    random_model = make_model(cfg.model, in_channels=train_set.images.shape[1])
    random_model.load_state_dict(model.state_dict())
    augment = make_augment(cfg.augment)
    log = JsonlLog(out / "metrics.jsonl")
    typer.echo(f"training {cfg.model.arch} on {train_set.images.shape[0]} {cfg.data.name} images for "
               f"{cfg.train.epochs} epochs on {device}")
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
        typer.echo(f"kNN accuracy: trained {trained:.4f} | random init {rand:.4f} ({knn_sets.description})")
    typer.echo(f"encoder written to {out / 'encoder.pt'}")


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="encoder checkpoint written by fedcl train/simulate"),
    config: Optional[Path] = _CONFIG,
    overrides: list[str] = _SET,
    compare_random: bool = typer.Option(True, help="also evaluate a random-init encoder of the same shape"),
) -> None:
    """kNN, linear-probe and few-label accuracy of a frozen encoder on a labelled set."""
    cfg = _load(config, overrides)
    import torch

    from fedcl.data import DataError
    from fedcl.evaluate import evaluate_encoder
    from fedcl.models import build_model, load_encoder
    from fedcl.runtime import configure_threads, load_knn_sets, make_augment
    from fedcl.train import resolve_device

    configure_threads(cfg.train.threads)
    try:
        model, meta = load_encoder(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    try:
        knn_sets = load_knn_sets(cfg.data)  # the labelled set fedcl train and the coordinator use
    except DataError as exc:
        _fail(str(exc))
    if not knn_sets.labelled:
        _fail(f"evaluation needs labels; data set {cfg.data.name!r} has none")
    device = resolve_device(cfg.train.device)
    typer.echo(knn_sets.description)
    kw = dict(**knn_sets.as_kwargs(), device=device, augment=make_augment(cfg.augment), seed=cfg.data.seed)
    rows = [("encoder", evaluate_encoder(model, **kw))]
    if compare_random:
        torch.manual_seed(cfg.train.seed)
        rows.append(("random init", evaluate_encoder(build_model(**model.spec), **kw)))
    typer.echo(f"{'':12s} {'kNN':>7s} {'linear':>7s} {'10/class':>8s} {'align':>6s} {'unif':>6s}")
    for name, r in rows:
        typer.echo(f"{name:12s} {r['knn']:7.4f} {r['linear']:7.4f} {r['fewlabel']:8.4f} "
                   f"{r['alignment']:6.3f} {r['uniformity']:6.3f}")


@app.command()
def simulate(
    config: Optional[Path] = _CONFIG,
    overrides: list[str] = _SET,
    out: Optional[Path] = typer.Option(None, help="output folder (default: server.out_dir)"),
    engine: str = typer.Option("ray", help="ray: Flower's simulation engine, sites in parallel; inprocess: "
                                           "the same apps in this process, one site after another"),
) -> None:
    """The federation on one machine: Flower's simulation engine + the queue service on loopback."""
    if engine not in ("ray", "inprocess"):
        _fail(f"--engine {engine}: choose ray or inprocess")
    cfg = _load(config, overrides)
    from fedcl.sim.simulate import run_simulation_main  # Flower lives in server/, imported only here

    try:
        run_simulation_main(cfg, out_dir=out or cfg.server.out_dir, engine=engine)
    except Exception as exc:  # user-facing errors are raised with clear messages by the driver
        from fedcl.data import DataError

        if isinstance(exc, (DataError, FileNotFoundError)):
            _fail(str(exc))
        raise


@app.command()
def privacy(
    ledgers: list[Path] = typer.Argument(..., help="site ledger files (JSON) or a run folder"),
) -> None:
    """What is protected and what is not, per site and per channel, in plain words."""
    from fedcl.privacy.ledger import EMBEDDINGS, MODEL_UPDATES, PrivacyLedger
    from fedcl.privacy.report import describe_privacy

    def describe_ledger(ledger: PrivacyLedger) -> str:
        updates = [e for e in ledger.events if e.channel == MODEL_UPDATES]
        releases = [e for e in ledger.events if e.channel == EMBEDDINGS]
        dp_enabled = bool(updates) and all(e.dp_protected for e in updates)
        mode = releases[-1].mode if releases else "none"  # no release event: the queue was off (or unused)
        return describe_privacy(dp_enabled=dp_enabled, release_mode=mode, ledger_summary=ledger.summary())

    files: list[Path] = []
    for p in ledgers:
        files += sorted(p.rglob("ledger*.json")) if p.is_dir() else [p]
    if not files:
        _fail("no ledger files found (they are written as ledger-<site>.json in the run's state folder)")
    for f in files:
        try:
            typer.echo(describe_ledger(PrivacyLedger.load(f)))
        except (OSError, ValueError) as exc:
            _fail(f"{f}: {exc}")
        typer.echo("")


def main() -> None:
    app(prog_name="fedcl")


if __name__ == "__main__":
    sys.exit(main())
