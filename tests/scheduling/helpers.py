"""A minimal request and a driver that plays a single-pool server against a policy:
admit by the policy's order, charge input on admission and output per token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Req:
    seq_id: int
    client_id: str
    arrival_time: float = 0.0
    prompt: int = 10
    output: int = 0  # tokens produced so far
    want: int = 10  # tokens to produce

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt

    @property
    def num_output_tokens(self) -> int:
        return self.output


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    """Weighted-free raw service per client, as h(n_in, n_out) = n_in + 2 n_out."""

    by_client: dict[str, float] = field(default_factory=dict)

    def add(self, client: str, amount: float) -> None:
        self.by_client[client] = self.by_client.get(client, 0.0) + amount


def admit(policy, served: Served | None = None) -> Req:
    req = policy.pop()
    policy.on_admitted(req, req.prompt)
    if served is not None:
        served.add(req.client_id, req.prompt)
    return req


def produce(policy, req: Req, n: int = 1, served: Served | None = None) -> None:
    req.output += n
    policy.on_tokens(req, n)
    if served is not None:
        served.add(req.client_id, 2 * n)
