"""The queue service for one run on this machine: started with the run, stopped after it.

Both ways of running a federation on one machine start it here: ``fedcl simulate`` (its sites'
tokens are baked into its ClientApp) and the ServerApp of ``flwr run .`` when the run's config
names no queue service (no ``server.coordinator_token``; ``fedcl.server.app.main``). The service
runs in this process (a gRPC server thread) on 127.0.0.1 with a generated coordinator token and
one generated token per site; nothing outside this machine can reach it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# the folder under the run's out_dir where `flwr run`'s in-run queue leaves each site its token
SITE_TOKEN_DIR_NAME = "in-run-queue-tokens"
TOKEN_SUFFIX = ".token"


@contextmanager
def loopback_queue(cfg, *, out_dir: Path,
                   site_ids: Sequence[str]) -> Iterator[tuple[object | None, dict[str, str]]]:
    """Serve the run's queue on 127.0.0.1 (a free port) with fresh tokens for ``site_ids``.

    Restored from ``out_dir``'s snapshot when the run resumes from a checkpoint. Yields
    ``(QueueLink, site tokens)``, or ``(None, site tokens)`` when ``queue.enabled`` is false;
    stops the service on the way out.
    """
    from fedcl.queue import EmbeddingQueue
    from fedcl.server.app import QUEUE_SNAPSHOT_NAME, QueueLink
    from fedcl.server.checkpoint import find_checkpoint
    from fedcl.server.queue_service import ServeSettings, start_queue_server

    out_dir = Path(out_dir)
    site_tokens = {site: secrets.token_urlsafe(24) for site in site_ids}
    if not cfg.queue.enabled:
        yield None, site_tokens
        return
    ckpt_dir = Path(cfg.server.checkpoint_dir) if cfg.server.checkpoint_dir else out_dir / "checkpoints"
    snapshot = out_dir / QUEUE_SNAPSHOT_NAME
    q = cfg.queue
    if find_checkpoint(ckpt_dir) is not None and snapshot.exists():
        queue = EmbeddingQueue.restore(snapshot)
    else:
        queue = EmbeddingQueue(dim=cfg.model.proj_dim, capacity=q.capacity, per_site_quota=q.per_site_quota,
                               max_staleness=q.max_staleness, dtype=q.dtype)
    coordinator_token = secrets.token_urlsafe(24)
    server = start_queue_server(queue, ServeSettings(
        host="127.0.0.1", port=0, site_tokens=site_tokens, coordinator_token=coordinator_token,
        snapshot_path=snapshot, max_message_bytes=4 << 20, audit_log=out_dir / "queue-audit.jsonl"))
    try:
        yield QueueLink(address=f"127.0.0.1:{server.port}", tls=False, coordinator_token=coordinator_token,
                        snapshot_path=snapshot), site_tokens
    finally:
        server.stop(grace=2.0)


@contextmanager
def site_token_files(out_dir: Path, site_tokens: dict[str, str]) -> Iterator[Path]:
    """Each site's token in ``out_dir/in-run-queue-tokens/<site>.token`` (owner-only), for the run's
    simulated sites to read (they run in other processes of this machine); removed after the run."""
    folder = Path(out_dir) / SITE_TOKEN_DIR_NAME
    shutil.rmtree(folder, ignore_errors=True)  # a killed earlier run's tokens: stale
    folder.mkdir(parents=True, mode=0o700)
    try:
        for site, token in site_tokens.items():
            path = folder / f"{site}{TOKEN_SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["SITE_TOKEN_DIR_NAME", "TOKEN_SUFFIX", "loopback_queue", "site_token_files"]
