"""DP-SGD step time against plain SGD on the same encoder, batch and loss, side by side.

One step: two augmented views of B images (1x28x28), InfoNCE against K fixed external
negatives, each view in its own forward call. Key encoder "online": both views through the
trained model (two forward calls through the DP-wrapped model); "global": the query through
the trained model and the key through a frozen copy (fedcl's default; that forward is the same
in every variant). A DP step adds per-example gradients, per-example clipping and noise
(Opacus' DPOptimizer). Two DP variants differ only in how per-example gradients are computed:

    dp-opacus   Opacus' GradSampleModule, hooks mode (what fedcl used before)
    dp-fedcl    fedcl.privacy.per_example, noise from torch's global generator (replayable)
    dp-secure   dp-fedcl with what a site runs: noise from a generator seeded from OS entropy
                (fedcl.privacy.randomness) and Opacus' secure_mode noise (4 Gaussian draws per
                coordinate instead of 1, against floating-point attacks); its line also gives
                the ratio dp-secure / dp-fedcl, the cost of secure randomness

Steps of the three variants are interleaved so that machine load affects them alike; the
ratios are medians over steps of each step's DP time / the plain step time next to it.

    python bench/dp_overhead.py --threads 1            # CPU, B=256, K=4096
    python bench/dp_overhead.py --threads 1 --profile  # plus where a DP step's time goes
    python bench/dp_overhead.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from fedcl.losses import info_nce
from fedcl.models import build_model
from fedcl.privacy.dp import DPParams, make_dp_training
from fedcl.privacy.randomness import secret_generator

VARIANTS = ("sgd", "dp-opacus", "dp-fedcl", "dp-secure")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=4096)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--key-encoder", choices=["online", "global", "both"], default="both")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one step per variant")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = torch.device(args.device)
    torch.manual_seed(0)

    b, temperature = args.batch, 0.2
    v1 = torch.rand(b, 1, 28, 28, device=device)
    v2 = (v1 + 0.1 * torch.randn_like(v1)).clamp(0, 1)
    negs = F.normalize(torch.randn(args.negatives, 128, device=device), dim=1)  # (K, d), detached queue

    base = build_model(arch="cnn", in_channels=1, width=args.width).to(device)
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in base.parameters())
    params = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=b / 60000)
    plain = copy.deepcopy(base).train()
    runs = {"sgd": (plain, torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9), None)}
    for name, engine in (("dp-opacus", "opacus"), ("dp-fedcl", "fedcl")):
        model = copy.deepcopy(base).train()
        runs[name] = make_dp_training(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                      params=params, num_examples=60000, engine=engine)
    model = copy.deepcopy(base).train()
    runs["dp-secure"] = make_dp_training(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                         params=params, num_examples=60000, engine="fedcl",
                                         generator=secret_generator(device), secure_mode=True)

    def step(name: str, key_encoder: str) -> float:
        model, opt, check = runs[name]
        _sync(device)
        t0 = time.perf_counter()
        q = model(v1)
        if key_encoder == "online":
            k = model(v2)  # second forward call through the trained (wrapped) model
        else:
            with torch.no_grad():
                k = frozen(v2)
        loss = info_nce(q, k, negs, temperature=temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if check is not None:
            check(b)
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    modes = ["online", "global"] if args.key_encoder == "both" else [args.key_encoder]
    print(
        f"device={device} threads={torch.get_num_threads()} batch={b} negatives={args.negatives} "
        f"encoder=cnn(width={args.width}, {n_params / 1e6:.2f}M params) steps={args.steps} "
        f"torch={torch.__version__}"
    )
    print(f"start: {_load()} (cpus: {os.cpu_count()})")
    for mode in modes:
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(args.warmup + args.steps):
            for name in VARIANTS:
                t = step(name, mode)
                if i >= args.warmup:
                    times[name].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        line = f"key_encoder={mode:6s}  sgd {1e3 * med['sgd']:7.1f} ms"
        for name in VARIANTS[1:]:
            paired = sorted(d / s for d, s in zip(times[name], times["sgd"], strict=False))
            q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
            line += (f" | {name} {1e3 * med[name]:7.1f} ms  ratio {statistics.median(paired):.2f}x"
                     f" (IQR {q1:.2f}-{q3:.2f})")
        paired = sorted(d / s for d, s in zip(times["dp-secure"], times["dp-fedcl"], strict=False))
        line += f" | dp-secure / dp-fedcl {statistics.median(paired):.3f}x"
        print(line + "  (target <= 2x)")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name in VARIANTS:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step(name, mode)
                print(f"\n-- {name}, key_encoder={mode}: one step, ops by self CPU time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"end: {_load()}")


if __name__ == "__main__":
    main()
