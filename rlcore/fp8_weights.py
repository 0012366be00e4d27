"""The trainer's frozen FP8 linear layers as views of vLLM's FP8 weights and scales (no copy).

With ``ModelConfig(dtype="float8")`` vLLM quantizes every decoder projection to ``float8_e4m3fn`` with one
float32 scale per (fused) layer when it loads the checkpoint; embeddings, norms and lm_head stay bf16. The
transformers model of :func:`rlcore.shared_weights.build_shared_model` then gets, for each such projection, an
:class:`rlcore.kernels.fp8_linear.FP8Linear` whose ``weight`` [out, in] is a view of vLLM's bytes:

* o_proj / down_proj: vLLM's weight itself (stored as an [in, out] transposed view; transposed back, a view);
* q/k/v and gate/up: row slices of the fused ``qkv_proj`` / ``gate_up_proj`` weight, all sharing the fused
  layer's one scale (or each its shard's scale, where a checkpoint keeps one per shard).

vLLM's storage facts (names, layout) come from :func:`rlcore.vllm_compat.fp8_weight_and_scale`. Nothing is
allocated: the FP8 forward and backward read vLLM's bytes (see :mod:`rlcore.kernels.fp8_linear`).
"""

from __future__ import annotations

import torch
from torch import nn

from rlcore import vllm_compat
from rlcore.kernels import torch_compat
from rlcore.kernels.fp8_linear import ACTIVATION_SCALINGS, GRAD_MODES, FP8Linear


def fused_part_rows(fused: str, parts: tuple[str, ...], total_rows: int, config) -> tuple[int, ...]:
    """Rows of each part of a fused projection: q, k, v by head counts for ``qkv_proj``, equal parts otherwise."""
    if fused == "qkv_proj" and len(parts) == 3:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    else:
        sizes = (total_rows // len(parts),) * len(parts)
    if sum(sizes) != total_rows:
        raise ValueError(f"{fused} has {total_rows} rows, expected {sum(sizes)} "
                         f"({' + '.join(map(str, sizes))} for {', '.join(parts)})")
    return sizes


def _fp8_view(name: str, module: nn.Linear, sources: dict[str, torch.Tensor], config,
              packed: dict[str, tuple[str, ...]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight [out, in], scale) views of vLLM's FP8 tensors for transformers module ``name``; None if not FP8."""
    found = vllm_compat.fp8_weight_and_scale(sources, name)
    if found is not None:
        weight, scale = found
        if scale.numel() != 1:
            raise ValueError(f"{name}: FP8 weight_scale of shape {tuple(scale.shape)}; only one per-tensor scale "
                             "is supported for an unfused layer")
    else:
        parent, _, leaf = name.rpartition(".")
        for fused, parts in packed.items():
            if leaf not in parts:
                continue
            found = vllm_compat.fp8_weight_and_scale(sources, f"{parent}.{fused}")
            if found is None:
                continue
            fused_weight, fused_scale = found
            sizes = fused_part_rows(fused, parts, fused_weight.shape[0], config)
            index = parts.index(leaf)
            start = sum(sizes[:index])
            weight = fused_weight[start: start + sizes[index]]
            if fused_scale.numel() == 1:
                scale = fused_scale
            elif fused_scale.numel() == len(parts):  # one scale per shard (FP8 checkpoints not requantized)
                scale = fused_scale.reshape(-1)[index: index + 1]
            else:
                raise ValueError(f"{parent}.{fused}: FP8 weight_scale of shape {tuple(fused_scale.shape)}; expected "
                                 f"one per-tensor scale or one per part of {parts}")
            break
        else:
            return None
    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{name}: vLLM's FP8 weight is {tuple(weight.shape)} as [out, in], transformers expects "
                         f"{expected}")
    # vLLM may create its weights under inference_mode: ordinary tensors over the same bytes for autograd
    return torch_compat.normal_tensor_alias(weight), torch_compat.normal_tensor_alias(scale)


def share_fp8_linears(model: nn.Module, sources: dict[str, torch.Tensor], config,
                      packed: dict[str, tuple[str, ...]], activation_scaling: str = "row",
                      grad_mode: str = "dequant") -> list[str]:
    """Replaces every ``nn.Linear`` of ``model`` whose vLLM counterpart is FP8 by an :class:`FP8Linear` over
    views of vLLM's weight and scale; returns the names replaced.

    ``model`` is the transformers model (its linears still on the meta device), ``sources`` vLLM's
    ``name → tensor`` (LoRA wrappers' ``.base_layer`` removed), ``packed`` the fused-module mapping.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, FP8Linear):
            continue
        views = _fp8_view(name, module, sources, config, packed)
        if views is None:
            continue
        if module.bias is not None:
            raise ValueError(f"{name}: FP8 layers with a bias are not supported by the shared-weight builder")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear(*views, activation_scaling=activation_scaling, grad_mode=grad_mode))
        replaced.append(name)
    return replaced


def set_fp8_options(model: nn.Module, activation_scaling: str | None = None, grad_mode: str | None = None) -> int:
    """Sets the arithmetic of every :class:`FP8Linear` in ``model`` (PEFT-wrapped or not); returns how many."""
    if activation_scaling is not None and activation_scaling not in ACTIVATION_SCALINGS:
        raise ValueError(f"activation_scaling must be one of {ACTIVATION_SCALINGS}, got {activation_scaling!r}")
    if grad_mode is not None and grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            if activation_scaling is not None:
                module.activation_scaling = activation_scaling
            if grad_mode is not None:
                module.grad_mode = grad_mode
            count += 1
    return count


def fp8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the FP8 weights and scales ``model``'s :class:`FP8Linear` layers read; a scale shared by the
    parts of a fused layer counts once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            for tensor in (module.weight, module.weight_scale):
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
    return total
