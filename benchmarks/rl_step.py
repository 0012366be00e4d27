"""One RL step with the shared-weight vLLM engine: generate → standby → train → sync, timed and measured.

Llama-3-8B shapes with vLLM's dummy weights (only config.json is needed), LoRA on all 7 projections. Prints a
table and writes JSON. Run on a CUDA machine with vllm installed:

    python benchmarks/rl_step.py --preset llama3-8b                 # the full benchmark
    python benchmarks/rl_step.py --preset llama3-8b --layers 2 --eager --num-prompts 4 --steps 1   # smoke test

Phases of a step: ``wake`` (re-map KV) → ``generate`` (VLLMEngine.generate: num_prompts × num_generations
completions) → ``sleep`` (release KV) → ``train`` (policy forward+backward over every completion in micro-batches,
GRPO clipped loss on per-token logprobs computed with a chunked lm_head, then one AdamW step on LoRA) → ``sync``
(LoRA A/B into vLLM's slots). "device GiB" is memory in use on the GPU at the end of a phase with PyTorch's cache
not emptied during the phase, i.e. about the phase's peak.

Then: raw ``vllm.LLM.generate`` on the same prompts and SamplingParams (the wrapper's overhead), and the longest
completion for which training fits with the KV cache allocated (no standby) and released (standby).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rlcore.testing import write_llama3_8b_dummy_dir  # noqa: E402

GIB = 2**30
DEVICE = "cuda"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def write_dummy_model(layers: int | None) -> str:
    return write_llama3_8b_dummy_dir(layers=layers, with_tokenizer=False)


# ---------------------------------------------------------------------- the training side
def local_completion_logprobs(model, input_ids: torch.Tensor, completion_length: int,
                              chunk: int = 2048) -> torch.Tensor:
    """Per-token logprobs of the completion with the lm_head applied ``chunk`` tokens at a time (no padding)."""
    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, -completion_length - 1:-1, :].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, -completion_length:].reshape(-1)
    weight = base.get_output_embeddings().weight
    pieces = []
    for start in range(0, hidden.shape[0], chunk):
        def piece(h, t):
            logits = (h @ weight.t()).float()
            return logits.gather(-1, t[:, None])[:, 0] - torch.logsumexp(logits, -1)
        pieces.append(torch.utils.checkpoint.checkpoint(piece, hidden[start:start + chunk],
                                                        targets[start:start + chunk], use_reentrant=False))
    return torch.cat(pieces).view(input_ids.shape[0], completion_length)


class Trainer:
    """Forward+backward with a GRPO clipped loss; the logprob path of rlcore's trainer when it imports."""

    def __init__(self, model, lr: float = 1e-6) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.logprob_impl = "local"
        try:
            from rlcore.logprobs import completion_logprobs

            self._rlcore = completion_logprobs
            self.logprob_impl = "rlcore.logprobs.completion_logprobs"
        except Exception as error:  # noqa: BLE001 - the local path measures the same thing
            print(f"rlcore.logprobs unavailable ({error!r}); using the local chunked logprobs")
            self._rlcore = None

    def logprobs(self, input_ids: torch.Tensor, completion_length: int) -> torch.Tensor:
        if self._rlcore is not None:
            try:
                mask = torch.ones_like(input_ids)
                return self._rlcore(self.model, input_ids, mask, completion_length, 1.0, 2048)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001
                print(f"rlcore.logprobs failed ({error!r}); using the local chunked logprobs")
                traceback.print_exc()
                self._rlcore = None
                self.logprob_impl = "local (rlcore.logprobs failed)"
        return local_completion_logprobs(self.model, input_ids, completion_length)

    def backward(self, input_ids: torch.Tensor, completion_length: int, old: torch.Tensor,
                 advantages: torch.Tensor, tokens_in_step: int) -> float:
        logps = self.logprobs(input_ids, completion_length).float()
        ratio = torch.exp(logps - old)
        clipped = torch.clamp(ratio, 0.8, 1.2)
        loss = -torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None]).sum() / tokens_in_step
        loss.backward()
        return float(loss.detach())

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_on_rollouts(trainer: Trainer, rollouts, num_generations: int, micro_batch: int) -> int:
    """One optimizer step over all rollouts (equal lengths: benchmark completions ignore EOS)."""
    rewards = torch.randn(len(rollouts)).view(-1, num_generations)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    tokens = sum(len(r.completion_ids) for r in rollouts)
    for start in range(0, len(rollouts), micro_batch):
        group = rollouts[start:start + micro_batch]
        ids = torch.tensor([r.prompt_ids + r.completion_ids for r in group], device=DEVICE)
        old = torch.tensor([r.logprobs for r in group], device=DEVICE)
        trainer.backward(ids, len(group[0].completion_ids), old, advantages[start:start + micro_batch].to(DEVICE),
                         tokens)
    trainer.step()
    return tokens


def fits(trainer: Trainer, batch: int, prompt_len: int, completion_len: int, vocab: int) -> bool:
    """Whether one forward+backward on ``batch`` sequences of prompt+completion tokens fits in memory."""
    ok = True
    try:
        ids = torch.randint(0, vocab, (batch, prompt_len + completion_len), device=DEVICE)
        old = torch.full((batch, completion_len), -math.log(vocab), device=DEVICE)
        trainer.backward(ids, completion_len, old, torch.ones(batch, device=DEVICE), batch * completion_len)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        ok = False
    except Exception as error:  # noqa: BLE001 - e.g. a kernel's size limit: report it as "does not fit"
        print(f"  failed with {type(error).__name__}: {str(error)[:200]}")
        ok = False
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return ok


def longest_fitting(trainer: Trainer, lengths: list[int], batch: int, prompt_len: int, vocab: int) -> int:
    best = 0
    for length in lengths:
        start = time.perf_counter()
        ok = fits(trainer, batch, prompt_len, length, vocab)
        print(f"  completion {length:>6}: {'fits' if ok else 'OOM'} ({time.perf_counter() - start:.1f} s)")
        if not ok:
            break
        best = length
    return best


# ---------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b", choices=["llama3-8b"])
    parser.add_argument("--model-dir", default=None, help="a real checkpoint instead of dummy weights")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--completion-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="RL steps; the first is a warm-up")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs / compile (faster start)")
    parser.add_argument("--search-lengths", default="1024,2048,4096,8192,16384,32768,65536",
                        help="completion lengths tried upward until OOM ('' skips the search)")
    parser.add_argument("--search-batch", type=int, default=1,
                        help="sequences per forward+backward in the length search (gradient accumulation "
                             "covers the rest of the group)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "rl_step.json"))
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from rlcore.config import GRPOConfig, ModelConfig
    from rlcore.rollout import SamplingSettings
    from rlcore.shared_weights import shared_fraction
    from rlcore.vllm_engine import VLLMEngine

    import vllm

    results: dict[str, Any] = {"args": vars(args), "vllm": vllm.__version__, "torch": torch.__version__,
                               "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}

    def save() -> None:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2, default=str)

    path = args.model_dir or write_dummy_model(args.layers)
    total_gib = torch.cuda.mem_get_info()[1] / GIB
    model_config = ModelConfig(model_name_or_path=path, dtype="bfloat16", lora_r=args.lora_r,
                               lora_alpha=args.lora_alpha, gpu_memory_utilization=args.gpu_memory_utilization,
                               enforce_eager=args.eager, max_seq_length=args.max_model_len, target_modules=TARGETS)
    engine = VLLMEngine(model_config, GRPOConfig(seed=0), load_format="auto" if args.model_dir else "dummy",
                        ignore_eos=True)
    kv_tokens = engine.kv_cache_tokens
    results["init"] = {"seconds": engine.init_seconds, "kv_cache_tokens": kv_tokens,
                       "device_used_gib": device_used_gib(), "device_total_gib": total_gib}
    print(f"engine init {engine.init_seconds:.1f} s, KV cache {kv_tokens} tokens, "
          f"device used {device_used_gib():.2f} / {total_gib:.1f} GiB")
    save()

    gc.collect()
    torch.cuda.synchronize()
    allocated, used = torch.cuda.memory_allocated(), device_used_gib()
    base = engine.build_shared_model()
    torch.cuda.synchronize()
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    shared, total = shared_fraction(base, engine.vllm_model)
    results["shared_model"] = {
        "weight_gib": weight_bytes / GIB, "shared_params": shared, "params": total,
        "allocated_growth_bytes": torch.cuda.memory_allocated() - allocated,
        "device_growth_gib": device_used_gib() - used}
    print(f"shared model: {shared}/{total} parameters are views of vLLM's, {weight_bytes / GIB:.2f} GiB of weights, "
          f"allocated +{results['shared_model']['allocated_growth_bytes']} B")

    policy = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=TARGETS))
    with torch.no_grad():  # non-zero B so the adapter changes the outputs
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 1e-3)
    policy.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.get_base_model().config.use_cache = False
    policy.train()
    engine.attach_policy(policy)
    trainer = Trainer(policy)
    lora_params = sum(p.numel() for p in trainer.params)
    results["lora"] = {"params": lora_params, "dtype": str(trainer.params[0].dtype),
                       "logprobs": trainer.logprob_impl}
    save()

    generator = torch.Generator().manual_seed(0)
    vocab = engine.hf_config().vocab_size
    unique = torch.randint(0, vocab, (args.num_prompts, args.prompt_len), generator=generator).tolist()
    prompts = [p for p in unique for _ in range(args.num_generations)]
    sampling = SamplingSettings(max_tokens=args.completion_len, temperature=1.0)

    steps = []
    for step in range(args.steps):
        row: dict[str, float] = {}
        torch.cuda.synchronize()
        t = time.perf_counter()
        row.update(engine.wake())
        row["wake_total_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rollouts = engine.generate(prompts, sampling)
        row["generate_s"] = time.perf_counter() - t
        row["completion_tokens"] = sum(len(r.completion_ids) for r in rollouts)
        row["generate_tok_s"] = row["completion_tokens"] / row["generate_s"]
        row["generate_device_gib"] = device_used_gib()
        t = time.perf_counter()
        row.update(engine.sleep())
        row["sleep_total_s"] = time.perf_counter() - t
        row["asleep_device_gib"] = device_used_gib()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # vLLM's KV pool stays counted as "allocated" by PyTorch while released: report the peak above start
        allocated_start = torch.cuda.memory_allocated()
        t = time.perf_counter()
        train_tokens = train_on_rollouts(trainer, rollouts, args.num_generations, args.micro_batch)
        torch.cuda.synchronize()
        row["train_s"] = time.perf_counter() - t
        row["train_tokens"] = train_tokens
        row["train_device_gib"] = device_used_gib()
        row["train_torch_peak_above_start_gib"] = (torch.cuda.max_memory_allocated() - allocated_start) / GIB
        sync = engine.sync_weights()
        row["sync_s"] = sync["seconds"]
        row["sync_mib"] = sync["bytes"] / 2**20
        row["step_s"] = row["wake_total_s"] + row["generate_s"] + row["sleep_total_s"] + row["train_s"] + row["sync_s"]
        steps.append(row)
        print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        results["steps"] = steps
        save()
    del rollouts

    # raw vllm.LLM.generate on the same prompts / SamplingParams (KV awake), with and without the LoRA
    engine.wake()
    params = [engine.sampling_params(sampling, i) for i in range(len(prompts))]
    requests = [{"prompt_token_ids": p} for p in prompts]
    raw = {}
    for label, lora in (("raw_lora", engine.lora_request), ("raw_no_lora", None)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        outputs = engine.llm.generate(requests, params, use_tqdm=False, lora_request=lora)
        seconds = time.perf_counter() - t
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        raw[label] = {"seconds": seconds, "tok_s": tokens / seconds}
        print(f"{label}: {tokens / seconds:.0f} tok/s")
    last = steps[-1]
    raw["engine_over_raw_lora"] = last["generate_tok_s"] / raw["raw_lora"]["tok_s"]
    results["raw_vllm"] = raw
    save()

    # KV cache with / without standby: without it, the trainer's peak has to fit beside the KV cache
    kv_bytes = last.get("freed_gib", 0.0) * GIB
    per_token = kv_bytes / kv_tokens if kv_tokens and kv_bytes else float("nan")
    train_extra = (last["train_device_gib"] - last["asleep_device_gib"]) * GIB
    without = max(0, int((kv_bytes - train_extra) / per_token)) if per_token == per_token else None
    results["kv_cache"] = {"tokens_with_standby": kv_tokens, "gib": kv_bytes / GIB,
                           "bytes_per_token": per_token, "train_peak_above_asleep_gib": train_extra / GIB,
                           "tokens_without_standby_same_utilization": without}
    save()

    if args.search_lengths:
        lengths = [int(x) for x in args.search_lengths.split(",") if x]
        search = {"batch": args.search_batch, "prompt_len": args.prompt_len,
                  "generation_limit_8_completions": (kv_tokens // args.num_generations - args.prompt_len)
                  if kv_tokens else None}
        gc.collect()
        torch.cuda.empty_cache()
        engine.wake()
        print("length search, KV cache allocated (no standby):")
        search["train_fits_without_standby"] = longest_fitting(trainer, lengths, args.search_batch,
                                                               args.prompt_len, vocab)
        results["length_search"] = search
        save()
        engine.sleep()
        print("length search, KV cache released (standby):")
        search["train_fits_with_standby"] = longest_fitting(trainer, lengths, args.search_batch,
                                                            args.prompt_len, vocab)
        results["length_search"] = search
        save()

    print_table(results)
    save()
    return 0


def print_table(results: dict[str, Any]) -> None:
    steps = results.get("steps", [])
    if not steps:
        return
    s = steps[-1]
    raw = results.get("raw_vllm", {})
    kv = results.get("kv_cache", {})
    search = results.get("length_search", {})
    rows = [
        ("engine init (s)", results["init"]["seconds"]),
        ("generate tok/s (VLLMEngine)", s["generate_tok_s"]),
        ("generate tok/s (raw LLM.generate, LoRA)", raw.get("raw_lora", {}).get("tok_s")),
        ("generate tok/s (raw LLM.generate, no LoRA)", raw.get("raw_no_lora", {}).get("tok_s")),
        ("engine / raw (LoRA)", raw.get("engine_over_raw_lora")),
        ("generate s", s["generate_s"]),
        ("train s (fwd+bwd+AdamW)", s["train_s"]),
        ("sync s", s["sync_s"]),
        ("sleep s / wake s", f"{s.get('sleep_seconds', 0):.4f} / {s.get('wake_seconds', 0):.4f}"),
        ("KV freed by sleep (GiB)", s.get("freed_gib")),
        ("device GiB: generate / asleep / train", f"{s['generate_device_gib']:.1f} / {s['asleep_device_gib']:.1f} "
                                                  f"/ {s['train_device_gib']:.1f}"),
        ("train peak allocated above phase start (GiB)", s.get("train_torch_peak_above_start_gib")),
        ("KV tokens with standby", kv.get("tokens_with_standby")),
        ("KV tokens without standby (same util.)", kv.get("tokens_without_standby_same_utilization")),
        ("longest completion, train fits: no standby", search.get("train_fits_without_standby")),
        ("longest completion, train fits: standby", search.get("train_fits_with_standby")),
        ("longest completion, 8 gens fit in KV", search.get("generation_limit_8_completions")),
    ]
    print("\n| quantity | value |\n| --- | --- |")
    for name, value in rows:
        text = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"| {name} | {text} |")


if __name__ == "__main__":
    sys.exit(main())
