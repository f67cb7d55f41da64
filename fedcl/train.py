"""One site's local round, and centralized SimCLR training, as plain functions.

A round: the global weights and K detached negatives from the queue come in; the local model
trains E epochs on two augmented views per image; trained weights, embeddings to share and
metrics go out. Keys follow MoCo (He et al. 2020) with the round's global model as the slowly
moving key encoder: query = local model(view a), key = frozen global model(view b), and the
embeddings pushed to the queue come from the same frozen model, so every key a site sees lives
in a global model's space at most ``max_staleness`` rounds old.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fedcl.augment import TwoViewAugment
from fedcl.losses import info_nce, mix_hard_negatives, nt_xent, relation_kl
from fedcl.models import canonical_state_dict


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


def make_optimizer(params, *, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'adam' or 'sgd'")


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # uint8 (B, C, H, W) -> float in [0, 1] on the device
    return images.to(device, non_blocking=True).float().div_(255.0)


def contrastive_loss(
    model: nn.Module,
    key_model: nn.Module | None,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    negatives: torch.Tensor | None,
    temperature: float,
    in_batch: bool,
    online_negatives: bool = False,
    queue_weight: float = 1.0,
    drift_model: nn.Module | None = None,
    drift_kernel: float | None = None,
    relation_model: nn.Module | None = None,
    relation_weight: float = 0.0,
    relation_temperature: float = 0.1,
    hard_negatives: int = 0,
    predict: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE for a batch of view pairs.

    hard_negatives: this many synthetic hard negatives per query, mixed from its hardest queue
    negatives (``fedcl.losses.mix_hard_negatives``, MoCHi), join that query's denominator; they
    need queue negatives and the default loss (not ``online_negatives``). generator draws the mixes.
    predict: queries go through the model's predictor (``ContrastiveModel(pred_hidden > 0)``);
    keys and negatives stay in the round model's projection space. Needs a key_model.

    relation_model, relation_weight, relation_temperature: adds ``relation_weight`` x the
    relational term: each online view's softmax similarity profile over the queue's entries is
    pulled to that of the other view as relation_model (the frozen round model that encoded the
    queue) embeds it (``fedcl.losses.relation_kl``). It keeps how a site's images relate to the
    other sites' data while the site trains on its own classes only.

    drift_model: the frozen model the queue's negatives were encoded with. The negatives are
    then moved by the batch's mean drift (trained model's embedding minus drift_model's, of the
    same views; gradients flow through it) and renormalized, after Yu et al. 2020 (semantic drift
    compensation): a model that moves every embedding away from the queue moves the
    compensated negatives along with it, so that shortcut no longer lowers the loss.
    drift_kernel: None moves every negative by the mean drift; a temperature moves each negative
    by the drifts of the batch views weighted by softmax(cosine to them / drift_kernel).

    The two views go through the trained model in two separate forward calls, so that under
    Opacus each example's per-sample gradient collects both of its views (a stacked 2B batch
    would be clipped per view).

    online_negatives: SimCLR's NT-Xent on the trained model's own views (in-batch negatives
    from the online model), plus ``queue_weight`` x the symmetric queue InfoNCE term (query =
    online view, positive = key of the other view, negatives = the queue only). The queue is
    then an extra term, not the whole denominator: stale negatives cannot be the only thing
    that spreads the embeddings.
    """
    if predict and key_model is None:
        raise ValueError("predict=True needs a key_model: with online keys the predictor has nothing to map to")
    q1 = model(v1, predict=True) if predict else model(v1)  # (B, d)
    q2 = model(v2, predict=True) if predict else model(v2)  # (B, d)
    relation = None
    if relation_model is not None and relation_weight > 0 and negatives is not None and negatives.shape[0] > 0:
        with torch.no_grad():
            r1, r2 = relation_model(v1), relation_model(v2)
        anchors = negatives.to(q1.dtype)  # the queue as the round model encoded it (before any drift shift)
        relation = relation_weight * 0.5 * (relation_kl(q1, r2, anchors, temperature=relation_temperature)
                                            + relation_kl(q2, r1, anchors, temperature=relation_temperature))
    loss = _contrastive_terms(q1, q2, key_model, v1, v2, negatives=negatives, temperature=temperature,
                              in_batch=in_batch, online_negatives=online_negatives, queue_weight=queue_weight,
                              drift_model=drift_model, drift_kernel=drift_kernel, hard_negatives=hard_negatives,
                              generator=generator)
    return loss if relation is None else loss + relation


def _contrastive_terms(
    q1: torch.Tensor, q2: torch.Tensor, key_model: nn.Module | None, v1: torch.Tensor, v2: torch.Tensor, *,
    negatives: torch.Tensor | None, temperature: float, in_batch: bool, online_negatives: bool,
    queue_weight: float, drift_model: nn.Module | None, drift_kernel: float | None, hard_negatives: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The InfoNCE terms of ``contrastive_loss`` for the online embeddings q1, q2 of views v1, v2."""
    if drift_model is not None and negatives is not None and negatives.shape[0] > 0 and q1.shape[0] > 0:
        with torch.no_grad():
            a = torch.cat([drift_model(v1), drift_model(v2)])  # (2B, d) the queue's space
        shift = torch.cat([q1, q2]) - a  # (2B, d) each view's drift
        if drift_kernel is None:
            drift = shift.mean(dim=0)  # (d,) the same for every negative
        else:  # each negative moves as its neighbours in the queue's space did (cosine kernel)
            w = torch.softmax(negatives.to(a.dtype) @ a.T / drift_kernel, dim=1)  # (K, 2B)
            drift = w @ shift  # (K, d)
        negatives = F.normalize(negatives + drift, dim=1)
    if online_negatives:
        loss = nt_xent(q1, q2, temperature=temperature)
        if negatives is None or negatives.shape[0] == 0 or queue_weight == 0:
            return loss
        if key_model is not None:
            with torch.no_grad():  # detached: keys come from the frozen round model
                k1, k2 = key_model(v1), key_model(v2)
        else:
            k1, k2 = q1, q2
        queue_term = 0.5 * (info_nce(q1, k2, negatives, temperature=temperature)
                            + info_nce(q2, k1, negatives, temperature=temperature))
        return loss + queue_weight * queue_term
    if key_model is not None:
        with torch.no_grad():  # detached: keys come from the frozen round model
            k1, k2 = key_model(v1), key_model(v2)
    else:
        if negatives is None or negatives.shape[0] == 0:
            if in_batch:
                return nt_xent(q1, q2, temperature=temperature)
        k1, k2 = q1, q2
    mix1 = mix2 = None
    if hard_negatives > 0 and negatives is not None and negatives.shape[0] > 0:
        mix1 = mix_hard_negatives(q1, negatives, num_mix=hard_negatives, generator=generator)  # (B, S, d)
        mix2 = mix_hard_negatives(q2, negatives, num_mix=hard_negatives, generator=generator)
    loss_a = info_nce(q1, k2, negatives, temperature=temperature, in_batch=in_batch, row_negatives=mix1)
    loss_b = info_nce(q2, k1, negatives, temperature=temperature, in_batch=in_batch, row_negatives=mix2)
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


@torch.no_grad()
def _ema_update(target: nn.Module, source: nn.Module, *, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter."""
    for t, p in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)


def _refuse_coupled_options_under_dp(dp, *, in_batch_negatives: bool, online_negatives: bool, own_negatives: int,
                                     drift_compensation: bool) -> None:
    """DP-SGD clips each example's gradient to C, which bounds one example's effect only when its
    loss depends on its own two views and detached negatives. Options that couple examples are
    refused by name. (The relation term and hard-negative mixes are per row against the detached
    queue, and key_encoder 'online' / 'ema' use the example's own views: none of them couples.)"""
    if dp is None:
        return
    coupling = {
        "in_batch_negatives": (in_batch_negatives, "the batch's other examples are negatives"),
        "online_negatives": (online_negatives, "NT-Xent takes the batch's other examples as negatives"),
        "own_negatives": (own_negatives > 0, "the site's own images are negatives of every example"),
        "drift_compensation": (drift_compensation, "every negative moves by the batch's drift"),
    }
    for name, (on, why) in coupling.items():
        if on:
            raise ValueError(f"DP-SGD cannot be used with {name} ({why}, so one example changes the others' "
                             f"losses and per-example clipping no longer bounds its effect): switch {name} off")


def _dp_randomness(*, dp, dp_generator: torch.Generator | None, public: torch.Generator, device: torch.device,
                   insecure_reproducible_dp: bool) -> tuple[torch.Generator, torch.Generator | None, bool]:
    """(generator of Poisson batches and release picks, DP-SGD noise generator, Opacus secure_mode)."""
    from fedcl.privacy.randomness import secret_generator, warn_insecure

    if insecure_reproducible_dp:
        if dp is not None or dp_generator is not None:
            warn_insecure("fedcl.train.local_round")
        return public, None, False  # the pre-secret streams: `seed`, and torch's global generator for the noise
    if dp is None and dp_generator is None:
        return public, None, False  # no DP mechanism runs here: reproducible from `seed`
    secret = dp_generator if dp_generator is not None else secret_generator()
    if device.type == "cpu":
        return secret, secret, True
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=secret))  # the noise is drawn on the device
    return secret, torch.Generator(device=device).manual_seed(noise_seed), True


def local_round(
    model: nn.Module,
    images: torch.Tensor,
    *,
    negatives: torch.Tensor | None,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float,
    in_batch_negatives: bool,
    key_encoder: Literal["global", "online", "ema"],
    augment: TwoViewAugment,
    num_push: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    dp=None,
    progress: bool = False,
    online_negatives: bool = False,
    queue_weight: float = 1.0,
    groups: torch.Tensor | None = None,
    own_negatives: int = 0,
    key_momentum: float = 0.99,
    drift_compensation: bool = False,
    drift_kernel: float | None = None,
    relation_weight: float = 0.0,
    relation_temperature: float = 0.1,
    optimizer_state: dict | None = None,
    hard_negatives: int = 0,
    dp_steps: int | None = None,
    queue_temperature: float | None = None,
    dp_generator: torch.Generator | None = None,
    insecure_reproducible_dp: bool = False,
) -> LocalRoundResult:
    """Train ``model`` in place on one site's images for ``epochs`` local epochs.

    images: uint8 (N, C, H, W). negatives: (K, d) detached queue entries or None.
    dp: a ``fedcl.privacy.dp.DPParams`` for DP-SGD (Poisson sampling, per-example clipping,
    noise); then in-batch negatives are refused, because they couple examples.
    groups: int64 (N,) patient id of each image, required when ``dp.unit == "patient"`` (and
    refused with DP-SGD in the example unit): batches are then Poisson samples of patients with
    all their images, and gradients are clipped per patient (``fedcl.privacy.dp``).
    online_negatives, queue_weight: see ``contrastive_loss``; the default (False) is the MoCo-style
    loss where the queue and the other keys of the batch are the only negatives.
    own_negatives: this many of the site's own images, encoded once by the frozen round model,
    join the queue's negatives (each batch leaves out its own images). The queue holds other
    sites' entries only, so without these a site's negatives are all other sites' data and the
    loss can be lowered by telling sites apart; with them the negatives come from every site in
    proportion, as a centralized batch's do. Couples examples, so not under DP-SGD.
    relation_weight, relation_temperature: the relational term of ``contrastive_loss`` against
    the queue, with the frozen round model as the teacher (0: off).
    optimizer_state: a previous round's ``LocalRoundResult.optimizer_state`` of this site: the
    optimizer resumes with its moments and step counts instead of starting cold (Adam's first
    steps after a cold start move every weight by about lr whatever its gradient). Its learning
    rate is ``lr``, not the stored one. Under DP-SGD the moments are built from clipped, noised
    gradients only (post-processing), and they never leave the site.
    dp_steps: DP-SGD only: the Poisson steps of this round over all of ``images`` (default
    round(epochs / sample_rate)). Shorter rounds take fewer steps over the whole data set instead
    of a share of it, so every step keeps the sample rate the accountant is told.
    hard_negatives: synthetic hard negatives per query from the queue (``contrastive_loss``).
    queue_temperature: the queue's logits are divided by this instead of ``temperature`` (None:
    the same); the in-batch and positive logits keep ``temperature``. Scaling the queue's entries
    by temperature / queue_temperature gives exactly these logits, and is how it is done.
    A model with a predictor (``pred_hidden > 0``) sends its queries through it; that needs
    key_encoder 'global' or 'ema' and the default loss.
    dp_generator: the secret source of the DP mechanisms (``fedcl.privacy.randomness``): DP-SGD's
    Poisson batches and noise, and which images are encoded for release (``num_push``) when
    given. None: a fresh generator seeded from OS entropy under DP-SGD; ``seed`` (public) drives
    augmentation and everything else. insecure_reproducible_dp: draw them from ``seed`` and
    torch's global generator instead, as before secret randomness, so benchmark numbers
    reproduce; NOT private, warns at every call.
    """
    device = torch.device(device) if isinstance(device, str) else device
    _refuse_coupled_options_under_dp(dp, in_batch_negatives=in_batch_negatives, online_negatives=online_negatives,
                                     own_negatives=own_negatives, drift_compensation=drift_compensation)
    if queue_weight < 0:
        raise ValueError(f"queue_weight must be >= 0, got {queue_weight}")
    if own_negatives < 0:
        raise ValueError(f"own_negatives must be >= 0, got {own_negatives}")
    if key_encoder not in ("global", "online", "ema"):
        raise ValueError(f"key_encoder must be 'global', 'online' or 'ema', got {key_encoder!r}")
    if not 0.0 <= key_momentum < 1.0:
        raise ValueError(f"key_momentum must be in [0, 1), got {key_momentum}")
    if drift_compensation and key_encoder != "online":
        raise ValueError(f"drift_compensation needs key_encoder='online', got {key_encoder!r}: with frozen or "
                         "momentum keys the positive key stays in the round model's space, so moving only the "
                         "negatives by the online drift would contrast them in two different spaces")
    if relation_weight < 0 or relation_temperature <= 0:
        raise ValueError(f"relation_weight must be >= 0 and relation_temperature > 0, got {relation_weight} "
                         f"and {relation_temperature}")
    if hard_negatives < 0:
        raise ValueError(f"hard_negatives must be >= 0, got {hard_negatives}")
    if queue_temperature is not None and (queue_temperature <= 0 or hard_negatives or drift_compensation
                                          or relation_weight > 0):
        raise ValueError(f"queue_temperature must be > 0 and needs the queue's entries as given (no hard_negatives, "
                         f"drift_compensation or relation term, which use them as unit vectors); got "
                         f"{queue_temperature}")
    if hard_negatives and online_negatives:
        raise ValueError("hard_negatives mixes the queue's negatives of the default loss: it needs "
                         "online_negatives=False")
    predict = getattr(model, "predictor", None) is not None
    if predict and (key_encoder == "online" or online_negatives or drift_compensation or relation_weight > 0):
        raise ValueError("a model with a predictor needs key_encoder 'global' or 'ema' and the default loss "
                         "(no online_negatives, drift_compensation or relation term): its queries live in "
                         "the predictor's space, its keys in the round model's")
    if dp_steps is not None and (dp is None or dp_steps < 1):
        raise ValueError(f"dp_steps is the number of DP-SGD steps (>= 1) and needs dp; got {dp_steps} "
                         f"with dp={'set' if dp is not None else 'None'}")
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1) if device.type == "cuda" else gen
    secret, noise_gen, secure_noise = _dp_randomness(dp=dp, dp_generator=dp_generator, public=gen, device=device,
                                                     insecure_reproducible_dp=insecure_reproducible_dp)
    model.to(device).train()
    round_model = copy.deepcopy(model).eval()  # the round's global weights, frozen
    for p in round_model.parameters():
        p.requires_grad_(False)
    key_model = round_model if key_encoder == "global" else None
    if key_encoder == "ema":  # MoCo's momentum encoder, starting from the round's global weights
        key_model = copy.deepcopy(round_model)
    negs = negatives.to(device).float() if negatives is not None and negatives.numel() > 0 else None
    if negs is not None and queue_temperature is not None:
        negs = negs * (temperature / queue_temperature)  # q . n / queue_temperature, inside the same softmax
    own_ids = own_emb = None
    if own_negatives and images.shape[0] > 0:
        own_ids = torch.randperm(images.shape[0], generator=gen)[:own_negatives]
        own_emb = encode(round_model, images[own_ids], device=device, augment=augment, generator=aug_gen).to(device)

    optimizer = make_optimizer(model.parameters(), name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))  # Adam steps its "step" tensors in place
        except (ValueError, KeyError) as e:
            raise ValueError(f"optimizer_state does not fit this model and optimizer: {e}") from e
        for group in optimizer.param_groups:
            group["lr"] = lr  # this round's learning rate, not the stored one
    base_optimizer = optimizer  # DP-SGD wraps it; its state is what the next round resumes
    n = images.shape[0]
    t_aug = t_step = 0.0
    losses: list[float] = []
    steps = 0
    dp_info: dict[str, float] = {}

    if groups is not None and (groups.shape != (n,) or groups.dtype != torch.int64):
        raise ValueError(f"groups must be an int64 tensor of shape ({n},), one patient id per image; "
                         f"got {groups.dtype} {tuple(groups.shape)}")
    if dp is not None:
        from fedcl.privacy.dp import check_groups, dp_training_batches, make_dp_training

        dp_groups = check_groups(groups, num_examples=n, unit=dp.unit)  # (N,) or None; clear error if missing
        train_model, optimizer, check = make_dp_training(model, optimizer, params=dp, num_examples=n,
                                                         groups=dp_groups, generator=noise_gen,
                                                         secure_mode=secure_noise)
        batches = dp_training_batches(num_examples=n, sample_rate=dp.sample_rate, generator=secret, groups=dp_groups,
                                      **({"epochs": epochs} if dp_steps is None else {"steps": dp_steps}))
        if dp_steps is not None:
            total = dp_steps
        else:
            total = max(1, round(epochs / dp.sample_rate)) if dp.sample_rate > 0 else 0
    else:
        train_model, check = model, None
        per_epoch = [torch.randperm(n, generator=gen).split(batch_size) for _ in range(epochs)]
        batches = (idx for epoch in per_epoch for idx in epoch)
        total = sum(len(e) for e in per_epoch)

    bar = tqdm(batches, total=total, desc="local round", disable=not progress, leave=False)
    for idx in bar:
        t0 = time.perf_counter()
        x = _to_float(images[idx], device)
        v1, v2 = augment.two_views(x, generator=aug_gen)
        t1 = time.perf_counter()
        batch_negs = negs
        if own_emb is not None:  # the round model's view of this site's other images
            own = own_emb[~torch.isin(own_ids, idx)]
            batch_negs = own if negs is None else torch.cat([negs, own])
        loss = contrastive_loss(train_model, key_model, v1, v2, negatives=batch_negs, temperature=temperature,
                                in_batch=in_batch_negatives, online_negatives=online_negatives,
                                queue_weight=queue_weight,
                                drift_model=round_model if drift_compensation else None, drift_kernel=drift_kernel,
                                relation_model=round_model if relation_weight > 0 else None,
                                relation_weight=relation_weight, relation_temperature=relation_temperature,
                                hard_negatives=hard_negatives, predict=predict, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if check is not None:
            check(idx)
        optimizer.step()
        if key_encoder == "ema":
            _ema_update(key_model, model, momentum=key_momentum)
        t_step += time.perf_counter() - t1
        t_aug += t1 - t0
        steps += 1
        if idx.numel() > 0:
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if dp is not None:
        from fedcl.privacy.dp import release_dp_training

        release_dp_training(model, train_model)
        dp_info = {"dp_steps": float(steps), "dp_sample_rate": float(dp.sample_rate),
                   "dp_noise_multiplier": float(dp.noise_multiplier)}
        if dp.unit == "patient":
            dp_info["dp_patients"] = float(torch.unique(groups).numel())

    t0 = time.perf_counter()
    embeddings = torch.zeros(0, model.head[-1].out_features)
    if num_push > 0 and n > 0:
        pick = torch.randperm(n, generator=secret)[:num_push]  # release selection: secret under DP
        embeddings = encode(round_model, images[pick], device=device, augment=augment, generator=aug_gen)
    t_push = time.perf_counter() - t0

    metrics = {
        "loss": float(sum(losses) / len(losses)) if losses else float("nan"),
        "num_examples": float(n),
        "steps": float(steps),
        "negatives_used": float(0 if negs is None else negs.shape[0]),
        "own_negatives": float(0 if own_emb is None else own_emb.shape[0]),
        "seconds_augment": t_aug,
        "seconds_train": t_step,
        "seconds_encode_push": t_push,
        **dp_info,
    }
    model.to("cpu")
    opt_state = base_optimizer.state_dict()  # the optimizer ends here, so its tensors need no copy on CPU
    for st in opt_state["state"].values():
        for k, v in st.items():
            if torch.is_tensor(v):
                st[k] = v.detach().to("cpu")
    return LocalRoundResult(state=canonical_state_dict(model), embeddings=embeddings, metrics=metrics,
                            optimizer_state=opt_state)


def train_centralized(
    model: nn.Module,
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float,
    augment: TwoViewAugment,
    device: torch.device,
    seed: int = 0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    on_epoch=None,
    progress: bool = True,
) -> list[float]:
    """SimCLR (NT-Xent, in-batch negatives) with cosine learning-rate decay; returns epoch losses."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = make_optimizer(model.parameters(), name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    n = images.shape[0]
    history = []
    for epoch in range(epochs):
        batches = torch.randperm(n, generator=gen).split(batch_size)
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
