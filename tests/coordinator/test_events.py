"""Per-request lifetime events and the latency breakdown made from them."""

from __future__ import annotations

import json

import pytest

from disagg.coordinator.events import RequestEvents


def play(log: RequestEvents, request_id: str, timeline: list[tuple[str, float, str | None]]):
    for event, t, node in timeline:
        log.record(request_id, event, client_id="alice", node_id=node, t=t)


HAPPY = [
    ("arrived", 10.0, None),
    ("dispatched", 10.5, "p0"),
    ("prefill_start", 11.0, "p0"),
    ("prefill_end", 11.25, "p0"),
    ("transfer_start", 12.0, "d0"),
    ("transfer_end", 12.125, "d0"),
    ("decode_start", 12.25, "d0"),
    ("decode_end", 14.25, "d0"),
    ("finished", 14.5, None),
]


def test_breakdown_of_an_ordinary_request():
    log = RequestEvents()
    play(log, "r1", HAPPY)
    assert log.breakdown("r1") == {
        "queue": 1.0,
        "prefill": 0.25,
        "decode_queue": 0.75,
        "transfer": 0.125,
        "decode": 2.0,
        "total": 4.5,
    }
    rec = log.get("r1")
    assert rec is not None and rec.client_id == "alice"
    assert [e for e, _, _ in rec.events] == [e for e, _, _ in HAPPY]
    assert rec.events[1] == ("dispatched", 10.5, "p0")


def test_retried_phases_add_up_and_cut_attempts_count_nothing():
    log = RequestEvents()
    play(
        log,
        "r1",
        [
            ("arrived", 0.0, None),
            ("prefill_start", 1.0, "p0"),  # p0 dies before prefill_end
            ("prefill_start", 5.0, "p1"),
            ("prefill_end", 5.5, "p1"),
            ("transfer_start", 6.0, "d0"),
            ("transfer_end", 6.5, "d0"),
            ("decode_start", 6.5, "d0"),  # d0 dies mid-decode: resumed elsewhere
            ("prefill_start", 9.0, "p1"),
            ("prefill_end", 9.5, "p1"),
            ("transfer_start", 10.0, "d1"),
            ("transfer_end", 10.25, "d1"),
            ("decode_start", 10.25, "d1"),
            ("decode_end", 11.25, "d1"),
            ("finished", 11.5, None),
        ],
    )
    assert log.breakdown("r1") == {
        "queue": 1.0,
        "prefill": 1.0,
        "decode_queue": 0.5,
        "transfer": 0.75,
        "decode": 1.0,
        "total": 11.5,
    }


def test_partial_and_failed_requests_report_what_is_known():
    log = RequestEvents()
    play(log, "r1", [("arrived", 0.0, None), ("prefill_start", 2.0, "p0")])
    assert log.breakdown("r1") == {"queue": 2.0}
    play(log, "r2", [("arrived", 0.0, None), ("failed", 30.0, None)])
    assert log.breakdown("r2") == {"total": 30.0}
    with pytest.raises(KeyError):
        log.breakdown("never")


def test_the_log_keeps_only_the_last_requests():
    log = RequestEvents(capacity=3)
    for i in range(5):
        log.record(f"r{i}", "arrived", client_id="alice", t=float(i))
    assert len(log) == 3
    assert "r0" not in log and "r1" not in log
    assert all(f"r{i}" in log for i in (2, 3, 4))
    log.record("r2", "finished", t=9.0)  # later events of a kept request do not evict
    assert len(log) == 3 and "r2" in log


def test_unknown_event_names_are_refused():
    log = RequestEvents()
    with pytest.raises(ValueError, match="unknown request event"):
        log.record("r1", "prefil_start")
    assert len(log) == 0


def test_default_times_come_from_the_clock():
    now = [5.0]
    log = RequestEvents(clock=lambda: now[0])
    log.record("r1", "arrived", client_id="alice")
    now[0] = 7.5
    log.record("r1", "finished")
    assert log.breakdown("r1") == {"total": 2.5}


def test_dump_jsonl_writes_one_request_per_line(tmp_path):
    log = RequestEvents()
    play(log, "r1", HAPPY)
    log.record("r2", "arrived", client_id="bob", request_id="bob-7", t=20.0)
    path = tmp_path / "events.jsonl"
    assert log.dump_jsonl(path) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["rid"] for line in lines] == ["r1", "r2"]
    first = lines[0]
    assert first["client_id"] == "alice"
    assert first["events"][0] == {"event": "arrived", "t": 10.0, "node_id": None}
    assert first["events"][2] == {"event": "prefill_start", "t": 11.0, "node_id": "p0"}
    assert first["breakdown"]["total"] == 4.5
    assert lines[1]["unix_time"] - first["unix_time"] == pytest.approx(10.0)
    assert lines[1]["breakdown"] == {}
    assert (first["request_id"], lines[1]["request_id"]) == (None, "bob-7")


def test_log_path_gets_one_line_per_ended_request_as_it_ends(tmp_path):
    path = tmp_path / "events.jsonl"
    log = RequestEvents(log_path=path)
    play(log, "r1", HAPPY[:-1])
    assert path.read_text() == ""  # not ended yet
    log.record("r1", "finished", t=14.5)
    play(log, "r2", [("arrived", 20.0, None), ("failed", 21.0, None)])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["rid"] for x in lines] == ["r1", "r2"]
    assert lines[0]["breakdown"]["total"] == 4.5 and lines[1]["breakdown"] == {"total": 1.0}
    assert lines[0]["events"][-1] == {"event": "finished", "t": 14.5, "node_id": None}
    log.close()
    again = RequestEvents(log_path=path)  # a restarted server appends
    play(again, "r3", [("arrived", 1.0, None), ("finished", 2.0, None)])
    again.close()
    assert len(path.read_text().splitlines()) == 3


def test_an_events_log_that_cannot_be_opened_is_named_before_serving(tmp_path):
    from disagg.errors import ConfigError
    from disagg.serve import ServedCluster, ServeOptions

    missing = tmp_path / "no-such-dir" / "events.jsonl"
    with pytest.raises(ConfigError, match=r"events_log.*no-such-dir"):
        ServedCluster(ServeOptions(port=0, events_log=str(missing)))
