"""The typed messages between the coordinator's node endpoint and prefill/decode nodes.

Same framing as the client protocol, under its own magic: ``[b"disagg-node", b"4", JSON]``
(a client that dials the node port by mistake is refused, not misread). Nodes use a
DEALER, the coordinator a ROUTER. Tensors never travel here: KV moves over
``kv_transfer``; these messages say which request moves where.

Request ids on this channel are the coordinator's integer ids (``rid``), unique for the
coordinator's lifetime; a node never sees a client's own request id.

Nodes name each other by KV endpoint (``kv_transfer.pairs``): the node id plus a random
incarnation tag, new on every start, so a restarted node is a new peer, never mistaken
for the process it replaces. A pair's channel has an epoch the coordinator hands out in
``Push``/``PullGo``: when either side reports the channel broken (``broken_peer``), the
coordinator moves the pair to the next epoch and both sides form a fresh channel on
their next transfer (after ``MAX_PAIR_EPOCHS`` breaks the pair is given up: its
requests recompute on the decode node instead).

The life of a request, as the messages tell it::

    coordinator -> prefill   PrefillTask      (credit allowing)
    prefill -> coordinator   Prefilled        (first token; KV now held)
    coordinator -> decode    DecodeTask       (source = the prefill node; credit allowing)
    decode -> coordinator    PullRequest      (decode has blocks for them)
    coordinator -> prefill   Push             (send KV to that endpoint)
    coordinator -> decode    PullGo           (receive KV from that endpoint)

Pulls are batched: one transfer carries every request a decode node admitted in one
step from the same prefill node, their blocks back to back in the order of ``rids``
(both sides build the same list, and the transfer header checks it), so a burst of
short requests costs one handshake, not one each.
    prefill -> coordinator   Pushed           (blocks freed)
    decode -> coordinator    StepTokens       (every step: new tokens of every request,
                                               and the text they add)

Nodes detokenise: the text a token adds travels with it (``PrefillResult.text``,
``StepTokens.texts``), and the coordinator only forwards and concatenates it. A
``DecodeTask`` says how many characters were already streamed (``text_chars``), so the
node that takes a request over (after prefill, or after a node died) goes on from the
next character.

A ``DecodeTask`` without a source (KV lost: prefill node died, transfer failed, lease
expired, decode node died mid-stream) is *resumed* by recomputation on the decode node
from the prompt and the tokens already streamed.

A *colocated* node (role ``colocated``) runs both phases of the requests it holds, so
its requests' life is shorter::

    coordinator -> colocated DecodeTask       (no source: prefill prompt + tokens so far)
    colocated -> coordinator Admitted         (blocks allocated: input charged now)
    colocated -> coordinator StepTokens       (the prefill's first token, then every step)

The role and ``Admitted`` are additive within version 3: a coordinator that predates
them cannot decode the registration (the role fails validation), so the node's
registration times out and it never runs under a coordinator that cannot serve it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from disagg.engine.parallel.handoff import KVNodeLayout
from disagg.errors import ProtocolError
from disagg.protocol.messages import Sampling, SerializedAsItself

NODE_MAGIC = b"disagg-node"
# Version 3 added ``NodeBatch`` (a node's messages of one coordinator turn in one);
# version 4 made ``StepTokens`` columns and moved detokenisation to the nodes (``texts``,
# ``PrefillResult.text``, ``DecodeTask.text_chars``).
NODE_PROTOCOL_VERSION = b"4"
MAX_NODE_MESSAGE_BYTES = 64 << 20

Role = Literal["prefill", "decode", "colocated"]
FinishReason = Literal["stop", "length"]
# A KV endpoint: node id, "@", incarnation tag (kv_transfer.pairs.new_endpoint).
Endpoint = Annotated[str, Field(min_length=3, max_length=256, pattern=r"^[^@|]+@[0-9a-f]+$")]


class _NodeMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# -- node -> coordinator ---------------------------------------------------------------


class Register(_NodeMessage):
    """A node joins. ``endpoint`` names this incarnation for KV transfers;
    ``capacity_tokens`` is its KV pool; ``model`` the model's fingerprint, which must match
    the coordinator's."""

    type: Literal["register"] = "register"
    node_id: str
    role: Role
    endpoint: Endpoint
    secret: str | None = None
    model: str
    block_size: int
    capacity_tokens: int
    max_model_len: int
    max_batch_tokens: int
    pid: int
    # Its KV pool's shape and parallel layout: the coordinator refuses a node whose KV
    # cannot be handed to or from the nodes of the other role (None: not stated, as by
    # simulated nodes, which move no KV).
    kv: KVNodeLayout | None = None


class Credit(_NodeMessage):
    """Heartbeat and room: ``free_tokens`` the node can still take, counting everything
    it was sent up to task number ``tasks_seen``."""

    type: Literal["credit"] = "credit"
    free_tokens: int
    tasks_seen: int
    queued: int = 0
    running: int = 0
    held: int = 0


class PrefillResult(_NodeMessage):
    rid: int
    first_token: int
    finish_reason: FinishReason | None = None  # done at prefill: no KV held
    text_end: int | None = None
    text: str = ""  # the text the first token adds (all of it when finished here)
    prefill_start: float  # node's monotonic clock, for latency breakdowns
    prefill_s: float


class Prefilled(_NodeMessage):
    """One prefill batch ran; the KV of each unfinished request is held until pushed."""

    type: Literal["prefilled"] = "prefilled"
    results: list[PrefillResult]


class PullRequest(_NodeMessage):
    """The decode node has allocated blocks for ``rids`` and asks for their KV."""

    type: Literal["pull_request"] = "pull_request"
    rids: list[int]


class Pushed(_NodeMessage):
    """The prefill node sent the KV of ``rids`` to ``dest`` over the channel of ``epoch``
    (or failed to: ``error``; ``broken_peer``: that channel cannot carry another transfer)
    and freed it."""

    type: Literal["pushed"] = "pushed"
    rids: list[int]
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    dest: Endpoint | None = None
    epoch: int = Field(default=0, ge=0)
    broken_peer: bool = False


class Pulled(_NodeMessage):
    """The decode node has the KV of ``rids`` from ``source`` over the channel of
    ``epoch`` (``error``: it did not, and recomputes; ``broken_peer``: that channel cannot
    carry another transfer)."""

    type: Literal["pulled"] = "pulled"
    rids: list[int]
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    broken_peer: bool = False
    source: Endpoint | None = None
    epoch: int = Field(default=0, ge=0)


class Ending(_NodeMessage):
    """``rid`` is done with its last token in this message (``text_end``: where a stop
    string cut its text)."""

    rid: int
    finish_reason: FinishReason
    text_end: int | None = None


class StepTokens(_NodeMessage):
    """One decode step's (or resume prefill's) new tokens, for every request in it, as
    columns (one entry per token): request ``rids[i]``'s output token ``indices[i]`` is
    ``tokens[i]`` and adds ``texts[i]`` to its text (the node's detokenisation: ``""``
    while a character is unfinished, and the rest of the text with the last token).
    Columns, not a model per token: the coordinator validates one message per step,
    whatever the batch."""

    type: Literal["step_tokens"] = "step_tokens"
    rids: list[int] = Field(default_factory=list)
    indices: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    tokens: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    texts: list[str] = Field(default_factory=list)
    finished: list[Ending] = Field(default_factory=list)  # rids that ended this step
    preempted: list[int] = Field(default_factory=list)
    step_s: float = 0.0  # model time of the step (forward + sampling)

    @model_validator(mode="after")
    def _same_lengths(self) -> StepTokens:
        n = len(self.rids)
        for name in ("indices", "tokens", "texts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, rids {n}")
        if self.finished and not {e.rid for e in self.finished} <= set(self.rids):
            raise ValueError("finished names a rid without a token in this message")
        return self


class Admitted(_NodeMessage):
    """A colocated node admitted ``rids`` into its running batch (their KV blocks are
    allocated; their prefill is the next step): the coordinator charges their input now,
    once per request (a resumed or preempted request's recompute is not charged again)."""

    type: Literal["admitted"] = "admitted"
    rids: list[int]


class TaskFailed(_NodeMessage):
    """The node could not run ``rid`` (e.g. the model raised); it holds nothing of it."""

    type: Literal["task_failed"] = "task_failed"
    rid: int
    message: str


class Goodbye(_NodeMessage):
    type: Literal["goodbye"] = "goodbye"


# -- coordinator -> node ---------------------------------------------------------------


class Welcome(_NodeMessage):
    type: Literal["welcome"] = "welcome"
    node_id: str
    counters: dict[str, float] = Field(default_factory=dict)


class Refused(_NodeMessage):
    """Registration refused (wrong secret, model mismatch, duplicate id): the node exits."""

    type: Literal["refused"] = "refused"
    reason: str


class PrefillTask(_NodeMessage):
    type: Literal["prefill_task"] = "prefill_task"
    task: int  # per-node task number (credit accounting)
    rid: int
    client_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    counter: float
    arrival: float


class DecodeTask(_NodeMessage):
    """Decode ``rid``. ``source`` is the endpoint of the prefill node holding its KV
    (covering the prompt), or None: resume by recomputing from prompt + ``output_token_ids``.
    ``text_chars``: characters of output text already streamed (the node's text goes on
    from the next one: ``disagg.engine.detokenize.TextStream.resume``)."""

    type: Literal["decode_task"] = "decode_task"
    task: int
    rid: int
    client_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: Sampling
    counter: float
    arrival: float
    source: Endpoint | None = None
    text_chars: int = Field(default=0, ge=0)


class Push(_NodeMessage):
    """Send the KV of ``rids`` (in this order, as one transfer) to endpoint ``dest``, over
    the pair's channel of ``epoch``."""

    type: Literal["push"] = "push"
    rids: list[int]
    dest: Endpoint
    epoch: int = Field(default=0, ge=0)
    # The decode node's layout: which of its ranks take which layers and KV heads.
    peer_tp: int = Field(default=1, ge=1)
    peer_pp: int = Field(default=1, ge=1)


class PullGo(_NodeMessage):
    """Receive the KV of ``rids`` (in this order, as one transfer) from endpoint ``source``,
    over the pair's channel of ``epoch``."""

    type: Literal["pull_go"] = "pull_go"
    rids: list[int]
    source: Endpoint
    epoch: int = Field(default=0, ge=0)
    # The prefill node's layout: which of its ranks hold which layers and KV heads.
    peer_tp: int = Field(default=1, ge=1)
    peer_pp: int = Field(default=1, ge=1)


class SourceLost(_NodeMessage):
    """``rid``'s KV is gone (its prefill node died or released it): recompute instead."""

    type: Literal["source_lost"] = "source_lost"
    rid: int


class Release(_NodeMessage):
    """Drop ``rid`` and free whatever the node holds of it (abort, lease expiry)."""

    type: Literal["release"] = "release"
    rid: int


class Counters(_NodeMessage):
    """The merged counters as the coordinator knows them (a publication)."""

    type: Literal["counters"] = "counters"
    values: dict[str, float]


class Shutdown(_NodeMessage):
    type: Literal["shutdown"] = "shutdown"


class NodeBatch(_NodeMessage):
    """Several messages to one node that the coordinator decided at once, in order (a
    node acts on each as if it came alone)."""

    type: Literal["batch"] = "batch"
    messages: list[
        Annotated[
            Welcome | Refused | PrefillTask | DecodeTask | Push | PullGo | SourceLost
            | Release | Counters | Shutdown,
            Field(discriminator="type"),
            SerializedAsItself(),
        ]
    ]  # fmt: skip


NodeToCoordinator = (
    Register
    | Credit
    | Prefilled
    | PullRequest
    | Pushed
    | Pulled
    | StepTokens
    | Admitted
    | TaskFailed
    | Goodbye
)
CoordinatorToNode = (
    Welcome
    | Refused
    | PrefillTask
    | DecodeTask
    | Push
    | PullGo
    | SourceLost
    | Release
    | Counters
    | Shutdown
    | NodeBatch
)

_UP: TypeAdapter[Any] = TypeAdapter(Annotated[NodeToCoordinator, Field(discriminator="type")])
_DOWN: TypeAdapter[Any] = TypeAdapter(Annotated[CoordinatorToNode, Field(discriminator="type")])


def encode_node(msg: _NodeMessage) -> list[bytes]:
    return [NODE_MAGIC, NODE_PROTOCOL_VERSION, msg.__pydantic_serializer__.to_json(msg)]


def _decode(frames: Sequence[bytes], adapter: TypeAdapter[Any]) -> Any:
    if len(frames) != 3:
        raise ProtocolError("bad_frames", f"expected 3 frames, got {len(frames)}")
    magic, version, payload = frames
    if magic != NODE_MAGIC:
        raise ProtocolError("wrong_magic", f"first frame must be {NODE_MAGIC!r}")
    if version != NODE_PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"node protocol version {bytes(version)!r:.20}; supported: "
            f"{NODE_PROTOCOL_VERSION.decode()}",
        )
    if len(payload) > MAX_NODE_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"payload of {len(payload)} bytes")
    try:
        return adapter.validate_json(payload)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError("invalid_fields", f"{where}: {first['msg']}") from None


def decode_from_node(frames: Sequence[bytes]) -> NodeToCoordinator:
    """A node's message, on the coordinator; raises :class:`ProtocolError` only."""
    return _decode(frames, _UP)


def decode_from_coordinator(frames: Sequence[bytes]) -> CoordinatorToNode:
    """The coordinator's message, on a node; raises :class:`ProtocolError` only."""
    return _decode(frames, _DOWN)
