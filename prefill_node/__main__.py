"""``python -m prefill_node --node-id ... --coordinator tcp://... --rank R --world-size W
--store host:port [--model tiny ...]``: one prefill node process."""

from __future__ import annotations

import argparse

from disagg.node.runtime import start_node
from disagg.node.settings import NodeSettings
from prefill_node.node import PrefillNode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prefill_node", description=__doc__)
    NodeSettings.add_arguments(parser)
    start_node(NodeSettings.from_args("prefill", parser.parse_args(argv)), PrefillNode)


if __name__ == "__main__":
    main()
