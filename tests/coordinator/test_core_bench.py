"""bench/coordinator_core.py drives the core through whole requests (its own assertions:
none left in flight) and times each handler, in both modes."""

from __future__ import annotations

from bench.coordinator_core import run, run_stream


def test_short_requests_end_and_every_handler_is_timed():
    timed, done = run(requests=8, in_flight=4)
    assert done == 8
    for what in ("on_client generate", "dispatch", "on_node prefilled", "on_node step_tokens"):
        assert timed.spent[what] > 0, what


def test_streamed_steps_are_timed_per_token():
    timed, tokens = run_stream(in_flight=4, steps=3)
    assert tokens == 12
    assert timed.spent["on_node step_tokens"] > 0
    assert "on_client generate" not in timed.spent  # only the steps
