"""The coordinator: the single owner of every request from arrival to its one final reply.

Two ZeroMQ ROUTERs: one for clients (``docs/protocol.md``), one for nodes
(``disagg.protocol.cluster``). Requests wait in the prefill pool's policy queue; they go to
a prefill node when one has credit for them, in merged-counter order; after their first
token they wait in the decode pool's queue and go to the decode node with the most room.
Input cost is charged when the prefill pool admits a request, output cost as tokens are
reported; the counters are published to every node. When a node falls silent its
requests are re-dispatched: not yet prefilled -> prefilled again elsewhere; prefilled
or mid-decode -> resumed on a decode node from the prompt and the tokens already sent,
so a client's stream never has a gap or a repeat.

A colocated cluster (``CoordinatorSettings.colocated``) has one pool: requests wait in
one policy queue (single-stage VTC for the VTC policies) and go, as a ``DecodeTask``
without a KV source, to the colocated node with the most room; input is charged when
the node reports the request admitted, output as tokens are reported, both to the same
per-client counters. A colocated node that dies has its requests resumed on another
from the tokens already sent. Nodes of the other kind are refused at registration: no
fairness bound is stated for a cluster that mixes the two.

Runs on one asyncio loop (uvloop when installed by ``main``); every handler is
synchronous and short, so no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from disagg.coordinator.admission import TTFTPredictor
from disagg.coordinator.auth import (
    ClientAccess,
    OpenAccess,
    check_cluster_secret,
    configure_curve_server,
)
from disagg.coordinator.detokenize import IncrementalText
from disagg.coordinator.events import RequestEvents
from disagg.coordinator.metrics import CoordinatorMetrics
from disagg.coordinator.nodes import NodeState
from disagg.coordinator.tracked import Phase, Tracked
from disagg.engine.model_config import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.errors import (
    ConfigError,
    InvalidRequestError,
    ProtocolError,
    RequestRejectedError,
    ServerUnavailable,
)
from disagg.protocol import (
    Abort,
    Accepted,
    Error,
    Finished,
    Generate,
    Nodes,
    Ping,
    Pong,
    Timings,
    Tokens,
    decode_request,
    encode,
    error_from_exception,
    error_reply,
)
from disagg.protocol.cluster import (
    Admitted,
    Counters,
    Credit,
    DecodeTask,
    Goodbye,
    Prefilled,
    PrefillResult,
    PrefillTask,
    Pulled,
    PullGo,
    PullRequest,
    Push,
    Pushed,
    Refused,
    Register,
    Release,
    Shutdown,
    SourceLost,
    StepTokens,
    TaskFailed,
    TokenItem,
    Welcome,
    _NodeMessage,
    decode_from_node,
    encode_node,
)
from disagg.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES
from disagg.scheduling import FairnessConfig, make_policy, make_pool_policies
from disagg.scheduling.factory import PoolPolicies
from disagg.scheduling.vtc import CounterOrdered

log = logging.getLogger(__name__)

# A pair whose KV channel broke this many times is given up (its requests recompute).
MAX_PAIR_EPOCHS = 3


@dataclass
class CoordinatorSettings:
    client_address: str = "tcp://127.0.0.1:5555"
    node_address: str = "tcp://127.0.0.1:5556"
    policy: str = "two-stage-vtc"
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    cluster_secret: str | None = None
    dead_after_s: float = 3.0  # a node silent this long is dead
    no_node_timeout_s: float = 30.0  # a request with no live node of its kind fails after
    kv_lease_s: float = 60.0  # prefilled KV not pulled by then is released
    publish_interval_s: float = 0.05
    max_attempts: int = 3  # runs a request may fail before it fails for the client
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_in_flight_per_client: int = 10_000
    slo: tuple[float, float] | None = None  # (TTFT s, TPOT s) tracked per client, live
    # With an SLO: refuse a request whose predicted TTFT is over this factor x the TTFT SLO.
    reject_over_slo: float | None = None
    curve_secret_key: str | None = None  # CurveZMQ keypair file: both endpoints encrypted
    events_log: str | None = None  # append each ended request's events here (JSON lines)
    colocated: bool = False  # colocated nodes only (prefill/decode nodes are refused)


class Coordinator:
    def __init__(
        self,
        model_dir: str,
        settings: CoordinatorSettings | None = None,
        *,
        access: ClientAccess | None = None,
        metrics: CoordinatorMetrics | None = None,
    ):
        self.settings = s = settings or CoordinatorSettings()
        self.model_config = ModelConfig.from_dir(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.access: ClientAccess = access or OpenAccess(s.fairness.weights)
        self.metrics = metrics
        try:
            self.events = RequestEvents(log_path=s.events_log)
        except OSError as e:
            raise ConfigError("events_log", f"cannot append to {s.events_log}: {e.strerror}") from e
        # (client, total seconds, seconds in model steps) of the last finished requests
        self.finished_log: deque[tuple[str, float, float]] = deque(maxlen=100_000)
        # (prefill endpoint, decode endpoint) -> the epoch of their KV channel
        self.pair_epochs: dict[tuple[str, str], int] = {}
        self.pools = (
            _colocated_pool(s.policy, s.fairness)
            if s.colocated
            else make_pool_policies(s.policy, s.fairness)
        )
        self.nodes: dict[str, NodeState] = {}
        self.by_identity: dict[bytes, NodeState] = {}
        self.model_fingerprint: str | None = None
        self.requests: dict[int, Tracked] = {}
        self.by_client_key: dict[tuple[bytes, str], Tracked] = {}
        self.in_flight_per_client: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}  # per-key rate limits: arrival times
        self.ttft_predictor = TTFTPredictor()
        self._rids = itertools.count(1)
        self._published_versions: tuple[int, ...] = ()
        self._published_at = 0.0
        self.accepting = True
        self.ctx = zmq.asyncio.Context()
        self.clients = self.ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.node_socket = self.ctx.socket(zmq.ROUTER)
        self.node_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.node_socket.setsockopt(zmq.LINGER, 0)
        if s.curve_secret_key is not None:
            configure_curve_server(self.clients, s.curve_secret_key)
            configure_curve_server(self.node_socket, s.curve_secret_key)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = asyncio.Event()

    # -- life cycle ------------------------------------------------------------------

    def bind(self) -> tuple[str, str]:
        """Binds both endpoints; returns their actual addresses (port 0 -> ephemeral)."""
        self.clients.bind(self.settings.client_address)
        self.node_socket.bind(self.settings.node_address)
        return (
            self.clients.getsockopt(zmq.LAST_ENDPOINT).decode(),
            self.node_socket.getsockopt(zmq.LAST_ENDPOINT).decode(),
        )

    async def run(self) -> None:
        self._tasks = [
            asyncio.create_task(self._client_loop()),
            asyncio.create_task(self._node_loop()),
            asyncio.create_task(self._timer_loop()),
        ]
        await self._stopped.wait()

    def live_nodes(self, role: str | None = None) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.alive and (role is None or n.role == role)]

    async def wait_for_nodes(
        self, prefill: int, decode: int, timeout: float, *, colocated: int = 0
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                len(self.live_nodes("prefill")) >= prefill
                and len(self.live_nodes("decode")) >= decode
                and len(self.live_nodes("colocated")) >= colocated
            ):
                return
            await asyncio.sleep(0.05)
        raise ServerUnavailable(
            f"only {len(self.live_nodes('prefill'))}/{prefill} prefill, "
            f"{len(self.live_nodes('decode'))}/{decode} decode and "
            f"{len(self.live_nodes('colocated'))}/{colocated} colocated nodes registered "
            f"within {timeout:.0f} s",
            address=self.settings.node_address,
            timeout=timeout,
        )

    async def drain(self, timeout: float) -> int:
        """Stops accepting requests and waits up to ``timeout`` s for those in flight;
        fails what is left with ``unavailable``. Returns how many were failed."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.requests.values())
        for t in left:
            self._fail(t, ServerUnavailable("the server shut down", address=""), release=True)
        return len(left)

    async def close(self) -> None:
        for node in self.live_nodes():
            self._send_node(node, Shutdown())
        await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._stopped.set()
        self.events.close()
        self.clients.close(linger=0)
        self.node_socket.close(linger=0)
        self.ctx.term()

    # -- sockets ---------------------------------------------------------------------

    async def _client_loop(self) -> None:
        sock = self.clients
        while True:
            frames = await sock.recv_multipart(copy=True)
            while True:
                self._on_client_frames(frames)
                try:
                    frames = await sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
            self._dispatch()

    async def _node_loop(self) -> None:
        sock = self.node_socket
        while True:
            frames = await sock.recv_multipart(copy=True)
            while True:
                self._on_node_frames(frames)
                try:
                    frames = await sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
            self._dispatch()

    async def _timer_loop(self) -> None:
        interval = self.settings.publish_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                self._check_nodes()
                self._check_waits()
                self._publish()
                self._dispatch()
            except Exception:  # a bug here must not stop the timers
                log.exception("coordinator timer")

    def _reply(self, identity: bytes, msg: Any) -> None:
        try:
            self.clients.send_multipart([identity, *encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a client whose pipe is full or gone: drop, go on
            log.warning("reply to a client dropped: %s", e)

    def _send_node(self, node: NodeState, msg: _NodeMessage) -> None:
        try:
            self.node_socket.send_multipart([node.identity, *encode_node(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("message to %s dropped: %s", node.node_id, e)

    # -- clients ---------------------------------------------------------------------

    def _on_client_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        identity, body = frames[0], frames[1:]
        try:
            msg = decode_request(body, max_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            self._reply(identity, error_reply(e))
            return
        try:
            if isinstance(msg, Generate):
                self._on_generate(identity, msg)
            elif isinstance(msg, Abort):
                t = self.by_client_key.get((identity, msg.request_id))
                if t is not None:
                    self._finish(t, "abort", reply=False)
            elif isinstance(msg, Ping):
                self._reply(identity, Pong(nonce=msg.nonce))
        except Exception as e:
            log.exception("handling a client message")
            rid = getattr(msg, "request_id", None)
            self._reply(identity, error_from_exception(rid, e))

    def _on_generate(self, identity: bytes, msg: Generate) -> None:
        key = (identity, msg.request_id)
        if key in self.by_client_key:
            self._reply(
                identity,
                Error(
                    request_id=msg.request_id,
                    code="invalid_request",
                    field="request_id",
                    message=f"request_id {msg.request_id!r} is already in flight on this connection",
                ),
            )
            return
        try:
            if not self.accepting:
                raise ServerUnavailable("the server is shutting down", address="")
            identity_ = self.access.resolve(msg.api_key, msg.client_id)
            client = identity_.client_id
            params = msg.sampling.to_params()
            vocab = self.model_config.vocab_size
            for stop_id in params.stop_token_ids:
                if stop_id >= vocab:
                    raise InvalidRequestError(
                        "sampling.stop_token_ids", f"token id {stop_id} is not in [0, {vocab})"
                    )
            prompt_ids = self._prompt_ids(msg.prompt)
            self._check_limits(client, identity_.limits, prompt_ids, params.max_tokens)
        except (InvalidRequestError, RequestRejectedError, ServerUnavailable) as e:
            if self.metrics and isinstance(e, RequestRejectedError):
                self.metrics.request_rejected(msg.client_id, e.reason)
            self._reply(identity, error_from_exception(msg.request_id, e))
            return
        t = Tracked(
            rid=next(self._rids),
            identity=identity,
            request_id=msg.request_id,
            client_id=client,
            prompt_token_ids=prompt_ids,
            sampling=msg.sampling,
            params=params,
            stream=msg.stream,
            text=IncrementalText(self.tokenizer),
        )
        try:
            self._check_predicted_ttft(t)
            self.pools.prefill.add(t)
        except RequestRejectedError as e:  # e.g. the RPM limit
            if self.metrics:
                self.metrics.request_rejected(client, e.reason)
            self._reply(identity, error_from_exception(msg.request_id, e))
            return
        self.requests[t.rid] = t
        self.by_client_key[key] = t
        self.ttft_predictor.add(t.num_prompt_tokens)
        t.in_prefill_backlog = True
        self.in_flight_per_client[client] = self.in_flight_per_client.get(client, 0) + 1
        self.events.record(
            str(t.rid),
            "arrived",
            client_id=client,
            client_request_id=t.request_id,
            t=t.arrival_time,
        )
        if self.metrics:
            self.metrics.request_arrived(client)
        self._reply(
            identity, Accepted(request_id=msg.request_id, prompt_token_ids=t.prompt_token_ids)
        )

    def _check_predicted_ttft(self, t: Tracked) -> None:
        s = self.settings
        if s.slo is None or s.reject_over_slo is None:
            return
        predicted = self.ttft_predictor.predict(
            t.num_prompt_tokens, len(self.live_nodes("prefill"))
        )
        limit = s.reject_over_slo * s.slo[0]
        if predicted is not None and predicted > limit:
            raise RequestRejectedError(
                "slo",
                f"predicted TTFT {predicted:.3f} s is over {s.reject_over_slo:g} x the TTFT SLO "
                f"of {s.slo[0]:g} s ({self.ttft_predictor.backlog_tokens} prompt tokens ahead)",
            )

    def _leave_prefill_backlog(self, t: Tracked) -> None:
        if t.in_prefill_backlog:
            t.in_prefill_backlog = False
            self.ttft_predictor.remove(t.num_prompt_tokens)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer: send token ids")
            ids = self.tokenizer.encode(prompt)
            name = "prompt"
        else:
            if not prompt:
                raise InvalidRequestError("prompt", "is empty")
            vocab = self.model_config.vocab_size
            bad = next((i for i, t in enumerate(prompt) if t >= vocab), None)
            if bad is not None:
                raise InvalidRequestError(
                    "prompt", f"token id {prompt[bad]} at position {bad} is not in [0, {vocab})"
                )
            ids = list(prompt)
            name = "prompt"
        limit = self.max_model_len()
        if len(ids) >= limit:
            raise InvalidRequestError(
                name, f"{len(ids)} tokens leave no room to generate: max_model_len is {limit}"
            )
        return ids

    def max_model_len(self) -> int:
        lens = [n.max_model_len for n in self.nodes.values()]
        return min(lens) if lens else self.model_config.max_context

    def _check_limits(self, client: str, limits: Any, prompt_ids: list[int], max_tokens: int):
        if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
            raise RequestRejectedError(
                "prompt_too_long",
                f"the prompt has {len(prompt_ids)} tokens; this client may send at most "
                f"{limits.max_prompt_tokens}",
            )
        if limits.max_tokens is not None and max_tokens > limits.max_tokens:
            raise RequestRejectedError(
                "max_tokens_limit",
                f"max_tokens {max_tokens} is over this client's limit of {limits.max_tokens}",
            )
        rpm = limits.requests_per_minute
        if rpm is not None:
            now = time.monotonic()
            window = self._recent.setdefault(client, deque())
            while window and now - window[0] >= 60.0:
                window.popleft()
            if len(window) >= rpm:
                raise RequestRejectedError(
                    "rate_limit",
                    f"client {client!r} sent {len(window)} requests in the last minute "
                    f"(limit {rpm} per minute)",
                )
        queued = self.in_flight_per_client.get(client, 0)
        cap = limits.max_queued_requests or self.settings.max_in_flight_per_client
        if queued >= cap:
            raise RequestRejectedError(
                "queue_full",
                f"client {client!r} already has {queued} requests in flight (limit {cap})",
            )
        if rpm is not None:
            window.append(now)

    # -- nodes -----------------------------------------------------------------------

    def _on_node_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        identity, body = frames[0], frames[1:]
        try:
            msg = decode_from_node(body)
        except ProtocolError as e:
            log.error("dropped a malformed node message: %s", e)
            return
        if isinstance(msg, Register):
            self._on_register(identity, msg)
            return
        node = self.by_identity.get(identity)
        if node is None or not node.alive:
            return  # a node we declared dead, or never met: it must register again
        node.last_seen = time.monotonic()
        try:
            self._on_node_message(node, msg)
        except Exception:
            log.exception("handling %s from %s", msg.type, node.node_id)

    def _on_register(self, identity: bytes, msg: Register) -> None:
        existing = self.nodes.get(msg.node_id)
        if existing is not None and existing.alive and existing.endpoint == msg.endpoint:
            self._send_node(
                existing, Welcome(node_id=msg.node_id, counters=self._counters(msg.role))
            )
            return  # a repeated hello
        reason = None
        if not check_cluster_secret(self.settings.cluster_secret, msg.secret):
            reason = "wrong or missing cluster secret"
        elif self.model_fingerprint not in (None, msg.model):
            reason = f"model {msg.model} differs from the cluster's {self.model_fingerprint}"
        elif (msg.role == "colocated") != self.settings.colocated:
            reason = (
                f"a {msg.role} node in a "
                f"{'colocated' if self.settings.colocated else 'disaggregated'} cluster: "
                "colocated nodes are never mixed with prefill/decode nodes (no fairness "
                "bound is stated for the mix)"
            )
        elif existing is not None and existing.alive and existing.role != msg.role:
            reason = f"a live {existing.role} node is already registered as {msg.node_id}"
        if reason is None and existing is not None and existing.alive:
            # A new process under a live node's id (restarted before its heartbeats were
            # missed). Its routing id is the node id, so ZeroMQ already routes to the new
            # connection: the old process can no longer be reached, and what it held is lost.
            self._node_lost(existing, f"replaced by a new process ({msg.endpoint})")
        if reason is not None:
            log.warning("refused node %s: %s", msg.node_id, reason)
            self.node_socket.send_multipart([identity, *encode_node(Refused(reason=reason))])
            return
        self.model_fingerprint = msg.model
        node = NodeState.from_register(identity, msg)
        self.nodes[msg.node_id] = node
        self.by_identity[identity] = node
        log.info("node %s (%s, %s) joined", msg.node_id, msg.role, msg.endpoint)
        if self.metrics:
            self.metrics.set_node_alive(node.node_id, node.role, True)
        self._send_node(node, Welcome(node_id=msg.node_id, counters=self._counters(msg.role)))

    def _on_node_message(self, node: NodeState, msg: Any) -> None:
        if isinstance(msg, Credit):
            node.update(msg)
        elif isinstance(msg, Prefilled):
            if msg.results:
                tokens = sum(
                    self.requests[r.rid].num_prompt_tokens
                    for r in msg.results
                    if r.rid in self.requests
                )
                self.ttft_predictor.observe_batch(tokens, msg.results[0].prefill_s)
                node.model_s += msg.results[0].prefill_s
            for result in msg.results:
                self._on_prefilled(node, result)
        elif isinstance(msg, StepTokens):
            node.model_s += msg.step_s
            for item in msg.items:
                t = self.requests.get(item.rid)
                if t is not None:
                    t.model_s += msg.step_s
                self._on_tokens(node, item)
            if msg.preempted and self.metrics:
                for _ in msg.preempted:
                    self.metrics.preemption(node.node_id)
        elif isinstance(msg, Admitted):
            self._on_admitted(node, msg.rids)
        elif isinstance(msg, PullRequest):
            self._on_pull_request(node, msg.rids)
        elif isinstance(msg, Pushed):
            self._on_pushed(node, msg)
        elif isinstance(msg, Pulled):
            self._on_pulled(node, msg)
        elif isinstance(msg, TaskFailed):
            self._on_task_failed(node, msg)
        elif isinstance(msg, Goodbye):
            self._node_lost(node, "said goodbye")

    def _on_prefilled(self, node: NodeState, r: PrefillResult) -> None:
        t = self.requests.get(r.rid)
        if t is None or t.phase is not Phase.PREFILLING or t.prefill_node != node.node_id:
            if r.finish_reason is None:
                self._send_node(node, Release(rid=r.rid))  # aborted or re-dispatched meanwhile
            return
        self.events.record(str(t.rid), "prefill_start", node_id=node.node_id, t=r.prefill_start)
        self.events.record(
            str(t.rid), "prefill_end", node_id=node.node_id, t=r.prefill_start + r.prefill_s
        )
        t.model_s += r.prefill_s
        self._leave_prefill_backlog(t)
        if r.finish_reason is not None:
            node.requests.discard(t.rid)
        else:
            t.kv_node, t.kv_since = node.node_id, time.monotonic()
        self._add_tokens(t, [r.first_token])
        if r.finish_reason is not None:
            self._finish(t, r.finish_reason, text_end=r.text_end)
            return
        t.phase = Phase.WAITING_DECODE
        self.pools.decode.add(t)

    def _on_tokens(self, node: NodeState, item: TokenItem) -> None:
        t = self.requests.get(item.rid)
        if t is None or t.decode_node != node.node_id or t.phase is not Phase.DECODING:
            return  # a stale report (aborted, or moved after its node was declared dead)
        have = t.num_output_tokens
        if item.index > have:
            log.error("request %d: tokens from %d but %d sent; dropped", t.rid, item.index, have)
            return
        new = item.token_ids[have - item.index :]
        if not new:
            return
        if have == 1 and item.index == 1:
            self.events.record(str(t.rid), "decode_start", node_id=node.node_id)
        self._add_tokens(t, new)
        if item.finish_reason is not None:
            node.requests.discard(t.rid)
            self.events.record(str(t.rid), "decode_end", node_id=node.node_id)
            self._finish(t, item.finish_reason, text_end=item.text_end)

    def _add_tokens(self, t: Tracked, tokens: list[int]) -> None:
        now = time.monotonic()
        index = t.num_output_tokens
        t.output_token_ids.extend(tokens)
        if t.first_token_at is None:
            t.first_token_at = now
        self.pools.decode.on_tokens(t, len(tokens))
        if self.metrics:
            self.metrics.charge(t.client_id, "decode", self._cost_out(len(tokens)))
        if t.stream:
            self._reply(
                t.identity,
                Tokens(
                    request_id=t.request_id,
                    index=index,
                    token_ids=tokens,
                    text=t.text.delta(t.output_token_ids),
                ),
            )

    def _on_admitted(self, node: NodeState, rids: list[int]) -> None:
        """A colocated node admitted ``rids``: their input is charged now, once."""
        policy = self.pools.prefill
        for rid in rids:
            t = self.requests.get(rid)
            if t is None or t.decode_node != node.node_id or t.phase is not Phase.DECODING:
                continue
            self._leave_prefill_backlog(t)
            if not t.input_charged:
                policy.on_admitted(t, t.num_prompt_tokens)
                t.input_charged = True
                if self.metrics:
                    self.metrics.charge(t.client_id, "prefill", self._cost_in(t.num_prompt_tokens))

    def _on_pull_request(self, node: NodeState, rids: list[int]) -> None:
        """Pairs each request's decode node with the prefill node holding its KV: one
        Push/PullGo pair per prefill node, carrying all of its requests."""
        by_source: dict[str, list[int]] = {}
        for rid in rids:
            t = self.requests.get(rid)
            if t is None or t.decode_node != node.node_id:
                self._send_node(node, Release(rid=rid))
                continue
            source = self.nodes.get(t.kv_node) if t.kv_node else None
            if source is None or not source.alive or t.pull_started:
                self._send_node(node, SourceLost(rid=rid))
                continue
            if self._given_up((source.endpoint, node.endpoint)):
                self._send_node(node, SourceLost(rid=rid))  # recompute instead
                continue
            t.pull_started = True
            self.events.record(str(rid), "transfer_start", node_id=node.node_id)
            by_source.setdefault(source.node_id, []).append(rid)
        for source_id, group in by_source.items():
            source = self.nodes[source_id]
            epoch = self.pair_epochs.get((source.endpoint, node.endpoint), 0)
            self._send_node(source, Push(rids=group, dest=node.endpoint, epoch=epoch))
            self._send_node(node, PullGo(rids=group, source=source.endpoint, epoch=epoch))

    def _channel_broke(self, pair: tuple[str, str], epoch: int, reported_by: str) -> None:
        """A side of ``pair`` (prefill endpoint, decode endpoint) found the channel of
        ``epoch`` broken: the pair's next transfer forms a fresh one (once per epoch,
        whichever side reports first)."""
        if self.pair_epochs.get(pair, 0) != epoch:
            return
        self.pair_epochs[pair] = epoch + 1
        log.warning(
            "KV channel %s -> %s broke at epoch %d (reported by %s)%s",
            *pair, epoch, reported_by,
            "; given up: its requests recompute" if self._given_up(pair)
            else "; the next transfer forms it again",
        )  # fmt: skip

    def _given_up(self, pair: tuple[str, str]) -> bool:
        return self.pair_epochs.get(pair, 0) >= MAX_PAIR_EPOCHS

    def _on_pushed(self, node: NodeState, msg: Pushed) -> None:
        if msg.broken_peer and msg.dest is not None:
            self._channel_broke((node.endpoint, msg.dest), msg.epoch, node.node_id)
        for rid in msg.rids:
            node.requests.discard(rid)
            t = self.requests.get(rid)
            if t is not None and t.kv_node == node.node_id:
                t.kv_node = None
        if msg.error is None and self.metrics:
            self.metrics.kv_transfer(msg.bytes, msg.seconds)

    def _on_pulled(self, node: NodeState, msg: Pulled) -> None:
        if msg.broken_peer and msg.source is not None:
            self._channel_broke((msg.source, node.endpoint), msg.epoch, node.node_id)
        for rid in msg.rids:
            t = self.requests.get(rid)
            if t is None or t.decode_node != node.node_id:
                continue
            self.events.record(str(t.rid), "transfer_end", node_id=node.node_id)
            if msg.error is None:
                t.transfer_s = msg.seconds
            else:
                log.warning(
                    "request %d: KV pull failed (%s); recomputed on %s",
                    t.rid,
                    msg.error,
                    node.node_id,
                )

    def _on_task_failed(self, node: NodeState, msg: TaskFailed) -> None:
        node.requests.discard(msg.rid)
        t = self.requests.get(msg.rid)
        if t is None:
            return
        owner = t.prefill_node if t.phase is Phase.PREFILLING else t.decode_node
        if owner != node.node_id:
            return
        t.attempts += 1
        log.warning("request %d failed on %s: %s", t.rid, node.node_id, msg.message)
        if t.attempts >= self.settings.max_attempts:
            self._fail(
                t, RuntimeError(f"failed {t.attempts} times; last: {msg.message}"), release=True
            )
            return
        self._redispatch(t)

    def _node_lost(self, node: NodeState, why: str) -> None:
        if not node.alive:
            return
        node.alive = False
        log.log(
            logging.WARNING if node.requests else logging.INFO,  # leaving idle is no news
            "node %s (%s) is gone: %s; re-dispatching %d requests",
            node.node_id,
            node.role,
            why,
            len(node.requests),
        )
        if self.metrics:
            self.metrics.set_node_alive(node.node_id, node.role, False)
        for rid in list(node.requests):
            t = self.requests.get(rid)
            if t is None:
                continue
            if t.kv_node == node.node_id:
                t.kv_node = None
                # Also when its pull is under way: a receive from a dead process can wait
                # out the transfer timeout, and the decode node goes on without it.
                if t.phase is Phase.DECODING and t.decode_node:
                    decoder = self.nodes.get(t.decode_node)
                    if decoder is not None and decoder.alive:
                        self._send_node(decoder, SourceLost(rid=rid))
            if (t.phase is Phase.PREFILLING and t.prefill_node == node.node_id) or (
                t.phase is Phase.DECODING and t.decode_node == node.node_id
            ):
                self._redispatch(t)
        node.requests.clear()

    def _redispatch(self, t: Tracked) -> None:
        """Back to the queue it needs: prefill again if no token was produced yet, else
        resume on a decode node from the tokens already sent."""
        if t.kv_node is not None:
            holder = self.nodes.get(t.kv_node)
            if holder is not None and holder.alive:
                self._send_node(holder, Release(rid=t.rid))
                holder.requests.discard(t.rid)
            t.kv_node = None
        t.decode_node = None
        t.pull_started = False
        if t.output_token_ids:
            t.phase = Phase.WAITING_DECODE
            self.pools.decode.requeue(t)
        else:
            t.phase = Phase.QUEUED
            t.prefill_node = None
            self.pools.prefill.requeue(t)

    # -- dispatch --------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self.settings.colocated:
            self._dispatch_colocated()
        self._dispatch_prefill()
        self._dispatch_decode()
        if self.metrics:
            self.metrics.set_queue_depth("prefill", len(self.pools.prefill))
            self.metrics.set_queue_depth("decode", len(self.pools.decode))

    def _dispatch_prefill(self) -> None:
        policy = self.pools.prefill
        nodes = self.live_nodes("prefill")
        if not nodes:
            return
        while (t := policy.peek()) is not None:
            node = max(nodes, key=NodeState.available)
            need = node.blocks_tokens(t.num_prompt_tokens)
            if node.available() < need:
                break  # the head waits for room; it is not overtaken
            policy.pop()
            if not t.input_charged:
                policy.on_admitted(t, t.num_prompt_tokens)
                t.input_charged = True
                if self.metrics:
                    self.metrics.charge(t.client_id, "prefill", self._cost_in(t.num_prompt_tokens))
            t.phase, t.prefill_node = Phase.PREFILLING, node.node_id
            t.dispatched_at = t.dispatched_at or time.monotonic()
            node.requests.add(t.rid)
            self.events.record(str(t.rid), "dispatched", node_id=node.node_id)
            self._send_node(
                node,
                PrefillTask(
                    task=node.reserve(need),
                    rid=t.rid,
                    client_id=t.client_id,
                    prompt_token_ids=t.prompt_token_ids,
                    sampling=t.sampling,
                    counter=self._counter_of(policy, t.client_id),
                    arrival=t.arrival_time,
                ),
            )

    def _dispatch_decode(self) -> None:
        policy = self.pools.decode
        nodes = self.live_nodes("decode")
        if not nodes:
            return
        while (t := policy.peek()) is not None:
            node = max(nodes, key=NodeState.available)
            need = node.blocks_tokens(t.num_prompt_tokens + t.num_output_tokens + 1)
            if node.available() < need:
                break
            policy.pop()
            holder = self.nodes.get(t.kv_node) if t.kv_node else None
            source = holder.endpoint if holder is not None and holder.alive else None
            if source is not None and self._given_up((source, node.endpoint)):
                self._send_node(holder, Release(rid=t.rid))  # that channel was given up:
                holder.requests.discard(t.rid)  # recompute instead of pulling
                t.kv_node, source = None, None
            t.phase, t.decode_node, t.pull_started = Phase.DECODING, node.node_id, False
            node.requests.add(t.rid)
            self._send_node(
                node,
                DecodeTask(
                    task=node.reserve(need),
                    rid=t.rid,
                    client_id=t.client_id,
                    prompt_token_ids=t.prompt_token_ids,
                    output_token_ids=t.output_token_ids,
                    sampling=t.sampling,
                    counter=self._counter_of(policy, t.client_id),
                    arrival=t.arrival_time,
                    source=source,
                ),
            )

    def _dispatch_colocated(self) -> None:
        """The one queue, in its order, to the colocated node with the most room; the
        head waits for room, not overtaken. A request with tokens already sent (its
        node died) resumes from them."""
        policy = self.pools.prefill
        nodes = self.live_nodes("colocated")
        if not nodes:
            return
        while (t := policy.peek()) is not None:
            node = max(nodes, key=NodeState.available)
            need = node.blocks_tokens(t.num_prompt_tokens + t.num_output_tokens + 1)
            if node.available() < need:
                break
            policy.pop()
            if not t.output_token_ids:
                t.prefill_node = node.node_id
            t.phase, t.decode_node = Phase.DECODING, node.node_id
            t.dispatched_at = t.dispatched_at or time.monotonic()
            node.requests.add(t.rid)
            self.events.record(str(t.rid), "dispatched", node_id=node.node_id)
            self._send_node(
                node,
                DecodeTask(
                    task=node.reserve(need),
                    rid=t.rid,
                    client_id=t.client_id,
                    prompt_token_ids=t.prompt_token_ids,
                    output_token_ids=t.output_token_ids,
                    sampling=t.sampling,
                    counter=self._counter_of(policy, t.client_id),
                    arrival=t.arrival_time,
                ),
            )

    def _counter_of(self, policy: Any, client: str) -> float:
        return policy.view.counter(client) if isinstance(policy, CounterOrdered) else 0.0

    def _cost_in(self, n: int) -> float:
        return self.settings.fairness.cost(n, 0)

    def _cost_out(self, n: int) -> float:
        cost = self.settings.fairness.cost
        return cost(0, n) - cost(0, 0)

    # -- endings ---------------------------------------------------------------------

    def _finish(self, t: Tracked, reason: str, *, text_end: int | None = None, reply: bool = True):
        self._release_everywhere(t)
        t.finished_at = time.monotonic()
        self.events.record(str(t.rid), "finished")
        if not reply:
            return
        text = self.tokenizer.decode(t.output_token_ids) if self.tokenizer else ""
        if text_end is not None:
            text = text[:text_end]
        elif t.stream and (held_back := t.text.rest(text)):
            # The streamed texts add up to the final text (a stop string aside: then
            # Finished.text, cut before it, is authoritative).
            self._reply(
                t.identity,
                Tokens(
                    request_id=t.request_id,
                    index=t.num_output_tokens,
                    token_ids=[],
                    text=held_back,
                ),
            )
        timings = self._timings(t)
        self.finished_log.append((t.client_id, timings.total_s or 0.0, t.model_s))
        self._reply(
            t.identity,
            Finished(
                request_id=t.request_id,
                finish_reason=reason,  # type: ignore[arg-type]
                token_ids=t.output_token_ids,
                text=text,
                prompt_token_ids=t.prompt_token_ids,
                timings=timings,
                nodes=Nodes(prefill=t.prefill_node, decode=t.decode_node),
            ),
        )
        if self.metrics:
            self.metrics.request_finished(
                t.client_id, reason, timings.ttft_s or 0.0, timings.tpot_s
            )

    def _fail(self, t: Tracked, exc: Exception, *, release: bool) -> None:
        if release:
            self._release_everywhere(t)
        self.events.record(str(t.rid), "failed")
        reply = error_from_exception(t.request_id, exc)
        self._reply(t.identity, reply)
        if self.metrics:
            self.metrics.request_failed(t.client_id, reply.code)

    def _release_everywhere(self, t: Tracked) -> None:
        """Forgets ``t`` and frees whatever any node holds of it."""
        if t.phase is Phase.DONE:
            return
        self._leave_prefill_backlog(t)
        if t.phase is Phase.QUEUED:
            self.pools.prefill.remove(t)
        elif t.phase is Phase.WAITING_DECODE:
            self.pools.decode.remove(t)
        for name in {
            t.prefill_node if t.phase is Phase.PREFILLING else None,
            t.kv_node,
            t.decode_node if t.phase is Phase.DECODING else None,
        }:
            node = self.nodes.get(name) if name else None
            if node is not None and t.rid in node.requests:
                node.requests.discard(t.rid)
                if node.alive:
                    self._send_node(node, Release(rid=t.rid))
        self.pools.prefill.on_finished(t)
        self.pools.decode.on_finished(t)
        t.phase = Phase.DONE
        self.requests.pop(t.rid, None)
        self.by_client_key.pop((t.identity, t.request_id), None)
        left = self.in_flight_per_client.get(t.client_id, 1) - 1
        if left > 0:
            self.in_flight_per_client[t.client_id] = left
        else:
            self.in_flight_per_client.pop(t.client_id, None)

    def _timings(self, t: Tracked) -> Timings:
        end = t.finished_at or time.monotonic()
        ttft = t.first_token_at - t.arrival_time if t.first_token_at else None
        n = t.num_output_tokens
        tpot = (end - t.first_token_at) / (n - 1) if t.first_token_at and n > 1 else None
        queue = t.dispatched_at - t.arrival_time if t.dispatched_at else None
        return Timings(
            queue_s=queue,
            ttft_s=ttft,
            tpot_s=tpot,
            kv_transfer_s=t.transfer_s,
            total_s=end - t.arrival_time,
        )

    # -- timers ----------------------------------------------------------------------

    def node_process_exited(self, node_id: str, pid: int, returncode: int) -> None:
        """Whoever runs node processes saw ``pid`` (running ``node_id``) exit: that node is
        gone now, without waiting for its heartbeats to stop (call on the loop)."""
        node = self.nodes.get(node_id)
        if node is not None and node.alive and node.pid == pid:
            self._node_lost(node, f"its process exited with {returncode}")

    def _check_nodes(self) -> None:
        now = time.monotonic()
        for node in self.live_nodes():
            if now - node.last_seen > self.settings.dead_after_s:
                self._node_lost(node, f"silent for {now - node.last_seen:.1f} s")

    def _check_waits(self) -> None:
        """Requests with no live node of the kind they need fail after the bounded wait;
        prefilled KV nobody pulled within the lease is released."""
        now = time.monotonic()
        have = {
            "prefill": bool(self.live_nodes("prefill")),
            "decode": bool(self.live_nodes("decode")),
            "colocated": bool(self.live_nodes("colocated")),
        }
        for t in list(self.requests.values()):
            need = {Phase.QUEUED: "prefill", Phase.WAITING_DECODE: "decode"}.get(t.phase)
            if need is not None and self.settings.colocated:
                need = "colocated"
            if need is not None and not have[need]:
                if t.unplaced_since is None:
                    t.unplaced_since = now
                elif now - t.unplaced_since > self.settings.no_node_timeout_s:
                    self._fail(
                        t,
                        ServerUnavailable(
                            f"no live {need} node for {self.settings.no_node_timeout_s:.0f} s",
                            address="",
                        ),
                        release=True,
                    )
                continue
            t.unplaced_since = None
            if (
                t.kv_node
                and t.kv_since
                and not t.pull_started
                and now - t.kv_since > self.settings.kv_lease_s
            ):
                holder = self.nodes.get(t.kv_node)
                if holder is not None and holder.alive:
                    self._send_node(holder, Release(rid=t.rid))
                    holder.requests.discard(t.rid)
                t.kv_node = None
                if t.phase is Phase.DECODING and t.decode_node:
                    decoder = self.nodes.get(t.decode_node)
                    if decoder is not None and decoder.alive:
                        self._send_node(decoder, SourceLost(rid=t.rid))

    def _counters(self, role: str) -> dict[str, float]:
        policy = self.pools.prefill if role == "prefill" else self.pools.decode
        return policy.ledger.counters() if isinstance(policy, CounterOrdered) else {}

    def _publish(self) -> None:
        versions = tuple(ledger.version for ledger in self.pools.ledgers)
        now = time.monotonic()
        # Unchanged counters are sent again each second: the coordinator's heartbeat.
        if versions == self._published_versions and now - self._published_at < 1.0:
            return
        self._published_versions, self._published_at = versions, now
        self.pools.publish()
        by_role = {role: self._counters(role) for role in ("prefill", "decode")}
        by_role["colocated"] = by_role["prefill"]  # one pool: prefill and decode are it
        for node in self.live_nodes():
            self._send_node(node, Counters(values=by_role[node.role]))
        if self.metrics:
            for client, value in by_role["decode"].items():
                self.metrics.set_counter(client, value)


# Single-stage VTC on a colocated cluster: what each cluster policy becomes there.
COLOCATED_POLICY = {"per-stage-vtc": "vtc", "two-stage-vtc": "vtc"}


def _colocated_pool(policy: str, fairness: FairnessConfig) -> PoolPolicies:
    """One policy for both phases (the same object as both pools: input and output are
    charged to one counter per client)."""
    one = make_policy(COLOCATED_POLICY.get(policy, policy), fairness)
    ledgers = [one.ledger] if isinstance(one, CounterOrdered) else []
    return PoolPolicies(one, one, ledgers=ledgers)
