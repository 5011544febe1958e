"""The client's CPU per streamed token without sockets or a server: ``--streams``
streams of ``--tokens`` tokens each, their replies (one ``tokens`` message per step, one
token per stream) fed straight to the client's reply handler, every chunk read by its
own task as a user would::

    python -m bench.client_core [--streams 512] [--tokens 64] [--repeats 3]

Nothing listens at the client's address, so its ``generate`` messages stay queued in
ZeroMQ (keep ``--streams`` under the socket's send HWM of 1000 to compare with a client
whose sends block on a full pipe). Prints the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from disagg.client import AsyncClient, AsyncStream
from disagg.protocol import Accepted, Batch, Finished, Tokens, encode

PROMPT = [1, 2, 3]


async def one_run(streams: int, tokens: int) -> float:
    """CPU seconds per token for one run."""
    async with AsyncClient("tcp://127.0.0.1:1", timeout=300) as client:
        live = [client.stream(PROMPT, client_id="c", max_tokens=tokens) for _ in range(streams)]
        ids = [s.request_id for s in live]
        replies = [Batch(messages=[Accepted(request_id=r, prompt_token_ids=PROMPT) for r in ids])]
        for step in range(tokens):
            n = len(ids)
            step_tokens = Tokens(
                request_ids=ids, indices=[step] * n, token_ids=[7] * n, texts=["x"] * n
            )
            replies.append(Batch(messages=[step_tokens]))
        done = [
            Finished(request_id=r, finish_reason="length", token_ids=[7] * tokens, text="x" * tokens, prompt_token_ids=PROMPT)
            for r in ids
        ]  # fmt: skip
        replies.append(Batch(messages=done))
        frames = [encode(m) for m in replies]
        got = 0

        async def read(stream: AsyncStream) -> None:
            nonlocal got
            async for chunk in stream:
                got += len(chunk.token_ids)

        start = time.process_time()
        readers = [asyncio.create_task(read(s)) for s in live]
        await asyncio.sleep(0)  # every request submitted
        for f in frames:
            client._dispatch(f)
            await asyncio.sleep(0)  # the readers take their chunks
        await asyncio.gather(*readers)
        seconds = time.process_time() - start
        assert got == streams * tokens, got
        return seconds / got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import uvloop

    best = min(uvloop.run(one_run(args.streams, args.tokens)) for _ in range(args.repeats))
    print(f"client, {args.streams} streams x {args.tokens} tokens: {best * 1e6:.2f} us per token")


if __name__ == "__main__":
    main()
