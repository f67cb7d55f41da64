"""An in-process federation over the fedcl library, for benchmarks of the METHOD.

N sites in one process, FedAvg of canonical state dicts weighted by num_examples, and an
in-process ``EmbeddingQueue`` advanced, pushed to and sampled from every round exactly as the
Flower path does it (DESIGN "A round"), but with no Flower, no gRPC and no processes: what
is measured is the learning method, not the transport (the Flower path is tested elsewhere).

    result = run_federation(sites=[imgs_a, imgs_b], model_spec=spec, init_state=sd,
                            method=FedMethod(queue=True), recipe=Recipe(), rounds=5, seed=0)

Negatives a site gets in round r (r = 1, 2, ...), by ``FedMethod.release``:
  raw         K embeddings pushed by the OTHER sites in rounds r - max_staleness .. r - 1
              (round 0 too with ``bootstrap_queue``), sampled uniformly from the queue; with
              ``fresh_push`` the sites push at the START of round r from the global model they
              received, so round r's own pushes are sampled too (max_staleness=0: only those);
  prototypes  the server's prototypes, merged from the sites' noisy per-prototype sums and
              counts of round r - 1 (fedcl.privacy.release), accounted in each site's ledger;
  public      the current global model's embeddings of a public reference set, computed by
              the server at the start of round r: no private embedding leaves a site.
No negatives during the first ``warmup_rounds`` rounds. Every site keeps a privacy ledger.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedcl.augment import TwoViewAugment
from fedcl.models import ContrastiveModel, build_model, load_canonical_state_dict
from fedcl.privacy.dp import DPParams, noise_for_budget
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.privacy.release import init_prototypes, merge_prototypes, release_prototypes
from fedcl.queue import EmbeddingQueue
from fedcl.train import INSECURE_REPRODUCIBLE, RoundRecipe, encode, local_round


@dataclass(frozen=True)
class FedMethod:
    """What differs between the federated methods of the benchmark."""

    queue: bool = False  # negatives from other sites (how: ``release``)
    release: Literal["raw", "prototypes", "public"] = "raw"
    key_encoder: Literal["global", "online"] = "global"  # frozen round model (fedcl) or online (FedSimCLR)
    in_batch_negatives: bool = True
    warmup_rounds: int = 1  # R0: rounds trained without queue negatives
    max_staleness: int = 2  # queue entries older than this many rounds are evicted
    num_negatives: int = 4096  # K per site and round (raw mode)
    bootstrap_queue: bool = False  # sites push embeddings of the initial model before round 1
    dp_epsilon: float | None = None  # DP-SGD spending this ε over the whole run (None: no DP-SGD)
    # raw mode: each site pushes embeddings of the global model it just received BEFORE any site
    # samples (a push phase, then a barrier, then training), so the negatives of round r come
    # from the same model as the positive keys; with max_staleness=0 only those are sampled
    fresh_push: bool = False


@dataclass(frozen=True)
class Recipe:
    """Settings shared by every method of one benchmark run."""

    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 0.2
    num_push: int = 512  # embeddings each site pushes per round (raw mode)
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    num_prototypes: int = 16
    release_noise_multiplier: float = 2.0
    release_sample_rate: float = 0.5
    prototype_min_count: float = 5.0
    # Each round trains on 1/rounds_per_epoch of a site's images (a fresh permutation every
    # rounds_per_epoch rounds), so R rounds are R/rounds_per_epoch epochs: shorter rounds, same compute.
    rounds_per_epoch: int = 1
    # each site's optimizer resumes its own state (Adam's moments and step count) from its previous
    # round instead of starting cold every round (fedcl.train.local_round optimizer_state)
    persist_optimizer: bool = False


# Recipe fields added after results were cached: they enter bench/quality.py's cache key only when
# they differ from their default, so earlier cached runs keep their keys.
LATER_RECIPE_FIELDS = ("rounds_per_epoch", "persist_optimizer")


def check_recipe(recipe: Recipe) -> None:
    if recipe.rounds_per_epoch < 1:
        raise ValueError(f"rounds_per_epoch must be >= 1, got {recipe.rounds_per_epoch}")


def epoch_order(num_images: int, order: torch.Tensor | None, r: int, rounds_per_epoch: int,
                gen: torch.Generator) -> torch.Tensor | None:
    """A site's image order for round r: a new permutation at each epoch's first round when
    rounds_per_epoch > 1 (draws nothing otherwise), else the current ``order``."""
    if rounds_per_epoch > 1 and (r - 1) % rounds_per_epoch == 0:
        return torch.randperm(num_images, generator=gen)
    return order


def round_images(images: torch.Tensor, order: torch.Tensor | None, r: int, rounds_per_epoch: int) -> torch.Tensor:
    """Round r's share of a site's images: chunk (r - 1) mod rounds_per_epoch of ``order``."""
    if rounds_per_epoch == 1:
        return images
    chunk = order.tensor_split(rounds_per_epoch)[(r - 1) % rounds_per_epoch]
    return images[chunk]


@dataclass
class FederationResult:
    model: ContrastiveModel  # the final global model
    rounds: list[dict] = field(default_factory=list)  # one record per round (see run_federation)
    ledgers: list[dict] = field(default_factory=list)  # PrivacyLedger.summary() of each site


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of canonical state dicts (McMahan et al. 2017); integer buffers from the first."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state dict, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"the weights must sum to > 0, got {list(weights)}")
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights))
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of matching rows of (N, d) a and b."""
    return float(F.cosine_similarity(a, b, dim=1).mean())


def model_from_state(spec: dict, state: dict[str, torch.Tensor]) -> ContrastiveModel:
    model = build_model(**spec)
    load_canonical_state_dict(model, state)
    return model


@functools.lru_cache(maxsize=64)  # Opacus' noise search takes seconds to minutes at large q
def dp_plan(*, num_examples: int, batch_size: int, local_epochs: int, rounds: int, epsilon: float,
            delta: float, max_grad_norm: float, rounds_per_epoch: int = 1) -> tuple[DPParams, int]:
    """(DP-SGD parameters spending ``epsilon`` at ``delta`` over all rounds, Poisson steps per round).

    With rounds_per_epoch k a round takes local_epochs / k epochs' worth of steps, each over the
    site's whole data set (as the Flower path's fedcl.client.privacy.plan_round).
    """
    sample_rate = min(1.0, batch_size / max(1, num_examples))
    steps_per_round = max(1, math.floor(local_epochs / (sample_rate * rounds_per_epoch) + 0.5))  # half up
    sigma = noise_for_budget(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                             total_steps=rounds * steps_per_round)
    return DPParams(noise_multiplier=sigma, max_grad_norm=max_grad_norm, sample_rate=sample_rate), steps_per_round


def run_local_round(model: ContrastiveModel, images: torch.Tensor, *, negatives: torch.Tensor | None,
                    method: FedMethod, recipe: Recipe, augment: TwoViewAugment, num_push: int,
                    device: torch.device, seed: int, dp: DPParams | None,
                    optimizer_state: dict | None = None, dp_steps: int | None = None):
    round_recipe = RoundRecipe(epochs=recipe.local_epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                               temperature=recipe.temperature, key_encoder=method.key_encoder,
                               in_batch_negatives=method.in_batch_negatives, num_push=num_push)
    return local_round(model, images, negatives, round_recipe, augment=augment, dp=dp, dp_steps=dp_steps,
                       optimizer_state=optimizer_state, seed=seed, device=device,
                       # published numbers reproduce: the DP draws come from `seed` (NOT private; local_round warns)
                       dp_generator=INSECURE_REPRODUCIBLE if dp is not None else None)


def run_federation(
    *,
    sites: Sequence[torch.Tensor],
    model_spec: dict,
    init_state: dict[str, torch.Tensor],
    method: FedMethod,
    recipe: Recipe,
    rounds: int,
    seed: int,
    augment: TwoViewAugment | None = None,
    public_images: torch.Tensor | None = None,
    probe_images: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    on_round: Callable[[int, ContrastiveModel, dict], None] | None = None,
) -> FederationResult:
    """FedAvg over ``sites`` (uint8 (N_i, C, H, W) each) for ``rounds`` rounds.

    Each round record holds: round, loss (mean over sites), negatives (mean per site), queue_size,
    epsilon (max over sites of the cumulative ε at δ, all DP channels), epsilon_updates and
    epsilon_embeddings (per channel; None = not DP-protected), drift (mean cosine between the
    probe embeddings of the model versions still in the queue and the new global model's
    re-encoding of the same probe images; 1 = no drift) and seconds. ``on_round`` sees the new
    global model after aggregation.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not sites or any(s.shape[0] == 0 for s in sites):
        raise ValueError("every site needs at least one image")
    if method.queue and method.release == "public" and (public_images is None or public_images.shape[0] == 0):
        raise ValueError("release='public' needs public_images: a reference set disjoint from the sites")
    if method.dp_epsilon is not None and method.in_batch_negatives:
        raise ValueError("DP-SGD needs in_batch_negatives=False")
    if method.fresh_push and not (method.queue and method.release == "raw"):
        raise ValueError("fresh_push applies to the raw queue only: set queue=True, release='raw'")
    check_recipe(recipe)
    device = torch.device(device)
    augment = augment or TwoViewAugment()
    names = [f"site-{i}" for i in range(len(sites))]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    global_model = model_from_state(model_spec, init_state)
    dim = model_spec["proj_dim"]

    queue = None
    if method.queue and method.release == "raw":
        per_site = recipe.num_push * (method.max_staleness + 2)
        queue = EmbeddingQueue(dim=dim, capacity=per_site * len(sites), per_site_quota=per_site,
                               max_staleness=method.max_staleness, dtype="float32", sites=set(names))
    prototypes = init_prototypes(num=recipe.num_prototypes, dim=dim, seed=seed) if method.release == "prototypes" else None
    have_prototypes = False
    ledgers = [PrivacyLedger(site_id=n, delta=recipe.delta, epsilon_budget=None) for n in names]
    dps: list[DPParams | None] = [None] * len(sites)
    dp_steps: list[int | None] = [None] * len(sites)
    if method.dp_epsilon is not None:  # every DP step Poisson-samples a whole site; k shortens rounds
        plans = [dp_plan(num_examples=s.shape[0], batch_size=recipe.batch_size, local_epochs=recipe.local_epochs,
                         rounds=rounds, epsilon=method.dp_epsilon, delta=recipe.delta,
                         max_grad_norm=recipe.max_grad_norm, rounds_per_epoch=recipe.rounds_per_epoch)
                 for s in sites]
        dps, dp_steps = [p for p, _ in plans], [n for _, n in plans]
    probes: dict[int, torch.Tensor] = {}  # round whose pushes it makes -> probe embeddings (P, d)

    if queue is not None and method.bootstrap_queue:  # round 0: pushes of the initial model
        for name, images in zip(names, sites):
            pick = torch.randperm(images.shape[0], generator=gen)[:recipe.num_push]
            emb = encode(global_model, images[pick], device=device, augment=augment, generator=gen)
            queue.push(emb.numpy(), site_id=name, round=0, model_version=0)
            ledgers[names.index(name)].record_release(mode="raw", round=0, count=int(emb.shape[0]))
    if probe_images is not None:
        probes[1] = encode(global_model, probe_images, device=device)  # round 1's pushes come from init

    records = []
    orders: list[torch.Tensor | None] = [None] * len(sites)  # each site's image order of the current epoch
    opt_states: list[dict | None] = [None] * len(sites)  # recipe.persist_optimizer
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        orders = [epoch_order(s.shape[0], o, r, recipe.rounds_per_epoch, gen) for s, o in zip(sites, orders)]
        use_negatives = method.queue and r > method.warmup_rounds
        evicted = queue.advance(r) if queue is not None else 0
        shared = None
        if use_negatives and method.release == "public":
            shared = encode(global_model, public_images, device=device, augment=augment, generator=gen)
            shared = shared[:method.num_negatives]
        elif use_negatives and method.release == "prototypes" and have_prototypes:
            shared = prototypes.clone()
        global_state = {k: v.clone() for k, v in global_model.state_dict().items()}

        if queue is not None and method.fresh_push and use_negatives:  # push phase, then a barrier
            for i, (name, images) in enumerate(zip(names, sites)):
                pick = torch.randperm(images.shape[0], generator=gen)[:recipe.num_push]
                emb = encode(global_model, images[pick], device=device, augment=augment, generator=gen)
                queue.push(emb.numpy(), site_id=name, round=r, model_version=r - 1)
                ledgers[i].record_release(mode="raw", round=r, count=int(emb.shape[0]))

        # Every site fetches its negatives at the start of the round, before any site pushes
        # (sites train in parallel in a real federation).
        fetched = [shared] * len(sites)
        if use_negatives and queue is not None:
            for i, name in enumerate(names):
                s = queue.sample(method.num_negatives, exclude_site=name, max_age=method.max_staleness, rng=rng)
                assert name not in s.site_ids  # a site's own entries would be false negatives
                fetched[i] = torch.from_numpy(s.embeddings) if len(s) else None

        states, weights, losses, negs, releases = [], [], [], [], []
        for i, (name, site_images) in enumerate(zip(names, sites)):
            negatives = fetched[i]
            images = site_images if dps[i] is not None else round_images(
                site_images, orders[i], r, recipe.rounds_per_epoch)
            n = images.shape[0]
            num_push = 0
            if method.queue and method.release == "raw" and not method.fresh_push:
                num_push = recipe.num_push
            elif method.queue and method.release == "prototypes":
                num_push = n  # every image is a candidate record; the release Poisson-samples them
            model = model_from_state(model_spec, global_state)
            res = run_local_round(model, images, negatives=negatives, method=method, recipe=recipe, augment=augment,
                                  num_push=num_push, device=device, seed=seed * 100_003 + r * 101 + i, dp=dps[i],
                                  optimizer_state=opt_states[i], dp_steps=dp_steps[i])
            if recipe.persist_optimizer:
                opt_states[i] = res.optimizer_state
            if dps[i] is not None:
                ledgers[i].record_dpsgd(noise_multiplier=dps[i].noise_multiplier, sample_rate=dps[i].sample_rate,
                                        steps=int(res.metrics["steps"]), round=r)
            else:
                ledgers[i].record_nonprivate_update(round=r)
            if queue is not None and res.embeddings.shape[0] > 0:
                queue.push(res.embeddings.numpy(), site_id=name, round=r, model_version=r)
                ledgers[i].record_release(mode="raw", round=r, count=int(res.embeddings.shape[0]))
            elif method.queue and method.release == "prototypes":
                releases.append(release_prototypes(
                    res.embeddings, prototypes, noise_multiplier=recipe.release_noise_multiplier,
                    sample_rate=recipe.release_sample_rate, generator=gen))
                ledgers[i].record_release(mode="prototypes", round=r, noise_multiplier=recipe.release_noise_multiplier,
                                          sample_rate=recipe.release_sample_rate)
            elif method.queue and method.release == "public" and r > method.warmup_rounds:
                ledgers[i].record_release(mode="public", round=r)
            states.append(res.state)
            weights.append(res.metrics["num_examples"])
            losses.append(res.metrics["loss"])
            negs.append(res.metrics["negatives_used"])

        if releases:  # post-processing of DP releases: no ε
            prototypes = merge_prototypes(releases, previous=prototypes, min_count=recipe.prototype_min_count)
            have_prototypes = True
        global_model = model_from_state(model_spec, fedavg(states, weights))

        drift = None
        if probe_images is not None:
            now = encode(global_model, probe_images, device=device)
            # versions whose pushes the queue still holds in round r + 1 (at least the last one)
            kept = [v for v in probes if v >= r + 1 - max(1, method.max_staleness)]
            drift = float(np.mean([mean_cosine(probes[v], now) for v in kept])) if kept else None
            probes = {v: probes[v] for v in kept}
            probes[r + 1] = now  # pushes of round r + 1 come from this model
        summaries = [led.channels() for led in ledgers]
        eps_updates = [c["model_updates"]["epsilon"] for c in summaries]
        eps_emb = [c["embeddings"]["epsilon"] for c in summaries]
        record = {
            "round": r,
            "loss": float(np.nanmean(losses)) if not all(math.isnan(x) for x in losses) else float("nan"),
            "negatives": float(np.mean(negs)),
            "queue_size": len(queue) if queue is not None else (int(shared.shape[0]) if shared is not None else 0),
            "evicted": int(evicted),
            "epsilon": max(led.epsilon() for led in ledgers),
            "epsilon_updates": None if any(e is None for e in eps_updates) else max(eps_updates),
            "epsilon_embeddings": None if any(e is None for e in eps_emb) else max(eps_emb),
            "drift": drift,
            "seconds": time.perf_counter() - t0,
        }
        records.append(record)
        if on_round is not None:
            on_round(r, global_model, record)
    return FederationResult(model=global_model, rounds=records, ledgers=[led.summary() for led in ledgers])


def run_local_only(
    *,
    sites: Sequence[torch.Tensor],
    model_spec: dict,
    init_state: dict[str, torch.Tensor],
    recipe: Recipe,
    rounds: int,
    seed: int,
    augment: TwoViewAugment | None = None,
    device: torch.device | str = "cpu",
) -> list[ContrastiveModel]:
    """Each site alone: the FedSimCLR recipe for the same rounds x local epochs, never averaged."""
    check_recipe(recipe)
    augment = augment or TwoViewAugment()
    method = FedMethod(queue=False, key_encoder="online", in_batch_negatives=True)
    gen = torch.Generator().manual_seed(seed)
    models = []
    for i, site_images in enumerate(sites):
        model = model_from_state(model_spec, init_state)
        order = None
        opt_state = None
        for r in range(1, rounds + 1):
            order = epoch_order(site_images.shape[0], order, r, recipe.rounds_per_epoch, gen)
            images = round_images(site_images, order, r, recipe.rounds_per_epoch)
            res = run_local_round(model, images, negatives=None, method=method, recipe=recipe, augment=augment,
                                  num_push=0, device=torch.device(device), seed=seed * 100_003 + r * 101 + i,
                                  dp=None, optimizer_state=opt_state)
            opt_state = res.optimizer_state if recipe.persist_optimizer else None
        models.append(model)
    return models


def method_dict(method: FedMethod) -> dict:
    return asdict(method)
