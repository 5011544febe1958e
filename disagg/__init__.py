"""disagg: prefill/decode-disaggregated LLM serving, fair between clients.

The offline API, in the shape vLLM users know::

    from disagg import LLM, SamplingParams
    llm = LLM("tiny")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=16))

Heavy modules (torch) load on first use, so ``import disagg`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("disagg.engine.llm", "LLM"),
    "RequestOutput": ("disagg.engine.llm", "RequestOutput"),
    "SamplingParams": ("disagg.sampling_params", "SamplingParams"),
}

if TYPE_CHECKING:
    from disagg.engine.llm import LLM, RequestOutput
    from disagg.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'disagg' has no attribute {name!r}")
