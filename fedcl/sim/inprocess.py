"""The federation in one process: Flower's Grid, delivering each message to the ClientApp right here.

``fedcl simulate`` runs the shipped ServerApp and ClientApp under Flower's simulation engine
(Ray: actor processes, a message queue polled every 0.1 s). ``InProcessGrid`` runs the same two
apps with no engine at all: ``send_and_receive`` calls the ClientApp on each message in turn, in
this process, with the node's own persistent ``Context``, and hands back its reply, or the error
reply Flower writes when a ClientApp raises. Nodes are configured as Flower's simulation
configures them (``partition-id``, ``num-partitions``), so ``fedcl.client.app.SimulatedSites`` turns
node i into site i with the same partition, token and state folder as under Ray.

What differs from Ray, on purpose: sites run one after another (each with the torch threads it
would have under Ray, ``fedcl.sim.simulate.site_threads``), node and run ids are small fixed numbers
instead of random ones, and a reply that comes back after ``timeout`` is held back (pullable
later) rather than the handler being interrupted.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger("flwr.fedcl")

FIRST_NODE_ID = 1001  # node i is FIRST_NODE_ID + i (Flower draws random ids; 1 is the SuperLink's)


def simulation_node_configs(num_nodes: int) -> list[dict[str, Any]]:
    """The node configs Flower's simulation gives its nodes: partition i of ``num_nodes``."""
    return [{PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes} for i in range(num_nodes)]


@contextmanager
def task_identity(run_id: int) -> Iterator[None]:
    """Who is sending: Flower's ``Message(...)`` reads it for each message the ServerApp creates
    (``flwr.simulation.run_simulation`` sets the same values for good; this puts back the old ones)."""
    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


class InProcessGrid(Grid):
    """A Grid whose nodes are ``client_app`` with one ``node_configs`` entry each, in this process.

    Each node keeps one ``Context`` for the run (``context.state`` carries over from message to
    message, as in Flower's simulation); like Flower, a handler that raises leaves it unchanged.
    """

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], *, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id=run_id)
        self.contexts: dict[int, Context] = {
            FIRST_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_NODE_ID + i, node_config=dict(config),
                                       state=RecordDict(), run_config={})
            for i, config in enumerate(node_configs)}
        self._replies: dict[str, Message] = {}  # message id -> its reply, until pulled
        self.sent: list[Message] = []  # every message accepted, in order (for tests and counts)

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        for context in self.contexts.values():
            context.run_id = run.run_id

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; returns the ids of those delivered (a message to a node that is
        not in the grid is dropped, with a log line, as Flower's link state drops it)."""
        ids, _ = self._deliver(messages, deadline=None)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Deliver the messages one by one; replies that came back within ``timeout`` seconds of the
        call (all of them when it is None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ids, in_time = self._deliver(messages, deadline=deadline)
        return self.pull_messages(i for i in ids if i in in_time)

    def _deliver(self, messages: Iterable[Message], *, deadline: float | None) -> tuple[list[str], set[str]]:
        ids: list[str] = []
        in_time: set[str] = set()
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            meta = msg.metadata
            if meta.reply_to_message_id != "" or meta.ttl <= 0 or meta.delivered_at != "":
                raise ValueError(f"Invalid message: {msg}")  # what Flower's InMemoryGrid raises
            if meta.dst_node_id not in self.contexts:
                log.error("message %s to node %d dropped: no such node in the in-process grid",
                          meta.message_id, meta.dst_node_id)
                continue
            self.sent.append(msg)
            self._replies[meta.message_id] = self._handle(msg)
            ids.append(meta.message_id)
            if deadline is None or time.monotonic() <= deadline:
                in_time.add(meta.message_id)
        return ids, in_time

    def _handle(self, msg: Message) -> Message:
        """The node's reply to ``msg``: what the ClientApp returns, or Flower's error reply if it raises."""
        node = msg.metadata.dst_node_id
        # the ClientApp gets its own copies, as it would over Ray or the wire: it cannot change what the
        # ServerApp holds, and a handler that fails half-way leaves the node's context as it was
        delivered, context = copy.deepcopy(msg), copy.deepcopy(self.contexts[node])
        threads = torch.get_num_threads()  # a handler sets its own (train.threads); the server keeps its
        try:
            reply = self.client_app(message=delivered, context=context)
        except Exception as exc:  # Flower's simulation worker: the exception becomes an error reply
            log.debug("node %d raised on a %s message", node, msg.metadata.message_type, exc_info=True)
            wrapped = ClientAppException(str(exc))
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(wrapped)}:<'{wrapped}'>"), reply_to=msg)
        else:
            self.contexts[node] = context
        finally:
            torch.set_num_threads(threads)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return reply


def run_apps(server_app: ServerApp, client_app: ClientApp, *, num_nodes: int,
             run_id: int = 1) -> InProcessGrid:
    """Run ``server_app`` against ``num_nodes`` nodes of ``client_app`` in this process (what
    ``flwr.simulation.run_simulation`` does with Ray); returns the grid, whose nodes' contexts hold
    their final state. An exception of the ServerApp propagates."""
    grid = InProcessGrid(client_app, simulation_node_configs(num_nodes), run_id=run_id)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with task_identity(run_id):
        server_app(grid=grid, context=context)
    return grid


def run_federation_inprocess(config, *, out_dir: Path, num_sites: int | None = None, observer=None,
                             insecure_reproducible_dp: bool = False):
    """Run (or resume) the federation of ``config`` in this process: the shipped ServerApp loop and
    ClientApp handlers on an ``InProcessGrid``, the queue service on loopback as ``fedcl simulate``
    starts it. Returns the ``fedcl.server.app.FederationResult`` (``history``: the per-round records).

    ``insecure_reproducible_dp``: the sites draw their DP noise from public seeds (benchmarks
    only: the runs reproduce, but the noise is NOT private; the client warns at every round)."""
    from fedcl.client.app import make_client_app
    from fedcl.server.app import make_server_app
    from fedcl.sim.simulate import loopback_federation, site_threads, with_num_sites

    cfg = with_num_sites(config, num_sites)
    out_dir = Path(out_dir).resolve()
    results: list = []
    with loopback_federation(cfg, out_dir=out_dir, threads=site_threads(cfg)) as (link, simulated):
        if insecure_reproducible_dp:
            simulated = replace(simulated, insecure_reproducible_dp=True)
        server_app = make_server_app(config=cfg, out_dir=out_dir, queue=link, observer=observer,
                                     results=results)
        run_apps(server_app, make_client_app(simulated=simulated), num_nodes=cfg.data.num_sites)
    return results[0]


__all__ = ["FIRST_NODE_ID", "InProcessGrid", "run_apps", "run_federation_inprocess",
           "simulation_node_configs", "task_identity"]
