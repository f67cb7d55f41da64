"""DP-SGD for one site's local round, on Opacus (Abadi et al. 2016; accounting: Mironov et al. 2019).

Privacy unit
------------
* Example (``DPParams.group_size == 1``): every step Poisson-samples examples (each one
  independently with probability ``sample_rate``), clips each example's gradient to
  ``max_grad_norm`` (C), sums, adds N(0, (noise_multiplier * C)^2) per coordinate and divides
  by the expected batch size. Each step is a Poisson-subsampled Gaussian mechanism
  (noise_multiplier, sample_rate); adjacency: add/remove one example.
* Group / patient (``group_size == G > 1``): every step Poisson-samples *groups* (patients) with
  rate q and takes all their examples (at most G per group and step: a random G when a group
  has more), clips each example's gradient to C / G, so one group's summed contribution is at
  most G * C / G = C, and adds N(0, (noise_multiplier * C)^2), the noise of a whole group's
  sensitivity C, not of one example's C / G. Each step is then the same subsampled Gaussian
  mechanism with (noise_multiplier, q) where the unit added or removed is a whole group, so
  the ledger accounts it with (noise_multiplier, q) and the resulting ε is per patient.
  Opacus' DPOptimizer computes noise std = its noise multiplier * its clip norm, so it is given
  clip C / G and noise multiplier noise_multiplier * G; accounting always uses
  ``DPParams.noise_multiplier``.

Why per-example clipping is valid for the contrastive loss (see DESIGN "Privacy model"):
negatives come only from the detached global queue (never in-batch, never the site's own
entries), so each example's loss depends only on its own two views. The two views are encoded
in two separate forward calls through the wrapped model; Opacus then sums the two calls'
per-sample gradients into one (B, ...) tensor per parameter. Stacking both views into one 2B
batch would give 2B "examples", each clipped to C, so one image could move the model by 2C
while the noise is calibrated for C. ``check_per_example`` refuses that.

Empty Poisson batches are real steps: they add noise and are accounted like any other step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn


class PerExampleGradientError(RuntimeError):
    """Per-sample gradients do not have one row per example of the batch."""


@dataclass(frozen=True)
class DPParams:
    """DP-SGD settings of one local round.

    noise_multiplier: noise std / sensitivity (sigma). max_grad_norm: clip bound C of one
    privacy unit (example, or whole group). sample_rate: Poisson rate q of the privacy unit.
    group_size: most examples one unit contributes to a step (1 = example-level privacy).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    group_size: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if int(self.group_size) != self.group_size or self.group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {self.group_size}")

    @property
    def example_clip(self) -> float:
        """Clip bound of one example's gradient: C / group_size."""
        return self.max_grad_norm / self.group_size


def noise_for_budget(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
    reserved: Sequence[tuple[float, float, int]] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """Noise multiplier so that ``total_steps`` DP-SGD steps (all rounds of the planned run) at
    ``sample_rate`` spend at most ``target_epsilon`` at ``target_delta``.

    reserved: other planned events (noise_multiplier, sample_rate, count), e.g. one prototype
    release per round, composed with the DP-SGD steps in the same accountant; the returned
    noise leaves room for them. Without it this is Opacus' ``get_noise_multiplier``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not reserved:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
                steps=int(total_steps), accountant=accountant, epsilon_tolerance=epsilon_tolerance,
            )
        )
    from fedcl.privacy.ledger import _epsilon  # one composition rule for planning and ledger

    fixed = [(float(s), float(q), int(n)) for s, q, n in reserved]

    def eps(sigma: float) -> float:
        return _epsilon([(sigma, sample_rate, int(total_steps)), *fixed], delta=target_delta, mechanism=accountant)

    floor = _epsilon(fixed, delta=target_delta, mechanism=accountant)
    if floor >= target_epsilon - epsilon_tolerance:
        raise ValueError(
            f"the reserved releases alone spend ε = {floor:.3g} at δ = {target_delta:g}, leaving nothing of "
            f"target ε = {target_epsilon:g} for DP-SGD: add noise to the releases or raise the target"
        )
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"target ε = {target_epsilon:g} cannot be met with {total_steps} steps")
    while True:
        mid = (low + high) / 2
        e = eps(mid)
        if e > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - e <= epsilon_tolerance:
                return float(high)
        if high - low < 1e-6:
            return float(high)


# ---------------------------------------------------------------------------------------------
# Poisson sampling


def poisson_sample(*, num_examples: int, sample_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indices (int64, sorted) of examples included independently with prob ``sample_rate``;
    may be empty."""
    mask = torch.rand(num_examples, generator=generator) < sample_rate  # (N,)
    return mask.nonzero(as_tuple=True)[0]


def group_poisson_sample(
    *, groups: torch.Tensor, sample_rate: float, max_per_group: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Indices of the examples of Poisson-sampled groups, at most ``max_per_group`` per group.

    groups: (N,) int64 group (patient) id of each example. Each distinct group is included
    independently with prob ``sample_rate``; a group with more than ``max_per_group`` examples
    contributes a random subset of that size. May be empty.
    """
    groups = groups.reshape(-1)
    if groups.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    ids, inverse = torch.unique(groups, return_inverse=True)  # ids: (G,), inverse: (N,)
    chosen = torch.rand(ids.numel(), generator=generator) < sample_rate  # (G,)
    keys = torch.rand(groups.numel(), generator=generator)  # random order inside each group
    candidates = chosen[inverse].nonzero(as_tuple=True)[0]
    if candidates.numel() == 0:
        return candidates
    # sort candidates by (group, random key) and keep the first max_per_group of each group
    grp = inverse[candidates]
    order = torch.argsort(keys[candidates])
    order = order[torch.argsort(grp[order], stable=True)]
    grp_sorted = grp[order]
    starts = torch.ones_like(grp_sorted, dtype=torch.bool)
    starts[1:] = grp_sorted[1:] != grp_sorted[:-1]
    pos = torch.arange(grp_sorted.numel())
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=0).values
    rank = pos - first  # rank of each candidate inside its group
    keep = candidates[order[rank < max_per_group]]
    return torch.sort(keep).values


def dp_training_batches(
    *,
    num_examples: int,
    sample_rate: float,
    epochs: float | None = None,
    steps: int | None = None,
    generator: torch.Generator | None,
    groups: torch.Tensor | None = None,
    max_per_group: int = 1,
) -> Iterator[torch.Tensor]:
    """Poisson batches for DP-SGD: ``steps`` of them, or ``round(epochs / sample_rate)``.

    With ``groups`` (N,) the unit sampled is the group (see ``group_poisson_sample``).
    Yields int64 index tensors (B,), B varying and possibly 0.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    total = int(steps) if steps is not None else max(1, round(epochs / sample_rate))
    if groups is not None and groups.numel() != num_examples:
        raise ValueError(f"groups has {groups.numel()} entries for {num_examples} examples")
    for _ in range(total):
        if groups is None:
            yield poisson_sample(num_examples=num_examples, sample_rate=sample_rate, generator=generator)
        else:
            yield group_poisson_sample(
                groups=groups, sample_rate=sample_rate, max_per_group=max_per_group, generator=generator
            )


def expected_batch_size(*, params: DPParams, num_examples: int, groups: torch.Tensor | None = None) -> float:
    """Expected number of examples in a Poisson batch: the denominator of the mean gradient."""
    if groups is None:
        return params.sample_rate * num_examples
    _, counts = torch.unique(groups.reshape(-1), return_counts=True)
    return params.sample_rate * float(counts.clamp(max=params.group_size).sum())


# ---------------------------------------------------------------------------------------------
# Wrapping the model and optimizer


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def prepare_model(model: nn.Module) -> None:
    """Make ``model`` usable with Opacus hooks, in place, or raise a clear ValueError.

    In-place activations are switched off (Opacus' backward hooks cannot see through a module
    output modified in place); BatchNorm and other cross-example layers are refused.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:5])
        raise ValueError(
            f"the model cannot be trained with per-example DP: {listed}. Use GroupNorm instead of "
            "BatchNorm (fedcl.models builds GroupNorm encoders)"
        )
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    params: DPParams,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> tuple[GradSampleModule, DPOptimizer]:
    """Wrap ``model`` in a hooks-mode GradSampleModule and ``optimizer`` in a DPOptimizer.

    The loss must be the *mean* over the batch of per-example losses. Forward through the
    returned module; its parameters are ``model``'s own (no copy). Noise std is
    ``params.noise_multiplier * params.max_grad_norm``, examples are clipped to
    ``params.example_clip``. A seeded ``generator`` makes the noise reproducible (tests,
    benchmarks); leave it None in deployment, or set ``secure_mode``.
    """
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0 (sample_rate * N), got {expected_batch_size}")
    prepare_model(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.forbid_grad_accumulation()  # one backward per step; a second one is a loop bug
    dp_opt = DPOptimizer(
        optimizer,
        noise_multiplier=params.noise_multiplier * params.group_size,  # std = sigma * C
        max_grad_norm=params.example_clip,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )
    return gsm, dp_opt


def _reset_for_empty_batch(module: nn.Module) -> None:
    """After an empty batch: drop pending Opacus activations and give every parameter a
    (0, ...) per-sample gradient, so that the DP step adds noise only."""
    for m in module.modules():
        if hasattr(m, "activations"):
            m.activations = []
        if hasattr(m, "max_batch_len"):
            del m.max_batch_len
    for p in _trainable(module):
        if hasattr(p, "_current_grad_sample"):
            del p._current_grad_sample
        p._forward_counter = 0
        p.grad_sample = p.new_zeros((0, *p.shape))


def check_per_example(module: nn.Module, *, batch_size: int) -> None:
    """Raise PerExampleGradientError unless every trainable parameter of ``module`` holds a
    per-sample gradient with leading dimension ``batch_size`` from exactly one backward pass.

    Call after ``loss.backward()`` and before ``optimizer.step()``.
    """
    for m in module.modules():
        if getattr(m, "activations", None):
            raise PerExampleGradientError(
                f"{type(m).__name__} still holds activations of {len(m.activations)} forward call(s) "
                "that took no part in the loss's backward pass; every forward through the DP model "
                "must feed the loss, and backward must run once per step"
            )
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise PerExampleGradientError(
                f"parameter {name} has no per-sample gradient: forward through the wrapped "
                "(GradSampleModule) model and call loss.backward() before checking"
            )
        if isinstance(gs, list):
            raise PerExampleGradientError(
                f"parameter {name} accumulated per-sample gradients over {len(gs)} backward passes; "
                "call optimizer.step() and zero_grad() after every backward"
            )
        if gs.shape[0] != batch_size:
            hint = (
                " (twice the batch: were the two views stacked into one 2B forward call? encode "
                "them in two separate calls so each example is clipped once)"
                if gs.shape[0] == 2 * batch_size
                else ""
            )
            raise PerExampleGradientError(
                f"parameter {name} has per-sample gradients for {gs.shape[0]} rows, expected one per "
                f"example ({batch_size}){hint}"
            )


class DPTrainer:
    """DP-SGD for a caller-owned training loop.

    >>> trainer = DPTrainer(model, optimizer, params=params, num_examples=n, seed=0)
    >>> for idx in trainer.batches(steps=s):
    ...     if idx.numel():
    ...         v1, v2 = augment.two_views(images[idx])
    ...         loss = info_nce(trainer.module(v1), key(v2), negatives, temperature=t)
    ...         loss.backward()
    ...     trainer.step(batch_size=idx.numel())
    >>> noise_multiplier, sample_rate, steps = trainer.accounting()
    >>> model = trainer.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        params: DPParams,
        num_examples: int,
        groups: torch.Tensor | None = None,
        seed: int | None = None,
        secure_mode: bool = False,
    ) -> None:
        if groups is None and params.group_size != 1:
            raise ValueError(f"group_size={params.group_size} needs the group id of each example (groups=)")
        if groups is not None and groups.numel() != num_examples:
            raise ValueError(f"groups has {groups.numel()} entries for {num_examples} examples")
        self.params = params
        self.num_examples = int(num_examples)
        self.groups = None if groups is None else groups.reshape(-1).long().cpu()
        self.expected_batch_size = expected_batch_size(params=params, num_examples=num_examples, groups=self.groups)
        self._sample_gen = torch.Generator()
        noise_gen = None
        if seed is not None:
            self._sample_gen.manual_seed(seed)
            noise_gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1)
        else:
            self._sample_gen.seed()
        self.module, self.optimizer = make_private(
            model, optimizer, params=params, expected_batch_size=self.expected_batch_size,
            generator=noise_gen, secure_mode=secure_mode,
        )
        self.steps = 0

    def batches(self, *, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` Poisson batches of example indices (group-level when ``groups`` was given)."""
        return dp_training_batches(
            num_examples=self.num_examples, sample_rate=self.params.sample_rate, steps=steps,
            generator=self._sample_gen, groups=self.groups, max_per_group=self.params.group_size,
        )

    def step(self, *, batch_size: int) -> None:
        """Check per-example gradients, clip, noise, update, clear. ``batch_size`` 0 is an
        empty Poisson batch: the update is noise only (forward/backward may be skipped)."""
        if batch_size == 0:
            _reset_for_empty_batch(self.module)
        else:
            check_per_example(self.module, batch_size=batch_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def accounting(self) -> tuple[float, float, int]:
        """(noise_multiplier, sample_rate, steps) for ``PrivacyLedger.record_dpsgd``."""
        return self.params.noise_multiplier, self.params.sample_rate, self.steps

    def detach(self) -> nn.Module:
        """Remove Opacus hooks and attributes; returns the plain model (same parameters)."""
        return self.module.to_standard_module()


# ---------------------------------------------------------------------------------------------
# Function-style API used by fedcl.train.local_round


def make_dp_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    params: DPParams,
    num_examples: int,
    groups: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> tuple[GradSampleModule, DPOptimizer, Callable[[int], None]]:
    """(wrapped model, DP optimizer, check) for a loop that does forward/backward/step itself.

    Call ``check(batch_size)`` after ``loss.backward()`` and before ``optimizer.step()``; for an
    empty batch (0) it also clears what the empty forward left behind, so the step adds noise only.
    """
    if groups is None and params.group_size != 1:
        raise ValueError(f"group_size={params.group_size} needs the group id of each example (groups=)")
    ebs = expected_batch_size(params=params, num_examples=num_examples, groups=groups)
    gsm, dp_opt = make_private(
        model, optimizer, params=params, expected_batch_size=ebs, generator=generator, secure_mode=secure_mode
    )

    def check(batch_size: int) -> None:
        if batch_size == 0:
            _reset_for_empty_batch(gsm)
        else:
            check_per_example(gsm, batch_size=batch_size)

    return gsm, dp_opt, check


def release_dp_training(model: nn.Module, train_model: nn.Module) -> None:
    """Remove the Opacus wrapping made by ``make_dp_training``; ``model`` keeps the trained weights."""
    if isinstance(train_model, GradSampleModule):
        inner = train_model.to_standard_module()
        if inner is not model:
            raise ValueError("train_model does not wrap this model")
