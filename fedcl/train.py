"""One site's local round, and centralized SimCLR training, as plain functions.

A round: the global weights and K detached negatives from the queue come in; the local model
trains on two augmented views per image; trained weights, embeddings to share and metrics go
out. The loss (``contrastive_loss``) is SimCLR's NT-Xent on the two views plus a queue term whose
keys follow MoCo (He et al. 2020) with the round's global model as the slowly moving key encoder:
query = local model(view a), key = frozen global model(view b), negatives = the queue, whose
entries come from the same frozen model, so every key the queue term sees lives in a global
model's space at most ``max_staleness`` rounds old. Under DP-SGD (no in-batch negatives) the loss
is the queue term alone. ``key_encoder="online"`` with in-batch negatives and no queue is
FedSimCLR (SimCLR's NT-Xent under FedAvg), the baseline.

Ideas that were measured and lost (drift compensation, a relational term, online and own
negatives, EMA keys, a predictor, MoCHi hard negatives) are described in ``research/``, each with
its result and the commit that still has its code. A separate queue temperature lost on plain
Fashion-MNIST and won in the cluttered regime: it is ``RoundRecipe.queue_temperature``.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from fedcl.augment import TwoViewAugment
from fedcl.losses import info_nce, nt_xent
from fedcl.models import canonical_state_dict


@dataclass(frozen=True)
class RoundRecipe:
    """How a site trains in one round: the settings that travel together."""

    epochs: int = 1  # local epochs (non-DP); under DP-SGD the default number of Poisson steps is epochs / q
    batch_size: int = 256  # non-DP batch; DP-SGD's expected batch is sample_rate x images
    lr: float = 3e-4
    temperature: float = 0.2  # NT-Xent's (and the online-key loss's)
    queue_temperature: float = 0.1  # the frozen-key queue term's: its positive and the queue's negatives
    key_encoder: Literal["global", "online"] = "global"  # queue term's keys: frozen round model or online
    in_batch_negatives: bool = True  # NT-Xent over the batch besides the queue term (not under DP-SGD)
    num_push: int = 512  # embeddings of the round model to return for the queue (0: none)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-6

    def __post_init__(self) -> None:
        if self.key_encoder not in ("global", "online"):
            raise ValueError(f"key_encoder must be 'global' or 'online', got {self.key_encoder!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use 'adam' or 'sgd'")
        if self.epochs < 1 or self.batch_size < 1 or self.num_push < 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and num_push >= 0, got {self.epochs}, "
                             f"{self.batch_size} and {self.num_push}")
        if not (self.lr > 0 and self.temperature > 0 and self.queue_temperature > 0):
            raise ValueError(f"lr, temperature and queue_temperature must be > 0, got {self.lr}, "
                             f"{self.temperature} and {self.queue_temperature}")


@dataclass
class LocalRoundResult:
    state: dict[str, torch.Tensor]  # canonical state dict, CPU
    embeddings: torch.Tensor  # (M, d) float32 unit norm, from the round's global model
    metrics: dict[str, float] = field(default_factory=dict)
    # the optimizer's state_dict after the round (moments, step counts), to carry into the site's next round
    optimizer_state: dict | None = None


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def make_optimizer(params, *, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'adam' or 'sgd'")


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # uint8 (B, C, H, W) -> float in [0, 1] on the device
    return images.to(device, non_blocking=True).float().div_(255.0)


def loss_name(*, key_encoder: str, in_batch: bool, queue: bool) -> str:
    """The name of the loss ``contrastive_loss`` computes with these settings (for records and keys).
    ``contrastive_loss`` branches on this name, so the two cannot drift apart."""
    if in_batch and (key_encoder == "global" or not queue):
        return "nt-xent + frozen-key queue term" if key_encoder == "global" and queue else "nt-xent"
    if key_encoder == "global":
        return "frozen-key queue term"
    return "online-key infonce" + (" + queue" if queue else "")


def contrastive_loss(
    model: nn.Module, key_model: nn.Module | None, v1: torch.Tensor, v2: torch.Tensor, *,
    negatives: torch.Tensor | None, temperature: float, in_batch: bool,
    queue_temperature: float | None = None,
) -> torch.Tensor:
    """The local loss for a batch of view pairs v1, v2 (B, C, H, W).

    key_model: the frozen round model (keys detached), or None for online keys.
    negatives: (K, d) detached queue entries or None.
    temperature: NT-Xent's and the online-key loss's; queue_temperature: the frozen-key queue term's
    (None: ``temperature``).

    - Frozen keys with in-batch negatives (fedcl): SimCLR's NT-Xent on the trained model's two
      views (in-batch negatives, gradients through both views) plus the queue term, the symmetric
      InfoNCE of each view's query against the frozen model's key of the other view, with the
      queue's entries as its only negatives. Without queue negatives (warm-up, queue off) it is
      NT-Xent alone. The queue term's positive is frozen because its negatives are: online keys
      against the queue crowd the embeddings (``research/online-keys/``).
    - Frozen keys without in-batch negatives (DP-SGD): the queue term alone, so one example's loss
      depends on no other example of the batch.
    - Online keys: the symmetric InfoNCE with the online view as the positive; with in-batch
      negatives and no queue this is NT-Xent (FedSimCLR).

    The two views go through ``model`` in two forward calls, so that under Opacus each example's
    per-sample gradient collects both of its views (a stacked 2B batch would be clipped per view).
    """
    name = loss_name(key_encoder="online" if key_model is None else "global", in_batch=in_batch,
                     queue=negatives is not None and negatives.shape[0] > 0)
    tq = temperature if queue_temperature is None else queue_temperature
    q1, q2 = model(v1), model(v2)  # (B, d) each
    if name.startswith("nt-xent"):
        loss = nt_xent(q1, q2, temperature=temperature)
        if name == "nt-xent":
            return loss
        with torch.no_grad():  # detached: the queue term's keys come from the frozen round model
            k1, k2 = key_model(v1), key_model(v2)  # (B, d) each
        return loss + 0.5 * (info_nce(q1, k2, negatives, temperature=tq)
                             + info_nce(q2, k1, negatives, temperature=tq))
    if key_model is not None:
        with torch.no_grad():  # detached: keys come from the frozen round model
            k1, k2 = key_model(v1), key_model(v2)  # (B, d) each
    else:
        k1, k2 = q1, q2
    t = tq if key_model is not None else temperature  # the frozen-key queue term alone (DP-SGD)
    loss_a = info_nce(q1, k2, negatives, temperature=t, in_batch=in_batch)
    loss_b = info_nce(q2, k1, negatives, temperature=t, in_batch=in_batch)
    return 0.5 * (loss_a + loss_b)


@torch.no_grad()
def encode(
    model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 1024,
    augment: TwoViewAugment | None = None, generator: torch.Generator | None = None, projected: bool = True,
) -> torch.Tensor:
    """Embeddings (N, d) of uint8 images; projected=True gives the unit-norm head output."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = _to_float(images[start:start + batch_size], device)
        if augment is not None:
            x = augment(x, generator=generator)
        out.append((model(x) if projected else model.features(x)).float().cpu())
    model.train(was_training)
    if not out:
        dim = model.head[-1].out_features if projected else model.feat_dim
        return torch.zeros(0, dim)
    return torch.cat(out)


def _generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, augmentation) generators of a round, both from ``seed``.

    sampling (CPU): the batch order, DP-SGD's Poisson sampling and the images picked to push;
    augmentation: the views (on CUDA its own device generator, on CPU the same one).
    """
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1) if device.type == "cuda" else gen
    return gen, aug_gen


INSECURE_REPRODUCIBLE = "insecure-reproducible"  # dp_generator value: the old public streams, NOT private


def _dp_randomness(dp_generator, *, dp, public: torch.Generator,
                   device: torch.device) -> tuple[torch.Generator, torch.Generator | None, bool]:
    """(generator of DP-SGD's Poisson batches and the push pick, DP-SGD noise generator, Opacus secure_mode).

    dp_generator None: a fresh secret (OS entropy, ``fedcl.privacy.randomness``) when DP-SGD runs,
    else the public ``public`` stream; a Generator: that secret source; INSECURE_REPRODUCIBLE: the
    public seed and torch's global generator, as before secret randomness (warns at every call).
    """
    from fedcl.privacy.randomness import mechanism_generator

    if isinstance(dp_generator, str) and dp_generator != INSECURE_REPRODUCIBLE:
        raise ValueError(f"dp_generator must be a torch.Generator, None or {INSECURE_REPRODUCIBLE!r}, "
                         f"got {dp_generator!r}")
    if dp_generator is None or isinstance(dp_generator, str):
        secret = mechanism_generator(public, private=dp is not None or dp_generator is not None,
                                     insecure=dp_generator == INSECURE_REPRODUCIBLE,
                                     where="fedcl.train.local_round")
    else:
        secret = dp_generator
    if secret is public:
        return public, None, False  # no DP mechanism runs here, or insecure: reproducible from `seed`
    if device.type == "cpu":
        return secret, secret, True
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=secret))  # the noise is drawn on the device
    return secret, torch.Generator(device=device).manual_seed(noise_seed), True


def _check_round(recipe: RoundRecipe, *, dp, dp_steps: int | None, groups: torch.Tensor | None,
                 n: int) -> None:
    if dp is not None and recipe.in_batch_negatives:  # the one option left that couples examples
        raise ValueError("DP-SGD cannot be used with in_batch_negatives (the batch's other examples are "
                         "negatives, so one example changes the others' losses and per-example clipping no "
                         "longer bounds its effect): switch in_batch_negatives off")
    if dp_steps is not None and (dp is None or dp_steps < 1):
        raise ValueError(f"dp_steps is the number of DP-SGD steps (>= 1) and needs dp; got {dp_steps} "
                         f"with dp={'set' if dp is not None else 'None'}")
    if groups is not None and (groups.shape != (n,) or groups.dtype != torch.int64):
        raise ValueError(f"groups must be an int64 tensor of shape ({n},), one patient id per image; "
                         f"got {groups.dtype} {tuple(groups.shape)}")


def _frozen_copy(model: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _round_optimizer(model: nn.Module, recipe: RoundRecipe, state: dict | None) -> torch.optim.Optimizer:
    """The recipe's optimizer, resuming ``state`` (a previous round's) at this round's learning rate."""
    optimizer = make_optimizer(model.parameters(), name=recipe.optimizer, lr=recipe.lr,
                               momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if state is not None:
        try:
            optimizer.load_state_dict(copy.deepcopy(state))  # Adam steps its "step" tensors in place
        except (ValueError, KeyError) as e:
            raise ValueError(f"optimizer_state does not fit this model and optimizer: {e}") from e
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr  # this round's learning rate, not the stored one
    return optimizer


def _epoch_batches(n: int, *, epochs: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches of ``epochs`` shuffled passes over n images, all drawn up front."""
    return [idx for _ in range(epochs) for idx in torch.randperm(n, generator=generator).split(batch_size)]


def _dp_training(model: nn.Module, optimizer: torch.optim.Optimizer, *, dp, dp_steps: int | None, epochs: int,
                 groups: torch.Tensor | None, n: int, generator: torch.Generator,
                 noise: tuple[torch.Generator | None, bool]):
    """DP-SGD's (train_model, optimizer, check, batches): Poisson samples of examples, or of
    patients with all their images (``fedcl.privacy.dp``); ``dp_steps`` steps, or epochs / q."""
    from fedcl.privacy.dp import check_groups, dp_training_batches, make_dp_training

    dp_groups = check_groups(groups, num_examples=n, unit=dp.unit)  # (N,) or None; clear error if missing
    noise_gen, secure_mode = noise  # (generator, Opacus secure_mode) of the DP-SGD noise
    train_model, dp_optimizer, check = make_dp_training(model, optimizer, params=dp, num_examples=n,
                                                        groups=dp_groups, generator=noise_gen,
                                                        secure_mode=secure_mode)
    batches = dp_training_batches(num_examples=n, sample_rate=dp.sample_rate, generator=generator,
                                  groups=dp_groups,
                                  **({"epochs": epochs} if dp_steps is None else {"steps": dp_steps}))
    return train_model, dp_optimizer, check, batches


def _dp_metrics(dp, *, steps: int, groups: torch.Tensor | None) -> dict[str, float]:
    info = {"dp_steps": float(steps), "dp_sample_rate": float(dp.sample_rate),
            "dp_noise_multiplier": float(dp.noise_multiplier)}
    if dp.unit == "patient":
        info["dp_patients"] = float(torch.unique(groups).numel())
    return info


def _two_views(idx: torch.Tensor, *, images: torch.Tensor, augment: TwoViewAugment,
               generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return augment.two_views(_to_float(images[idx], device), generator=generator)  # 2 x (B, C, H, W)


def _train_steps(
    train_model: nn.Module, key_model: nn.Module | None, optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor], *, views: Callable, negatives: torch.Tensor | None, recipe: RoundRecipe,
    check: Callable | None,
) -> dict[str, float]:
    """One optimizer step per index batch; returns mean loss (over non-empty batches), steps and seconds.

    check: DP-SGD's per-step check of the batch (None without DP); empty Poisson batches still step.
    """
    t_aug = t_step = 0.0
    losses: list[float] = []
    steps = 0
    for idx in batches:
        t0 = time.perf_counter()
        v1, v2 = views(idx)
        t1 = time.perf_counter()
        loss = contrastive_loss(train_model, key_model, v1, v2, negatives=negatives,
                                temperature=recipe.temperature, in_batch=recipe.in_batch_negatives,
                                queue_temperature=recipe.queue_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if check is not None:
            check(idx)
        optimizer.step()
        t_step += time.perf_counter() - t1
        t_aug += t1 - t0
        steps += 1
        if idx.numel() > 0:
            losses.append(float(loss.detach()))
    return {"loss": float(sum(losses) / len(losses)) if losses else float("nan"), "steps": float(steps),
            "seconds_augment": t_aug, "seconds_train": t_step}


def _encode_push(round_model: nn.Module, images: torch.Tensor, *, num_push: int, augment: TwoViewAugment,
                 generator: torch.Generator, aug_generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """(M, d) round-model embeddings of ``num_push`` random images (one augmented view each)."""
    n = images.shape[0]
    if num_push <= 0 or n == 0:
        return torch.zeros(0, round_model.head[-1].out_features)
    pick = torch.randperm(n, generator=generator)[:num_push]  # release selection: secret under DP
    return encode(round_model, images[pick], device=device, augment=augment, generator=aug_generator)


def _cpu_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()  # the optimizer ends here, so its tensors need no copy on CPU
    for st in state["state"].values():
        for k, v in st.items():
            if torch.is_tensor(v):
                st[k] = v.detach().to("cpu")
    return state


def local_round(
    model: nn.Module,
    images: torch.Tensor,
    negatives: torch.Tensor | None,
    recipe: RoundRecipe,
    *,
    augment: TwoViewAugment,
    dp=None,
    dp_steps: int | None = None,
    groups: torch.Tensor | None = None,
    optimizer_state: dict | None = None,
    seed: int = 0,
    dp_generator: torch.Generator | str | None = None,
    device: torch.device | str = "cpu",
) -> LocalRoundResult:
    """Train ``model`` in place on one site's images (uint8 (N, C, H, W)) for one round.

    negatives: (K, d) detached queue entries or None.
    dp: a ``fedcl.privacy.dp.DPParams`` for DP-SGD (Poisson sampling, per-example clipping,
    noise); then in-batch negatives are refused, because they couple examples.
    dp_steps: DP-SGD only: the Poisson steps of this round over all of ``images`` (default
    round(epochs / sample_rate)). Shorter rounds take fewer steps over the whole data set instead
    of a share of it, so every step keeps the sample rate the accountant is told.
    groups: int64 (N,) patient id of each image, required when ``dp.unit == "patient"`` (and
    refused with DP-SGD in the example unit): batches are then Poisson samples of patients with
    all their images, and gradients are clipped per patient (``fedcl.privacy.dp``).
    optimizer_state: a previous round's ``LocalRoundResult.optimizer_state`` of this site: the
    optimizer resumes with its moments and step counts instead of starting cold (Adam's first
    steps after a cold start move every weight by about lr whatever its gradient). Its learning
    rate is ``recipe.lr``, not the stored one. Under DP-SGD the moments are built from clipped,
    noised gradients only (post-processing), and they never leave the site.
    seed: public; drives augmentation and the batch order without DP. dp_generator: the secret
    source of the DP mechanisms (DP-SGD's Poisson batches and noise, and the images picked for
    ``num_push``); None draws a fresh one from OS entropy under DP-SGD; INSECURE_REPRODUCIBLE
    takes them from ``seed`` so benchmark numbers reproduce: NOT private, warns at every call.
    """
    device = torch.device(device)
    n = images.shape[0]
    _check_round(recipe, dp=dp, dp_steps=dp_steps, groups=groups, n=n)
    gen, aug_gen = _generators(seed, device)
    secret, noise_gen, secure_mode = _dp_randomness(dp_generator, dp=dp, public=gen, device=device)
    model.to(device).train()
    round_model = _frozen_copy(model)  # the round's global weights
    key_model = round_model if recipe.key_encoder == "global" else None
    negs = negatives.to(device).float() if negatives is not None and negatives.numel() > 0 else None  # (K, d)
    optimizer = _round_optimizer(model, recipe, optimizer_state)  # DP-SGD wraps it; its state is kept
    if dp is None:
        train_model, step_optimizer, check = model, optimizer, None
        batches = _epoch_batches(n, epochs=recipe.epochs, batch_size=recipe.batch_size, generator=gen)
    else:
        train_model, step_optimizer, check, batches = _dp_training(
            model, optimizer, dp=dp, dp_steps=dp_steps, epochs=recipe.epochs, groups=groups, n=n,
            generator=secret, noise=(noise_gen, secure_mode))
    views = functools.partial(_two_views, images=images, augment=augment, generator=aug_gen, device=device)
    stats = _train_steps(train_model, key_model, step_optimizer, batches, views=views, negatives=negs,
                         recipe=recipe, check=check)
    dp_info: dict[str, float] = {}
    if dp is not None:
        from fedcl.privacy.dp import release_dp_training

        release_dp_training(model, train_model)
        dp_info = _dp_metrics(dp, steps=int(stats["steps"]), groups=groups)

    t0 = time.perf_counter()
    embeddings = _encode_push(round_model, images, num_push=recipe.num_push, augment=augment,
                              generator=secret, aug_generator=aug_gen, device=device)
    metrics = {**stats, "num_examples": float(n),
               "negatives_used": float(0 if negs is None else negs.shape[0]),
               "seconds_encode_push": time.perf_counter() - t0, **dp_info}
    model.to("cpu")
    return LocalRoundResult(state=canonical_state_dict(model), embeddings=embeddings, metrics=metrics,
                            optimizer_state=_cpu_optimizer_state(optimizer))


def train_centralized(
    model: nn.Module,
    images: torch.Tensor,
    recipe: RoundRecipe,
    *,
    augment: TwoViewAugment,
    device: torch.device,
    seed: int = 0,
    on_epoch=None,
    progress: bool = True,
) -> list[float]:
    """SimCLR (NT-Xent, in-batch negatives) with cosine learning-rate decay; returns epoch losses.

    From the recipe: epochs, batch_size, lr, temperature and the optimizer; the loss is always
    NT-Xent on the trained model's views, so key_encoder, in_batch_negatives and num_push do not apply.
    """
    epochs, temperature = recipe.epochs, recipe.temperature
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = make_optimizer(model.parameters(), name=recipe.optimizer, lr=recipe.lr,
                               momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    n = images.shape[0]
    history = []
    for epoch in range(epochs):
        batches = torch.randperm(n, generator=gen).split(recipe.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        total, count = 0.0, 0
        for idx in bar:
            if idx.numel() < 2:
                continue  # NT-Xent needs another example as a negative
            x = _to_float(images[idx], device)
            v1, v2 = augment.two_views(x, generator=gen if device.type == "cpu" else None)
            loss = nt_xent(model(v1), model(v2), temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
            bar.set_postfix(loss=f"{total / count:.3f}")
        sched.step()
        history.append(total / max(1, count))
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    model.to("cpu")
    return history
