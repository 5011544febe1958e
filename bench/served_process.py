"""Benchmarks serve from a child process (so the load generator does not share the
coordinator's interpreter); the child writes its client address into a file when it is
ready. ``wait_for_address`` is the parent's side of that."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def wait_for_address(server: subprocess.Popen, address_file: Path, timeout: float = 180) -> str:
    """The client address the child wrote, once it has; exits if the child died or did
    not get there within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not address_file.exists() or not address_file.read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit("the served system did not start")
        time.sleep(0.1)
    return address_file.read_text()
