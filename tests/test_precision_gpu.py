"""GPU + vLLM: dtype="float8" and dtype="float16" with one copy of the weights shared by vLLM and the trainer.

A process holds one vLLM engine (its memory allocator is a singleton), so each scenario runs this file as a
script in a child process around a small random Llama (bf16 checkpoint in a temporary directory) and prints
one ``RESULT {json}`` line; the tests assert on it.

float8: vLLM quantizes the projections on load; every trainer projection is an FP8Linear whose weight and
scale are vLLM's bytes (checked by data_ptr, at the fused offsets), building the trainer allocates no weight
memory, the trainer's log-probabilities match vLLM's greedy ones, LoRA trains through the FP8 GEMMs, and
standby keeps the FP8 weights. float16: a 3,000-token completion trains with finite loss and gradients (float32
residual stream, dynamic loss scaling) and the trainer agrees with vLLM's sampling log-probabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 512


def _run(scenario: str, tmp_path) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=root + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), scenario, str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-6000:] + proc.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(result, indent=1))  # shown with -s: the numbers for the results file
    return result


@pytest.fixture(scope="module")
def float8_result(tmp_path_factory):
    return _run("float8", tmp_path_factory.mktemp("float8"))


def test_float8_trainer_layers_are_views_of_vllm_fp8_weights(float8_result):
    r = float8_result
    assert r["vllm_qkv"] == {"dtype": "torch.float8_e4m3fn", "shape": [HIDDEN, HIDDEN + 2 * KV_HEADS * 64],
                             "stride": [1, HIDDEN], "scale_numel": 1}
    assert r["lm_head_dtype"] == "torch.bfloat16"
    assert r["fp8_layers"] == 7 * 2
    assert r["shared"] == r["params"]
    assert r["offsets_ok"], r["offsets"]
    assert r["allocated_by_sharing"] < 64 * 1024  # rotary tables only: no weight bytes
    assert r["trainer_fp8_bytes"] == r["vllm_fp8_bytes"]


def test_float8_trainer_matches_vllm_and_trains(float8_result):
    r = float8_result
    # the same FP8 weights and per-token FP8 activations on both sides; the LoRA-less model is far off
    assert r["greedy_logp_diff"] < 0.15, r
    assert r["greedy_logp_diff"] < 0.2 * r["greedy_logp_diff_without_lora"], r
    for mode in ("fp8", "dequant"):
        assert r["grads"][mode]["finite"] and r["grads"][mode]["norm"] > 0
    assert r["grad_modes_relative_difference"] < 0.1
    assert r["standby_same_output"] and r["freed_gib"] > 0


def test_float16_long_completion_trains_finite(tmp_path):
    r = _run("float16", tmp_path)
    assert r["completion_tokens"] == 3000
    assert r["residual_hooks"] and r["shared"] == r["params"] and r["allocated_by_sharing"] < 64 * 1024
    assert r["loss_finite"] and r["grads_finite"] and r["grad_norm"] > 0
    assert r["sampling_logp_diff"] < 0.1, r


# ---------------------------------------------------------------------- the child process
def _write_model(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # peaked distributions: greedy choices are rarely near-ties
    model.save_pretrained(path)


def _engine_and_policy(path: str, dtype: str, max_len: int):
    import gc

    import torch
    from peft import LoraConfig, get_peft_model

    from rlcore.config import GRPOConfig, ModelConfig
    from rlcore.kernels import apply_kernels
    from rlcore.shared_weights import shared_fraction
    from rlcore.vllm_engine import VLLMEngine

    engine = VLLMEngine(ModelConfig(model_name_or_path=path, dtype=dtype, lora_r=8, lora_alpha=32,
                                    gpu_memory_utilization=0.35, enforce_eager=True, max_seq_length=max_len),
                        GRPOConfig(seed=0), ignore_eos=True)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    base = engine.build_shared_model()
    torch.cuda.synchronize()
    info = {"allocated_by_sharing": torch.cuda.memory_allocated() - before}
    info["shared"], info["params"] = shared_fraction(base, engine.vllm_model)
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    engine.attach_policy(policy)
    policy.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.get_base_model().config.use_cache = False
    apply_kernels(policy, lora=True)
    return engine, base, policy, info


def _trainer_logprobs(policy, rollouts, grad: bool = False):
    import torch

    from rlcore.logprobs import completion_logprobs

    ids = torch.tensor([r.prompt_ids + r.completion_ids for r in rollouts], device="cuda")
    width = len(rollouts[0].completion_ids)
    with torch.set_grad_enabled(grad):
        return completion_logprobs(policy, ids, torch.ones_like(ids), width).float()


def _float8(path: str) -> dict:
    import torch

    from rlcore.fp8_weights import fp8_weight_bytes, set_fp8_options
    from rlcore.kernels.fp8_linear import FP8Linear
    from rlcore.rollout import SamplingSettings
    from rlcore.shared_weights import source_parameters

    engine, base, policy, info = _engine_and_policy(path, "float8", 512)
    sources = source_parameters(engine.vllm_model)
    qkv = sources["model.layers.0.self_attn.qkv_proj.weight"]
    scale = sources["model.layers.0.self_attn.qkv_proj.weight_scale"]
    gate_up = sources["model.layers.0.mlp.gate_up_proj.weight"]
    info["vllm_qkv"] = {"dtype": str(qkv.dtype), "shape": list(qkv.shape), "stride": list(qkv.stride()),
                        "scale_numel": scale.numel()}
    info["lm_head_dtype"] = str(sources["lm_head.weight"].dtype)
    info["fp8_layers"] = sum(isinstance(m, FP8Linear) for m in base.modules())
    layer = base.model.layers[0]
    q_rows, kv_rows = HEADS * 64, KV_HEADS * 64
    offsets = {  # expected byte offsets into vLLM's row-major [out, in] FP8 storage (1 byte per value)
        "q": (layer.self_attn.q_proj.weight.data_ptr(), qkv.data_ptr()),
        "k": (layer.self_attn.k_proj.weight.data_ptr(), qkv.data_ptr() + q_rows * HIDDEN),
        "v": (layer.self_attn.v_proj.weight.data_ptr(), qkv.data_ptr() + (q_rows + kv_rows) * HIDDEN),
        "up": (layer.mlp.up_proj.weight.data_ptr(), gate_up.data_ptr() + INTERMEDIATE * HIDDEN),
        # after add_lora, k_proj is PEFT's LoRA wrapper: the FP8 layer (and its scale) is its base_layer
        "k_scale": (getattr(layer.self_attn.k_proj, "base_layer", layer.self_attn.k_proj).weight_scale.data_ptr(),
                    scale.data_ptr()),
        "down": (layer.mlp.down_proj.weight.data_ptr(), sources["model.layers.0.mlp.down_proj.weight"].data_ptr()),
    }
    info["offsets"] = {k: [int(a), int(b)] for k, (a, b) in offsets.items()}
    info["offsets_ok"] = all(a == b for a, b in offsets.values())
    info["trainer_fp8_bytes"] = fp8_weight_bytes(base)
    info["vllm_fp8_bytes"] = sum(t.numel() * t.element_size() for n, t in sources.items()
                                 if t.dtype == torch.float8_e4m3fn or n.endswith("weight_scale"))

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (6, 12), generator=generator).tolist()
    greedy = SamplingSettings(max_tokens=16, greedy=True)
    rollouts = engine.generate(prompts, greedy)
    vllm_logps = torch.tensor([r.logprobs for r in rollouts], device="cuda")
    policy.eval()
    info["greedy_logp_diff"] = float((_trainer_logprobs(policy, rollouts) - vllm_logps).abs().mean())
    with policy.disable_adapter():
        info["greedy_logp_diff_without_lora"] = float((_trainer_logprobs(policy, rollouts) - vllm_logps).abs().mean())

    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    grads = {}
    info["grads"] = {}
    for mode in ("fp8", "dequant"):
        set_fp8_options(policy, grad_mode=mode)
        policy.zero_grad(set_to_none=True)
        logps = _trainer_logprobs(policy, rollouts, grad=True)
        (-(logps * torch.linspace(-1, 1, len(rollouts), device="cuda")[:, None]).mean()).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in trainable])
        info["grads"][mode] = {"finite": bool(torch.isfinite(grads[mode]).all()), "norm": float(grads[mode].norm())}
    info["grad_modes_relative_difference"] = float((grads["fp8"] - grads["dequant"]).norm() / grads["dequant"].norm())

    before = [r.completion_ids for r in engine.generate(prompts, greedy)]
    sleep = engine.sleep()
    info["freed_gib"] = getattr(sleep, "freed_gib", None) if not isinstance(sleep, dict) else sleep.get("freed_gib")
    engine.wake()
    info["standby_same_output"] = before == [r.completion_ids for r in engine.generate(prompts, greedy)]
    return info


def _float16(path: str) -> dict:
    import torch

    from rlcore.kernels.fp16_stability import DynamicLossScaler
    from rlcore.rollout import SamplingSettings

    engine, base, policy, info = _engine_and_policy(path, "float16", 4096)
    info["residual_hooks"] = bool(getattr(base, "_rlcore_fp32_residual_hooks", None))
    info["dtypes"] = sorted({str(p.dtype) for p in base.parameters()})
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (1, 12), generator=generator).tolist()
    rollouts = engine.generate(prompts, SamplingSettings(max_tokens=3000, temperature=1.0, seed=0))
    info["completion_tokens"] = len(rollouts[0].completion_ids)
    engine.sleep()
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    scaler = DynamicLossScaler()
    vllm_logps = torch.tensor([r.logprobs for r in rollouts], device="cuda")
    finite = False
    for _ in range(8):  # a too-large first scale is backed off, as in training
        policy.zero_grad(set_to_none=True)
        logps = _trainer_logprobs(policy, rollouts, grad=True)
        loss = -(logps - vllm_logps).clamp(-5, 5).exp().mul(0.5).mean()
        info["loss_finite"] = bool(torch.isfinite(loss))
        scaler.scale_loss(loss).backward()
        finite = scaler.unscale_(trainable)
        scaler.update(finite)
        if finite:
            break
    info["sampling_logp_diff"] = float((logps.detach() - vllm_logps).abs().mean())
    info["grads_finite"] = finite
    info["loss_scale"] = scaler.scale
    info["grad_norm"] = float(torch.cat([p.grad.flatten() for p in trainable]).norm()) if finite else 0.0
    return info


if __name__ == "__main__":
    scenario, directory = sys.argv[1], sys.argv[2]
    model_dir = os.path.join(directory, "model")
    _write_model(model_dir)
    outcome = {"float8": _float8, "float16": _float16}[scenario](model_dir)
    print("RESULT " + json.dumps(outcome), flush=True)
