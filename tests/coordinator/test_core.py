"""The coordinator's core driven directly, deterministically: registration checks,
retries, node loss, the KV lease, hand-off pairing and epochs, duplicate and stale token
reports, limits, and exact charges. (tests/coordinator/test_coordinator.py keeps a few
of these over real sockets; tests/runtime runs the real nodes.)"""

from __future__ import annotations

import pytest

from disagg.coordinator.core import MAX_PAIR_EPOCHS
from disagg.coordinator.tracked import Phase
from disagg.protocol import Abort, Accepted, Error, Finished, Ping, Pong
from disagg.protocol.cluster import (
    Counters,
    Credit,
    DecodeTask,
    Goodbye,
    PrefillTask,
    Pulled,
    PullGo,
    PullRequest,
    Push,
    Pushed,
    Refused,
    Release,
    SourceLost,
    StepTokens,
    TaskFailed,
    Welcome,
)
from tests.coordinator.core_harness import CoreHarness, last_token, prefilled, step, streamed


def one(msgs: list, kind: type):
    """The one message of ``kind`` among ``msgs``."""
    found = [m for m in msgs if isinstance(m, kind)]
    assert len(found) == 1, msgs
    return found[0]


def test_wrong_secret_other_model_and_a_second_role_are_refused():
    h = CoreHarness(cluster_secret="s3cret-s3cret")
    bad = h.register("prefill-0", "prefill", secret="nope")
    assert isinstance(bad, Refused) and "secret" in bad.reason
    good = h.register("prefill-1", "prefill", secret="s3cret-s3cret")
    assert isinstance(good, Welcome)
    other = h.register("decode-0", "decode", secret="s3cret-s3cret", model="other")
    assert isinstance(other, Refused) and "model" in other.reason
    twin = h.register("prefill-1", "decode", secret="s3cret-s3cret", endpoint="prefill-1@0b")
    assert isinstance(twin, Refused) and "already registered" in twin.reason
    assert set(h.core.nodes) == {"prefill-1"}


def test_a_request_goes_through_prefill_hand_off_and_decode_streaming_each_token_once():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=3, temperature=0, stream=True)
    assert isinstance(one(h.take_client(), Accepted), Accepted)
    task = one(h.take_node("prefill-0"), PrefillTask)
    h.node("prefill-0", prefilled(task.rid, 7))
    work = one(h.take_node("decode-0"), DecodeTask)
    assert work.source == "prefill-0@0a" and work.output_token_ids == [7]
    h.node("decode-0", PullRequest(rids=[work.rid]))
    assert one(h.take_node("decode-0"), PullGo).epoch == 0
    assert one(h.take_node("prefill-0"), Push).dest == "decode-0@0a"
    h.node("decode-0", step(work.rid, 1, [8]))
    h.node("decode-0", step(work.rid, 1, [8]))  # a repeated report is ignored
    h.node("decode-0", step(work.rid, 2, [9], "length"))
    replies = h.take_client()
    # each token once (the repeated report's too), with the text the node made for it
    assert streamed(replies) == [("r1", 0, 7, "<7>"), ("r1", 1, 8, "<8>"), ("r1", 2, 9, "<9>")]
    done = one(replies, Finished)
    assert done.token_ids == [7, 8, 9] and done.finish_reason == "length"
    assert done.text == "<7><8><9>"  # the nodes' texts joined
    assert work.text_chars == len("<7>")
    assert not h.core.requests and not h.core.in_flight_per_client
    # the KV holder is told to release it (it was never reported pushed)
    assert one(h.take_node("prefill-0"), Release).rid == work.rid


def test_a_report_from_ahead_of_what_was_sent_is_dropped_not_skipped_to():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=4, temperature=0, stream=True)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.node("prefill-0", prefilled(rid, 7))
    h.node("decode-0", step(rid, 2, [9]))  # index 2, but only 1 token sent: a gap
    assert h.core.requests[rid].output_token_ids == [7]
    h.node("decode-0", step(rid, 1, [8, 9]))
    h.node("decode-0", step(rid, 2, [9, 10], "length"))  # overlaps by one: only 10 is new
    assert one(h.take_client(), Finished).token_ids == [7, 8, 9, 10]


def test_output_is_charged_exactly_once_per_token_in_the_decode_counters():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=3, temperature=0)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.node("prefill-0", prefilled(rid, 7))
    h.node("decode-0", step(rid, 1, [8]))
    h.node("decode-0", step(rid, 1, [8]))
    h.node("decode-0", step(rid, 2, [9], "length"))
    cost = h.core.settings.fairness.cost
    prompt = len(h.core.tokenizer.encode("hello"))
    h.tick()
    # Two-stage VTC: one merged ledger, charged the input at prefill admission and each
    # output token as reported, once: cost(prompt, 0) + sum of the output increments.
    for node_id in ("prefill-0", "decode-0"):
        counters = one(h.take_node(node_id, skip=()), Counters)
        assert counters.values["alice"] == pytest.approx(cost(prompt, 3), rel=1e-9)
    assert cost(prompt, 3) != cost(prompt, 4)  # a repeat charged would show


def test_a_request_failing_on_every_attempt_ends_in_one_error():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.generate(max_tokens=4)
    for _ in range(h.core.settings.max_attempts):
        task = one(h.take_node("prefill-0"), PrefillTask)
        h.node("prefill-0", TaskFailed(rid=task.rid, message="the model raised"))
    error = one(h.take_client(), Error)
    assert error.code == "failed" and "the model raised" in error.message
    assert not h.core.requests
    assert not h.take_node("prefill-0", skip=("counters", "release"))


def test_kv_lease_expiry_releases_and_tells_the_decode_node_to_recompute():
    h = CoreHarness(kv_lease_s=0.3)
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=3, temperature=0)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.node("prefill-0", prefilled(rid, 7))
    assert one(h.take_node("decode-0"), DecodeTask).source == "prefill-0@0a"
    h.advance(0.2)
    h.tick()
    assert not h.take_node("prefill-0")  # within the lease
    h.advance(0.2)
    h.tick()
    assert one(h.take_node("prefill-0"), Release).rid == rid
    assert one(h.take_node("decode-0"), SourceLost).rid == rid
    h.node("decode-0", step(rid, 1, [8]))
    h.node("decode-0", step(rid, 2, [9], "length"))
    assert one(h.take_client(), Finished).token_ids == [7, 8, 9]


def test_a_kv_lease_ends_only_kv_still_waiting_to_be_pulled():
    """Leases sit in a heap by start, each looked at once when due: one whose pull has
    started ends nothing; one still waiting is released; then nothing is left."""
    h = CoreHarness(kv_lease_s=0.3)
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    for name in ("a", "b"):
        h.generate(name, max_tokens=3, temperature=0)
    pulled, waiting = (task.rid for task in one_each(h.take_node("prefill-0"), PrefillTask))
    h.node("prefill-0", prefilled(pulled, 7))
    h.node("prefill-0", prefilled(waiting, 7))
    h.take_node("decode-0")
    h.node("decode-0", PullRequest(rids=[pulled]))  # its pull starts (and takes a while)
    assert one(h.take_node("prefill-0"), Push).rids == [pulled]
    h.take_node("decode-0")
    h.advance(0.4)
    h.tick()
    assert one(h.take_node("prefill-0"), Release).rid == waiting
    assert one(h.take_node("decode-0"), SourceLost).rid == waiting
    assert not h.core._kv_leases  # each entry looked at once
    h.advance(1.0)
    h.tick()
    assert not h.take_node("prefill-0") and not h.take_node("decode-0")


def test_pull_of_a_request_not_held_is_answered_release_and_a_second_pull_source_lost():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=2, temperature=0)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.node("prefill-0", prefilled(rid, 4))
    h.take_node("decode-0")
    h.node("decode-0", PullRequest(rids=[rid, 999_999]))
    replies = h.take_node("decode-0")
    assert one(replies, PullGo).rids == [rid]
    assert one(replies, Release).rid == 999_999
    assert one(h.take_node("prefill-0"), Push).rids == [rid]
    h.node("decode-0", PullRequest(rids=[rid]))  # already under way
    assert one(h.take_node("decode-0"), SourceLost).rid == rid


def test_a_source_lost_mid_pull_is_told_to_the_decode_node_and_the_request_completes():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=2, temperature=0)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.node("prefill-0", prefilled(rid, 4))
    h.take_node("decode-0")
    h.node("decode-0", PullRequest(rids=[rid]))
    h.take_node("decode-0")
    assert isinstance(h.register("prefill-0", "prefill", endpoint="prefill-0@0b"), Welcome)
    assert one(h.take_node("decode-0"), SourceLost).rid == rid
    h.node("decode-0", last_token(rid, 5))
    assert one(h.take_client(), Finished).token_ids == [4, 5]


def test_a_broken_kv_channel_moves_to_the_next_epoch_and_is_given_up_after_three():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    for attempt in range(MAX_PAIR_EPOCHS + 1):
        h.generate(f"r{attempt}", max_tokens=2, temperature=0)
        rid = one(h.take_node("prefill-0", skip=("counters", "release")), PrefillTask).rid
        h.node("prefill-0", prefilled(rid, 4))
        work = one(h.take_node("decode-0"), DecodeTask)
        if attempt < MAX_PAIR_EPOCHS:
            assert work.source == "prefill-0@0a"
            h.node("decode-0", PullRequest(rids=[rid]))
            assert one(h.take_node("decode-0"), PullGo).epoch == attempt
            assert one(h.take_node("prefill-0"), Push).epoch == attempt
            # Both sides see the break; only the first report moves the epoch.
            h.node("decode-0", Pulled(rids=[rid], error="timed out", broken_peer=True,
                                      source="prefill-0@0a", epoch=attempt))  # fmt: skip
            h.node("prefill-0", Pushed(rids=[rid], error="closed", broken_peer=True,
                                       dest="decode-0@0a", epoch=attempt))  # fmt: skip
        else:  # given up: recompute on the decode node, the held KV released
            assert work.source is None
            assert one(h.take_node("prefill-0"), Release).rid == rid
        h.node("decode-0", last_token(rid, 5))
        assert one(h.take_client(), Finished).token_ids == [4, 5]
    assert h.core.pair_epochs[("prefill-0@0a", "decode-0@0a")] == MAX_PAIR_EPOCHS


def test_a_new_process_under_a_live_node_id_replaces_it_and_gets_its_work():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.generate(max_tokens=1, temperature=0)
    lost = one(h.take_node("prefill-0"), PrefillTask)
    assert isinstance(h.register("prefill-0", "prefill", endpoint="prefill-0@0b"), Welcome)
    again = one(h.take_node("prefill-0"), PrefillTask)
    assert again.rid == lost.rid and again.task == 1  # a fresh incarnation's first task
    h.node("prefill-0", prefilled(again.rid, 7, "length"))
    assert one(h.take_client(), Finished).token_ids == [7]
    node = h.core.nodes["prefill-0"]
    assert isinstance(h.register("prefill-0", "prefill", endpoint="prefill-0@0b"), Welcome)
    assert h.core.nodes["prefill-0"] is node  # a repeated hello: the same incarnation


def test_a_silent_decode_node_is_dead_and_its_request_resumes_elsewhere_from_what_was_sent():
    h = CoreHarness(dead_after_s=3.0)
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=4, temperature=0, stream=True)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.node("prefill-0", prefilled(rid, 7))
    h.node("decode-0", step(rid, 1, [8]))
    h.register("decode-1", "decode")
    h.advance(2.0)
    h.node("prefill-0", Credit(free_tokens=4096, tasks_seen=1, queued=0, running=0, held=1))
    h.node("decode-1", Credit(free_tokens=4096, tasks_seen=0, queued=0, running=0, held=0))
    h.advance(2.0)
    h.node("decode-1", Credit(free_tokens=4096, tasks_seen=0, queued=0, running=0, held=0))
    h.tick()  # decode-0 silent for 4 s; the KV holder too is past the limit: gone as well
    assert not h.core.nodes["decode-0"].alive
    resumed = one(h.take_node("decode-1"), DecodeTask)
    assert resumed.output_token_ids == [7, 8] and resumed.source is None
    assert resumed.text_chars == len("<7><8>")  # the new node's text goes on from there
    h.node("decode-0", step(rid, 2, [99]))  # from a node declared dead: ignored
    h.node("decode-1", step(rid, 2, [9, 10], "length"))
    replies = h.take_client()
    assert [entry[1:] for entry in streamed(replies)] == [
        (0, 7, "<7>"),
        (1, 8, "<8>"),
        (2, 9, "<9>"),
        (3, 10, "<10>"),
    ]
    done = one(replies, Finished)
    assert done.token_ids == [7, 8, 9, 10] and done.text == "<7><8><9><10>"


def test_goodbye_from_a_prefill_node_reprefills_its_request_elsewhere():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("prefill-1", "prefill")
    h.generate(max_tokens=1, temperature=0)
    first = [n for n in ("prefill-0", "prefill-1") if h.take_node(n)]
    assert len(first) == 1
    other = "prefill-1" if first == ["prefill-0"] else "prefill-0"
    h.node(first[0], Goodbye())
    assert one(h.take_node(other), PrefillTask)
    assert h.core.requests[1].phase is Phase.PREFILLING


def test_no_live_node_of_its_kind_fails_a_request_after_the_bounded_wait():
    h = CoreHarness(no_node_timeout_s=5.0)
    h.generate(max_tokens=2)
    h.take_client()
    h.tick()
    h.advance(4.0)
    h.tick()
    assert not h.take_client()
    h.advance(2.0)
    h.tick()
    error = one(h.take_client(), Error)
    assert error.code == "unavailable" and "no live prefill node" in error.message
    assert not h.core.requests


def test_abort_releases_what_nodes_hold_and_sends_nothing_more():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    h.generate(max_tokens=8, temperature=0, stream=True)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.node("prefill-0", prefilled(rid, 7))
    h.take_client()
    h.client(Abort(request_id="r1"))
    assert one(h.take_node("prefill-0"), Release).rid == rid
    assert one(h.take_node("decode-0", skip=("counters", "decode_task")), Release).rid == rid
    h.node("decode-0", step(rid, 1, [8]))
    assert not h.take_client() and not h.core.requests


def test_a_duplicate_request_id_on_one_connection_is_refused_and_limits_apply():
    h = CoreHarness(max_in_flight_per_client=2)
    h.generate("a")
    h.generate("a")
    dup = one(h.take_client(), Error)
    assert dup.code == "invalid_request" and dup.field == "request_id"
    h.generate("a", identity=b"other")  # another connection may use the same id
    h.generate("b")
    full = one(h.take_client(), Error)
    assert full.code == "rejected" and full.reason == "queue_full"
    h.generate("c", prompt=[10**9])
    bad = one(h.take_client(), Error)
    assert bad.code == "invalid_request" and bad.field == "prompt"


def test_ping_is_answered_and_a_stale_prefill_result_is_released():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    h.client(Ping(nonce="n1"))
    assert one(h.take_client(), Pong).nonce == "n1"
    h.node("prefill-0", prefilled(42, 3))  # nobody asked for rid 42
    assert one(h.take_node("prefill-0"), Release).rid == 42


def test_a_node_observer_sees_each_message_with_its_time_before_it_is_handled():
    h = CoreHarness()
    h.register("prefill-0", "prefill")
    seen = []
    h.core.add_node_observer(lambda node, msg, now: seen.append((node.node_id, msg.type, now)))
    h.generate(max_tokens=1)
    rid = one(h.take_node("prefill-0"), PrefillTask).rid
    h.advance(0.5)
    h.node("prefill-0", prefilled(rid, 3, "length"))
    assert seen == [("prefill-0", "prefilled", 100.5)]
    assert one(h.take_client(), Finished).timings.ttft_s == pytest.approx(0.5)


def test_the_metrics_show_each_clients_service_exactly_once():
    from disagg.coordinator.metrics import CoordinatorMetrics
    from tests.coordinator.test_metrics import value

    metrics = CoordinatorMetrics()
    h = CoreHarness(metrics=metrics)
    h.register("prefill-0", "prefill")
    h.register("decode-0", "decode")
    for name, client in (("a", "alice"), ("b", "bob")):
        h.generate(name, client_id=client, max_tokens=3, temperature=0)
    tasks = one_each(h.take_node("prefill-0"), PrefillTask)
    for task in tasks:
        h.node("prefill-0", prefilled(task.rid, 7))
    rids = [task.rid for task in tasks]
    h.node("decode-0", StepTokens(rids=rids, indices=[1, 1], tokens=[8, 8], texts=["x", "y"]))
    h.node("decode-0", step(rids[0], 1, [8]))  # a repeat: not charged again
    h.node("decode-0", step(rids[0], 2, [9, 10], "length"))  # its last two tokens
    assert value(metrics, "disagg_client_service_total", client_id="bob", stage="decode") is None
    h.tick()  # charges reach the metrics once per tick, summed per client
    cost = h.core.settings.fairness.cost
    out = cost(0, 1) - cost(0, 0)
    assert value(metrics, "disagg_client_service_total", client_id="bob", stage="decode") == (
        pytest.approx(2 * out)
    )
    alice = value(metrics, "disagg_client_service_total", client_id="alice", stage="decode")
    assert alice == pytest.approx(2 * out + (cost(0, 2) - cost(0, 0)))


def test_an_aborted_request_is_counted_as_finished_with_reason_abort():
    from disagg.coordinator.metrics import CoordinatorMetrics
    from tests.coordinator.test_metrics import value

    metrics = CoordinatorMetrics()
    h = CoreHarness(metrics=metrics)
    h.register("prefill-0", "prefill")
    h.generate(client_id="carol", max_tokens=8)
    h.take_node("prefill-0")
    h.take_client()  # accepted
    h.client(Abort(request_id="r1"))
    assert not h.take_client() and not h.core.requests
    finished = "disagg_requests_finished_total"
    assert value(metrics, finished, client_id="carol", finish_reason="abort") == 1


def one_each(msgs: list, kind: type) -> list:
    return [m for m in msgs if isinstance(m, kind)]


def kv(tp: int = 1, pp: int = 1, **fields):
    """A node's KV layout (the tiny model's shape: 4 layers, 2 KV heads of 32)."""
    from disagg.engine.parallel.handoff import KVNodeLayout

    base = dict(model="tiny-test", num_layers=4, num_kv_heads=2, head_dim=32, block_size=16)
    return KVNodeLayout(**{**base, "dtype": "float32", "tp": tp, "pp": pp, **fields})


def test_a_node_whose_kv_cannot_be_handed_over_is_refused_at_registration_by_name():
    h = CoreHarness()
    assert isinstance(h.register("prefill-0", "prefill", kv=kv(tp=2)), Welcome)
    other_block = h.register("decode-0", "decode", block_size=32, kv=kv(block_size=32))
    assert isinstance(other_block, Refused) and "block_size" in other_block.reason
    assert "prefill-0" in other_block.reason
    other_dtype = h.register("decode-0", "decode", kv=kv(dtype="bfloat16"))
    assert isinstance(other_dtype, Refused) and "dtype" in other_dtype.reason
    bad_layout = h.register("decode-0", "decode", kv=kv(tp=3))  # 3 and 2 KV heads
    assert isinstance(bad_layout, Refused) and "tensor_parallel_size" in bad_layout.reason
    # A block size that differs is refused even from a node that states no layout.
    plain = h.register("decode-1", "decode", block_size=8)
    assert isinstance(plain, Refused) and "block_size" in plain.reason
    assert set(h.core.nodes) == {"prefill-0"}


def test_different_layouts_pair_and_each_side_is_told_the_others():
    h = CoreHarness()
    h.register("prefill-0", "prefill", kv=kv(tp=2))
    assert isinstance(h.register("decode-0", "decode", kv=kv(pp=2)), Welcome)
    h.generate(max_tokens=3, temperature=0)
    task = one(h.take_node("prefill-0"), PrefillTask)
    h.node("prefill-0", prefilled(task.rid, 7))
    work = one(h.take_node("decode-0"), DecodeTask)
    h.node("decode-0", PullRequest(rids=[work.rid]))
    pull = one(h.take_node("decode-0"), PullGo)
    push = one(h.take_node("prefill-0"), Push)
    assert (pull.peer_tp, pull.peer_pp) == (2, 1)  # the prefill node's ranks
    assert (push.peer_tp, push.peer_pp) == (1, 2)  # the decode node's
