from __future__ import annotations

from importlib import import_module

import pytest
import torch

import disagg_kernels
from disagg_kernels._triton import HAS_TRITON
from disagg_kernels.backend import (
    ENV_VAR,
    get_kernel_backend,
    kernel_backend,
    resolve,
    set_kernel_backend,
)

CPU = torch.zeros(1)


def test_auto_on_cpu_is_torch() -> None:
    assert get_kernel_backend() == "auto"
    assert resolve(CPU) == "torch"


@pytest.mark.cuda
def test_auto_on_cuda_is_triton_when_available() -> None:
    assert resolve(CPU.cuda()) == ("triton" if HAS_TRITON else "torch")


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="auto, triton, torch"):
        set_kernel_backend("cuda")  # type: ignore[arg-type]
    assert get_kernel_backend() == "auto"


def test_unknown_env_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve(CPU)


def test_env_var_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "torch")
    assert get_kernel_backend() == "torch"
    set_kernel_backend("auto")  # an explicit override beats the environment
    assert get_kernel_backend() == "auto"
    set_kernel_backend(None)
    assert get_kernel_backend() == "torch"


def test_context_manager_restores_previous_choice_even_on_error() -> None:
    set_kernel_backend("torch")
    with pytest.raises(KeyError), kernel_backend("auto"):
        assert get_kernel_backend() == "auto"
        raise KeyError
    assert get_kernel_backend() == "torch"


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernel_backend("triton"):
        assert resolve(CPU) == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve(CPU)


def test_package_exports() -> None:
    for name in [
        "store_kvcache",
        "paged_decode_attention",
        "prefill_attention",
        "gather_blocks",
        "scatter_blocks",
        "set_kernel_backend",
        "kernel_backend",
        "resolve",
        "KernelBackend",
    ]:
        assert hasattr(disagg_kernels, name), name


# Each dispatcher must route to the implementation the backend names: (module, name, arity).
# import_module, because `disagg_kernels.store_kvcache` is the re-exported function, not the module.
DISPATCH = [
    ("disagg_kernels.store_kvcache", "store_kvcache", 5),
    ("disagg_kernels.paged_attention", "paged_decode_attention", 6),
    ("disagg_kernels.prefill_attention", "prefill_attention", 6),
    ("disagg_kernels.block_copy", "gather_blocks", 2),
    ("disagg_kernels.block_copy", "scatter_blocks", 3),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("module_name", "name", "arity"), DISPATCH, ids=[d[1] for d in DISPATCH])
def test_dispatch_follows_backend(
    monkeypatch: pytest.MonkeyPatch, module_name: str, name: str, arity: int, backend: str
) -> None:
    module = import_module(module_name)
    calls: list[str] = []
    for impl in ("torch", "triton"):
        monkeypatch.setattr(module, f"{name}_{impl}", lambda *a, _impl=impl: calls.append(_impl))
    monkeypatch.setattr(module, "resolve", lambda tensor: backend)
    getattr(module, name)(*[CPU] * arity)
    assert calls == [backend]


def test_float32_attention_asks_tl_dot_for_ieee_precision():
    """Triton's default runs float32 tl.dot as TF32 (10-bit mantissa) on a GPU, far from
    the float32 reference the engine is compared with; 16-bit inputs keep the default."""
    from disagg_kernels._triton import dot_precision

    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"
