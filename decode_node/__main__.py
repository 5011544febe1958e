"""``python -m decode_node --node-id ... --coordinator tcp://... --store host:port
[--model tiny ...]``: one decode node process."""

from __future__ import annotations

from decode_node.node import DecodeNode
from disagg.node.runtime import node_main


def main(argv: list[str] | None = None) -> None:
    node_main("decode", DecodeNode, __doc__, argv)


if __name__ == "__main__":
    main()
