"""Run a two-process scenario over a real gloo group: rank 0 sends, rank 1 receives.

The test process hosts the TCPStore on a free port (bound to port 0), spawns both ranks,
collects each rank's result or traceback from a queue, and always reaps them: a join with
a deadline, then terminate, then kill, so a failing scenario never hangs the suite.
"""

from __future__ import annotations

import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kv_transfer import TransferGroup, init_transfer_group

_POLL_S = 0.2
Scenario = Callable[..., Any]  # (rank, group, **kwargs) -> picklable result


def _child(
    scenario: Scenario,
    rank: int,
    port: int,
    backend: str,
    results: Any,
    kwargs: dict[str, Any],
) -> None:
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        group: TransferGroup = init_transfer_group(
            rank, 2, f"127.0.0.1:{port}", backend, timeout=10.0, host_store=False
        )
        try:
            results.put((rank, True, scenario(rank, group, **kwargs)))
        finally:
            group.destroy()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_pair(
    scenario: Scenario, *, backend: str = "gloo", deadline_s: float = 30.0, **kwargs: Any
) -> list[Any]:
    """Both ranks' results, [rank 0, rank 1]; raises AssertionError with the children's
    tracebacks if either failed or the pair did not finish within ``deadline_s``.
    ``backend="nccl"`` puts rank r on cuda:r."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child, args=(scenario, rank, store.port, backend, results, kwargs), daemon=True
        )
        for rank in (0, 1)
    ]
    got: dict[int, tuple[bool, Any]] = {}
    end = time.monotonic() + deadline_s
    try:
        for p in procs:
            p.start()
        while len(got) < 2:
            try:
                rank, ok, payload = results.get(timeout=_POLL_S)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead and results.empty():
                    time.sleep(_POLL_S)  # a result put just before exiting may be in flight
                if time.monotonic() > end or (dead and results.empty()):
                    raise AssertionError(
                        f"scenario {scenario.__name__}: ranks {dead} died without a result or "
                        f"the pair did not finish in {deadline_s} s; results so far: {got}"
                    ) from None
                continue
            got[rank] = (ok, payload)
        for p in procs:
            p.join(timeout=max(end - time.monotonic(), 1.0))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
    failures = [f"rank {r}:\n{payload}" for r, (ok, payload) in sorted(got.items()) if not ok]
    assert not failures, "\n".join(failures)
    return [got[0][1], got[1][1]]
