"""Swaps HF Llama modules' forwards for rlcore's kernels. transformers' private parts are reached only through
:mod:`rlcore.kernels.transformers_compat`.

Written against transformers 5.17 – 5.24 (``models/llama/modeling_llama.py`` is the same in both for the
parts used here): ``LlamaRMSNorm`` (``weight``, ``variance_epsilon``), ``LlamaMLP`` (``gate_proj``,
``up_proj``, ``down_proj``, ``act_fn``), ``LlamaAttention.forward(hidden_states, position_embeddings,
attention_mask, past_key_values, **kwargs)`` with ``position_embeddings = (cos, sin)`` of shape [B, L, D] and
the attention kernel looked up in ``ALL_ATTENTION_FUNCTIONS``. Why per-instance forwards rather than
replacing ``modeling_llama.apply_rotary_pos_emb``: that global is shared by every model in the process (the
rollout engine's too); a patched instance affects only the model passed in, and ``revert_kernels`` undoes it.
If transformers changes those attribute names, ``apply_kernels`` raises rather than computing something else.

PEFT LoRA layers (``lora=True``, peft 0.17 – 0.21 ``peft.tuners.lora.layer.Linear``) get the LoRA-aware
linear when exactly one adapter is active, no dropout, no DoRA, and x has the base weight's dtype (fp32
adapters then compute in that dtype with fp32 accumulation instead of PEFT's fp32 upcast of x); otherwise (e.g. inside
``disable_adapter()``, which reference log-probs use) they run PEFT's own forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import transformers_compat
from .fp8_linear import FP8Linear
from .lora_linear import lora_linear
from .rmsnorm import rmsnorm
from .rope import apply_rope_
from .swiglu import swiglu

_ORIG = "_rlcore_original_forward"


def _rmsnorm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rmsnorm(hidden_states, self.weight, self.variance_epsilon, backend=self._rlcore_backend)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # gate and up are this forward's own temporaries, so backward may overwrite them with their gradients
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self._rlcore_backend,
                                 inplace_backward=True))


def _attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    # RoPE on the [B, L, H·D] projection outputs: they are not views, so the kernel rotates them in place
    query_states, key_states = apply_rope_(self.q_proj(hidden_states), self.k_proj(hidden_states),
                                           *position_embeddings, head_dim=self.head_dim,
                                           backend=self._rlcore_backend)
    if kwargs.get("cu_seq_lens_q") is not None and past_key_values is None:
        # one packed row (rlcore.kernels.packing): attention within each sample from cu_seqlens, no [T, T] mask
        # (flash varlen on CUDA; the reference, SDPA under a block mask, elsewhere)
        from . import packing

        if self.training and self.attention_dropout:
            raise ValueError("packed (padding_free) batches do not support attention dropout")

        cu_seqlens = kwargs["cu_seq_lens_q"]
        max_length = kwargs.get("max_length_q") or int(cu_seqlens.diff().max())
        q, k, v = (t.view(hidden_shape).flatten(0, 1)  # [tokens, heads, head_dim]
                   for t in (query_states, key_states, self.v_proj(hidden_states)))
        attn_output = packing.varlen_attention(q, k, v, cu_seqlens, max_length, scale=self.scaling,
                                               backend=self._rlcore_backend)
        return self.o_proj(attn_output.reshape(*input_shape, -1)), None
    query_states = query_states.view(hidden_shape).transpose(1, 2)
    key_states = key_states.view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    attention_interface = transformers_compat.attention_interface(self)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


_MASK_FREE = "rlcore_packed"  # an attention implementation transformers has no mask function for


def _patched_attention_modules(model: nn.Module) -> tuple[int, int]:
    _, _, attn_cls = transformers_compat.llama_classes()
    attention = [m for m in model.modules() if isinstance(m, attn_cls)]
    return sum(hasattr(m, _ORIG) for m in attention), len(attention)


@contextlib.contextmanager
def mask_free_packed_forward(model: nn.Module) -> Iterator[bool]:
    """Around a packed forward (``cu_seq_lens_q`` in the kwargs): transformers builds no attention mask.

    Without it, ``create_causal_mask`` materialises a [T, T] block-diagonal mask from the restarting position
    ids (4 GiB at 64k tokens, 64 GiB at 256k) that rlcore's attention never reads: it takes ``cu_seqlens``
    from the kwargs. ``create_causal_mask`` returns None for an ``_attn_implementation`` it has no mask
    function for (how transformers lets custom kernels opt out), so the name is switched for this forward
    only. Gradient-checkpointing recomputation reuses the layers' original arguments (mask None, cu_seqlens)
    and the patched attention does not look at the name on that path. Yields whether it switched: only when
    every Llama attention module in ``model`` is rlcore's.
    """
    patched, total = _patched_attention_modules(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or total == 0 or patched != total:
        yield False
        return
    with transformers_compat.attention_implementation(config, _MASK_FREE):
        yield True


def _peft_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    original = getattr(self, _ORIG)
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return original(x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    if (name not in self.lora_A or self.use_dora.get(name, False) or not isinstance(base, nn.Linear)
            or base.weight.requires_grad):
        return original(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and
                                                 (dropout.p == 0 or not self.training))):
        return original(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if isinstance(base, FP8Linear) and x.dtype == torch.bfloat16:
        # the FP8 base GEMM and the LoRA term in one autograd node (rlcore.kernels.fp8_linear)
        return base.lora_forward(x, lora_a, lora_b, self.scaling[name])
    if x.dtype != base.weight.dtype or not (lora_a.is_floating_point() and lora_b.is_floating_point()):
        return original(x, *args, **kwargs)
    return lora_linear(x, base.weight, lora_a, lora_b, self.scaling[name], base.bias)


def _patch(module: nn.Module, forward: Any, backend: str | None) -> None:
    if not hasattr(module, _ORIG):
        setattr(module, _ORIG, module.forward)
    module._rlcore_backend = backend
    module.forward = types.MethodType(forward, module)


def apply_kernels(model: nn.Module, rope: bool = True, swiglu: bool = True, rmsnorm: bool = True,
                  lora: bool = False, backend: str | None = None) -> dict[str, int]:
    """Patches every Llama RMSNorm / MLP / attention (and PEFT LoRA linear if ``lora``) inside ``model``.

    ``backend`` is passed to each kernel (``None``: Triton on CUDA, reference on CPU; see ``_utils``).
    Returns how many modules of each kind were patched. Idempotent; ``revert_kernels`` undoes it.
    """
    norm_cls, mlp_cls, attn_cls = transformers_compat.llama_classes()
    counts = {"rmsnorm": 0, "swiglu": 0, "rope": 0, "lora": 0}
    lora_cls: type | None = None
    if lora:
        from peft.tuners.lora.layer import Linear as lora_cls  # noqa: N813
    for module in model.modules():
        if rmsnorm and isinstance(module, norm_cls):
            transformers_compat.require_attributes(module, ("weight", "variance_epsilon"))
            _patch(module, _rmsnorm_forward, backend)
            counts["rmsnorm"] += 1
        elif swiglu and isinstance(module, mlp_cls):
            transformers_compat.require_attributes(module, ("gate_proj", "up_proj", "down_proj", "config"))
            if module.config.hidden_act not in ("silu", "swish"):
                continue
            _patch(module, _mlp_forward, backend)
            counts["swiglu"] += 1
        elif rope and isinstance(module, attn_cls):
            transformers_compat.require_attributes(module, ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
                                                            "scaling", "layer_idx", "config"))
            _patch(module, _attention_forward, backend)
            counts["rope"] += 1
        elif lora_cls is not None and isinstance(module, lora_cls):
            transformers_compat.require_attributes(
                module, ("base_layer", "lora_A", "lora_B", "scaling", "lora_dropout", "use_dora"),
                layout="peft 0.17 – 0.21 LoRA")
            _patch(module, _peft_lora_forward, backend)
            counts["lora"] += 1
    if not any(counts.values()):
        raise ValueError(f"apply_kernels found no Llama module to patch in {type(model).__name__}")
    return counts


def revert_kernels(model: nn.Module) -> int:
    """Restores the original forwards; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _ORIG):
            original = getattr(module, _ORIG)
            module.__dict__.pop("forward", None)
            if module.forward != original:  # the original was itself an instance-level forward
                module.forward = original
            delattr(module, _ORIG)
            restored += 1
    return restored
