"""After GRPO steps through VLLMEngine, vLLM generates what the trainer's own updated policy generates.

The arithmetic model's tiny preset is fine-tuned on the GPU inside the test, then trained a few GRPO steps with
engine="vllm" (shared weights, LoRA synced into vLLM's slots in place, standby). For held-out prompts, the
engine's greedy completions must equal transformers' greedy decoding on the trainer's policy module (the PEFT model
with the updated adapter), except at bf16 near-ties; the updates must have changed greedy outputs (so it is the
learned weights that agree, not zero adapters); and vLLM's log-probabilities must match the adapted policy's and not
the base model's. Runs in a subprocess: a process holds one vLLM engine (tests/test_vllm_engine.py's fixture has one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# argv: output directory, engine ("vllm"; "hf" runs the same comparison on CPU, where it is trivially equal)
_SCRIPT = r"""
import json, sys, torch
from rlcore import GRPOConfig, ModelConfig, arithmetic
from rlcore.hf_engine import HFEngine
from rlcore.rewards import CorrectAnswer, FormatReward
from rlcore.trainer import GRPOTrainer

out, engine = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
path = arithmetic.build_arithmetic_model(out + "/model", arithmetic.TINY_BUILD, device="cuda" if cuda else "cpu")
heldout = arithmetic.heldout_problems(256, seed=0)
rows = arithmetic.grpo_rows(arithmetic.grpo_problems(512, seed=0, heldout=heldout))
model = ModelConfig(model_name_or_path=path, engine=engine, dtype="bfloat16" if cuda else "float32", lora_r=16,
                    lora_alpha=32, enforce_eager=True, gpu_memory_utilization=0.2, max_seq_length=512)
args = GRPOConfig(output_dir=out + "/run", num_generations=8, per_device_train_batch_size=64, max_steps=6,
                  max_prompt_length=128, max_completion_length=48, learning_rate=3e-3, lr_scheduler_type="constant",
                  save_steps=6, seed=0)
trainer = GRPOTrainer(model, reward_funcs=[CorrectAnswer(), FormatReward(weight=0.2)], args=args,
                      train_dataset=rows, show_progress=False)
summary = trainer.train()
tokenizer, policy = trainer.tokenizer, trainer.model
prompts = [arithmetic.prompt_token_ids(tokenizer, arithmetic.chat_prompt(p.question), None)[0] for p in heldout[:64]]
greedy = trainer.sampling_settings(greedy=True)
served = trainer.engine.generate(prompts, greedy)
local = HFEngine(policy, tokenizer)
adapted = local.generate(prompts, greedy)
with policy.disable_adapter():
    base = local.generate(prompts, greedy)


@torch.no_grad()
def logits_after(ids):
    device = next(policy.parameters()).device
    policy.eval()
    return policy(input_ids=torch.tensor([ids], device=device)).logits[0].float()


identical, near_ties, far = 0, 0, []
for prompt, s, a in zip(prompts, served, adapted):
    if s.completion_ids == a.completion_ids:
        identical += 1
        continue
    first = next((i for i, (x, y) in enumerate(zip(s.completion_ids, a.completion_ids)) if x != y),
                 min(len(s.completion_ids), len(a.completion_ids)))
    if first >= min(len(s.completion_ids), len(a.completion_ids)):
        far.append({"first": first, "reason": "one is a prefix of the other"})
        continue
    last = logits_after(prompt + a.completion_ids[:first])[-1]
    gap = float(last[a.completion_ids[first]] - last[s.completion_ids[first]])
    if gap < 0.25:
        near_ties += 1
    else:
        far.append({"first": first, "gap": gap})
changed = [i for i, (a, b) in enumerate(zip(adapted, base)) if a.completion_ids != b.completion_ids]
changed_and_served = [i for i in changed if served[i].completion_ids == adapted[i].completion_ids]

# vLLM's log-probabilities of its own greedy tokens against the adapted policy's and the base model's
adapter_diff, base_diff, adapter_max, base_max = [], [], [], []
for prompt, s in zip(prompts[:32], served[:32]):
    ids = prompt + s.completion_ids
    target = torch.tensor(s.completion_ids)
    served_logps = torch.tensor(s.logprobs)
    for use_adapter, means, maxima in ((True, adapter_diff, adapter_max), (False, base_diff, base_max)):
        if use_adapter:
            logits = logits_after(ids)
        else:
            with policy.disable_adapter():
                logits = logits_after(ids)
        logps = torch.log_softmax(logits[len(prompt) - 1:-1], -1).cpu().gather(1, target[:, None])[:, 0]
        means.append(float((logps - served_logps).abs().mean()))
        maxima.append(float((logps - served_logps).abs().max()))  # the decision tokens GRPO moved
lora_b = max(float(p.detach().abs().max()) for n, p in policy.named_parameters() if "lora_B" in n)
metrics = summary["final_metrics"]
print("RESULT " + json.dumps({
    "engine": type(trainer.engine).__name__, "steps": summary["steps"], "prompts": len(prompts),
    "identical": identical, "near_ties": near_ties, "far_divergences": far, "changed_by_learning": len(changed),
    "changed_and_served_equal": len(changed_and_served), "logp_diff_adapter": sum(adapter_diff) / len(adapter_diff),
    "logp_diff_base": sum(base_diff) / len(base_diff), "logp_max_diff_adapter": sum(adapter_max) / len(adapter_max),
    "logp_max_diff_base": sum(base_max) / len(base_max), "lora_b_max": lora_b,
    "mismatch_logp_diff_mean": metrics.get("mismatch_logp_diff_mean")}))
"""


def run_check(tmp_path, engine: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), engine], cwd=root, capture_output=True,
                          text=True, timeout=900, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_serves_the_learned_policy(tmp_path):
    result = run_check(tmp_path, "vllm")
    print(f"\nafter GRPO through vLLM: {json.dumps(result)}")
    assert result["engine"] == "VLLMEngine" and result["steps"] == 6
    assert result["lora_b_max"] > 0  # the adapter trained
    # any divergence between vLLM and the trainer's greedy decoding is a bf16 near-tie, and those are rare
    assert result["far_divergences"] == []
    assert result["identical"] >= 0.75 * result["prompts"]
    # the updates changed what greedy decoding writes (on a CPU, fp32: 43 of 64 prompts), and vLLM writes the
    # changed completions too
    assert result["changed_by_learning"] >= 8
    assert result["changed_and_served_equal"] >= 0.5 * result["changed_by_learning"]
    # vLLM scores its tokens as the adapted policy does, not as the base model does: per completion, the largest
    # |Δ log p| (at the tokens GRPO moved) against the base model is several times the bf16 noise against the policy
    # (CPU, fp32: 0.018 mean and ~0.5 largest against the base model)
    assert result["logp_diff_adapter"] < 0.05 and result["logp_max_diff_adapter"] < 0.25
    assert result["logp_max_diff_base"] > 3 * result["logp_max_diff_adapter"]
