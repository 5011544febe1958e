"""``python -m colocated_node --node-id ... --coordinator tcp://... --store host:port
[--model tiny ...]``: one colocated node process (prefill and decode on one worker)."""

from __future__ import annotations

from colocated_node.node import ColocatedNode
from disagg.node.runtime import node_main


def main(argv: list[str] | None = None) -> None:
    node_main("colocated", ColocatedNode, __doc__, argv)


if __name__ == "__main__":
    main()
