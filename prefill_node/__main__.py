"""``python -m prefill_node --node-id ... --coordinator tcp://... --store host:port
[--model tiny ...]``: one prefill node process."""

from __future__ import annotations

from disagg.node.runtime import node_main
from prefill_node.node import PrefillNode


def main(argv: list[str] | None = None) -> None:
    node_main("prefill", PrefillNode, __doc__, argv)


if __name__ == "__main__":
    main()
