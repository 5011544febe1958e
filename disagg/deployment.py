"""The deployment file: what ``disagg plan -o FILE`` writes and ``disagg serve
--deployment FILE`` starts.

YAML (JSON is accepted too: JSON is YAML). One object::

    model: tiny                 # 'tiny', a local Hugging Face directory, or a preset name
    device: cpu                 # cpu | cuda
    policy: two-stage-vtc       # fcfs | lcf | rpm | vtc | per-stage-vtc | two-stage-vtc
    slo: {ttft_s: 0.25, tpot_s: 0.1, attainment: 0.9}
    prefill: {tp: 2, pp: 1, instances: 1}
    decode: {tp: 1, pp: 1, instances: 2}
    nodes:                      # one entry per instance, prefill and decode
      - {role: prefill, index: 0, host: localhost, devices: [0, 1]}
      - {role: decode, index: 0, host: localhost, devices: [2]}
      - {role: decode, index: 1, host: localhost, devices: [3]}
    coordinator: {host: 127.0.0.1, client_port: 5555, node_port: 5556}
    cluster_secret: null
    predicted: {...}            # the planner's figures, for comparing with measurements

A colocated deployment (prefill and decode on the same instances) has ``colocated:``
instead of ``prefill:`` and ``decode:``, and nodes of role ``colocated``::

    colocated: {tp: 1, pp: 1, instances: 4}
    nodes:
      - {role: colocated, index: 0, devices: [0]}
      ...

The two kinds are never mixed in one deployment (:class:`MixedDeploymentError`): the
fairness bounds this system states are for one kind of pool (two-stage VTC over
prefill and decode pools, or single-stage VTC over colocated nodes); a client's requests
split between a colocated pool and a disaggregated one would be ordered by one counter
fed by two services of different speeds, and no bound for that is stated or tested.

Every mistake is a :class:`ConfigError` whose ``field`` is the dotted path of the
culprit (``nodes.2.devices``, ``slo.ttft_s``) and whose message names the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from disagg.config_errors import config_error
from disagg.errors import ConfigError

POLICIES = ("fcfs", "lcf", "rpm", "vtc", "per-stage-vtc", "two-stage-vtc")

_Degree = Annotated[int, Field(ge=1)]
_Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MixedDeploymentError(ConfigError):
    """A deployment with colocated nodes beside prefill or decode nodes: refused, since
    no fairness bound is stated for the mix."""


class PhaseLayout(_Strict):
    """One phase's instances: each on ``tp * pp`` devices."""

    tp: _Degree = 1
    pp: _Degree = 1
    instances: _Degree = 1

    @property
    def devices_per_instance(self) -> int:
        return self.tp * self.pp


class NodeRole(_Strict):
    """One instance of one phase, on ``devices`` (GPU indices) of ``host``; [] = CPU."""

    role: Literal["prefill", "decode", "colocated"]
    index: Annotated[int, Field(ge=0)]
    host: str = Field("localhost", min_length=1)
    devices: list[Annotated[int, Field(ge=0)]] = []


class SLO(_Strict):
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0)
    attainment: float = Field(0.9, gt=0, le=1)


class CoordinatorAddress(_Strict):
    host: str = Field("127.0.0.1", min_length=1)
    client_port: _Port = 5555
    node_port: _Port = 5556


class Deployment(_Strict):
    model: str = Field("tiny", min_length=1)
    device: Literal["cpu", "cuda"] = "cpu"
    policy: str = "two-stage-vtc"
    slo: SLO | None = None
    prefill: PhaseLayout | None = None
    decode: PhaseLayout | None = None
    colocated: PhaseLayout | None = None
    nodes: list[NodeRole]
    coordinator: CoordinatorAddress = CoordinatorAddress()
    cluster_secret: str | None = None
    predicted: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Deployment:
        if self.policy not in POLICIES:
            raise ConfigError(
                "policy", f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}"
            )
        if self.coordinator.client_port == self.coordinator.node_port:
            raise ConfigError(
                "coordinator.node_port",
                f"must differ from client_port ({self.coordinator.client_port})",
            )
        for role in self._check_layout():
            layout: PhaseLayout = getattr(self, role)
            indices = [n.index for n in self.nodes if n.role == role]
            if len(indices) != layout.instances:
                raise ConfigError(
                    "nodes",
                    f"{len(indices)} {role} node(s) listed but {role}.instances is "
                    f"{layout.instances}; list one node per instance",
                )
            if sorted(indices) != list(range(layout.instances)):
                raise ConfigError(
                    "nodes",
                    f"{role} node indices must be 0..{layout.instances - 1}, each once; "
                    f"got {sorted(indices)}",
                )
        taken: dict[tuple[str, int], int] = {}
        for i, node in enumerate(self.nodes):
            layout = getattr(self, node.role)
            if layout is None:
                raise MixedDeploymentError(
                    f"nodes[{i}].role",
                    f"a {node.role} node in a {self.kind} deployment: colocated nodes are "
                    "never mixed with prefill/decode nodes (no fairness bound is stated "
                    "for the mix)",
                )
            if node.devices and len(node.devices) != layout.devices_per_instance:
                raise ConfigError(
                    f"nodes[{i}].devices",
                    f"a {node.role} instance needs tp x pp = {layout.tp} x {layout.pp} = "
                    f"{layout.devices_per_instance} devices, got {len(node.devices)} "
                    f"({node.devices}); give exactly that many, or [] for CPU",
                )
            if node.devices and self.device == "cpu":
                raise ConfigError(
                    f"nodes[{i}].devices", "device is cpu: leave devices empty, or set device: cuda"
                )
            for d in node.devices:  # two instances on one GPU would fight over its memory
                other = taken.setdefault((node.host, d), i)
                if other != i:
                    raise ConfigError(
                        f"nodes[{i}].devices",
                        f"device {d} on {node.host} is already given to nodes[{other}]",
                    )
        if self.device == "cuda" and any(not n.devices for n in self.nodes):
            i = next(i for i, n in enumerate(self.nodes) if not n.devices)
            raise ConfigError(f"nodes[{i}].devices", "device is cuda: list the GPU indices")
        return self

    @property
    def kind(self) -> Literal["disaggregated", "colocated"]:
        return "colocated" if self.colocated is not None else "disaggregated"

    def _check_layout(self) -> tuple[str, ...]:
        """The roles this deployment has: prefill and decode, or colocated alone."""
        if self.colocated is not None:
            mixed = [r for r in ("prefill", "decode") if getattr(self, r) is not None]
            if mixed:
                raise MixedDeploymentError(
                    mixed[0],
                    f"a deployment is colocated or disaggregated, not both: drop {mixed[0]}: "
                    "or colocated: (no fairness bound is stated for the mix)",
                )
            return ("colocated",)
        for role in ("prefill", "decode"):
            if getattr(self, role) is None:
                raise ConfigError(role, "required: give prefill: and decode:, or colocated:")
        return ("prefill", "decode")


def parse_deployment(data: Any, source: str = "<deployment>") -> Deployment:
    """Validate a deployment already parsed; errors name the field and ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(source, "must hold one mapping (YAML) or object (JSON)")
    try:
        return Deployment.model_validate(data)
    except ValidationError as exc:
        err = config_error(exc, source=source, model=Deployment)
        causes = [e.get("ctx", {}).get("error") for e in exc.errors(include_url=False)]
        if any(isinstance(c, MixedDeploymentError) for c in causes):  # keep the type
            raise MixedDeploymentError(err.field, err.reason) from None
        raise err from None


def load_deployment(path: str | Path) -> Deployment:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "no such deployment file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read ({exc})") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(str(path), f"not valid YAML{line} ({exc})") from None
    return parse_deployment(data, str(path))


def save_deployment(dep: Deployment, path: str | Path) -> None:
    """Write ``dep`` as YAML that :func:`load_deployment` reads back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = yaml.safe_dump(dep.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees half a file
