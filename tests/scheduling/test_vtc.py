"""VTC as the paper defines it, LCF, weights, per-stage and two-stage VTC."""

from __future__ import annotations

import pytest

from disagg.errors import ConfigError
from disagg.scheduling import (
    CounterOrdered,
    FairnessConfig,
    LinearCost,
    QuadraticCost,
    ServiceLedger,
    make_policy,
    make_pool_policies,
)
from tests.scheduling.helpers import Clock, Req, Served, admit, produce


def vtc(**ledger_kwargs) -> CounterOrdered:
    return CounterOrdered(ServiceLedger(**ledger_kwargs), LinearCost())


def test_serves_the_smallest_counter_first_and_fifo_within_a_client():
    p = vtc()
    a1, a2, b1 = Req(1, "a", 0.0), Req(2, "a", 1.0), Req(3, "b", 2.0)
    for r in (a1, a2, b1):
        p.add(r)
    assert admit(p) is a1  # tie at 0: earliest head arrival
    produce(p, a1, 5)  # a: 10 + 10 = 20
    assert p.ledger.counter("a") == 20
    assert admit(p) is b1  # b at 0 < 20
    assert admit(p) is a2
    assert p.peek() is None and len(p) == 0


def test_lift_to_the_smallest_pending_counter():
    p = vtc()
    for i, c in enumerate("ab"):
        p.add(Req(i, c))
    produce(p, admit(p), 45)  # a = 10 + 90 = 100
    produce(p, admit(p), 20)  # b = 10 + 40 = 50
    p.add(Req(10, "b"))  # nobody pending: b is lifted to the last leaver (itself), 50
    p.add(Req(11, "a"))  # a = 100 is above the pending minimum: unchanged
    p.add(Req(12, "c"))  # c is lifted to the smallest pending counter
    assert [p.ledger.counter(c) for c in "abc"] == [100, 50, 50]


def test_lift_to_the_last_leaver_when_no_one_is_pending():
    """The published artifact omits this case: an idle period must not be banked."""
    p = vtc()
    p.add(Req(1, "a"))
    a = admit(p)  # a stops pending
    produce(p, a, 95)  # and keeps being served while it runs: 10 + 190
    p.add(Req(2, "b"))  # nobody pending: b is lifted to the last leaver's counter
    assert p.ledger.counter("b") == 200
    p.add(Req(3, "a"))  # a comes back beside b: a tie, not a debt either owes
    assert p.ledger.counter("a") == p.ledger.counter("b")


def test_no_credit_for_idle_time_but_lcf_banks_it():
    def run(policy) -> list[str]:
        # a is alone for a while, then b arrives; b must not monopolise the server.
        for i in range(5):
            policy.add(Req(i, "a", float(i)))
        for _ in range(5):
            produce(policy, admit(policy), 10)  # a: 5 * 30 = 150
        for i in range(5):
            policy.add(Req(10 + i, "a", 10.0 + i))
            policy.add(Req(20 + i, "b", 10.0 + i))
        order = []
        for _ in range(6):
            r = admit(policy)
            produce(policy, r, 10)
            order.append(r.client_id)
        return order

    lifted = run(make_policy("vtc"))
    banked = run(make_policy("lcf"))
    assert lifted.count("a") >= 2  # lifted b alternates with a
    assert banked == ["b"] * 5 + ["a"]  # LCF: b's idle time became credit


def test_weights_divide_the_charge_and_shares_follow_the_weights():
    policy = make_policy("vtc", FairnessConfig(weights={"gold": 3.0, "free": 1.0}))
    served = Served()
    seq = 0
    for _ in range(400):  # both always backlogged
        for client in ("gold", "free"):
            while policy.num_waiting(client) < 2:
                seq += 1
                policy.add(Req(seq, client, float(seq)))
        r = admit(policy, served)
        produce(policy, r, 10, served)
    ratio = served.by_client["gold"] / served.by_client["free"]
    assert ratio == pytest.approx(3.0, rel=0.05)


def test_preemption_victim_is_a_request_of_the_most_served_client():
    p = vtc()
    reqs = [Req(i, c, float(i)) for i, c in enumerate("abc")]
    for r in reqs:
        p.add(r)
    running = [admit(p) for _ in range(3)]
    produce(p, running[1], 50)  # b is the most served
    assert p.preemption_victim(running).client_id == "b"


def test_quadratic_cost_charges_exactly_h_over_a_request():
    cost = QuadraticCost(a=1, b=2, c=0.01, d=0.001)
    p = CounterOrdered(ServiceLedger(), cost)
    r = Req(1, "a", prompt=100)
    p.add(r)
    admit(p)
    for n in (1, 3, 7, 1):
        produce(p, r, n)
    assert p.ledger.counter("a") == pytest.approx(cost(100, 12))


def test_negative_cost_weights_are_rejected_by_field():
    with pytest.raises(ConfigError) as info:
        LinearCost(w_in=-1)
    assert info.value.field == "w_in"
    with pytest.raises(ConfigError) as info:
        ServiceLedger({"a": 0.0})
    assert info.value.field == "weights.a"


def test_forgetting_idle_clients_bounds_state_and_changes_no_decision():
    clock = Clock()

    def run(forget_after):
        p = CounterOrdered(ServiceLedger(forget_after=forget_after, clock=clock), LinearCost())
        clock.now = 0.0
        decisions = []
        for rnd in range(50):
            clock.now = rnd * 100.0
            # 20 one-off clients per round plus a steady one
            for i in range(20):
                p.add(Req(rnd * 100 + i, f"once-{rnd}-{i}", clock.now))
            p.add(Req(rnd * 100 + 50, "steady", clock.now))
            while p.peek() is not None:
                r = admit(p)
                produce(p, r, 3)
                decisions.append(r.seq_id)
        return decisions, len(p.ledger)

    remembered, size_all = run(None)
    forgotten, size_bounded = run(150.0)
    assert forgotten == remembered
    assert size_all == 50 * 20 + 1
    assert size_bounded <= 3 * 21


def test_per_stage_counters_are_independent_and_two_stage_merges_them():
    per_stage = make_pool_policies("per-stage-vtc")
    two_stage = make_pool_policies("two-stage-vtc")
    for pools in (per_stage, two_stage):
        r = Req(1, "a", prompt=100)
        pools.prefill.add(r)
        admit(pools.prefill)
        pools.decode.add(r)
        admit(pools.decode)
        produce(pools.decode, r, 50)
    p_ledger, d_ledger = per_stage.ledgers
    assert (p_ledger.counter("a"), d_ledger.counter("a")) == (100, 100)
    (merged,) = two_stage.ledgers
    assert merged.counter("a") == 200


def _serve_one_each(pools, heavy_tokens: int, light_tokens: int) -> None:
    for i in range(3):
        pools.prefill.add(Req(i, "heavy", float(i)))
        pools.prefill.add(Req(10 + i, "light", i + 0.5))
    for tokens in (heavy_tokens, light_tokens):
        r = admit(pools.prefill)
        pools.decode.add(r)
        produce(pools.decode, admit(pools.decode), tokens)


def test_two_stage_orders_the_prefill_queue_by_decode_service_too():
    """With both clients backlogged, the one that took much decode service waits
    behind the other at prefill; per-stage VTC sees only input service there."""
    two_stage = make_pool_policies("two-stage-vtc")
    _serve_one_each(two_stage, heavy_tokens=200, light_tokens=5)
    assert two_stage.prefill.peek().client_id == "light"
    per_stage = make_pool_policies("per-stage-vtc")
    _serve_one_each(per_stage, heavy_tokens=200, light_tokens=5)
    assert per_stage.prefill.peek().client_id == "heavy"  # 10 each at prefill: arrival order


def test_a_request_between_stages_keeps_its_client_pending():
    """Two-stage: pending lasts from prefill arrival to decode admission, so moving
    between pools does not lift a client again (which would erase its deficit)."""
    pools = make_pool_policies("two-stage-vtc")
    for i in range(3):
        pools.prefill.add(Req(i, "heavy", float(i)))
    light = Req(10, "light", 5.0)
    pools.prefill.add(light)  # lifted to heavy's counter, 0
    while (r := admit(pools.prefill)) is not light:
        pools.decode.add(r)
        produce(pools.decode, admit(pools.decode), 100)  # heavy runs ahead
    lifted = pools.ledgers[0].counter("light")
    pools.decode.add(light)  # heavy (pending, far ahead) must not drag light up
    assert pools.ledgers[0].counter("light") == lifted == 10


def test_stale_views_see_other_pools_only_after_a_publication():
    pools = make_pool_policies("two-stage-vtc", FairnessConfig(stale_views=True))
    prefill_view, decode_view = pools.views
    r = Req(1, "a", prompt=10)
    pools.prefill.add(r)
    admit(pools.prefill)  # charged at prefill: visible to the prefill view at once
    assert prefill_view.counter("a") == 10 and decode_view.counter("a") == 0
    pools.decode.add(r)  # the hand-over carries the client's counter: 10
    admit(pools.decode)
    produce(pools.decode, r, 5)
    # decode sees its own charges at once; prefill does not see them yet
    assert decode_view.counter("a") == 20 and prefill_view.counter("a") == 10
    pools.publish()
    assert (
        prefill_view.counter("a") == decode_view.counter("a") == 20 == pools.ledgers[0].counter("a")
    )


def test_colocated_and_disaggregated_names_are_checked():
    with pytest.raises(ConfigError, match="disaggregated"):
        make_policy("two-stage-vtc")
    with pytest.raises(ConfigError, match="per-stage-vtc or two-stage-vtc"):
        make_pool_policies("vtc")
    with pytest.raises(ConfigError, match="fcfs, lcf, rpm, vtc"):
        make_policy("wfq")


def test_a_stale_view_learns_a_lift_with_the_request_that_caused_it():
    """A returning client is lifted in the ledger when its request arrives; the pool
    it arrives at must order it by the lifted counter, not by its stale snapshot."""
    pools = make_pool_policies("two-stage-vtc", FairnessConfig(stale_views=True))
    busy = Req(1, "busy", 0.0, prompt=50)
    pools.prefill.add(busy)
    admit(pools.prefill)
    pools.decode.add(busy)
    admit(pools.decode)
    produce(pools.decode, busy, 100)  # busy: 250 in the ledger
    pools.prefill.add(Req(2, "busy", 1.0))  # pending again (lifted to its own 250)
    pools.prefill.add(Req(3, "late", 2.0))  # lifted to 250 in the ledger
    prefill_view = pools.views[0]
    assert prefill_view.counter("late") == pools.ledgers[0].counter("late") == 250
    assert prefill_view.counter("busy") == 250


@pytest.mark.parametrize("cost", [LinearCost(), LinearCost(w_in=1, w_out=3), QuadraticCost()])
def test_a_steps_tokens_charged_at_once_equal_them_charged_one_by_one(cost):
    """The coordinator charges a decode step's tokens per request at once
    (``on_tokens_of``); with a linear cost VTC sums them per client. The counters come
    out as charging every token alone (quadratic: each request's run of tokens priced
    from where it started)."""
    ledger_kwargs = dict(weights={"b": 2.0})
    one, many = (CounterOrdered(ServiceLedger(**ledger_kwargs), cost) for _ in range(2))
    reqs = {p: [Req(i, c, prompt=7 + i) for i, c in enumerate("aabc")] for p in (one, many)}
    for p, rs in reqs.items():
        for r in rs:
            p.add(r)
        for _ in rs:
            admit(p)
    for step_tokens in ([1, 1, 1, 1], [2, 0, 3, 1], [1, 4, 1, 0]):
        for r, n in zip(reqs[one], step_tokens, strict=True):
            for _ in range(n):
                produce(one, r)
        counts = {}
        for r, n in zip(reqs[many], step_tokens, strict=True):
            r.output += n
            counts[r] = n
        many.on_tokens_of(counts)
        for client in "abc":
            assert many.ledger.counter(client) == pytest.approx(one.ledger.counter(client))
    assert one.ledger.counter("a") > 0
