"""Backend choice shared by every kernel: Triton on CUDA, the pure-PyTorch reference elsewhere.

``RLCORE_KERNELS`` (``auto`` | ``triton`` | ``torch``) or a per-call ``backend=`` argument forces one side.
Forcing ``triton`` on CPU tensors works only under ``TRITON_INTERPRET=1`` (Triton's interpreter runs the
kernel body in NumPy), which is how the CPU tests check the Triton kernels.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

try:  # Triton is optional: CPU-only installs fall back to the references.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]

    class _LanguageStub:
        # kernel signatures annotate with tl.constexpr, evaluated when the module is imported
        constexpr = object

    tl = _LanguageStub()  # type: ignore[assignment]
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
INT32_MAX = 2**31 - 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for ``tensor``; raises if Triton is forced where it cannot run."""
    choice = (backend or os.environ.get("RLCORE_KERNELS", "auto")).lower()
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    runnable = HAS_TRITON and (tensor.is_cuda or (tensor.device.type == "cpu" and interpreting()))
    if choice == "triton":
        if not runnable:
            raise RuntimeError(
                f"Triton backend forced for a tensor on {tensor.device} but it cannot run there "
                f"(triton installed: {HAS_TRITON}; CPU tensors need TRITON_INTERPRET=1)")
        return "triton"
    return "triton" if (HAS_TRITON and tensor.is_cuda) else "torch"


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether offsets into any of ``tensors`` can pass int32: kernels then switch to int64 indexing."""
    return any(t.numel() > INT32_MAX or (t.numel() and t.storage_offset() + t.numel() > INT32_MAX)
               for t in tensors)


class LazyJit:
    """``triton.jit`` applied on first launch rather than at import.

    Triton decides between compiling and interpreting when a function is decorated; decorating at first
    launch keeps importing this package cheap and possible without Triton, and follows a
    ``TRITON_INTERPRET`` set after import. (triton.language's own helpers such as ``tl.sum`` are decorated
    when triton is imported, so interpreter runs still need the variable set before triton's import.)
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Any:
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed")
        mode = interpreting()
        if mode not in self._compiled:
            self._compiled[mode] = triton.jit(self.fn)
        return self._compiled[mode][grid]


def lazy_jit(fn: Callable[..., Any]) -> LazyJit:
    return LazyJit(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
