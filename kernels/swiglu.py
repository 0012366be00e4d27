"""SwiGLU, ``silu(gate) * up``, the Llama MLP activation.

The Triton forward computes in fp32 and rounds once (HF rounds silu(gate) to 16 bits, then the product),
and saves only gate and up; HF's graph also keeps silu(gate). Backward:
``d_gate = dh · up · σ(g) · (1 + g · (1 − σ(g)))``, ``d_up = dh · silu(g)``.

``inplace_backward=True`` writes d_gate and d_up over the saved gate and up (each element is read before it
is written, by the same program), so backward allocates nothing of size [tokens × intermediate]: at 8B shapes
that is 2 × 14,336 × 2 bytes per token less at the MLP's backward peak. Only for callers whose gate and up are
private temporaries (the Llama MLP's projection outputs) and whose graph is not backpropagated twice.
"""

import torch
import torch.nn.functional as F

from ._utils import lazy_jit, needs_int64, resolve_backend, tl

_BLOCK = 1024


@lazy_jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    tl.store(dg_ptr + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool):
        g, u = gate.contiguous(), up.contiguous()
        ctx.inplace_backward = inplace_backward
        h = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu_fwd_kernel[(triton_cdiv(n, _BLOCK),)](g, u, h, n, BLOCK=_BLOCK, I64=needs_int64(g))
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = (g, u) if ctx.inplace_backward else (torch.empty_like(g), torch.empty_like(u))
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(triton_cdiv(n, _BLOCK),)](dh, g, u, dg, du, n, BLOCK=_BLOCK, I64=needs_int64(g))
        return dg, du, None


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None,
           inplace_backward: bool = False) -> torch.Tensor:
    """``silu(gate) * up``; Triton on CUDA, :func:`swiglu_reference` elsewhere.

    ``inplace_backward``: the Triton backward overwrites gate and up with their gradients (see module doc).
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if resolve_backend(gate, backend) == "triton":
        return _SwiGLUTriton.apply(gate, up, bool(inplace_backward))
    return swiglu_reference(gate, up)
