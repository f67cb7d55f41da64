"""DP-SGD for one site's local round, on Opacus (Abadi et al. 2016; accounting: Mironov et al. 2019).

Privacy unit
------------
* ``example`` (``DPParams.unit``): every step Poisson-samples examples (each one independently
  with probability ``sample_rate``), clips each example's gradient to ``max_grad_norm`` (C),
  sums, adds N(0, (noise_multiplier * C)^2) per coordinate and divides by the expected batch
  size. Each step is a Poisson-subsampled Gaussian mechanism (noise_multiplier, sample_rate);
  adjacency: add/remove one example.
* ``patient``: every step Poisson-samples *patients* (each one independently with probability
  ``sample_rate`` = expected patients per batch / number of patients) and takes all images of
  every sampled patient and none of the others. The per-example gradients of the batch are
  summed per patient and each patient's sum is clipped to C; then noise N(0, (noise_multiplier *
  C)^2) as above. Adding or removing one patient with all its images changes the noisy sum by
  at most C, and the patient is in a step's batch with probability q independently of the
  others, so each step is the same subsampled Gaussian mechanism (noise_multiplier, q) with
  a whole patient as the unit: the ledger accounts (noise_multiplier, q, steps) and its ε is
  per patient.

  Why clip the patient's sum rather than each example at C / G_max (G_max: the largest number
  of images of one patient): both bound a patient's contribution by C, but C / G_max shrinks
  every image's gradient by the largest patient's image count, so patients with few images
  (the common case) contribute a fraction of C, and G_max itself is data-dependent (it would
  have to be public, or capped by dropping images). Clipping the sum spends the whole bound C
  on each patient whatever its image count, and costs one scatter-add per step. The sum is the
  gradient of the patient's total loss because each example's loss depends only on its own
  views and the detached queue (below).

Why per-example gradients are valid for the contrastive loss (see DESIGN "Privacy model"):
negatives come only from the detached global queue (never in-batch, never the site's own
entries), so each example's loss depends only on its own two views. The two views are encoded
in two separate forward calls through the wrapped model, and each example's per-sample
gradient sums both calls' contributions into one (B, ...) tensor per parameter. Stacking both
views into one 2B batch would give 2B "examples", each clipped to C, so one image could move
the model by 2C while the noise is calibrated for C. ``check_per_example`` refuses that.

Per-example gradients come from ``fedcl.privacy.per_example`` (default, ``engine="fedcl"``) or
Opacus' GradSampleModule in hooks mode (``engine="opacus"``); both give the same rows (tested).
Clipping, noise and averaging are Opacus' DPOptimizer in both cases, accounting Opacus'
accountants (``fedcl.privacy.ledger``).

Empty Poisson batches are real steps: they add noise and are accounted like any other step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from opacus import GradSampleModule
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedcl.privacy.per_example import PerExampleGradientError, PerExampleModule
from fedcl.privacy.sampling import dp_training_batches, group_poisson_sample, poisson_sample

__all__ = ["DPParams", "DPTrainer", "PerExampleGradientError", "check_groups", "check_per_example",
           "dp_training_batches", "expected_batch_size", "group_poisson_sample", "make_dp_training",
           "make_private", "noise_for_budget", "poisson_sample", "prepare_model", "release_dp_training",
           "sum_per_patient"]

PRIVACY_UNITS = ("example", "patient")
ENGINES = ("fedcl", "opacus")


@dataclass(frozen=True)
class DPParams:
    """DP-SGD settings of one local round.

    noise_multiplier: noise std / sensitivity (sigma). max_grad_norm: clip bound C of one
    privacy unit (an example, or a patient's summed gradient). sample_rate: Poisson rate q of
    the privacy unit. unit: "example" or "patient" (see the module docstring).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    unit: Literal["example", "patient"] = "example"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.unit not in PRIVACY_UNITS:
            raise ValueError(f"unit must be one of {PRIVACY_UNITS}, got {self.unit!r}")


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
    fixed = tuple((float(s), float(q), int(n)) for s, q, n in reserved)
    return _noise_for_budget(float(target_epsilon), float(target_delta), float(sample_rate), int(total_steps),
                             accountant, fixed, float(epsilon_tolerance))


@functools.lru_cache(maxsize=256)  # a pure search, repeated with the same plan every round of a site
def _noise_for_budget(target_epsilon: float, target_delta: float, sample_rate: float, total_steps: int,
                      accountant: str, fixed: tuple[tuple[float, float, int], ...],
                      epsilon_tolerance: float) -> float:
    if not fixed:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
                steps=int(total_steps), accountant=accountant, epsilon_tolerance=epsilon_tolerance,
            )
        )
    from fedcl.privacy.ledger import _epsilon  # one composition rule for planning and ledger

    def eps(sigma: float) -> float:
        return _epsilon([(sigma, sample_rate, int(total_steps)), *fixed], delta=target_delta,
                        mechanism=accountant)

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


def expected_batch_size(*, params: DPParams, num_examples: int) -> float:
    """Expected number of examples in a Poisson batch (q * N in both units: a sampled patient
    brings all its images): the denominator of the mean gradient."""
    return params.sample_rate * num_examples


def check_groups(groups: torch.Tensor | None, *, num_examples: int, unit: str) -> torch.Tensor | None:
    """``groups`` as int64 (N,) on the CPU; a clear ValueError when the unit needs them and they
    are missing or do not fit."""
    if groups is None:
        if unit == "patient":
            raise ValueError(
                "the privacy unit is 'patient' but no patient id was given for the images (groups=None); "
                "load data that carries patient ids (e.g. a .npz with a train_patients array) or use "
                "unit='example'"
            )
        return None
    if unit != "patient":
        raise ValueError(f"patient ids (groups=) were given but the privacy unit is {unit!r}, not 'patient'")
    if groups.dim() != 1 or groups.numel() != num_examples or groups.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"groups must be an integer tensor of shape ({num_examples},), one patient id per image; got "
            f"{groups.dtype} {tuple(groups.shape)}"
        )
    return groups.long().cpu()


# ---------------------------------------------------------------------------------------------
# Wrapping the model and optimizer


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def prepare_model(model: nn.Module) -> None:
    """Make ``model`` usable for per-example gradients, in place, or raise a clear ValueError.

    In-place activations are switched off (a backward hook cannot see through a layer output
    modified in place); BatchNorm and other cross-example layers are refused.
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
    engine: Literal["fedcl", "opacus"] = "fedcl",
) -> tuple[nn.Module, DPOptimizer]:
    """Wrap ``model`` for per-example gradients and ``optimizer`` in Opacus' DPOptimizer.

    The loss must be the *mean* over the batch of per-example losses. Forward through the
    returned module; its parameters are ``model``'s own (no copy). Rows are clipped to
    ``params.max_grad_norm`` and the noise std is ``params.noise_multiplier *
    params.max_grad_norm``. engine: "fedcl" (``fedcl.privacy.per_example``, faster) or
    "opacus" (Opacus' GradSampleModule, hooks mode). ``generator`` draws the noise: None is
    torch's global generator (replayable by whoever seeds it), so callers under a threat model
    pass a secret one (``fedcl.privacy.randomness.secret_generator``); a seeded one only in
    tests. secure_mode: Opacus' floating-point-attack-resistant noise (more Gaussian draws).
    """
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0 (sample_rate * N), got {expected_batch_size}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    prepare_model(model)
    if engine == "fedcl":
        module: nn.Module = PerExampleModule(model)
    else:
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        module.forbid_grad_accumulation()  # one backward per step; a second one is a loop bug
    dp_opt = DPOptimizer(
        optimizer,
        noise_multiplier=params.noise_multiplier,  # std = sigma * C
        max_grad_norm=params.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )
    return module, dp_opt


def _reset_for_empty_batch(module: nn.Module) -> None:
    """After an empty batch: drop pending activations and give every parameter a (0, ...)
    per-sample gradient, so that the DP step adds noise only."""
    if isinstance(module, PerExampleModule):
        module.clear_pending()
    else:  # Opacus' GradSampleModule keeps its state on the layers and parameters
        for m in module.modules():
            if hasattr(m, "activations"):
                m.activations = []
            if hasattr(m, "max_batch_len"):
                del m.max_batch_len
        for p in _trainable(module):
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            p._forward_counter = 0
    for p in _trainable(module):
        p.grad_sample = p.new_zeros((0, *p.shape))


def check_per_example(module: nn.Module, *, batch_size: int) -> None:
    """Raise PerExampleGradientError unless every trainable parameter of ``module`` holds a
    per-sample gradient with leading dimension ``batch_size`` from exactly one backward pass.

    Call after ``loss.backward()`` and before ``optimizer.step()``.
    """
    if isinstance(module, PerExampleModule):
        for name, (calls, grads) in module.pending_calls().items():
            raise PerExampleGradientError(
                f"layer {name}: {calls - grads} of its {calls} forward call(s) took no part in the loss's "
                "backward pass; every forward through the DP model must feed the loss, and backward must "
                "run once per step"
            )
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
                "(make_private) model and call loss.backward() before checking"
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


def sum_per_patient(module: nn.Module, *, groups: torch.Tensor) -> int:
    """Replace every trainable parameter's per-example gradients (B, ...) by per-patient sums
    (P, ...), P the number of distinct patients among ``groups`` (B,); returns P.

    DPOptimizer then clips and noises one row per patient. Call after ``check_per_example``.
    """
    ids, inverse = torch.unique(groups.reshape(-1), return_inverse=True)  # ids: (P,), inverse: (B,)
    for p in _trainable(module):
        gs = p.grad_sample  # (B, *p.shape)
        if gs.shape[0] != inverse.numel():
            raise PerExampleGradientError(f"{gs.shape[0]} per-example rows for {inverse.numel()} patient ids")
        shape = (ids.numel(), *gs.shape[1:])
        if isinstance(module, PerExampleModule):
            out = module.buffer(("patients", id(p)), shape, gs)
        else:
            out = gs.new_empty(shape)
        p.grad_sample = out.zero_().index_add_(0, inverse.to(gs.device), gs)
    return int(ids.numel())


class DPTrainer:
    """DP-SGD for a caller-owned training loop.

    >>> trainer = DPTrainer(model, optimizer, params=params, num_examples=n)
    >>> for idx in trainer.batches(steps=s):
    ...     if idx.numel():
    ...         v1, v2 = augment.two_views(images[idx])
    ...         loss = info_nce(trainer.module(v1), key(v2), negatives, temperature=t)
    ...         loss.backward()
    ...     trainer.step(idx)
    >>> noise_multiplier, sample_rate, steps = trainer.accounting()
    >>> model = trainer.detach()

    With ``params.unit == "patient"``, ``groups`` (N,) gives each example's patient id; the
    batches then hold whole patients and ``step`` clips per patient.

    generator: draws the Poisson batches and the noise. None (deployment): a fresh one seeded
    from OS entropy (``fedcl.privacy.randomness.secret_generator``), so nobody who knows the
    configuration can replay them; pass a seeded one only in tests. secure_mode: Opacus' noise
    that resists floating-point attacks (on by default).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        params: DPParams,
        num_examples: int,
        groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = True,
        engine: Literal["fedcl", "opacus"] = "fedcl",
    ) -> None:
        self.params = params
        self.num_examples = int(num_examples)
        self.groups = check_groups(groups, num_examples=num_examples, unit=params.unit)
        self.expected_batch_size = expected_batch_size(params=params, num_examples=num_examples)
        from fedcl.privacy.randomness import secret_generator

        self._sample_gen = generator if generator is not None else secret_generator()
        device = next(model.parameters()).device
        noise_gen = self._sample_gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=self._sample_gen)))
        self.module, self.optimizer = make_private(
            model, optimizer, params=params, expected_batch_size=self.expected_batch_size,
            generator=noise_gen, secure_mode=secure_mode, engine=engine,
        )
        self._check = _checker(self.module, self.groups)
        self.steps = 0

    def batches(self, *, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` Poisson batches of example indices (whole patients in the patient unit)."""
        return dp_training_batches(
            num_examples=self.num_examples, sample_rate=self.params.sample_rate, steps=steps,
            generator=self._sample_gen, groups=self.groups,
        )

    def step(self, batch: torch.Tensor) -> None:
        """Check per-example gradients (and sum them per patient), clip, noise, update, clear.
        ``batch``: the indices ``batches()`` yielded; an empty one is a noise-only update
        (forward/backward may be skipped)."""
        self._check(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def accounting(self) -> tuple[float, float, int]:
        """(noise_multiplier, sample_rate, steps) for ``PrivacyLedger.record_dpsgd``; the
        sample rate is the patients' in the patient unit."""
        return self.params.noise_multiplier, self.params.sample_rate, self.steps

    def detach(self) -> nn.Module:
        """Remove hooks and per-sample attributes; returns the plain model (same parameters)."""
        return self.module.to_standard_module()


def _checker(module: nn.Module, groups: torch.Tensor | None) -> Callable[[torch.Tensor | int], None]:
    def check(batch: torch.Tensor | int) -> None:
        if isinstance(batch, int):
            if groups is not None:
                raise ValueError("the patient unit needs the batch's example indices, not only its size")
            size = batch
        else:
            size = int(batch.numel())
        if size == 0:
            _reset_for_empty_batch(module)
            return
        check_per_example(module, batch_size=size)
        if groups is not None:
            sum_per_patient(module, groups=groups[batch.cpu()])

    return check


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
    engine: Literal["fedcl", "opacus"] = "fedcl",
) -> tuple[nn.Module, DPOptimizer, Callable[[torch.Tensor | int], None]]:
    """(wrapped model, DP optimizer, check) for a loop that does forward/backward/step itself.

    Call ``check(batch)`` after ``loss.backward()`` and before ``optimizer.step()``, with the
    batch's example indices (B,) (or just B in the example unit). It verifies one per-example
    row per example, sums the rows per patient in the patient unit (``groups`` (N,) required
    then), and for an empty batch clears what the empty forward left behind, so the step adds
    noise only.
    """
    groups = check_groups(groups, num_examples=num_examples, unit=params.unit)
    ebs = expected_batch_size(params=params, num_examples=num_examples)
    module, dp_opt = make_private(model, optimizer, params=params, expected_batch_size=ebs,
                                  generator=generator, secure_mode=secure_mode, engine=engine)
    return module, dp_opt, _checker(module, groups)


def release_dp_training(model: nn.Module, train_model: nn.Module) -> None:
    """Remove the wrapping made by ``make_dp_training``; ``model`` keeps the trained weights."""
    if isinstance(train_model, (GradSampleModule, PerExampleModule)):
        inner = train_model.to_standard_module()
        if inner is not model:
            raise ValueError("train_model does not wrap this model")
