"""The two-stage VTC fairness bound (derived in docs/fairness.md, "The two-stage
bound"), checked over random workloads and random interleavings of the two pools.

An abstract two-pool server drives the real policy objects: a prefill admission takes
the prefill pool's pick, charges its prompt and its first token and queues it for
decode; a decode admission takes the decode pool's pick when its remaining output fits
the decode pool's reserved memory M_D; a decode step gives every running request one
token; a publication refreshes both pools' stale views. For every two clients and
every interval during which both were backlogged in both pools, their merged weighted
service differs by at most

    2 · (w_in·L_in + w_out·(M_D + 1)) / w_min + 2 · S

where S is the most service the other pool charged any client without a view seeing it
(what staleness can hide).
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.scheduling import FairnessConfig, LinearCost, make_pool_policies
from tests.scheduling.helpers import Req

W_IN, W_OUT = 1.0, 2.0


@st.composite
def scenarios(draw):
    clients = draw(st.integers(2, 4))
    return {
        "weights": [draw(st.sampled_from([1.0, 2.0, 3.0])) for _ in range(clients)],
        "prompt": [draw(st.integers(1, 64)) for _ in range(clients)],
        "output": [draw(st.integers(1, 48)) for _ in range(clients)],
        "jitter": draw(st.lists(st.integers(0, 16), min_size=8, max_size=8)),
        "capacity": draw(st.integers(48, 200)),
        "stale": draw(st.booleans()),
        "events": draw(st.lists(st.sampled_from("PPDSSSSU"), min_size=50, max_size=400)),
    }


class TwoPoolServer:
    def __init__(self, s: dict):
        names = [f"c{i}" for i in range(len(s["weights"]))]
        self.names = names
        self.weights = dict(zip(names, s["weights"], strict=True))
        config = FairnessConfig(
            cost=LinearCost(W_IN, W_OUT), weights=self.weights, stale_views=s["stale"]
        )
        self.pools = make_pool_policies("two-stage-vtc", config)
        (self.ledger,) = self.pools.ledgers
        self.s = s
        self.ids = itertools.count()
        self.capacity = s["capacity"]
        self.running: list[Req] = []
        self.reserved = 0
        self.unseen_max = 0.0  # S: largest charge a view has not seen yet
        self.served = dict.fromkeys(names, 0.0)  # merged weighted service
        for name in names:
            self._arrive(name)

    def _arrive(self, name: str) -> None:
        i = self.names.index(name)
        n = next(self.ids)
        jitter = self.s["jitter"][n % len(self.s["jitter"])]
        prompt = max(1, self.s["prompt"][i] - jitter)
        want = max(1, self.s["output"][i] - jitter // 2)
        self.pools.prefill.add(Req(n, name, float(n), prompt=prompt, want=want))

    def _charge(self, r: Req, tokens: int, policy) -> None:
        r.output += tokens
        policy.on_tokens(r, tokens)
        self.served[r.client_id] += W_OUT * tokens / self.weights[r.client_id]

    def step(self, event: str) -> None:
        if event == "P":
            r = self.pools.prefill.pop()
            self.pools.prefill.on_admitted(r, r.prompt)
            self.served[r.client_id] += W_IN * r.prompt / self.weights[r.client_id]
            self._arrive(r.client_id)  # every client stays backlogged at prefill
            self._charge(r, 1, self.pools.decode)  # the first token, made at prefill
            if r.output < r.want:
                self.pools.decode.add(r)
            else:
                self.pools.decode.on_finished(r)
        elif event == "D":
            head = self.pools.decode.peek()
            if head is not None and self.reserved + head.want - head.output <= self.capacity:
                self.pools.decode.pop()
                self.reserved += head.want - head.output
                self.running.append(head)
        elif event == "S":
            for r in list(self.running):
                self._charge(r, 1, self.pools.decode)
                self.reserved -= 1
                if r.output == r.want:
                    self.running.remove(r)
                    self.pools.decode.on_finished(r)
        elif event == "U":
            self.pools.publish()
        for view in self.pools.views:
            for name in self.names:
                self.unseen_max = max(
                    self.unseen_max, self.ledger.counter(name) - view.counter(name)
                )

    def backlogged_in_both(self) -> set[str]:
        return {
            n
            for n in self.names
            if self.pools.prefill.num_waiting(n) and self.pools.decode.num_waiting(n)
        }


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_merged_service_difference_stays_within_the_two_stage_bound(s):
    server = TwoPoolServer(s)
    # For each pair: the range of (served_i - served_j) since both became backlogged in both.
    spans: dict[tuple[str, str], list[float]] = {}
    worst = 0.0
    for event in s["events"]:
        server.step(event)
        both = server.backlogged_in_both()
        for i, j in itertools.combinations(server.names, 2):
            if i in both and j in both:
                d = server.served[i] - server.served[j]
                span = spans.setdefault((i, j), [d, d])
                span[0], span[1] = min(span[0], d), max(span[1], d)
                worst = max(worst, span[1] - span[0])
            else:
                spans.pop((i, j), None)
    w_min = min(server.weights.values())
    bound = (
        2 * (W_IN * max(s["prompt"]) + W_OUT * (server.capacity + 1)) / w_min
        + 2 * server.unseen_max
    )
    assert worst <= bound + 1e-9


def test_the_bound_is_not_vacuous_without_staleness():
    """A heavy interleaving where both clients stay backlogged: the observed difference
    is positive yet within the bound, and staleness (S) is zero with live views."""
    s = {
        "weights": [1.0, 1.0],
        "prompt": [64, 8],
        "output": [4, 40],
        "jitter": [0] * 8,
        "capacity": 60,
        "stale": False,
        "events": list("PPPPDSSSPDSSSSPDDSSSS" * 20),
    }
    server = TwoPoolServer(s)
    diffs = []
    for event in s["events"]:
        server.step(event)
        diffs.append(server.served["c0"] - server.served["c1"])
    assert server.unseen_max == 0
    assert max(diffs) - min(diffs) > 0
    assert max(abs(d) for d in diffs) <= 2 * (W_IN * 64 + W_OUT * 61)
