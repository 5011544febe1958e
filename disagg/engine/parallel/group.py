"""The leader's side of a rank group: starts ``tp x pp`` rank processes, sends each
message to every rank and collects one answer from each, and stops them.

A rank that raises, or whose process ends, fails the group: the leader stops the
other ranks (which may be blocked in a collective with the dead one) and raises
:class:`RankFailedError`; the group is unusable afterwards. Ranks die with the leader
(``PR_SET_PDEATHSIG``, and the leader's pipe closing), and a finaliser stops them when
the group is garbage-collected or the interpreter exits without ``close()``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import NoReturn

import torch.distributed as dist

from disagg.engine.parallel.plan import (
    AllocateKV,
    KVAllocated,
    LeaderMessage,
    RankFailure,
    RankMessage,
    RankReady,
    RankStats,
    Shutdown,
    StatsQuery,
    StepPlan,
    StepResult,
)
from disagg.errors import RankFailedError

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0  # how long ranks get to leave the process group after Shutdown
STORE_HOST = "127.0.0.1"  # the group's ranks run on the leader's machine
POLL_S = 1.0  # how often a waiting leader also checks its ranks' exit status


class RankGroup:
    """``make_spec(rank, store_host, store_port)`` gives each rank's :class:`RankSpec`."""

    def __init__(self, world_size: int, make_spec, *, kv_pipes: bool = False) -> None:
        self.world_size = world_size
        # A node's group: a second pipe per rank carries KV transfer commands and their
        # answers (``disagg.node.rank_transfers``), apart from the step plans.
        self.kv_conns: list[Connection] = []
        # The rendezvous every rank joins; it lives as long as the group.
        self._store = dist.TCPStore(STORE_HOST, 0, is_master=True, wait_for_workers=False)
        # Each rank is a fresh interpreter running this package's rank module, given its
        # end of a pipe: unlike multiprocessing's spawn, nothing re-runs the caller's
        # main script, so no ``if __name__ == "__main__"`` guard is needed around LLM().
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen] = []
        for rank in range(world_size):
            leader_end, rank_end = mp.Pipe(duplex=True)
            fds = [rank_end.fileno()]
            kv_rank_end = None
            if kv_pipes:
                kv_leader_end, kv_rank_end = mp.Pipe(duplex=True)
                self.kv_conns.append(kv_leader_end)
                fds.append(kv_rank_end.fileno())
            proc = subprocess.Popen(
                [sys.executable, "-m", "disagg.engine.parallel.rank", *map(str, fds)],
                pass_fds=tuple(fds),
                close_fds=True,
            )
            rank_end.close()  # only the rank holds its end: its death reads as EOF here
            if kv_rank_end is not None:
                kv_rank_end.close()
            leader_end.send(make_spec(rank, STORE_HOST, self._store.port))
            self._conns.append(leader_end)
            self._procs.append(proc)
        self._grace = {"seconds": SHUTDOWN_GRACE_S}
        self._finalizer = weakref.finalize(
            self, _stop, self._procs, [*self._conns, *self.kv_conns], self._grace
        )
        self._failure: RankFailedError | None = None
        self.ready: list[RankReady] = []
        self.num_blocks = 0
        try:
            self.ready = [self._expect(m, RankReady) for m in self._collect()]
            self.num_blocks = min(r.max_blocks for r in self.ready)
            self._send_all(AllocateKV(self.num_blocks))
            for m in self._collect():
                self._expect(m, KVAllocated)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run_many(self, plans: list[StepPlan]) -> list[StepResult]:
        """Sends every plan to every rank before reading any answer (so pipeline
        stages overlap on consecutive plans); returns the driver's answer to each."""
        try:
            for plan in plans:
                self._send_all(plan)
            out = []
            for plan in plans:
                results = [self._expect(m, StepResult) for m in self._collect()]
                driver = [
                    r for r in results if r.token_ids is not None or r.logits_bytes is not None
                ]
                assert len(driver) == 1, (
                    f"{len(driver)} ranks answered step {plan.step} with output"
                )
                assert driver[0].step == plan.step
                out.append(driver[0])
            return out
        except RankFailedError:
            raise
        except BaseException as exc:  # e.g. Ctrl-C mid-step: answers would arrive out of step
            self._failure = RankFailedError(-1, f"a step was interrupted ({exc!r})")
            self._grace["seconds"] = 0.0
            self.close()
            raise

    def stats(self) -> list[RankStats]:
        self._send_all(StatsQuery())
        return [self._expect(m, RankStats) for m in self._collect()]

    def close(self) -> None:
        """Stops every rank (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # -- messaging -------------------------------------------------------------------

    def _send_all(self, msg: LeaderMessage) -> None:
        self._check_usable()
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError) as exc:
                self._fail(rank, f"its pipe broke ({exc})")

    def _collect(self) -> list[RankMessage]:
        """One answer from every rank, in rank order. A rank's pipe reads EOF when its
        process ends (it holds the only other end), so a death cannot go unnoticed."""
        answers: dict[int, RankMessage] = {}
        waiting = {conn: rank for rank, conn in enumerate(self._conns)}
        while waiting:
            for conn in wait(list(waiting), timeout=POLL_S):
                rank = waiting.pop(conn)  # type: ignore[call-overload]
                try:
                    msg = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self._fail(rank, self._ended(rank))
                if isinstance(msg, RankFailure):
                    log.error("rank %d failed:\n%s", rank, msg.traceback)
                    self._fail(rank, f"{msg.error_type}: {msg.message}")
                answers[rank] = msg
            for rank, proc in enumerate(self._procs):
                if proc.poll() is not None and rank not in answers:
                    self._fail(rank, self._ended(rank))
        return [answers[r] for r in range(self.world_size)]

    def _ended(self, rank: int) -> str:
        try:
            code = self._procs[rank].wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "its pipe closed"
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"its process ended ({how})"

    def _expect(self, msg: RankMessage, kind: type):
        if not isinstance(msg, kind):
            raise AssertionError(f"expected {kind.__name__} from a rank, got {type(msg).__name__}")
        return msg

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self.closed:
            raise RankFailedError(-1, "the rank group is closed")

    def _fail(self, rank: int, reason: str) -> NoReturn:
        self._failure = RankFailedError(rank, reason)
        self._grace["seconds"] = 0.0  # the others may be stuck in a collective with it
        self.close()
        raise self._failure


def _stop(procs: list[subprocess.Popen], conns: list[Connection], grace: dict[str, float]) -> None:
    for conn in conns:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):  # already gone
            conn.send(Shutdown())
    deadline = time.monotonic() + grace["seconds"]
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:  # e.g. blocked in a collective with a dead peer
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(2.0)
        if p.poll() is None:
            p.kill()
            p.wait()
    for conn in conns:
        conn.close()
    log.debug("rank group stopped (leader pid %d)", os.getpid())
