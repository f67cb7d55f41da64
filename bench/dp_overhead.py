"""DP-SGD step time against plain SGD on the same encoder, batch and loss, side by side.

One step: two augmented views of B images (1x28x28), InfoNCE against K fixed external
negatives, each view in its own forward call. Key encoder "online": both views through the
trained model (two forward calls through the Opacus-wrapped model); "global": the query through
the trained model and the key through a frozen copy (fedcl's default). The DP step adds Opacus
per-sample gradients, per-example clipping and noise. Steps of the two variants are interleaved
so that machine load affects both alike.

    python bench/dp_overhead.py                  # CPU, B=256, K=4096
    python bench/dp_overhead.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from fedcl.losses import info_nce
from fedcl.models import build_model
from fedcl.privacy.dp import DPParams, make_dp_training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    plain = copy.deepcopy(base).train()
    private = copy.deepcopy(base).train()
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in base.parameters())
    params = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=b / 60000)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    dp_model, opt_dp, check = make_dp_training(
        private, torch.optim.SGD(private.parameters(), lr=0.01, momentum=0.9), params=params, num_examples=60000
    )

    def step(model, opt, key_encoder: str, dp: bool) -> float:
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
        if dp:
            check(b)
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    modes = ["online", "global"] if args.key_encoder == "both" else [args.key_encoder]
    print(f"device={device} threads={torch.get_num_threads()} batch={b} negatives={args.negatives} "
          f"encoder=cnn(width={args.width}, {n_params / 1e6:.2f}M params) steps={args.steps}")
    for mode in modes:
        times: dict[str, list[float]] = {"sgd": [], "dpsgd": []}
        for i in range(args.warmup + args.steps):
            t_plain = step(plain, opt_plain, mode, dp=False)
            t_dp = step(dp_model, opt_dp, mode, dp=True)
            if i >= args.warmup:
                times["sgd"].append(t_plain)
                times["dpsgd"].append(t_dp)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"key_encoder={mode:6s}  sgd {1e3 * med['sgd']:8.1f} ms/step   dp-sgd {1e3 * med['dpsgd']:8.1f} ms/step   "
              f"ratio dp/sgd {med['dpsgd'] / med['sgd']:.2f}x  (target <= 2x)")


if __name__ == "__main__":
    main()
