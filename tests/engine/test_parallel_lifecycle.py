"""The rank processes of a parallel engine: a rank that dies or raises makes the
engine raise a typed error (never hang) and stops the others; they do not outlive a
leader that is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from disagg import LLM, SamplingParams
from disagg.engine.tiny_model import tiny_model_path
from disagg.errors import RankFailedError

pytestmark = pytest.mark.slow  # each test starts rank processes (~1.5 s of CPU each)


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie may linger where nothing reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_a_rank_killed_mid_generation_fails_the_engine_with_a_typed_error():
    with LLM("tiny", tensor_parallel_size=2, num_blocks=64) as llm:
        engine = llm.engine
        pids = engine.worker.group.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=8))
        assert engine.step() == []  # the prefill ran on both ranks
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(RankFailedError) as info:
            for _ in range(8):  # the decode steps: the first one must raise
                engine.step()
        assert info.value.rank == 1
        assert "signal 9" in info.value.reason or "pipe" in info.value.reason
        # The survivor (maybe blocked in an all-reduce with the dead rank) is stopped.
        assert _wait_gone(pids) == []
        with pytest.raises(RankFailedError):  # the group stays failed, never hangs
            llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=2))


def test_a_rank_that_raises_is_reported_with_its_error(tmp_path):
    """Stage 1's layer is missing from the checkpoint: that rank's CheckpointError
    reaches the caller as RankFailedError naming rank 1 and the tensor."""
    src = tiny_model_path()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(RankFailedError) as info:
        LLM(str(tmp_path), pipeline_parallel_size=2, num_blocks=16)
    assert info.value.rank == 1
    assert "CheckpointError" in info.value.reason
    assert "layers.1.mlp.down_proj.weight" in info.value.reason  # stage 1's local name


# Leaving a with block stops the ranks too: tests/engine/test_parallel.py checks it
# as each of its groups is torn down.
LEADER = textwrap.dedent(
    """
    import time
    from disagg import LLM
    llm = LLM("tiny", tensor_parallel_size=2, num_blocks=16)
    print(*llm.engine.worker.group.pids, flush=True)
    time.sleep(600)
    """
)


def test_ranks_die_with_a_killed_leader():
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert leader.stdout is not None
        running = [int(p) for p in leader.stdout.readline().split()]
        assert len(running) == 2 and all(_alive(p) for p in running)
        leader.kill()  # no close(), no atexit: only PR_SET_PDEATHSIG / the pipe's EOF
        leader.wait()
        assert _wait_gone(running) == []
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()
