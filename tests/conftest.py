"""Suite-wide set-up.

The Triton interpreter must be switched on before any kernel module is imported, so that
the Triton kernels run (slowly, exactly) on CPU when no GPU is present.
"""

from __future__ import annotations

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker itself: ``"cuda" in item.keywords`` also matches any directory
        # named cuda above the tests (a checkout in .../cuda/ skipped the whole suite).
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
