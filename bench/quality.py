"""Representation quality of fedcl against its baselines on non-IID Fashion-MNIST.

    python bench/quality.py --quick                       # smoke run, a minute
    python bench/quality.py --splits pathological --seeds 0 --rounds 6 --images-per-site 1000 \
        --width 16 --methods random,fedsimclr,fedcl,fedcl_noqueue,central

Every method starts from the same initial weights (per seed), uses the same encoder, recipe and
total compute (rounds x local epochs x images: central trains rounds x local_epochs epochs on
the union of the sites' images; with --rounds-per-epoch k each round trains on 1/k of a site's
images and central trains rounds x local_epochs / k epochs). Encoders are judged frozen (DESIGN "Evaluation protocol"):
kNN (k = 200, t = 0.1) with the union of the sites' labelled training images as feature bank,
linear probe, few-label probe (10 per class) on the same bank, alignment and uniformity on a
Fashion-MNIST test subset. A public reference set (for ``fedcl_public``) is held out of the
TRAIN split, disjoint from the sites. Results per (split, method, seed) are cached under
``<out>/cache`` keyed by the configuration, so reruns and added methods reuse finished work.

Writes <out>/quality<tag>.json, quality<tag>.md, quality<tag>_rounds.png, quality<tag>_epsilon.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tqdm.auto import tqdm  # noqa: E402

from bench.fedsim import (  # noqa: E402
    LATER_RECIPE_FIELDS, FedMethod, Recipe, model_from_state, run_federation, run_local_only)
from fedcl.augment import TwoViewAugment  # noqa: E402
from fedcl.data import load_fashion_mnist, partition  # noqa: E402
from fedcl.evaluate import evaluate_encoder, extract_features, knn_accuracy  # noqa: E402
from fedcl.models import build_model, canonical_state_dict  # noqa: E402
from fedcl.train import RoundRecipe, train_centralized  # noqa: E402

# The methods of the tables in docs/benchmarks.md. "random", "local" and "central" are not
# federations. Probes that lost are described in research/ with the commit that still registers them.
METHODS: dict[str, FedMethod | str] = {
    "random": "random",
    "local": "local",
    "fedsimclr": FedMethod(queue=False, key_encoder="online", in_batch_negatives=True),
    # fedcl as the Flower path runs it by default: fresh push (sites push embeddings of the global
    # model they just received, before anyone trains), only this round's entries, one warm-up round
    "fedcl": FedMethod(queue=True, release="raw", key_encoder="global", fresh_push=True, max_staleness=0),
    "fedcl_noqueue": FedMethod(queue=False, key_encoder="global"),
    # DP-SGD has no in-batch negatives, so no warm-up: the release phase fills the queue in round 1
    "fedcl_dp8": FedMethod(queue=True, release="raw", fresh_push=True, max_staleness=0, in_batch_negatives=False,
                           dp_epsilon=8.0, warmup_rounds=0),
    "fedcl_prototypes": FedMethod(queue=True, release="prototypes"),
    "fedcl_public": FedMethod(queue=True, release="public"),
    "central": "central",
}
MAIN_METHODS = ["random", "local", "fedsimclr", "fedcl", "fedcl_noqueue", "fedcl_dp8", "fedcl_prototypes",
                "fedcl_public", "central"]
SPLITS = {"pathological": {"scheme": "pathological", "classes_per_site": 2},
          "pathological1": {"scheme": "pathological", "classes_per_site": 1},
          "dirichlet0.1": {"scheme": "dirichlet", "alpha": 0.1},
          "dirichlet0.5": {"scheme": "dirichlet", "alpha": 0.5}, "iid": {"scheme": "iid"}}
METRICS = ["knn", "linear", "fewlabel", "alignment", "uniformity"]


# ------------------------------------------------------------------------------------- data

class Data:
    """Fashion-MNIST loaded once; per (split, seed) site partitions, bank, test and public sets."""

    def __init__(self, *, root: Path) -> None:
        self.train = load_fashion_mnist(root=root, split="train")
        self.test = load_fashion_mnist(root=root, split="test")

    def setup(self, *, split: str, seed: int, num_sites: int, images_per_site: int, public_images: int,
              test_images: int, probe_images: int) -> dict:
        g = torch.Generator().manual_seed(10_000 + seed)
        perm = torch.randperm(len(self.train), generator=g)
        public_idx, pool = perm[:public_images], perm[public_images:]  # public: disjoint from every site
        parts = partition(self.train.labels[pool].numpy(), num_sites=num_sites, seed=seed, **SPLITS[split])
        sites, site_labels = [], []
        for part in parts:
            idx = pool[torch.from_numpy(part)]
            idx = idx[torch.randperm(idx.shape[0], generator=g)[:images_per_site]]
            sites.append(self.train.images[idx])
            site_labels.append(self.train.labels[idx])
        bank_images, bank_labels = torch.cat(sites), torch.cat(site_labels)
        test_idx = torch.randperm(len(self.test), generator=g)[:test_images]
        probe_idx = torch.randperm(bank_images.shape[0], generator=g)[:probe_images]
        return {
            "sites": sites, "site_labels": site_labels, "bank_images": bank_images, "bank_labels": bank_labels,
            "test_images": self.test.images[test_idx], "test_labels": self.test.labels[test_idx],
            "public_images": self.train.images[public_idx], "probe_images": bank_images[probe_idx],
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


def run_method(name: str, *, data: dict, cfg: dict, seed: int, device: torch.device, bar) -> dict:
    """Train (if needed) and evaluate one method for one split and seed; returns a JSON-able dict."""
    spec = {"arch": "cnn", "in_channels": 1, "width": cfg["width"], "proj_dim": 128, "proj_hidden": 256}
    torch.manual_seed(seed)
    init_state = canonical_state_dict(build_model(**spec))
    augment = TwoViewAugment(crop_scale=(cfg.get("crop_scale_min", 0.3), 1.0))
    recipe = Recipe(local_epochs=cfg["local_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                    temperature=cfg["temperature"], num_push=cfg["num_push"],
                    rounds_per_epoch=cfg.get("rounds_per_epoch", 1), persist_optimizer=cfg.get("persist_optimizer", False))
    rounds = cfg["rounds"]
    t0 = time.perf_counter()
    out: dict = {"method": name, "seed": seed}
    kind = METHODS[name]
    if kind == "random":
        model = model_from_state(spec, init_state)
        out["metrics"] = full_eval(model, data, augment=augment, device=device, seed=seed)
        out["rounds"] = []
    elif kind == "local":
        models = run_local_only(sites=data["sites"], model_spec=spec, init_state=init_state, recipe=recipe,
                                rounds=rounds, seed=seed, augment=augment, device=device)
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
                history.append({"round": epoch // cfg["local_epochs"] * recipe.rounds_per_epoch, "loss": loss,
                                "knn": knn_only(model, data, device)})
                bar.set_postfix(epoch=epoch, knn=f"{history[-1]['knn']:.3f}")

        # central SimCLR always decays its learning rate (cosine over its epochs)
        central = RoundRecipe(epochs=rounds * cfg["local_epochs"] // recipe.rounds_per_epoch,
                              batch_size=cfg["batch_size"], lr=cfg["lr"], temperature=cfg["temperature"])
        train_centralized(model, union, central, augment=augment, device=device, seed=seed, on_epoch=on_epoch,
                          progress=False)
        out["metrics"] = full_eval(model, data, augment=augment, device=device, seed=seed)
        out["rounds"] = history
    else:
        method = replace(kind, num_negatives=cfg["num_negatives"])

        def on_round(r: int, model, record: dict) -> None:
            record["knn"] = knn_only(model, data, device)
            bar.set_postfix(round=r, knn=f"{record['knn']:.3f}", loss=f"{record['loss']:.3f}")

        res = run_federation(sites=data["sites"], model_spec=spec, init_state=init_state, method=method, recipe=recipe,
                             rounds=rounds, seed=seed, augment=augment, public_images=data["public_images"],
                             probe_images=data["probe_images"], device=device, on_round=on_round)
        out["metrics"] = full_eval(res.model, data, augment=augment, device=device, seed=seed)
        out["rounds"] = res.rounds
        out["privacy"] = res.ledgers[0]["channels"] | {"epsilon": res.ledgers[0]["epsilon"]}
        out["method_settings"] = asdict(method)
    out["seconds"] = time.perf_counter() - t0
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
                          for key in ("round", "knn", "loss", "drift", "epsilon", "epsilon_updates",
                                      "epsilon_embeddings", "negatives", "queue_size")
                          if key in runs[0]["rounds"][i]} for i in range(n)]
    if "privacy" in runs[0]:
        out["privacy"] = runs[0]["privacy"]
    out["seconds"] = stat([r["seconds"] for r in runs])
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
    lines = ["# Quality benchmark\n", f"Command: `{result['command']}`\n",
             "Accuracies in %, mean ± std over seeds (std 0 with one seed). Lower is better for "
             "alignment and uniformity. ε at δ = 1e-5 per site; 'not DP' = channel not protected.\n",
             f"Per-round kNN, loss, drift and ε of every federated method: `{stem}.json` "
             f"(`splits.<split>.<method>.rounds`), plotted in `{stem}_rounds.png` and "
             f"`{stem}_epsilon.png`.\n"]
    for split, methods in result["splits"].items():
        lines += [f"\n## {split}\n",
                  "| method | kNN | linear | few-label (10/class) | alignment | uniformity | "
                  "final drift | privacy | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for name, agg in methods.items():
            knn = fmt(agg["knn"])
            if "knn_worst" in agg:
                knn += f" (worst site {100 * agg['knn_worst']['mean']:.1f})"
            last = agg["rounds"][-1] if agg.get("rounds") else {}
            drift = "–" if last.get("drift") is None else f"{last['drift']:.3f}"
            lines.append(f"| {name} | {knn} | {fmt(agg.get('linear'))} | {fmt(agg.get('fewlabel'))} | "
                         f"{fmt(agg.get('alignment'), False)} | {fmt(agg.get('uniformity'), False)} | "
                         f"{drift} | {privacy_cell(agg)} | {agg['seconds']['mean']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


# curves with more points than this are drawn as lines alone (dots would hide them)
MAX_DOTTED = 30
# methods without rounds, drawn as a horizontal line at their final kNN: (linestyle, colour)
FINAL_LINES = {"random": ("--", "grey"), "local": (":", "black")}


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
    for ax, (split, methods) in zip(axes[0], splits.items()):
        start = [(0, 100 * methods["random"]["knn"]["mean"])] if "random" in methods else []  # round 0 = init
        for name, agg in methods.items():
            if agg.get("rounds"):
                pts = start + [(r["round"], 100 * r["knn"]) for r in agg["rounds"]]
                dots = {"marker": "o", "markersize": 3 if many else 6} if len(pts) <= MAX_DOTTED else {}
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, **dots, **style[name])
            elif name in FINAL_LINES:
                linestyle, color = FINAL_LINES[name]
                ax.axhline(100 * agg["knn"]["mean"], linestyle=linestyle, color=color, label=f"{name} (final)")
        ax.set(title=f"{split}: kNN accuracy per round", xlabel="round (0 = initial weights)", ylabel="kNN accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if many:  # outside the axes, so that it hides no curve
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{prefix}_rounds.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, (split, methods) in zip(axes[0], splits.items()):
        plotted = False
        for name, agg in methods.items():
            rs = agg.get("rounds") or []
            if rs and any(r.get("epsilon") for r in rs):
                ax.plot([r["round"] for r in rs], [r["epsilon"] or 0.0 for r in rs],
                        marker="o" if len(rs) <= MAX_DOTTED else None, label=f"{name} (all DP channels)")
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
    p.add_argument("--rounds-per-epoch", type=int, default=1,
                   help="k: each round trains on 1/k of a site's images (k rounds per epoch at the same compute); "
                        "--rounds x --local-epochs must be a multiple of k")
    p.add_argument("--persist-optimizer", action="store_true",
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
    p.add_argument("--crop-scale-min", type=float, default=0.3, help="smallest random-crop area (augment)")
    p.add_argument("--num-negatives", type=int, default=4096)
    p.add_argument("--num-push", type=int, default=512)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--public-images", type=int, default=1000)
    p.add_argument("--probe-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--tag", default="", help="suffix of the output files, e.g. _t05 for a recipe variant")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--cached-only", action="store_true",
                   help="tabulate the finished runs in the cache only; every cell says over how many seeds")
    p.add_argument("--quick", action="store_true", help="tiny smoke run written to <out>/quick/")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.images_per_site, a.width, a.test_images, a.public_images = 2, 64, 4, 200, 64
        a.seeds, a.batch_size, a.num_push, a.probe_images, a.num_negatives = "0", 32, 32, 32, 128
        a.out = a.out / "quick"
    return a


def run_config(args: argparse.Namespace) -> dict:
    """Everything that decides a run's result, besides the split, method and seed."""
    cfg = {"rounds": args.rounds, "local_epochs": args.local_epochs, "images_per_site": args.images_per_site,
           "sites": args.sites, "width": args.width, "batch_size": args.batch_size, "lr": args.lr,
           "temperature": args.temperature, "num_negatives": args.num_negatives, "num_push": args.num_push,
           "crop_scale_min": args.crop_scale_min, "test_images": args.test_images, "public_images": args.public_images,
           "probe_images": args.probe_images, "encoder": "cnn", "proj_dim": 128, "optimizer": "adam",
           "knn": {"k": 200, "t": 0.1}, "fewlabel_per_class": 10,
           "dp": {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0},
           "release": {k: v for k, v in asdict(Recipe()).items() if k not in LATER_RECIPE_FIELDS}}
    for name, value in (("rounds_per_epoch", args.rounds_per_epoch), ("persist_optimizer", args.persist_optimizer)):
        if value != getattr(Recipe(), name):  # keys of runs cached before these fields existed stay valid
            cfg[name] = value
    return cfg


def config_key(cfg: dict) -> str:
    """The cache key of a configuration (file names under <out>/cache end with it)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    splits = [s for s in args.splits.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    unknown = [m for m in methods if m not in METHODS] + [s for s in splits if s not in SPLITS]
    if unknown:
        print(f"unknown method or split {unknown}; methods: {list(METHODS)}; splits: {list(SPLITS)}", file=sys.stderr)
        return 2
    if args.rounds_per_epoch < 1 or (args.rounds * args.local_epochs) % args.rounds_per_epoch:
        print(f"--rounds x --local-epochs ({args.rounds * args.local_epochs}) must be a multiple of "
              f"--rounds-per-epoch ({args.rounds_per_epoch}) >= 1, so that central trains whole epochs",
              file=sys.stderr)
        return 2
    cfg = run_config(args)
    key = config_key(cfg)
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    data_src = Data(root=args.data)

    runs: dict[str, dict[str, list[dict]]] = {}
    # seed-major: an interrupted run still has every split and method at the first seeds
    todo = [(s, seed, m) for seed in seeds for s in splits for m in methods]
    setups: dict[tuple[str, int], dict] = {}
    bar = tqdm(todo, desc="quality", unit="run")
    for split, seed, name in bar:
        bar.set_description(f"{split} seed {seed} {name}")
        path = cache / f"{split}_{name}_seed{seed}_{key}.json"
        if path.exists() and not args.no_cache:
            run = json.loads(path.read_text())
        elif args.cached_only:
            tqdm.write(f"{split} seed {seed} {name}: not run (not in the cache; --cached-only)")
            continue
        else:
            if (split, seed) not in setups:
                setups[(split, seed)] = data_src.setup(
                    split=split, seed=seed, num_sites=args.sites, images_per_site=args.images_per_site,
                    public_images=args.public_images, test_images=args.test_images, probe_images=args.probe_images)
            run = run_method(name, data=setups[(split, seed)], cfg=cfg, seed=seed, device=device, bar=bar)
            run["site_sizes"] = setups[(split, seed)]["site_sizes"]
            run["site_classes"] = setups[(split, seed)]["site_classes"]
            path.write_text(json.dumps(run, indent=1))
        tqdm.write(f"{split} seed {seed} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in run["metrics"].items())
                   + f" ({run['seconds']:.0f} s)")
        runs.setdefault(split, {}).setdefault(name, []).append(run)

    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
        "config": cfg | {"seeds": seeds, "splits": splits, "methods": methods, "config_key": key,
                         "threads": args.threads, "device": str(device)},
        "splits": {split: {name: aggregate(rs) for name, rs in by_method.items()} for split, by_method in runs.items()},
        "site_classes": {split: next(iter(by_method.values()))[0].get("site_classes") for split, by_method in runs.items()},
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
