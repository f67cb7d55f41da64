"""What fedcl adds to one site's local round, measured side by side in one run.

    python bench/overhead.py [--images 1024] [--width 16] [--repeats 7]

A fedcl site round = fetch K negatives from the queue service + fedcl.train.local_round
(two-view augmentation, query/key InfoNCE with the frozen round model as key encoder, Adam)
+ encode and push the embeddings it shares. The queue is the real gRPC service
(fedcl/server/queue_service.py) on 127.0.0.1 reached through fedcl/wire/queue_client.py, holding
another site's embeddings. The baseline is a plain PyTorch loop that does the same training
on the same data: same model and initial weights, same augmentation, same batches and random
draws, same negatives (handed over in memory), no queue I/O. The two alternate ``--repeats``
times; the ratio of the median totals is printed (target: within 1.15x), with how each
round's time splits between augmentation, forward/backward/step and queue I/O. Both loops
compute the same losses from the same draws: their mean losses are printed as a check.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedcl.augment import TwoViewAugment  # noqa: E402
from fedcl.models import build_model, canonical_state_dict, load_canonical_state_dict  # noqa: E402
from fedcl.queue import EmbeddingQueue  # noqa: E402
from fedcl.server.queue_service import ServeSettings, start_queue_server  # noqa: E402
from fedcl.train import RoundRecipe, local_round  # noqa: E402
from fedcl.wire.queue_client import QueueClient  # noqa: E402

TOKENS = {"site-0": "overhead-site-0-token-0123456789", "site-1": "overhead-site-1-token-0123456789"}
COORDINATOR = "overhead-coordinator-token-0123456789"


def plain_round(model, images, *, negatives, batch_size, lr, temperature, augment, seed) -> dict:
    """The same training as local_round, written as a plain PyTorch loop."""
    gen = torch.Generator().manual_seed(seed)
    key_model = copy.deepcopy(model).eval()
    for p in key_model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-6)
    batches = torch.randperm(images.shape[0], generator=gen).split(batch_size)
    t_aug = t_step = 0.0
    losses = []
    for idx in batches:
        t0 = time.perf_counter()
        x = images[idx].float().div_(255.0)
        v1, v2 = augment.two_views(x, generator=gen)
        t1 = time.perf_counter()
        q1, q2 = model(v1), model(v2)
        with torch.no_grad():
            k1, k2 = key_model(v1), key_model(v2)
        loss = 0.5 * (_infonce(q1, k2, negatives, temperature) + _infonce(q2, k1, negatives, temperature))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t_step += time.perf_counter() - t1
        t_aug += t1 - t0
        losses.append(float(loss.detach()))
    return {"augment": t_aug, "train": t_step, "loss": float(np.mean(losses))}


def _infonce(q, k, negatives, temperature):
    b = q.shape[0]
    sim = q @ k.T  # (B, B): diagonal = positives, off-diagonal = in-batch negatives
    pos = sim.diagonal()[:, None]
    off = sim[~torch.eye(b, dtype=torch.bool)].view(b, b - 1)
    logits = torch.cat([pos, q @ negatives.T, off], dim=1) / temperature  # (B, 1 + K + B - 1)
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--negatives", type=int, default=4096)
    p.add_argument("--num-push", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fedcl.data import load_fashion_mnist

    images = load_fashion_mnist(root=args.data, split="train").images[:args.images]  # (N, 1, 28, 28) uint8
    torch.manual_seed(0)
    spec = {"in_channels": 1, "width": args.width}
    init = canonical_state_dict(build_model(**spec))
    augment = TwoViewAugment()
    lr, temperature, seed = 1e-3, 0.2, 7

    queue = EmbeddingQueue(dim=128, capacity=65536, per_site_quota=16384, max_staleness=2, dtype="float16",
                           sites=set(TOKENS))
    server = start_queue_server(
        queue,
        ServeSettings(host="127.0.0.1", port=0, site_tokens=TOKENS, coordinator_token=COORDINATOR,
                      max_message_bytes=4 << 20),
    )
    address = f"127.0.0.1:{server.port}"
    try:
        with QueueClient(address, site_id="coordinator", token=COORDINATOR) as coord:
            coord.advance(1)
        with QueueClient(address, site_id="site-1", token=TOKENS["site-1"]) as other:
            fill = F.normalize(torch.randn(2 * args.negatives, 128), dim=1)
            other.push(fill, round=1, model_version=1)
        client = QueueClient(address, site_id="site-0", token=TOKENS["site-0"])
        fed, plain = [], []

        def run_fedcl() -> dict:
            model = build_model(**spec)
            load_canonical_state_dict(model, init)
            t0 = time.perf_counter()
            negatives = client.sample(args.negatives, max_age=2)  # (K, 128) float32
            t_sample = time.perf_counter() - t0
            recipe = RoundRecipe(epochs=1, batch_size=args.batch_size, lr=lr, temperature=temperature,
                                 in_batch_negatives=True, key_encoder="global", num_push=args.num_push)
            res = local_round(model, images, negatives, recipe, augment=augment, device="cpu", seed=seed)
            t1 = time.perf_counter()
            client.push(res.embeddings, round=1, model_version=1)
            t_push = time.perf_counter() - t1
            m = res.metrics
            return {"total": time.perf_counter() - t0, "sample": t_sample, "push": t_push,
                    "augment": m["seconds_augment"], "train": m["seconds_train"],
                    "encode": m["seconds_encode_push"], "loss": m["loss"], "negatives": negatives}

        def run_plain(negatives: torch.Tensor) -> dict:
            model = build_model(**spec)
            load_canonical_state_dict(model, init)
            t0 = time.perf_counter()
            out = plain_round(model, images, negatives=negatives, batch_size=args.batch_size, lr=lr,
                              temperature=temperature, augment=augment, seed=seed)
            out["total"] = time.perf_counter() - t0
            return out

        warm = run_fedcl()  # untimed warm-up of both paths (allocator, gRPC channel, kernels)
        run_plain(warm["negatives"])
        for rep in range(args.repeats):
            if rep % 2 == 0:  # alternate the order: neither path always runs first
                fed.append(run_fedcl())
                plain.append(run_plain(fed[-1]["negatives"]))
            else:
                plain.append(run_plain(warm["negatives"]))
                fed.append(run_fedcl())
            print(f"repeat {rep + 1}: fedcl {fed[-1]['total']:.2f} s, plain {plain[-1]['total']:.2f} s",
                  flush=True)
        client.close()
    finally:
        server.stop(0)

    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    f_total, p_total = med(fed, "total"), med(plain, "total")
    print(
        f"\none site round: {args.images} Fashion-MNIST images, CNN width {args.width}, "
        f"batch {args.batch_size}, 1 local epoch, K = {args.negatives} negatives, {args.num_push} pushed, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print(f"queue: real gRPC service on loopback ({address}), float16 storage, float32 wire")
    print(f"mean loss, same batches and draws: fedcl {fed[0]['loss']:.6f}  "
          f"plain {plain[0]['loss']:.6f} (repeat 1)")
    print(f"\n{'':28s}{'fedcl':>10s}{'plain':>10s}")
    for label, fk, pk in [("augmentation", "augment", "augment"),
                          ("forward/backward/step", "train", "train")]:
        print(f"{label:28s}{med(fed, fk):9.2f}s{med(plain, pk):9.2f}s")
    print(f"{'queue fetch (gRPC Sample)':28s}{med(fed, 'sample'):9.2f}s{'–':>10s}")
    print(f"{'encode embeddings to push':28s}{med(fed, 'encode'):9.2f}s{'–':>10s}")
    print(f"{'queue push (gRPC Push)':28s}{med(fed, 'push'):9.2f}s{'–':>10s}")
    print(f"{'total':28s}{f_total:9.2f}s{p_total:9.2f}s")
    ratio = f_total / p_total
    io = med(fed, "sample") + med(fed, "push")
    paired = statistics.median(f["total"] / q["total"] for f, q in zip(fed, plain, strict=False))
    print(f"\nratio fedcl / plain = {ratio:.3f}x (ratio of medians); median of paired ratios {paired:.3f}x "
          f"(target <= 1.15x): {'PASS' if max(ratio, paired) <= 1.15 else 'FAIL'}")
    print(f"queue I/O {io:.3f} s = {100 * io / f_total:.1f}% of the fedcl round; "
          f"encoding the pushed embeddings {100 * med(fed, 'encode') / f_total:.1f}%")
    print(
        "per-repeat ratios: "
        + ", ".join(f"{f['total'] / q['total']:.3f}" for f, q in zip(fed, plain, strict=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
