"""Representation quality of fedcl against its baselines on non-IID Fashion-MNIST.

    python bench/quality.py --quick                       # smoke run (fedcl_dp8: minutes)
    python bench/quality.py --splits pathological --seeds 0 --rounds 6 --images-per-site 1000 \
        --width 16 --methods random,fedsimclr,fedcl,fedcl_noqueue,central
    python bench/quality.py --dataset fashion-mnist-cluttered --methods pixels,random,central ...

--dataset fashion-mnist-cluttered runs every method in the clutter regime (fedcl/data/clutter.py;
--canvas, --item-scale, --clutter-patches, --clutter-patch-size, --clutter-seed), the data set
``data.name = "fashion-mnist-cluttered"`` of the shipped config. The ``pixels`` row is no encoder:
its features are the raw pixels, flattened and centred per image (each image minus its own mean),
judged by the very same probes as every other row.

Every method starts from the same initial weights (per seed), uses the same encoder, recipe and
total compute (rounds x local epochs x images: central trains rounds x local_epochs epochs on
the union of the sites' images; with --rounds-per-epoch k each round trains on 1/k of a site's
images and central trains rounds x local_epochs / k epochs). Encoders are judged frozen
(DESIGN "Evaluation protocol"):
kNN (k = 200, t = 0.1) with the union of the sites' labelled training images as feature bank,
linear probe, few-label probe (10 per class) on the same bank, alignment and uniformity on a
Fashion-MNIST test subset.

Every federated method runs on the shipped federation: ``federation_config`` turns the method and
the recipe into a FedclConfig, and ``fedcl.sim.inprocess.run_federation_inprocess`` runs the ServerApp
loop and ClientApp handlers in this process with the queue service on loopback (what
``fedcl simulate --engine inprocess`` runs); the final global encoder is read from its encoder.pt.
The sites are the shipped partitions of that config; ``fedcl_public`` uses the server's own
reference set (``queue.public_images`` training images, not held out of the sites). The per-round
kNN curve is the server's (its bank: a random subset of the training split). DP-SGD rows run with
the sites' insecure_reproducible_dp switch (public noise seeds: the rows reproduce, the noise is
not private). Results per (split, method, seed) are cached under ``<out>/cache`` keyed by the part
of the configuration the method reads (``row_key``), so reruns, added methods and recipe changes that
do not reach a row (the queue's settings for FedSimCLR, say) reuse finished work.

Writes <out>/quality<tag>.json, quality<tag>.md, quality<tag>_rounds.png, quality<tag>_epsilon.png.
The JSON records the command, the commit (``-dirty`` when tracked files differed) and the CPU time
of every run (``time.process_time``, all threads; summed under ``cpu``; rows cached before this was
recorded are counted in ``cpu.runs_without``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydantic import ValidationError  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from fedcl.augment import TwoViewAugment  # noqa: E402
from fedcl.config import FedclConfig, format_validation_error  # noqa: E402
from fedcl.data import DataError  # noqa: E402
from fedcl.evaluate import evaluate_encoder, extract_features, knn_accuracy  # noqa: E402
from fedcl.models import build_model, canonical_state_dict, load_canonical_state_dict, load_encoder  # noqa: E402
from fedcl.runtime import load_split, site_partition  # noqa: E402
from fedcl.train import RoundRecipe, local_round, train_centralized  # noqa: E402


@dataclass(frozen=True)
class FedMethod:
    """What differs between the federated methods of the benchmark; ``federation_config`` maps
    each field to the shipped configuration key that sets it."""

    queue: bool = False  # queue.enabled: negatives from other sites (how: ``release``)
    release: Literal["raw", "prototypes", "public"] = "raw"  # privacy.release
    key_encoder: Literal["global", "online"] = "global"  # train.key_encoder: frozen round model or online
    in_batch_negatives: bool = True  # train.in_batch_negatives
    warmup_rounds: int = 1  # queue.warmup_rounds: rounds trained without queue negatives
    max_staleness: int = 2  # queue.max_staleness
    fresh_push: bool = False  # queue.fresh_push: sites push from the received model before anyone trains
    dp_epsilon: float | None = None  # privacy.dpsgd + privacy.target_epsilon over the whole run


# The methods of the tables in docs/benchmarks.md. "random", "local" and "central" are not
# federations. Probes that lost are described in research/ with the commit that still registers them.
METHODS: dict[str, FedMethod | str] = {
    "pixels": "pixels",
    "random": "random",
    "local": "local",
    "fedsimclr": FedMethod(queue=False, key_encoder="online", in_batch_negatives=True),
    # fedcl as the shipped config runs it by default: fresh push (sites push embeddings of the global
    # model they just received, before anyone trains), only this round's entries, one warm-up round
    "fedcl": FedMethod(queue=True, release="raw", key_encoder="global", fresh_push=True, max_staleness=0),
    # the queue off: the queue term needs the queue, so this trains NT-Xent alone, FedSimCLR's loss
    "fedcl_noqueue": FedMethod(queue=False, key_encoder="global"),
    # DP-SGD has no in-batch negatives, so no warm-up: the release phase fills the queue in round 1
    "fedcl_dp8": FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0,
                           in_batch_negatives=False, dp_epsilon=8.0, warmup_rounds=0),
    "fedcl_dp3": FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0,
                           in_batch_negatives=False, dp_epsilon=3.0, warmup_rounds=0),
    # the release modes as the shipped config runs them, like fedcl's row: fresh push, this round's entries
    "fedcl_prototypes": FedMethod(queue=True, release="prototypes", fresh_push=True, max_staleness=0),
    "fedcl_public": FedMethod(queue=True, release="public", fresh_push=True, max_staleness=0),
    "central": "central",
}
MAIN_METHODS = ["pixels", "random", "local", "fedsimclr", "fedcl", "fedcl_noqueue", "fedcl_dp8", "fedcl_dp3",
                "fedcl_prototypes", "fedcl_public", "central"]
# each split is the shipped data config's (data.partition and its parameter): the sites of a
# benchmark run are the partitions ``fedcl simulate`` gives its sites
SPLITS = {"pathological": {"partition": "pathological", "classes_per_site": 2},
          "pathological1": {"partition": "pathological", "classes_per_site": 1},
          "dirichlet0.1": {"partition": "dirichlet", "alpha": 0.1},
          "dirichlet0.5": {"partition": "dirichlet", "alpha": 0.5}, "iid": {"partition": "iid"}}
METRICS = ["knn", "linear", "fewlabel", "alignment", "uniformity"]
# settings of the release modes and DP-SGD shared by every method (part of the cache key)
RELEASE = {"delta": 1e-5, "max_grad_norm": 1.0, "num_prototypes": 16, "release_noise_multiplier": 2.0,
           "release_sample_rate": 0.5, "prototype_min_count": 5.0}
RUNNER = "shipped-federation-inprocess/1"  # in the cache key: rows of the former bench/fedsim.py do not match


def data_settings(cfg: dict, *, split: str, seed: int, data_root: Path) -> dict:
    """The shipped ``[data]`` section of a run: the data set, the split, the sites and their image count.
    ``cfg["dataset"]`` (absent: plain Fashion-MNIST) names the data set and its ``[data.clutter]``."""
    return {"name": "fashion-mnist", "path": str(data_root), "num_sites": cfg["sites"],
            "max_images_per_site": cfg["images_per_site"], "seed": seed, **SPLITS[split],
            **cfg.get("dataset", {})}


def effective_staleness(method: FedMethod, cfg: dict) -> int:
    """queue.max_staleness of ``method`` under the recipe: ``--max-staleness`` (``cfg["max_staleness"]``)
    sets it for the fresh-push rows (fedcl and its DP-SGD rows); the others keep their own."""
    return cfg.get("max_staleness", method.max_staleness) if method.fresh_push else method.max_staleness


def server_strategy(cfg: dict) -> dict:
    """The ``[federation]`` strategy settings of the recipe: FedAvgM at ``--server-momentum``, else none
    (the shipped default strategy, FedAvg)."""
    momentum = cfg.get("server_momentum", 0.0)
    return {"strategy": "FedAvgM", "strategy_kwargs": {"server_momentum": momentum}} if momentum else {}


def federation_config(method: FedMethod, cfg: dict, *, split: str, seed: int, data_root: Path) -> FedclConfig:
    """The FedclConfig that runs ``method`` with the benchmark's recipe ``cfg`` (see run_config)."""
    dp = method.dp_epsilon is not None
    return FedclConfig(
        data=data_settings(cfg, split=split, seed=seed, data_root=data_root)
        # the server's per-round kNN curve: a bank the size of the sites' union, the bench's test count
        | {"train_max_images": cfg["sites"] * cfg["images_per_site"], "eval_max_images": cfg["test_images"]},
        model={"arch": "cnn", "in_channels": 1, "width": cfg["width"], "proj_dim": 128, "proj_hidden": 256},
        augment={"crop_scale_min": cfg["crop_scale_min"]},
        train={"epochs": cfg["local_epochs"], "rounds_per_epoch": cfg.get("rounds_per_epoch", 1),
               "persist_optimizer": cfg.get("persist_optimizer", False), "batch_size": cfg["batch_size"],
               "optimizer": "adam", "lr": cfg["lr"], "weight_decay": 1e-6, "temperature": cfg["temperature"],
               "queue_temperature": cfg.get("queue_temperature", cfg["temperature"]),
               "in_batch_negatives": method.in_batch_negatives, "key_encoder": method.key_encoder,
               "num_push": cfg["num_push"], "device": "cpu", "threads": cfg.get("threads", 1), "seed": seed},
        queue={"enabled": method.queue, "num_negatives": cfg["num_negatives"],
               "fresh_push": method.fresh_push, "max_staleness": effective_staleness(method, cfg),
               "warmup_rounds": method.warmup_rounds, "public_images": cfg["public_images"],
               "dtype": "float32"},
        privacy={"dpsgd": dp, "target_epsilon": method.dp_epsilon or 8.0, "release": method.release,
                 **RELEASE},
        # the bench evaluates itself; the server's kNN curve every eval_every rounds (not in the cache key:
        # it changes the curve's points, not the training)
        federation={"num_rounds": cfg["rounds"], "fraction_evaluate": 0.0,
                    "eval_every": cfg.get("eval_every", 1)} | server_strategy(cfg),
    )


# ------------------------------------------------------------------------------------- data

class Data:
    """The data set loaded once; per (split, seed) the sites' partitions, the bank and the test set.

    dataset: ``run_config(...)["dataset"]`` (None: plain Fashion-MNIST), loaded as the shipped config
    loads it (``fedcl.runtime.load_split``), so the bank holds the very images the sites trained on."""

    dataset: dict | None = None

    def __init__(self, *, root: Path, dataset: dict | None = None) -> None:
        from fedcl.config import DataSettings

        self.root, self.dataset = Path(root), dataset
        d = DataSettings.model_validate({"path": str(root), **(dataset or {})})
        self.train = load_split(d, split="train")
        self.test = load_split(d, split="test")

    def setup(self, *, split: str, seed: int, num_sites: int, images_per_site: int, test_images: int) -> dict:
        """The sites are the shipped partitions (``fedcl.runtime.site_partition``) of the config
        ``federation_config`` writes: the bank of labelled site images is what the federation trained on."""
        from fedcl.config import DataSettings

        sizes = {"sites": num_sites, "images_per_site": images_per_site} | ({"dataset": self.dataset}
                                                                            if self.dataset else {})
        d = DataSettings.model_validate(data_settings(sizes, split=split, seed=seed, data_root=self.root))
        parts = [site_partition(d, self.train, site_index=i) for i in range(num_sites)]
        sites, site_labels = [p.images for p in parts], [p.labels for p in parts]
        bank_images, bank_labels = torch.cat(sites), torch.cat(site_labels)
        g = torch.Generator().manual_seed(10_000 + seed)
        test_idx = torch.randperm(len(self.test), generator=g)[:test_images]
        return {
            "sites": sites, "site_labels": site_labels,
            "bank_images": bank_images, "bank_labels": bank_labels,
            "test_images": self.test.images[test_idx], "test_labels": self.test.labels[test_idx],
            "site_sizes": [int(s.shape[0]) for s in sites],
            "site_classes": [sorted(set(lab.tolist())) for lab in site_labels],
        }


# ----------------------------------------------------------------------------------- methods

def knn_only(model, data: dict, device: torch.device) -> float:
    ftr = extract_features(model, data["bank_images"], device=device)
    fte = extract_features(model, data["test_images"], device=device)
    return knn_accuracy(ftr, data["bank_labels"], fte, data["test_labels"], num_classes=10)


def full_eval(model, data: dict, *, augment: TwoViewAugment, device: torch.device, seed: int) -> dict:
    return evaluate_encoder(model, train_images=data["bank_images"], train_labels=data["bank_labels"],
                            test_images=data["test_images"], test_labels=data["test_labels"], device=device,
                            augment=augment, few_label_per_class=10, seed=seed)


class PixelFeatures(torch.nn.Module):
    """Raw pixels as a representation: each image flattened and centred on its own mean (so that
    cosine similarity is the pixels' correlation); ``forward`` L2-normalises them, as the encoders'
    projections are, for alignment and uniformity."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)  # (B, C*H*W)
        return flat - flat.mean(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.features(x), dim=1)


def model_from_state(spec: dict, state: dict[str, torch.Tensor]):
    model = build_model(**spec)
    load_canonical_state_dict(model, state)
    return model


def run_local_only(*, sites: list[torch.Tensor], spec: dict, init_state: dict, cfg: dict, seed: int,
                   augment: TwoViewAugment, device: torch.device) -> list:
    """Each site alone (not a federation): FedSimCLR's local recipe for the same rounds x local
    epochs, never averaged; with rounds_per_epoch k each round trains on the next 1/k of a
    permutation drawn at the epoch's first round."""
    k = cfg.get("rounds_per_epoch", 1)
    recipe = RoundRecipe(epochs=cfg["local_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                         temperature=cfg["temperature"], key_encoder="online", in_batch_negatives=True,
                         num_push=0)
    gen = torch.Generator().manual_seed(seed)
    models = []
    for i, site_images in enumerate(sites):
        model = model_from_state(spec, init_state)
        order, opt_state = None, None
        for r in range(1, cfg["rounds"] + 1):
            if k > 1 and (r - 1) % k == 0:
                order = torch.randperm(site_images.shape[0], generator=gen)
            images = site_images if k == 1 else site_images[order.tensor_split(k)[(r - 1) % k]]
            res = local_round(model, images, None, recipe, augment=augment, optimizer_state=opt_state,
                              seed=seed * 100_003 + r * 101 + i, device=device)
            opt_state = res.optimizer_state if cfg.get("persist_optimizer", False) else None
        models.append(model)
    return models


def run_federated(method: FedMethod, *, cfg: dict, split: str, seed: int, data_root: Path, out_dir: Path,
                  bar=None):
    """Run ``method`` on the shipped federation (ServerApp loop and ClientApp handlers, in process,
    queue service on loopback); returns (the final global encoder, the server's FederationResult).
    DP-SGD rows use the sites' insecure_reproducible_dp switch: public noise seeds, so the rows
    reproduce; their noise is NOT private (the sites warn)."""
    from fedcl.sim.inprocess import run_federation_inprocess

    class Progress:
        def on_start(self, **kw) -> None:
            pass

        def on_round(self, record: dict) -> None:
            if bar is not None:
                bar.set_postfix(round=record["round"], knn=f"{record.get('knn') or float('nan'):.3f}",
                                loss=f"{record.get('loss') or float('nan'):.3f}")

        def close(self) -> None:
            pass

    config = federation_config(method, cfg, split=split, seed=seed, data_root=data_root)
    flwr_log = logging.getLogger("flwr")  # Flower logs every message at INFO; warnings still show
    level = flwr_log.level
    flwr_log.setLevel(max(level, logging.WARNING))
    try:
        result = run_federation_inprocess(config, out_dir=out_dir, observer=Progress(),
                                          insecure_reproducible_dp=method.dp_epsilon is not None)
    finally:
        flwr_log.setLevel(level)
    failed = [e for r in result.history for e in r.get("errors", [])]
    if failed:
        raise RuntimeError(f"{len(failed)} site replies failed in the federation; first: {failed[0]}")
    model, _ = load_encoder(result.encoder_path)
    return model, result


def round_records(history: list[dict]) -> list[dict]:
    """The benchmark's per-round record of each round of the server's history. ``epsilon`` is the
    sites' whole ε (None when a channel has no DP bound, e.g. ``raw`` embeddings);
    ``epsilon_accounted`` the ε of their accounted channels alone (DP-SGD updates, DP releases), as the
    server's round record has them."""
    return [{"round": r["round"], "loss": r.get("loss"), "knn": r.get("knn"),
             "negatives": r.get("negatives_used"), "queue_size": r.get("queue_size"),
             "epsilon": r.get("epsilon"), "epsilon_accounted": r.get("epsilon_accounted"),
             "seconds": r.get("seconds")}
            for r in history]


def run_method(name: str, *, data: dict, cfg: dict, split: str, seed: int, data_root: Path,
               device: torch.device, bar) -> dict:
    """Train (if needed) and evaluate one method for one split and seed; returns a JSON-able dict."""
    spec = {"arch": "cnn", "in_channels": 1, "width": cfg["width"], "proj_dim": 128, "proj_hidden": 256}
    torch.manual_seed(seed)  # the initial weights the server draws for train.seed = seed
    init_state = canonical_state_dict(build_model(**spec))
    augment = TwoViewAugment(crop_scale=(cfg.get("crop_scale_min", 0.3), 1.0))
    rounds_per_epoch = cfg.get("rounds_per_epoch", 1)
    rounds = cfg["rounds"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    out: dict = {"method": name, "seed": seed}
    kind = METHODS[name]
    if kind == "pixels":
        out["metrics"] = full_eval(PixelFeatures(), data, augment=augment, device=device, seed=seed)
        out["rounds"] = []
    elif kind == "random":
        model = model_from_state(spec, init_state)
        out["metrics"] = full_eval(model, data, augment=augment, device=device, seed=seed)
        out["rounds"] = []
    elif kind == "local":
        models = run_local_only(sites=data["sites"], spec=spec, init_state=init_state, cfg=cfg, seed=seed,
                                augment=augment, device=device)
        per_site = [full_eval(m, data, augment=augment, device=device, seed=seed) for m in models]
        out["metrics"] = {k: float(np.mean([p[k] for p in per_site])) for k in per_site[0]}
        out["metrics"]["knn_worst"] = float(min(p["knn"] for p in per_site))
        out["metrics"]["linear_worst"] = float(min(p["linear"] for p in per_site))
        out["per_site"] = per_site
        out["rounds"] = []
    elif kind == "central":
        model = model_from_state(spec, init_state)
        union = torch.cat(data["sites"])
        history = []

        def on_epoch(epoch: int, loss: float) -> None:
            if epoch % cfg["local_epochs"] == 0:
                history.append({"round": epoch // cfg["local_epochs"] * rounds_per_epoch, "loss": loss,
                                "knn": knn_only(model, data, device)})
                bar.set_postfix(epoch=epoch, knn=f"{history[-1]['knn']:.3f}")

        # central SimCLR always decays its learning rate (cosine over its epochs)
        central = RoundRecipe(epochs=rounds * cfg["local_epochs"] // rounds_per_epoch,
                              batch_size=cfg["batch_size"], lr=cfg["lr"], temperature=cfg["temperature"])
        train_centralized(model, union, central, augment=augment, device=device, seed=seed, on_epoch=on_epoch,
                          progress=False)
        out["metrics"] = full_eval(model, data, augment=augment, device=device, seed=seed)
        out["rounds"] = history
    else:
        with tempfile.TemporaryDirectory(prefix=f"quality_{name}_") as tmp:
            model, res = run_federated(kind, cfg=cfg, split=split, seed=seed, data_root=data_root,
                                       out_dir=Path(tmp), bar=bar)
        out["metrics"] = full_eval(model, data, augment=augment, device=device, seed=seed)
        out["rounds"] = round_records(res.history)
        ledger = next(iter(res.ledgers.values()), None)
        if ledger:
            out["privacy"] = ledger["channels"] | {"epsilon": ledger["epsilon"]}
        out["method_settings"] = asdict(kind) | {"max_staleness": effective_staleness(kind, cfg)}
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - cpu0  # every thread of this process, the federation's included
    return out


# ------------------------------------------------------------------------------------ output

def stat(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size),
            "values": [float(v) for v in a]}  # per seed, in the order of --seeds


def aggregate(runs: list[dict]) -> dict:
    keys = [k for k in runs[0]["metrics"]]
    out = {k: stat([r["metrics"][k] for r in runs]) for k in keys}
    if runs[0]["rounds"]:
        n = min(len(r["rounds"]) for r in runs)
        out["rounds"] = [{key: (float(np.mean([r["rounds"][i][key] for r in runs]))
                                if all(r["rounds"][i].get(key) is not None for r in runs) else None)
                          for key in ("round", "knn", "loss", "drift", "epsilon", "epsilon_accounted",
                                      "negatives", "queue_size")
                          if key in runs[0]["rounds"][i]} for i in range(n)]
    if "privacy" in runs[0]:
        out["privacy"] = runs[0]["privacy"]
    out["seconds"] = stat([r["seconds"] for r in runs])
    if all("cpu_seconds" in r for r in runs):  # rows cached before CPU time was recorded lack it
        out["cpu_seconds"] = stat([r["cpu_seconds"] for r in runs])
    return out


def fmt(s: dict | None, pct: bool = True) -> str:
    if not s:
        return "–"
    seeds = "" if s.get("n", 3) >= 3 else f" (n={s['n']})"  # fewer seeds than the protocol's 3: say so
    if pct:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}{seeds}"
    return f"{s['mean']:.3f} ± {s['std']:.3f}{seeds}"


def privacy_cell(agg: dict) -> str:
    p = agg.get("privacy")
    if not p:
        return "–"
    def one(ch: dict) -> str:
        if ch["dp_protected"] is None:
            return "none"
        if ch["epsilon"] is None:
            return "not DP"
        return f"ε={ch['epsilon']:.2f}" if ch["epsilon"] > 0 else "0"
    return f"updates: {one(p['model_updates'])}; embeddings: {one(p['embeddings'])}"


def write_markdown(path: Path, result: dict) -> None:
    """The final table per split (method x metric, mean ± std over seeds). Per-round curves are
    not tabulated: they are in the JSON beside it and in its _rounds plot."""
    stem = path.with_suffix("").name
    cpu = result.get("cpu", {})
    cpu_text = (f"{cpu['hours']:.2f} h over the {cpu['runs']} runs that recorded it ({cpu['runs_without']} "
                "cached runs did not)" if cpu.get("runs") else "not recorded")
    # the drift column only where a run measured it (the former bench copy's runs; no runner writes it now)
    has_drift = any((agg.get("rounds") or [{}])[-1].get("drift") is not None
                    for methods in result["splits"].values() for agg in methods.values())
    lines = [
        f"# {result.get('title', 'Quality benchmark')}\n", f"Command: `{result['command']}`\n",
        f"Data set: {result.get('config', {}).get('dataset', {'name': 'fashion-mnist'})}. Commit: "
        f"{result.get('commit', 'unknown')}. CPU: {cpu_text}.\n",
        "Accuracies in %, mean ± std over seeds (std 0 with one seed). Lower is better for "
        "alignment and uniformity. ε at δ = 1e-5 per site; 'not DP' = channel not protected.\n",
        f"Per-round kNN, loss{', drift' if has_drift else ''} and ε of every federated method: `{stem}.json` "
        f"(`splits.<split>.<method>.rounds`), plotted in `{stem}_rounds.png` and "
        f"`{stem}_epsilon.png`.\n"]
    for split, methods in result["splits"].items():
        drift_col = "final drift | " if has_drift else ""
        lines += [f"\n## {split}\n",
                  "| method | kNN | linear | few-label (10/class) | alignment | uniformity | "
                  f"{drift_col}privacy | seconds |", "|---|---|---|---|---|---|---|---|" + "---|" * has_drift]
        for name, agg in methods.items():
            knn = fmt(agg["knn"])
            if "knn_worst" in agg:
                knn += f" (worst site {100 * agg['knn_worst']['mean']:.1f})"
            last = agg["rounds"][-1] if agg.get("rounds") else {}
            drift = "–" if last.get("drift") is None else f"{last['drift']:.3f}"
            drift = f"{drift} | " if has_drift else ""
            lines.append(f"| {name} | {knn} | {fmt(agg.get('linear'))} | {fmt(agg.get('fewlabel'))} | "
                         f"{fmt(agg.get('alignment'), False)} | {fmt(agg.get('uniformity'), False)} | "
                         f"{drift}{privacy_cell(agg)} | {agg['seconds']['mean']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


# curves with more points than this are drawn as lines alone (dots would hide them)
MAX_DOTTED = 30
# rows without rounds (raw pixels too), drawn as a horizontal line at their final kNN: (linestyle, colour)
FINAL_LINES = {"pixels": ("-.", "tab:olive"), "random": ("--", "grey"), "local": (":", "black")}


def write_plots(prefix: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = result["splits"]
    names = list(dict.fromkeys(name for methods in splits.values() for name in methods))
    # one colour per method, the same in every panel; tab10 repeats after 10 methods, so larger
    # runs take tab20 and a second line style
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    style = {name: {"color": cmap(i % cmap.N), "linestyle": "-" if i < cmap.N else "--"}
             for i, name in enumerate(names)}
    many = len(names) > 8
    fig, axes = plt.subplots(1, len(splits), figsize=((8 if many else 6) * len(splits), 4.5 if many else 4),
                             squeeze=False)
    for ax, (split, methods) in zip(axes[0], splits.items(), strict=False):
        start = [(0, 100 * methods["random"]["knn"]["mean"])] if "random" in methods else []  # round 0 = init
        for name, agg in methods.items():
            if agg.get("rounds"):
                # a round without kNN (the server's curve every --eval-every rounds) is no point
                pts = start + [(r["round"], 100 * r["knn"]) for r in agg["rounds"] if r["knn"] is not None]
                dots = {"marker": "o", "markersize": 3 if many else 6} if len(pts) <= MAX_DOTTED else {}
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, **dots, **style[name])
            elif name in FINAL_LINES:
                linestyle, color = FINAL_LINES[name]
                ax.axhline(100 * agg["knn"]["mean"], linestyle=linestyle, color=color,
                           label=f"{name} (final)")
        ax.set(title=f"{split}: kNN accuracy per round", xlabel="round (0 = initial weights)",
               ylabel="kNN accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if not ax.get_legend_handles_labels()[0]:
            pass  # nothing drawn: no legend
        elif many:  # outside the axes, so that it hides no curve
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{prefix}_rounds.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, (split, methods) in zip(axes[0], splits.items(), strict=False):
        plotted = False
        for name, agg in methods.items():
            rs = agg.get("rounds") or []
            if rs and any(r.get("epsilon") for r in rs):
                ax.plot([r["round"] for r in rs], [r["epsilon"] or 0.0 for r in rs],
                        marker="o" if len(rs) <= MAX_DOTTED else None, label=f"{name} (all DP channels)")
                plotted = True
            elif rs and any(r.get("epsilon_accounted") for r in rs):  # e.g. DP-SGD with raw embeddings
                ax.plot([r["round"] for r in rs], [r["epsilon_accounted"] or 0.0 for r in rs], linestyle="--",
                        marker="o" if len(rs) <= MAX_DOTTED else None,
                        label=f"{name} (accounted channels only; other releases have no DP bound)")
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "no DP method in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{split}: cumulative ε per site (δ = 1e-5)", xlabel="round", ylabel="ε")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7) if plotted else None
    fig.tight_layout()
    fig.savefig(f"{prefix}_epsilon.png", dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument(
        "--rounds-per-epoch", type=int, default=1,
        help="k: each round trains on 1/k of a site's images (k rounds per epoch at the same compute); "
        "--rounds x --local-epochs must be a multiple of k")
    p.add_argument(
        "--persist-optimizer", action="store_true",
        help="each site's optimizer keeps its state (Adam moments) from round to round (under DP-SGD "
        "built from noised gradients only)")
    p.add_argument("--images-per-site", type=int, default=2000)
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated")
    p.add_argument("--splits", default="pathological,dirichlet0.1", help=f"comma-separated of {list(SPLITS)}")
    p.add_argument("--methods", default=",".join(MAIN_METHODS), help=f"comma-separated of {list(METHODS)}")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--queue-temperature", type=float, default=0.1,
                   help="the frozen-key queue term's temperature (train.queue_temperature, shipped "
                   "default 0.1); equal to --temperature: the queue term at NT-Xent's, as in every "
                   "table before it")
    p.add_argument(
        "--server-momentum", type=float, default=0.0,
        help="the federated rows aggregate with Flower's FedAvgM at this server momentum "
        "(federation.strategy = \"FedAvgM\"); 0: FedAvg, as in every table before it")
    p.add_argument("--crop-scale-min", type=float, default=0.3, help="smallest random-crop area (augment)")
    p.add_argument("--num-negatives", type=int, default=4096)
    p.add_argument("--num-push", type=int, default=512)
    p.add_argument(
        "--max-staleness", type=int, default=None,
        help="queue.max_staleness of the fresh-push rows (fedcl, DP-SGD) in rounds; default: 0 (only this "
        "round's pushes). With a smaller --num-push a few rounds' pushes keep the queue's size")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--public-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--eval-every", type=int, default=1,
        help="the server's kNN curve every N rounds (and the last); at 1 it costs about as much CPU as "
        "training in the short-round recipe. Not in the cache key: the final encoder is the same")
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="the folder of the Fashion-MNIST IDX files")
    p.add_argument("--dataset", choices=["fashion-mnist", "fashion-mnist-cluttered"], default="fashion-mnist",
                   help="data.name of every run; the clutter options apply to fashion-mnist-cluttered only")
    p.add_argument("--canvas", type=int, default=40, help="clutter: canvas side, px")
    p.add_argument("--item-scale", type=float, default=1.0, help="clutter: item side / 28 px")
    p.add_argument("--clutter-patches", type=int, default=3, help="clutter: patches per image")
    p.add_argument("--clutter-patch-size", type=int, default=10, help="clutter: patch side, px")
    p.add_argument("--clutter-seed", type=int, default=0, help="clutter: the regime's draw")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--tag", default="", help="suffix of the output files, e.g. _t05 for a recipe variant")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--cached-only", action="store_true",
                   help="tabulate the finished runs in the cache only; every cell says over how many seeds")
    p.add_argument("--quick", action="store_true", help="tiny smoke run written to <out>/quick/")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.images_per_site, a.width, a.test_images, a.public_images = 2, 64, 4, 200, 64
        a.seeds, a.batch_size, a.num_push, a.num_negatives = "0", 32, 32, 128
        a.out = a.out / "quick"
    return a


def run_config(args: argparse.Namespace) -> dict:
    """Everything that decides a run's result, besides the split, method and seed."""
    cfg = {"rounds": args.rounds, "local_epochs": args.local_epochs, "images_per_site": args.images_per_site,
           "sites": args.sites, "width": args.width, "batch_size": args.batch_size, "lr": args.lr,
           "temperature": args.temperature, "num_negatives": args.num_negatives, "num_push": args.num_push,
           "crop_scale_min": args.crop_scale_min, "test_images": args.test_images,
           "public_images": args.public_images, "encoder": "cnn", "proj_dim": 128, "optimizer": "adam",
           "knn": {"k": 200, "t": 0.1}, "fewlabel_per_class": 10, "dp": {"epsilon": 8.0}, "release": RELEASE,
           "rounds_per_epoch": args.rounds_per_epoch, "persist_optimizer": args.persist_optimizer,
           "runner": RUNNER}
    if args.queue_temperature != args.temperature:  # absent when equal: rows cached before it keep their key
        cfg["queue_temperature"] = args.queue_temperature
    if args.server_momentum:  # absent for FedAvg: the cached rows keep their key
        cfg["server_momentum"] = args.server_momentum
    if args.max_staleness is not None:  # absent by default: the cached rows keep their key
        cfg["max_staleness"] = args.max_staleness
    if args.dataset != "fashion-mnist":  # absent for plain Fashion-MNIST: its cached rows keep their key
        cfg["dataset"] = {"name": args.dataset, "clutter": {
            "canvas": args.canvas, "scale": args.item_scale, "patches": args.clutter_patches,
            "patch_size": args.clutter_patch_size, "seed": args.clutter_seed}}
    return cfg


def git_commit() -> str:
    """HEAD of the checkout that ran, with '-dirty' when tracked files differ from it."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_summary(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """CPU time of the table: the sum over its runs (cached ones included) that recorded it."""
    every = [r for by_method in runs.values() for rs in by_method.values() for r in rs]
    seconds = [r["cpu_seconds"] for r in every if "cpu_seconds" in r]
    return {"seconds": float(sum(seconds)), "hours": float(sum(seconds)) / 3600, "runs": len(seconds),
            "runs_without": len(every) - len(seconds)}


def config_key(cfg: dict) -> str:
    """The cache key of a configuration (file names under <out>/cache end with it)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


# recipe fields a row does not read are left out of its key, so that changing them (the queue's
# --num-push, say) retrains only the rows they change: the queue and release settings reach only rows
# with the queue or DP-SGD on; the training recipe does not reach the untrained rows.
QUEUE_FIELDS = ("num_negatives", "num_push", "max_staleness", "public_images", "release", "dp",
                "queue_temperature")
FEDERATION_FIELDS = ("server_momentum",)  # read by the federations only
TRAINING_FIELDS = ("rounds", "local_epochs", "rounds_per_epoch", "persist_optimizer", "batch_size", "lr",
                   "temperature", "optimizer", *QUEUE_FIELDS, *FEDERATION_FIELDS)


def row_key(cfg: dict, name: str) -> str:
    """The cache key of method ``name``'s rows: ``config_key`` of the fields of ``cfg`` it reads and,
    for a federation, of the method's definition and the name of the local loss it trains with
    (``fedcl.train.loss_name``), so that a changed preset or loss does not reuse an old run."""
    from fedcl.train import loss_name

    kind = METHODS[name]
    if kind in ("pixels", "random"):
        unread: tuple[str, ...] = TRAINING_FIELDS
    elif kind in ("local", "central"):
        unread = (*QUEUE_FIELDS, *FEDERATION_FIELDS)
    elif not kind.queue and kind.dp_epsilon is None:
        unread = QUEUE_FIELDS
    else:
        unread = ()
    keyed = {k: v for k, v in cfg.items() if k not in unread}
    if isinstance(kind, FedMethod):
        loss = loss_name(key_encoder=kind.key_encoder, in_batch=kind.in_batch_negatives, queue=kind.queue)
        keyed["method"] = asdict(kind) | {"loss": loss}
    return config_key(keyed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # the probes' scikit-learn solvers use numpy's BLAS pool, which torch's setting does not reach: beside
    # other processes its idle threads spin (a pixels row beside three other processes: over 750 CPU s,
    # against 156 alone)
    threadpool_limits(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    splits = [s for s in args.splits.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    unknown = [m for m in methods if m not in METHODS] + [s for s in splits if s not in SPLITS]
    if unknown:
        print(f"unknown method or split {unknown}; methods: {list(METHODS)}; splits: {list(SPLITS)}",
              file=sys.stderr)
        return 2
    if args.rounds_per_epoch < 1 or (args.rounds * args.local_epochs) % args.rounds_per_epoch:
        print(f"--rounds x --local-epochs ({args.rounds * args.local_epochs}) must be a multiple of "
              f"--rounds-per-epoch ({args.rounds_per_epoch}) >= 1, so that central trains whole epochs",
              file=sys.stderr)
        return 2
    cfg = run_config(args)
    key = config_key(cfg)
    row_keys = {name: row_key(cfg, name) for name in methods}  # each row's cache key (its file names)
    commit = git_commit()  # at the start: the code that runs, even if the checkout moves meanwhile
    device = torch.device("cpu")
    try:
        data_src = Data(root=args.data, dataset=cfg.get("dataset"))
    except ValidationError as exc:  # a clutter option out of range: the config's own one-line reason
        reason = (
            format_validation_error(exc, source="bench/quality.py data options").splitlines()[1].strip(" -"))
        print(f"data.{reason}", file=sys.stderr)  # e.g. data.clutter: ... (the shipped config's key)
        return 2
    except DataError as exc:
        print(exc, file=sys.stderr)
        return 2
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    runs: dict[str, dict[str, list[dict]]] = {}
    # seed-major: an interrupted run still has every split and method at the first seeds
    todo = [(s, seed, m) for seed in seeds for s in splits for m in methods]
    setups: dict[tuple[str, int], dict] = {}
    bar = tqdm(todo, desc="quality", unit="run")
    for split, seed, name in bar:
        bar.set_description(f"{split} seed {seed} {name}")
        path = cache / f"{split}_{name}_seed{seed}_{row_keys[name]}.json"
        if path.exists() and not args.no_cache:
            run = json.loads(path.read_text())
        elif args.cached_only:
            tqdm.write(f"{split} seed {seed} {name}: not run (not in the cache; --cached-only)")
            continue
        else:
            if (split, seed) not in setups:
                setups[(split, seed)] = data_src.setup(
                    split=split, seed=seed, num_sites=args.sites, images_per_site=args.images_per_site,
                    test_images=args.test_images)
            run_cfg = cfg | {"threads": args.threads, "eval_every": args.eval_every}
            run = run_method(name, data=setups[(split, seed)], cfg=run_cfg, split=split, seed=seed,
                             data_root=args.data, device=device, bar=bar)
            run["eval_every"] = args.eval_every  # the server's kNN curve: a point every eval_every rounds
            run["site_sizes"] = setups[(split, seed)]["site_sizes"]
            run["site_classes"] = setups[(split, seed)]["site_classes"]
            path.write_text(json.dumps(run, indent=1))
        tqdm.write(
            f"{split} seed {seed} {name}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in run["metrics"].items())
            + f" ({run['seconds']:.0f} s)")
        runs.setdefault(split, {}).setdefault(name, []).append(run)

    if not runs:  # --cached-only with nothing cached under this key: keep the tables that are there
        print(f"no finished run in {cache} for configuration {key} (row keys {row_keys}): nothing to "
              f"tabulate, {args.out} left as it is; run without --cached-only to train them", file=sys.stderr)
        return 2
    result = {
        "command": "python "
        + " ".join(
            shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
        "commit": commit, "cpu": cpu_summary(runs),
        "config": cfg
        | {"seeds": seeds, "splits": splits, "methods": methods, "config_key": key,
           "cache_keys": row_keys, "threads": args.threads,
           "eval_every": args.eval_every, "device": str(device)},
        "splits": {
            split: {name: aggregate(rs) for name, rs in by_method.items()}
            for split, by_method in runs.items()},
        "site_classes": {
            split: next(iter(by_method.values()))[0].get("site_classes") for split, by_method in runs.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / f"quality{args.tag}"
    Path(f"{prefix}.json").write_text(json.dumps(result, indent=1))
    write_markdown(Path(f"{prefix}.md"), result)
    write_plots(prefix, result)
    print(Path(f"{prefix}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
