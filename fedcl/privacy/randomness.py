"""Where the randomness of the DP mechanisms comes from (DESIGN "Privacy model", item 4).

The ε of a subsampled Gaussian mechanism holds against someone who does not know which records
were sampled nor the noise that was drawn. The coordinator knows every configuration value and
seed, so every random draw of a DP mechanism (Poisson batches of DP-SGD, the records a release
samples and picks, the release noise, the DP-SGD noise) comes from a generator seeded here from
the operating system's entropy, once per call, in the site's own process.

What this is and is not: a ``torch.Generator`` (Mersenne Twister on the CPU, Philox on CUDA)
seeded with 64 bits from ``secrets`` (the OS CSPRNG). Nobody outside the process can know the seed,
so nobody can replay the draws; the generator itself is not a cryptographic one, so in theory an
observer of very many exact outputs could reconstruct its state. The outputs the site publishes
are always mixed with data and with further noise, never exact. Opacus' fully cryptographic
path (``secure_rng`` with torchcsprng) needs a torchcsprng build for this PyTorch, and none
exists (torchcsprng's last release, 0.2.1, is for PyTorch 1.8; Opacus 1.6 skips its own tests
of it for that reason). DP-SGD noise is drawn with Opacus' ``secure_mode`` noise (the sum of
several Gaussian draws, against floating-point attacks) all the same.

``replayable_generator`` is the one way to get the old, replayable streams back, for benchmarks
whose published numbers must be reproduced. It is loudly named and warns at every use.
"""

from __future__ import annotations

import logging
import secrets

import torch

log = logging.getLogger("fedcl.privacy")

INSECURE_WARNING = ("insecure_reproducible_dp: the DP mechanisms draw from a seed the coordinator knows; "
                    "this run is NOT differentially private against it (benchmarks only)")


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from 64 bits of OS entropy, unknown to anyone else."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


def warn_insecure(where: str) -> None:
    """Say, at every use, that a run draws its DP randomness from public seeds."""
    log.warning("%s (%s)", INSECURE_WARNING, where)


def mechanism_generator(public: torch.Generator | None, *, private: bool, insecure: bool,
                        where: str) -> torch.Generator | None:
    """The generator of one phase's DP mechanisms (Poisson sampling, picks, noise).

    private: a DP mechanism runs in this phase. Then a fresh secret generator, unless ``insecure``
    (insecure_reproducible_dp): then ``public``, the phase's reproducible stream, with a warning
    that names ``where``. Without a DP mechanism: ``public``.
    """
    if not private:
        return public
    if insecure:
        warn_insecure(where)
        return public
    return secret_generator()


def replayable_generator(seed: int, *, where: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with a public ``seed``: NOT private; warns every time."""
    warn_insecure(where)
    return torch.Generator(device=device).manual_seed(int(seed))


__all__ = ["INSECURE_WARNING", "mechanism_generator", "replayable_generator", "secret_generator",
           "warn_insecure"]
