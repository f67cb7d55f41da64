"""What `train.persist_optimizer` adds to a site's Flower Context, per encoder.

With `train.persist_optimizer = true` the client keeps its Adam state (two moments per
parameter and the step counts) in `Context.state` (`fedcl.client.app.save_optimizer_state`), and the
context travels between the SuperNode and the ClientApp process with every message. This
script builds each encoder, takes one Adam step so that every moment exists, stores the state
as the client does, and prints the size of the serialized context and the time to serialize it.

    python bench/context_state.py               # writes bench/results/context_state.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.serde import context_to_proto  # noqa: E402

from fedcl.client.app import save_optimizer_state  # noqa: E402
from fedcl.models import build_model  # noqa: E402

# (arch, width, input channels, image side)
ENCODERS = [("cnn", 16, 1, 28), ("cnn", 32, 1, 28), ("resnet18", 64, 3, 32)]


def measure(arch: str, width: int, channels: int, side: int, *, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch=arch, in_channels=channels, width=width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, channels, side, side)).sum().backward()
    optimizer.step()
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    save_optimizer_state(context, optimizer.state_dict(), optimizer="adam")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        blob = context_to_proto(context).SerializeToString()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {"arch": arch, "width": width, "params": params, "bytes": len(blob),
            "raw_bytes": 2 * 4 * params, "seconds": min(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3,
                   help="serializations per encoder (the fastest is printed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "context_state.txt")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    lines = [
        "Context.state with train.persist_optimizer: one Adam state, serialized with flwr's context_to_proto",
        f"{'encoder':<16}{'parameters':>12}{'serialized MiB':>16}{'x 2 moments fp32':>18}{'serialize s':>13}"]
    for arch, width, channels, side in ENCODERS:
        m = measure(arch, width, channels, side, repeats=args.repeats)
        lines.append(f"{arch + ' w' + str(width):<16}{m['params'] / 1e6:>11.2f}M{m['bytes'] / 2**20:>16.1f}"
                     f"{m['bytes'] / m['raw_bytes']:>18.2f}{m['seconds']:>13.2f}")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
