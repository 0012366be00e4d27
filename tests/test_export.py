"""save_merged on a policy whose frozen layers are FP8 views (dtype="float8"): the export holds dequantized,
LoRA-merged weights and no FP8 scales, and loads with from_pretrained like any checkpoint."""

from __future__ import annotations

import json
import os

import torch

from test_fp8_linear import _tiny_config, _VLLMFP8Llama

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # k/o/up stay plain FP8 layers, without LoRA


def _fp32_reference_state(source: _VLLMFP8Llama, config) -> dict[str, torch.Tensor]:
    """Every FP8 projection dequantized by plain float32 arithmetic (weight_fp8 · scale), fused layers split into
    transformers' names: what the exported base weights must be before the LoRA deltas."""
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    parts = {"qkv_proj": (("q_proj", heads * head_dim), ("k_proj", config.num_key_value_heads * head_dim),
                          ("v_proj", config.num_key_value_heads * head_dim)),
             "gate_up_proj": (("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size))}
    state = {}
    for name, value in source.tensors.items():
        if name.endswith("weight_scale"):
            continue
        if value.dtype != torch.float8_e4m3fn:
            state[name] = value.float()
            continue
        dense = value.t().float() * source.tensors[name.replace(".weight", ".weight_scale")].float()
        fused = next((f for f in parts if f in name), None)
        if fused is None:
            state[name] = dense
            continue
        start = 0
        for part, rows in parts[fused]:
            state[name.replace(fused, part)] = dense[start:start + rows]
            start += rows
    return state


def test_fp8_policy_exports_dequantized_merged_weights_without_scales(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from rlcore.export import save_merged
    from rlcore.kernels.fp8_linear import FP8Linear
    from rlcore.shared_weights import build_shared_model

    torch.manual_seed(0)
    config = _tiny_config()
    source = _VLLMFP8Llama(LlamaForCausalLM(config).eval())
    policy = get_peft_model(build_shared_model(source, config, dtype=torch.bfloat16),
                            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    assert sum(isinstance(m, FP8Linear) for m in policy.modules()) == 7 * config.num_hidden_layers
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)  # a LoRA that changes the weights

    path = save_merged(policy, None, str(tmp_path / "merged"), dtype=torch.float32)

    exported = load_file(os.path.join(path, "model.safetensors"))
    assert not [k for k in exported if "weight_scale" in k or "lora_" in k or "base_layer" in k]
    assert {t.dtype for t in exported.values()} == {torch.float32}
    assert "quantization_config" not in json.loads(open(os.path.join(path, "config.json")).read())

    # The reference: the same FP8 weights dequantized by hand into a float32 Llama, the same adapter on it
    # through PEFT, merged by PEFT's own merge_and_unload.
    reference = LlamaForCausalLM(config).float().eval()
    missing, unexpected = reference.load_state_dict(_fp32_reference_state(source, config), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    reference = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    adapter = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    assert adapter and not reference.load_state_dict(adapter, strict=False).unexpected_keys
    expected = {k: v for k, v in reference.merge_and_unload().state_dict().items() if "rotary" not in k}
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-6, msg=key)
    # the LoRA deltas are in: a merged projection differs from its dequantized base weight
    base = _fp32_reference_state(source, config)
    assert (exported["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]
            ).abs().max() > 1e-3

    loaded = AutoModelForCausalLM.from_pretrained(path)  # a plain checkpoint: no FP8 code needed to load it
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
