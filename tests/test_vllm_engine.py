"""VLLMEngine: shared weights, in-place LoRA sync, standby, sampling logprobs.

The GPU tests build one in-process vLLM engine (a process can hold only one: vLLM's CuMemAllocator is a
singleton) around a small random Llama checkpoint written to a temporary directory, and share it across the
module. The CPU tests check the weight-view builder against a fused-projection module made from a transformers
model.
"""

from __future__ import annotations

import gc
import statistics

import pytest
import torch
from torch import nn

from rlcore.shared_weights import alias_tensor, build_shared_model, shared_fraction
from vllm_layout import NamedTensors, fused_llama_state

VOCAB = 512
PROMPT_LEN = 12


def _tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    values.update(overrides)
    return LlamaConfig(**values)


class _FusedLlama(NamedTensors):
    """The parameter layout of vLLM's Llama (fused qkv_proj / gate_up_proj), built from a transformers model."""

    def __init__(self, reference: nn.Module) -> None:
        super().__init__({name: value.clone() for name, value in fused_llama_state(reference).items()})


# ---------------------------------------------------------------------- CPU
def test_shared_model_views_fused_weights_and_matches_reference():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = _tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    reference = LlamaForCausalLM(config).eval()
    fused = _FusedLlama(reference)
    model = build_shared_model(fused, config, dtype=torch.float32)
    shared, total = shared_fraction(model, fused)
    assert shared == total == len(list(reference.parameters()))
    layer = model.model.layers[0]
    qkv = fused.tensors["model.layers.0.self_attn.qkv_proj.weight"]
    row = qkv.shape[1] * qkv.element_size()
    q_rows = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    assert layer.self_attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert layer.self_attn.k_proj.weight.data_ptr() == layer.self_attn.q_proj.weight.data_ptr() + q_rows * row
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # the views are live: editing the fused tensor changes the built model's output
    with torch.no_grad():
        fused.tensors["model.layers.0.self_attn.qkv_proj.weight"].mul_(2.0)
    assert not torch.allclose(model(ids).logits, reference(ids).logits)


def test_alias_of_inference_tensor_shares_memory_and_supports_backward():
    with torch.inference_mode():
        weight = torch.randn(8, 4)
    alias = alias_tensor(weight)
    assert not alias.is_inference()
    assert alias.data_ptr() == weight.data_ptr()
    x = torch.randn(3, 4, requires_grad=True)
    torch.nn.functional.linear(x, alias).sum().backward()  # an inference tensor here would raise
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 4))


def test_slot_rank_rounds_up_to_vllm_ranks():
    from rlcore.vllm_engine import slot_rank

    assert slot_rank(16) == 16 and slot_rank(4) == 8 and slot_rank(33) == 64
    with pytest.raises(ValueError, match="largest LoRA rank"):
        slot_rank(1000)


# ---------------------------------------------------------------------- GPU + vLLM


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(engine, peft model, stats) around a random 2-layer Llama with peaked logits, LoRA r=8, alpha=32."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from rlcore.config import GRPOConfig, ModelConfig
    from rlcore.vllm_engine import VLLMEngine

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = _tiny_llama_config()
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        # Peaked next-token distributions: greedy argmax is then rarely a near-tie that bf16 rounding flips.
        model.lm_head.weight.mul_(12.0)
    model.save_pretrained(path)
    del model
    engine = VLLMEngine(ModelConfig(model_name_or_path=str(path), dtype="bfloat16", lora_r=8, lora_alpha=32,
                                    gpu_memory_utilization=0.35, enforce_eager=True, max_seq_length=512),
                        GRPOConfig(seed=0))
    gc.collect()
    torch.cuda.synchronize()
    allocated_before = torch.cuda.memory_allocated()
    base = engine.build_shared_model()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - allocated_before
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    engine.attach_policy(peft_model)
    yield engine, peft_model, {"grown": grown, "weight_bytes": weight_bytes}
    engine.close()


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, PROMPT_LEN), generator=generator).tolist()


def _randomize_lora_b(peft_model, seed: int, std: float = 0.05) -> None:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, device="cuda") * std)


@torch.no_grad()
def _hf_logprobs(peft_model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([prompt + completion], device="cuda")
    logits = peft_model(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion, device="cuda")[:, None])[:, 0]


@pytest.mark.gpu
@pytest.mark.vllm
def test_every_base_weight_is_a_view_of_vllm_memory(stack):
    engine, peft_model, stats = stack
    from rlcore.shared_weights import source_parameters

    sources = source_parameters(engine.vllm_model)
    base = peft_model.get_base_model()
    params = dict(base.named_parameters())
    frozen = {n: p for n, p in params.items() if "lora_" not in n}
    vllm_ptrs = {t.untyped_storage().data_ptr() for t in sources.values()}
    for name, parameter in frozen.items():
        assert not parameter.requires_grad, name
        assert parameter.untyped_storage().data_ptr() in vllm_ptrs, f"{name} is not in vLLM's memory"
    # exact element addresses: q/k/v are consecutive row blocks of qkv_proj, gate/up of gate_up_proj
    layer = "model.layers.1"
    qkv = sources[f"{layer}.self_attn.qkv_proj.weight"]
    q = params[f"{layer}.self_attn.q_proj.base_layer.weight"]
    k = params[f"{layer}.self_attn.k_proj.base_layer.weight"]
    v = params[f"{layer}.self_attn.v_proj.base_layer.weight"]
    row = qkv.shape[1] * qkv.element_size()
    assert q.data_ptr() == qkv.data_ptr()
    assert k.data_ptr() == qkv.data_ptr() + q.shape[0] * row
    assert v.data_ptr() == qkv.data_ptr() + (q.shape[0] + k.shape[0]) * row
    gate_up = sources[f"{layer}.mlp.gate_up_proj.weight"]
    up = params[f"{layer}.mlp.up_proj.base_layer.weight"]
    assert up.data_ptr() == gate_up.data_ptr() + up.shape[0] * gate_up.shape[1] * gate_up.element_size()
    assert params["lm_head.weight"].data_ptr() == sources["lm_head.weight"].data_ptr()
    # building the trainer's base model allocated (almost) nothing
    assert stats["grown"] < 0.01 * stats["weight_bytes"], stats
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


@pytest.mark.gpu
@pytest.mark.vllm
def test_synced_lora_logprobs_match_hf_model(stack):
    from rlcore.rollout import SamplingSettings

    engine, peft_model, _ = stack
    _randomize_lora_b(peft_model, seed=3)
    sync = engine.sync_weights()
    assert sync.seconds < 1.0 and sync.tensors == 2 * 7 * 2
    prompts = _prompts(4)
    rollouts = engine.generate(prompts, SamplingSettings(max_tokens=16, greedy=True))
    diffs, base_diffs = [], []
    for rollout in rollouts:
        assert len(rollout.completion_ids) == 16 and len(rollout.logprobs) == 16
        hf = _hf_logprobs(peft_model, rollout.prompt_ids, rollout.completion_ids)
        vllm = torch.tensor(rollout.logprobs, device="cuda")
        diffs.append((hf - vllm).abs().mean().item())
        with peft_model.disable_adapter():
            base = _hf_logprobs(peft_model, rollout.prompt_ids, rollout.completion_ids)
        base_diffs.append((base - vllm).abs().mean().item())
    mean_diff, mean_base = statistics.mean(diffs), statistics.mean(base_diffs)
    print(f"\nbf16 logprob mean |vLLM - HF/PEFT| = {mean_diff:.4f} (vs. base model without LoRA: {mean_base:.4f})")
    assert mean_diff < 0.05
    assert mean_base > 10 * mean_diff  # the adapter matters, and vLLM is using the synced one


@pytest.mark.gpu
@pytest.mark.vllm
def test_sampling_logprobs_are_of_the_tempered_distribution(stack):
    from rlcore.rollout import SamplingSettings

    engine, peft_model, _ = stack
    temperature = 0.7
    rollouts = engine.generate(_prompts(4, seed=5), SamplingSettings(max_tokens=12, temperature=temperature,
                                                                      seed=11))
    assert len({tuple(r.completion_ids) for r in rollouts}) > 1
    diffs, untempered = [], []
    for rollout in rollouts:
        vllm = torch.tensor(rollout.logprobs, device="cuda")
        diffs.append((_hf_logprobs(peft_model, rollout.prompt_ids, rollout.completion_ids, temperature)
                      - vllm).abs().mean().item())
        untempered.append((_hf_logprobs(peft_model, rollout.prompt_ids, rollout.completion_ids)
                           - vllm).abs().mean().item())
    print(f"\nT=0.7 sampling logprob mean diff {statistics.mean(diffs):.4f} (untempered: "
          f"{statistics.mean(untempered):.4f})")
    assert statistics.mean(diffs) < 0.05
    assert statistics.mean(untempered) > 5 * statistics.mean(diffs)


@pytest.mark.gpu
@pytest.mark.vllm
def test_greedy_vllm_matches_hf_generate_on_shared_module(stack):
    from rlcore.rollout import SamplingSettings

    engine, peft_model, _ = stack
    _randomize_lora_b(peft_model, seed=4)
    engine.sync_weights()
    prompts = _prompts(6, seed=7)
    new_tokens = 12
    rollouts = engine.generate(prompts, SamplingSettings(max_tokens=new_tokens, greedy=True))
    exact, matched, near_ties = 0, [], 0
    for prompt, rollout in zip(prompts, rollouts):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        hf = out[0, len(prompt):].tolist()
        if hf == rollout.completion_ids:
            exact += 1
            matched.append(new_tokens)
            continue
        first = next(i for i, (a, b) in enumerate(zip(hf, rollout.completion_ids)) if a != b)
        matched.append(first)
        # a divergence is allowed only where the two candidates are a near-tie in bf16
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([prompt + hf[:first]], device="cuda")).logits[0, -1].float()
        gap = (logits[hf[first]] - logits[rollout.completion_ids[first]]).item()
        assert gap < 0.25, f"vLLM chose token {rollout.completion_ids[first]} {gap:.3f} logits below HF's choice"
        near_ties += 1
    print(f"\ngreedy: {exact}/{len(prompts)} identical, tokens matched before divergence {matched}, "
          f"near-tie divergences {near_ties}")
    assert exact >= len(prompts) // 2


@pytest.mark.gpu
@pytest.mark.vllm
def test_sync_changes_generation_in_place(stack):
    from rlcore.rollout import SamplingSettings

    engine, peft_model, _ = stack
    prompts = _prompts(4, seed=9)
    greedy = SamplingSettings(max_tokens=10, greedy=True)
    before = [r.completion_ids for r in engine.generate(prompts, greedy)]
    again = [r.completion_ids for r in engine.generate(prompts, greedy)]  # prefix-cache hits, same weights
    assert again == before
    _randomize_lora_b(peft_model, seed=21, std=0.2)
    times = [engine.sync_weights().seconds for _ in range(5)]
    after = [r.completion_ids for r in engine.generate(prompts, greedy)]
    print(f"\nsync seconds (5 runs): {[round(t, 5) for t in times]}")
    assert after != before


@pytest.mark.gpu
@pytest.mark.vllm
def test_standby_cycle_frees_kv_and_keeps_greedy_output(stack):
    from rlcore.rollout import SamplingSettings

    engine, _, _ = stack
    prompts = _prompts(8, seed=13)
    greedy = SamplingSettings(max_tokens=24, greedy=True)
    before = [r.completion_ids for r in engine.generate(prompts, greedy)]
    free_before = torch.cuda.mem_get_info()[0]
    slept = engine.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert engine.asleep and slept.freed_gib > 0.1
    assert free_asleep - free_before > 0.9 * slept.freed_bytes
    # the trainer can use the freed memory meanwhile
    block = torch.empty(int(0.8 * slept.freed_bytes), dtype=torch.uint8, device="cuda")
    block.fill_(7)
    del block
    woke = engine.wake()
    assert not engine.asleep and woke.seconds < 5.0
    after = [r.completion_ids for r in engine.generate(prompts, greedy)]
    print(f"\nstandby: freed {slept.freed_gib:.2f} GiB in {slept.seconds:.3f} s, woke in {woke.seconds:.3f} s")
    assert after == before
    # generate() wakes a sleeping engine by itself
    engine.sleep()
    assert [r.completion_ids for r in engine.generate(prompts, greedy)] == before
    assert not engine.asleep


_TRAINER_SCRIPT = r"""
import json, math, sys
from rlcore import GRPOConfig, ModelConfig
from rlcore.trainer import GRPOTrainer

def digits(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

rows = [{"prompt": f"Write the number {n} and more numbers:"} for n in range(16)]
model = ModelConfig(model_name_or_path="tiny", engine="vllm", dtype="bfloat16", lora_r=8, lora_alpha=16,
                    enforce_eager=True, gpu_memory_utilization=0.3, max_seq_length=256)
args = GRPOConfig(output_dir=sys.argv[1], num_generations=4, per_device_train_batch_size=8, max_steps=3,
                  max_completion_length=16, max_prompt_length=64, learning_rate=1e-3, save_steps=100, seed=3)
trainer = GRPOTrainer(model, reward_funcs=[digits], args=args, train_dataset=rows, show_progress=False)
summary = trainer.train()
metrics = {k: v for k, v in summary["final_metrics"].items() if isinstance(v, (int, float))}
print("RESULT " + json.dumps({"steps": summary["steps"], "engine": type(trainer.engine).__name__,
                              "metrics": metrics}))
"""


@pytest.mark.gpu
@pytest.mark.vllm
def test_grpo_trainer_runs_on_vllm_engine(tmp_path):
    """GRPOTrainer with engine='vllm' on the tiny model: shared weights, sync, standby, mismatch metric.

    Runs in a subprocess: a process can hold one vLLM engine, and the module's fixture holds one.
    """
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _TRAINER_SCRIPT, str(tmp_path / "run")], cwd=root,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):])
    metrics = result["metrics"]
    print("\ntrainer on vLLM:", {k: round(v, 5) for k, v in metrics.items()
                                 if k.startswith(("mismatch", "time_", "standby", "generation_tokens"))})
    assert result["steps"] == 3 and result["engine"] == "VLLMEngine"
    assert metrics["standby_freed_gib"] > 0
    # the engine's sampling logprobs agree with the trainer's own (same weights, synced LoRA)
    assert metrics["mismatch_logp_diff_mean"] < 0.05
