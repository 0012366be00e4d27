"""Every use of PyTorch behaviour that is private or undocumented, in one place.

Written against torch 2.11 (CUDA 13.0, the GPU runs) and 2.13 (CPU); each function names what it relies on.
Importing this module warns once when the installed torch is outside the tested range: the functions
then still run, but a changed internal may make them fail or do nothing, and the warning says which to check.

It lives in ``rlcore.kernels`` (not ``rlcore``) because the kernels package must not import the rest of
rlcore; ``rlcore`` itself imports it from here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

TESTED_RANGE = ((2, 6), (2, 13))  # inclusive (major, minor); the tests run on 2.11 and 2.13


def _minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def in_tested_range(package: str, version: str, tested_range: tuple[tuple[int, int], tuple[int, int]],
                    compat_module: str) -> bool:
    """True when ``version``'s (major, minor) is in ``tested_range``; otherwise warns (``RuntimeWarning``),
    naming ``compat_module`` as the place to look first, and returns False."""
    low, high = tested_range
    if low <= _minor(version) <= high:
        return True
    warnings.warn(f"{package} {version} is outside the range rlcore was tested with ({low[0]}.{low[1]} – "
                  f"{high[0]}.{high[1]}); if something breaks, look first at {compat_module}",
                  RuntimeWarning, stacklevel=3)
    return False


def check_version(version: str = torch.__version__) -> bool:
    """True when ``version`` is in :data:`TESTED_RANGE`; warns (``RuntimeWarning``) otherwise."""
    return in_tested_range("torch", version, TESTED_RANGE, "rlcore/kernels/torch_compat.py")


check_version()


def normal_tensor_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference, grad-free) tensor over the same memory as ``tensor``.

    vLLM creates or post-processes weights under ``torch.inference_mode()``; autograd refuses to save such
    "inference tensors" for backward, even as frozen weights. ``Tensor.set_`` onto the inference tensor's
    storage (torch 2.11 – 2.13: allowed outside inference mode, under ``no_grad``) gives an ordinary tensor
    over the same bytes: nothing is copied and no flag of the original is changed.
    """
    if not tensor.is_inference():
        return tensor.detach()
    out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    with torch.no_grad():
        out.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return out


def replace_parameter(module: nn.Module, name: str, parameter: nn.Parameter) -> None:
    """Puts ``parameter`` in place of ``module``'s own parameter ``name`` (e.g. a meta placeholder)."""
    module.register_parameter(name, parameter)


def release_pinned_host_cache() -> bool:
    """Returns PyTorch's cached pinned host blocks to the OS; False where this torch has no way to.

    ``torch._C._host_emptyCache`` (torch 2.5 – 2.13): PyTorch keeps freed pinned blocks for reuse and has no
    public call that frees them.
    """
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is None:
        return False
    empty()
    return True


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out: torch.Tensor,
              use_fast_accum: bool = False) -> torch.Tensor:
    """``out = (a · scale_a) @ (b · scale_b)`` for FP8 ``a`` [M, K] row-major and ``b`` [K, N] column-major.

    ``torch._scaled_mm`` (private; torch 2.5 – 2.13 signature ``(self, mat2, scale_a, scale_b, bias,
    scale_result, out_dtype, use_fast_accum, *, out)``): per-tensor scales are 0-d float32 (cuBLASLt), per-row
    ones [M, 1] and [1, N] (CUTLASS on CUDA, bf16 output only). The public ``torch.nn.functional.scaled_mm``
    of newer releases takes scaling-recipe enums instead and is not in every supported torch.
    """
    return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=out.dtype, use_fast_accum=use_fast_accum, out=out)
