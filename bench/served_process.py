"""Benchmarks serve from a child process (so the load generator does not share the
coordinator's interpreter); the child writes its client address into a file when it is
ready. ``wait_for_address`` is the parent's side of that."""

from __future__ import annotations

import contextlib
import os
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


def process_tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of process ``pid`` (``"server"``) and of each of
    its children, named by the module they run (``prefill_node``, ``decode_node``), with
    the child's node id when it has one; a child's own children (a rank-group node's
    rank processes) count as that child's. Linux only (reads /proc)."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    def parent(p: int) -> int:
        return int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])

    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = parent(int(entry.name))
            except (OSError, ValueError, IndexError):  # exited meanwhile
                continue
    out = {"server": cpu(pid)}
    for child, up in parents.items():
        if up != pid:
            continue
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
            name = argv[argv.index("-m") + 1] if "-m" in argv else argv[0]
            if "--node-id" in argv:
                name = argv[argv.index("--node-id") + 1]
            total = cpu(child)
            for grandchild, up2 in parents.items():
                if up2 == child:
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        total += cpu(grandchild)
            out[name] = total
        except (OSError, ValueError, IndexError):  # exited meanwhile, or not ours
            continue
    return out
