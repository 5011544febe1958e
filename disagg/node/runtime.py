"""The loop every node runs. The main thread owns the node's state and its socket: it
takes the coordinator's messages, collects finished KV transfers, prepares the next
model step and, when it ends, reports it; the step itself (forward pass and sampling)
runs on a model thread. So a message that arrives during a step — a KV push or pull, a
new task, a release — is acted on at once, not after the step. A self-pipe wakes the
loop when a step or a transfer ends. The credit message doubles as the heartbeat.
Subclasses say what a message, a transfer and a step mean for their role.

Rule for subclasses: only ``execute`` runs on the model thread, and it touches nothing
but the batch it was given and the model; KV blocks of a batch in flight are never
freed until ``finish_step`` (a release during the step is deferred)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from disagg.engine.device import device_thread_pool
from disagg.engine.sequence import Sequence
from disagg.engine.worker import ModelWorker
from disagg.errors import RankFailedError
from disagg.node.link import CoordinatorLink
from disagg.node.local_queue import CounterQueue
from disagg.node.settings import NodeSettings, prepare_process, registration
from disagg.node.transfers import TransferDone, TransferThreads
from disagg.protocol.cluster import (
    CoordinatorToNode,
    Counters,
    DecodeTask,
    Goodbye,
    PrefillTask,
    Role,
    Shutdown,
)

if TYPE_CHECKING:
    from disagg.node.rank_transfers import RankTransfers

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # nothing ready: wait this long for a message (or a wake-up)


class Waker:
    """A self-pipe: any thread calls ``wake``; the loop's poll returns."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def wake(self, *_: object) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the loop is awake anyway
            os.write(self._write_fd, b"x")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 4096):
                pass


class NodeRuntime(ABC):
    def __init__(
        self,
        settings: NodeSettings,
        worker: ModelWorker,
        link: CoordinatorLink,
        transfers: TransferThreads | RankTransfers,
    ):
        self.settings = settings
        self.worker = worker
        self.link = link
        self.transfers = transfers
        self.block_size = worker.block_size
        self.generator = torch.Generator(worker.device).manual_seed(settings.seed)
        self.tasks_seen = 0
        self.stopping = False
        self.failed = False  # a rank of this node was lost: the node stops
        # Tasks waiting on this node, in merged-counter order (each role's own kind).
        self.waiting: CounterQueue[Any] = CounterQueue()
        self.waker = Waker()
        link.watch(self.waker.read_fd)
        transfers.on_done = self.waker.wake

    # -- role-specific ---------------------------------------------------------------

    @abstractmethod
    def handle(self, msg: CoordinatorToNode) -> None: ...

    @abstractmethod
    def on_transfer(self, done: TransferDone) -> None: ...

    def publish(self, counters: dict[str, float]) -> None:
        """A counter publication from the coordinator reorders the waiting tasks."""
        self.waiting.publish(counters)

    def sequence(self, task: PrefillTask | DecodeTask, streamed: Iterable[int] = ()) -> Sequence:
        """The engine's sequence for ``task``, after the tokens already ``streamed`` (a
        resumed decode). A seeded request gets its own generator, advanced past the
        draws the streamed tokens took, so its stream goes on as it would have."""
        params = task.sampling.to_params()
        seq = Sequence(
            seq_id=task.rid,
            prompt_token_ids=task.prompt_token_ids,
            params=params,
            arrival_time=task.arrival,
            client_id=task.client_id,
            output_token_ids=list(streamed),
        )
        if params.seed is not None:
            device = self.worker.device
            seq.generator = torch.Generator(device).manual_seed(params.seed)
            if not params.greedy:
                vocab = self.worker.model_config.vocab_size
                for _ in seq.output_token_ids:
                    torch.empty(vocab, device=device).exponential_(1, generator=seq.generator)
        return seq

    @abstractmethod
    def room(self) -> dict[str, int]:
        """Credit fields: free_tokens, queued, running, held."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether ``prepare_step`` would return a batch now."""

    @abstractmethod
    def prepare_step(self) -> Any | None:
        """Main thread: choose the next batch and give it its blocks (None: nothing)."""

    @abstractmethod
    def execute(self, batch: Any) -> Any:
        """Model thread: run ``batch``; return its result (or the exception it raised)."""

    @abstractmethod
    def finish_step(self, batch: Any, result: Any) -> None:
        """Main thread: take the result in, report it."""

    def between_steps(self) -> None:  # noqa: B027 - optional
        """Main thread, every turn of the loop (a step may be running)."""

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        last_room: dict[str, int] | None = None
        heard = time.monotonic()
        model = device_thread_pool(self.worker.device, "model")  # steps run on our GPU
        running: tuple[Any, Future[Any]] | None = None
        try:
            while not self.stopping:
                ready = running is None and self.has_work()
                messages = self.link.receive(0.0 if ready else IDLE_POLL_S)
                self.waker.drain()
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
                if running is not None and running[1].done():
                    result = running[1].result()
                    if isinstance(result, RankFailedError):
                        self._lose_node(str(result))
                        break
                    self.finish_step(running[0], result)
                    running = None
                if self.transfers.failure is not None:
                    self._lose_node(self.transfers.failure)
                    break
                self.between_steps()  # after finish_step: slots it freed are taken now
                if running is None:
                    batch = self.prepare_step()
                    if batch is not None:
                        future = model.submit(self._guarded, batch)
                        future.add_done_callback(self.waker.wake)
                        running = (batch, future)
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
                model.shutdown(wait=False)

    def _lose_node(self, why: str) -> None:
        """A rank is lost: this node cannot run its requests any more. It says goodbye
        (the coordinator re-dispatches them, as for any node lost) and exits."""
        log.error("a rank of this node failed (%s): the node stops", why)
        self.failed = True

    def _guarded(self, batch: Any) -> Any:
        try:
            return self.execute(batch)
        except Exception as e:  # reported by finish_step; the node keeps serving
            log.exception("model step failed")
            return e


def start_node(settings: NodeSettings, node_class: type[NodeRuntime]) -> None:
    """Everything a node process does: load the model (here, or on ``tp x pp`` rank
    processes that this process leads), take a fresh KV endpoint (pairs with peers' ranks
    form through the store on first use), register with the coordinator, run until told
    to stop. Exits without tearing transfer groups down (a dead peer can make that hang);
    a rank lost is the node lost (exit status 1; ranks die with this process)."""
    from disagg.engine.parallel.leader import ParallelModelWorker
    from disagg.engine.parallel.plan import RankKVService
    from disagg.node.rank_transfers import RankTransfers, make_transfer_threads
    from kv_transfer.pairs import configure_nccl_error_handling, new_endpoint

    prepare_process(settings)
    configure_nccl_error_handling()  # before any NCCL group: a broken pair is not the node
    config = settings.engine_config()
    endpoint = new_endpoint(settings.node_id)
    worker: ModelWorker
    transfers: TransferThreads | RankTransfers
    if config.world_size > 1:
        service = RankKVService(
            settings.store, endpoint, settings.transfer_timeout, settings.checksums
        )
        pworker = ParallelModelWorker(config, kv_service=service)
        worker = pworker
        transfers = RankTransfers(pworker.group.kv_conns, pworker.kv_layout)
    else:
        # A prefill node never decodes: no decode graphs (their memory goes to the KV pool).
        worker = ModelWorker(
            config, decode_graphs=settings.role in ("decode", "colocated"), transfers=True
        )
        # Both sides of a pair are alive and told to move KV at the same moment when it
        # forms. They swap device identities then: two nodes on one GPU move KV over CUDA
        # IPC (NCCL refuses two ranks on one device), swapping their pools' handles;
        # others over NCCL (CUDA) or gloo (CPU).
        transfers = make_transfer_threads(
            settings.store,
            endpoint,
            0,
            worker.kv_cache,
            worker.kv_layout,
            settings.transfer_timeout,
            checksums=settings.checksums,
        )
    layout = worker.kv_layout
    link = CoordinatorLink(settings.coordinator, settings.node_id, settings.curve_server_key)
    link.register(registration(settings, worker, endpoint))
    log.info(
        "%s registered (KV endpoint %s, tp %d x pp %d)", settings.node_id, endpoint,
        layout.tp, layout.pp,
    )  # fmt: skip
    node = node_class(settings, worker, link, transfers)
    node.run()
    transfers.close()
    if not node.failed:
        worker.close()  # a rank group: its ranks leave their process groups (none: a no-op)
    logging.shutdown()
    os._exit(1 if node.failed else 0)


def node_main(
    role: Role, node_class: type[NodeRuntime], description: str, argv: list[str] | None = None
) -> None:
    """``python -m prefill_node`` / ``python -m decode_node``: parse the node's command
    line and run it."""
    parser = argparse.ArgumentParser(prog=f"python -m {role}_node", description=description)
    NodeSettings.add_arguments(parser)
    start_node(NodeSettings.from_args(role, parser.parse_args(argv)), node_class)
