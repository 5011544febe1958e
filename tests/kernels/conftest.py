from __future__ import annotations

from collections.abc import Iterator

import pytest

from disagg_kernels.backend import ENV_VAR, set_kernel_backend


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from "auto" with no override, whatever the caller's environment."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_kernel_backend(None)
    yield
    set_kernel_backend(None)
