"""LoRA-aware linear: ``y = x Wᵀ (+ bias) + s · (x Aᵀ) Bᵀ`` with the base weight W frozen.

W may be a view into another tensor (e.g. rows of vLLM's fused ``qkv_proj``): it is only read, never
copied, and no gradient buffer is ever allocated for it. The autograd Function saves x and the small
``x Aᵀ`` [tokens × r] (plus references to the parameters); nothing of size [tokens × out].

The matmuls go to cuBLAS through PyTorch on every device (a hand-written Triton GEMM does not beat it at
these shapes); what this buys over PEFT's composition of three modules is one fused ``addmm`` for the
LoRA term, fewer autograd nodes and a guarantee about what is saved.
"""

import torch
import torch.nn.functional as F


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's computation, differentiated by autograd: base linear + scaled B(A(x))."""
    return F.linear(x, weight.detach(), bias.detach() if bias is not None else None) + \
        F.linear(F.linear(x, lora_a), lora_b) * scaling


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, bias: torch.Tensor | None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # adapters kept in fp32 (PEFT's default) run in the activations' dtype with fp32 accumulation,
        # rather than upcasting x to fp32 as PEFT does (a [tokens × in] fp32 copy)
        a_c, b_c = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xa = x2 @ a_c.t()  # [tokens, r]
        # written through a 2-D view of a fresh N-D tensor so that the output itself is not a view:
        # in-place consumers (the fused RoPE) can then modify it under autograd
        y = torch.empty(*shape[:-1], weight.shape[0], device=x.device, dtype=x.dtype)
        y2 = y.view(-1, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, x2, weight.t(), out=y2)
        else:
            torch.mm(x2, weight.t(), out=y2)
        y2.addmm_(xa, b_c.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.shape = scaling, shape
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        a_c, b_c = lora_a.to(dy.dtype), lora_b.to(dy.dtype)
        dxa = (dy2 @ b_c) * s  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = dy2 @ weight
            grad_x.addmm_(dxa, a_c)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[2]:
            grad_a = (dxa.t() @ x2).to(lora_a.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = ((dy2.t() @ xa) * s).to(lora_b.dtype)
        # weight and bias are frozen by contract: never a gradient for them
        return grad_x, None, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``x Wᵀ + bias + scaling · (x Aᵀ) Bᵀ``; gradients for x, A [r, in] and B [out, r] only.

    ``backend="torch"`` runs :func:`lora_linear_reference` (PEFT's graph); anything else the Function.
    """
    if weight.requires_grad:
        raise ValueError("lora_linear: the base weight must be frozen (requires_grad=False)")
    if lora_a.shape[1] != x.shape[-1] or lora_b.shape[1] != lora_a.shape[0] or lora_b.shape[0] != weight.shape[0]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, "
                         f"B {tuple(lora_b.shape)}")
    if backend == "torch":
        return lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias)
    return _LoRALinear.apply(x, weight, lora_a, lora_b, float(scaling), bias)
