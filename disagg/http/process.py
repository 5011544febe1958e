"""The gateway as a child process of ``disagg serve`` (and of tests and benchmarks).

A process of its own, not a thread of the serve process: the coordinator's event loop
runs there, and per-token HTTP work (JSON, SSE framing, sockets) would share its GIL;
apart, each has a core, and more gateways can be added the same way.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from disagg.errors import ConfigError

# Longer than the gateway's own wait for the coordinator's pong in /health
# (routes.HEALTH_TIMEOUT_S, 2 s): a 503 after that wait is an answer, not silence.
_HEALTH_WAIT_S = 5.0


class GatewayProcess:
    """Binds ``host:port`` here (0: any free port), then starts the gateway on that
    socket in a child process and waits until its ``/health`` answers."""

    def __init__(
        self,
        coordinator: str,
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.host = host
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port: int = self._sock.getsockname()[1]
        self._sock.set_inheritable(True)
        cmd = [
            sys.executable, "-m", "disagg.http",
            "--coordinator", coordinator, "--model", model,
            "--fd", str(self._sock.fileno()), *(extra_args or []),
        ]  # fmt: skip
        self._log = open(log_file, "ab") if log_file else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            pass_fds=(self._sock.fileno(),),
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,  # Ctrl-C reaches disagg serve, which stops us in order
        )
        # The child's copy is the only one: should it die, connections are refused
        # rather than left waiting in a backlog no one accepts from.
        self._sock.close()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def wait_ready(
        self, timeout: float = 60.0, *, require_coordinator: bool = True
    ) -> GatewayProcess:
        """Until ``/health`` answers 200 (or, without ``require_coordinator``, answers at
        all: a gateway is up before its coordinator is)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ConfigError(
                    "http_port", f"the HTTP gateway exited with {self.proc.returncode}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=_HEALTH_WAIT_S) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError:
                if not require_coordinator:
                    return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError("http_port", f"the HTTP gateway did not start in {timeout:g} s")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn: stop accepting, finish open requests
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
