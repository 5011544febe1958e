"""The loop every node runs: take the coordinator's messages, collect finished KV
transfers, run one model step, tell the coordinator its room (which doubles as the
heartbeat). Subclasses say what a message, a transfer and a step mean for their role."""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod

import torch

from disagg.engine.worker import ModelWorker
from disagg.node.link import CoordinatorLink
from disagg.node.settings import NodeSettings, prepare_process, registration
from disagg.node.transfers import TransferDone, TransferThreads
from disagg.protocol.cluster import CoordinatorToNode, Counters, Goodbye, Shutdown

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # nothing to do: wait this long for a message
BUSY_POLL_S = 0.002  # transfers in flight: look at them this often


class NodeRuntime(ABC):
    def __init__(
        self,
        settings: NodeSettings,
        worker: ModelWorker,
        link: CoordinatorLink,
        transfers: TransferThreads,
    ):
        self.settings = settings
        self.worker = worker
        self.link = link
        self.transfers = transfers
        self.block_size = worker.block_size
        self.generator = torch.Generator(worker.device).manual_seed(settings.seed)
        self.tasks_seen = 0
        self.stopping = False

    # -- role-specific ---------------------------------------------------------------

    @abstractmethod
    def handle(self, msg: CoordinatorToNode) -> None: ...

    @abstractmethod
    def on_transfer(self, done: TransferDone) -> None: ...

    @abstractmethod
    def step(self) -> bool:
        """Runs at most one model batch; True if it did any work."""

    @abstractmethod
    def publish(self, counters: dict[str, float]) -> None: ...

    @abstractmethod
    def room(self) -> dict[str, int]:
        """Credit fields: free_tokens, queued, running, held."""

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        last_room: dict[str, int] | None = None
        heard = time.monotonic()
        try:
            while not self.stopping:
                busy = self.has_work()
                wait = 0.0 if busy else (BUSY_POLL_S if self.transfers.in_flight else IDLE_POLL_S)
                messages = self.link.receive(wait)
                if messages:
                    heard = time.monotonic()
                elif time.monotonic() - heard > self.settings.coordinator_timeout:
                    log.error(
                        "no word from the coordinator for %.0f s: stopping",
                        time.monotonic() - heard,
                    )
                    break
                for msg in messages:
                    if isinstance(msg, Counters):
                        self.publish(msg.values)
                    elif isinstance(msg, Shutdown):
                        self.stopping = True
                    else:
                        self.handle(msg)
                for done in self.transfers.completed():
                    self.on_transfer(done)
                self.step()
                room = {**self.room(), "tasks_seen": self.tasks_seen}
                if room != last_room or self.link.heartbeat_due(self.settings.heartbeat_interval):
                    self.link.credit(**room)
                    last_room = room
        except KeyboardInterrupt:
            pass
        finally:
            try:
                self.link.send(Goodbye())
            finally:
                self.link.close()

    @abstractmethod
    def has_work(self) -> bool: ...


def start_node(settings: NodeSettings, node_class: type[NodeRuntime]) -> None:
    """Everything a node process does: load the model, join the KV transfer group,
    register with the coordinator, run until told to stop. Exits without tearing the
    process group down (a dead peer can make that hang)."""
    from kv_transfer import init_transfer_group, make_backend

    prepare_process(settings)
    worker = ModelWorker(settings.engine_config())
    backend_name = "nccl" if worker.device.type == "cuda" else "gloo"
    init_transfer_group(
        settings.rank,
        settings.world_size,
        settings.store,
        backend_name,
        timeout=max(60.0, settings.transfer_timeout),
        host_store=False,
    )
    backend = make_backend(backend_name, device=worker.device, checksums=settings.checksums)
    transfers = TransferThreads(
        backend, worker.kv_cache.layers, worker.block_size, settings.transfer_timeout
    )
    link = CoordinatorLink(settings.coordinator, settings.node_id, settings.curve_server_key)
    link.register(registration(settings, worker))
    log.info("%s registered (rank %d)", settings.node_id, settings.rank)
    node = node_class(settings, worker, link, transfers)
    node.run()
    transfers.close()
    logging.shutdown()
    os._exit(0)


def now() -> float:
    return time.monotonic()
