"""Exporting a trained policy: merged 16-bit weights (W + scale·B·A) as a plain transformers model directory."""

from __future__ import annotations

import os

import torch

from rlcore.kernels.fp8_linear import FP8Linear


def merged_state_dict(model, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta folded in, under the base model's own key names.

    W' = W + scale · B·A, computed in float32 and rounded once to ``dtype``. An FP8 frozen layer
    (:class:`rlcore.kernels.fp8_linear.FP8Linear`, ``dtype="float8"``) contributes its dequantized weight
    W = weight_fp8 · weight_scale, and its ``weight_scale`` is not written: the export is a plain 16/32-bit
    checkpoint that ``from_pretrained`` loads like any other.

    The live weights are not modified: with the vLLM engine they are vLLM's tensors, and merging in place
    would change what generation sees.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    fp8_prefixes = []  # "<module>." of every FP8 layer, LoRA-wrapped or not
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = _dense_weight(layer)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).detach().float()
            merged[f"{name}.weight"] = weight.to(dtype).cpu().contiguous()
            if isinstance(layer, FP8Linear):
                fp8_prefixes.append(name + ".")
        elif isinstance(module, FP8Linear) and not name.endswith(".base_layer"):  # a LoRA layer's is done above
            merged[f"{name}.weight"] = _dense_weight(module).to(dtype).cpu().contiguous()
            fp8_prefixes.append(name + ".")
    for key, tensor in base.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        if clean in merged:
            continue
        if clean.endswith(".weight_scale") and clean.startswith(tuple(fp8_prefixes)):
            continue  # folded into the dequantized weight above
        merged[clean] = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype).cpu().contiguous()
    return merged


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight [out, in] in float32: dequantized for an FP8 layer (weight · weight_scale)."""
    if isinstance(layer, FP8Linear):
        return layer.dequantized_weight(torch.float32).detach()
    return layer.weight.detach().float()


def save_merged(model, tokenizer, path: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Writes config, merged safetensors weights and tokenizer to ``path``; loadable with from_pretrained."""
    from safetensors.torch import save_file

    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype={dtype} is not supported for export: use torch.bfloat16, float16 or float32")
    os.makedirs(path, exist_ok=True)
    state = merged_state_dict(model, dtype)
    base = model.get_base_model()
    if getattr(base.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = base.config.to_dict()
    if any(isinstance(m, FP8Linear) for m in base.modules()):
        config.pop("quantization_config", None)  # the weights written are dequantized
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    config["dtype"] = config["torch_dtype"]
    config["use_cache"] = True
    type(base.config).from_dict(config).save_pretrained(path)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
