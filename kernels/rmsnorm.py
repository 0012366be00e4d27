"""RMSNorm, ``weight * (x / sqrt(mean(x²) + eps)).to(x.dtype)``, with the rounding HF's LlamaRMSNorm does.

The Triton forward saves x and one fp32 ``rstd`` per row (HF's autograd graph keeps the fp32 upcast of x,
x², the normalised fp32 and 16-bit copies: several [tokens × hidden] tensors per norm). Backward:
``dx = rstd · (dy·w − x̂ · mean(dy·w·x̂))`` with x̂ = x·rstd, and ``dw = Σ_rows dy · x̂`` only when the
weight requires grad (frozen under LoRA).
"""

import torch

from ._utils import lazy_jit, needs_int64, next_power_of_2, resolve_backend, tl


@lazy_jit
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, H, eps,
                        BLOCK_H: tl.constexpr, I64: tl.constexpr):
    row = tl.program_id(0)
    if I64:
        row = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # round x̂ to the input dtype before the weight multiply, as HF does
    xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (xhat * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@lazy_jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, stride_dy, stride_x, stride_dx,
                        rows, H, ROWS_PER_PROG: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DW: tl.constexpr,
                        I64: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    for i in range(0, ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + i
        if row < rows:
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            dyw = dy * w
            dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, axis=0) / H))
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        tl.store(dw_ptr + pid * H + cols, dw, mask=mask)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm's forward, verbatim in behaviour; autograd differentiates it."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows, hidden = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((rows, hidden), device=x.device, dtype=out_dtype)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block = next_power_of_2(hidden)
        if rows:
            _rmsnorm_fwd_kernel[(rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), hidden, eps,
                                         BLOCK_H=block, I64=needs_int64(x2, y), num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, hidden = x2.shape
        dy2 = dy.reshape(-1, hidden)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        has_dw = ctx.needs_input_grad[1]
        rows_per_prog = 32 if rows > 4096 else 4
        programs = max(1, (rows + rows_per_prog - 1) // rows_per_prog)
        dw_partial = torch.empty((programs, hidden) if has_dw else (1,), device=x2.device, dtype=torch.float32)
        block = next_power_of_2(hidden)
        if rows:
            _rmsnorm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0),
                                             dx.stride(0), rows, hidden, ROWS_PER_PROG=rows_per_prog,
                                             BLOCK_H=block, HAS_DW=has_dw, I64=needs_int64(x2, dy2),
                                             num_warps=min(16, max(1, block // 256)))
        dw = dw_partial.sum(0).to(weight.dtype) if has_dw and rows else (
            torch.zeros_like(weight) if has_dw else None)
        return dx.view(ctx.shape), dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``; Triton on CUDA, :func:`rmsnorm_reference` elsewhere."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"last dim of x ({x.shape[-1]}) must equal weight size ({weight.shape[-1]})")
    if resolve_backend(x, backend) == "triton":
        return _RMSNormTriton.apply(x, weight, float(eps))
    return rmsnorm_reference(x, weight, eps)
