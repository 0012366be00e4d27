"""Frozen FP8 linear layers for training: the base GEMMs on FP8 tensor cores, LoRA beside them in 16 bits.

The weight is ``float8_e4m3fn`` with one float32 scale, ``W ≈ weight · s_w`` (vLLM's per-tensor FP8; the
trainer's layers are views of vLLM's tensors, see :mod:`rlcore.fp8_weights`). Activations are quantized
when they arrive, per token ("row", what vLLM's FP8 layers do at inference) or per tensor ("tensor")::

    s_x = max(amax(x), 1e-12) / 448          amax over each row, or over all of x
    q(x) = round_to_e4m3(clamp(x / s_x, -448, 448))          (round half to even; 448 = e4m3's largest)
    y = s_x · s_w · (q(x) · weightᵀ)  (+ bias)  +  scaling · (x Aᵀ) Bᵀ

The base product runs as ``torch._scaled_mm`` (through :mod:`rlcore.kernels.torch_compat`; cuBLASLt for
per-tensor scales, CUTLASS for per-row; fp32 accumulation, bf16 output). torchao's float8 tensors end up in the same call for a frozen weight; using it
directly needs no extra package and wraps vLLM's storage without a tensor subclass.

**Layouts.** Hopper's FP8 tensor-core GEMM takes both operands K-major ("TN"): ``_scaled_mm(a, b)`` needs ``a``
[M, K] row-major and ``b`` [K, N] column-major. vLLM stores each FP8 weight as ``qweight.t()``: a [in, out]
view of row-major [out, in] bytes, so the trainer's ``weight`` [out, in] is row-major and

* forward ``x · weightᵀ`` (K = in): ``b = weight.t()`` is column-major as stored: no copy;
* backward ``grad_x = dy · weight`` (K = out): ``b = weight`` would have to be column-major [out, in], i.e. the
  bytes transposed. Two ways, ``grad_mode``:

  - ``"dequant"`` (default): ``weight · s_w`` dequantized to a transient 16-bit [out, in] (112 MiB at most), then
    an ordinary bf16 GEMM with the exact ``dy``;
  - ``"fp8"``: a transposed FP8 copy of this one layer's weight, made in backward and freed right after
    (largest at 8B: gate/up/down, 56 MiB; the per-tensor scale is unchanged by transposing), then
    ``q(dy) · weight`` on FP8 tensor cores with ``dy`` quantized per row.

  Measured at Llama-3-8B shapes on an H200 (``benchmarks/precision.py``): training 12,006 tok/s with
  ``"dequant"`` against 11,459 with ``"fp8"`` (bf16 weights: 11,947). Quantizing ``dy`` and transposing cost
  more than the FP8 GEMM saves, and ``"dequant"`` keeps the exact gradient, hence the default.

  A transposed copy kept for all layers would double the weight memory (+7 GiB at 8B), which is the point of
  FP8 here; a transient one costs ~2 × 56 MB of memory traffic (~30 µs) next to a ~0.5 ms GEMM.

Nothing of size [tokens × out] is saved for backward; the frozen base saves no activation at all (only the
LoRA term keeps x and the [tokens × r] ``x Aᵀ``, as :mod:`rlcore.kernels.lora_linear` does).

:func:`fp8_linear_reference` is the pure-PyTorch reference: dequantize the weight, an ordinary matmul in x's
dtype, autograd for the rest. :func:`fp8_matmul_emulated` computes in float64 exactly what the FP8 GEMM
computes (quantized activations times the FP8 weight), for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import torch_compat
from ._utils import lazy_jit, needs_int64, next_power_of_2, resolve_backend, tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-12  # an all-zero row (padding) gets a tiny scale and quantizes to zeros
ACTIVATION_SCALINGS = ("row", "tensor")
GRAD_MODES = ("fp8", "dequant")
_QUANT_BLOCK = 1024
_SUBNORMAL_LIMIT = 2.0**-6  # below this e4m3 is subnormal, spaced 2^-9
_SUBNORMAL_SHIFTER = 1.5 * 2.0**14  # x + this, minus this, rounds |x| < 2^-6 to a multiple of 2^-9 (half to even)


# --------------------------------------------------------------------------------------------- quantization
@lazy_jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, K, fp8_max, min_amax, subnormal_limit,
                          shifter, BLOCK_K: tl.constexpr, ROW_SCALE: tl.constexpr, I64: tl.constexpr):
    row = tl.program_id(0)
    if I64:
        row = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    if ROW_SCALE:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            mask = start + cols < K
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), min_amax), fp8_max)
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr)
    for start in range(0, K, BLOCK_K):
        mask = start + cols < K
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.clamp(tl.div_rn(x, scale), -fp8_max, fp8_max)
        # Round to e4m3 here (half to even on the magnitude, sign kept) so that the conversion below only
        # ever sees representable values: the result is then the same bits as torch's .to(float8_e4m3fn)
        # on every device, Triton's CPU interpreter included (whose own fp32→fp8 rounding drops the carry
        # into the exponent, e.g. 31.4 → 16).
        # (int32 bit patterns: adding 2^19 - 1 plus the kept bit's parity, then clearing the 20 bits e4m3 does
        # not keep, rounds the magnitude's 23-bit mantissa to 3 bits, half to even; a sign-bit test keeps -0.0)
        negative = v.to(tl.int32, bitcast=True) < 0
        magnitude = tl.abs(v)
        mbits = magnitude.to(tl.int32, bitcast=True)
        normal = ((mbits + 0x7FFFF + ((mbits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        subnormal = (magnitude + shifter) - shifter
        rounded = tl.where(magnitude < subnormal_limit, subnormal, normal)
        signed = tl.where(negative, -rounded, rounded)
        tl.store(q_ptr + row * stride_q + start + cols, signed.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_fp8_reference(x: torch.Tensor, scaling: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` with ``x ≈ q · s`` for a 2-D ``x``: ``s = max(amax, 1e-12) / 448`` per row ([M, 1]) or for
    the whole tensor ([] , "tensor"), ``q = float8_e4m3fn(clamp(x / s, -448, 448))`` (round half to even)."""
    _check_scaling(scaling)
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True) if scaling == "row" else xf.abs().amax()
    scale = amax.clamp_min(MIN_AMAX) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_fp8(x: torch.Tensor, scaling: str = "row", backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8_reference` in one Triton pass over ``x`` per row (CUDA), the reference elsewhere.

    Returns the same bits as the reference: q [M, K] row-major FP8 and the float32 scales.
    """
    _check_scaling(scaling)
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8 expects a 2-D tensor, got shape {tuple(x.shape)}")
    if resolve_backend(x, backend) != "triton":
        return quantize_fp8_reference(x, scaling)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), device=x.device, dtype=FP8_DTYPE)
    if scaling == "row":
        scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    else:
        # one fused reduction, no |x| temporary; the scale stays on the device (no host sync)
        amax = torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32)
        scale = amax.clamp_min(MIN_AMAX) / FP8_MAX
    if rows and cols:
        block = min(_QUANT_BLOCK, next_power_of_2(cols))
        _quantize_rows_kernel[(rows,)](x, q, scale, x.stride(0), q.stride(0), cols, FP8_MAX, MIN_AMAX,
                                       _SUBNORMAL_LIMIT, _SUBNORMAL_SHIFTER, BLOCK_K=block,
                                       ROW_SCALE=scaling == "row", I64=needs_int64(x, q),
                                       num_warps=4 if block >= 512 else 2)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q · scale`` in ``dtype`` (a new tensor; ``scale`` broadcasts: one value, or per row)."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def _check_scaling(scaling: str) -> None:
    if scaling not in ACTIVATION_SCALINGS:
        raise ValueError(f"activation_scaling must be one of {ACTIVATION_SCALINGS}, got {scaling!r}")


# --------------------------------------------------------------------------------------------- GEMM
def _column_major(b: torch.Tensor) -> torch.Tensor:
    """``b`` itself when its columns are contiguous (stride (1, ≥ rows)), else a column-major copy of it."""
    if b.stride(0) == 1 and b.stride(1) >= max(1, b.shape[0]):
        return b
    return b.t().contiguous().t()


def _scalar_scale(scale: torch.Tensor) -> torch.Tensor:
    if scale.numel() != 1:
        raise ValueError(f"FP8 weights need one per-tensor scale here, got weight_scale of shape {tuple(scale.shape)}")
    return scale.reshape(()).to(torch.float32)


def _scaled_mm_shapes_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # cuBLASLt / CUTLASS FP8 kernels: K and N multiples of 16 (M is free)
    return a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0


def _fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor,
              use_fast_accum: bool) -> torch.Tensor:
    """``out = (a · a_scale) @ (b · b_scale)`` with ``a`` [M, K] row-major FP8, ``b`` [K, N] column-major FP8.

    ``a_scale`` is [M, 1] (per row) or one value; ``b_scale`` one value (the weight's per-tensor scale).
    """
    if a_scale.dim() == 2:
        # torch's row-wise scaled GEMM wants both scales row-wise: [M, 1] and [1, N]
        scale_a = a_scale.reshape(-1, 1).to(torch.float32).contiguous()
        scale_b = b_scale.reshape(1, 1).to(torch.float32).expand(1, b.shape[1]).contiguous()
    else:
        scale_a, scale_b = a_scale.reshape(()).to(torch.float32), b_scale.reshape(()).to(torch.float32)
    if _scaled_mm_shapes_ok(a, b) and (a.is_cuda or a.device.type == "cpu"):
        try:
            return torch_compat.scaled_mm(a, b, scale_a, scale_b, out, use_fast_accum)
        except (RuntimeError, NotImplementedError):
            if a.is_cuda:
                raise
            # a CPU build without FP8 GEMM support: the emulation below computes the same products
    out.copy_((a.float() * scale_a) @ (b.float() * scale_b))
    return out


# --------------------------------------------------------------------------------------------- autograd
class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, lora_a, lora_b, scaling, activation_scaling, grad_mode,
                use_fast_accum, backend):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out_features = weight.shape[0]
        # a fresh N-D output written through a 2-D view, so that the output is not a view: in-place
        # consumers (the fused RoPE) may then modify it under autograd
        y = torch.empty(*shape[:-1], out_features, device=x.device, dtype=x.dtype)
        y2 = y.view(-1, out_features)
        if x2.shape[0]:
            xq, x_scale = quantize_fp8(x2, activation_scaling, backend)
            _fp8_gemm(xq, x_scale, _column_major(weight.t()), weight_scale, y2, use_fast_accum)
            del xq
        if bias is not None:
            y2.add_(bias.to(y2.dtype))
        xa = None
        if lora_a is not None:
            xa = x2 @ lora_a.to(x.dtype).t()  # [tokens, r]
            y2.addmm_(xa, lora_b.to(x.dtype).t(), alpha=scaling)
        ctx.save_for_backward(x2 if lora_a is not None else None, xa, weight, weight_scale, lora_a, lora_b)
        ctx.shape, ctx.scaling = shape, scaling
        ctx.activation_scaling, ctx.grad_mode, ctx.use_fast_accum, ctx.backend = (
            activation_scaling, grad_mode, use_fast_accum, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, weight_scale, lora_a, lora_b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dxa = None
        if lora_a is not None:
            dxa = (dy2 @ lora_b.to(dy.dtype)) * ctx.scaling  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(dy2, weight, weight_scale, ctx.grad_mode, ctx.activation_scaling,
                                 ctx.use_fast_accum, ctx.backend)
            if dxa is not None:
                grad_x.addmm_(dxa, lora_a.to(dy.dtype))
            grad_x = grad_x.view(ctx.shape)
        if lora_a is not None and ctx.needs_input_grad[4]:
            grad_a = (dxa.t() @ x2).to(lora_a.dtype)
        if lora_b is not None and ctx.needs_input_grad[5]:
            grad_b = ((dy2.t() @ xa) * ctx.scaling).to(lora_b.dtype)
        # the FP8 weight, its scale and the bias are frozen by contract: never a gradient for them
        return grad_x, None, None, None, grad_a, grad_b, None, None, None, None, None


def _input_grad(dy2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, grad_mode: str,
                activation_scaling: str, use_fast_accum: bool, backend: str | None) -> torch.Tensor:
    """``dy · W`` [tokens, in] through the FP8 weight (see the module docstring for the two modes)."""
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    grad_x = torch.empty(dy2.shape[0], weight.shape[1], device=dy2.device, dtype=dy2.dtype)
    if not dy2.shape[0]:
        return grad_x
    if grad_mode == "fp8" and _scaled_mm_shapes_ok(dy2, weight):
        dq, dy_scale = quantize_fp8(dy2, activation_scaling, backend)
        _fp8_gemm(dq, dy_scale, _column_major(weight), weight_scale, grad_x, use_fast_accum)
    else:
        torch.mm(dy2, dequantize_fp8(weight, _scalar_scale(weight_scale), dy2.dtype), out=grad_x)
    return grad_x


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, lora_a: torch.Tensor | None = None,
                         lora_b: torch.Tensor | None = None, scaling: float = 1.0) -> torch.Tensor:
    """Dequantize → matmul in x's dtype: ``x (weight · s_w)ᵀ + bias + scaling · (x Aᵀ) Bᵀ``; autograd's
    gradients (x, A, B). The activations are not quantized: this is the layer's value, not its FP8 arithmetic."""
    w = dequantize_fp8(weight, _scalar_scale(weight_scale), x.dtype)
    y = F.linear(x, w, bias.detach().to(x.dtype) if bias is not None else None)
    if lora_a is not None:
        y = y + F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling
    return y


def fp8_matmul_emulated(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        activation_scaling: str = "row") -> torch.Tensor:
    """What the FP8 forward GEMM computes, in float64: ``dequant(q(x)) · (weight · s_w)ᵀ`` (x 2-D)."""
    xq, x_scale = quantize_fp8_reference(x, activation_scaling)
    return (xq.double() * x_scale.double()) @ (weight.double() * _scalar_scale(weight_scale).double()).t()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None, scaling: float = 1.0, *,
               activation_scaling: str = "row", grad_mode: str = "dequant", use_fast_accum: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """``x Wᵀ (+ bias) (+ scaling · (x Aᵀ) Bᵀ)`` with W = ``weight`` [out, in] FP8 · ``weight_scale``.

    Gradients for x, A [r, in] and B [out, r] only. ``backend="torch"`` runs :func:`fp8_linear_reference`;
    otherwise the FP8 GEMM path (activation quantization in Triton on CUDA, in PyTorch elsewhere).
    """
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_linear: weight must be {FP8_DTYPE}, got {weight.dtype}")
    if weight.requires_grad or weight_scale.requires_grad:
        raise ValueError("fp8_linear: the FP8 weight and its scale must be frozen (requires_grad=False)")
    _scalar_scale(weight_scale)
    _check_scaling(activation_scaling)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("fp8_linear: pass both lora_a and lora_b, or neither")
    if lora_a is not None and (lora_a.shape[1] != x.shape[-1] or lora_b.shape[1] != lora_a.shape[0]
                               or lora_b.shape[0] != weight.shape[0]):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    if backend == "torch":
        return fp8_linear_reference(x, weight, weight_scale, bias, lora_a, lora_b, scaling)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"fp8_linear computes in bfloat16 (the row-wise FP8 GEMM writes bf16); got x of dtype "
                         f"{x.dtype}")
    return _FP8Linear.apply(x, weight, weight_scale, bias, lora_a, lora_b, float(scaling), activation_scaling,
                            grad_mode, bool(use_fast_accum), backend)


# --------------------------------------------------------------------------------------------- module
class FP8Linear(nn.Linear):
    """A frozen linear layer over an FP8 ``weight`` [out, in] and its float32 ``weight_scale`` (no copy).

    A subclass of ``nn.Linear`` so that PEFT wraps it with LoRA like any linear layer; ``compute_dtype``
    (the attribute PEFT reads for quantized base layers) keeps PEFT from casting the adapters to FP8.
    ``activation_scaling`` / ``grad_mode`` choose the arithmetic (module docstring); ``dequantized_weight``
    gives W in 16 bits (export, checks).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 activation_scaling: str = "row", grad_mode: str = "dequant",
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a weight
        if weight.dim() != 2 or weight.dtype != FP8_DTYPE:
            raise ValueError(f"FP8Linear: weight must be a 2-D {FP8_DTYPE} tensor, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        _scalar_scale(weight_scale)
        _check_scaling(activation_scaling)
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.activation_scaling = activation_scaling
        self.grad_mode = grad_mode
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_forward(x)

    def lora_forward(self, x: torch.Tensor, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                     scaling: float = 1.0) -> torch.Tensor:
        """The base layer, plus ``scaling · (x Aᵀ) Bᵀ`` in the same autograd node when A and B are given."""
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, lora_a, lora_b, scaling,
                          activation_scaling=self.activation_scaling, grad_mode=self.grad_mode)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self.weight, _scalar_scale(self.weight_scale), dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8, activation_scaling={self.activation_scaling!r}, grad_mode={self.grad_mode!r}")
