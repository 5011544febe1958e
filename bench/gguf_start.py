"""First start (GGUF converted into the cache) vs second start (cache reused) of
``LLM("smollm2-135m-instruct")``, each in a fresh process with its own cache directory.

    python -m bench.gguf_start
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = (
    "import time; t = time.perf_counter(); from disagg import LLM; "
    "LLM('smollm2-135m-instruct', dtype='{dtype}'); print(time.perf_counter() - t)"
)


def start(cache: str, dtype: str) -> float:
    env = {**os.environ, "DISAGG_CACHE_DIR": cache}
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(dtype=dtype)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        first = start(cache, "float32")
        second = start(cache, "float32")
        second_bf16 = start(cache, "bfloat16")
    print(
        f"LLM('smollm2-135m-instruct') start, fresh process (imports included): first "
        f"(converts the GGUF) {first:.1f} s, second (cached) {second:.1f} s float32, "
        f"{second_bf16:.1f} s bfloat16 from the same cache entry"
    )


if __name__ == "__main__":
    main()
