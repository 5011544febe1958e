"""``disagg serve``: a coordinator and its prefill and decode node processes on this
machine, started together and stopped together.

``ServedCluster`` is the same thing as a library object (tests, benchmarks and the demo
use it): it runs the coordinator's event loop on a background thread and the nodes as
child processes, and ``stop()`` drains, shuts the nodes down and frees everything.

A node process that dies is started again (``restart_nodes``, at most
``MAX_RESTARTS_PER_MINUTE`` times a minute per node): the new process registers under the
same node id with a new KV endpoint and takes work like any other node, while the
coordinator has already re-dispatched what the dead one held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from disagg.coordinator.auth import ClientLimits, make_access
from disagg.coordinator.metrics import CoordinatorMetrics
from disagg.coordinator.server import Coordinator, CoordinatorSettings
from disagg.engine.config import DEFAULT_GPU_MEMORY_UTILIZATION
from disagg.engine.worker import resolve_model_dir
from disagg.errors import ConfigError
from disagg.gpus import (
    VISIBLE_ENV,
    memory_shares,
    node_visible_devices,
    parent_devices,
    place_nodes,
)
from disagg.node.settings import CLUSTER_SECRET_ENV
from disagg.scheduling import DISAGGREGATED_POLICIES, FairnessConfig

log = logging.getLogger(__name__)

POLICIES = (*DISAGGREGATED_POLICIES, "vtc")  # "vtc" on a cluster means two-stage VTC
MAX_RESTARTS_PER_MINUTE = 5


@dataclass
class ServeOptions:
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "auto"
    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # colocated nodes instead (then prefill = decode = 0: never mixed)
    policy: str = "two-stage-vtc"
    host: str = "127.0.0.1"
    port: int = 5555  # clients; nodes use port + 1, the KV rendezvous port + 2 (0: any free)
    node_port: int | None = None  # overrides port + 1
    metrics_port: int | None = None
    api_keys: str | None = None
    cluster_secret: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    client_limits: ClientLimits | None = None  # every client's, without an API-key file
    num_blocks: int | None = None  # per node
    block_size: int = 16
    max_batch_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None  # tokens per request; None: the model's context
    threads_per_node: int | None = None
    drain_timeout: float = 30.0
    dead_after_s: float = 3.0
    no_node_timeout_s: float = 30.0
    transfer_timeout: float = 30.0
    startup_timeout: float = 180.0
    log_dir: str | None = None  # node logs go here (default: this process's stderr)
    node_devices: dict[str, list[int]] = field(default_factory=dict)  # node id -> GPUs
    slo: tuple[float, float] | None = None  # (TTFT s, TPOT s): attainment is tracked live
    external_nodes: bool = False  # nodes are started by hand (other machines): print how
    advertise_host: str = field(default_factory=socket.gethostname)
    reject_over_slo: float | None = None  # early rejection: predicted TTFT > factor x SLO
    curve_secret_key: str | None = None  # CurveZMQ keypair file: both endpoints encrypted
    restart_nodes: bool = True  # a node process that dies is started again
    events_log: str | None = None  # each ended request's lifetime events, as JSON lines
    http_port: int | None = None  # the OpenAI-compatible gateway's port (0: any free)
    # Simulated nodes (disagg.simulated): one process of prefill + decode nodes whose
    # model steps sleep this latency profile's batch times; the coordinator is the real one.
    simulated: bool = False
    latency_profile: str | None = None
    simulated_tp: int = 1
    # (tp, pp) of each role's nodes: a node runs its model on tp x pp rank processes.
    layouts: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy == "vtc":
            self.policy = "two-stage-vtc"
        if self.policy not in DISAGGREGATED_POLICIES:
            raise ConfigError(
                "policy", f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}"
            )
        if self.colocated:
            if self.prefill or self.decode:
                from disagg.deployment import MixedDeploymentError

                raise MixedDeploymentError(
                    "colocated",
                    f"{self.colocated} colocated node(s) beside {self.prefill} prefill and "
                    f"{self.decode} decode: colocated nodes are never mixed with prefill/"
                    "decode nodes (no fairness bound is stated for the mix); set prefill "
                    "and decode to 0",
                )
        else:
            for name in ("prefill", "decode"):
                if getattr(self, name) < 1:
                    raise ConfigError(name, f"needs at least one {name} node")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError("device", f"must be cpu or cuda, got {self.device!r}")
        if self.reject_over_slo is not None and (self.slo is None or not self.reject_over_slo > 0):
            raise ConfigError(
                "reject_over_slo", "needs SLOs (a deployment with slo:) and a factor > 0"
            )
        if self.simulated and not self.latency_profile:
            raise ConfigError("latency_profile", "--simulated needs --latency-profile FILE")
        if self.simulated and self.colocated:
            raise ConfigError("simulated", "there are no simulated colocated nodes yet")
        if self.simulated and self.external_nodes:
            raise ConfigError("simulated", "simulated nodes run here: no --external-nodes")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if not 0 <= self.port < 65535 - 2:
            raise ConfigError("port", f"must be in [0, 65532], got {self.port}")
        for role, (tp, pp) in self.layouts.items():
            if role not in ("prefill", "decode", "colocated"):
                raise ConfigError("layouts", f"unknown role {role!r}")
            if not (isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1):
                raise ConfigError(f"{role}_tp", f"tp and pp must be integers >= 1, got {tp}, {pp}")
            if tp * pp > 1 and self.simulated:
                raise ConfigError(
                    f"{role}_tp", "simulated nodes take their layout from --simulated-tp"
                )
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError("http_port", f"must be in [0, 65535], got {self.http_port}")


class ServedCluster:
    """A coordinator plus ``prefill`` + ``decode`` node processes on this machine."""

    def __init__(self, options: ServeOptions):
        self.options = o = options
        self.model_dir = str(resolve_model_dir(o.model))  # writes the tiny model once, here
        # Port 0: every endpoint on a free port, learnt after binding (in start()).
        any_port = "*"
        self.client_address = f"tcp://{o.host}:{o.port or any_port}"
        self.node_address = f"tcp://{o.host}:{(o.node_port or o.port + 1) if o.port else any_port}"
        self.store_address = f"{o.host}:{o.port + 2 if o.port else 0}"
        self.access = make_access(o.api_keys, o.weights, o.client_limits)
        weights = dict(o.weights)
        weights.update(getattr(self.access, "weights", {}) or {})
        self.metrics = CoordinatorMetrics()
        self.metrics_port: int | None = None
        self.coordinator = Coordinator(
            self.model_dir,
            CoordinatorSettings(
                client_address=self.client_address,
                node_address=self.node_address,
                policy=o.policy,
                fairness=FairnessConfig(weights=weights),
                cluster_secret=o.cluster_secret,
                dead_after_s=o.dead_after_s,
                no_node_timeout_s=o.no_node_timeout_s,
                slo=o.slo,
                reject_over_slo=o.reject_over_slo,
                curve_secret_key=o.curve_secret_key,
                events_log=o.events_log,
                colocated=o.colocated > 0,
            ),
            access=self.access,
            metrics=self.metrics,
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, list[float]] = {}  # node id -> when it was restarted
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._gpus: dict[str, list[int]] = {}
        self.announce: Callable[[str], None] = lambda line: print(line, flush=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store = None
        self._logs: list = []
        self.gateway = None  # disagg.http.process.GatewayProcess, with http_port

    # -- nodes -----------------------------------------------------------------------

    def node_ids(self) -> list[tuple[str, str]]:
        """(role, node id) of every node, prefill nodes first."""
        o = self.options
        if o.colocated:
            return [("colocated", f"colocated-{i}") for i in range(o.colocated)]
        roles = [("prefill", f"prefill-{i}") for i in range(o.prefill)]
        return roles + [("decode", f"decode-{i}") for i in range(o.decode)]

    def _gpu_assignment(self) -> dict[str, list[int]]:
        """On CUDA: the deployment's device lists, else GPU i for the i-th node, round
        robin when there are fewer GPUs than nodes (nodes on one GPU move KV over CUDA
        IPC and split its memory; disagg/gpus.py). Indices are positions among the GPUs
        this process sees."""
        o = self.options
        if o.device != "cuda" or o.external_nodes:  # external nodes bring their own GPUs
            return {}
        if o.node_devices:
            return dict(o.node_devices)
        import torch

        ids = self.node_ids()
        sizes = {n: self.node_world_size(role) for role, n in ids}
        return place_nodes([n for _, n in ids], torch.cuda.device_count(), sizes)

    def node_world_size(self, role: str) -> int:
        tp, pp = self.options.layouts.get(role, (1, 1))
        return tp * pp

    def node_command(
        self, role: str, node_id: str, threads: int, *, python: str = sys.executable
    ) -> list[str]:
        """The command line of one node process (what `disagg serve` runs, or what an
        operator runs on another machine with ``--external-nodes``)."""
        o = self.options
        model = self.model_dir if not o.external_nodes else o.model
        cmd = [
            python,
            "-m",
            f"{role}_node",
            "--node-id", node_id,
            "--coordinator", self._advertised(self.node_address),
            "--store", self._advertised(self.store_address),
            "--model", model,
            "--device", o.device,
            "--dtype", o.dtype,
            "--block-size", str(o.block_size),
            "--max-batch-tokens", str(o.max_batch_tokens),
            "--max-num-seqs", str(o.max_num_seqs),
            "--threads", str(threads),
            "--transfer-timeout", str(o.transfer_timeout),
        ]  # fmt: skip
        tp, pp = o.layouts.get(role, (1, 1))
        if tp * pp > 1:
            cmd += ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
        if o.num_blocks:
            cmd += ["--num-blocks", str(o.num_blocks)]
        if o.max_model_len:  # nodes size activations and the KV pool for this, not the model's
            cmd += ["--max-model-len", str(o.max_model_len)]
        share = memory_shares(self._gpus, DEFAULT_GPU_MEMORY_UTILIZATION).get(node_id)
        if share is not None:  # a GPU shared with other nodes: an equal part of it
            cmd += ["--gpu-memory-utilization", f"{share:.4f}"]
        if o.curve_secret_key:  # the keypair file also holds the public key nodes need
            cmd += ["--curve-server-key", o.curve_secret_key]
        return cmd

    def _advertised(self, address: str) -> str:
        """``address`` as other machines reach it (a wildcard host is replaced)."""
        if self.options.host not in ("0.0.0.0", "*", "::"):
            return address
        return address.replace(self.options.host, self.options.advertise_host, 1)

    def _spawn_nodes(self) -> None:
        if self.options.simulated:
            self._spawn_simulated()
            return
        for role, node_id in self.node_ids():
            self._spawn(role, node_id)

    def simulated_command(self, *, python: str = sys.executable) -> list[str]:
        """The one process that runs every simulated node."""
        o = self.options
        assert o.latency_profile is not None
        return [
            python, "-m", "disagg.simulated",
            "--coordinator", self.node_address,
            "--latency-profile", o.latency_profile,
            "--model", self.model_dir,
            "--prefill", str(o.prefill),
            "--decode", str(o.decode),
            "--tp", str(o.simulated_tp),
            "--block-size", str(o.block_size),
            "--max-batch-tokens", str(o.max_batch_tokens),
            "--max-num-seqs", str(o.max_num_seqs),
        ]  # fmt: skip

    def _spawn_simulated(self) -> None:
        o = self.options
        env = dict(os.environ)
        if o.cluster_secret:
            env[CLUSTER_SECRET_ENV] = o.cluster_secret
        out = None
        if o.log_dir:
            Path(o.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(o.log_dir) / "simulated.log", "ab")  # noqa: SIM115
            self._logs.append(out)
        self.processes["simulated"] = subprocess.Popen(
            self.simulated_command(),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )

    def _spawn(self, role: str, node_id: str) -> None:
        o = self.options
        threads = o.threads_per_node or max(1, (os.cpu_count() or 1) // len(self.node_ids()))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if o.cluster_secret:
            env[CLUSTER_SECRET_ENV] = o.cluster_secret
        if node_id in self._gpus:  # this node's GPUs, as entries of our own list
            env[VISIBLE_ENV] = node_visible_devices(self._gpus[node_id], parent_devices(os.environ))
        out = None
        if o.log_dir:
            Path(o.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(o.log_dir) / f"{node_id}.log", "ab")  # noqa: SIM115
            self._logs.append(out)
        # A session of their own: Ctrl-C reaches `disagg serve`, which drains and then
        # tells the nodes to stop; a node left alone stops when the coordinator is silent.
        self.processes[node_id] = subprocess.Popen(
            self.node_command(role, node_id, threads),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )

    def _supervise(self) -> None:
        """Start again every node process that died, until ``stop()``; a node that keeps
        dying is given up after ``MAX_RESTARTS_PER_MINUTE`` restarts within a minute."""
        roles = {node_id: role for role, node_id in self.node_ids()}
        given_up: set[str] = set()
        while not self._stopping.wait(0.2):
            for node_id, proc in list(self.processes.items()):
                code = proc.poll()
                if code is None or node_id in given_up or self._stopping.is_set():
                    continue
                if self._loop is not None:  # gone now: no need to wait for its heartbeats
                    self._loop.call_soon_threadsafe(
                        self.coordinator.node_process_exited, node_id, proc.pid, code
                    )
                now = time.monotonic()
                recent = [t for t in self.restarts.get(node_id, []) if now - t < 60]
                if len(recent) >= MAX_RESTARTS_PER_MINUTE:
                    log.error(
                        "node %s exited with %s and was restarted %d times within a "
                        "minute: not restarting it again",
                        node_id, code, len(recent),
                    )  # fmt: skip
                    given_up.add(node_id)
                    continue
                log.warning("node %s exited with %s; starting it again", node_id, code)
                self.restarts[node_id] = [*recent, now]
                self._spawn(roles[node_id], node_id)

    def _announce_node_commands(self) -> None:
        o = self.options
        self.announce(
            f"disagg serve: waiting for {_describe_nodes(o)}; "
            "start each where it should run"
            + (f" (with {CLUSTER_SECRET_ENV} set)" if o.cluster_secret else "")
            + ":"
        )
        for role, node_id in self.node_ids():
            cmd = self.node_command(role, node_id, o.threads_per_node or 1, python="python")
            self.announce("  " + shlex.join(cmd))

    def kill_node(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Tests: kill one node process (SIGKILL by default: no goodbye)."""
        self.processes[node_id].send_signal(sig)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> ServedCluster:
        import torch.distributed as dist

        self._gpus = self._gpu_assignment()  # checked before anything starts
        host, port = self.store_address.rsplit(":", 1)
        for attempt in range(5):  # port 0: a free port, tried again should it be taken
            try:
                self._store = dist.TCPStore(
                    host,
                    int(port) or _free_port(host),
                    is_master=True,
                    wait_for_workers=False,
                    timeout=timedelta(seconds=60),
                )
                break
            except dist.DistNetworkError:
                if int(port) != 0 or attempt == 4:
                    raise
        self.store_address = f"{host}:{self._store.port}"
        self.client_address, self.node_address = self.coordinator.bind()
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.metrics_port)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_until_complete(self.coordinator.run())

        self._thread = threading.Thread(target=run, name="coordinator", daemon=True)
        self._thread.start()
        ready.wait()
        if self.options.external_nodes:
            self._announce_node_commands()
        else:
            self._spawn_nodes()
        try:
            self._call(
                self.coordinator.wait_for_nodes(
                    self.options.prefill,
                    self.options.decode,
                    self.options.startup_timeout,
                    colocated=self.options.colocated,
                ),
                timeout=self.options.startup_timeout + 5,
                watch_processes=True,
            )
        except BaseException:
            self.stop(drain_timeout=0)
            raise
        # (Simulated nodes share one process: it is not restarted node by node.)
        o = self.options
        if o.restart_nodes and not o.external_nodes and not o.simulated:
            self._supervisor = threading.Thread(
                target=self._supervise, name="node-supervisor", daemon=True
            )
            self._supervisor.start()
        if self.options.http_port is not None:
            self._start_gateway()
        return self

    def _start_gateway(self) -> None:
        """The OpenAI-compatible HTTP front end, a process of its own that is a client of
        this coordinator (docs/openai-api.md)."""
        from disagg.http.process import GatewayProcess

        o = self.options
        log_file = Path(o.log_dir) / "http.log" if o.log_dir else None
        try:
            self.gateway = GatewayProcess(
                self.client_address,
                str(self.model_dir),
                host=o.host,
                port=o.http_port or 0,
                log_file=log_file,
                # The keypair file holds the public key a client needs, as for nodes.
                extra_args=["--served-model-name", o.model]
                + (["--server-key", o.curve_secret_key] if o.curve_secret_key else []),
            ).wait_ready()
        except BaseException:
            self.stop(drain_timeout=0)
            raise

    def _call(self, coro, timeout: float, watch_processes: bool = False):
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(timeout=0.2)
            except TimeoutError:
                if watch_processes:
                    dead = [n for n, p in self.processes.items() if p.poll() not in (None, 0)]
                    if dead:
                        future.cancel()
                        raise ConfigError(
                            "nodes", f"node {dead[0]} exited during start-up (see its log)"
                        ) from None
                if time.monotonic() > deadline:
                    future.cancel()
                    raise

    def stop(self, drain_timeout: float | None = None) -> int:
        """Drains (up to ``drain_timeout`` s), stops the nodes and the coordinator.
        Returns how many in-flight requests had to be failed."""
        timeout = self.options.drain_timeout if drain_timeout is None else drain_timeout
        failed = 0
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                failed = self._call(self.coordinator.drain(timeout), timeout=timeout + 5)
            with contextlib.suppress(Exception):
                self._call(self.coordinator.close(), timeout=10)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():  # closed here, not by the GC whenever it comes
                self._loop.close()
        if self.gateway is not None:  # after the drain: it relayed the requests drained
            self.gateway.stop()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        self.metrics.close()
        self._store = None
        return failed

    def __enter__(self) -> ServedCluster:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _describe_nodes(o: ServeOptions) -> str:
    if o.colocated:
        return f"{o.colocated} colocated node(s)"
    return f"{o.prefill} prefill + {o.decode} decode node(s)"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_serve(options: ServeOptions) -> int:
    """The ``disagg serve`` command: start, print the client address, serve until
    SIGINT/SIGTERM, drain, exit 0."""
    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", "WARNING"))
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = ServedCluster(options)
    print(f"disagg serve: {cluster.access.describe()}", flush=True)
    cluster.start()
    o = options
    print(
        f"disagg serve: {_describe_nodes(o)}, model {o.model}, "
        f"policy {o.policy}, device {o.device}",
        flush=True,
    )
    if cluster.metrics_port is not None:
        print(f"disagg serve: metrics on http://{o.host}:{cluster.metrics_port}/metrics")
    if cluster.gateway is not None:
        print(f"disagg serve: OpenAI-compatible API on {cluster.gateway.url}/v1", flush=True)
    print(f"disagg serve: listening for clients on {cluster.client_address}", flush=True)
    while not stop.wait(0.5):
        pass
    print("disagg serve: draining ...", flush=True)
    failed = cluster.stop()
    print(f"disagg serve: stopped ({failed} in-flight requests failed by the drain timeout)")
    return 0
