"""Encode + decode cost of the hot-path message (Tokens), against the stdlib ``json``.

    python -m tests.protocol.bench_codec [--tokens N] [--repeat R]

Not collected by pytest (timings on a shared machine are not assertions); the numbers
are quoted in docs/protocol.md.
"""

from __future__ import annotations

import argparse
import json
import timeit

from disagg.protocol import MAGIC, PROTOCOL_VERSION, Tokens, decode_reply, encode


def _best_us(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=1, help="tokens in the message (one per request)"
    )
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    # uuid4 hexes, as the client makes them: one token of each of --tokens requests
    rids = [f"3f2a9c0d4e5b6a7f8091a2b3c4d5{i:04x}" for i in range(args.tokens)]
    ids = [31337 + i for i in range(args.tokens)]
    indices = [117] * args.tokens
    texts = [" hello"] * args.tokens

    def build() -> Tokens:
        return Tokens(request_ids=rids, indices=indices, token_ids=ids, texts=texts)

    msg = build()
    frames = encode(msg)
    assert decode_reply(frames) == msg

    def stdlib_encode() -> list[bytes]:
        obj = {
            "type": "tokens", "request_ids": rids, "indices": indices, "token_ids": ids,
            "texts": texts,
        }  # fmt: skip
        return [MAGIC, PROTOCOL_VERSION, json.dumps(obj, ensure_ascii=False).encode()]

    rows = [
        ("build Tokens (validated)", build),
        ("encode", lambda: encode(msg)),
        ("decode_reply", lambda: decode_reply(frames)),
        ("build + encode + decode", lambda: decode_reply(encode(build()))),
        ("stdlib json.dumps (baseline)", stdlib_encode),
        ("stdlib json.loads (baseline)", lambda: json.loads(frames[2])),
    ]
    print(f"Tokens with {args.tokens} token(s), payload {len(frames[2])} bytes")
    for name, fn in rows:
        print(f"  {name:<30} {_best_us(fn, args.number, args.repeat):7.2f} us")


if __name__ == "__main__":
    main()
