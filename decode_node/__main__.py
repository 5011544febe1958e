"""``python -m decode_node --node-id ... --coordinator tcp://... --rank R --world-size W
--store host:port [--model tiny ...]``: one decode node process."""

from __future__ import annotations

import argparse

from decode_node.node import DecodeNode
from disagg.node.runtime import start_node
from disagg.node.settings import NodeSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m decode_node", description=__doc__)
    NodeSettings.add_arguments(parser)
    start_node(NodeSettings.from_args("decode", parser.parse_args(argv)), DecodeNode)


if __name__ == "__main__":
    main()
